"""tools/calls_sweep.py: the line it fits, and a run on the reference backend (CPU)."""

import json

import pytest
from tool_loader import load_tool


@pytest.fixture(scope="module")
def tool():
    return load_tool("calls_sweep")


def test_fit_line_recovers_fixed_and_per_call_parts(tool):
    counts = [25, 50, 100, 200, 400]
    totals = [170e-6 + n * 11.5e-6 for n in counts]
    fixed, per_call = tool.fit_line(counts, totals)
    assert fixed == pytest.approx(170e-6, rel=1e-9)
    assert per_call == pytest.approx(11.5e-6, rel=1e-9)
    # Least squares: a point off the line moves both parts by the known amounts.
    fixed, per_call = tool.fit_line([1, 2, 3], [1.0, 2.0, 4.0])
    assert per_call == pytest.approx(1.5) and fixed == pytest.approx(-2 / 3)


def test_fit_line_needs_two_counts(tool):
    with pytest.raises(ValueError, match="two or more distinct counts"):
        tool.fit_line([200, 200], [1.0, 1.1])
    with pytest.raises(ValueError, match="two or more distinct counts"):
        tool.fit_line([100, 200], [1.0])


def test_tiny_run_times_every_function_at_every_count(tool, tmp_path):
    out = tmp_path / "sweep.json"
    results = tool.main(["--tiny", "--backend", "reference", "--only", "rms_norm_24x320",
                         "--counts", "2", "4", "--rounds", "1", "--repeats", "1",
                         "--json", str(out)])
    assert [r["case"] for r in results] == ["rms_norm_24x320"]  # a full name picks one case
    saved = json.loads(out.read_text())
    assert saved["backend"] == "reference" and saved["results"][0]["counts"] == [2, 4]
    for fn in ("baseline", "ours", "read"):
        v = saved["results"][0]["fns"][fn]
        assert set(v["per_call_us"]) == {"2", "4"}
        assert all(t > 0 for t in v["per_call_us"].values())
        assert len(v["samples_s"]["4"]) == 1
    r = saved["results"][0]
    assert r["speedup_at"]["2"] == pytest.approx(
        r["fns"]["baseline"]["per_call_us"]["2"] / r["fns"]["ours"]["per_call_us"]["2"])


def test_no_matching_case_is_an_error(tool):
    with pytest.raises(SystemExit):
        tool.main(["--tiny", "--backend", "reference", "--only", "no_such_case",
                   "--counts", "2", "4"])
