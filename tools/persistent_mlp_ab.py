"""The decode MLP block as one persistent kernel with a grid barrier, against the
package's two kernels (diagnostic, CUDA only).

A patched decode block runs its MLP as two kernels: RMSNorm + gate/up + SwiGLU, then the
down projection + residual. The second needs the whole output of the first, and MLX's
custom kernels have no grid-wide barrier, so a kernel boundary sits between them (about
1.1 ms of a compiled token's time goes to boundaries like it: docs/bench_journal.md, session 31).
``tools/barrier_ab.py`` measured one boundary against a grid barrier on plain reads
(H100, session 32: the barrier 6 us faster). This tool asks the same of the real
kernels (H100, session 33, ``docs/persistent_mlp_h100_s33.json``: the persistent kernel
equal to the ops bit for bit, 53.4 against their 52.7 us per block: what the barrier
saves, the phases lose run by 528 looping threadgroups)::

    python tools/persistent_mlp_ab.py --rounds 7 --json mlp.json

It records the two launches the ops make (``ops.norm_gate_up_swiglu`` and
``ops.linear(..., residual=x)``, 4-bit, group 64, fp16, the 8B shapes by default) and
pastes both generated bodies, unchanged, into one kernel. There each threadgroup loops
over the threadgroups the two launches had (``threadgroup_position_in_grid`` becomes
the loop's index), so every row is computed by the same code with the same arithmetic as
in the ops: the outputs must be equal bit for bit, and the tool checks that before it
times anything. Variants, each timed on chained calls (a call's output is the next
call's ``x``) over a pool of weight sets larger than the L2:

- ``mlx``: MLX's own ops, unfused (RMSNorm, three ``mx.quantized_matmul``, SwiGLU, the
  residual): the bench's baseline for the block, checked loosely (``MLX_TOLERANCE``);
- ``ops``: the two ops, as a patched model calls them (two launches);
- ``two-p``: the persistent kernel once per phase (two launches, persistent grids);
- ``barrier``: the persistent kernel with both phases and a grid barrier between them
  (one launch).

The barrier is ``barrier_ab``'s, with its counters in a 16-byte input that the kernel
writes and leaves zeroed for the next launch (so no output needs MLX's ``init_value``
fill, a kernel per output and call) and a bounded spin that sets a sticky flag there
instead of hanging. It needs every threadgroup resident at once: the grid is ``--sms``
times ``--per-sm`` threadgroups of the ops' 128 threads, and the kernel is compiled with
``__launch_bounds__(128, per-sm)`` (4 by default: at most 128 registers, as the ops'
kernels use). CUDA-only text: the Metal dialect has no atomics, and Metal does not
promise that threadgroups waiting on each other make progress.
"""

import argparse
import json
import os
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import grid_barrier  # noqa: E402  (tools/grid_barrier.py: the barrier's CUDA text)

GRID_SYNC = r"""
// Every threadgroup arrives, then waits until all gridDim.x have (all resident). The
// counters live in an input the kernel writes (sync: arrivals, departures, a time-out
// flag that stays set), so that no output needs MLX's init_value fill (a fill kernel
// per output and call): the last threadgroup to leave zeroes the counters for the next
// launch, which the stream orders after this one.
__device__ __forceinline__ void persistent_mlp_grid_sync(const unsigned* sync_input) {
  unsigned* sync = const_cast<unsigned*>(sync_input);
  __syncthreads();
  if (threadIdx.x == 0u) {
    grid_barrier_arrive_and_wait(sync, sync + 2);
    if (atomicAdd(sync + 1, 1u) == gridDim.x - 1u) {
      atomicExch(sync, 0u);
      atomicExch(sync + 1, 0u);
    }
  }
  __syncthreads();
}
"""

SYNC_WORDS = 4
"""uint32 words of the barrier's counters (arrivals, departures, flag, unused): 16 bytes,
over the 8 that MLX's CUDA allocator would put in managed memory behind the host link
(``tools/barrier_ab.py``, ``SYNC_WORDS``)."""

