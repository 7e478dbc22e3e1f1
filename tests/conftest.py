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
def _seed():
    mx.random.seed(0)
    yield
