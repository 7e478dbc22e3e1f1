"""Per-dtype tolerances, defined once for every test.

``assert_close(actual, expected, dtype, k=K)`` widens the tolerance for results
that are sums over ``K`` terms (GEMV, norms): rounding error of a float sum
grows like sqrt(K) for random data.
"""

import math

import mlx.core as mx
import numpy as np

# dtype -> (rtol, atol) for elementwise results.
TOLERANCES = {
    mx.float32: (1e-5, 1e-5),
    mx.float16: (1e-2, 1e-3),
    mx.bfloat16: (2e-2, 1e-2),
}


def tolerance(dtype, k=None):
    rtol, atol = TOLERANCES[dtype]
    if k is not None and k > 1:
        grow = max(1.0, math.sqrt(k) / 8)
        rtol, atol = rtol * grow, atol * grow
    return rtol, atol


def rope_frequency_atol(position, magnitude):
    """The most a RoPE-rotated component can move when the two sides computed the float32
    inverse frequencies on different devices (a GPU op against its reference on the CPU:
    ``ops/_rope.py`` computes them on the call's device, as ``mx.fast.rope`` does, and
    the devices' ``exp`` may differ in the last bit or two). Two ulps of an inverse
    frequency (<= 1) are at most 2^-23, which moves the angle at ``position`` by up to
    ``position * 2^-23`` and a component of a pair whose parts are at most ``magnitude``
    by ``sqrt(2) * magnitude`` times that."""
    return math.sqrt(2) * abs(position) * 2.0 ** -23 * magnitude


def assert_close(actual, expected, dtype=None, *, k=None, msg="", extra_atol=0.0):
    """Assert two arrays agree within the tolerance of ``dtype`` (default: actual's);
    ``extra_atol``: an absolute error the caller bounds that the dtype's tolerance does
    not cover (added to its ``atol``)."""
    dtype = dtype or actual.dtype
    rtol, atol = tolerance(dtype, k)
    atol += extra_atol
    a = np.array(actual.astype(mx.float32))
    e = np.array(expected.astype(mx.float32))
    assert a.shape == e.shape, f"shape {a.shape} != {e.shape} {msg}"
    np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg=msg)