ATTR_TG_POS = "mlx::core::cu::metal_compat::attr_threadgroup_position_in_grid()"
"""How a generated CUDA body reads its threadgroup's position (``backends/cuda_compat``)."""

EPS = 1e-5


def record_phases(x, g, gate, up, down):
    """The two launches the ops make for one MLP block on this input set, recorded
    (nothing runs) and taken apart: ``(Phase of gate/up, Phase of down)``."""
    from mlx_foundry import ops
    from mlx_foundry.kernel import record_launches

    with record_launches() as rec:
        a = ops.norm_gate_up_swiglu(x, g, EPS, gate, up, backend="cuda")
        ops.linear(a, down, residual=x, backend="cuda")
    if len(rec) != 2:
        raise RuntimeError(f"expected two launches, the ops made {len(rec)}")
    return Phase(*rec[0]), Phase(*rec[1])


def make_set(d, inter, bits=4, group_size=64, dtype=None, seed=0):
    """One input set: ``x`` [1, d], the norm weight and the three weights (``dtype``
    default ``float16``)."""
    import mlx.core as mx

    from mlx_foundry.ops.weights import Weight

    dtype = dtype or mx.float16
    keys = mx.random.split(mx.random.key(seed), 5)

    def weight(n, k, key):
        w = (mx.random.normal((n, k), key=key) * k ** -0.5).astype(dtype)
        return Weight(*mx.quantize(w, group_size=group_size, bits=bits),
                      group_size=group_size, bits=bits)

    x = mx.random.normal((1, d), key=keys[0]).astype(dtype)
    g = (1 + 0.1 * mx.random.normal((d,), key=keys[1])).astype(dtype)
    return x, g, weight(inter, d, keys[2]), weight(inter, d, keys[3]), weight(d, inter, keys[4])


