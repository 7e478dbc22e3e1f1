"""Reference activation functions (plain MLX ops) and their Metal names.

``ACTIVATIONS[name](x)`` matches ``mlx.nn.<name>`` exactly (same ops); the
Metal side is ``metal_src/utils/activations.metal`` (``float silu(float)``,
``gelu``, ``gelu_approx``, ``relu``), which epilogues call by the same name.
"""

import math

import mlx.core as mx

ACTIVATIONS_SOURCE = "utils/activations.metal"


def silu(x):
    """``x * sigmoid(x)`` (``mlx.nn.silu``)."""
    return x * mx.sigmoid(x)


def gelu(x):
    """``x * (1 + erf(x / sqrt(2))) / 2`` (``mlx.nn.gelu``)."""
    return x * (1 + mx.erf(x / math.sqrt(2))) / 2


def gelu_approx(x):
    """``0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))`` (``mlx.nn.gelu_approx``)."""
    return 0.5 * x * (1 + mx.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def relu(x):
    """``max(x, 0)`` (``mlx.nn.relu``)."""
    return mx.maximum(x, 0)


ACTIVATIONS = {"silu": silu, "gelu": gelu, "gelu_approx": gelu_approx, "relu": relu}
"""Activation name -> reference function. The Metal function has the same name."""
