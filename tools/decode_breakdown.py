"""Host and GPU time of one decoded token of the Llama-3-8B-shaped 4-bit model (diagnostics).

Per token, unpatched and patched: *build* (Python: ``model(y, cache=cache)``),
*encode* (``mx.async_eval``: MLX evaluates the graph on the host, one CUDA graph node
per kernel), *wait* (the rest until the token is done) and *pipelined* (a loop that
builds token t+1 while the GPU runs token t, as ``mlx_lm.generate_step`` does, with the
host's share of it and its wait for the GPU); for the
unpatched model, the patched model with mlx-lm's two-buffer KV cache
(``joint_kv=False``), the patched model on its ordinary step (``compile_decode=False``),
and with ``ops.decode_attention`` over the joint cache (``decode_attention=True``), and
with the decode step compiled (``compile_decode=True``, the default on CUDA)::

    python tools/decode_breakdown.py breakdown --json out.json

``--one-token`` runs a single token between ``cuProfilerStart``/``cuProfilerStop`` for
``ncu --profile-from-start off --cache-control none --metrics gpu__time_duration.sum``;
``--sum CSV`` adds up ncu's kernel durations by kernel name::

    ncu --profile-from-start off --cache-control none --csv \\
        --metrics gpu__time_duration.sum python tools/decode_breakdown.py one-token --patched > t.csv
    python tools/decode_breakdown.py sum t.csv
"""

import argparse
import collections
import csv
import ctypes
import json
import statistics
import sys
import time


def bench_model(tiny=False):
    """The bench's Llama-3-8B-shaped random 4-bit model, or (``tiny``) its tiny Llama, a
    CPU check of a tool."""
    from mlx_foundry.lm_bench import random_quantized_model

    if tiny:
        from mlx_foundry.bench.e2e import TINY_LLAMA
        return random_quantized_model(TINY_LLAMA)
    return random_quantized_model()


PATCH_KWARGS = {"unpatched": None, "ordinary": {"compile_decode": False},
                "compiled": {"compile_decode": True}}
"""The decode variants of the tools: ``patch`` arguments (``None``: unpatched)."""


def under_patch(model, patch_kwargs, fn):
    """``fn(model)`` with ``model`` patched with ``patch_kwargs`` (``None``: unpatched),
    unpatched again afterwards."""
    from mlx_foundry.lm import patch, unpatch

    if patch_kwargs is not None:
        patch(model, **patch_kwargs)
    try:
        return fn(model)
    finally:
        if patch_kwargs is not None:
            unpatch(model)


