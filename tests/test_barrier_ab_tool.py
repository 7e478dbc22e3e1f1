"""tools/barrier_ab.py: its launches and arguments, its NumPy oracle against a loop that
follows the kernels line by line (CPU), and its CUDA text compiled as MLX builds a
custom kernel (nvcc, where present)."""

import numpy as np
import pytest

from tool_loader import load_tool


@pytest.fixture(scope="module")
def tool():
    return load_tool("barrier_ab")


def test_dry_run_lists_the_launches(tool, capsys):
    launches = tool.main(["--dry", "--a-mb", "1", "--b-mb", "2", "--blocks", "8"])
    assert launches == {"two": (64, 128), "two-p": (8, 8), "barrier": (8, 8), "one": (8, 8),
                        "barrier-pf": (8, 8)}
    assert "barrier-pf" not in tool.main(["--dry", "--prefetch", "0"])
    out = capsys.readouterr().out
    assert "barrier_ab_grid_sync(counter, flag)" in out
    assert "two: threadgroups 64 (A), 128 (B) of 256 threads" in out


@pytest.mark.parametrize("argv", [["--threads", "100"], ["--full-threads", "2048"],
                                  ["--blocks", "0"], ["--a-mb", "0"], ["--calls", "0"],
                                  ["--prefetch", "-1"], ["--prefetch", "9"]])
def test_bad_arguments_are_refused(tool, argv):
    with pytest.raises(SystemExit):
        tool.main(["--dry", *argv])


