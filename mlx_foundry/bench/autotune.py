"""Tune the fused GEMV's launch parameters on this device (a ready-made use of :mod:`.tuner`).

:func:`tune_linear` times ``mlx_foundry.ops.linear``'s kernel for each
``(ROWS, THREADS, SPLITK)`` setting (rows per SIMD-group, threads per threadgroup,
split K; with several rows of ``x``, ``rows_of_x=``, also ``MBLOCK``) at
the decode shapes of the bench suite, then the unrolling of the loop over ``K``
(``UNROLL``) at the fastest of them, with the bench's timing method but for one thing
(each call waits for the one before: :func:`depending_on`), and stores
the fastest per (device, MLX version, kernel source hash, shape class) in the
tuning file, under the kernel key ``"<backend>:<kernel name>"``.  The op reads it
back with :func:`lookup_linear` (cache the answer per specialization: it is not
meant for every call)::

    params = lookup_linear(kern, n, k, m, backend) or default_launch(n, k, m=m)

Run on the target GPU::

    python -c "from mlx_foundry.bench.autotune import tune_linear; print(tune_linear())"
"""

import importlib
import itertools

import mlx.core as mx

from . import CALLS_PER_TIMING, timing, tuner
from .cases import FULL, TINY, _dense_w, _qweight, weight_bytes

DEFAULT_ROWS = (1, 2, 4, 8)
DEFAULT_THREADS = (64, 128, 256)
DEFAULT_UNROLLS = (1, 2, 4)
"""Unroll counts of the loop over ``K`` tried at the fastest setting of the grid."""
DEFAULT_MIN_BLOCKS = (4,)
"""Register bounds (``MINBLOCKS``) timed at the fastest setting of the grid, on CUDA (the
grid itself is unbounded; a bounded untuned default meets its unbounded twin there)."""
LAUNCH_CONSTANTS = ("ROWS", "THREADS", "SPLITK", "MBLOCK", "UNROLL", "MINBLOCKS")
"""The GEMV launch constants a recorded launch drops before candidates are passed (the
untuned default carries ``MBLOCK``, and for some launches ``MINBLOCKS``, too: left in,
they would apply to every candidate)."""


def linear_candidates(rows=DEFAULT_ROWS, threads=DEFAULT_THREADS, split=(0, 1)):
    """``[{"ROWS": r, "THREADS": t, "SPLITK": s, "UNROLL": 1}, ...]``, every combination
    (unrolling is the second pass: :func:`unroll_refinements`)."""
    from mlx_foundry.stages.gemv import DEFAULT_UNROLL

    return [{"ROWS": r, "THREADS": t, "SPLITK": s, "UNROLL": DEFAULT_UNROLL}
            for r, t, s in itertools.product(rows, threads, split)]


def unroll_refinements(unroll=DEFAULT_UNROLLS):
    """The tuner's second pass (``tuner.tune(refine=...)``): ``[{"UNROLL": u}, ...]``,
    each count checked as the stages check it."""
    from mlx_foundry.stages.gemv import check_unroll

    for u in unroll:
        check_unroll(u)
    return [{"UNROLL": u} for u in unroll]


def bound_refinements(backend, min_blocks=DEFAULT_MIN_BLOCKS):
    """More of the second pass: ``[{"MINBLOCKS": b}, ...]`` on CUDA, the register bounds
    (``stages.gemv.check_min_blocks``) timed at the fastest setting; nothing on other
    backends, where the bound does not change the kernel. 0 (no bound) is left out: the
    grid's settings are unbounded, and a refinement of 0 would time the fastest one
    twice under two names."""
    from mlx_foundry.stages.gemv import check_min_blocks

    for b in min_blocks:
        check_min_blocks(b, 32)  # one SIMD-group per threadgroup: the widest range
    return [{"MINBLOCKS": b} for b in min_blocks if b] if backend == "cuda" else []


