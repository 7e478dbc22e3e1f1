"""tools/grid_barrier.py: the CUDA-only diagnostics' grid barrier text and report."""

import argparse
import json

from tool_loader import load_tool


def test_header_defines_the_spin_bound_before_the_barrier():
    gb = load_tool("grid_barrier")
    text = gb.header(spins=5)
    assert text.startswith("#define GRID_BARRIER_SPINS 5u\n")
    assert "void grid_barrier_arrive_and_wait(unsigned* arrivals," in text
    assert "++spins > GRID_BARRIER_SPINS" in text and "atomicExch(flag, 1u)" in text


def test_report_prints_the_medians_and_writes_them_with_the_rounds(tmp_path, capsys):
    import mlx.core as mx

    gb = load_tool("grid_barrier")
    path = tmp_path / "r.json"
    args = argparse.Namespace(rounds=2, json=str(path))
    gb.report({"a": 1.5, "b": 20.25, "c": 3.0}, {"a": [1.0, 2.0], "b": [20.0, 20.5]}, args,
              str(path), against="c", launches={"a": 3})
    out = capsys.readouterr().out
    assert "median a            1.50 us per chained call" in out
    assert "median b           20.25 us per chained call" in out
    assert "a - c: -1.50 us; b - c: +17.25 us\n" in out
    got = json.loads(path.read_text())
    assert got["median_us"] == {"a": 1.5, "b": 20.25, "c": 3.0}
    assert got["rounds_us"] == {"a": [1.0, 2.0], "b": [20.0, 20.5]}
    assert got["args"] == {"rounds": 2, "json": str(path)} and got["launches"] == {"a": 3}
    assert got["mlx"] == mx.__version__ and got["device"]
    gb.report({"a": 1.0}, {"a": [1.0]}, args, None, against="a")  # no path: prints only
    assert not (tmp_path / "None").exists()


def test_timing_arguments_count_from_one():
    import pytest

    gb = load_tool("grid_barrier")
    p = argparse.ArgumentParser()
    gb.add_timing_arguments(p, calls=9)
    args = p.parse_args([])
    assert (args.sets, args.rounds, args.calls, args.json) == (3, 7, 9, None)
    assert p.parse_args(["--calls", "2", "--json", "j"]).calls == 2
    for bad in (["--sets", "0"], ["--rounds", "x"], ["--calls", "-1"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)


def test_threadgroup_sizes_are_whole_simd_groups_up_to_1024():
    import pytest

    gb = load_tool("grid_barrier")
    assert gb.threadgroup_size("32") == 32 and gb.threadgroup_size("1024") == 1024
    for bad in ("0", "100", "1056", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            gb.threadgroup_size(bad)
