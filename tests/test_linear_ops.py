"""linear and the fused decode ops on CPU: references against MLX built-ins, the prefill
route through MLX's own kernels, Weight, and input validation."""

import importlib

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_foundry.ops import (Weight, linear, norm_gate_up_swiglu, norm_linear,
                             norm_qkv_rope)
from mlx_foundry.policies.affine import AFFINE_BITS, AFFINE_GROUP_SIZES

from tolerances import assert_close
from tuned import grid, looked_up

# The module (mlx_foundry.ops.linear is the function once the package is imported).
lin = importlib.import_module("mlx_foundry.ops.linear")

DTYPES = [mx.float16, mx.bfloat16, mx.float32]
ACTS = {"silu": nn.silu, "gelu": nn.gelu, "gelu_approx": nn.gelu_approx, "relu": nn.relu}


def _qw(n, k, bits=4, gs=64, dtype=mx.float16, bias=False):
    w = (mx.random.normal((n, k)) / k ** 0.5).astype(dtype)
    wq, s, b = mx.quantize(w, group_size=gs, bits=bits)
    return Weight(wq, s, b, mx.random.normal((n,)).astype(dtype) if bias else None,
                  group_size=gs, bits=bits)


def _mm32(x, w):
    """``x @ W.T`` with MLX's kernels in float32 (MLX's CPU half-precision matmuls round
    partial sums to the half type, which is noisier than the tolerances)."""
    x = x.astype(mx.float32)
    if w.quantized:
        return mx.quantized_matmul(x, w.weight, w.scales.astype(mx.float32),
                                   w.biases.astype(mx.float32), transpose=True,
                                   group_size=w.group_size, bits=w.bits)
    return x @ w.weight.astype(mx.float32).T


def _dw(n, k, dtype=mx.float16, bias=False):
    return Weight((mx.random.normal((n, k)) / k ** 0.5).astype(dtype),
                  bias=mx.random.normal((n,)).astype(dtype) if bias else None)