class Phase:
    """One recorded launch, taken apart: its generated CUDA body and header, its kernel
    inputs (names and arrays, in the kernel's order), its output and its grid in
    threadgroups."""

    def __init__(self, program, args, kwargs):
        bound, given = program.bind(*args, **kwargs)
        consts = program._constants(bound, given)
        full = bound.with_constants(consts)
        outs = [o.resolve(full) for o in program.outputs]
        if len(outs) != 1:
            raise RuntimeError(f"{program.name}: expected one output, got {len(outs)}")
        self.out_name = program.outputs[0].name
        self.out_shape, self.out_dtype = outs[0]
        src = program.render("cuda", consts, bound, (self.out_dtype,))
        self.header, self.body, self.name = src.header, src.body, src.name
        self.input_names = [d.input_name for d in program.inputs]
        self.inputs = program._kernel_inputs(bound)
        grid, tg = program.dispatch_config(full).mlx_launch("cuda")
        self.groups = tuple(g // t for g, t in zip(grid, tg))
        self.threads = tg[0] * tg[1] * tg[2]
        if ATTR_TG_POS not in self.body:
            raise RuntimeError(f"{program.name}: its body does not read its threadgroup's "
                               "position as the tool expects")


def persistent_source(p1, p2, x_name="x"):
    """The persistent kernel's body and header for phases ``p1`` (its output becomes the
    kernel output ``h``) and ``p2`` (its input ``x_name`` reads ``h`` when both phases
    run, else the input ``p2_<x_name>``; its output is the kernel output ``y``). The
    kernel's inputs are the phases' inputs renamed ``p1_<name>`` / ``p2_<name>``, then
    ``sync`` (the barrier's counters, which the kernel writes); its outputs ``h`` and
    ``y``. Template constant ``PHASE``: 1, 2, or 3 for both with the barrier between."""
    if p1.threads != p2.threads:
        raise ValueError(f"the phases' threadgroups differ: {p1.threads} and {p2.threads}")
    if x_name not in p2.input_names:
        raise ValueError(f"phase 2 has no input {x_name!r}: {p2.input_names}")
    header = (_strip_launch_bounds(p1.header)
              + "\n" + grid_barrier.header() + GRID_SYNC)
    return _body(p1, p2, x_name), header


def _strip_launch_bounds(header):
    """The header without the ``#define custom_kernel_<name>(...)`` line that bounds the
    recorded kernel (the persistent kernel takes its own bound)."""
    return re.sub(r"(?m)^#define custom_kernel_\w+\(\.\.\.\).*$\n?", "", header)


def _loop(phase, tag, aliases):
    """Phase ``tag``'s body in a loop over the threadgroups of its launch, its names
    bound to the kernel's by ``aliases`` (name, expression)."""
    gx, gy, gz = phase.groups
    body = phase.body.replace(
        ATTR_TG_POS, f"uint3(vb % {gx}u, (vb / {gx}u) % {gy}u, vb / {gx * gy}u)")
    lines = "".join(f"      auto {name} = {target};\n" for name, target in aliases)
    return (f"  if (PHASE & {tag}) {{\n"
            f"    for (uint vb = blockIdx.x; vb < {gx * gy * gz}u; vb += gridDim.x) {{\n"
            f"{lines}"
            f"      {{\n{body}\n      }}\n"
            f"      __syncthreads();  // the next iteration reuses threadgroup memory\n"
            f"    }}\n  }}\n")


def _body(p1, p2, x_name):
    a1 = [(n, f"p1_{n}") for n in p1.input_names] + [(p1.out_name, "h")]
    x2 = f"p2_{x_name}"
    a2 = [(n, f"(PHASE == 3 ? static_cast<decltype({x2})>(h) : {x2})" if n == x_name
           else f"p2_{n}") for n in p2.input_names] + [(p2.out_name, "y")]
    return (_loop(p1, 1, a1)
            + "  if (PHASE == 3) {\n    persistent_mlp_grid_sync(sync);\n  }\n"
            + _loop(p2, 2, a2))


def kernel_inputs(p1, p2):
    """The persistent kernel's input names, in order (the barrier's counters last)."""
    return ([f"p1_{n}" for n in p1.input_names] + [f"p2_{n}" for n in p2.input_names]
            + ["sync"])


def build_kernel(p1, p2, x_name="x", name="persistent_mlp", per_sm=None):
    """The ``mx.fast.cuda_kernel`` object (its header installed as a file, as the
    package installs its own, so that MLX does not hash 33 KB of header per call)."""
    import mlx.core as mx

    from mlx_foundry.backends import cuda as cuda_backend
    from mlx_foundry.cache import content_hash

    body, header = persistent_source(p1, p2, x_name)
    kname = f"{name}_{content_hash(header + body + str(per_sm))}"
    # MLX names the kernel of template PHASE=n "custom_kernel_<name>_n"
    # (custom_kernel.cpp, template_arguments_hash): one bound for each.
    header += "".join(cuda_backend.launch_attribute_lines(
        f"{kname}_{phase}", ("launch_bounds", p1.threads, per_sm or MIN_BLOCKS))
        for phase in (1, 2, 3))
    line = cuda_backend._install(f"kernels/{kname}.cuh", header)
    return mx.fast.cuda_kernel(
        name=kname, input_names=kernel_inputs(p1, p2),
        output_names=["h", "y"], source=body, header=line or header)


MIN_BLOCKS = 4
"""Threadgroups per SM the kernel is compiled for by default (``__launch_bounds__(128,
4)``: at most 128 registers, as the ops' gate/up kernel is bounded), so 4 x SMs fit.
nvcc 13.0 for sm_90 (here, no GPU): 128 registers; phase 1 spills nothing, phase 2 alone
8 bytes, both 24 bytes (``--per-sm 3`` allows 168 registers)."""


def launch(kern, p1, p2, blocks, phase, in1, in2, sync):
    """One launch of the persistent kernel: ``(h, y)``; ``in1`` / ``in2`` the phases'
    inputs in their kernels' order (with ``PHASE`` 3 phase 2's ``x`` is unread: it reads
    ``h``), ``sync`` the barrier's counters (``SYNC_WORDS`` uint32 zeros, kept from
    call to call: the kernel leaves them zero, but for a sticky time-out flag)."""
    h, y = kern(inputs=list(in1) + list(in2) + [sync], template=[("PHASE", phase)],
                grid=(blocks * p1.threads, 1, 1), threadgroup=(p1.threads, 1, 1),
                output_shapes=[p1.out_shape, p2.out_shape],
                output_dtypes=[p1.out_dtype, p2.out_dtype])
    return h, y


class Variants:
    """The three ways to run one MLP block on input set ``s`` and activation ``x``:
    ``run(name, s, x) -> (h, y)``; ``timed_out()``: whether the barrier ever gave up."""

    def __init__(self, sets, blocks, per_sm=None, x_name="x", residual_name="residual"):
        import mlx.core as mx

        from mlx_foundry import ops

        self.ops, self.sets, self.blocks = ops, sets, blocks
        self.phases = [record_phases(*s) for s in sets]  # each with its set's inputs
        p1, p2 = self.phases[0]
        self.kern = build_kernel(p1, p2, x_name, per_sm=per_sm)
        self.ix1 = p1.input_names.index(x_name)         # phase 1 reads x
        self.ix2 = p2.input_names.index(x_name)         # phase 2 reads h there
        self.ir2 = p2.input_names.index(residual_name)  # and adds x there
        self.mx = mx
        self.sync = mx.zeros((SYNC_WORDS,), mx.uint32)  # made on the GPU: device memory
        mx.eval(self.sync)

    def timed_out(self):
        """Whether a barrier gave up waiting (the kernel's sticky flag; evaluates)."""
        return bool(int(self.sync[2].item()))

    def _inputs(self, s, x, h=None):
        p1, p2 = self.phases[s]
        in1, in2 = list(p1.inputs), list(p2.inputs)
        in1[self.ix1] = x
        in2[self.ir2] = x
        in2[self.ix2] = h if h is not None else x  # unread with PHASE 3 (it reads h)
        return p1, p2, in1, in2

    def run(self, name, s, x):
        _, g, gate, up, down = self.sets[s]
        if name == "mlx":  # the bench's baseline for the block: MLX's own ops, unfused
            mx = self.mx

            def qmm(v, w):
                return mx.quantized_matmul(v, w.weight, w.scales, w.biases, transpose=True,
                                           group_size=w.group_size, bits=w.bits)
            n = mx.fast.rms_norm(x, g, EPS)
            a = qmm(n, gate)
            a = a * mx.sigmoid(a) * qmm(n, up)
            return a, x + qmm(a, down)
        if name == "ops":
            a = self.ops.norm_gate_up_swiglu(x, g, EPS, gate, up, backend="cuda")
            return a, self.ops.linear(a, down, residual=x, backend="cuda")
        p1, p2, in1, in2 = self._inputs(s, x)
        if name == "barrier":
            return launch(self.kern, p1, p2, self.blocks, 3, in1, in2, self.sync)
        if name == "two-p":
            h, _ = launch(self.kern, p1, p2, self.blocks, 1, in1, in2, self.sync)
            _, _, in1, in2 = self._inputs(s, x, h)
            _, y = launch(self.kern, p1, p2, self.blocks, 2, in1, in2, self.sync)
            return h, y
        raise ValueError(f"unknown variant {name!r}")


VARIANTS = ("mlx", "ops", "two-p", "barrier")

MLX_TOLERANCE = 1e-2
"""How far MLX's unfused ops may lie from the ops (relative to the norm of ``y``): fp16
intermediates against float accumulators. A check that the baseline computes the same
block, not a test of the ops (``tests/test_gpu_linear.py`` is)."""


def check(variants):
    """The persistent kernel's ``h`` and ``y`` on the first set equal the ops' bit for
    bit (the same code computes every row), and MLX's unfused block's ``y`` lies within
    ``MLX_TOLERANCE`` of them; raises on a difference or a timed-out barrier."""
    import numpy as np

    x = variants.sets[0][0]
    want_h, want_y = variants.run("ops", 0, x)
    for name in VARIANTS:
        if name == "ops":
            continue
        h, y = variants.run(name, 0, x)
        variants.mx.eval(h, y)
        if variants.timed_out():
            raise RuntimeError(f"{name}: the grid barrier timed out (a threadgroup was not "
                               "resident: lower --per-sm)")
        if name == "mlx":
            got, want = np.array(y, dtype=np.float32), np.array(want_y, dtype=np.float32)
            err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)
            if not err <= MLX_TOLERANCE:
                raise RuntimeError(f"mlx: y lies {err:.2e} from the ops' (relative)")
            continue
        for what, got, want in (("h", h, want_h), ("y", y, want_y)):
            if not np.array_equal(np.array(got), np.array(want)):
                raise RuntimeError(f"{name}: {what} differs from the ops'")


