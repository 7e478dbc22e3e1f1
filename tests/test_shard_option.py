"""``--shard K/N`` (conftest.py): N runs of the suite, one per part, run every selected
test exactly once. It is how the GPU suite, longer than one device call, runs whole."""

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _collected(*args):
    """The test ids ``pytest --collect-only`` selects here with ``args``, and its output."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "test_structs.py", *args],
        cwd=HERE, capture_output=True, text=True, timeout=120)
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    return proc.returncode, ids, proc.stdout + proc.stderr


def test_the_parts_split_the_selection_exactly_once():
    rc, everything, out = _collected()
    assert rc == 0, out
    assert len(everything) >= 9, out  # enough tests that three parts each get some
    parts = []
    for k in (1, 2, 3):
        rc, ids, out = _collected("--shard", f"{k}/3")
        assert rc == 0, out
        parts.append(ids)
    joined = [t for part in parts for t in part]
    assert sorted(joined) == sorted(everything)  # every test once, none twice
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1, sizes  # interleaved: even parts


def test_a_part_applies_after_keyword_selection():
    # Leaving out the first test shifts every index: parts taken before the selection
    # would keep the wrong half.
    rc, everything, out = _collected()
    assert rc == 0, out
    first_name = everything[0].split("::")[-1].split("[")[0]
    rc, chosen, out = _collected("-k", f"not {first_name}")
    assert rc == 0 and chosen == everything[1:], out
    rc, part, out = _collected("-k", f"not {first_name}", "--shard", "1/2")
    assert rc == 0, out
    assert part == chosen[::2]


@pytest.mark.parametrize("spec", ["0/2", "3/2", "1", "a/b", "1/0"])
def test_a_bad_shard_is_a_usage_error(spec):
    rc, _, out = _collected("--shard", spec)
    assert rc == 4, out  # pytest's usage error
    assert "--shard must be K/N" in out and repr(spec) in out
