"""Tune the fused GEMV's launch parameters on this device (a ready-made use of :mod:`.tuner`).

:func:`tune_linear` times ``mlx_foundry.ops.linear``'s kernel for each
``(ROWS, THREADS)`` setting (rows per SIMD-group, threads per threadgroup) at
the decode shapes of the bench suite, with the bench's timing method, and stores
the fastest per (device, MLX version, kernel source hash, shape class) in the
tuning file, under the kernel key ``"<backend>:<kernel name>"``.  The op reads it
back with :func:`lookup_linear` (cache the answer per specialization: it is not
meant for every call)::

    params = lookup_linear(kern, n, k, m, backend) or {"ROWS": 4, "THREADS": 128}

Run on the target GPU::

    python -c "from mlx_foundry.bench.autotune import tune_linear; print(tune_linear())"
"""

import itertools

import mlx.core as mx

from . import timing, tuner
from .cases import FULL, TINY, _dense_w, _qweight, weight_bytes

DEFAULT_ROWS = (1, 2, 4, 8)
DEFAULT_THREADS = (64, 128, 256)


def linear_candidates(rows=DEFAULT_ROWS, threads=DEFAULT_THREADS):
    """``[{"ROWS": r, "THREADS": t}, ...]``, every combination."""
    return [{"ROWS": r, "THREADS": t} for r, t in itertools.product(rows, threads)]


def kernel_key(kern, backend):
    """The tuning key of one kernel on one backend: ``"<backend>:<kernel name>"``."""
    return f"{backend}:{kern.name}"


def lookup_linear(kern, n, k, m=1, backend="cuda", *, path=None):
    """The tuned ``{"ROWS", "THREADS"}`` of ``kern`` for an ``[m, k] x [n, k]^T`` GEMV, or None."""
    return tuner.lookup(kernel_key(kern, backend), source_hash=tuner.source_hash(kern),
                        shape_class=tuner.shape_class(n, k, m), path=path)


def tune_linear(backend=None, *, shapes=None, bits=(4, 8, None), group_size=64,
                candidates=None, dtype=mx.float16, repeats=5, force=False, path=None,
                pool_bytes=None):
    """Tune ``linear``'s GEMV kernel for each weight format and shape.

    Args:
        backend (str, optional): ``"cuda"``/``"metal"``. Default: the GPU backend,
            else ``"reference"`` (only for testing: the reference backend has no
            launch parameters, so every candidate times the same).
        shapes (list of (k, n), optional): default: the bench suite's
            ``(4096, 14336)``, ``(14336, 4096)``, ``(4096, 4096)``.
        bits (tuple): weight formats; ``None`` = dense. Default: ``(4, 8, None)``.
        candidates (list of dict, optional): default :func:`linear_candidates`.
        repeats (int): timings per candidate. Default: ``5``.
        force (bool): re-tune stored entries. Default: ``False``.

    Returns:
        dict: ``{(kernel key, shape class): chosen params}``.
    """
    from mlx_foundry.ops.linear import linear_kernel
    from mlx_foundry.ops.weights import Weight

    from . import select_backend

    backend = select_backend(backend)
    tiny = backend == "reference" and mx.default_device() == mx.cpu
    D = TINY if tiny else FULL
    if shapes is None:
        h, i = D["hidden"], D["inter"]
        shapes = [(h, i), (i, h), (h, h)]
    if pool_bytes is None:
        pool_bytes = timing.default_pool_bytes("reference" if tiny else backend)
    candidates = candidates or linear_candidates()
    chosen = {}
    for b, (k, n) in itertools.product(bits, shapes):
        def make(idx, b=b, k=k, n=n):
            x = mx.random.normal((1, k), key=mx.random.key(idx)).astype(dtype)
            parts = (_qweight(idx, 1, n, k, b, group_size, dtype) if b
                     else (_dense_w(idx, 1, n, k, dtype),))
            return (x,) + parts

        pool = timing.make_pool(make, weight_bytes(n, k, b, group_size, dtype.size),
                                pool_bytes)
        x0, *w0 = pool[0]
        w = Weight(*w0, group_size=group_size, bits=b) if b else Weight(w0[0])
        kern = linear_kernel(w.signature())

        def build(params, b=b):
            def fn(x, *parts):
                wt = Weight(*parts, group_size=group_size, bits=b) if b else Weight(parts[0])
                return kern(backend=backend, x=x, **wt.inputs("w"), **params)
            return fn

        cls = tuner.shape_class(n, k, 1)
        chosen[(kernel_key(kern, backend), cls)] = tuner.tune(
            kernel_key(kern, backend), candidates, tuner.timed_run(build, pool, repeats=1),
            source_hash=tuner.source_hash(kern), shape_class=cls, repeats=repeats,
            force=force, path=path)
    return chosen
