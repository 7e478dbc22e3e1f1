"""Launch sweep (ROWS x THREADS x SPLITK) of the decode GEMVs and the bench's linears.

Diagnostics for ``docs/ncu_h100_gemv.md``. Every configuration's output is checked
against the reference backend first; the checked ones then run once each between
``cuProfilerStart``/``cuProfilerStop``::

    ncu --profile-from-start off --clock-control none --csv \\
        --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed \\
        python tools/gemv_sweep.py --profile labels.txt > sweep.csv
    python tools/gemv_sweep.py --table sweep.csv labels.txt

``--rows``, ``--threads``, ``--split``, ``--min-blocks`` (comma-separated; ``MINBLOCKS``
0 is no register bound, see ``stages.gemv.check_min_blocks``) and ``--only`` narrow the
sweep; ``--dtype bfloat16`` sweeps the bf16 block (activations, scales and biases).
``--repeat N`` launches the whole list N times, round-robin, and ``--table`` prints each
configuration's median and range (one launch of a ~8 us kernel under ncu moves by
10-15% from one launch to the next). ``--table`` also prints
``launch__registers_per_thread``, ``smsp__inst_executed.sum`` and
``sm__warps_active.avg.pct_of_peak_sustained_active`` when they were collected.
"""

import argparse
import csv
import ctypes
import itertools
import statistics
import sys

ROWS, THREADS, SPLITK = (2, 4, 8, 16), (64, 128, 256), (0, 1)


def _ops(dtype=None):
    from decode_shapes import decode_block
    from mlx_foundry import ops

    b = decode_block(dtype)
    g, x4, x14, r4 = b.g, b.x4, b.x14, b.r4
    wu, wg, wd, wo, wq, wk, wv, qkv = b.wu, b.wg, b.wd, b.wo, b.wq, b.wk, b.wv, b.qkv
    return {
        "o+res": (ops.linear, (x4, wo), {"residual": r4}),
        "qkv": (ops.norm_qkv_rope, (x4[None], g, 1e-5, wq, wk, wv), qkv),
        "gate_up": (ops.norm_gate_up_swiglu, (x4, g, 1e-5, wg, wu), {}),
        "down+res": (ops.linear, (x14, wd), {"residual": r4}),
        # The bench's single linears (issue 5's targets): 4-bit, and fp16 (dense) weights.
        "q4 4096->14336": (ops.linear, (x4, wu), {}),
        "q4 14336->4096": (ops.linear, (x14, wd), {}),
        "dense 4096->14336": (ops.linear, (x4, b.du), {}),
        "dense 14336->4096": (ops.linear, (x14, b.dd), {}),
    }


def profile(labels_path, rows=ROWS, threads=THREADS, splits=SPLITK, only=None, repeat=1,
            min_blocks=(0,), dtype=None):
    import mlx.core as mx
    from mlx_foundry.bench.autotune import _captured

    def launch_of(op, args, kw):
        """The op's one kernel and the arguments of its launch, less the launch constants
        (the tuner's record-and-replay: each configuration is passed to the kernel itself)."""
        sets, found = _captured(lambda idx: (op, args, kw), "cuda")
        (kwargs,) = sets(0)
        return found[0], kwargs

    def run(kern, kwargs, cfg):
        out = kern(backend="cuda", **kwargs, **cfg)
        return out if isinstance(out, tuple) else (out,)

    jobs = []
    for name, (op, args, kw) in _ops(dtype).items():
        if only and name not in only:
            continue
        want = op(*args, backend="reference", **kw)
        want = want if isinstance(want, tuple) else (want,)
        kern, kwargs = launch_of(op, args, kw)
        for r, t, split, bound in itertools.product(rows, threads, splits, min_blocks):
            cfg = {"ROWS": r, "THREADS": t, "SPLITK": split}
            if bound:
                cfg["MINBLOCKS"] = bound
            try:
                got = run(kern, kwargs, cfg)
            except ValueError as e:  # a launch the kernel rejects (split-K row limits)
                print(f"SKIP {name} {cfg}: {e}", file=sys.stderr)
                continue
            ok = all(mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()
                     <= 2e-2 * max(1.0, mx.abs(b.astype(mx.float32)).max().item())
                     for a, b in zip(got, want))
            if not ok:
                print(f"WRONG {name} {cfg}", file=sys.stderr)
                continue
            jobs.append((f"{name} R{r} T{t} S{split}" + (f" B{bound}" if bound else ""),
                         kern, kwargs, cfg))
    with open(labels_path, "w") as f:
        f.write("\n".join(j[0] for j in jobs))
    mx.synchronize()
    driver = ctypes.CDLL("libcuda.so.1")
    driver.cuProfilerStart()
    for _ in range(repeat):
        for _, kern, kwargs, cfg in jobs:
            mx.eval(run(kern, kwargs, cfg))
            mx.synchronize()
    driver.cuProfilerStop()


