"""How a bench timing's per-call figure depends on the calls it evaluates together.

The bench times ``calls`` independent calls with one ``mx.eval`` and divides by
``calls`` (``mlx_foundry.bench.timing.measure``). On MLX's CUDA backend the device
starts only when MLX launches its first CUDA graph, after the host has encoded about
100 kernels (``MLX_MAX_OPS_PER_BUFFER``), and the evaluation returns after the last
graph's kernels and a synchronization: a fixed part of every timing that is no call's
device time. Here each case is timed, in one process and in alternating rounds, at
several call counts; a least-squares line ``T(n) = fixed + n * per_call`` through the
medians separates the two::

    python tools/calls_sweep.py --only linear_q4 rms_norm_8192 --counts 50 100 200 400 \\
        --rounds 3 --json sweep.json

For every case it prints, per function (``baseline``, ``ours`` and ``read``, the
bench's plain read of the case's bytes): the median per-call time at each count, the
line's ``per_call`` (us) and ``fixed`` (us per timing), and the ratio baseline / ours
both ways. On the reference backend (CPU) ``--tiny`` runs the tiny suite (the CPU
test of the tool).
"""

import argparse
import json
import statistics
import sys


def fit_line(counts, totals):
    """Least-squares ``(fixed, per_call)`` of ``totals[i] ~ fixed + counts[i] * per_call``."""
    if len(counts) != len(totals) or len(set(counts)) < 2:
        raise ValueError("[calls_sweep] need timings at two or more distinct counts.")
    mc, mt = statistics.fmean(counts), statistics.fmean(totals)
    var = sum((c - mc) ** 2 for c in counts)
    slope = sum((c - mc) * (t - mt) for c, t in zip(counts, totals)) / var
    return mt - slope * mc, slope


def sweep_case(case, ctx, counts, rounds, repeats):
    """Per-call medians at each count and the fitted line, for baseline, ours and read."""
    from mlx_foundry.bench import timing

    pool = timing.make_pool(case.make, case.nbytes, ctx.pool_bytes)
    fns = {"baseline": (case.baseline, pool), "ours": (case.candidate(ctx.backend), pool),
           "read": timing.plain_read_call(case.nbytes, backend=ctx.backend,
                                          pool_bytes=ctx.pool_bytes)[:2]}
    per = {name: {n: [] for n in counts} for name in fns}
    for _ in range(rounds):
        for n in counts:
            for name, (fn, p) in fns.items():
                t = timing.measure(fn, p, repeats=repeats, calls=n)
                per[name][n].extend(t.timings_s)
    out = {"case": case.name, "op": case.op, "shape": case.shape, "dtype": case.dtype,
           "counts": list(counts), "fns": {}}
    for name in fns:
        med = {n: statistics.median(per[name][n]) for n in counts}
        fixed, slope = fit_line(list(counts), [n * med[n] for n in counts])
        out["fns"][name] = {"per_call_us": {str(n): 1e6 * med[n] for n in counts},
                            "line_per_call_us": 1e6 * slope, "line_fixed_us": 1e6 * fixed,
                            "samples_s": {str(n): per[name][n] for n in counts}}
    f = out["fns"]
    out["speedup_at"] = {str(n): f["baseline"]["per_call_us"][str(n)]
                         / f["ours"]["per_call_us"][str(n)] for n in counts}
    out["speedup_line"] = f["baseline"]["line_per_call_us"] / f["ours"]["line_per_call_us"]
    return out


def _print(r, file=sys.stdout):
    counts = r["counts"]
    print(f"{r['case']} ({r['shape']}, {r['dtype']})", file=file)
    print("  fn        " + "".join(f"{'n=' + str(n):>10}" for n in counts)
          + f"{'per_call':>10}{'fixed':>10}", file=file)
    for name, v in r["fns"].items():
        print(f"  {name:<9} " + "".join(f"{v['per_call_us'][str(n)]:>10.2f}" for n in counts)
              + f"{v['line_per_call_us']:>10.2f}{v['line_fixed_us']:>10.1f}", file=file)
    print("  speedup   " + "".join(f"{r['speedup_at'][str(n)]:>10.3f}" for n in counts)
          + f"{r['speedup_line']:>10.3f}", file=file)


def main(argv=None):
    from mlx_foundry.bench import Context, cases, select_backend

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", default=["linear_q4"])
    ap.add_argument("--counts", nargs="+", type=int, default=[50, 100, 200, 400])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="timings per count and round")
    ap.add_argument("--tiny", action="store_true", help="the tiny suite (reference backend)")
    ap.add_argument("--backend", default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if any(n < 1 for n in a.counts):
        ap.error("--counts must be positive")
    backend = select_backend(a.backend)
    ctx = Context(backend, tiny=a.tiny or None)
    suite = [c for c in cases.suite(tiny=ctx.tiny) if c.runner is None]
    # A name given in full picks that case only (``linear_q4_4096x14336`` is also a
    # substring of ``norm_linear_q4_4096x14336``); any other string, as ``bench --only``.
    chosen = [c for c in suite if c.name in a.only] or [
        c for c in cases.select(suite, a.only) if "prefill" not in c.tags]
    if not chosen:
        ap.error(f"no timed case matches {a.only}")
    results = []
    for case in chosen:
        r = sweep_case(case, ctx, a.counts, a.rounds, a.repeats)
        _print(r)
        results.append(r)
    if a.json:
        from mlx_foundry.bench.timing import device_name, mlx_version

        with open(a.json, "w") as f:
            json.dump({"device": device_name(), "mlx_version": mlx_version(),
                       "backend": backend, "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
