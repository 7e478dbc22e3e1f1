"""CPU tests: reference activations match mlx.nn exactly; the Metal side is present."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_foundry import sources
from mlx_foundry.stages.activations import ACTIVATIONS, ACTIVATIONS_SOURCE

BUILTINS = {"silu": nn.silu, "gelu": nn.gelu, "gelu_approx": nn.gelu_approx, "relu": nn.relu}


@pytest.mark.parametrize("name", sorted(BUILTINS))
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32])
def test_reference_activation_matches_mlx_nn(name, dtype):
    x = (4 * mx.random.normal((3, 257))).astype(dtype)
    got = ACTIVATIONS[name](x)
    want = BUILTINS[name](x)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.array(got.astype(mx.float32)),
                                  np.array(want.astype(mx.float32)))


def test_activation_names():
    assert set(ACTIVATIONS) == {"silu", "gelu", "gelu_approx", "relu"}


@pytest.mark.parametrize("name", ["silu", "gelu", "gelu_approx", "relu"])
def test_metal_source_defines_activation(name):
    text = sources.load(ACTIVATIONS_SOURCE)
    assert f"METAL_FUNC float {name}(float x)" in text


def test_gelu_approx_constants_match_mlx():
    text = sources.load(ACTIVATIONS_SOURCE)
    assert "0.044715f" in text and "0.79788456080286536f" in text  # sqrt(2 / pi)
    assert abs(float(np.sqrt(2 / np.pi)) - 0.79788456080286536) < 1e-12
