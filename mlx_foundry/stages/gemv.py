"""GEMV main stages over weights stored ``[N, K]`` (MLX's Linear layout).

``MBLOCK`` rows of ``x`` per threadgroup column (grid x, fastest, so that the
threadgroups of one block of weight rows run together and read it from DRAM once);
row blocks on grid y (and z past :data:`GEMV_GRID_Y`); ``THREADS / 32``
SIMD-groups per threadgroup, ``ROWS`` output rows per SIMD-group, for each of the
``MBLOCK`` rows of ``x`` (the weight chunks loaded once for all of them). The
lanes of a SIMD-group stride over ``K`` in 32-element chunks: each lane loads
its chunk of ``x`` once (times the RMSNorm weight when fused) and dots it with
the same chunk of its ``ROWS`` weight rows, read through a weight policy
(dense or MLX affine) with 16-byte loads. After the SIMD reduction lane ``r``
holds row ``r``: ``acc`` (float), ``row``, ``index = m * N + row`` and ``valid``.
With half or bfloat16 ``x`` (bf16 converted to half per chunk, scaled by a power of
two) and only 4/8-bit affine weights in the call (the dual and QKV stages included) the
dot products run on packed half2 arithmetic, with the next chunk's
weights loaded ahead (``gemv.metal``, ``policies/affine.metal``); otherwise in float.
On that path with one row of ``x`` the threadgroup stages the row in threadgroup memory
(``XSTAGE``, see :func:`xstage_units`): each chunk of ``x`` (and of the norm weight) is
loaded and prepared once per threadgroup instead of once per SIMD-group.

With an RMSNorm (``decls`` from ``gemv_decls(norm="weight")`` or ``norm="plain"``)
the stage also takes ``Scalar "eps"`` and produces ``inv_rms`` for the scale
epilogue: the sum of squares of ``x`` comes from the same ``x`` loads as the dot
products (or, staged, from the staging), so no pass over ``x`` comes before the first
weight loads (an RMSNorm prologue stage made every threadgroup read all of ``x``
before its first weight load, which stalled the grid: 1x4096->14336 4-bit took 36 us
against 16 us without it, ncu on an H100; the staging starts after them).

Launch parameters are compile-time constants with defaults a tuner may override
by keyword: ``ROWS`` (rows per SIMD-group, default :data:`DEFAULT_ROWS`),
``THREADS`` (threads per threadgroup, a multiple of 32, default
:data:`DEFAULT_THREADS`), ``SPLITK``, ``MBLOCK`` and ``UNROLL`` (the unroll count
of the loop over ``K``, default :data:`DEFAULT_UNROLL`) and ``MINBLOCKS`` (CUDA only:
compile under ``__launch_bounds__(THREADS, MINBLOCKS)``; 0, the default, for no bound;
not a line of the source, see :func:`check_min_blocks`). ``XSTAGE`` follows from the
arguments (not a launch constant).

Stages (``decls`` holds the shared argument declarations, see :func:`gemv_decls`):

* :func:`gemv_stage` -- ``acc = W[row] . (x[m] * gamma)``
* :func:`gemv_dual_stage` -- gate and up rows sharing the x loads (``acc``, ``acc2``)
* :func:`qkv_rope_stage` -- RMSNorm + Q, K, V projections with RoPE on Q and K;
  writes ``q_out``, ``k_out``, ``v_out`` itself.
"""

import mlx.core as mx

from ..args import Constant, Output, Scalar, Tensor
from ..dispatch import DispatchConfig
from ..stage import Stage
from ..types import FLOAT_DTYPES, f32, i32, u32
from .norm import inv_rms_math

GEMV_SOURCE = "stages/gemv.metal"
QKV_SOURCE = "stages/gemv_qkv.metal"
GEMV_INCLUDES = ("policies/dense.metal",)
GEMV_ATTRIBUTES = ("threadgroup_position_in_grid", "simdgroup_index_in_threadgroup",
                   "thread_index_in_simdgroup")
GEMV_VALUES = {"acc": "float", "row": "uint", "index": "uint", "valid": "bool"}

