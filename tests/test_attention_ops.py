"""decode_attention: the reference against MLX's attention, and input validation."""

import mlx.core as mx
import pytest

from mlx_foundry.ops import decode_attention
from tolerances import assert_close

# (batch, n_heads, n_kv_heads, head_dim, capacity, past_len)
SHAPES = [(1, 32, 8, 128, 256, 20), (2, 8, 2, 64, 40, 17), (1, 4, 4, 80, 7, 7),
          (3, 6, 1, 96, 33, 0), (1, 1, 1, 32, 1, 1), (2, 12, 4, 256, 100, 99),
          # past ONE_PASS_MAX_LEN positions: the split kernel and the merge
          (1, 8, 2, 64, 1100, 1023), (1, 8, 2, 64, 1100, 1024), (2, 4, 1, 80, 2600, 2599)]


def _inputs(B, H, KV, D, cap, dtype, seed=0):
    mx.random.seed(seed)
    q = mx.random.normal((B, H, 1, D)).astype(dtype)
    kv = mx.random.normal((B, 2 * KV, 1, D)).astype(dtype)
    past = mx.random.normal((B, 2 * KV, cap, D)).astype(dtype)
    return q, kv, past


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32])
def test_reference_matches_mlx_attention(shape, dtype):
    B, H, KV, D, cap, n = shape
    q, kv, past = _inputs(B, H, KV, D, cap, dtype)
    got = decode_attention(q, kv, past, past_len=n, scale=D ** -0.5, backend="reference")
    full = mx.concatenate([past[:, :, :n], kv], axis=2).astype(mx.float32)
    want = mx.fast.scaled_dot_product_attention(
        q.astype(mx.float32), full[:, :KV], full[:, KV:], scale=D ** -0.5)
    assert got.shape == (B, H, 1, D) and got.dtype == dtype
    assert_close(got, want, dtype)


def test_positions_past_past_len_are_not_read():
    q, kv, past = _inputs(1, 8, 2, 64, 50, mx.float16)
    poisoned = mx.concatenate([past[:, :, :10], mx.full((1, 4, 40, 64), float("nan"),
                                                        mx.float16)], axis=2)
    a = decode_attention(q, kv, past, past_len=10, scale=0.125, backend="reference")
    b = decode_attention(q, kv, poisoned, past_len=10, scale=0.125, backend="reference")
    assert mx.array_equal(a, b).item()


