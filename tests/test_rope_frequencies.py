"""The default RoPE inverse frequencies (ops/_rope.py): computed once per device type and
head size, then taken from the cache (the ops that rotate call this on every call)."""

import math

import mlx.core as mx
import numpy as np

from mlx_foundry.ops._rope import default_inv_freq, inv_freq


def test_repeated_calls_take_the_cached_frequencies():
    default_inv_freq.cache_clear()
    first = inv_freq(128, 1e6, None)
    for _ in range(100):
        assert inv_freq(128, 1e6, None) is first
    info = default_inv_freq.cache_info()
    assert (info.misses, info.hits, info.currsize) == (1, 100, 1)


def test_each_head_size_and_base_has_its_own_entry():
    default_inv_freq.cache_clear()
    a, b, c = inv_freq(128, 1e6, None), inv_freq(64, 1e6, None), inv_freq(128, 1e4, None)
    assert a.shape == (64,) and b.shape == (32,) and c.shape == (64,)
    assert default_inv_freq.cache_info().currsize == 3
    assert not mx.array_equal(a, c).item()


def test_frequencies_are_base_to_the_minus_2i_over_d_in_float32():
    half, base = 64, 5e5
    got = np.array(inv_freq(2 * half, base, None))
    want = np.exp(-np.arange(half) * math.log(base) / half)  # float64
    assert got.dtype == np.float32
    # MLX's float32 formula: i times log(base) / half rounded to float32, the product
    # rounded again (each off by up to 2^-24 of the exponent, whose size is below
    # log(base)), then exp, which turns an absolute error of the exponent into a relative
    # one, and rounds once more (measured here: 1.1e-6 at base 5e5).
    np.testing.assert_allclose(got, want, rtol=(2 * math.log(base) + 2) * 2.0 ** -24, atol=0)


def test_custom_frequencies_are_inverted():
    default_inv_freq.cache_clear()
    got = inv_freq(8, 1e6, mx.array([1.0, 2.0, 4.0, 8.0]))
    assert mx.array_equal(got, mx.array([1.0, 0.5, 0.25, 0.125])).item()
    assert default_inv_freq.cache_info().currsize == 0  # the base is not used