# ---- references against MLX built-ins ------------------------------------------------------
@pytest.mark.parametrize("bits", AFFINE_BITS)
@pytest.mark.parametrize("group_size", AFFINE_GROUP_SIZES)
def test_linear_reference_matches_quantized_matmul(bits, group_size):
    k = 256
    x = mx.random.normal((3, k))
    w = _qw(40, k, bits, group_size, mx.float32)
    got = linear(x, w.weight, w.scales, w.biases, group_size=group_size, bits=bits,
                 backend="reference")
    want = mx.quantized_matmul(x, w.weight, w.scales, w.biases, transpose=True,
                               group_size=group_size, bits=bits)
    assert_close(got, want, mx.float32, k=k)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_linear_reference_half_dtypes(dtype, bits):
    k = 320
    x = mx.random.normal((2, 5, k)).astype(dtype)
    w = _qw(24, k, bits, 64, dtype)
    got = linear(x, w, backend="reference")
    assert got.dtype == dtype and got.shape == (2, 5, 24)
    assert_close(got, _mm32(x, w).astype(dtype), dtype, k=k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_reference_dense(dtype):
    x = mx.random.normal((4, 37)).astype(dtype)
    w = _dw(11, 37, dtype, bias=True)
    got = linear(x, w.weight, bias=w.bias, backend="reference")
    assert_close(got, (_mm32(x, w) + w.bias.astype(mx.float32)).astype(dtype), dtype, k=37)


@pytest.mark.parametrize("activation", list(ACTS))
def test_linear_reference_activation_bias_residual(activation):
    x = mx.random.normal((2, 128))
    w = _qw(48, 128, 4, 32, mx.float32, bias=True)
    r = mx.random.normal((2, 48))
    got = linear(x, w.weight, w.scales, w.biases, group_size=32, bits=4, bias=w.bias,
                 activation=activation, residual=r, backend="reference")
    y = mx.quantized_matmul(x, w.weight, w.scales, w.biases, transpose=True, group_size=32,
                            bits=4)
    assert_close(got, ACTS[activation](y + w.bias) + r, mx.float32, k=128)


@pytest.mark.parametrize("with_weight", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_linear_reference(with_weight, dtype):
    k = 192
    x = mx.random.normal((3, k)).astype(dtype)
    g = (1 + 0.1 * mx.random.normal((k,))).astype(dtype) if with_weight else None
    w = _qw(33, k, 4, 64, dtype)
    got = norm_linear(x, g, 1e-5, w, activation="gelu", backend="reference")
    h = mx.fast.rms_norm(x, g, 1e-5)
    assert_close(got, nn.gelu(_mm32(h, w)).astype(dtype), dtype, k=k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_gate_up_swiglu_reference(dtype):
    k = 256
    x = mx.random.normal((1, 2, k)).astype(dtype)
    g = (1 + 0.1 * mx.random.normal((k,))).astype(dtype)
    gate, up = _qw(40, k, 4, 64, dtype), _dw(40, k, dtype)
    got = norm_gate_up_swiglu(x, g, 1e-6, gate, up, backend="reference")
    h = mx.fast.rms_norm(x, g, 1e-6)
    want = (nn.silu(_mm32(h, gate)) * _mm32(h, up)).astype(dtype)
    assert got.shape == (1, 2, 40)
    assert_close(got, want, dtype, k=k)


def _rope_ref(t, n, d, offset, **kw):
    b, seq = t.shape[0], t.shape[1]
    r = mx.fast.rope(t.reshape(b, seq, n, d).transpose(0, 2, 1, 3), d, offset=offset, **kw)
    return r.transpose(0, 2, 1, 3).reshape(b, seq, n * d)


@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("freqs", [False, True])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_norm_qkv_rope_reference(traditional, freqs, dtype):
    k, h, kvh, d, offset, scale = 128, 4, 2, 16, 9, 0.5
    x = mx.random.normal((2, 3, k)).astype(dtype)
    g = (1 + 0.1 * mx.random.normal((k,))).astype(dtype)
    q, kk, v = _qw(h * d, k, 4, 64, dtype), _qw(kvh * d, k, 8, 32, dtype), _dw(kvh * d, k, dtype)
    fr = (10000.0 ** (mx.arange(0, d, 2) / d) * 1.5) if freqs else None
    got = norm_qkv_rope(x, g, 1e-5, q, kk, v, n_heads=h, n_kv_heads=kvh, head_dim=d,
                        offset=offset, rope_base=10000.0, rope_scale=scale,
                        rope_traditional=traditional, rope_freqs=fr, backend="reference")
    hn = mx.fast.rms_norm(x, g, 1e-5)
    kw = dict(traditional=traditional, base=None if freqs else 10000.0, scale=scale, freqs=fr)
    want = (_rope_ref(_mm32(hn, q), h, d, offset, **kw),
            _rope_ref(_mm32(hn, kk), kvh, d, offset, **kw), _mm32(hn, v))
    for a, b_ in zip(got, want):
        assert a.shape == b_.shape and a.dtype == dtype
        assert_close(a, b_, dtype, k=k)


@pytest.mark.parametrize("with_weight", [True, False])
def test_norm_qkv_rope_reference_with_biases(with_weight):
    """Qwen2-style projection biases, added before RoPE (mlx-lm's Attention)."""
    k, h, kvh, d, offset = 128, 4, 2, 16, 3
    x = mx.random.normal((1, 2, k))
    g = 1 + 0.1 * mx.random.normal((k,)) if with_weight else None
    q = _qw(h * d, k, 4, 64, mx.float32, bias=True)
    kk, v = _qw(kvh * d, k, 4, 64, mx.float32, bias=True), _dw(kvh * d, k, mx.float32, bias=True)
    got = norm_qkv_rope(x, g, 1e-5, q, kk, v, n_heads=h, n_kv_heads=kvh, head_dim=d,
                        offset=offset, backend="reference")
    hn = mx.fast.rms_norm(x, g, 1e-5)
    kw = dict(traditional=False, base=10000.0, scale=1.0)
    want = (_rope_ref(_mm32(hn, q) + q.bias, h, d, offset, **kw),
            _rope_ref(_mm32(hn, kk) + kk.bias, kvh, d, offset, **kw), _mm32(hn, v) + v.bias)
    for a, b_ in zip(got, want):
        assert_close(a, b_, mx.float32, k=k)


@pytest.mark.parametrize("joint_kv", [False, True])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_norm_qkv_without_rope(joint_kv, dtype):
    """rope=False: the three projections of the normalised row (biases included), the
    RoPE arguments ignored."""
    k, h, kvh, d = 128, 4, 2, 16
    x = mx.random.normal((2, 1, k)).astype(dtype)
    g = (1 + 0.1 * mx.random.normal((k,))).astype(dtype)
    q = _qw(h * d, k, 4, 64, dtype, bias=True)
    kk, v = _qw(kvh * d, k, 8, 32, dtype, bias=True), _dw(kvh * d, k, dtype, bias=True)
    got = norm_qkv_rope(x, g, 1e-5, q, kk, v, n_heads=h, n_kv_heads=kvh, head_dim=d,
                        offset=mx.array(37), rope_base=-1.0, rope_traditional=True,
                        rope=False, joint_kv=joint_kv, backend="reference")
    hn = mx.fast.rms_norm(x, g, 1e-5)
    want = [_mm32(hn, w_) + w_.bias for w_ in (q, kk, v)]
    if joint_kv:
        want = [want[0], mx.concatenate(want[1:], axis=-1)]
    assert len(got) == len(want)
    for a, b_ in zip(got, want):
        assert a.shape == b_.shape and a.dtype == dtype
        assert_close(a, b_, dtype, k=k)


# ---- the prefill route (MLX's own kernels) agrees with the reference -------------------
@pytest.fixture
def prefill(monkeypatch):
    monkeypatch.setattr(lin, "PREFILL_ROWS", 0)
    return "cuda"  # any non-reference backend name; 1 row > 0 routes to MLX ops on the CPU


def test_prefill_route_linear(prefill):
    x = mx.random.normal((2, 3, 128))
    w = _qw(32, 128, 4, 64, mx.float32, bias=True)
    r = mx.random.normal((2, 3, 32))
    a = linear(x, w, activation="relu", residual=r, backend=prefill)
    b = linear(x, w, activation="relu", residual=r, backend="reference")
    assert_close(a, b, mx.float32, k=128)


def test_prefill_route_fused_ops(prefill):
    k = 128
    x = mx.random.normal((1, 5, k))
    g = 1 + 0.1 * mx.random.normal((k,))
    w, w2 = _qw(32, k, 4, 64, mx.float32), _dw(32, k, mx.float32)
    for fn in (lambda be: norm_linear(x, g, 1e-5, w, activation="silu", backend=be),
               lambda be: norm_gate_up_swiglu(x, g, 1e-5, w, w2, backend=be)):
        assert_close(fn(prefill), fn("reference"), mx.float32, k=k)
    q, kv = _qw(64, k, 4, 64, mx.float32), _qw(32, k, 4, 64, mx.float32)
    args = dict(n_heads=4, n_kv_heads=2, head_dim=16, offset=3)
    for rope in (True, False):
        for a, b in zip(norm_qkv_rope(x, g, 1e-5, q, kv, kv, **args, rope=rope, backend=prefill),
                        norm_qkv_rope(x, g, 1e-5, q, kv, kv, **args, rope=rope,
                                      backend="reference")):
            assert_close(a, b, mx.float32, k=k)


# ---- Weight ---------------------------------------------------------------------------------
def test_weight_from_modules():
    ql = nn.QuantizedLinear(128, 48, bias=True, group_size=32, bits=5)
    w = Weight.from_module(ql)
    assert (w.quantized, w.bits, w.group_size, w.in_features, w.out_features) == (
        True, 5, 32, 128, 48)
    assert w.bias is ql["bias"]
    x = mx.random.normal((2, 128))
    assert_close(linear(x, w, backend="reference"), ql(x), mx.float32, k=128)
    dl = nn.Linear(64, 8, bias=False)
    w = Weight.from_module(dl)
    assert not w.quantized and w.bias is None and w.in_features == 64
    x = mx.random.normal((1, 64))
    assert_close(linear(x, w, backend="reference"), dl(x), mx.float32, k=64)


def test_weight_from_embeddings_is_their_as_linear():
    emb = nn.Embedding(40, 96)
    w = Weight.from_module(emb)
    assert (w.quantized, w.in_features, w.out_features) == (False, 96, 40)
    x = mx.random.normal((1, 96))
    assert_close(linear(x, w, backend="reference"), emb.as_linear(x), mx.float32, k=96)
    qemb = nn.QuantizedEmbedding(40, 128, group_size=32, bits=4)
    w = Weight.from_module(qemb)
    assert (w.quantized, w.bits, w.group_size, w.in_features, w.out_features) == (
        True, 4, 32, 128, 40)
    x = mx.random.normal((2, 128))
    assert_close(linear(x, w, backend="reference"), qemb.as_linear(x), mx.float32, k=128)


def test_weight_from_module_rejects_other_modes():
    with pytest.raises(ValueError, match="affine"):
        Weight.from_module(nn.QuantizedLinear(64, 32, group_size=32, mode="mxfp4"))
    with pytest.raises(TypeError, match="'module'"):
        Weight.from_module(nn.RMSNorm(8))


# ---- validation -----------------------------------------------------------------------------
def _q4():
    w = _qw(32, 128, 4, 64)
    return w.weight, w.scales, w.biases


@pytest.mark.parametrize("make,exc,match", [
    (lambda: linear(mx.ones((1, 128), mx.int32), *_q4()), ValueError, "'x'.*dtype"),
    (lambda: linear(mx.ones((1, 100), mx.float16), *_q4()), ValueError, "last dimension of 'x'"),
    (lambda: linear([1.0] * 128, *_q4()), TypeError, "'x'"),
    (lambda: linear(mx.ones((1, 128), mx.float16), *_q4(), bits=7), ValueError, "'bits'"),
    (lambda: linear(mx.ones((1, 128), mx.float16), *_q4(), group_size=48), ValueError,
     "'group_size'"),
    (lambda: linear(mx.ones((1, 128), mx.float16), *_q4(), group_size=128, bits=4), ValueError,
     "'scales'"),
    (lambda: linear(mx.ones((1, 128), mx.float16), _q4()[0], _q4()[1][:, :1], _q4()[2]),
     ValueError, "'scales'"),
    (lambda: linear(mx.ones((1, 128), mx.float16), _q4()[0], _q4()[1], None), ValueError,
     "'biases'"),
    (lambda: linear(mx.ones((1, 128), mx.float16), _q4()[0], _q4()[1].tolist(), _q4()[2]),
     TypeError, "'scales'"),
    (lambda: linear(mx.ones((1, 128), mx.float16), _q4()[0].astype(mx.int32), *_q4()[1:]),
     ValueError, "'weight'"),
    (lambda: linear(mx.ones((1, 128), mx.float16), mx.ones((8, 128), mx.int32)), ValueError,
     "'weight'"),
    (lambda: linear(mx.ones((1, 128), mx.float16), "w"), TypeError, "'weight'"),
    (lambda: linear(mx.ones((1, 128), mx.float16), *_q4(), activation="tanh"), ValueError,
     "'activation'"),
    (lambda: linear(mx.ones((1, 128), mx.float16), *_q4(), bias=mx.ones((31,))), ValueError,
     "'bias'"),
    (lambda: linear(mx.ones((1, 128), mx.float16), *_q4(), residual=mx.ones((1, 31))),
     ValueError, "'residual'"),
])
def test_linear_rejects_bad_input(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_group_size_must_divide_k():
    w = mx.zeros((8, 3), mx.uint32)  # K = 24 with 4 bits
    with pytest.raises(ValueError, match="'group_size'"):
        linear(mx.ones((1, 24)), w, mx.zeros((8, 1)), mx.zeros((8, 1)), group_size=32, bits=4)


def test_fused_ops_reject_bad_input():
    w = _qw(32, 128)
    x = mx.ones((1, 128), mx.float16)
    with pytest.raises(TypeError, match="'weight'"):
        norm_linear(x, None, 1e-5, w.weight)
    with pytest.raises(ValueError, match="'eps'"):
        norm_linear(x, None, -1.0, w)
    with pytest.raises(ValueError, match="'norm_weight'"):
        norm_linear(x, mx.ones((127,)), 1e-5, w)
    with pytest.raises(ValueError, match="last dimension of 'x'"):
        norm_linear(mx.ones((1, 64)), None, 1e-5, w)
    with pytest.raises(ValueError, match="'up'"):
        norm_gate_up_swiglu(x, None, 1e-5, w, _qw(16, 128))
    with pytest.raises(TypeError, match="'gate'"):
        norm_gate_up_swiglu(x, None, 1e-5, None, w)
    q, kv = _qw(64, 128), _qw(32, 128)
    base = dict(n_heads=4, n_kv_heads=2, head_dim=16, offset=0)
    x3 = mx.ones((1, 1, 128), mx.float16)
    with pytest.raises(ValueError, match="'q'"):
        norm_qkv_rope(x3, None, 1e-5, kv, kv, kv, **base)
    with pytest.raises(ValueError, match="'n_heads'"):
        norm_qkv_rope(x3, None, 1e-5, q, kv, kv, **dict(base, n_kv_heads=3))
    with pytest.raises(ValueError, match="'head_dim'"):
        norm_qkv_rope(x3, None, 1e-5, q, kv, kv, **dict(base, head_dim=0))
    with pytest.raises(TypeError, match="'offset'"):
        norm_qkv_rope(x3, None, 1e-5, q, kv, kv, **dict(base, offset=1.5))
    with pytest.raises(ValueError, match="'rope_freqs'"):
        norm_qkv_rope(x3, None, 1e-5, q, kv, kv, **base, rope_freqs=mx.ones((3,)))
    with pytest.raises(ValueError, match="'x'"):
        norm_qkv_rope(mx.ones((128,), mx.float16), None, 1e-5, q, kv, kv, **base)
    # Flags and RoPE numbers are checked, not coerced: a truthy "no" would rotate pairs.
    for bad, exc, name in ((dict(rope_traditional="no"), TypeError, "rope_traditional"),
                           (dict(rope=1), TypeError, "rope"),
                           (dict(joint_kv="yes"), TypeError, "joint_kv"),
                           (dict(rope_base="1e4"), ValueError, "rope_base"),
                           (dict(rope_base=float("inf")), ValueError, "rope_base"),
                           (dict(rope_scale=None), ValueError, "rope_scale"),
                           (dict(offset=2 ** 40), ValueError, "offset")):
        with pytest.raises(exc, match=f"'{name}'"):
            norm_qkv_rope(x3, None, 1e-5, q, kv, kv, **dict(base, **bad), backend="reference")


def test_weight_scales_and_biases_share_a_dtype():
    """The kernels read scales and biases through one policy dtype."""
    w = _qw(32, 128)
    with pytest.raises(ValueError, match="'biases' must have the dtype of 'scales'"):
        Weight(w.weight, w.scales.astype(mx.bfloat16), w.biases, group_size=64, bits=4)


def test_launch_constants_come_from_the_tuner(monkeypatch, tmp_path):
    """A stored tuning for this kernel, source and shape class sets ROWS/THREADS."""
    from mlx_foundry.bench import autotune, tuner

    monkeypatch.setenv(tuner.ENV_DIR, str(tmp_path))
    monkeypatch.setattr(lin, "_TUNED", {})
    w = _qw(64, 256)
    x = mx.ones((1, 256), mx.float16)

    def launched_constants():
        got = _launched(linear, x, w)
        return {k: got[k] for k in ("ROWS", "THREADS")}

    assert launched_constants() == {"ROWS": lin.DEFAULT_ROWS, "THREADS": lin.DEFAULT_THREADS}
    kern = lin.linear_kernel(w.signature())
    tuner.tune(autotune.kernel_key(kern, "cuda"), [{"ROWS": 2, "THREADS": 64}],
               lambda params: 1e-6, source_hash=tuner.source_hash(kern),
               shape_class=tuner.shape_class(64, 256, 1), repeats=1, warmup=0)
    monkeypatch.setattr(lin, "_TUNED", {})
    assert launched_constants() == {"ROWS": 2, "THREADS": 64}


def _launched(op, *args, **kwargs):
    """The launch constants of the one kernel ``op`` launches on "cuda" (recorded, nothing
    runs)."""
    from mlx_foundry.bench.autotune import LAUNCH_CONSTANTS
    from mlx_foundry.kernel import record_launches

    with record_launches() as rec:
        op(*args, backend="cuda", **kwargs)
    (_, _, kw), = rec
    return {k: v for k, v in kw.items() if k in LAUNCH_CONSTANTS}


def test_dense_weights_get_their_own_default_launch(monkeypatch, tmp_path):
    """One row of x through dense weights with K >= 2048 and N within 4x of K launches two
    rows and 256 threads splitting K; quantized weights, short rows and vocabulary-wide
    heads keep the other rule."""
    from mlx_foundry.bench import tuner

    monkeypatch.setenv(tuner.ENV_DIR, str(tmp_path))
    monkeypatch.setattr(lin, "_TUNED", {})
    x = mx.ones((1, 2048), mx.float16)
    dense_row = {"ROWS": 2, "THREADS": 256, "SPLITK": 1, "UNROLL": 1, "MBLOCK": 1}
    assert _launched(linear, x, Weight(mx.ones((5120, 2048), mx.float16))) == dense_row
    assert _launched(linear, mx.ones((1, 8192), mx.float16),
                     Weight(mx.ones((2048, 8192), mx.float16))) == dense_row
    quantized = {"ROWS": 4, "THREADS": 128, "SPLITK": 0, "UNROLL": 1, "MBLOCK": 1}
    assert _launched(linear, x, _qw(5120, 2048)) == quantized
    for n, k in ((640, 256), (9000, 2048)):  # K under 2048; N past 4K
        assert _launched(linear, mx.ones((1, k), mx.float16),
                         Weight(mx.ones((n, k), mx.float16))) == quantized


def test_every_fused_gemv_op_launches_the_default_unroll(monkeypatch, tmp_path):
    """``UNROLL`` reaches each fused GEMV kernel from the default launch."""
    from mlx_foundry.bench import tuner

    monkeypatch.setenv(tuner.ENV_DIR, str(tmp_path))
    monkeypatch.setattr(lin, "_TUNED", {})
    monkeypatch.setattr(lin, "DEFAULT_UNROLL", 3)
    w, g = _qw(64, 256), mx.ones((256,), mx.float16)
    x = mx.ones((1, 256), mx.float16)
    qkv = dict(n_heads=4, n_kv_heads=2, head_dim=16, offset=0)
    for name, op, args, kwargs in (
            ("linear", linear, (x, w), {}),
            ("norm_linear", norm_linear, (x, g, 1e-5, w), {}),
            ("gate_up", norm_gate_up_swiglu, (x, g, 1e-5, w, w), {}),
            ("qkv", norm_qkv_rope, (x[None], g, 1e-5, w, _qw(32, 256), _qw(32, 256)), qkv)):
        assert _launched(op, *args, **kwargs)["UNROLL"] == 3, name


def test_qkv_launch_constants_come_from_the_tuner(monkeypatch, tmp_path):
    """norm_qkv_rope looks its ROWS/THREADS up under all three projections' rows."""
    from mlx_foundry.bench import autotune, tuner
    from mlx_foundry.kernel import record_launches

    monkeypatch.setenv(tuner.ENV_DIR, str(tmp_path))
    monkeypatch.setattr(lin, "_TUNED", {})
    q, kv = _qw(64, 256), _qw(32, 256)
    x = mx.ones((1, 1, 256), mx.float16)
    base = dict(n_heads=4, n_kv_heads=2, head_dim=16, offset=0)

    def launched():
        with record_launches() as rec:
            norm_qkv_rope(x, None, 1e-5, q, kv, kv, backend="cuda", **base)
        return rec[0][0], {k: rec[0][2][k] for k in ("ROWS", "THREADS")}

    kern, got = launched()
    assert got == {"ROWS": lin.DEFAULT_ROWS, "THREADS": lin.DEFAULT_THREADS}
    for rows, expect in ((8, 8), (32, lin.DEFAULT_ROWS)):  # 32 does not divide head_dim
        tuner.tune(autotune.kernel_key(kern, "cuda"), [{"ROWS": rows, "THREADS": 256}],
                   lambda params: 1e-6, source_hash=tuner.source_hash(kern),
                   shape_class=tuner.shape_class(64 + 2 * 32, 256, 1), repeats=1, warmup=0,
                   force=True)
        monkeypatch.setattr(lin, "_TUNED", {})
        want = {"ROWS": expect, "THREADS": 256 if expect == rows else lin.DEFAULT_THREADS}
        assert launched()[1] == want


def test_tune_decode_stores_what_the_decode_ops_look_up(monkeypatch, tmp_path):
    """Every fused decode kernel is tuned under the key and shape class its op uses."""
    from mlx_foundry.bench import autotune, tuner
    from mlx_foundry.kernel import record_launches

    monkeypatch.setenv(tuner.ENV_DIR, str(tmp_path))
    monkeypatch.setattr(lin, "_TUNED", {})
    cands = [{"ROWS": 2, "THREADS": 64}]
    chosen = autotune.tune_decode("reference", candidates=cands, repeats=1)
    # Each kernel keeps its untuned launch unless the candidate was clearly faster.
    assert len(chosen) == 5
    defaults = [lin.default_launch(n, k, head_dim=autotune.TINY["head_dim"]
                                   if name.startswith("norm_qkv_rope") else None,
                                   dual=name == "norm_gate_up_swiglu", dtype=mx.float16)
                for name, (_, n, k, _) in autotune._decode_ops(autotune.TINY, 4, 64,
                                                               mx.float16).items()]
    # The second pass may unroll the choice of the first (every setting times alike here).
    assert all(grid(p) == cands[0] or grid(p) in map(grid, defaults)
               for p in chosen.values())
    assert all(p.get("UNROLL", 1) in autotune.DEFAULT_UNROLLS for p in chosen.values())
    # Tuning drops the launch constants the ops resolved before it (its own warm-up
    # calls did), so this process launches with the stored choice.
    assert lin._TUNED == {}
    # The ops on "cuda" (recorded, nothing runs) look up the same entries.
    stored = {e["kernel_key"] for e in tuner.entries().values()}
    D = autotune.TINY
    ops_ = autotune._decode_ops(D, 4, 64, mx.float16)
    for name, (make, n, k, _) in ops_.items():
        op, args, kwargs = make(0)
        with record_launches() as rec:
            op(*args, backend="cuda", **kwargs)
        kern = rec[0][0]
        assert autotune.kernel_key(kern, "reference") in stored, name
        cls = tuner.shape_class(n, k, 1)
        key = autotune.kernel_key(kern, "reference")
        entry, = [e for e in tuner.entries().values()
                  if e["kernel_key"] == key and e["shape_class"] == cls]
        assert entry["params"] == chosen[(key, cls)], name
        # A kept default looks up as None (the op's own default applies).
        assert autotune.lookup_linear(kern, n, k, 1, "reference") == looked_up(entry), name


def test_linear_rejects_a_format_other_than_its_weights():
    """A Weight carries its format; a different group_size or bits next to it would be
    ignored, so it is an error (the Weight's own values, repeated, are fine)."""
    w = _qw(32, 128, 4, 64)
    x = mx.ones((1, 128), mx.float16)
    with pytest.raises(ValueError, match="'group_size'=32 differs from the Weight's "
                                         "group_size=64"):
        linear(x, w, group_size=32, backend="reference")
    with pytest.raises(ValueError, match="'bits'=8"):
        linear(x, w, bits=8, backend="reference")
    want = linear(x, w, backend="reference")
    assert mx.array_equal(linear(x, w, group_size=64, bits=4, backend="reference"), want).item()


def test_struct_pack_errors_name_the_field():
    import core_kernels as ck

    with pytest.raises(ValueError, match=r"AxpbParams\.n \(u32\) cannot hold -1"):
        ck.AxpbParams(n=-1, a=1.0, b=0.0).pack()
    with pytest.raises(TypeError, match=r"AxpbParams\.a is f32 and must be a number but "
                                        r"got str"):
        ck.AxpbParams(n=3, a="x", b=0.0).pack()
    with pytest.raises(TypeError, match=r"AxpbParams\.n is u32 and must be an int"):
        ck.AxpbParams(n=3.0, a=1.0, b=0.0).pack()
    # Overflow of a float field names it too (Python's struct raises OverflowError there).
    with pytest.raises(ValueError, match=r"AxpbParams\.a \(f32\) cannot hold 1e\+39"):
        ck.AxpbParams(n=3, a=1e39, b=0.0).pack()
    # NumPy scalars pack as the Python numbers they hold.
    assert (ck.AxpbParams(n=np.uint32(3), a=np.float32(1.5), b=np.float64(0.0)).pack()
            == ck.AxpbParams(n=3, a=1.5, b=0.0).pack())
