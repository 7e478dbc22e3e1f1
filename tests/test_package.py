"""The package as installed: package data, entry points, no GPU needed."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import mlx_foundry


def test_imported_from_an_installed_package_when_ci_asks():
    if not os.environ.get("MLX_FOUNDRY_REQUIRE_INSTALLED"):
        pytest.skip("set MLX_FOUNDRY_REQUIRE_INSTALLED=1 to require the installed wheel (.ci/run does)")
    pkg = Path(mlx_foundry.__file__).resolve().parent
    repo = Path(__file__).resolve().parent.parent
    assert pkg != repo / "mlx_foundry", f"imported from the source tree: {pkg}"
    assert "site-packages" in pkg.parts


def test_metal_sources_are_package_data():
    root = Path(mlx_foundry.__file__).parent / "metal_src"
    assert (root / "compat" / "metal_compat.cuh").is_file()
    assert any(root.rglob("*.metal"))


def test_command_line_lists_the_catalog():
    r = subprocess.run([sys.executable, "-m", "mlx_foundry", "show", "--list"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) >= 3


def test_demo_runs_and_checks_against_its_reference():
    r = subprocess.run([sys.executable, "-m", "mlx_foundry", "demo"], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "gemv_norm_main" in r.stdout          # the generated source was printed
    assert r.stdout.count(": OK") == 2 and "MISMATCH" not in r.stdout


def test_command_line_errors_are_one_line():
    """An unknown kernel name, or a GPU backend this machine lacks, is a message and exit
    status 2, not a traceback."""
    from mlx_foundry.__main__ import main
    from mlx_foundry.backends import gpu_backend

    r = subprocess.run([sys.executable, "-m", "mlx_foundry", "show", "no_such_kernel"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "No kernel named 'no_such_kernel'" in r.stderr
    assert "Traceback" not in r.stderr
    missing = next((b for b in ("cuda", "metal") if b != gpu_backend()), None)
    assert main(["demo", "--backend", missing, "--quiet"]) == 2


def test_ops_is_an_attribute_of_the_package():
    import mlx_foundry as mf

    assert mf.ops.linear is __import__("mlx_foundry.ops", fromlist=["linear"]).linear


def test_command_line_output_into_a_closed_pipe_is_no_error():
    """``show --list | head -1``: the reader goes away early. Here it closes the pipe
    before the command (still importing) writes anything, so every write fails; that
    is exit 0 and no traceback."""
    p = subprocess.Popen([sys.executable, "-m", "mlx_foundry", "show", "--list"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
