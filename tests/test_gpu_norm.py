"""GPU tests: norm, add+norm, RoPE and softmax kernels against their references."""

import mlx.core as mx
import pytest

from mlx_foundry.ops import add_rms_norm, rms_norm, rope, softmax
from tolerances import assert_close

pytestmark = pytest.mark.gpu

DTYPES = [mx.float16, mx.bfloat16, mx.float32]
NORM_SHAPES = [(1, 4096), (1, 2880), (1, 4128), (5, 2880), (3, 4128), (64, 4096), (2, 3, 100),
               (7, 7), (1, 1), (3, 33), (4, 16384), (2, 50000), (8192, 8192)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES)
@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm_gpu(gpu_backend, dtype, shape, with_weight):
    x = (3 * mx.random.normal(shape)).astype(dtype)
    w = (1 + 0.2 * mx.random.normal((shape[-1],))).astype(dtype) if with_weight else None
    got = rms_norm(x, w, 1e-5, backend=gpu_backend)
    assert_close(got, rms_norm(x, w, 1e-5, backend="reference"), dtype, k=shape[-1])


@pytest.mark.parametrize("x_dtype, w_dtype", [(mx.float16, mx.float32),
                                              (mx.bfloat16, mx.float16)])
def test_rms_norm_gpu_weight_of_another_dtype(gpu_backend, x_dtype, w_dtype):
    """Promoted as in mx.fast.rms_norm (the float32 kernel runs): against MLX's op."""
    mx.random.seed(11)
    x = (3 * mx.random.normal((3, 4133))).astype(x_dtype)
    w = (1 + 0.2 * mx.random.normal((4133,))).astype(w_dtype)
    got = rms_norm(x, w, 1e-5, backend=gpu_backend)
    want = mx.fast.rms_norm(x, w, 1e-5)
    assert got.dtype == want.dtype == mx.float32
    assert_close(got, want, mx.float32, k=4133)
    r = mx.random.normal((3, 4133)).astype(x_dtype)
    y, h = add_rms_norm(x, r, w, 1e-5, backend=gpu_backend)
    assert h.dtype == x_dtype and y.dtype == mx.float32
    assert_close(h, x + r, x_dtype)
    assert_close(y, mx.fast.rms_norm(x + r, w, 1e-5), mx.float32, k=4133)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 4096), (1, 2880), (3, 4128), (2, 3, 100), (5, 7),
                                   (4, 50000), (512, 8192)])
@pytest.mark.parametrize("with_weight", [True, False])
def test_add_rms_norm_gpu(gpu_backend, dtype, shape, with_weight):
    x = mx.random.normal(shape).astype(dtype)
    r = mx.random.normal(shape).astype(dtype)
    w = mx.random.normal((shape[-1],)).astype(dtype) if with_weight else None
    y, h = add_rms_norm(x, r, w, 1e-6, backend=gpu_backend)
    y_ref, h_ref = add_rms_norm(x, r, w, 1e-6, backend="reference")
    assert_close(h, h_ref, dtype)
    assert_close(y, y_ref, dtype, k=shape[-1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("shape, dims", [((1, 32, 1, 128), 128), ((2, 8, 17, 64), 64),
                                         ((1, 4, 9, 80), 32), ((3, 5, 96), 64),
                                         ((1, 2, 3, 4, 48), 48)])
@pytest.mark.parametrize("offset", [0, 4097])
def test_rope_gpu(gpu_backend, dtype, traditional, shape, dims, offset):
    x = mx.random.normal(shape).astype(dtype)
    kw = dict(traditional=traditional, base=10000.0, scale=1.0, offset=offset)
    got = rope(x, dims, backend=gpu_backend, **kw)
    k = max(256, offset ** 2) if dtype == mx.float32 else 256
    assert_close(got, rope(x, dims, backend="reference", **kw), dtype, k=k)


def test_rope_gpu_vector_offset_and_freqs(gpu_backend):
    x = mx.random.normal((3, 4, 5, 64)).astype(mx.float16)
    off = mx.array([0, 9, 300], dtype=mx.int32)
    kw = dict(traditional=False, base=500000.0, scale=0.25, offset=off)
    assert_close(rope(x, 64, backend=gpu_backend, **kw), rope(x, 64, backend="reference", **kw),
                 mx.float16, k=256)
    freqs = mx.exp(mx.linspace(0, 6, 16))
    kw = dict(traditional=True, base=None, scale=1.0, offset=11, freqs=freqs)
    assert_close(rope(x, 32, backend=gpu_backend, **kw), rope(x, 32, backend="reference", **kw),
                 mx.float16, k=256)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (3, 100), (5, 1000), (2, 4096), (2, 4097),
                                   (1, 151936), (4, 3, 33)])
def test_softmax_gpu(gpu_backend, dtype, shape):
    x = (5 * mx.random.normal(shape)).astype(dtype)
    got = softmax(x, backend=gpu_backend)
    # Each output is divided by a sum over the row: its rounding grows with the row length.
    assert_close(got, softmax(x, backend="reference"), dtype, k=shape[-1])


def test_softmax_gpu_masked(gpu_backend):
    x = mx.random.normal((4, 300))
    x = mx.where(mx.arange(300) % 3 == 0, -float("inf"), x)
    x[1, :200] = -float("inf")
    assert_close(softmax(x, backend=gpu_backend), softmax(x, backend="reference"), mx.float32)
