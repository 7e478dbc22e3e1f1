"""Registers and SASS of the decode GEMVs, compiled here for sm_90 (no GPU needed).

Diagnostics, not the bench: a kernel's registers per thread set its occupancy on an
H100 (65536 per SM), and its SASS shows what the loop does per chunk. Both come from
compiling the same CUDA text MLX would compile (``inspection.cuda_source_of``) with
``nvcc -arch=sm_90 -cubin`` (``ptxas -v`` for registers; ``nvdisasm`` for SASS)::

    python tools/gemv_regs.py                       # every case, default launches
    python tools/gemv_regs.py gate/up --rows 2      # cases whose label contains 'gate/up'
    python tools/gemv_regs.py gate/up --sass gu.sass
    python tools/gemv_regs.py gate/up --min-blocks 5   # MINBLOCKS=5

Needs ``nvcc`` and MLX's CUDA device headers in ``MLX_FOUNDRY_CUDA_INCLUDE`` (see
``tests/test_cuda_compat.py`` for how to extract them); ``--sass`` also needs
``nvdisasm`` (on PATH, or the ``nvidia-cuda-nvdisasm`` wheel). Registers match what
ncu reports for MLX's NVRTC build on an H100 (72 / 128 / 96 / 128 for the first four
cases at 65b5490).

``--min-blocks N`` compiles each kernel with the launch constant ``MINBLOCKS=N``
(``__launch_bounds__(THREADS, N)``, ``stages.gemv.check_min_blocks``): ptxas then holds
it to the registers that let ``N`` threadgroups share an SM (65536 / (N * THREADS)),
spilling if it must (``docs/ncu_h100_gemv.md`` section 17).

``--distance`` reports, for the kernel's main loop (its longest backward branch), how
many instructions separate each 16-byte load from the first instruction that reads its
registers, going round the loop: how far ahead of its use a load is issued. The loop's
text loads the next chunk's weights an iteration ahead; as compiled, ptxas issues them
95-170 instructions before use in loops of 277-783 (docs/bench_journal.md, "Where the tall 4-bit
GEMV waits on an H200"). ``--fence`` compiles the linear cases as
``tools/gemv_ab.py``'s ``fence`` variant, which keeps those loads an iteration ahead::

    python tools/gemv_regs.py "linear 14336" --distance --fence --rows 4

``--variant acp`` / ``--variant acq`` compile them as the ``cp.async`` ring variants
instead (``--fence`` is ``--variant fence``); ptxas then reports the ring's shared
memory, which must stay within the 48 KB of static shared memory.
"""

import argparse
import glob
import importlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

import mlx.core as mx

from decode_shapes import decode_block
from mlx_foundry.inspection import cuda_source_of


def _cases(dtype):
    """``(label, kernel, kwargs)`` of the Llama-3-8B decode GEMVs, default launches."""
    # The module (mlx_foundry.ops exports the function of the same name).
    lin = importlib.import_module("mlx_foundry.ops.linear")
    b = decode_block()

    def w(prefix, weight):
        return {prefix: weight.weight, f"{prefix}_scales": weight.scales.astype(dtype),
                f"{prefix}_biases": weight.biases.astype(dtype)}

    launch = lin.default_launch
    x4, x14, r4 = (a.astype(dtype) for a in (b.x4, b.x14, b.r4))
    g = b.g.astype(dtype)
    aff = ("affine", 4, 64)
    yield ("linear 4096->14336", lin.linear_kernel(aff),
           dict(x=x4, **w("w", b.wu), **launch(14336, 4096)))
    yield ("linear 14336->4096", lin.linear_kernel(aff),
           dict(x=x14, **w("w", b.wd), **launch(4096, 14336)))
    yield ("o_proj+residual", lin.linear_kernel(aff, has_residual=True),
           dict(x=x4, residual=r4, **w("w", b.wo), **launch(4096, 4096)))
    yield ("down_proj+residual", lin.linear_kernel(aff, has_residual=True),
           dict(x=x14, residual=r4, **w("w", b.wd), **launch(4096, 14336)))
    yield ("norm_linear 4096->14336", lin.linear_kernel(aff, norm="weight"),
           dict(x=x4, norm_weight=g, eps=1e-5, **w("w", b.wu), **launch(14336, 4096)))
    yield ("gate/up", lin.gate_up_kernel(aff, aff),
           dict(x=x4, norm_weight=g, eps=1e-5, **w("wg", b.wg), **w("wu", b.wu),
                **launch(14336, 4096, dual=True)))


def _include_dirs():
    inc = os.environ.get("MLX_FOUNDRY_CUDA_INCLUDE")
    if not inc or not os.path.isfile(os.path.join(inc, "mlx/backend/cuda/device/utils.cuh")):
        sys.exit("gemv_regs: set MLX_FOUNDRY_CUDA_INCLUDE to MLX's CUDA device headers "
                 "(see tests/test_cuda_compat.py)")
    return [inc, os.path.join(os.path.dirname(mx.__file__), "include")]


def _nvdisasm():
    found = shutil.which("nvdisasm")
    if found is None:
        purelib = sysconfig.get_paths()["purelib"]
        found = next(iter(glob.glob(os.path.join(purelib, "nvidia", "*", "bin", "nvdisasm"))),
                     None)
    if found is None:
        sys.exit("gemv_regs: nvdisasm not found (pip install nvidia-cuda-nvdisasm)")
    return found


