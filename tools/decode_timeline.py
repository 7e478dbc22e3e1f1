"""The GPU's timeline of decoded tokens: busy time, idle gaps and overlap (diagnostics).

ncu times each kernel alone (``decode_breakdown.py one-token``); it cannot say how long
the GPU sits idle between the kernels of a token, or whether kernels overlap. PyTorch's
profiler (CUPTI through Kineto) records every kernel the process launches, MLX's
included, with start and end times: this script decodes the bench's Llama-3-8B-shaped
4-bit model pipelined as ``mlx_lm.generate_step`` does (token t + 1 built while token t
runs), unpatched and patched (the compiled step, the default), records a window of
tokens in the middle of the decode, and reports per token: the GPU's span, the time at
least one kernel runs (busy), the rest (idle), the time kernels overlap, and the largest
idle gaps with the kernels on either side::

    python tools/decode_timeline.py --tokens 32 --json timeline.json

Needs torch beside MLX's CUDA build (the device machine's python3 has both). The window
holds ``--tokens`` tokens of the pipeline give or take the one in flight at each end, so
per-token figures are good to about 1 / tokens.
"""

import argparse
import collections
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import grid_barrier  # noqa: E402  (its ``count``: the tools' argument of at least 1)


def analyze(kernels, tokens, top=8):
    """The timeline's figures from ``kernels``, a list of ``(name, start_us, dur_us)``.

    Returns a dict: ``kernels`` (count), ``span_us`` (first start to last end),
    ``busy_us`` (time at least one kernel runs), ``idle_us`` (``span - busy``),
    ``kernel_sum_us`` (the durations added up) and ``overlap_us`` (``kernel_sum -
    busy``: time counted twice because kernels ran at once), each also ``per_token``
    (divided by ``tokens``); ``gaps`` (idle gaps by size: count and sum under 2 us,
    2-10 us, over 10 us); ``largest_gaps`` (``top`` of them, with the kernels before and
    after); ``by_name`` (count, sum, mean per kernel name, largest sum first).
    """
    if tokens < 1:
        raise ValueError(f"[decode_timeline.analyze] tokens must be positive, got {tokens}.")
    if not kernels:
        raise ValueError("[decode_timeline.analyze] no kernels in the timeline.")
    ks = sorted(kernels, key=lambda k: k[1])
    busy, gaps = 0.0, []
    cur_start, cur_end, cur_last = ks[0][1], ks[0][1] + ks[0][2], ks[0][0]
    for name, start, dur in ks[1:]:
        end = start + dur
        if start > cur_end:
            busy += cur_end - cur_start
            gaps.append((start - cur_end, cur_last, name))
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
        if end >= cur_end:
            cur_last = name
    busy += cur_end - cur_start
    span = cur_end - ks[0][1]
    kernel_sum = sum(d for _, _, d in ks)
    classes = (("under 2 us", 0.0, 2.0), ("2-10 us", 2.0, 10.0), ("over 10 us", 10.0, float("inf")))
    by_size = {label: {"count": sum(lo <= g < hi for g, _, _ in gaps),
                       "sum_us": sum(g for g, _, _ in gaps if lo <= g < hi)}
               for label, lo, hi in classes}
    names = collections.defaultdict(lambda: [0, 0.0])
    for name, _, dur in ks:
        names[name][0] += 1
        names[name][1] += dur
    by_name = [{"name": n, "count": c, "sum_us": s, "mean_us": s / c}
               for n, (c, s) in sorted(names.items(), key=lambda kv: -kv[1][1])]
    out = {"kernels": len(ks), "tokens": tokens, "span_us": span, "busy_us": busy,
           "idle_us": span - busy, "kernel_sum_us": kernel_sum,
           "overlap_us": kernel_sum - busy}
    out["per_token"] = {k: out[k] / tokens for k in
                        ("kernels", "span_us", "busy_us", "idle_us", "kernel_sum_us",
                         "overlap_us")}
    out["gaps"] = by_size
    out["largest_gaps"] = [{"gap_us": g, "after": a, "before": b}
                           for g, a, b in sorted(gaps, key=lambda t: -t[0])[:top]]
    out["by_name"] = by_name
    return out


def kernels_of_trace(path):
    """``(name, start_us, dur_us)`` of every GPU kernel in a Chrome trace (Kineto's)."""
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    return [(e["name"], float(e["ts"]), float(e["dur"])) for e in events
            if e.get("ph") == "X" and e.get("cat") == "kernel"]


def record(model, tokens, warmup=8):
    """The kernels of ``tokens`` pipelined tokens of ``model``, in the middle of a decode."""
    import mlx.core as mx
    import torch.profiler as tp
    from decode_breakdown import primed

    cache, y = primed(model)
    prof = tp.profile(activities=[tp.ProfilerActivity.CUDA])
    out = model(y, cache=cache)
    mx.async_eval(out)
    for i in range(warmup + tokens):
        if i == warmup:
            prof.start()
        nxt = model(y, cache=cache)
        mx.async_eval(nxt)
        mx.eval(out)
        out = nxt
    mx.eval(out)
    mx.synchronize()
    prof.stop()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        return kernels_of_trace(path)
    finally:
        os.unlink(path)


def report(name, r):
    t = r["per_token"]
    print(f"{name}: {r['kernels']} kernels over {r['tokens']} tokens; per token "
          f"{t['kernels']:.0f} kernels, span {t['span_us']:.0f} us, busy {t['busy_us']:.0f}, "
          f"idle {t['idle_us']:.0f}, kernels added up {t['kernel_sum_us']:.0f} "
          f"(overlap {t['overlap_us']:.0f})")
    for label, g in r["gaps"].items():
        print(f"  idle gaps {label:10s}: {g['count']:6d}, {g['sum_us'] / r['tokens']:8.1f} us "
              "per token")
    for g in r["largest_gaps"][:5]:
        print(f"  gap {g['gap_us']:8.1f} us after {g['after'][:50]} before {g['before'][:50]}")
    for k in r["by_name"][:8]:
        print(f"  {k['count'] / r['tokens']:5.1f} x {k['mean_us']:7.2f} us per token  "
              f"{k['name'][:70]}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=grid_barrier.count, default=32,
                   help="tokens in the recorded window (default 32)")
    p.add_argument("--variants", nargs="+", default=["unpatched", "compiled"],
                   choices=["unpatched", "ordinary", "compiled"])
    p.add_argument("--json", default=None, help="write every figure here")
    args = p.parse_args(argv)

    from decode_breakdown import PATCH_KWARGS, bench_model, under_patch

    model = bench_model()
    res = {}
    for v in args.variants:
        ks = under_patch(model, PATCH_KWARGS[v], lambda m: record(m, args.tokens))
        res[v] = analyze(ks, args.tokens)
        report(v, res[v])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
