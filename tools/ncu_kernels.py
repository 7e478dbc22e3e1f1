"""Kernel durations of the fused decode ops under Nsight Compute (diagnostics, not the bench).

The bench (``python -m mlx_foundry bench``) is what performance claims come from; this
script explains them. It builds the Llama-3-8B decode shapes (4-bit, group 64, fp16),
checks every op on the GPU against its reference backend, then runs each op once between
``cuProfilerStart``/``cuProfilerStop`` so that ``ncu --profile-from-start off`` sees
only those launches (cache flushed before each, as ncu does by default)::

    ncu --profile-from-start off --clock-control none --csv \\
        --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,\\
launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active \\
        python tools/ncu_kernels.py --profile > ncu.csv
    python tools/ncu_kernels.py --table ncu.csv

``--table`` prints one line per kernel, labelled in launch order.
"""

import argparse
import collections
import csv
import ctypes
import sys

LABELS = "ncu_labels.txt"


def _jobs():
    import mlx.core as mx

    from decode_shapes import decode_block
    from mlx_foundry import ops
    from mlx_foundry.bench.cases import _qweight, _silu, weight_bytes
    from mlx_foundry.bench.read_probe import probe_words, read_probe
    from mlx_foundry.ops.weights import Weight

    b = decode_block()
    g, x4, x14, r4 = b.g, b.x4, b.x14, b.r4
    wu, wg, wd, wo, wq, wk, wv = b.wu, b.wg, b.wd, b.wo, b.wq, b.wk, b.wv
    xn = mx.random.normal((8192, 8192), key=mx.random.key(9)).astype(mx.float16)
    gn = (1 + 0.1 * mx.random.normal((8192,), key=mx.random.key(10))).astype(mx.float16)
    qkv = b.qkv
    ours = {
        "linear 4096->14336": (ops.linear, (x4, wu), {}),
        "linear 14336->4096": (ops.linear, (x14, wd), {}),
        "o_proj+residual": (ops.linear, (x4, wo), {"residual": r4}),
        "down_proj+residual": (ops.linear, (x14, wd), {"residual": r4}),
        "norm_linear": (ops.norm_linear, (x4, g, 1e-5, wu), {}),
        "norm_gate_up_swiglu": (ops.norm_gate_up_swiglu, (x4, g, 1e-5, wg, wu), {}),
        "norm_qkv_rope": (ops.norm_qkv_rope, (x4[None], g, 1e-5, wq, wk, wv), qkv),
        "rms_norm 8192x8192": (ops.rms_norm, (xn, gn, 1e-5), {}),
    }
    # The targets' other weight formats: 8-bit and fp16 (dense) 14336 -> 4096.
    w8 = Weight(*_qweight(0, 11, 4096, 14336, 8, 64, mx.float16), group_size=64, bits=8)
    wf = b.dd
    ours["linear q8 14336->4096"] = (ops.linear, (x14, w8), {})
    ours["linear fp16 14336->4096"] = (ops.linear, (x14, wf), {})
    # The bench's plain read (bench/read_probe.py) at the bytes of the 4-bit GEMV
    # 4096 -> 14336, of gate/up and of the whole MLP block (gate/up + down), and of the
    # 8-bit and fp16 weights.
    q4 = weight_bytes(14336, 4096, bits=4)
    for label, nbytes in (("33 MB", q4), ("66 MB", 2 * q4), ("99 MB", 3 * q4),
                          ("62 MB (q8)", weight_bytes(4096, 14336, bits=8)),
                          ("117 MB (fp16)", weight_bytes(4096, 14336))):
        buf = mx.arange(probe_words(nbytes), dtype=mx.uint32)
        ours[f"read probe {label}"] = (read_probe, (buf,), {})

    def qmm(x, w):
        return mx.quantized_matmul(x, w.weight, w.scales, w.biases, transpose=True,
                                   group_size=w.group_size, bits=w.bits)

    def mlx_mlp():
        # The bench's baseline of the decode MLP block: MLX's unfused ops.
        h = mx.fast.rms_norm(x4, g, 1e-5)
        return x4 + qmm(_silu(qmm(h, wg)) * qmm(h, wu), wd)

    mlx = {
        "mlx quantized_matmul 4096->14336": lambda: qmm(x4, wu),
        "mlx quantized_matmul 14336->4096": lambda: qmm(x14, wd),
        "mlx quantized_matmul q8 14336->4096": lambda: qmm(x14, w8),
        "mlx matmul fp16 14336->4096": lambda: x14 @ wf.T,
        "mlx rms_norm 8192x8192": lambda: mx.fast.rms_norm(xn, gn, 1e-5),
        # Last: its several kernels all take its label (see table()).
        "mlx unfused MLP block": mlx_mlp,
    }
    return ours, mlx