def compile_case(kernel, kwargs, folder):
    """Compile one case to ``folder/k.cubin``; returns ``(registers, spill bytes)``."""
    cu = os.path.join(folder, "k.cu")
    with open(cu, "w") as f:
        f.write(cuda_source_of(kernel, **kwargs))
    cmd = ["nvcc", "-arch=sm_90", "-std=c++17", "-cubin", "-Xptxas", "-v", cu,
           "-o", os.path.join(folder, "k.cubin")]
    cmd += [f"-I{d}" for d in _include_dirs()]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(r.stderr[-4000:])
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spill = re.search(r"(\d+) bytes spill stores", r.stderr)
    return int(regs.group(1)), int(spill.group(1)) if spill else 0


def sass_of(folder, *, line_info=False):
    """The SASS of ``folder/k.cubin`` (:func:`compile_case`), by nvdisasm."""
    cmd = [_nvdisasm(), "-c", *(["-g"] if line_info else []), os.path.join(folder, "k.cubin")]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"BRA `\((\.L_x_\d+)\)")
_INSTR = re.compile(r"/\*[0-9a-f]+\*/\s+(.*?)\s*;")
_WIDE_LOAD = re.compile(r"LDG\.E\.128\S*\s+R(\d+),")


def main_loop(sass):
    """The instructions of the longest loop in ``nvdisasm -c`` text (from the label a
    backward branch returns to, to that branch), predicates included."""
    lines = sass.splitlines()
    labels, best = {}, None
    for i, line in enumerate(lines):
        m = _LABEL.match(line.strip())
        if m:
            labels[m.group(1)] = i
        m = _BRANCH.search(line)
        start = labels.get(m.group(1)) if m else None
        if start is not None and (best is None or i - start > best[1] - best[0]):
            best = (start, i)
    if best is None:
        return []
    return [m.group(1) for m in map(_INSTR.search, lines[best[0]:best[1] + 1]) if m]


def _reads(instr):
    """Registers an instruction reads: every ``R<n>`` but its first operand (the
    destination), whose predicate guard is dropped; stores read all of theirs."""
    op = instr.split(None, 1)[1] if instr.startswith("@") else instr
    name, _, args = op.partition(" ")
    operands = args.split(",")
    if not name.startswith(("ST", "RED", "ATOM")):
        operands = operands[1:]
    regs = set()
    for text in operands:
        for r in re.findall(r"\bR(\d+)\b", text):
            base = int(r)
            # 64-bit addresses [R20.64] name a register pair.
            regs.update((base, base + 1) if f"R{r}.64" in text else (base,))
    return regs


def load_use_distances(sass):
    """``(loop length, [instructions from each 16-byte load to its first use])`` of
    the main loop; ``None`` for a load no instruction of the loop reads."""
    loop = main_loop(sass)
    out = []
    for i, instr in enumerate(loop):
        m = _WIDE_LOAD.search(instr)
        if not m:
            continue
        dest = set(range(int(m.group(1)), int(m.group(1)) + 4))
        out.append(next((k for k in range(1, len(loop) + 1)
                         if _reads(loop[(i + k) % len(loop)]) & dest), None))
    return len(loop), out


def _variant_kernel(kind):
    """The linear kernel of one of ``tools/gemv_ab.py``'s source variants (``fence``,
    ``acp``)."""
    import gemv_ab

    return gemv_ab.variant_kernel(kind)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("only", nargs="*", help="cases whose label contains one of these")
    p.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    p.add_argument("--rows", type=int, help="override ROWS")
    p.add_argument("--splitk", type=int, choices=[0, 1], help="override SPLITK")
    p.add_argument("--sass", metavar="FILE", help="write the first case's SASS to FILE")
    p.add_argument("--min-blocks", type=int, metavar="N",
                   help="MINBLOCKS=N: compile under __launch_bounds__(THREADS, N)")
    p.add_argument("--distance", action="store_true",
                   help="instructions from each 16-byte load of the main loop to its use")
    p.add_argument("--fence", action="store_true", help="--variant fence")
    p.add_argument("--variant", choices=["fence", "acp", "acq"],
                   help="the linear cases as this gemv_ab variant (others are skipped)")
    args = p.parse_args()
    kind = "fence" if args.fence else args.variant
    fence = _variant_kernel(kind) if kind else None
    for label, kernel, kwargs in _cases(getattr(mx, args.dtype)):
        if args.only and not any(o in label for o in args.only):
            continue
        if fence is not None:
            if not label.startswith("linear "):
                continue
            kernel, label = fence, f"{label} ({kind})"
        if args.rows is not None:
            kwargs["ROWS"] = args.rows
        if args.splitk is not None:
            kwargs["SPLITK"] = args.splitk
        if args.min_blocks:
            kwargs["MINBLOCKS"] = args.min_blocks
        with tempfile.TemporaryDirectory() as d:
            regs, spill = compile_case(kernel, kwargs, d)
            launch = " ".join(f"{k}={kwargs[k]}" for k in ("ROWS", "THREADS", "SPLITK"))
            if args.min_blocks:
                launch += f" bound {args.min_blocks}"
            print(f"{label:26s} {launch:30s} registers {regs:4d}  spill {spill} bytes")
            if args.distance:
                n, dist = load_use_distances(sass_of(d))
                print(f"{'':26s} main loop {n} instructions; 16-byte loads to first use: "
                      f"{dist}")
            if args.sass:
                with open(args.sass, "w") as f:
                    f.write(sass_of(d, line_info=True))
                return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