def primed(model):
    """``(cache, token)``: a fresh cache holding a 16-token prompt, and the next token."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([[1] * 16]), cache=cache))
    return cache, mx.array([[3]])


def breakdown(model, tokens=30, skip=5, pipelined=64):
    import mlx.core as mx

    cache, y = primed(model)
    b, a, w = [], [], []
    for i in range(tokens):
        t0 = time.perf_counter()
        out = model(y, cache=cache)
        t1 = time.perf_counter()
        mx.async_eval(out)
        t2 = time.perf_counter()
        mx.eval(out)
        t3 = time.perf_counter()
        if i >= skip:
            b.append(t1 - t0)
            a.append(t2 - t1)
            w.append(t3 - t2)
    cache, y = primed(model)
    out = model(y, cache=cache)
    mx.async_eval(out)
    host, host_cpu, wait = 0.0, 0.0, 0.0
    t0 = time.perf_counter()
    for _ in range(pipelined):
        t1, c1 = time.perf_counter(), time.thread_time()
        nxt = model(y, cache=cache)
        mx.async_eval(nxt)
        t2, c2 = time.perf_counter(), time.thread_time()
        mx.eval(out)
        t3 = time.perf_counter()
        host += t2 - t1
        host_cpu += c2 - c1
        wait += t3 - t2
        out = nxt
    mx.eval(out)
    pipe = (time.perf_counter() - t0) / pipelined
    ms = lambda xs: 1e3 * statistics.median(xs)  # noqa: E731
    # In the pipelined loop, per token (means): the host's time to build and submit the
    # next token (pipelined_host_ms), the CPU time of this thread in it
    # (pipelined_host_cpu_ms) and its wait for the token before (pipelined_wait_ms). A wait
    # near zero says the host sets the pace; a CPU time well under the host's time says
    # the host is itself blocked inside build or submit (on the GPU or another thread).
    return {"build_ms": ms(b), "encode_ms": ms(a), "wait_ms": ms(w), "pipelined_ms": 1e3 * pipe,
            "pipelined_host_ms": 1e3 * host / pipelined,
            "pipelined_host_cpu_ms": 1e3 * host_cpu / pipelined,
            "pipelined_wait_ms": 1e3 * wait / pipelined}


def one_token(model):
    import mlx.core as mx

    cache, y = primed(model)
    for _ in range(4):
        mx.eval(model(y, cache=cache))
    driver = ctypes.CDLL("libcuda.so.1")
    mx.synchronize()
    driver.cuProfilerStart()
    mx.eval(model(y, cache=cache))
    mx.synchronize()
    driver.cuProfilerStop()


def kernel_sum(path, top=14):
    header, per = None, collections.defaultdict(lambda: [0, 0.0])
    scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}
    for row in csv.reader(open(path)):
        if row and row[0] == "ID":
            header = row
        elif header and len(row) == len(header):
            d = dict(zip(header, row))
            if d["Metric Name"] == "gpu__time_duration.sum":
                us = float(d["Metric Value"].replace(",", "")) * scale[d["Metric Unit"]]
                k = per[d["Kernel Name"][:70]]
                k[0] += 1
                k[1] += us
    total = sum(us for _, us in per.values())
    print(f"{sum(c for c, _ in per.values())} kernels, {total:.1f} us")
    for name, (c, us) in sorted(per.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"  {c:4d} x {us / c:7.2f} us = {us:8.1f} us  {name}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("breakdown")
    s.add_argument("--json", default=None)
    s.add_argument("--only", nargs="*", default=None,
                   help="variant names to run (unpatched, patched, ...); default: all")
    s.add_argument("--rounds", type=int, default=2)
    s = sub.add_parser("one-token")
    s.add_argument("--patched", action="store_true",
                   help="patched, on the ordinary step unless --compile-decode")
    s.add_argument("--decode-attention", action="store_true")
    s.add_argument("--compile-decode", action="store_true")
    s = sub.add_parser("sum")
    s.add_argument("csv")
    args = p.parse_args()
    if args.cmd == "sum":
        kernel_sum(args.csv)
        return 0
    from mlx_foundry.lm import patch

    model = bench_model()
    if args.cmd == "one-token":
        if args.patched:
            patch(model, decode_attention=args.decode_attention,
                  compile_decode=args.compile_decode)
        one_token(model)
        return 0
    # Each variant --rounds times, interleaved (host speed drifts over a run); the best.
    res = {}
    # "patched": the ordinary step (compile_decode=False; the compiled step is the default).
    off = {"compile_decode": False}
    variants = (("unpatched", None), ("patched, joint_kv=False", {"joint_kv": False}),
                ("patched", off),
                ("patched, decode_attention=True", {"decode_attention": True, **off}),
                ("patched, compile_decode=True", {"compile_decode": True}))
    if args.only:
        variants = [v for v in variants if v[0] in args.only]
    for _ in range(args.rounds):
        for name, kw in variants:
            r = under_patch(model, kw, breakdown)
            best = res.get(name)
            if best is None or r["pipelined_ms"] < best["pipelined_ms"]:
                res[name] = r
    for k, v in res.items():
        print(f"{k:32s} " + "  ".join(f"{m} {x:.3f}" for m, x in v.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
