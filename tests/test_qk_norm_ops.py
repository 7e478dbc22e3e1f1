"""ops.qk_norm_rope on the reference backend: Qwen3's per-head q/k norms and RoPE,
against mlx-lm's own computation (nn.RMSNorm, then mx.fast.rope), and its input checks."""

import mlx.core as mx
import pytest

from mlx_foundry.ops import qk_norm_rope
from tolerances import assert_close

CASES = [  # B, H, KV, L, D, traditional, freqs
    (1, 4, 2, 1, 32, False, False),
    (2, 8, 2, 1, 128, False, False),
    (3, 6, 3, 2, 64, True, False),
    (1, 2, 1, 3, 256, False, True),
    (2, 4, 4, 1, 96, False, True),
]


def _mlx_lm(q, kv, qw, kw, eps, offset, base, traditional, freqs):
    """What mlx-lm's Qwen3 attention computes (norms rounded to the dtype, then RoPE)."""
    n_kv = kv.shape[1] // 2
    d = q.shape[-1]
    kw_ = dict(traditional=traditional, base=None if freqs is not None else base, scale=1.0,
               offset=offset, freqs=freqs)
    q2 = mx.fast.rope(mx.fast.rms_norm(q, qw, eps), d, **kw_)
    k2 = mx.fast.rope(mx.fast.rms_norm(kv[:, :n_kv], kw, eps), d, **kw_)
    return q2, mx.concatenate([k2, kv[:, n_kv:]], axis=1)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}h{}kv{}l{}d{}{}{}".format(
    *c[:5], "t" if c[5] else "", "f" if c[6] else ""))
def test_matches_mlx_lm(case, dtype):
    B, H, KV, L, D, trad, use_freqs = case
    mx.random.seed(11)
    q = (3 * mx.random.normal((B, H, L, D))).astype(dtype)
    kv = mx.random.normal((B, 2 * KV, L, D)).astype(dtype)
    qw = (1 + 0.2 * mx.random.normal((D,))).astype(dtype)
    kw = (1 + 0.2 * mx.random.normal((D,))).astype(dtype)
    freqs = (1e6 ** (mx.arange(0, D, 2) / D) * 1.5) if use_freqs else None
    for offset in (0, 4097, mx.array(9)):
        got_q, got_kv = qk_norm_rope(q, kv, qw, kw, 1e-6, offset=offset, rope_base=1e6,
                                     rope_traditional=trad, rope_freqs=freqs,
                                     backend="reference")
        want_q, want_kv = _mlx_lm(q, kv, qw, kw, 1e-6, offset, 1e6, trad, freqs)
        assert got_q.shape == q.shape and got_kv.shape == kv.shape
        assert got_q.dtype == dtype and got_kv.dtype == dtype
        assert_close(got_q, want_q, dtype, k=D, msg=f"q offset={offset}")
        assert_close(got_kv, want_kv, dtype, k=D, msg=f"kv offset={offset}")
        # Values pass through exactly.
        assert mx.array_equal(got_kv[:, KV:], kv[:, KV:]).item()


def _args(dtype=mx.float16, D=64):
    q = mx.zeros((1, 4, 1, D), dtype)
    kv = mx.zeros((1, 4, 1, D), dtype)
    w = mx.ones((D,), dtype)
    return q, kv, w, w


@pytest.mark.parametrize("change,exc,match", [
    (lambda a: (a[0].reshape(4, 1, 64),) + a[1:], ValueError, "'q'"),
    (lambda a: (a[0], mx.zeros((1, 3, 1, 64), mx.float16)) + a[2:], ValueError, "'kv'"),
    (lambda a: (a[0], mx.zeros((2, 4, 1, 64), mx.float16)) + a[2:], ValueError, "'kv'"),
    (lambda a: (a[0], a[1].astype(mx.float32)) + a[2:], ValueError, "'kv'"),
    (lambda a: (a[0].astype(mx.int32),) + a[1:], ValueError, "'q'"),
    (lambda a: _args(D=48), ValueError, "head_dim"),
    (lambda a: _args(D=288), ValueError, "head_dim"),
    (lambda a: a[:2] + (mx.ones((32,), mx.float16), a[3]), ValueError, "'q_norm_weight'"),
    (lambda a: a[:3] + (mx.ones((64, 1), mx.float16),), ValueError, "'k_norm_weight'"),
    (lambda a: (mx.zeros((1, 4, 0, 64), mx.float16),) + a[1:], ValueError, "'q'"),
])
def test_bad_inputs_name_the_argument(change, exc, match):
    with pytest.raises(exc, match=match):
        qk_norm_rope(*change(_args()), 1e-6, offset=0, backend="reference")


def test_bad_scalars_name_the_argument():
    a = _args()
    with pytest.raises(ValueError, match="'eps'"):
        qk_norm_rope(*a, -1.0, offset=0, backend="reference")
    with pytest.raises(TypeError, match="'offset'"):
        qk_norm_rope(*a, 1e-6, offset=1.5, backend="reference")
    with pytest.raises(ValueError, match="'offset'"):
        qk_norm_rope(*a, 1e-6, offset=mx.array([1, 2]), backend="reference")
    with pytest.raises(ValueError, match="'rope_freqs'"):
        qk_norm_rope(*a, 1e-6, offset=0, rope_freqs=mx.ones((8,)), backend="reference")
    with pytest.raises(ValueError, match="traditional"):
        qk_norm_rope(*_args(D=96), 1e-6, offset=0, rope_traditional=True, backend="reference")
    with pytest.raises(ValueError, match="backend"):
        qk_norm_rope(*a, 1e-6, offset=0, backend="vulkan")
    with pytest.raises(TypeError, match="'rope_traditional'"):
        qk_norm_rope(*a, 1e-6, offset=0, rope_traditional=1, backend="reference")
    with pytest.raises(ValueError, match="'rope_scale'"):
        qk_norm_rope(*a, 1e-6, offset=0, rope_scale="x", backend="reference")
    with pytest.raises(ValueError, match="'rope_base'"):
        qk_norm_rope(*a, 1e-6, offset=0, rope_base=None, backend="reference")
    with pytest.raises(ValueError, match="'offset'"):
        qk_norm_rope(*a, 1e-6, offset=-2 ** 31 - 1, backend="reference")