def test_without_past_the_output_is_the_new_value():
    q, kv, _ = _inputs(2, 8, 2, 64, 1, mx.float32)
    got = decode_attention(q, kv, scale=0.125, backend="reference")
    # One position: softmax is 1, so every query head gets its group's value row.
    want = mx.repeat(kv[:, 2:], 4, axis=1)
    assert_close(got, want, mx.float32)


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(q=mx.zeros((1, 8, 2, 64), mx.float16)), ValueError, "'q' must be .*one token"),
    (dict(q=mx.zeros((8, 1, 64), mx.float16)), ValueError, "'q' must have at least 4"),
    (dict(q=mx.zeros((1, 8, 1, 64), mx.int32)), ValueError, "'q' must have a floating"),
    (dict(q=mx.zeros((1, 8, 1, 0), mx.float16)), ValueError, "'q' is empty"),
    (dict(q=mx.zeros((1, 8, 1, 512), mx.float16)), ValueError, "head_dim .* at most 256"),
    (dict(kv=mx.zeros((1, 3, 1, 64), mx.float16)), ValueError, "'kv' must be"),
    (dict(kv=mx.zeros((1, 6, 1, 64), mx.float16)), ValueError, "multiple of n_kv_heads"),
    (dict(kv=mx.zeros((1, 4, 1, 64), mx.float32)), ValueError, "'kv' must have the dtype"),
    (dict(past=mx.zeros((1, 4, 9, 32), mx.float16)), ValueError, "'past' must be"),
    (dict(past=mx.zeros((1, 4, 9, 64), mx.bfloat16)), ValueError, "'past' must have the dtype"),
    (dict(past_len=10), ValueError, "'past_len' must be in \\[0, 9\\]"),
    (dict(past_len=-1), ValueError, "'past_len' must be in"),
    (dict(past_len=2.0), TypeError, "'past_len' must be an int"),
    (dict(past=None, past_len=3), ValueError, "'past_len' must be 0 without 'past'"),
    (dict(scale=float("inf")), ValueError, "'scale' must be finite"),
    (dict(scale="x"), TypeError, "'scale' must be a number"),
    (dict(backend="vulkan"), ValueError, "Unknown backend"),
    (dict(pending=mx.zeros((1, 4, 2, 64), mx.float16)), ValueError,
     "'pending' must have the shape of 'kv'"),
    (dict(pending=mx.zeros((1, 4, 1, 64), mx.float32)), ValueError,
     "'pending' must have the dtype"),
    (dict(pending=mx.zeros((1, 4, 1, 64), mx.int32)), ValueError,
     "'pending' must have a floating"),
    (dict(pending=mx.zeros((4, 1, 64), mx.float16)), ValueError,
     "'pending' must have at least 4"),
    (dict(past=None, past_len=0, pending=mx.zeros((1, 4, 1, 64), mx.float16)), ValueError,
     "'pending' needs 'past'"),
])
def test_bad_input_names_the_argument(kwargs, err, match):
    args = dict(q=mx.zeros((1, 8, 1, 64), mx.float16), kv=mx.zeros((1, 4, 1, 64), mx.float16),
                past=mx.zeros((1, 4, 9, 64), mx.float16), past_len=3, scale=0.125,
                backend="reference")
    args.update(kwargs)
    with pytest.raises(err, match=match):
        decode_attention(args.pop("q"), args.pop("kv"), args.pop("past"), **args)


