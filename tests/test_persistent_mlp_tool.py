"""tools/persistent_mlp_ab.py: the persistent kernel it assembles from the ops' two
generated bodies (CPU), compiled as MLX builds a custom kernel (nvcc, where present),
and its check and timing rounds with stand-in variants built from plain MLX ops."""

import re

import mlx.core as mx
import numpy as np
import pytest

from tool_loader import load_tool


@pytest.fixture(scope="module")
def tool():
    return load_tool("persistent_mlp_ab")


@pytest.fixture(scope="module")
def phases(tool):
    return tool.record_phases(*tool.make_set(256, 704))


def test_each_phase_loops_over_the_threadgroups_of_its_launch(tool, phases):
    p1, p2 = phases
    body, header = tool.persistent_source(p1, p2)
    # Every read of the threadgroup's position now reads the loop's.
    assert tool.ATTR_TG_POS not in body
    assert body.count("threadgroup_position_in_grid = uint3(vb % ") == 2
    for tag, p in ((1, p1), (2, p2)):
        gx, gy, gz = p.groups
        assert f"if (PHASE & {tag})" in body
        assert f"vb < {gx * gy * gz}u; vb += gridDim.x" in body
    # The barrier sits between the phases, and only with both.
    first, barrier, second = (body.index("PHASE & 1"),
                              body.index("persistent_mlp_grid_sync(sync)"),
                              body.index("PHASE & 2"))
    assert first < barrier < second and "if (PHASE == 3)" in body
    # Phase 1 writes h; phase 2 reads h (both phases) or its own x, and writes y.
    assert f"auto {p1.out_name} = h;" in body and f"auto {p2.out_name} = y;" in body
    assert "auto x = (PHASE == 3 ? static_cast<decltype(p2_x)>(h) : p2_x);" in body
    assert tool.kernel_inputs(p1, p2) == ([f"p1_{n}" for n in p1.input_names]
                                          + [f"p2_{n}" for n in p2.input_names] + ["sync"])
    assert (header.index("#define GRID_BARRIER_SPINS")
            < header.index("void grid_barrier_arrive_and_wait")
            < header.index("void persistent_mlp_grid_sync"))


def test_the_recorded_kernels_bound_is_left_out(tool, phases):
    p1, _ = phases
    # The ops' gate/up kernel is bounded (MINBLOCKS) by a macro naming that kernel.
    assert re.search(r"(?m)^#define custom_kernel_norm_gate_up\w*\(\.\.\.\)", p1.header)
    assert "#define custom_kernel_" not in tool._strip_launch_bounds(p1.header)


def test_dry_run_and_bad_arguments(tool, capsys):
    info = tool.main(["--dry", "--dims", "256x704", "--sms", "2", "--per-sm", "3"])
    assert info["blocks"] == 6
    assert info["phase1"]["name"].startswith("norm_gate_up_swiglu")
    assert info["phase2"]["name"].startswith("linear_affine_4_64_residual")
    assert "persistent_mlp_grid_sync(sync);" in capsys.readouterr().out
    for argv in (["--dims", "4096"], ["--per-sm", "0"], ["--per-sm", "17"], ["--calls", "0"]):
        with pytest.raises(SystemExit):
            tool.main(["--dry", *argv])