def table(csv_path, labels_path):
    labels = open(labels_path).read().split("\n")
    kernels, header = {}, None
    for row in csv.reader(open(csv_path)):
        if row and row[0] == "ID":
            header = row
        elif header and len(row) == len(header):
            d = dict(zip(header, row))
            if d["Kernel Name"].startswith("custom_kernel"):
                kernels.setdefault(d["ID"], {})[d["Metric Name"]] = (d["Metric Value"],
                                                                    d["Metric Unit"])
    scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0}
    launches = list(kernels.values())
    if not labels or len(launches) % len(labels):
        sys.exit(f"gemv_sweep: {len(launches)} kernels for {len(labels)} labels")
    # Launch i of the profile is configuration i % len(labels) (round-robin repeats).
    for i, label in enumerate(labels):
        runs = launches[i::len(labels)]
        us = sorted(float(k["gpu__time_duration.sum"][0].replace(",", ""))
                    * scale[k["gpu__time_duration.sum"][1]] for k in runs)
        k = runs[0]
        dram = k.get("dram__throughput.avg.pct_of_peak_sustained_elapsed", ("?", ""))[0]
        regs = k.get("launch__registers_per_thread", ("?", ""))[0]
        inst = k.get("smsp__inst_executed.sum", ("?", ""))[0]
        warps = k.get("sm__warps_active.avg.pct_of_peak_sustained_active", ("?", ""))[0]
        spread = f" ({us[0]:.2f}-{us[-1]:.2f}, {len(us)} launches)" if len(us) > 1 else ""
        print(f"{label:28s} {statistics.median(us):7.2f} us{spread}  dram {dram}%"
              f"  regs {regs}  inst {inst}  warps {warps}%")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", metavar="LABELS", help="run the sweep; write the labels here")
    p.add_argument("--table", nargs=2, metavar=("CSV", "LABELS"), help="print the results")
    ints = lambda s: tuple(int(v) for v in s.split(","))  # noqa: E731
    p.add_argument("--rows", type=ints, default=ROWS, help="ROWS values, comma separated")
    p.add_argument("--threads", type=ints, default=THREADS, help="THREADS values")
    p.add_argument("--split", type=ints, default=SPLITK, help="SPLITK values")
    p.add_argument("--min-blocks", type=ints, default=(0,),
                   help="MINBLOCKS values (0: no register bound; CUDA only)")
    p.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16",
                   help="activations, scales and biases")
    p.add_argument("--only", nargs="*", help="only these GEMVs (o+res qkv gate_up down+res "
                   "'q4 4096->14336' 'q4 14336->4096' 'dense 4096->14336' 'dense 14336->4096')")
    p.add_argument("--repeat", type=int, default=1, help="launches of each configuration")
    args = p.parse_args()
    if args.table:
        table(*args.table)
    elif args.profile:
        import mlx.core as mx

        profile(args.profile, args.rows, args.threads, args.split, args.only, args.repeat,
                args.min_blocks, getattr(mx, args.dtype))
    else:
        p.error("give --profile LABELS or --table CSV LABELS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