def time_rounds(variants, rounds, calls):
    """Median us per chained call of every variant (each call's ``x`` is the previous
    call's output, the sets rotated), round by round; the timing covers evaluation only,
    as the bench's does."""
    import time

    mx = variants.mx
    per = {name: [] for name in VARIANTS}
    for _ in range(rounds):
        for name in VARIANTS:
            x = variants.sets[0][0]
            mx.eval(x)
            for i in range(calls):
                _, x = variants.run(name, i % len(variants.sets), x)
            t0 = time.perf_counter()
            mx.eval(x)
            per[name].append((time.perf_counter() - t0) / calls * 1e6)
        if variants.timed_out():
            raise RuntimeError("a grid barrier timed out while timing")
    return {name: statistics.median(v) for name, v in per.items()}, per


def _dims(text):
    """``--dims``: ``"4096x14336"`` -> ``(4096, 14336)``."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(v.isdigit() and int(v) > 0 for v in parts):
        raise argparse.ArgumentTypeError(f"expected HIDDENxINTERMEDIATE (e.g. 4096x14336), "
                                         f"not {text!r}")
    return int(parts[0]), int(parts[1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", type=_dims, default=(4096, 14336),
                   help="HIDDENxINTERMEDIATE (default: 4096x14336)")
    p.add_argument("--sms", type=grid_barrier.count, default=132, help="SMs of the GPU (H100, H200: 132)")
    p.add_argument("--per-sm", type=grid_barrier.count, default=MIN_BLOCKS,
                   help="threadgroups per SM: the kernel's launch bound, and --sms times "
                        "it the persistent grid")
    grid_barrier.add_timing_arguments(p, calls=50)
    p.add_argument("--dry", action="store_true",
                   help="print the persistent kernel's body and launches, run nothing")
    args = p.parse_args(argv)
    d, inter = args.dims
    if args.per_sm > 16:
        p.error("--per-sm must be at most 16 (threadgroups of 128 threads per SM)")
    blocks = args.sms * args.per_sm
    p1, p2 = record_phases(*make_set(d, inter))
    info = {"phase1": {"name": p1.name, "groups": p1.groups},
            "phase2": {"name": p2.name, "groups": p2.groups}, "blocks": blocks}
    if args.dry:
        body, _ = persistent_source(p1, p2)
        print(body)
        print(json.dumps(info))
        return info

    import mlx.core as mx

    if not mx.cuda.is_available():
        print("persistent_mlp_ab: needs MLX's CUDA back-end (an NVIDIA GPU)", file=sys.stderr)
        return 2
    sets = [make_set(d, inter, seed=seed) for seed in range(args.sets)]
    mx.eval(sets)
    variants = Variants(sets, blocks, per_sm=args.per_sm)
    check(variants)
    medians, per = time_rounds(variants, args.rounds, args.calls)
    grid_barrier.report(medians, per, args, args.json, launches=info)
    return 0


if __name__ == "__main__":
    r = main()
    sys.exit(r if isinstance(r, int) else 0)
