"""tools/pdl_read_ab.cu, the standalone measure of programmatic dependent launch: it
builds with nvcc for sm_90, each mode's kernel holds the PDL instructions (and only
those) that its description says, and bad arguments are refused before any GPU work.
Needs nvcc (skipped without it); its timings need a GPU (the device tool, not CI)."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parent.parent / "tools" / "pdl_read_ab.cu"


@pytest.fixture(scope="module")
def nvcc():
    path = shutil.which("nvcc")
    if path is None:
        pytest.skip("nvcc not available")
    return path


def _build(nvcc, out, *flags):
    r = subprocess.run([nvcc, "-O3", "-std=c++17", "-arch=sm_90", *flags, str(SOURCE), "-o",
                        str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return out


def _kernels(ptx):
    """``{mode template argument: PTX body}`` of the four ``read_chain`` instantiations."""
    bodies = {}
    for m in re.finditer(r"\.entry\s+(\S*read_chain\S*?)\(", ptx):
        name = m.group(1)
        mode = int(re.search(r"ILi(\d)E", name).group(1))
        start = ptx.index("{", m.end())
        end = ptx.index("\n}", start)
        bodies[mode] = ptx[start:end]
    return bodies


def test_each_mode_has_its_pdl_instructions(nvcc, tmp_path):
    ptx = _build(nvcc, tmp_path / "pdl.ptx", "-ptx").read_text()
    k = _kernels(ptx)
    assert sorted(k) == [0, 1, 2, 3]
    # plain: ordinary launches, no PDL at all
    assert "griddepcontrol" not in k[0]
    for mode in (1, 2, 3):
        assert "griddepcontrol.launch_dependents" in k[mode]
    # the chained PDL modes wait before they read the previous kernel's word; the
    # independent mode never waits
    assert "griddepcontrol.wait" in k[1] and "griddepcontrol.wait" in k[2]
    assert "griddepcontrol.wait" not in k[3]
    # pdl-first waits before its weight loads, pdl-last after them
    first_load = lambda body: body.index("ld.global.nc")  # noqa: E731
    assert k[1].index("griddepcontrol.wait") < first_load(k[1])
    assert k[2].index("griddepcontrol.wait") > first_load(k[2])


@pytest.mark.parametrize("argv, message", [
    (["2", "9"], "calls must be at least 3"),
    (["200", "0"], "reps at least 1"),
    (["200", "9", "abc"], "size 'abc' must be a number of MB"),
    (["200", "9", "0"], "size '0' must be a number of MB"),
    (["200", "9", "33x"], "size '33x' must be a number of MB"),
    (["200", "9", "1e9"], "size '1e9' must be a number of MB"),
])
def test_bad_arguments_are_refused_before_the_gpu(nvcc, tmp_path_factory, argv, message):
    exe = tmp_path_factory.getbasetemp() / "pdl_read_ab"
    if not exe.exists():
        _build(nvcc, exe)
    r = subprocess.run([str(exe), *argv], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert message in r.stderr
