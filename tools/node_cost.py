"""MLX's host cost per graph node: ``mx.eval`` of many tiny calls, ours and MLX's ops.

At tiny shapes (K 512, N 64: a few microseconds of device time per call) the time of
``mx.eval`` over ``N`` lazy calls, divided by ``N``, is mostly the host's encoding of one
node (with one CUDA graph per evaluation the device starts only after every node is
encoded: run with ``MLX_MAX_OPS_PER_BUFFER=100000 MLX_MAX_MB_PER_BUFFER=10000000``).
Also printed: the Python time of building one call. Diagnostics::

    python tools/node_cost.py --calls 400
"""

import argparse
import importlib
import statistics
import time

import mlx.core as mx


def cases():
    """``{name: fn(i) -> lazy output}`` at tiny shapes."""
    from mlx_foundry import ops
    from mlx_foundry.bench.read_probe import read_probe

    k, n = 512, 64
    x = mx.random.normal((1, k), key=mx.random.key(0)).astype(mx.float16)
    w = mx.random.normal((n, k), key=mx.random.key(1)).astype(mx.float16)
    wq, s, b = mx.quantize(w, group_size=64, bits=4)
    r = mx.random.normal((1, n), key=mx.random.key(2)).astype(mx.float16)
    u = mx.arange(4096, dtype=mx.uint32)
    weight = ops.Weight(wq, s, b, group_size=64, bits=4)
    mx.eval(x, w, wq, s, b, r, u)
    importlib.import_module("mlx_foundry.ops.linear")
    return {
        "mx add": lambda i: x + 1,
        "mx quantized_matmul": lambda i: mx.quantized_matmul(x, wq, s, b, transpose=True,
                                                             group_size=64, bits=4),
        "mx matmul fp16": lambda i: x @ w.T,
        "read_probe": lambda i: read_probe(u),
        "ops.linear q4 (bare arrays)": lambda i: ops.linear(x, wq, s, b, group_size=64,
                                                            bits=4),
        "ops.linear q4 (Weight)": lambda i: ops.linear(x, weight),
        "ops.linear q4 + residual": lambda i: ops.linear(x, wq, s, b, group_size=64, bits=4,
                                                         residual=r),
    }


def measure(fn, calls, repeats=9):
    """``(eval seconds per call, build seconds per call)``, medians of ``repeats``."""
    for _ in range(3):
        mx.eval([fn(i) for i in range(8)])
    ev, build = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = [fn(i) for i in range(calls)]
        t1 = time.perf_counter()
        mx.eval(outs)
        t2 = time.perf_counter()
        ev.append((t2 - t1) / calls)
        build.append((t1 - t0) / calls)
        del outs
    return statistics.median(ev), statistics.median(build)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=9)
    a = ap.parse_args(argv)
    res = {}
    for name, fn in cases().items():
        res[name] = measure(fn, a.calls, a.repeats)
        print(f"{name:30s} eval {1e6 * res[name][0]:7.2f} us/call   "
              f"python build {1e6 * res[name][1]:7.2f} us/call")
    return res


if __name__ == "__main__":
    main()
