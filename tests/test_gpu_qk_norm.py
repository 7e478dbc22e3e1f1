"""GPU tests: ops.qk_norm_rope (Qwen3's per-head q/k norms + RoPE) against its reference
and against MLX's own rms_norm + rope on the same device."""

import mlx.core as mx
import pytest

from mlx_foundry.ops import qk_norm_rope
from tolerances import assert_close, rope_frequency_atol

pytestmark = pytest.mark.gpu

DTYPES = [mx.float16, mx.bfloat16, mx.float32]
# (B, H, KV, L, D, traditional, freqs): one head, Qwen3-8B's 32/8 x 128, several rows,
# a head_dim that is 3 x 32, the largest head_dim, traditional pairs, custom frequencies.
SHAPES = [(1, 1, 1, 1, 32, False, False), (1, 32, 8, 1, 128, False, False),
          (4, 16, 8, 1, 128, False, False), (2, 8, 2, 3, 64, True, False),
          (3, 6, 3, 1, 96, False, True), (1, 4, 2, 2, 256, False, False),
          (2, 40, 8, 1, 128, True, True)]


def _ref(fn):
    with mx.stream(mx.cpu):
        out = fn("reference")
        mx.eval(out)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}h{}kv{}l{}d{}{}{}".format(
    *s[:5], "t" if s[5] else "", "f" if s[6] else ""))
def test_qk_norm_rope_gpu(gpu_backend, dtype, shape):
    B, H, KV, L, D, trad, use_freqs = shape
    mx.random.seed(B * 100 + H + D)
    q = (4 * mx.random.normal((B, H, L, D))).astype(dtype)
    kv = mx.random.normal((B, 2 * KV, L, D)).astype(dtype)
    qw = (1 + 0.2 * mx.random.normal((D,))).astype(dtype)
    kw = (1 + 0.2 * mx.random.normal((D,))).astype(dtype)
    freqs = (1e6 ** (mx.arange(0, D, 2) / D) * 1.5) if use_freqs else None
    for offset in (0, 5, 40000, mx.array(123)):
        args = dict(offset=offset, rope_base=1e6, rope_traditional=trad, rope_freqs=freqs)
        got_q, got_kv = qk_norm_rope(q, kv, qw, kw, 1e-6, **args, backend=gpu_backend)
        want_q, want_kv = _ref(lambda be: qk_norm_rope(q, kv, qw, kw, 1e-6, **args, backend=be))
        # The reference runs on the CPU and computes its own float32 frequencies there;
        # at position 40000 one ulp of a frequency is a visible angle (on an H200: 1.6e-3
        # rad at pair 1, 2.3e-3 in a component), which the dtype tolerance does not cover.
        pos = int(offset.item() if isinstance(offset, mx.array) else offset) + L - 1
        for got, want, name in ((got_q, want_q, "q"), (got_kv, want_kv, "kv")):
            extra = rope_frequency_atol(pos, mx.abs(want).max().item())
            assert_close(got, want, dtype, k=D, msg=f"{name} offset={offset}", extra_atol=extra)
        assert mx.array_equal(got_kv[:, KV:], kv[:, KV:]).item()


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_qk_norm_rope_matches_mlx_ops(gpu_backend, dtype):
    """Against what mlx-lm's Qwen3 attention runs on the same GPU (MLX's own kernels)."""
    B, H, KV, D = 2, 32, 8, 128
    mx.random.seed(5)
    q = (4 * mx.random.normal((B, H, 1, D))).astype(dtype)
    kv = mx.random.normal((B, 2 * KV, 1, D)).astype(dtype)
    qw = (1 + 0.2 * mx.random.normal((D,))).astype(dtype)
    kw = (1 + 0.2 * mx.random.normal((D,))).astype(dtype)
    got_q, got_kv = qk_norm_rope(q, kv, qw, kw, 1e-6, offset=300, rope_base=1e6,
                                 backend=gpu_backend)
    rope = dict(traditional=False, base=1e6, scale=1.0, offset=300)
    want_q = mx.fast.rope(mx.fast.rms_norm(q, qw, 1e-6), D, **rope)
    want_k = mx.fast.rope(mx.fast.rms_norm(kv[:, :KV], kw, 1e-6), D, **rope)
    assert_close(got_q, want_q, dtype, k=D)
    assert_close(got_kv[:, :KV], want_k, dtype, k=D)
