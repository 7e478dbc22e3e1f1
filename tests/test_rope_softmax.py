"""CPU tests: RoPE and softmax references vs MLX, validation, source assembly."""

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_foundry.ops import rope, softmax
from mlx_foundry.stages import rope as R
from mlx_foundry.stages import softmax as S
from tolerances import assert_close

DTYPES = [mx.float16, mx.bfloat16, mx.float32]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("shape, dims", [((1, 32, 1, 128), 128), ((2, 4, 9, 64), 32),
                                         ((2, 5, 80), 80), ((1, 2, 3, 7, 48), 16)])
@pytest.mark.parametrize("offset", [0, 4097])
def test_rope_reference_matches_mlx(dtype, traditional, shape, dims, offset):
    x = mx.random.normal(shape).astype(dtype)
    kw = dict(traditional=traditional, base=10000.0, scale=0.5, offset=offset)
    got = rope(x, dims, backend="reference", **kw)
    assert got.dtype == dtype and got.shape == x.shape
    # MLX's CPU fallback rounds cos/sin to the dtype; ours stays in float32.
    # float32: theta = position * inv_freq rounds with error ~ eps * position.
    k = max(256, offset ** 2) if dtype == mx.float32 else 256
    assert_close(got, mx.fast.rope(x, dims, **kw), dtype, k=k)


def test_rope_vector_offset_and_freqs():
    x = mx.random.normal((3, 2, 5, 64))
    off = mx.array([0, 7, 100])
    kw = dict(traditional=False, base=500000.0, scale=1.0)
    assert_close(rope(x, 64, offset=off, backend="reference", **kw),
                 mx.fast.rope(x, 64, offset=off, **kw), mx.float32)
    freqs = mx.exp(mx.linspace(0, 5, 16))
    kw = dict(traditional=True, base=None, scale=1.0, offset=3, freqs=freqs)
    assert_close(rope(x, 32, backend="reference", **kw), mx.fast.rope(x, 32, **kw), mx.float32)


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 4), l=st.integers(1, 9), half=st.integers(1, 24),
       extra=st.integers(0, 5), off=st.integers(0, 2000), trad=st.booleans())
def test_rope_reference_hypothesis(b, h, l, half, extra, off, trad):
    dims = 2 * half
    x = mx.array(np.random.RandomState(off).randn(b, h, l, dims + extra).astype(np.float32))
    kw = dict(traditional=trad, base=10000.0, scale=1.0, offset=off)
    # float32 rounding of theta = position * inv_freq: error ~ eps * position * |x|.
    assert_close(rope(x, dims, backend="reference", **kw), mx.fast.rope(x, dims, **kw),
                 mx.float32, k=max(256, (off + l) ** 2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 1000), (1, 32000)])
def test_softmax_reference_matches_mlx(dtype, shape):
    x = (4 * mx.random.normal(shape)).astype(dtype)
    got = softmax(x, backend="reference")
    assert got.dtype == dtype
    assert_close(got, mx.softmax(x, axis=-1, precise=True), dtype)


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 6), n=st.integers(1, 700), scale=st.floats(0.1, 30))
def test_softmax_reference_hypothesis(rows, n, scale):
    x = mx.array(scale * np.random.RandomState(n).randn(rows, n).astype(np.float32))
    assert_close(softmax(x, backend="reference"), mx.softmax(x, axis=-1, precise=True),
                 mx.float32)


def test_softmax_with_masked_entries():
    x = mx.array([[0.0, -float("inf"), 1.0], [-float("inf"), 2.0, -float("inf")]])
    assert_close(softmax(x, backend="reference"), mx.softmax(x, axis=-1), mx.float32)


# ---- validation ------------------------------------------------------------------
x4 = mx.zeros((1, 2, 3, 64), mx.float16)
R_KW = dict(traditional=False, base=10000.0, scale=1.0, offset=0)


@pytest.mark.parametrize("call, exc, arg", [
    (lambda: rope("x", 64, **R_KW), TypeError, "'x'"),
    (lambda: rope(mx.zeros((3, 64)), 64, **R_KW), ValueError, "'x'"),
    (lambda: rope(mx.zeros((1, 2, 3, 64), mx.int32), 64, **R_KW), ValueError, "'x'"),
    (lambda: rope(x4, 63, **R_KW), ValueError, "'dims'"),
    (lambda: rope(x4, 66, **R_KW), ValueError, "'dims'"),
    (lambda: rope(x4, 64.0, **R_KW), TypeError, "'dims'"),
    (lambda: rope(x4, 64, traditional=1, base=1e4, scale=1.0, offset=0), TypeError, "'traditional'"),
    (lambda: rope(x4, 64, traditional=False, base=-1.0, scale=1.0, offset=0), ValueError, "'base'"),
    (lambda: rope(x4, 64, traditional=False, base=None, scale=1.0, offset=0), ValueError, "'base'"),
    (lambda: rope(x4, 64, traditional=False, base=1e4, scale=float("inf"), offset=0), ValueError, "'scale'"),
    (lambda: rope(x4, 64, traditional=False, base=1e4, scale=1.0, offset=1.5), TypeError, "'offset'"),
    (lambda: rope(x4, 64, traditional=False, base=1e4, scale=1.0, offset=mx.array([1, 2])), ValueError, "'offset'"),
    (lambda: rope(x4, 64, traditional=False, base=1e4, scale=1.0, offset=mx.array(1.0)), ValueError, "'offset'"),
    (lambda: rope(x4, 64, traditional=False, base=1e4, scale=1.0, offset=0, freqs=mx.ones(32)), ValueError, "'freqs'"),
    (lambda: rope(x4, 64, traditional=False, base=None, scale=1.0, offset=0, freqs=mx.ones(31)), ValueError, "'freqs'"),
    (lambda: rope(x4, 64, backend="gpu", **R_KW), ValueError, "gpu"),
    (lambda: softmax([1.0, 2.0]), TypeError, "'x'"),
    (lambda: softmax(mx.array([1, 2])), ValueError, "'x'"),
    (lambda: softmax(mx.array(1.0)), ValueError, "'x'"),
])
def test_validation_names_the_argument(call, exc, arg):
    with pytest.raises(exc, match=arg):
        call()


# ---- source assembly --------------------------------------------------------------
def test_rope_offset_is_runtime():
    x = mx.zeros((1, 4, 1, 128), mx.float16)
    a = rope_src(x, offset=0)
    b = rope_src(x, offset=12345)
    assert a.name == b.name
    assert "rope_rows<T, D, DIMS, TRADITIONAL, USE_FREQS>(x, offset, freqs, out," in a.body
    assert "constexpr int DIMS = 128;" in a.body and "METAL_FUNC float rope_inv_freq" in a.header


def rope_src(x, offset):
    return R.rope.source(x, mx.full((8,), offset, mx.int32), mx.zeros((8,), mx.float32),
                         n_rows=4, seq_len=1, heads=4, offset_stride=0, base=1e4, scale=1.0,
                         DIMS=128, TRADITIONAL=False, USE_FREQS=False, backend="metal")


def test_softmax_length_is_runtime():
    a = S.softmax.source(mx.zeros((1, 100)), n_rows=1, n_cols=100)
    b = S.softmax.source(mx.zeros((1, 117)), n_rows=1, n_cols=117)
    assert a.name == b.name
    assert "threadgroup float softmax_scratch[32];" in a.body
    assert "softmax_rows<T, THREADS>(x, out, n_rows, n_cols," in a.body
