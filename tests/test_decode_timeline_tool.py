"""tools/decode_timeline.py: the figures it draws from a kernel timeline, its Chrome-trace
reader and its arguments (CPU; recording a timeline needs the GPU and torch)."""

import json

import pytest

from tool_loader import load_tool


@pytest.fixture(scope="module")
def tool():
    return load_tool("decode_timeline")


# A [0, 10], then B [12, 20] and C [15, 25] overlapping, then D [40, 45]; given unsorted.
KERNELS = [("C", 15.0, 10.0), ("A", 0.0, 10.0), ("D", 40.0, 5.0), ("B", 12.0, 8.0)]


def test_busy_idle_and_overlap(tool):
    r = tool.analyze(KERNELS, tokens=1)
    assert r["kernels"] == 4
    assert r["span_us"] == pytest.approx(45.0)
    assert r["busy_us"] == pytest.approx(10.0 + 13.0 + 5.0)
    assert r["idle_us"] == pytest.approx(17.0)
    assert r["kernel_sum_us"] == pytest.approx(33.0)
    assert r["overlap_us"] == pytest.approx(5.0)


def test_gaps_name_the_kernels_around_them(tool):
    r = tool.analyze(KERNELS, tokens=1)
    assert [(g["gap_us"], g["after"], g["before"]) for g in r["largest_gaps"]] == [
        (15.0, "C", "D"), (2.0, "A", "B")]
    assert r["gaps"]["under 2 us"] == {"count": 0, "sum_us": 0.0}
    assert r["gaps"]["2-10 us"] == {"count": 1, "sum_us": 2.0}
    assert r["gaps"]["over 10 us"] == {"count": 1, "sum_us": 15.0}


def test_a_kernel_inside_another_does_not_end_the_interval(tool):
    # E [0, 20] holds F [5, 8]; G starts at 21: the gap follows E, which ends last.
    r = tool.analyze([("E", 0.0, 20.0), ("F", 5.0, 3.0), ("G", 21.0, 1.0)], tokens=1)
    assert r["busy_us"] == pytest.approx(21.0)
    assert [(g["after"], g["before"]) for g in r["largest_gaps"]] == [("E", "G")]


def test_per_token_and_by_name(tool):
    r = tool.analyze(KERNELS + [("A", 50.0, 10.0)], tokens=2)
    assert r["per_token"]["kernels"] == pytest.approx(2.5)
    assert r["per_token"]["busy_us"] == pytest.approx(38.0 / 2)
    first = r["by_name"][0]
    assert (first["name"], first["count"], first["sum_us"], first["mean_us"]) == (
        "A", 2, 20.0, 10.0)


@pytest.mark.parametrize("kernels, tokens", [(KERNELS, 0), ([], 1)])
def test_bad_input_is_refused(tool, kernels, tokens):
    with pytest.raises(ValueError, match="decode_timeline.analyze"):
        tool.analyze(kernels, tokens=tokens)


def test_trace_reader_keeps_gpu_kernels_only(tool, tmp_path):
    trace = {"traceEvents": [
        {"ph": "X", "cat": "kernel", "name": "k1", "ts": 5.5, "dur": 2.0},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 1.0, "dur": 3.0},
        {"ph": "X", "cat": "gpu_memset", "name": "Memset", "ts": 9.0, "dur": 1.0},
        {"ph": "i", "cat": "kernel", "name": "marker", "ts": 2.0},
        {"ph": "X", "cat": "kernel", "name": "k2", "ts": 10.0, "dur": 4.0}]}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(trace))
    assert tool.kernels_of_trace(str(path)) == [("k1", 5.5, 2.0), ("k2", 10.0, 4.0)]


@pytest.mark.parametrize("argv", [["--tokens", "0"], ["--tokens", "x"],
                                  ["--variants", "patched"]])
def test_bad_arguments_are_refused(tool, argv):
    with pytest.raises(SystemExit):
        tool.main(argv)