DEFAULT_ROWS = 4
"""Output rows per SIMD-group (independent weight loads in flight per lane)."""
DEFAULT_THREADS = 128
"""Threads per threadgroup (4 SIMD-groups)."""
DEFAULT_SPLITK = 0
"""1: the SIMD-groups of a threadgroup share its rows and split K (see gemv.metal)."""
DEFAULT_MBLOCK = 1
"""Rows of ``x`` per SIMD-group: they share each weight load (``ROWS * MBLOCK <= 32``)."""
DEFAULT_UNROLL = 1
"""Unroll count of a lane's loop over its chunks of ``K`` (1: not unrolled)."""
DEFAULT_MINBLOCKS = 0
"""No register bound (the compiler's choice; see :func:`check_min_blocks`)."""
MAX_THREADS_PER_SM = 2048
"""Resident threads per SM of an A100 or H100 (sm_80, sm_90; 1536 on sm_86 and sm_89,
where a larger bound only makes the compiler spill more): ``MINBLOCKS`` threadgroups of
``THREADS`` must fit it."""
MAX_UNROLL = 16
"""The largest ``UNROLL`` the stages take (past it the loop body only grows)."""
GEMV_GRID_Y = 32768
"""Row blocks per step of grid z (``gemv_row_block`` in gemv.metal): grid y stays under
CUDA's 65535."""
MAX_GEMV_THREADS = 256
"""The GEMV kernels use up to ~128 registers per thread; MLX compiles custom CUDA kernels
without launch bounds, so a threadgroup of 512 or 1024 such threads needs more registers
than an SM has, and MLX 0.32.4 does not report the failed launch (the output stays
uninitialised). The cap keeps every launch within the register file."""


