"""The bench's read probe over launch shapes and sizes (diagnostics for its defaults).

Times :func:`mlx_foundry.bench.timing.plain_read` (the bench's method: rotated pool,
200 calls per timing, medians) for each launch of the probe at each size, and prints
microseconds and GB/s::

    python tools/read_sweep.py --mb 33 66 99 117 --json sweep.json

A launch is ``iters x simdgroups`` (one chunk per SIMD-group) or
``iters x simdgroups / waves`` (a persistent grid of ``waves`` x the SIMD-groups one
SM holds x the SMs, each looping over chunks).
"""

import argparse
import json
import sys


def launches(sms, warps_per_sm=64):
    out = [dict(iters=i, simdgroups=s) for i in (2, 4, 8, 16, 32) for s in (4, 8)]
    for i in (4, 8, 16):
        for waves in (1, 2):
            out.append(dict(iters=i, simdgroups=8, groups=waves * warps_per_sm * sms))
    return out


def label(kw):
    text = f"{kw['iters']}x{kw['simdgroups']}"
    return text + (f" / {kw['groups']} groups" if "groups" in kw else "")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, nargs="+", default=[33.0, 66.1, 99.1, 117.4])
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--sms", type=int, default=132,
                   help="SMs of the GPU, for the persistent grids (H100 SXM: 132)")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from mlx_foundry.backends import gpu_backend
    from mlx_foundry.bench import CALLS_PER_TIMING, timing

    backend = gpu_backend()
    if backend is None:
        print("read_sweep: needs a GPU backend", file=sys.stderr)
        return 2
    sms = args.sms
    print(f"{timing.device_name()}, persistent grids for {sms} SMs", flush=True)
    rows = []
    for mb in args.mb:
        nbytes = int(mb * 1e6)
        for kw in launches(sms):
            r = timing.plain_read(nbytes, backend=backend, pool_bytes=timing.DEFAULT_POOL_BYTES,
                                  repeats=args.repeats, probe=kw, calls=CALLS_PER_TIMING)
            rows.append({"mb": mb, "launch": label(kw), **kw, "us": r["us"],
                         "gbps": r["gbps"]})
            print(f"{mb:7.1f} MB  {label(kw):26s} {r['us']:8.2f} us  {r['gbps']:7.0f} GB/s",
                  flush=True)
    for mb in args.mb:
        best = min((r for r in rows if r["mb"] == mb), key=lambda r: r["us"])
        print(f"best at {mb} MB: {best['launch']} {best['us']:.2f} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": timing.device_name(), "mlx": timing.mlx_version(),
                       "sms": sms, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