def batch_candidates(m, *, dual=False, rows=(2, 4, 8), threads=(128,), split=(0, 1)):
    """Candidates for ``m`` rows of ``x``: :func:`linear_candidates` times ``MBLOCK`` in
    ``{1, 2, 4, ceil(m / 2), m}`` (one block of rows of ``x``, or two: the defaults'
    choices), the launches the GEMV accepts only (``ops.linear.valid_launch``)."""
    from mlx_foundry.ops.linear import valid_launch

    mblocks = sorted({mb for mb in (1, 2, 4, -(-m // 2), m) if mb <= m})
    out = [dict(c, MBLOCK=mb) for c in linear_candidates(rows, threads, split)
           for mb in mblocks]
    return [c for c in out if valid_launch(c, dual=dual)]


def depending_on(x, out):
    """``x`` as a new array that waits for ``out``: ``x + 0 * out[0]`` (equal to ``x``
    for the finite outputs of a checked kernel). ``out``: an array or a tuple of them.

    The tuner feeds every call its ``x`` this way, from the previous call's output. The
    bench's calls are independent, and the GPU runs one call's kernel beside the next:
    a launch that leaves SMs free wins by that overlap. In a decode step each GEMV waits
    for the kernel before it. On an H200 (docs/gemv_chain_h200_*.json) R4 T256 without
    split K took 0.94 of the default's time with independent calls and 1.06 chained,
    and ncu times it 1.25x the default alone; tuned on independent calls, it was chosen.

    The chain costs about as much again as a 4-bit decode GEMV (two small elementwise
    kernels and the waits between kernels: 13.8 -> 30.3 us per call there), the same for
    every candidate. The tuner's 3% margin applies to that total, so a candidate must
    take about 6% less GEMV time to replace the default.
    """
    first = out[0] if isinstance(out, (list, tuple)) else out
    return x + (first.reshape(-1)[:1] * 0).astype(x.dtype)


class Chain:
    """A sequence of calls in which each waits for the one before (:func:`depending_on`):
    ``x = chain.wait(x)`` before a call (the first call's ``x`` is returned as it is),
    ``return chain.done(out)`` after it."""

    __slots__ = ("_prev",)

    def __init__(self):
        self._prev = None

    def wait(self, x):
        return x if self._prev is None else depending_on(x, self._prev)

    def done(self, out):
        self._prev = out
        return out


def kernel_runner(kern, backend, params, *, chained=True):
    """``run(kw)``: one call of ``kern`` with the launch keywords ``kw`` of an input set
    (:func:`_captured`) at the launch constants ``params``; with ``chained`` each call's
    ``x`` waits for the previous call's output (:class:`Chain`), as a decode step runs and
    the tuner times."""
    chain = Chain()

    def run(kw):
        if chained:
            kw = dict(kw, x=chain.wait(kw["x"]))
        return chain.done(kern(backend=backend, **kw, **params))
    return run


def kernel_key(kern, backend):
    """The tuning key of one kernel on one backend: ``"<backend>:<kernel name>"``."""
    return f"{backend}:{kern.name}"


def lookup_linear(kern, n, k, m=1, backend="cuda", *, path=None):
    """The tuned ``{"ROWS", "THREADS", "SPLITK", "UNROLL"[, "MBLOCK"]}`` of ``kern`` for
    an ``[m, k] x [n, k]^T`` GEMV, or None (nothing tuned, or the tuner kept the default
    launch: see ``tuner.lookup``)."""
    return tuner.lookup(kernel_key(kern, backend), source_hash=tuner.source_hash(kern),
                        shape_class=tuner.shape_class(n, k, m), path=path)


def tune_linear(backend=None, *, shapes=None, bits=(4, 8, None), group_size=64,
                candidates=None, dtype=mx.float16, repeats=5, force=False, path=None,
                pool_bytes=None, rows_of_x=(1,), unroll=DEFAULT_UNROLLS,
                min_blocks=DEFAULT_MIN_BLOCKS):
    """Tune ``linear``'s GEMV kernel for each weight format and shape.

    Args:
        backend (str, optional): ``"cuda"``/``"metal"``. Default: the GPU backend,
            else ``"reference"`` (only for testing: the reference backend has no
            launch parameters, so every candidate times the same).
        shapes (list of (k, n), optional): default: the bench suite's
            ``(4096, 14336)``, ``(14336, 4096)``, ``(4096, 4096)``.
        bits (tuple): weight formats; ``None`` = dense. Default: ``(4, 8, None)``.
        candidates (list of dict, optional): default :func:`linear_candidates` (one row
            of ``x``), :func:`batch_candidates` (several).
        repeats (int): timings per candidate. Default: ``5``.
        rows_of_x (tuple of int): rows of ``x`` to tune for (each its own shape class;
            several rows also tune ``MBLOCK``). Default: ``(1,)``.
        unroll (tuple of int): ``UNROLL`` counts timed at the fastest candidate (a second
            pass; ``()`` skips it). Default: :data:`DEFAULT_UNROLLS`.
        min_blocks (tuple of int): register bounds (``MINBLOCKS``) timed at the fastest
            candidate in the same pass, on CUDA only (the grid is unbounded; ``()``
            skips them). Default: :data:`DEFAULT_MIN_BLOCKS`.
        force (bool): re-tune stored entries. Default: ``False``.

    Returns:
        dict: ``{(kernel key, shape class): chosen params}``.
    """
    from mlx_foundry import ops
    from mlx_foundry.ops.weights import Weight

    backend, D, pool_bytes = _setup(backend, pool_bytes)
    refine = unroll_refinements(unroll) + bound_refinements(backend, min_blocks)
    if shapes is None:
        h, i = D["hidden"], D["inter"]
        shapes = [(h, i), (i, h), (h, h)]
    for m in rows_of_x:
        if not isinstance(m, int) or m < 1:
            raise ValueError(f"[tune_linear] 'rows_of_x' must hold positive ints but got {m!r}.")
    chosen = {}
    for b, (k, n), m in itertools.product(bits, shapes, rows_of_x):
        def make(idx, b=b, k=k, n=n, m=m):
            x = mx.random.normal((m, k), key=mx.random.key(idx)).astype(dtype)
            w = (Weight(*_qweight(idx, 1, n, k, b, group_size, dtype), group_size=group_size,
                        bits=b) if b else Weight(_dense_w(idx, 1, n, k, dtype)))
            return ops.linear, (x, w), {}

        cands = candidates or (linear_candidates() if m == 1 else batch_candidates(m))
        chosen.update(_tune_op(make, n, k, weight_bytes(n, k, b, group_size, dtype.size),
                               cands, backend, pool_bytes, m=m, repeats=repeats, force=force,
                               path=path, refine=refine, dense=b is None, dtype=dtype))
    return chosen


def _setup(backend, pool_bytes):
    """The backend, the shape table (tiny shapes for the reference backend on a CPU)
    and the pool size of a tuning run."""
    from . import select_backend

    backend = select_backend(backend)
    tiny = backend == "reference" and mx.default_device() == mx.cpu
    if pool_bytes is None:
        pool_bytes = timing.default_pool_bytes("reference" if tiny else backend)
    return backend, (TINY if tiny else FULL), pool_bytes


def _tune_op(make, n, k, set_bytes, candidates, backend, pool_bytes, *, head_dim=None, m=1,
             dual=False, dense=False, dtype=None, **tune_kw):
    """Tune the one kernel an op launches: ``make(idx) -> (op, args, kwargs)`` builds
    distinct input sets; the launch is recorded per set and replayed with each candidate
    setting, timed with the bench's method over a pool larger than the cache, each call's
    ``x`` made to wait for the previous call (:func:`depending_on`). The op's
    untuned launch (``default_launch``) stays unless a candidate is clearly faster."""
    sets, found = _captured(make, backend)
    pool = timing.make_pool(sets, set_bytes, pool_bytes)
    kern = found[0]

    def build(params):
        return kernel_runner(kern, backend, params)

    lin = importlib.import_module("mlx_foundry.ops.linear")  # the module, not the op
    # A launch constant a candidate leaves out takes its stage default (MBLOCK 1, UNROLL
    # 1): written out, so that the same launch is one setting, not two.
    default = lin.default_launch(n, k, head_dim=head_dim, m=m, dual=dual, dense=dense,
                                 dtype=dtype)
    implied = {"MBLOCK": lin.DEFAULT_MBLOCK, "UNROLL": lin.DEFAULT_UNROLL}
    candidates = [dict({c: v for c, v in implied.items() if c in default}, **cand)
                  for cand in candidates]
    cls = tuner.shape_class(n, k, m)
    key = kernel_key(kern, backend)
    # The bench's calls per timing: on CUDA the number of calls per mx.eval changes the
    # time per call (more calls, slower and noisier), so the tuner takes the bench's
    # count. (Before, ~1000-2000 calls per timing put a Q/K/V launch that ncu times 14%
    # slower ahead of the default.)
    calls = None if backend == "reference" else CALLS_PER_TIMING
    params = tuner.tune(key, candidates, tuner.timed_run(build, pool, repeats=1, calls=calls),
                        source_hash=tuner.source_hash(kern), shape_class=cls,
                        default=default, **tune_kw)
    # The ops resolve their launch once per shape: this process must see the new choice.
    lin.forget_launches()
    return {(key, cls): params}


# ---- the fused decode kernels the mlx-lm patch launches ---------------------------------
def _decode_ops(D, bits, group_size, dtype):
    """``{name: (make(idx) -> (op, args, kwargs), n, k, set bytes)}`` at the suite's shapes."""
    from mlx_foundry import ops
    from mlx_foundry.ops.weights import Weight

    h, i, gs = D["hidden"], D["inter"], group_size
    heads, kv, hd = D["heads"], D["kv_heads"], D["head_dim"]

    def w(idx, j, n, k):
        return Weight(*_qweight(idx, j, n, k, bits, gs, dtype), group_size=gs, bits=bits)

    def act(idx, j, n):
        return mx.random.normal((1, n), key=mx.random.key(1000 * idx + j)).astype(dtype)

    def gamma(idx, k):
        return (1.0 + 0.1 * mx.random.normal((k,), key=mx.random.key(idx))).astype(dtype)

    wb = lambda n, k: weight_bytes(n, k, bits, gs, dtype.size)  # noqa: E731
    out = {
        "o_proj+residual": (lambda idx: (ops.linear, (act(idx, 0, h), w(idx, 1, h, h)),
                                         {"residual": act(idx, 2, h)}), h, h, wb(h, h)),
        "down_proj+residual": (lambda idx: (ops.linear, (act(idx, 0, i), w(idx, 1, h, i)),
                                            {"residual": act(idx, 2, h)}), h, i, wb(h, i)),
        "norm_gate_up_swiglu": (lambda idx: (ops.norm_gate_up_swiglu,
                                             (act(idx, 0, h), gamma(idx, h), 1e-5,
                                              w(idx, 1, i, h), w(idx, 2, i, h)), {}),
                                i, h, 2 * wb(i, h)),
    }
    # The patched decode launches Q/K/V with keys and values in one output (the
    # joint-buffer KV cache); the bench's op case launches the three-output kernel.
    for name, joint in (("norm_qkv_rope+joint_kv", True), ("norm_qkv_rope", False)):
        out[name] = (lambda idx, joint=joint: (
            ops.norm_qkv_rope, (act(idx, 0, h)[None], gamma(idx, h), 1e-5,
                                w(idx, 1, heads * hd, h), w(idx, 2, kv * hd, h),
                                w(idx, 3, kv * hd, h)),
            dict(n_heads=heads, n_kv_heads=kv, head_dim=hd, offset=7, rope_base=500000.0,
                 joint_kv=joint)),
            (heads + 2 * kv) * hd, h, wb((heads + 2 * kv) * hd, h))
    return out


def _captured(make, backend):
    """``make`` as input sets of one kernel: ``(kwargs of its launch,)``; and the kernel."""
    from mlx_foundry.kernel import record_launches

    found = []

    def sets(idx):
        op, args, kwargs = make(idx)
        with record_launches() as launches:
            op(*args, backend=backend, **kwargs)
        (program, a, kw), = launches
        assert not a
        kw = {k: v for k, v in kw.items() if k not in LAUNCH_CONSTANTS}
        found.append(program)
        return (kw,)

    return sets, found


def decode_candidates(qkv=False):
    """Candidate settings for the fused decode kernels (Q/K/V: ROWS even)."""
    rows = (2, 4, 8) if qkv else DEFAULT_ROWS
    return linear_candidates(rows=rows)


def tune_decode(backend=None, *, bits=4, group_size=64, dtype=mx.float16, candidates=None,
                repeats=5, force=False, path=None, pool_bytes=None, only=None,
                unroll=DEFAULT_UNROLLS, min_blocks=DEFAULT_MIN_BLOCKS):
    """Tune the fused kernels of a decode step (o/down projection + residual, norm +
    gate/up + SwiGLU, norm + Q/K/V + RoPE) at the suite's Llama-3-8B shapes.

    Stored like :func:`tune_linear` (kernel key, source hash, shape class); the ops
    read the result back through the same lookup.

    Args:
        only (list of str, optional): names of the ops to tune (default: all).
        unroll, min_blocks (tuple of int): as :func:`tune_linear`.

    Returns:
        dict: ``{(kernel key, shape class): chosen params}``.
    """
    backend, D, pool_bytes = _setup(backend, pool_bytes)
    refine = unroll_refinements(unroll) + bound_refinements(backend, min_blocks)
    chosen = {}
    for name, (make, n, k, nbytes) in _decode_ops(D, bits, group_size, dtype).items():
        if not only or name in only:
            qkv = name.startswith("norm_qkv_rope")
            chosen.update(_tune_op(make, n, k, nbytes,
                                   candidates or decode_candidates(qkv=qkv),
                                   backend, pool_bytes, repeats=repeats, force=force,
                                   path=path, head_dim=D["head_dim"] if qkv else None,
                                   dual=name == "norm_gate_up_swiglu", refine=refine,
                                   dtype=dtype))
    return chosen
