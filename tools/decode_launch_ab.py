"""Launches of one fused decode kernel against each other: chained, independent, and ncu.

``tools/gemv_ab.py`` compares launches of the plain 4-bit linear; this tool does it for
the kernels the patched decode launches (``mlx_foundry.bench.autotune``'s decode ops:
``o_proj+residual``, ``down_proj+residual``, ``norm_gate_up_swiglu``, ``norm_qkv_rope``,
``norm_qkv_rope+joint_kv``) at the Llama-3-8B shapes, 4-bit, in one process, in
interleaved rounds::

    python tools/decode_launch_ab.py norm_gate_up_swiglu --launches r4t128s0b4 r3t128s0b4 \\
        r2t128s0 --rounds 15

Every launch's output is first compared with the first launch's on one input set. Then
each launch is timed by the bench's method (200 calls per timing, a pool larger than the
cache), once with every call waiting for the one before (``autotune.Chain``, as the tuner
times and as a decode step runs) and once with independent calls (as the bench times).
``--ncu LABELS`` instead runs each launch alone three times between
``cuProfilerStart``/``cuProfilerStop`` (``ncu --profile-from-start off``) and writes the
labels in launch order. Launches are written as in ``gemv_ab.py``: ``rRtTsS[bB]``.
On the reference backend (CPU, ``--backend reference``) the kernels' references run and
the launch constants change nothing: the CPU test of the tool.
"""

import argparse
import statistics
import sys

import gemv_ab  # beside this script (its launch syntax and ncu loop)
import mlx.core as mx


def setup(op, backend):
    """``(kernel, pool)`` of one decode op: its launch recorded per input set."""
    from mlx_foundry.bench import autotune, timing

    backend, D, pool_bytes = autotune._setup(backend, None)
    ops = autotune._decode_ops(D, 4, 64, mx.float16)
    if op not in ops:
        raise SystemExit(f"decode_launch_ab: unknown op {op!r}; one of {', '.join(ops)}")
    make, _, _, nbytes = ops[op]
    sets, found = autotune._captured(make, backend)
    pool = timing.make_pool(sets, nbytes, pool_bytes)
    return backend, found[0], pool


def _flat(out):
    return list(out) if isinstance(out, (list, tuple)) else [out]


def max_diff(a, b):
    """The largest absolute difference between two calls' outputs."""
    return max(float(mx.max(mx.abs(x.astype(mx.float32) - y.astype(mx.float32))))
               for x, y in zip(_flat(a), _flat(b)))


def main(argv=None):
    from mlx_foundry.bench import timing
    from mlx_foundry.bench.autotune import kernel_runner

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("op")
    ap.add_argument("--launches", nargs="+", required=True)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--backend", default=None)
    ap.add_argument("--ncu", metavar="LABELS", default=None)
    a = ap.parse_args(argv)
    launches = {}
    for text in a.launches:
        p = gemv_ab.parse_launch(text)
        # No MBLOCK: one row of x, and the Q/K/V kernel does not take it (its default, 1).
        launches[text] = dict(p, UNROLL=1)
    backend, kern, pool = setup(a.op, a.backend)
    first = next(iter(launches))
    ref = kernel_runner(kern, backend, launches[first], chained=False)(*pool[0])
    for name, p in launches.items():
        d = max_diff(kernel_runner(kern, backend, p, chained=False)(*pool[0]), ref)
        print(f"check {name}: max |diff| against {first} {d:.3g}")
    if a.ncu:
        runs = {n: (kernel_runner(kern, backend, p, chained=False),)
                for n, p in launches.items()}
        for (run,) in runs.values():  # compiles outside the profiled range
            mx.eval(_flat(run(*pool[0])))
        gemv_ab._profile(runs, pool, 3, a.ncu)  # three launches each, labels in launch order
        return {}
    results = {}
    for mode in ("chained", "independent"):
        times = {n: [] for n in launches}
        for _ in range(a.rounds):
            for n, p in launches.items():
                t = timing.measure(kernel_runner(kern, backend, p,
                                                 chained=mode == "chained"),
                                   pool, repeats=1, calls=a.calls)
                times[n].append(t.median_s)
        base = statistics.median(times[first])
        print(mode)
        for n in launches:
            m = statistics.median(times[n])
            print(f"  {n:14s} {1e6 * m:8.2f} us  {m / base:6.3f} of {first}  "
                  f"(range {1e6 * min(times[n]):.2f}-{1e6 * max(times[n]):.2f})")
        results[mode] = {n: statistics.median(times[n]) for n in launches}
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
