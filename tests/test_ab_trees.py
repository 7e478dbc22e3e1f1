"""tools/ab_trees.py: two trees benched in turn, each importing its own package."""

import json
import shutil
import subprocess

import pytest
from tool_loader import TOOLS, load_tool

from mlx_foundry.backends import gpu_backend as _gpu_backend

TOOL = TOOLS / "ab_trees.py"


@pytest.fixture(scope="module")
def ab():
    return load_tool("ab_trees")


def _git_checkout():
    if shutil.which("git") is None:
        return False
    r = subprocess.run(["git", "-C", str(TOOL.parent), "rev-parse", "HEAD"],
                       capture_output=True)
    return r.returncode == 0


def test_summarize_ratio_of_medians(ab):
    old = [{"a": {"ours_us": 10.0, "op": "x", "shape": "s"}},
           {"a": {"ours_us": 14.0, "op": "x", "shape": "s"}}]
    new = [{"a": {"ours_us": 6.0, "op": "x", "shape": "s"}, "b": {"ours_us": 1.0}},
           {"a": {"ours_us": 6.0, "op": "x", "shape": "s"}, "b": {"ours_us": 1.0}}]
    rows = ab.summarize({"old": old, "new": new}, ("old", "new"))
    # "b" is only in the new tree's runs: left out.
    assert [r[0] for r in rows] == ["a"]
    name, op, shape, us, ratio = rows[0]
    assert us == {"old": [10.0, 14.0], "new": [6.0, 6.0]}
    assert ratio == pytest.approx(6.0 / 12.0)


def test_a_tree_that_is_not_imported_is_refused(ab, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    # Installed (CI), the run imports the installed package; else it imports none.
    with pytest.raises(RuntimeError, match="imports mlx_foundry from|cannot import mlx_foundry"):
        ab.run_bench(str(empty), str(cwd), str(tmp_path / "out"), ["--quick"])


@pytest.mark.skipif(not _git_checkout(), reason="needs git and a checkout")
def test_revisions_are_checked(ab):
    top, rel = ab.package_in_repo()
    assert rel == "mlx_foundry"
    assert len(ab.resolve(top, "HEAD")) == 40
    assert ab.resolve(top, ab.WORKTREE) == ab.WORKTREE
    with pytest.raises(RuntimeError, match="rev-parse"):
        ab.resolve(top, "no-such-revision-here")
    with pytest.raises(ValueError, match="cannot start with '-'"):
        ab.resolve(top, "--output=/tmp/x")


@pytest.mark.skipif(not _git_checkout(), reason="needs git and a checkout")
def test_two_trees_alternate(ab, tmp_path):
    # The bench runs in subprocesses: on a GPU machine they bench the GPU backend at the
    # full shapes, elsewhere the reference backend at the tiny ones.
    name = "rms_norm_24x320" if _gpu_backend() is None else "rms_norm_8192x8192"
    out = tmp_path / "ab"
    assert ab.main(["HEAD", "--quick", "--only", name, "--rounds", "2",
                    "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["ab.json", "new_1", "new_2", "old_1",
                                                     "old_2"]
    summary = json.loads((out / "ab.json").read_text())
    assert summary["old"] == "HEAD" and summary["new"] == ab.WORKTREE
    (case,) = summary["cases"]
    assert case["name"] == name
    assert len(case["ours_us"]["old HEAD"]) == len(case["ours_us"]["new WORKTREE"]) == 2
    assert case["new_over_old"] > 0
