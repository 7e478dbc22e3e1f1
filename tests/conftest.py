"""Shared fixtures: the GPU backend (skips cleanly without one) and seeding."""

import mlx.core as mx
import pytest

from mlx_foundry.backends import gpu_backend as _gpu_backend


@pytest.fixture
def gpu_backend():
    """``"cuda"`` or ``"metal"``; skips the test when this machine has neither."""
    backend = _gpu_backend()
    if backend is None:
        pytest.skip("no GPU backend (metal or cuda)")
    return backend


@pytest.fixture(autouse=True)
def _reference_on_cpu(request, monkeypatch):
    """In GPU tests, evaluate the reference oracle on the CPU stream.

    The oracle must not share a failure mode with the code under test, and on
    MLX's CUDA backend float32 matmuls use TF32 by default, which is less
    precise than the float32 tolerances assume.
    """
    if request.node.get_closest_marker("gpu") is None:
        yield
        return
    from mlx_foundry.backends import reference

    original = reference.run

    def run_on_cpu(*args, **kwargs):
        with mx.stream(mx.cpu):
            out = original(*args, **kwargs)
            mx.eval(out)
        return out

    monkeypatch.setattr(reference, "run", run_on_cpu)
    yield


@pytest.fixture(autouse=True)
def _seed():
    mx.random.seed(0)
    yield
