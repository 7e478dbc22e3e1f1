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


def assert_close(actual, expected, dtype=None, *, k=None, msg=""):
    """Assert two arrays agree within the tolerance of ``dtype`` (default: actual's)."""
    dtype = dtype or actual.dtype
    rtol, atol = tolerance(dtype, k)
    a = np.array(actual.astype(mx.float32))
    e = np.array(expected.astype(mx.float32))
    assert a.shape == e.shape, f"shape {a.shape} != {e.shape} {msg}"
    np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg=msg)