def _emulated(a, b, dep, blocks, threads, kind):
    """The kernels' sums, thread by thread, as the CUDA text computes them."""
    def read(x, n_blocks, add, add_at):
        v = np.asarray(x, dtype=np.uint64).reshape(-1, 4)
        stride = n_blocks * threads
        acc = [0] * stride
        for first in range(stride):
            for i in range(first, len(v), stride):
                acc[first] = (acc[first] + int(v[i].sum())) % 2**32
        acc[add_at] = (acc[add_at] + add) % 2**32
        return np.array([sum(acc[w * 32:(w + 1) * 32]) % 2**32
                         for w in range(stride // 32)], dtype=np.uint32)

    sa = read(a, blocks[0], dep, 0)
    add, at = {"two": (int(sa[0]), 0), "barrier": (int(sa[0]), (blocks[1] - 1) * threads),
               "one": (0, 0)}[kind]
    return sa, read(b, blocks[1], add, at)


@pytest.mark.parametrize("kind,blocks", [("two", (3, 5)), ("barrier", (2, 2)),
                                         ("one", (2, 2)), ("barrier", (1, 1))])
def test_reference_follows_the_kernels(tool, kind, blocks):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2**32, size=4 * 300, dtype=np.uint64).astype(np.uint32)
    b = rng.integers(0, 2**32, size=4 * 777, dtype=np.uint64).astype(np.uint32)
    got = tool.reference(a, b, 2**32 - 7, blocks, 64, kind)
    want = _emulated(a, b, 2**32 - 7, blocks, 64, kind)
    for g, w in zip(got, want):
        assert g.dtype == np.uint32 and np.array_equal(g, w)


@pytest.mark.parametrize("body,inputs,outputs,barrier", [
    ("READ_AFTER", ["x", "dep", "n_vec"], ["sums"], None),
    ("FUSED", ["a", "b", "dep", "n_vec"], ["sums", "sync"], (True, 0)),
    ("FUSED", ["a", "b", "dep", "n_vec"], ["sums", "sync"], (False, 0)),
    ("FUSED", ["a", "b", "dep", "n_vec"], ["sums", "sync"], (True, 4)),
    ("TRACED", ["a", "b", "dep", "n_vec"], ["sums", "sync", "trace:uint64_t", "smid"], None),
])
def test_cuda_text_compiles_as_mlx_builds_it(tool, tmp_path, body, inputs, outputs, barrier):
    """MLX 0.32's custom_kernel.cpp: its includes, the header, the kernel in
    mlx::core::cu with inputs const, outputs writable, template constants as constexpr
    at the top of the body (as mlx_foundry.inspection.cuda_source_of writes it)."""
    import subprocess
    from pathlib import Path

    import mlx.core as mx
    from nvrtc_like_mlx import nvcc_and_mlx_headers

    nvcc, inc = nvcc_and_mlx_headers()
    params = [f"const uint32_t* {n}" for n in inputs]
    for out in outputs:  # "name" or "name:type" (uint32_t by default)
        name, _, typ = out.partition(":")
        params.append(f"{typ or 'uint32_t'}* {name}")
    consts = "" if barrier is None else (
        f"  constexpr bool BARRIER = {str(barrier[0]).lower()};\n"
        f"  constexpr int PREFETCH = {barrier[1]};\n")
    unit = ('#include "mlx/backend/cuda/device/utils.cuh"\n#include <cooperative_groups.h>\n'
            + tool.full_header()
            + "namespace mlx::core::cu {\nnamespace cg = cooperative_groups;\n"
            + f"__global__ void custom_kernel_k({', '.join(params)}) {{\n{consts}"
            + getattr(tool, body) + "\n}\n}\n")
    cu = tmp_path / "k.cu"
    cu.write_text(unit)
    r = subprocess.run([nvcc, "-arch=sm_90", "-std=c++17", "-c", str(cu), "-o",
                        str(tmp_path / "k.o"), f"-I{inc}",
                        f"-I{Path(mx.__file__).resolve().parent / 'include'}"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]


def _fake_runs(flag_value):
    """Runs built from plain MLX ops (no CUDA): the tool's orchestration on the CPU."""
    import mlx.core as mx

    def two(a, b, dep):
        return a[:2] + dep, b[:2] + dep, None

    def barrier(a, b, dep):
        return a[:2], b[:2] + dep, mx.array([flag_value], mx.uint32)

    return {"two": (two, (1, 1), "two", 32), "barrier": (barrier, (1, 1), "barrier", 32)}


def test_rounds_time_every_variant_and_report_a_timed_out_barrier(tool):
    import mlx.core as mx

    pool = [(mx.arange(8, dtype=mx.uint32), mx.arange(8, dtype=mx.uint32) * 3)] * 2
    medians, per = tool.time_rounds(_fake_runs(0), pool, rounds=3, calls=5)
    assert set(medians) == {"two", "barrier"} and all(len(v) == 3 for v in per.values())
    assert all(m > 0 for m in medians.values())
    with pytest.raises(RuntimeError, match="grid barrier timed out"):
        tool.time_rounds(_fake_runs(1), pool, rounds=1, calls=2)


def test_check_refuses_wrong_sums_and_a_timed_out_barrier(tool):
    import mlx.core as mx

    a = mx.arange(4 * 64, dtype=mx.uint32)
    b = mx.arange(4 * 96, dtype=mx.uint32)
    want_a, want_b = tool.reference(np.array(a), np.array(b), 12345, (1, 1), 32, "barrier")

    def right(a, b, dep, flag=0):
        return mx.array(want_a), mx.array(want_b), mx.array([flag], mx.uint32)

    tool.check({"barrier": (right, (1, 1), "barrier", 32)}, a, b)  # passes
    with pytest.raises(RuntimeError, match="timed out"):
        tool.check({"barrier": (lambda *x: right(*x, flag=1), (1, 1), "barrier", 32)}, a, b)
    with pytest.raises(RuntimeError, match="differ from NumPy"):
        tool.check({"barrier": (lambda *x: (mx.array(want_a), mx.array(want_a), None),
                                (1, 1), "barrier", 32)}, a, b)


def test_barrier_output_stays_out_of_the_scalar_pool(tool):
    """The counter the threadgroups poll lives in an output over 8 bytes: MLX's CUDA
    allocator puts smaller arrays in managed memory behind the host link, where the
    barrier took ~4 us per threadgroup (H100). The fused runner's launch, recorded."""
    import argparse

    import mlx.core as mx

    calls = []

    def fused(**kw):
        calls.append(kw)
        return [mx.zeros(s, d) for s, d in zip(kw["output_shapes"], kw["output_dtypes"])]

    args = argparse.Namespace(threads=64, full_threads=64, chunk=1, blocks=2, prefetch=2)
    runs = tool.runners(None, fused, args, 4 * 64, 4 * 96)
    for name in ("barrier", "barrier-pf", "one"):
        run = runs[name][0]
        _, _, flag = run(mx.zeros((256,), mx.uint32), mx.zeros((384,), mx.uint32),
                         mx.zeros((1,), mx.uint32))
        sync_shape, sync_dtype = calls[-1]["output_shapes"][1], calls[-1]["output_dtypes"][1]
        assert int(np.prod(sync_shape)) * sync_dtype.size > 8, (name, sync_shape)
        assert calls[-1]["init_value"] == 0 and flag.shape == (1,)


def test_trace_row_reads_the_clock_from_the_first_start(tool):
    """The GPU clock's stamps as times from the earliest start (uint64 ns, as the traced
    kernel writes them), and the SMs counted once each."""
    base = 2**40  # the clock's absolute value: large, only differences matter
    stamps = np.array([[base + 500, base + 3_500, base + 20_000, base + 60_000],
                       [base + 200, base + 18_700, base + 20_300, base + 57_000],
                       [base + 300, base + 9_000, base + 20_100, base + 61_300]], np.uint64)
    row = tool.trace_row(stamps, np.array([7, 7, 90], np.uint32), 0)
    assert row == {"last_start": 0.3, "first_arrival": 3.3, "last_arrival": 18.5,
                   "first_release": 19.8, "last_release": 20.1, "last_end": 61.1,
                   "sms": 2, "timed_out": 0}
