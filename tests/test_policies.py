"""Weight policies: Metal struct text, composition, and the dequantize references."""

import mlx.core as mx
import pytest

from mlx_foundry.args import Bound
from mlx_foundry.ops.linear import gate_up_kernel, qkv_kernel
from mlx_foundry.policies.affine import (AFFINE_BITS, AFFINE_GROUP_SIZES, AffinePolicy,
                                         affine_policy, check_affine)
from mlx_foundry.policies.dense import DensePolicy, dense_policy

from tolerances import assert_close


def test_dense_policy_text():
    p = dense_policy("w")
    assert isinstance(p, DensePolicy) and p is dense_policy("w")
    assert p.metal_type() == "PolicyDense<w_W, K>"
    assert p.init_code("wpol") == ["PolicyDense<w_W, K> wpol;", "wpol.w = w;"]
    assert [a.name for a in p.args] == ["w", "w_W"]


def test_affine_policy_text():
    p = affine_policy(3, 128, "wq")
    assert isinstance(p, AffinePolicy)
    assert p.metal_type() == "PolicyAffine<wq_S, 3, 128, K>"
    assert p.init_code("q") == ["PolicyAffine<wq_S, 3, 128, K> q;", "q.w = wq;",
                                "q.scales = wq_scales;", "q.biases = wq_biases;"]
    assert [a.name for a in p.args] == ["wq", "wq_scales", "wq_biases", "wq_S"]


def test_half_pairs_match_the_metal_structs():
    """The host's ``half_pairs`` (which sizes the GEMV's staged x) is the Metal structs'
    HALF_PAIRS: 4 for 4 bits, 2 for 8 bits, 0 otherwise and for dense weights."""
    from mlx_foundry.sources import load

    affine = load("policies/affine.metal")
    assert "HALF_PAIRS = BITS == 4 ? 4 : (BITS == 8 ? 2 : 0)" in affine
    assert [affine_policy(b, 64).half_pairs for b in AFFINE_BITS] == [
        4 if b == 4 else 2 if b == 8 else 0 for b in AFFINE_BITS]
    assert "HALF_PAIRS = 0" in load("policies/dense.metal")
    assert dense_policy("w").half_pairs == 0


@pytest.mark.parametrize("bits", [1, 7, 16, "4", True])
def test_affine_rejects_bits(bits):
    with pytest.raises(ValueError, match="'bits'"):
        check_affine(bits, 64)


@pytest.mark.parametrize("gs", [16, 48, 256, None])
def test_affine_rejects_group_size(gs):
    with pytest.raises(ValueError, match="'group_size'"):
        check_affine(4, gs)


@pytest.mark.parametrize("bits", AFFINE_BITS)
@pytest.mark.parametrize("group_size", AFFINE_GROUP_SIZES)
def test_affine_dequantize_matches_mlx(bits, group_size):
    w = mx.random.normal((24, 256))
    wq, s, b = mx.quantize(w, group_size=group_size, bits=bits)
    p = affine_policy(bits, group_size, "w")
    got = p.dequantize(Bound(w=wq, w_scales=s, w_biases=b))
    assert got.dtype == mx.float32
    assert_close(got, mx.dequantize(wq, s, b, group_size=group_size, bits=bits), mx.float32)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32])
def test_dense_dequantize(dtype):
    w = mx.random.normal((5, 7)).astype(dtype)
    got = dense_policy("w").dequantize(Bound(w=w))
    assert got.dtype == mx.float32
    assert_close(got, w.astype(mx.float32), mx.float32)


def _affine(n, k, bits=4, gs=64, dtype=mx.float16):
    return mx.quantize(mx.random.normal((n, k)).astype(dtype), group_size=gs, bits=bits)


def test_two_policies_in_one_kernel():
    """Gate (4-bit) and up (dense) in one kernel: two struct values, no macro switches."""
    k = gate_up_kernel(("affine", 4, 64), ("dense",))
    wg, sg, bg = _affine(64, 128)
    wu = mx.random.normal((64, 128)).astype(mx.float16)
    src = k.source(x=mx.ones((1, 128), mx.float16), wg=wg, wg_scales=sg, wg_biases=bg, wu=wu,
                   eps=1e-5, norm_weight=mx.ones((128,), mx.float16))
    assert "PolicyAffine<wg_S, 4, 64, K> gpol;" in src.body
    # paired with a quantized policy, the dense one reads the quantized chunk (32)
    assert "PolicyDense<wu_W, K, 32> upol;" in src.body
    assert "#define" not in src.header
    assert src.header.count("struct PolicyAffine {") == 1
    assert src.header.count("struct PolicyDense {") == 1


def test_three_affine_policies_share_one_header():
    k = qkv_kernel(("affine", 4, 64), ("affine", 8, 32), ("affine", 3, 128))
    src = k.source(
        x=mx.ones((1, 1, 128), mx.float16), **dict(zip(("wq", "wq_scales", "wq_biases"),
                                                      _affine(64, 128, 4, 64))),
        **dict(zip(("wk", "wk_scales", "wk_biases"), _affine(32, 128, 8, 32))),
        **dict(zip(("wv", "wv_scales", "wv_biases"), _affine(32, 128, 3, 128))),
        eps=1e-5, norm_weight=mx.ones((128,), mx.float16), rope_inv_freq=mx.ones((8,)),
        seq_len=1, rope_offset=0, rope_scale=1.0, HEAD_DIM=16)
    for text in ("PolicyAffine<wq_S, 4, 64, K> qpol;", "PolicyAffine<wk_S, 8, 32, K> kpol;",
                 "PolicyAffine<wv_S, 3, 128, K> vpol;"):
        assert text in src.body
    assert src.header.count("struct PolicyAffine") == 1
