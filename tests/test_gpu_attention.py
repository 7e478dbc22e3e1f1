"""GPU tests: the decode attention kernel against its reference."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_foundry.ops import decode_attention
from tolerances import assert_close

pytestmark = pytest.mark.gpu

DTYPES = [mx.float16, mx.bfloat16, mx.float32]
# (batch, n_heads, n_kv_heads, head_dim, capacity, past_len): one position, fewer
# positions than SIMD-groups, 32 +- 1, long caches, head_dim not a multiple of 32,
# unused capacity past past_len.
SHAPES = [(1, 32, 8, 128, 256, 0), (1, 32, 8, 128, 256, 1), (1, 32, 8, 128, 256, 31),
          (1, 32, 8, 128, 256, 32), (1, 32, 8, 128, 256, 33), (1, 32, 8, 128, 4352, 4100),
          (2, 8, 2, 64, 40, 17), (1, 4, 4, 80, 7, 7), (3, 6, 1, 96, 33, 5),
          (1, 1, 1, 32, 1, 0), (2, 12, 4, 256, 100, 99), (1, 28, 4, 128, 512, 300),
          (4, 16, 16, 64, 9, 3),
          # past ops.attention.ONE_PASS_MAX_LEN positions: split kernel + merge, chunks
          # of 256 (one position over, a partial last chunk, empty chunks past the end)
          (1, 8, 2, 64, 1100, 1023), (1, 8, 2, 64, 1100, 1024), (2, 4, 1, 80, 2600, 2599),
          (1, 32, 8, 128, 8448, 8191), (1, 28, 4, 128, 6000, 1500)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_decode_attention_gpu(gpu_backend, dtype, shape):
    B, H, KV, D, cap, n = shape
    mx.random.seed(B * 1000 + H * 10 + n)
    q = mx.random.normal((B, H, 1, D)).astype(dtype)
    kv = mx.random.normal((B, 2 * KV, 1, D)).astype(dtype)
    past = (2 * mx.random.normal((B, 2 * KV, cap, D))).astype(dtype)
    kw = dict(past_len=n, scale=D ** -0.5)
    got = decode_attention(q, kv, past, backend=gpu_backend, **kw)
    # A convex combination of value rows, accumulated in float32: one rounding to the
    # dtype for float16/bfloat16; float32 sums over n positions in another order.
    assert_close(got, decode_attention(q, kv, past, backend="reference", **kw), dtype,
                 k=n + 1 if dtype == mx.float32 else None)


def test_decode_attention_gpu_does_not_read_past_past_len(gpu_backend):
    mx.random.seed(3)
    q = mx.random.normal((1, 8, 1, 64)).astype(mx.float16)
    kv = mx.random.normal((1, 4, 1, 64)).astype(mx.float16)
    past = mx.random.normal((1, 4, 64, 64)).astype(mx.float16)
    nan = mx.concatenate([past[:, :, :10], mx.full((1, 4, 54, 64), float("nan"), mx.float16)],
                         axis=2)
    a = decode_attention(q, kv, past, past_len=10, scale=0.125, backend=gpu_backend)
    b = decode_attention(q, kv, nan, past_len=10, scale=0.125, backend=gpu_backend)
    assert mx.array_equal(a, b).item()


def test_decode_attention_gpu_without_past(gpu_backend):
    mx.random.seed(4)
    q = mx.random.normal((2, 8, 1, 64)).astype(mx.bfloat16)
    kv = mx.random.normal((2, 4, 1, 64)).astype(mx.bfloat16)
    got = decode_attention(q, kv, scale=0.125, backend=gpu_backend)
    assert mx.array_equal(got, mx.repeat(kv[:, 2:], 4, axis=1)).item()


@pytest.mark.parametrize("dtype", DTYPES)
def test_split_and_combine_kernels_gpu(gpu_backend, dtype):
    """The two kernels of the long-context path against their own references, with
    empty chunks (capacity far past the positions)."""
    from mlx_foundry.stages import attention as A

    mx.random.seed(7)
    q = mx.random.normal((2, 8, 1, 64)).astype(dtype)
    kv = mx.random.normal((2, 4, 1, 64)).astype(dtype)
    past = mx.random.normal((2, 4, 3000, 64)).astype(dtype)
    splits = A.split_count(3000)
    kw = dict(past_len=1300, past_cap=3000, scale=0.125, splits=splits)
    # pend (the third input) is not read without PEND=1: kv stands in for it.
    got = A.decode_attention_split(q, kv, kv, past, backend=gpu_backend, **kw)
    want = A.decode_attention_split(q, kv, kv, past, backend="reference", **kw)
    assert got.shape == want.shape == (16, splits, 66)
    # Empty chunks: max -inf, sums 0, exactly.
    assert mx.array_equal(got[:, 6:], want[:, 6:]).item()
    # Float32 states of 256 positions each (online rescaling against one exp per
    # position in the reference): agreement to ~1e-4.
    np.testing.assert_allclose(np.array(got[:, :6]), np.array(want[:, :6]), rtol=1e-4,
                               atol=1e-4)
    out = A.decode_attention_combine(want, splits=splits, T=dtype, backend=gpu_backend)
    assert_close(out, A.decode_attention_combine(want, splits=splits, T=dtype,
                                                 backend="reference"), dtype, k=splits)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 32, 8, 128, 256, 0), (1, 32, 8, 128, 256, 33),
                                   (2, 8, 2, 64, 40, 17), (1, 8, 2, 64, 1100, 1023),
                                   (2, 4, 1, 80, 2600, 700), (1, 32, 8, 128, 4352, 4100)])
def test_decode_attention_gpu_length_on_the_device(gpu_backend, dtype, shape):
    """past_len as SCALAR_LANES uint32 values (the compiled decode step's form, handed to
    the kernel as it is) and as one int32 value: the kernel path is chosen by the
    capacity, so short lengths in a long buffer take the split kernel."""
    from mlx_foundry.kernel import SCALAR_LANES

    B, H, KV, D, cap, n = shape
    mx.random.seed(7 * n + B)
    q = mx.random.normal((B, H, 1, D)).astype(dtype)
    kv = mx.random.normal((B, 2 * KV, 1, D)).astype(dtype)
    past = (2 * mx.random.normal((B, 2 * KV, cap, D))).astype(dtype)
    want = decode_attention(q, kv, past, past_len=n, scale=D ** -0.5, backend="reference")
    for arr in (mx.full((SCALAR_LANES,), n, mx.uint32), mx.array([n], mx.int32)):
        got = decode_attention(q, kv, past, past_len=arr, scale=D ** -0.5, backend=gpu_backend)
        assert_close(got, want, dtype, k=n + 1 if dtype == mx.float32 else None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cap", [40, 2600])
def test_decode_attention_gpu_length_on_the_device_over_the_capacity(gpu_backend, dtype, cap):
    """A device length past the capacity (unchecked on the host; negative ones read as
    uint32) is taken as the capacity by both kernel paths: the same attention as
    past_len = capacity. compute-sanitizer runs this file to show that nothing past the
    cache is read."""
    from mlx_foundry.kernel import SCALAR_LANES

    B, H, KV, D = 1, 8, 2, 64
    mx.random.seed(cap)
    q = mx.random.normal((B, H, 1, D)).astype(dtype)
    kv = mx.random.normal((B, 2 * KV, 1, D)).astype(dtype)
    past = mx.random.normal((B, 2 * KV, cap, D)).astype(dtype)
    want = decode_attention(q, kv, past, past_len=cap, scale=0.125, backend="reference")
    forms = [mx.full((SCALAR_LANES,), v, mx.uint32) for v in (cap + 1, 3 * cap, 2**32 - 1)]
    forms.append(mx.array([-1], mx.int32))
    for arr in forms:
        got = decode_attention(q, kv, past, past_len=arr, scale=0.125, backend=gpu_backend)
        assert_close(got, want, dtype, k=cap + 1 if dtype == mx.float32 else None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 32, 8, 128, 256, 0), (1, 32, 8, 128, 256, 31),
                                   (1, 32, 8, 128, 256, 255), (2, 8, 2, 64, 40, 17),
                                   (1, 4, 4, 80, 7, 6), (3, 6, 1, 96, 33, 5),
                                   (1, 8, 2, 64, 1100, 1022), (1, 8, 2, 64, 1100, 1023),
                                   (2, 4, 1, 80, 2600, 2599), (1, 32, 8, 128, 4352, 4100)])
@pytest.mark.parametrize("on_device", [False, True])
def test_decode_attention_gpu_with_a_pending_token(gpu_backend, dtype, shape, on_device):
    """A token pending its cache write (``pending``, at position past_len) against the
    reference, over both kernel paths (1022 + 2 positions is one pass, 1023 + 2 splits)
    and the length on the host or the device; the buffer holds NaN at the pending
    position and past it, which the kernels must not read."""
    from mlx_foundry.kernel import SCALAR_LANES

    B, H, KV, D, cap, n = shape
    mx.random.seed(11 * n + B)
    q = mx.random.normal((B, H, 1, D)).astype(dtype)
    kv = mx.random.normal((B, 2 * KV, 1, D)).astype(dtype)
    pend = mx.random.normal((B, 2 * KV, 1, D)).astype(dtype)
    past = (2 * mx.random.normal((B, 2 * KV, cap, D))).astype(dtype)
    nan = mx.concatenate([past[:, :, :n], mx.full((B, 2 * KV, cap - n, D), float("nan"),
                                                  dtype)], axis=2)
    want = decode_attention(q, kv, past, past_len=n, pending=pend, scale=D ** -0.5,
                            backend="reference")
    length = mx.full((SCALAR_LANES,), n, mx.uint32) if on_device else n
    got = decode_attention(q, kv, nan, past_len=length, pending=pend, scale=D ** -0.5,
                           backend=gpu_backend)
    assert_close(got, want, dtype, k=n + 2 if dtype == mx.float32 else None)
