"""The Python cost of a launch on a cache hit, against a bare MLX kernel call.

Both sides only build the lazy graph (no evaluation), so the difference is
mlx_foundry's own per-call work: argument binding and validation, the
specialization lookup, output rules and the dispatch config.
"""

import time

import mlx.core as mx

from .args import Constant, Output, Scalar, Tensor
from .backends import select_backend
from .dispatch import per_element
from .kernel import Kernel, _backend_module
from .types import f32, u32

_SRC = """
template <typename T>
METAL_FUNC void overhead_scale(const device T* x, device T* y, float alpha, uint n, uint3 gid) {
  if (gid.x < n) y[gid.x] = static_cast<T>(float(x[gid.x]) * alpha);
}
"""


def _kernel():
    return Kernel(
        "overhead_scale", source_text=_SRC, function="overhead_scale", template=("T",),
        args=[Tensor("x", (mx.float16, mx.bfloat16, mx.float32)),
              Output("y", shape=lambda b: b.x.shape, dtype="x"),
              Scalar("alpha", f32),
              Scalar("n", u32),
              Constant("T", "dtype", like="x")],
        attributes=("thread_position_in_grid",),
        dispatch=lambda b: per_element(b.x.size),
        reference=lambda b: (b.x * b.alpha).astype(b.x.dtype))


def measure_cache_hit_overhead(calls=5000, repeats=7, backend=None):
    """Per-call microseconds: mlx_foundry cache hit vs. a bare ``mx.fast.*_kernel`` call.

    Returns:
        dict with ``ours_us``, ``bare_us``, ``extra_us`` (medians) and the backend.
    """
    backend = select_backend(backend)
    if backend == "reference":
        raise RuntimeError("[overhead] needs a GPU backend (metal or cuda).")
    k = _kernel()
    x = mx.random.normal((4096,)).astype(mx.float16)
    mx.eval(k(x, alpha=2.0, n=4096, backend=backend))  # compile, fill the cache
    src = k.source(x, alpha=2.0, n=4096, backend=backend)
    bare = _backend_module(backend).build(src)
    inputs = [x, mx.array([2.0], dtype=mx.float32), mx.array([4096], dtype=mx.uint32)]
    grid, tg = per_element(4096).mlx_launch(backend)
    mx.eval(bare(inputs=inputs, output_shapes=[x.shape], output_dtypes=[x.dtype], grid=grid,
                 threadgroup=tg))

    def time_ours():
        t = time.perf_counter()
        for _ in range(calls):
            k(x, alpha=2.0, n=4096, backend=backend)
        return (time.perf_counter() - t) / calls * 1e6

    def time_bare():
        t = time.perf_counter()
        for _ in range(calls):
            bare(inputs=inputs, output_shapes=[x.shape], output_dtypes=[x.dtype], grid=grid,
                 threadgroup=tg)
        return (time.perf_counter() - t) / calls * 1e6

    ours, base = [], []
    for _ in range(repeats):
        ours.append(time_ours())
        base.append(time_bare())
    ours.sort()
    base.sort()
    o, b = ours[len(ours) // 2], base[len(base) // 2]
    return {"backend": backend, "ours_us": o, "bare_us": b, "extra_us": o - b, "calls": calls}