@pytest.mark.parametrize("phase", [1, 3])
def test_cuda_text_compiles_as_mlx_builds_it(tool, phases, tmp_path, phase):
    """The whole translation unit MLX 0.32 would compile (``custom_kernel.cpp``), with
    the launch bound the tool adds for that template value: at most 128 registers."""
    import subprocess
    from pathlib import Path

    from nvrtc_like_mlx import nvcc_and_mlx_headers

    from mlx_foundry.backends import cuda as cuda_backend
    from mlx_foundry.inspection import _CUDA_TYPES

    nvcc, inc = nvcc_and_mlx_headers()
    p1, p2 = phases
    body, header = tool.persistent_source(p1, p2)
    header += cuda_backend.launch_attribute_lines(f"k_{phase}", ("launch_bounds", 128, 4))
    arrays = list(p1.inputs) + list(p2.inputs) + [mx.zeros((tool.SYNC_WORDS,), mx.uint32)]
    names = tool.kernel_inputs(p1, p2)
    assert len(names) == len(arrays)
    params = [f"const {_CUDA_TYPES[a.dtype]}* {n}" for n, a in zip(names, arrays)]
    params += [f"{_CUDA_TYPES[p1.out_dtype]}* h", f"{_CUDA_TYPES[p2.out_dtype]}* y"]
    unit = ('#include "mlx/backend/cuda/device/utils.cuh"\n#include <cooperative_groups.h>\n'
            + header + "namespace mlx::core::cu {\nnamespace cg = cooperative_groups;\n"
            + f"__global__ void custom_kernel_k_{phase}({', '.join(params)}) {{\n"
            + f"  constexpr int PHASE = {phase};\n{body}\n}}\n}}\n")
    cu = tmp_path / "k.cu"
    cu.write_text(unit)
    r = subprocess.run([nvcc, "-arch=sm_90", "-std=c++17", "-c", str(cu), "-o",
                        str(tmp_path / "k.o"), "-Xptxas", "-v", f"-I{inc}",
                        f"-I{Path(mx.__file__).resolve().parent / 'include'}"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    regs = [int(m) for m in re.findall(r"Used (\d+) registers", r.stderr)]
    assert regs and max(regs) <= 128, r.stderr[-2000:]


class _Fake:
    """Variants built from plain MLX ops: ``y = x + s`` for every variant, the barrier's
    off by ``wrong``, and a barrier that timed out when ``flag``."""

    def __init__(self, wrong=0.0, flag=False, mlx_off=0.0):
        self.mx = mx
        self.sets = [(mx.arange(4, dtype=mx.float32),), (mx.ones((4,)),)]
        self.wrong, self.flag, self.mlx_off = wrong, flag, mlx_off
        self.seen = []

    def timed_out(self):
        return self.flag

    def run(self, name, s, x):
        self.seen.append((name, s, np.array(x)))
        y = x + s + (self.wrong if name == "barrier" else 0.0)
        if name == "mlx":
            y = y * (1 + self.mlx_off)
        return y * 2, y


def test_check_refuses_a_difference_and_a_timed_out_barrier(tool):
    tool.check(_Fake())  # passes: every variant equals the ops
    tool.check(_Fake(mlx_off=0.5 * tool.MLX_TOLERANCE))  # MLX's block: within tolerance
    with pytest.raises(RuntimeError, match="mlx: y lies"):
        tool.check(_Fake(mlx_off=2 * tool.MLX_TOLERANCE))
    with pytest.raises(RuntimeError, match="barrier: h differs"):
        tool.check(_Fake(wrong=1e-3))
    with pytest.raises(RuntimeError, match="the grid barrier timed out"):
        tool.check(_Fake(flag=True))


def test_rounds_time_every_variant_and_chain_the_calls(tool):
    medians, per = tool.time_rounds(_Fake(), rounds=3, calls=4)
    assert set(medians) == set(tool.VARIANTS) and all(len(v) == 3 for v in per.values())
    assert all(m > 0 for m in medians.values())
    with pytest.raises(RuntimeError, match="timed out while timing"):
        tool.time_rounds(_Fake(flag=True), rounds=1, calls=2)
    # Chained: each call gets the previous call's output, the sets in turn, and every
    # timing starts again from the first set's x.
    fake = _Fake()
    tool.time_rounds(fake, rounds=2, calls=3)
    ops_calls = [(s, x) for name, s, x in fake.seen if name == "ops"]
    assert [s for s, _ in ops_calls] == [0, 1, 0] * 2
    want = [np.arange(4), np.arange(4), np.arange(4) + 1] * 2
    assert all(np.array_equal(x, w) for (_, x), w in zip(ops_calls, want))