def test_split_states_merge_to_the_one_pass_result():
    """The split kernel's reference (chunk states, empty chunks past the positions) merged
    by the combine reference gives the one-pass reference, at any context length."""
    from mlx_foundry.stages import attention as A

    q, kv, past = _inputs(2, 8, 2, 64, 900, mx.float32)
    for n in (0, 5, 255, 256, 600):
        splits = A.split_count(900)
        parts = A.split_partials_math(q, kv, past, n, 0.125, splits)
        assert parts.shape == (16, splits, 66)
        assert mx.all(parts[:, (n + 1 + 255) // 256:, 0] == -float("inf")).item()
        got = A.combine_math(parts, mx.float32).reshape(2, 8, 1, 64)
        assert_close(got, A.decode_attention_math(q, kv, past, n, 0.125), mx.float32)


@pytest.mark.parametrize("shape", [(1, 32, 8, 128, 256, 20), (2, 8, 2, 64, 40, 0),
                                   (1, 8, 2, 64, 1100, 1023), (2, 4, 1, 80, 2600, 700)])
@pytest.mark.parametrize("form", ["one value", "lanes"])
def test_past_len_on_the_device(shape, form):
    """A length given as an array (as in a compiled decode step) is the same attention:
    the path is chosen by the capacity and the positions past the length are masked."""
    from mlx_foundry.kernel import SCALAR_LANES

    B, H, KV, D, cap, n = shape
    q, kv, past = _inputs(B, H, KV, D, cap, mx.float32, seed=n)
    want = decode_attention(q, kv, past, past_len=n, scale=0.1, backend="reference")
    arr = (mx.array([n], mx.int32) if form == "one value"
           else mx.full((SCALAR_LANES,), n, mx.uint32))
    got = decode_attention(q, kv, past, past_len=arr, scale=0.1, backend="reference")
    assert_close(got, want, mx.float32)
    # Under mx.compile, where the length is never a Python int.
    fn = mx.compile(lambda q, kv, past, n: decode_attention(q, kv, past, past_len=n, scale=0.1,
                                                            backend="reference"))
    assert_close(fn(q, kv, past, arr), want, mx.float32)


@pytest.mark.parametrize("cap", [5, 1100])
def test_past_len_on_the_device_over_the_capacity_is_the_capacity(cap):
    """A device length is not checked on the host: over the capacity (or negative, read
    as uint32) the oracle takes the whole cache, as the kernels do."""
    from mlx_foundry.kernel import SCALAR_LANES

    q, kv, past = _inputs(1, 8, 2, 64, cap, mx.float32, seed=cap)
    want = decode_attention(q, kv, past, past_len=cap, scale=0.125, backend="reference")
    shorter = decode_attention(q, kv, past, past_len=cap - 1, scale=0.125,
                               backend="reference")
    assert not mx.allclose(shorter, want).item()  # the length matters at this shape
    forms = [mx.full((SCALAR_LANES,), v, mx.uint32) for v in (cap + 1, 3 * cap, 2**32 - 1)]
    forms += [mx.array([v], mx.int32) for v in (cap + 1, -1, -2**31)]
    for arr in forms:
        got = decode_attention(q, kv, past, past_len=arr, scale=0.125, backend="reference")
        assert_close(got, want, mx.float32)


@pytest.mark.parametrize("past_len, past, match", [
    (mx.array([1.0]), True, "integer array"),
    (mx.array([1, 2, 3], mx.int32), True, "1 or 4 equal values"),
    (mx.array([[1]], mx.int32), True, "integer array"),
    (mx.array([1], mx.int32), False, "with 'past'"),
])
def test_past_len_array_validation(past_len, past, match):
    q, kv, buf = _inputs(1, 8, 2, 64, 9, mx.float16)
    with pytest.raises(ValueError, match=f"'past_len'.*{match}"):
        decode_attention(q, kv, buf if past else None, past_len=past_len, scale=0.125,
                         backend="reference")


@pytest.mark.parametrize("shape", [(1, 32, 8, 128, 256, 20), (2, 8, 2, 64, 40, 0),
                                   (1, 4, 4, 80, 7, 7), (1, 8, 2, 64, 1100, 1022),
                                   (1, 8, 2, 64, 1100, 1023), (2, 4, 1, 80, 2600, 2599)])
@pytest.mark.parametrize("on_device", [False, True])
def test_a_pending_token_is_the_position_after_the_cached_ones(shape, on_device):
    """With ``pending``, the attention is the one over a buffer that holds it at position
    ``past_len`` (and the new token after it): the same softmax, one position more; the
    path (one pass or split) is chosen with that position counted."""
    from mlx_foundry.kernel import SCALAR_LANES

    B, H, KV, D, cap, n = shape
    q, kv, past = _inputs(B, H, KV, D, cap, mx.float32, seed=n + 1)
    mx.random.seed(n + 2)
    pend = mx.random.normal(kv.shape)
    written = mx.concatenate([past[:, :, :n], pend, past[:, :, n:]], axis=2)
    want = decode_attention(q, kv, written, past_len=n + 1, scale=0.1, backend="reference")
    length = mx.full((SCALAR_LANES,), n, mx.uint32) if on_device else n
    got = decode_attention(q, kv, past, past_len=length, pending=pend, scale=0.1,
                           backend="reference")
    assert_close(got, want, mx.float32)
    # The pending token counts: without it the result differs at these shapes.
    without = decode_attention(q, kv, past, past_len=n, scale=0.1, backend="reference")
    assert not mx.allclose(without, want).item()


def test_split_states_with_a_pending_token_merge_to_the_one_pass_result():
    from mlx_foundry.stages import attention as A

    q, kv, past = _inputs(1, 8, 2, 64, 511, mx.float32, seed=3)
    pend = mx.random.normal(kv.shape)
    # 511 cached positions + pending + new = 513: a third chunk that 511 + 1 would not need.
    assert A.split_count(511, 1) == A.split_count(511) + 1 == 3
    for n in (0, 254, 255, 511):
        parts = A.split_partials_math(q, kv, past, n, 0.125, A.split_count(511, 1), pend)
        assert mx.all(parts[:, (n + 2 + 255) // 256:, 0] == -float("inf")).item()
        got = A.combine_math(parts, mx.float32).reshape(1, 8, 1, 64)
        assert_close(got, A.decode_attention_math(q, kv, past, n, 0.125, pend), mx.float32)
