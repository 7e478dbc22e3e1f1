"""``python -m mlx_foundry demo``: one fused kernel, end to end.

Builds the compound kernel 4-bit affine GEMV with RMSNorm (main: the dot products and
the sum of squares from the same loads of x) -> scale by 1/rms -> SiLU (epilogues),
prints its generated source, runs it on the best available backend, checks it against
its reference (plain MLX ops on the CPU), and times it against MLX's unfused ops.
"""

import time

import mlx.core as mx
import mlx.nn as nn

from . import cache_info
from .backends import require_available, select_backend
from .ops import Weight, norm_linear
from .ops.linear import linear_kernel


def _median_us(fn, repeats=20, inner=10):
    mx.eval(fn())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval([fn() for _ in range(inner)])
        times.append((time.perf_counter() - t) / inner)
    times.sort()
    return times[len(times) // 2] * 1e6


def run_demo(backend=None, show_source=True):
    backend = require_available(select_backend(backend, "demo"), "demo")
    gpu = backend != "reference"
    k, n = (4096, 14336) if gpu else (1024, 2048)
    bits, group_size, eps = 4, 64, 1e-5
    print(f"mlx {mx.__version__}, device {mx.default_device()}, backend {backend!r}")
    print(f"norm -> {bits}-bit GEMV ({k} -> {n}) -> SiLU, one kernel\n")

    key = mx.random.key(0)
    k1, k2, k3 = mx.random.split(key, 3)
    x = mx.random.normal((1, k), key=k1).astype(mx.float16)
    gamma = (1 + 0.1 * mx.random.normal((k,), key=k2)).astype(mx.float16)
    wq, scales, biases = mx.quantize(
        (mx.random.normal((n, k), key=k3) * k**-0.5).astype(mx.float16),
        group_size=group_size, bits=bits)
    w = Weight(wq, scales, biases, group_size=group_size, bits=bits)

    kernel = linear_kernel(w.signature(), activation="silu", norm="weight")
    if show_source:
        src_backend = backend if gpu else "metal"
        src = kernel.source(x=x, norm_weight=gamma, eps=eps, w=wq, w_scales=scales,
                            w_biases=biases, backend=src_backend)
        print(src)

    def ours():
        return norm_linear(x, gamma, eps, w, activation="silu", backend=backend)

    def mlx_unfused():
        h = mx.fast.rms_norm(x, gamma, eps)
        return nn.silu(mx.quantized_matmul(h, wq, scales, biases, transpose=True,
                                           group_size=group_size, bits=bits))

    y = ours()
    with mx.stream(mx.cpu):
        ref = norm_linear(x, gamma, eps, w, activation="silu", backend="reference")
        unfused = mlx_unfused()
        mx.eval(ref, unfused)
    ok = True
    for label, other in (("its reference (plain MLX ops, CPU)", ref),
                         ("MLX's unfused ops (CPU)", unfused)):
        err = mx.abs(y.astype(mx.float32) - other.astype(mx.float32)).max().item()
        scale = mx.abs(other.astype(mx.float32)).max().item()
        good = err <= 2e-2 * max(scale, 1.0)
        ok = ok and good
        print(f"max |ours - {label}| = {err:.3e} (max |value| {scale:.3f}): "
              f"{'OK' if good else 'MISMATCH'}")

    reps = dict(repeats=20, inner=10) if gpu else dict(repeats=3, inner=1)
    t_ours, t_mlx = _median_us(ours, **reps), _median_us(mlx_unfused, **reps)
    if gpu:
        print(f"ours: {t_ours:9.1f} us   MLX unfused (rms_norm, quantized_matmul, silu): "
              f"{t_mlx:9.1f} us   speedup {t_mlx / t_ours:5.2f}x  ({backend}, "
              f"{mx.default_device()}; for published numbers use `python -m mlx_foundry bench`)")
    else:
        print(f"reference backend (no GPU here): no kernel ran, so no speedup is reported "
              f"(reference {t_ours:.1f} us, MLX unfused {t_mlx:.1f} us on the CPU).")
    print(cache_info())
    return 0 if ok else 1
