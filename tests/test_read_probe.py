"""The bench's plain read: the read-probe kernel, its reference and its place in a run."""

import re

import mlx.core as mx
import numpy as np
import pytest

from mlx_foundry.bench import Context, cases, report, run_case, timing
from mlx_foundry.bench.read_probe import (SIMDGROUPS, chunk_words, groups_for, probe_words,
                                          read_probe, reference_sums)

# Awkward sizes: one 16-byte word, one short of a SIMD-group's chunk, a chunk and a
# word, not a multiple of a threadgroup's eight chunks, and ~33 MB (a decode GEMV).
CHUNK = chunk_words()
WORD_COUNTS = [4, CHUNK - 4, CHUNK + 4, 8 * CHUNK * 3 + 132, 4 * 2_064_388]
# (iters, simdgroups, groups): other chunks, threadgroups of 4 and 16, and persistent
# grids where each SIMD-group loops over several chunks (the last round partial).
LAUNCHES = [(1, 8, None), (16, 4, None), (4, 16, 32), (8, 8, 64), (32, 2, 6)]


def _words(n, seed):
    """``n`` random 32-bit words, large enough that their sums wrap around 2**32."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 2**32, size=n, dtype=np.uint64).astype(np.uint32)


def _numpy_sums(words, iters=8, groups=None):
    """The expected output, from NumPy alone: SIMD-group g sums chunks g, g + groups, ...
    (of iters x 128 words), modulo 2**32."""
    size = iters * 128
    chunks = -(-words.size // size)
    groups = groups or SIMDGROUPS * -(-chunks // SIMDGROUPS)
    sums = np.zeros(groups, dtype=np.uint64)
    for c in range(chunks):
        sums[c % groups] += words[c * size:(c + 1) * size].astype(np.uint64).sum()
    return (sums % 2**32).astype(np.uint32)


@pytest.mark.parametrize("n", WORD_COUNTS[:4])
def test_reference_sums_match_numpy(n):
    words = _words(n, n)
    want = _numpy_sums(words)
    np.testing.assert_array_equal(np.array(reference_sums(mx.array(words))), want)
    got = read_probe(mx.array(words), backend="reference")
    assert got.dtype == mx.uint32 and got.shape == (groups_for(n),)
    np.testing.assert_array_equal(np.array(got), want)


@pytest.mark.parametrize("launch", LAUNCHES)
def test_launch_shapes_match_numpy(launch):
    iters, simdgroups, groups = launch
    words = _words(3 * chunk_words(iters) * 8 + 36, iters)
    got = read_probe(mx.array(words), iters=iters, simdgroups=simdgroups, groups=groups,
                     backend="reference")
    np.testing.assert_array_equal(np.array(got), _numpy_sums(words, iters, groups or
                                                             groups_for(words.size, iters,
                                                                        simdgroups)))


def test_groups_fill_whole_threadgroups():
    assert groups_for(4, simdgroups=8) == 8
    assert groups_for(8 * CHUNK, simdgroups=8) == 8
    assert groups_for(8 * CHUNK + 4, simdgroups=8) == 16
    assert groups_for(8 * CHUNK + 4, iters=16, simdgroups=4) == 8
    assert groups_for(4) == SIMDGROUPS
    assert probe_words(1) == 4 and probe_words(16) == 4 and probe_words(17) == 8


@pytest.mark.parametrize("bad, err, match", [
    (np.arange(8, dtype=np.float32), ValueError, "'x' must have dtype uint32 but got float32."),
    (np.zeros((2, 4), dtype=np.uint32), ValueError, "'x' must be 1-D"),
    (np.zeros(6, dtype=np.uint32), ValueError, "multiple of 4 words"),
    (np.zeros(0, dtype=np.uint32), ValueError, "multiple of 4 words"),
])
def test_bad_input_names_the_argument(bad, err, match):
    with pytest.raises(err, match=re.escape(match)):
        read_probe(mx.array(bad), backend="reference")


@pytest.mark.parametrize("kw, err, match", [
    ({"iters": 0}, ValueError, "'iters' must be in [1, 64]"),
    ({"iters": 2.0}, TypeError, "'iters' must be an int"),
    ({"simdgroups": 33}, ValueError, "'simdgroups' must be in [1, 32]"),
    ({"groups": 12, "simdgroups": 8}, ValueError,
     "'groups' (12) must be a multiple of 'simdgroups' (8)"),
    ({"groups": 0}, ValueError, "'groups' must be in"),
    ({"groups": 8.0}, TypeError, "'groups' must be an int"),
])
def test_bad_launch_names_the_argument(kw, err, match):
    with pytest.raises(err, match=re.escape(match)):
        read_probe(mx.zeros((64,), mx.uint32), backend="reference", **kw)


def test_launches_of_one_shape_differ_by_groups(monkeypatch):
    """The grid and the output's size follow ``groups`` from call to call with the same
    ``x``, ``iters`` and ``simdgroups`` (the GPU path's launch plans, on the CPU: the
    fake backend runs the reference with the plan's output shapes)."""
    from fake_gpu import fake_gpu

    record = fake_gpu(monkeypatch)
    words = _words(6 * CHUNK + 8, 5)
    x = mx.array(words)
    for groups in (None, 4, 12, 64, 4):
        got = read_probe(x, groups=groups, backend="cuda")
        want = _numpy_sums(words, 8, groups)
        np.testing.assert_array_equal(np.array(got), want)
    assert record.total() == 5


def test_too_many_groups_names_them():
    with pytest.raises(ValueError, match=re.escape("'groups' must be in [1, 16777216]")):
        read_probe(mx.zeros((8,), mx.uint32), groups=1 << 25, backend="reference")
    with pytest.raises(ValueError, match="use fewer 'groups'"):
        read_probe(mx.zeros((8,), mx.uint32), iters=64, groups=1 << 24, simdgroups=1,
                   backend="reference")


def test_not_an_array_is_a_type_error():
    with pytest.raises(TypeError, match="'x' must be an mlx.core.array"):
        read_probe([1, 2, 3, 4], backend="reference")


def test_cuda_unit_reads_sixteen_bytes_per_load(tmp_path):
    """The CUDA unit MLX would build keeps every load of the probe 16 bytes wide
    (``ld.global.v4``, eight per lane: the unrolled loop), with no scalar global load."""
    from mlx_foundry.bench.read_probe import _kernel
    from nvrtc_like_mlx import nvcc_compile

    ptx = tmp_path / "probe.ptx"
    nvcc_compile(_kernel(), ptx, "-ptx", mx.zeros((4 * 4096,), mx.uint32), n_vec=4096,
                 SIMDGROUPS=4, GROUPS=128)
    text = ptx.read_text()
    wide = re.findall(r"ld\.global(?:\.nc)?\.v4\.(?:u32|b32)", text)
    # The scalar n_vec is one 4-byte global load; everything else is wide.
    narrow = re.findall(r"ld\.global(?:\.nc)?\.(?:u32|b32)\b", text)
    assert len(wide) == 8 and len(narrow) <= 1, (wide, narrow)


def test_plain_read_in_a_bench_case():
    """Each measured case carries the time of a plain read of its bytes, once per size."""
    ctx = Context("reference", quick=True, tiny=True)
    case = next(c for c in cases.suite(tiny=True) if c.name.startswith("linear_q4"))
    res = run_case(case, ctx, copy_gbps=1.0)
    assert res["status"] == "ok", res
    read = ctx.plain_read(case.nbytes)
    assert res["read_us"] == read["us"] > 0
    assert read["bytes"] == probe_words(case.nbytes) * 4 >= case.nbytes
    assert ctx.plain_read(case.nbytes) is read             # measured once per size


def test_plain_read_failure_is_noted_not_fatal(monkeypatch):
    ctx = Context("reference", quick=True, tiny=True)
    case = next(c for c in cases.suite(tiny=True) if c.name.startswith("rms_norm"))

    def broken(*a, **k):
        raise RuntimeError("probe failed")

    monkeypatch.setattr(timing, "plain_read", broken)
    res = run_case(case, ctx, copy_gbps=1.0)
    assert res["status"] == "ok" and res["ours_us"] > 0
    assert "read_us" not in res and "probe failed" in res["read_error"]
    assert "plain read failed: RuntimeError: probe failed" in report.format_table(
        {"cases": [res]})
    # Once per size: the next case of that size gets the same failure, not a new try.
    calls = []
    monkeypatch.setattr(timing, "plain_read", lambda *a, **k: calls.append(1))
    assert "probe failed" in run_case(case, ctx, copy_gbps=1.0)["read_error"] and not calls


@pytest.mark.gpu
@pytest.mark.parametrize("n", WORD_COUNTS)
def test_read_probe_gpu(gpu_backend, n):
    words = _words(n, n + 1)
    got = read_probe(mx.array(words), backend=gpu_backend)
    np.testing.assert_array_equal(np.array(got), _numpy_sums(words))


@pytest.mark.gpu
@pytest.mark.parametrize("launch", LAUNCHES)
def test_read_probe_gpu_launch_shapes(gpu_backend, launch):
    iters, simdgroups, groups = launch
    words = _words(5 * chunk_words(iters) * 8 + 20, 3 * iters)
    got = read_probe(mx.array(words), iters=iters, simdgroups=simdgroups, groups=groups,
                     backend=gpu_backend)
    want = _numpy_sums(words, iters, groups or groups_for(words.size, iters, simdgroups))
    np.testing.assert_array_equal(np.array(got), want)


@pytest.mark.gpu
def test_read_probe_gpu_groups_from_call_to_call(gpu_backend):
    """One x, iters and simdgroups, several grids in turn: each launch has its own."""
    words = _words(100 * CHUNK + 12, 11)
    x = mx.array(words)
    for groups in (None, 32, 64, 8, None, 32):
        got = read_probe(x, groups=groups, backend=gpu_backend)
        np.testing.assert_array_equal(np.array(got), _numpy_sums(words, 8, groups))


@pytest.mark.gpu
def test_read_probe_gpu_view_is_read_as_its_values(gpu_backend):
    """A strided view is made contiguous first (MLX copies it), then summed."""
    words = _words(2 * 4100, 7)
    view = mx.array(words)[::2]
    got = read_probe(view, backend=gpu_backend)
    np.testing.assert_array_equal(np.array(got), _numpy_sums(words[::2]))