def _simds(c):
    return str(c["THREADS"] // 32)


def _split(c):
    """SIMD-groups sharing a threadgroup's rows: all of them when ``SPLITK``, else 1."""
    return _simds(c) if c["SPLITK"] else "1"


# Partial sums of split K: SIMDS x ROWS x MBLOCK floats (twice for a dual GEMV), then
# SIMDS x MBLOCK sums of squares (norm GEMVs): ROWS <= (32 - MBLOCK) / MBLOCK, halved in a
# dual GEMV (gemv_dispatch checks it).
GEMV_THREADGROUP = ("float gemv_partials[THREADS]",)
# The GEMV and dual GEMV stages also stage one row of x (see xstage_units).
GEMV_STAGED_THREADGROUP = GEMV_THREADGROUP + ("uint4 gemv_xstage[XSTAGE]",)

XSTAGE_MAX_BYTES = 30 * 1024
"""The most threadgroup memory the staged row of ``x`` takes (see :func:`xstage_units`):
with the split-K partial sums it stays under the 32 KB a Metal threadgroup may have.
On an H100 (228 KB per SM) registers, not this, bound the GEMVs' occupancy; on Apple
GPUs threadgroup memory may bound it too, which is not measured (no Apple hardware)."""


def xstage_units(b, policies):
    """``XSTAGE``: the length, in 16-byte units, of the threadgroup array into which a GEMV
    stages its row of ``x``, or 1 when it does not stage (``gemv.metal``, gemv_stage_x).

    A threadgroup stages ``x`` when its SIMD-groups would each load the same row and redo
    the same per-chunk work: one row of half or bfloat16 ``x`` on the packed-half path
    (every policy 4- or 8-bit affine, one pair order), without split K, within
    :data:`XSTAGE_MAX_BYTES`: ``K / 32`` chunks of 64 bytes, a float per chunk (two for
    bfloat16) and eight sums of squares.

    With split K each SIMD-group reads its own slice of ``x``, so staging the whole row
    is work no SIMD-group shares: under ncu on one H100 (``docs/ncu_h100_gemv.md``
    section 15) the down projection (14336 -> 4096, eight rows, split K) took 18.8-18.9
    us staged against 16.4-16.5 us unstaged, while the launches without split K gained
    (gate/up 28.3-28.4 against 30.6 us).
    """
    x = b.x
    k = x.shape[-1]
    pairs = {p.half_pairs for p in policies}
    if (x.dtype not in (mx.float16, mx.bfloat16) or x.size != k or k % 32
            or len(pairs) != 1 or 0 in pairs or b.get("SPLITK", DEFAULT_SPLITK)):
        return 1
    chunks = k // 32
    floats = chunks * (2 if x.dtype == mx.bfloat16 else 1) + MAX_GEMV_THREADS // 32
    units = 4 * chunks + -(-floats // 4)
    return units if 16 * units <= XSTAGE_MAX_BYTES else 1


NORMS = (None, "plain", "weight")
"""The RMSNorm a GEMV stage fuses: none, without weight, with ``norm_weight``."""


def gemv_decls(norm=None):
    """Fresh shared declarations: ``x``, ``T``, ``K``, ``ROWS``, ``THREADS``, ``SPLITK``,
    ``UNROLL``, ``MINBLOCKS``, ``M`` (rows of ``x``) and ``MBLOCK`` (the GEMV stages; the
    Q/K/V stage takes one row of ``x`` per threadgroup), and for a norm GEMV ``eps`` (and
    ``norm_weight`` when the norm has a weight).

    Args:
        norm (str, optional): one of :data:`NORMS`.

    Pass the same dict to every stage of a kernel, since the assembler merges arguments
    by identity.
    """
    if norm not in NORMS:
        raise ValueError(f"[gemv_decls] 'norm' must be one of {NORMS} but got {norm!r}.")
    d = {
        "x": Tensor("x", FLOAT_DTYPES),
        "T": Constant("T", "dtype", like="x"),
        "K": Constant("K", value=lambda b: b.x.shape[-1]),
        "ROWS": Constant("ROWS", value=DEFAULT_ROWS),
        "THREADS": Constant("THREADS", value=DEFAULT_THREADS),
        "SPLITK": Constant("SPLITK", value=DEFAULT_SPLITK),
        "UNROLL": Constant("UNROLL", value=DEFAULT_UNROLL),
        # CUDA's register bound: read by the backend when it builds the kernel.
        "MINBLOCKS": Constant("MINBLOCKS", value=DEFAULT_MINBLOCKS, in_body=False),
        "M": Constant("M", value=lambda b: b.x.size // b.x.shape[-1]),
        "MBLOCK": Constant("MBLOCK", value=DEFAULT_MBLOCK),
    }
    if norm is not None:
        d["eps"] = Scalar("eps", f32)
    if norm == "weight":
        d["norm_weight"] = Tensor("norm_weight", FLOAT_DTYPES, ndim=1)
    return d


def _x_rows(b):
    """x viewed as float32 [M, K] (times the norm weight when bound)."""
    xf = b.x.reshape(-1, b.x.shape[-1]).astype(mx.float32)
    if "norm_weight" in b:
        xf = xf * b.norm_weight.astype(mx.float32)
    return xf


def check_unroll(unroll):
    """Raise ``ValueError`` unless ``unroll`` is an ``UNROLL`` the stages take."""
    if not (isinstance(unroll, int) and not isinstance(unroll, bool)
            and 1 <= unroll <= MAX_UNROLL):
        raise ValueError(f"[gemv] 'UNROLL' must be an int in [1, {MAX_UNROLL}] but got "
                         f"{unroll!r}.")


def check_min_blocks(min_blocks, threads):
    """Raise ``ValueError`` unless ``MINBLOCKS`` threadgroups of ``threads`` can share an
    SM (``min_blocks * threads <=`` :data:`MAX_THREADS_PER_SM`; 0: no bound).

    A bound asks the CUDA compiler to fit the kernel in ``65536 / (min_blocks *
    threads)`` registers per thread, spilling to local memory where it cannot. It never
    changes what the kernel computes, only how many threadgroups an SM holds at once.
    Metal kernels ignore it.
    """
    if (isinstance(min_blocks, bool) or not isinstance(min_blocks, int)
            or not 0 <= min_blocks * threads <= MAX_THREADS_PER_SM):
        raise ValueError(f"[gemv] 'MINBLOCKS' must be an int in [0, "
                         f"{MAX_THREADS_PER_SM // threads}] (threadgroups of THREADS={threads} "
                         f"per SM) but got {min_blocks!r}.")


def check_launch(rows, threads, split=DEFAULT_SPLITK, mblock=DEFAULT_MBLOCK, *,
                 dual=False, unroll=DEFAULT_UNROLL):
    """Raise ``ValueError`` naming the constant unless the GEMV stages take this launch."""
    check_unroll(unroll)
    if split not in (0, 1):
        raise ValueError(f"[gemv] 'SPLITK' must be 0 or 1 but got {split!r}.")
    if threads % 32 or not 32 <= threads <= MAX_GEMV_THREADS:
        raise ValueError(f"[gemv] 'THREADS' must be a multiple of 32 in "
                         f"[32, {MAX_GEMV_THREADS}] but got {threads}.")
    if not 1 <= rows <= 32:
        raise ValueError(f"[gemv] 'ROWS' must be in [1, 32] but got {rows}.")
    if not (isinstance(mblock, int) and 1 <= mblock <= 32 // rows):
        raise ValueError(f"[gemv] 'MBLOCK' must be in [1, 32 // ROWS] = [1, {32 // rows}]"
                         f" but got {mblock!r}.")
    # Split K adds the SIMD-groups' partial sums in THREADS floats of threadgroup memory:
    # 32 per SIMD-group, ROWS * MBLOCK sums (twice in a dual GEMV) and MBLOCK sums of
    # squares.
    limit = (32 - mblock) // ((2 if dual else 1) * mblock)
    if split and rows > limit:
        raise ValueError(f"[gemv] 'ROWS' must be at most {limit} with 'SPLITK'"
                         f"{' in a dual GEMV' if dual else ''}"
                         f"{f' and MBLOCK={mblock}' if mblock > 1 else ''} but got {rows}.")


def gemv_dispatch(n_rows, *, dual=False):
    """``dispatch(bound)`` for ``n_rows(bound)`` output rows per batch row of ``x``."""

    def dispatch(b):
        threads, rows, split = b.THREADS, b.ROWS, b.get("SPLITK", DEFAULT_SPLITK)
        mblock = b.get("MBLOCK", DEFAULT_MBLOCK)
        check_launch(rows, threads, split, mblock, dual=dual,
                     unroll=b.get("UNROLL", DEFAULT_UNROLL))
        check_min_blocks(b.get("MINBLOCKS", DEFAULT_MINBLOCKS), threads)
        rows_of_x = b.x.size // b.x.shape[-1]
        if b.get("M", rows_of_x) != rows_of_x:
            raise ValueError(f"[gemv] 'M' is the number of rows of x ({rows_of_x}) and cannot"
                             f" be set to {b.M}.")
        per_group = rows if split else rows * (threads // 32)
        m = -(-rows_of_x // mblock)
        blocks = -(-n_rows(b) // per_group)
        # Batch rows on x (fastest), row blocks on y and z: see gemv_row_block.
        return DispatchConfig((m, min(blocks, GEMV_GRID_Y), -(-blocks // GEMV_GRID_Y)),
                              (threads, 1, 1))

    return dispatch


def _norm_of(decls):
    if "eps" not in decls:
        return None
    return "weight" if "norm_weight" in decls else "plain"


def _norm_args(decls):
    """``x`` then the norm's arguments (``norm_weight``, ``eps``) of a GEMV stage."""
    return [decls[k] for k in ("x", "norm_weight", "eps") if k in decls]


def _with_inv_rms(b, values):
    """A stage reference's values plus ``inv_rms`` ``[M, 1]`` when the stage has a norm."""
    if "eps" in b:
        values["inv_rms"] = inv_rms_math(b.x, b.eps, b.K)
    return values


_FUNCTIONS = {None: "", "plain": "_rms", "weight": "_norm"}


def gemv_stage(policy, decls, *, n="N"):
    """``acc = dot(W[row], x[m] (* norm_weight))`` for one weight policy.

    With a norm in ``decls`` the stage multiplies ``x`` by ``norm_weight`` inside the dot
    product (when it has one) and produces ``inv_rms``; a following ``scale_epilogue``
    applies it. ``n`` is the name of the int constant for ``N`` (default
    ``N = weight.shape[0]``).
    """
    norm = _norm_of(decls)
    N = Constant(n, value=lambda b: b[policy.prefix].shape[0])
    args = _norm_args(decls)
    args += [decls["T"], decls["K"], N, decls["ROWS"], decls["THREADS"], decls["SPLITK"],
             decls["M"], decls["MBLOCK"], decls["UNROLL"], decls["MINBLOCKS"],
             Constant("XSTAGE", value=lambda b: xstage_units(b, (policy,)))]

    def reference(b, v):
        return _with_inv_rms(b, {"acc": _x_rows(b) @ policy.dequantize(b).T})

    produces = dict(GEMV_VALUES)
    if norm:
        produces["inv_rms"] = "float"
    return Stage(
        f"gemv{_FUNCTIONS[norm]}", function=f"gemv{_FUNCTIONS[norm]}_main",
        source=GEMV_SOURCE, includes=GEMV_INCLUDES, args=args, policies={"wpol": policy},
        produces=produces,
        template=(policy.metal_type(), "T", "K", n, "M", "ROWS", _simds, _split, "MBLOCK",
                  "UNROLL", "XSTAGE"),
        attributes=GEMV_ATTRIBUTES, threadgroup=GEMV_STAGED_THREADGROUP, reference=reference)


def gemv_dual_stage(gate, up, decls, *, n="N"):
    """Gate and up projections in one pass over ``x``: ``acc`` (gate), ``acc2`` (up)
    (and ``inv_rms`` with a norm, as :func:`gemv_stage`)."""
    norm = _norm_of(decls)
    N = Constant(n, value=lambda b: b[gate.prefix].shape[0])
    args = _norm_args(decls)
    args += [decls["T"], decls["K"], N, decls["ROWS"], decls["THREADS"], decls["SPLITK"],
             decls["M"], decls["MBLOCK"], decls["UNROLL"], decls["MINBLOCKS"],
             Constant("XSTAGE", value=lambda b: xstage_units(b, (gate, up)))]

    def reference(b, v):
        xf = _x_rows(b)
        return _with_inv_rms(b, {"acc": xf @ gate.dequantize(b).T,
                                 "acc2": xf @ up.dequantize(b).T})

    produces = dict(GEMV_VALUES)
    if norm:
        produces["inv_rms"] = "float"
    produces["acc2"] = "float"
    return Stage(
        f"gemv_dual{_FUNCTIONS[norm]}", function=f"gemv_dual{_FUNCTIONS[norm]}_main",
        source=GEMV_SOURCE, includes=GEMV_INCLUDES, args=args,
        policies={"gpol": gate, "upol": up}, produces=produces,
        template=(gate.metal_type(), up.metal_type(), "T", "K", n, "M", "ROWS", _simds, _split,
                  "MBLOCK", "UNROLL", "XSTAGE"),
        attributes=GEMV_ATTRIBUTES, threadgroup=GEMV_STAGED_THREADGROUP, reference=reference)


def rope_rotate(t, positions, inv_freq, traditional):
    """RoPE of float32 ``t`` ``[M, H, D]`` at ``positions`` ``[M]`` (mx.fast.rope's math)."""
    theta = positions[:, None, None] * inv_freq
    c, s = mx.cos(theta), mx.sin(theta)
    d = t.shape[-1]
    if traditional:
        x1, x2 = t[..., 0::2], t[..., 1::2]
        return mx.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1).reshape(t.shape)
    x1, x2 = t[..., : d // 2], t[..., d // 2:]
    return mx.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)


def qkv_rope_stage(pq, pk, pv, decls, *, traditional=False, bias=False, joint_kv=False):
    """RMSNorm + Q, K, V projections + RoPE on Q and K, written to ``q_out``, ``k_out``,
    ``v_out`` (with ``joint_kv``: ``q_out`` and ``kv_out``, each row of which holds the
    row's keys, then its values).

    ``decls`` must have a norm (``gemv_decls(norm=...)``): the stage computes ``inv_rms``
    from its own ``x`` loads (see :func:`gemv_stage`). Extra arguments:
    ``Tensor "rope_inv_freq"`` (float32 ``[head_dim/2]``), ``Scalar "seq_len"`` (u32,
    ``L``; row ``m`` of ``x`` is position ``offset + m % L``), ``Scalar "rope_offset"``
    (i32), ``Scalar "rope_scale"`` (f32), constants ``NQ`` (``H * D``), ``NKV``
    (``H_kv * D``), ``HEAD_DIM`` and ``ROWS`` (even, dividing ``HEAD_DIM``). With
    ``bias``: ``Tensor``s ``q_bias``, ``k_bias``, ``v_bias`` (x's dtype) added before RoPE.
    Outputs have ``x``'s leading shape and last dimension ``NQ``/``NKV``/``NKV``.
    """
    norm = _norm_of(decls)
    if norm is None:
        raise ValueError("[qkv_rope_stage] 'decls' must declare a norm "
                         "(gemv_decls(norm='weight') or norm='plain').")
    gamma = norm == "weight"
    lead = lambda b: tuple(b.x.shape[:-1])  # noqa: E731
    outs = [Output("q_out", shape=lambda b: lead(b) + (b[pq.prefix].shape[0],), dtype="x")]
    if joint_kv:
        outs.append(Output("kv_out", dtype="x", shape=lambda b: lead(b) + (
            b[pk.prefix].shape[0] + b[pv.prefix].shape[0],)))
    else:
        outs += [Output("k_out", shape=lambda b: lead(b) + (b[pk.prefix].shape[0],), dtype="x"),
                 Output("v_out", shape=lambda b: lead(b) + (b[pv.prefix].shape[0],), dtype="x")]
    consts = [Constant("NQ", value=lambda b: b[pq.prefix].shape[0]),
              Constant("NKV", value=lambda b: b[pk.prefix].shape[0]),
              Constant("HEAD_DIM")]
    args = _norm_args(decls)
    if bias:
        args += [Tensor(f"{p}_bias", FLOAT_DTYPES, ndim=1) for p in "qkv"]
    args += [Tensor("rope_inv_freq", mx.float32, ndim=1), Scalar("seq_len", u32),
             Scalar("rope_offset", i32), Scalar("rope_scale", f32)] + outs
    args += [decls["T"], decls["K"], decls["ROWS"], decls["THREADS"], decls["SPLITK"],
             decls["UNROLL"], decls["MINBLOCKS"]] + consts

    def reference(b, v):
        xf = _x_rows(b)
        m = xf.shape[0]
        d = b.HEAD_DIM
        pos = (mx.arange(m) % b.seq_len).astype(mx.float32)
        pos = (pos + mx.array(b.rope_offset).astype(mx.float32)) * mx.array(
            b.rope_scale, dtype=mx.float32)
        inv_rms = inv_rms_math(b.x, b.eps, b.K)
        res = {}
        for name, pol in (("q_out", pq), ("k_out", pk), ("v_out", pv)):
            y = (xf @ pol.dequantize(b).T) * inv_rms
            if bias:
                y = y + b[f"{name[0]}_bias"].astype(mx.float32)
            if name != "v_out":
                y = rope_rotate(y.reshape(m, -1, d), pos, b.rope_inv_freq,
                                traditional).reshape(m, -1)
            res[name] = y.astype(b.x.dtype).reshape(tuple(b.x.shape[:-1]) + (y.shape[-1],))
        if joint_kv:
            res["kv_out"] = mx.concatenate([res.pop("k_out"), res.pop("v_out")], axis=-1)
        return res

    function = ("qkv_rope_norm" + ("" if gamma else "_nw") + ("_bias" if bias else "")
                + ("_kv" if joint_kv else "") + "_main")
    return Stage(
        "qkv_rope", function=function,
        source=QKV_SOURCE, includes=GEMV_INCLUDES + (GEMV_SOURCE,), args=args,
        policies={"qpol": pq, "kpol": pk, "vpol": pv},
        template=(pq.metal_type(), pk.metal_type(), pv.metal_type(), "T", "K", "NQ", "NKV",
                  "HEAD_DIM", "ROWS", _simds, _split, bool(traditional), "UNROLL"),
        attributes=GEMV_ATTRIBUTES, threadgroup=GEMV_THREADGROUP, reference=reference,
        writes_output=True)