def _agreement(got, want):
    """``(ok, text)``: floats within 2% of the reference's largest value; integers (the
    read probe's sums) exactly."""
    import mlx.core as mx

    if not mx.issubdtype(want.dtype, mx.floating):
        wrong = int(mx.sum(got != want).item())
        return wrong == 0, f"{wrong} wrong values"
    a, b = got.astype(mx.float32), want.astype(mx.float32)
    err, scale = mx.abs(a - b).max().item(), mx.abs(b).max().item()
    return err <= 2e-2 * max(scale, 1.0), f"max|err| {err:.3g} (max|ref| {scale:.3g})"


def check_and_profile(profile):
    import mlx.core as mx

    ours, mlx = _jobs()
    failures = 0
    for name, (op, args, kw) in ours.items():
        got, want = op(*args, backend="cuda", **kw), op(*args, backend="reference", **kw)
        got = got if isinstance(got, (list, tuple)) else [got]
        want = want if isinstance(want, (list, tuple)) else [want]
        for a, b in zip(got, want):
            ok, what = _agreement(a, b)
            failures += not ok
            print(f"check {name:24s} {what} {'ok' if ok else 'FAIL'}", file=sys.stderr)
    jobs = [(n, (lambda op=op, a=a, kw=kw: op(*a, backend="cuda", **kw)))
            for n, (op, a, kw) in ours.items()] + list(mlx.items())
    for _, fn in jobs:
        mx.eval(fn())  # compile and warm up outside the profiled range
    mx.synchronize()
    with open(LABELS, "w") as f:
        f.write("\n".join(n for n, _ in jobs))
    if profile:
        driver = ctypes.CDLL("libcuda.so.1")
        driver.cuProfilerStart()
        for _, fn in jobs:
            mx.eval(fn())
            mx.synchronize()
        driver.cuProfilerStop()
    return failures


def table(path):
    labels = open(LABELS).read().split("\n")
    kernels = collections.OrderedDict()
    header = None
    for row in csv.reader(open(path)):
        if row and row[0] == "ID":
            header = row
        elif header and len(row) == len(header):
            d = dict(zip(header, row))
            k = kernels.setdefault(d["ID"], {"kernel": d["Kernel Name"][:40]})
            k[d["Metric Name"]] = d["Metric Value"]
    # One kernel per label, but the last job (MLX's unfused MLP block) launches several.
    fits = len(labels) <= len(kernels)
    for i, k in enumerate(kernels.values()):
        label = labels[min(i, len(labels) - 1)] if fits else "?"
        rest = " ".join(f"{m.split('.')[0]}={v}" for m, v in k.items() if m != "kernel")
        print(f"{label:34s} {k['kernel']:40s} {rest}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", action="store_true", help="run the profiled range")
    p.add_argument("--table", metavar="CSV", help="print ncu's CSV output as a table")
    args = p.parse_args()
    if args.table:
        table(args.table)
        return 0
    return 1 if check_and_profile(args.profile) else 0


if __name__ == "__main__":
    sys.exit(main())
