"""Interleaved affine weights (``ops.interleave``, ``policies/affine_rows.py``) on the CPU.

``interleave`` rearranges MLX's ``(weight, scales, biases)`` so that each row is one
stream: records of 512 elements, each its weight words followed by one
``(scale, bias)`` word per group, rows padded to a multiple of four words. Checked here
without a GPU: the round trip back to MLX's layout, the layout itself against a NumPy
construction from ``affine_rows.metal``'s description, the ops' results on the reference
backend and on MLX's prefill path against the same weights in MLX's layout (and a plain
oracle), the errors, the generated sources, a CUDA compile check (slow; skipped without
nvcc and MLX's CUDA headers) and the bench's interleaved cases on the reference backend.
"""

import importlib
import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_foundry import catalog, ops
from mlx_foundry.ops import InterleavedWeight, Weight, interleave
from mlx_foundry.ops.linear import linear_kernel
from mlx_foundry.policies.affine_rows import (RECORD, AffineRowsPolicy, affine_rows_policy,
                                              deinterleave_arrays, interleave_arrays,
                                              row_words)

from nvrtc_like_mlx import nvcc_compile
from tolerances import assert_close

lin = importlib.import_module("mlx_foundry.ops.linear")

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
SCALE_DTYPES = [mx.float16, mx.bfloat16]
SCALE_IDS = ["f16", "bf16"]
X_DTYPES = [mx.float16, mx.bfloat16, mx.float32]
X_IDS = ["f16", "bf16", "f32"]


def _k_values(group_size):
    """K under one record, K past whole records (a short last record), K = 8 records."""
    short = {32: 96, 64: 192, 128: 384}[group_size]
    ragged = 960 if group_size < 128 else 1152
    return (short, ragged, 4096)


def _pair(n, k, bits=4, gs=64, dtype=mx.float16, bias=False, seed=0):
    """The same values as a Weight in MLX's layout and interleaved (2-byte scales: float16
    beside float32 activations)."""
    mx.random.seed(seed)
    sdt = mx.float16 if dtype == mx.float32 else dtype
    w = (mx.random.normal((n, k)) / k ** 0.5).astype(sdt)
    b = mx.random.normal((n,)).astype(dtype) if bias else None
    wq, s, bi = mx.quantize(w, group_size=gs, bits=bits)
    plain = Weight(wq, s, bi, b, group_size=gs, bits=bits)
    return plain, interleave(plain)


def _equal(got, want, msg=""):
    """Same shape, dtype and bits, array by array."""
    got = (got,) if isinstance(got, mx.array) else tuple(got)
    want = (want,) if isinstance(want, mx.array) else tuple(want)
    assert len(got) == len(want), msg
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (msg, g.shape, w.shape, g.dtype,
                                                           w.dtype)
        assert mx.array_equal(g, w).item(), (
            f"{msg}: max diff {mx.abs(g.astype(mx.float32) - w.astype(mx.float32)).max().item()}")


# ---------------------------------------------------------------------------------------
# 1. Round trip, shape, row_words, padding
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES, ids=SCALE_IDS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("bits", BITS)
def test_round_trip_shape_and_padding(bits, group_size, scale_dtype):
    """Every format, K short / ragged / 8 records, N 1, 3, 33: mlx_arrays() gives MLX's
    arrays back exactly; the packed shape is [N, row_words]; the pad words are zero."""
    mx.random.seed(bits * 1000 + group_size)
    for k in _k_values(group_size):
        used = k * bits // 32 + k // group_size
        words = row_words(k, bits, group_size)
        assert words % 4 == 0 and words == math.ceil(used / 4) * 4 and words - used < 4, k
        for n in (1, 3, 33):
            w = mx.random.normal((n, k)).astype(scale_dtype)
            wq, s, b = mx.quantize(w, group_size=group_size, bits=bits)
            assert s.dtype == scale_dtype
            rows = interleave(Weight(wq, s, b, group_size=group_size, bits=bits))
            assert isinstance(rows, InterleavedWeight)
            assert rows.weight.shape == (n, words) and rows.weight.dtype == mx.uint32
            assert (rows.in_features, rows.out_features) == (k, n)
            assert rows.scale_dtype == scale_dtype
            _equal(rows.mlx_arrays(), (wq, s, b), f"k={k} n={n}")
            assert not np.array(rows.weight)[:, used:].any(), f"pad words k={k} n={n}"


def test_array_functions_alone_round_trip():
    """interleave_arrays / deinterleave_arrays without the Weight wrapper (one case)."""
    mx.random.seed(11)
    wq, s, b = mx.quantize(mx.random.normal((4, 1536)).astype(mx.bfloat16), group_size=128,
                           bits=6)
    packed = interleave_arrays(wq, s, b, 6, 128)
    assert packed.shape == (4, row_words(1536, 6, 128))
    _equal(deinterleave_arrays(packed, 1536, 6, 128, mx.bfloat16), (wq, s, b))


# ---------------------------------------------------------------------------------------
# 2. The layout, built by hand from affine_rows.metal's description
# ---------------------------------------------------------------------------------------
def _bits16(a):
    """The 16 bits of each float16 or bfloat16 element (NumPy has no bfloat16)."""
    if a.dtype == mx.float16:
        return np.array(a).view(np.uint16)
    return np.array(a.view(mx.uint16))


def _expected_rows(wq, s, b, k, bits, gs):
    """The packed rows as affine_rows.metal describes them, with NumPy: records of 512
    elements (the last shorter), each its weight words then one word per group holding
    the scale's 16 bits low and the bias's high; rows padded to a multiple of 4 words."""
    w = np.array(wq)
    s16, b16 = _bits16(s).astype(np.uint32), _bits16(b).astype(np.uint32)
    rows = []
    for r in range(w.shape[0]):
        out = []
        for start in range(0, k, RECORD):
            count = min(RECORD, k - start)
            out += list(w[r, start * bits // 32:(start + count) * bits // 32])
            for g in range(start // gs, (start + count) // gs):
                out.append(s16[r, g] | (b16[r, g] << 16))
        out += [0] * (-len(out) % 4)
        rows.append(out)
    return np.array(rows, dtype=np.uint32)


def test_layout_matches_the_metal_description():
    """N=2, K=1024+128 (two full records and one of 128 elements), 4-bit, group 64,
    float16: the packed array equals the hand-built one word for word."""
    mx.random.seed(3)
    n, k, bits, gs = 2, 1024 + 128, 4, 64
    wq, s, b = mx.quantize(mx.random.normal((n, k)).astype(mx.float16), group_size=gs,
                           bits=bits)
    got = np.array(interleave(Weight(wq, s, b, group_size=gs, bits=bits)).weight)
    want = _expected_rows(wq, s, b, k, bits, gs)
    # 144 weight words + 18 group words = 162, padded to 164.
    assert want.shape == (2, 164) == got.shape
    np.testing.assert_array_equal(got, want)
    # Spot checks on the record boundaries: record 1 starts at word 64 + 8 = 72, its
    # group words follow its 64 weight words; the short record's follow its 16.
    np.testing.assert_array_equal(got[:, 72:136], np.array(wq)[:, 64:128])
    assert (got[0, 136] & 0xFFFF) == np.array(s).view(np.uint16)[0, 8]
    assert (got[1, 161] >> 16) == np.array(b).view(np.uint16)[1, 17]


def test_layout_matches_the_metal_description_bf16_3bit():
    """The same construction at 3 bits, group 32, bfloat16, K=96 (one short record)."""
    mx.random.seed(4)
    n, k, bits, gs = 3, 96, 3, 32
    wq, s, b = mx.quantize(mx.random.normal((n, k)).astype(mx.bfloat16), group_size=gs,
                           bits=bits)
    got = np.array(interleave(Weight(wq, s, b, group_size=gs, bits=bits)).weight)
    np.testing.assert_array_equal(got, _expected_rows(wq, s, b, k, bits, gs))


# ---------------------------------------------------------------------------------------
# 3. Results on the reference backend
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("dtype", X_DTYPES, ids=X_IDS)
def test_reference_linear_equals_mlx_layout(dtype, m):
    """linear(x, interleaved) == linear(x, original) bit for bit on the reference backend,
    with a bias, SiLU and a residual (K = 1152: a short last record)."""
    n, k = 40, 1152
    plain, rows = _pair(n, k, 4, 64, dtype, bias=True, seed=m)
    mx.random.seed(100 + m)
    x = mx.random.normal((m, k)).astype(dtype)
    r = mx.random.normal((m, n)).astype(dtype)
    got = ops.linear(x, rows, activation="silu", residual=r, backend="reference")
    assert got.shape == (m, n) and got.dtype == dtype
    _equal(got, ops.linear(x, plain, activation="silu", residual=r, backend="reference"))


@pytest.mark.parametrize("bits,gs", [(2, 32), (3, 32), (5, 64), (6, 32), (8, 64)])
def test_reference_linear_equals_mlx_layout_other_formats(bits, gs):
    """The other bit widths, plain linear, 2 rows of float32 x: the same bits."""
    plain, rows = _pair(17, 1088, bits, gs, mx.float32, seed=bits)
    mx.random.seed(7)
    x = mx.random.normal((2, 1088))
    _equal(ops.linear(x, rows, backend="reference"), ops.linear(x, plain, backend="reference"))


@pytest.mark.parametrize("bits,gs", [(4, 64), (3, 32), (8, 128)])
def test_reference_linear_against_plain_oracle(bits, gs):
    """The reference over interleaved weights against x @ dequantize(w, s, b).T in float32
    (scales and biases as float32: exact), and against a float64 NumPy dequantization."""
    n, k = 24, 1152
    plain, rows = _pair(n, k, bits, gs, mx.float32, seed=bits + gs)
    mx.random.seed(5)
    x = mx.random.normal((3, k))
    got = ops.linear(x, rows, backend="reference")
    wq, s, b = plain.weight, plain.scales, plain.biases
    dense = mx.dequantize(wq, s.astype(mx.float32), b.astype(mx.float32), group_size=gs,
                          bits=bits)
    _equal(got, x @ dense.T)  # the reference is this computation: the same bits
    # float64, from the bits: element i of a row is bits [i*bits, (i+1)*bits) of the
    # row's little-endian bit stream.
    stream = np.unpackbits(np.array(wq).view(np.uint8), axis=1, bitorder="little")
    q = (stream.reshape(n, k, bits) * (1 << np.arange(bits))).sum(-1).astype(np.float64)
    deq = (q * np.repeat(np.array(s.astype(mx.float32)), gs, 1)
           + np.repeat(np.array(b.astype(mx.float32)), gs, 1))
    want = np.array(x).astype(np.float64) @ deq.T
    np.testing.assert_allclose(np.array(got), want, rtol=1e-5, atol=1e-4)
    assert_close(got, mx.array(want.astype(np.float32)), mx.float32, k=k)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=["f16", "bf16"])
def test_reference_gate_up_equals_mlx_layout(dtype):
    """norm_gate_up_swiglu: both weights interleaved, and gate interleaved beside a plain
    8-bit up, give the same bits as MLX's layout (1 and 3 rows)."""
    d, inter = 1088, 72
    g_plain, g_rows = _pair(inter, d, 4, 64, dtype, seed=1)
    u_plain, u_rows = _pair(inter, d, 4, 64, dtype, seed=2)
    u8_plain, _ = _pair(inter, d, 8, 32, dtype, seed=3)
    mx.random.seed(9)
    gamma = mx.random.normal((d,)).astype(dtype)
    for m in (1, 3):
        x = mx.random.normal((m, d)).astype(dtype)

        def run(g, u):
            return ops.norm_gate_up_swiglu(x, gamma, 1e-5, g, u, backend="reference")

        _equal(run(g_rows, u_rows), run(g_plain, u_plain), f"both m={m}")
        _equal(run(g_rows, u8_plain), run(g_plain, u8_plain), f"mixed m={m}")


@pytest.mark.parametrize("joint_kv", [False, True])
def test_reference_qkv_rope_equals_mlx_layout(joint_kv):
    """norm_qkv_rope with interleaved q/k/v (4/2 heads x 32, K = 576, biases) gives the
    same bits as MLX's layout, joint K/V or not."""
    d, hd, nh, nkv, dt = 576, 32, 4, 2, mx.float16
    pairs = [_pair(h * hd, d, 4, 64, dt, bias=True, seed=20 + h) for h in (nh, nkv, nkv)]
    mx.random.seed(21)
    gamma = mx.random.normal((d,)).astype(dt)
    x = mx.random.normal((1, 2, d)).astype(dt)

    def run(ws):
        return ops.norm_qkv_rope(x, gamma, 1e-5, *ws, n_heads=nh, n_kv_heads=nkv,
                                 head_dim=hd, offset=7, rope_base=10000.0, joint_kv=joint_kv,
                                 backend="reference")

    got = run([p[1] for p in pairs])
    assert len(got) == (2 if joint_kv else 3)
    _equal(got, run([p[0] for p in pairs]))


# ---------------------------------------------------------------------------------------
# 4. Prefill (MLX's own kernels, over a copy in MLX's layout)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [mx.float16, mx.float32], ids=["f16", "f32"])
def test_prefill_equals_mlx_layout(dtype):
    """More than PREFILL_ROWS rows without backend= (MLX's quantized_matmul on the CPU):
    the interleaved weight gives the same bits as the original, linear and gate/up."""
    m = lin.PREFILL_ROWS + 2
    d, n = 576, 40
    plain, rows = _pair(n, d, 4, 64, dtype, bias=True, seed=30)
    g_plain, g_rows = _pair(n, d, 4, 64, dtype, seed=31)  # gate/up take no bias
    u_plain, u_rows = _pair(n, d, 4, 64, dtype, seed=33)
    mx.random.seed(32)
    x = mx.random.normal((m, d)).astype(dtype)
    r = mx.random.normal((m, n)).astype(dtype)
    _equal(rows.matmul(x), plain.matmul(x), "matmul")
    got = ops.linear(x, rows, activation="silu", residual=r)
    _equal(got, ops.linear(x, plain, activation="silu", residual=r), "linear")
    gamma = mx.random.normal((d,)).astype(dtype)
    _equal(ops.norm_gate_up_swiglu(x, gamma, 1e-5, g_rows, u_rows),
           ops.norm_gate_up_swiglu(x, gamma, 1e-5, g_plain, u_plain), "gate/up")


# ---------------------------------------------------------------------------------------
# 5. Errors
# ---------------------------------------------------------------------------------------
def _packed(n=4, k=256, bits=4, gs=64):
    return mx.zeros((n, row_words(k, bits, gs)), mx.uint32)


def test_interleave_rejects_dense_float32_and_non_weights():
    """interleave: a dense Weight, float32 scales, and something not a Weight."""
    with pytest.raises(ValueError, match=r"\[interleave\] 'weight' must be affine quantized"):
        interleave(Weight(mx.zeros((4, 64), mx.float16)))
    wq, s, b = mx.quantize(mx.zeros((4, 128)), group_size=64, bits=4)
    assert s.dtype == mx.float32
    with pytest.raises(ValueError, match=r"'scales' must have dtype float16 or bfloat16"):
        interleave(Weight(wq, s, b, group_size=64, bits=4))
    with pytest.raises(TypeError, match=r"'weight' must be a mlx_foundry.ops.Weight but got "
                                        r"tuple"):
        interleave((wq, s, b))


@pytest.mark.parametrize("make,exc,match", [
    (lambda: InterleavedWeight(_packed()[:, :-4], 256, mx.float16), ValueError,
     r"Interleaved 'weight' must have 36 words per row for in_features=256, bits=4, "
     r"group_size=64 but has shape \(4, 32\)"),
    (lambda: InterleavedWeight(_packed().astype(mx.int32), 256, mx.float16), ValueError,
     r"Interleaved 'weight' must be a 2-D uint32 array but has shape \(4, 36\), int32"),
    (lambda: InterleavedWeight(_packed()[0], 256, mx.float16), ValueError,
     r"Interleaved 'weight' must be a 2-D uint32 array but has shape \(36,\)"),
    (lambda: InterleavedWeight(_packed(), 96, mx.float16), ValueError,
     r"'in_features' must be a positive multiple of group_size 64 but got 96"),
    (lambda: InterleavedWeight(_packed(), True, mx.float16), ValueError,
     r"'in_features' must be a positive multiple .* got True"),
    (lambda: InterleavedWeight(_packed(), 256, mx.float32), ValueError,
     r"'scale_dtype' must have dtype float16 or bfloat16 .* float32"),
    (lambda: InterleavedWeight(np.zeros((4, 36), np.uint32), 256, mx.float16), TypeError,
     r"'weight' must be an mlx.core.array"),
], ids=["words", "dtype", "1d", "in_features", "bool", "scale_dtype", "numpy"])
def test_interleaved_weight_rejects(make, exc, match):
    """InterleavedWeight's own checks, each naming the argument."""
    with pytest.raises(exc, match=r"\[InterleavedWeight\] " + match):
        make()


def test_linear_rejects_x_of_another_width():
    """ops.linear with an interleaved weight and x whose last dimension is not K."""
    _, rows = _pair(8, 256, seed=40)
    for backend in ("reference", None):
        with pytest.raises(ValueError, match=r"\[linear\] The last dimension of 'x' must "
                                             r"equal the weight's input dimension K=256"):
            ops.linear(mx.zeros((1, 192), mx.float16), rows, backend=backend)


# ---------------------------------------------------------------------------------------
# 6. Identity, repr, signature, policy
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale_dtype,name", [(mx.float16, "float16"),
                                              (mx.bfloat16, "bfloat16")])
def test_identity_repr_signature(scale_dtype, name):
    """interleave(interleaved) is the same object; repr names the class and the scale
    dtype; signature() and the policy carry the format."""
    _, rows = _pair(8, 256, 4, 64, scale_dtype, seed=41)
    assert interleave(rows) is rows
    text = repr(rows)
    assert text.startswith("InterleavedWeight(") and f"scales {name}" in text
    assert "in_features=256" in text and "out_features=8" in text
    assert rows.signature() == ("affine_rows", 4, 64, name)
    pol = rows.policy("w")
    assert isinstance(pol, AffineRowsPolicy)
    assert pol.signature() == affine_rows_policy(4, 64, scale_dtype).signature()
    assert pol.signature() == ("affine_rows", 4, 64, name, "w")
    assert pol.headers == ("policies/affine.metal", "policies/affine_rows.metal")
    assert pol.header == "policies/affine_rows.metal"
    metal = "half" if name == "float16" else "bfloat16_t"
    assert pol.metal_type() == f"PolicyAffineRows<{metal}, 4, 64, K>"
    assert set(rows.inputs("wq")) == {"wq"}


# ---------------------------------------------------------------------------------------
# 7. Sources
# ---------------------------------------------------------------------------------------
ROWS_ENTRIES = [e.name for e in catalog.entries() if "rows_" in e.name]


def test_catalog_has_interleaved_entries():
    """The catalog walks interleaved weights for linear, gate/up and Q/K/V."""
    assert len(ROWS_ENTRIES) >= 9, ROWS_ENTRIES
    for op in ("linear_rows_", "norm_gate_up_swiglu_rows_", "norm_qkv_rope_rows_"):
        assert any(n.startswith(op) for n in ROWS_ENTRIES), op


@pytest.mark.parametrize("name", ROWS_ENTRIES)
def test_catalog_rows_entries_include_both_headers(name):
    """Each interleaved catalog kernel builds; its header holds affine.metal's helpers
    and then affine_rows.metal's struct."""
    program, args, kwargs = catalog.get(name).build()
    src = program.source(*args, backend="metal", **kwargs)
    assert src.body and src.name.startswith(program.name)
    header = src.header
    at_affine = header.find("struct PolicyAffine ")
    at_rows = header.find("struct PolicyAffineRows")
    assert at_affine >= 0 and at_rows >= 0, name
    assert at_affine < at_rows
    assert header.count("struct PolicyAffineRows") == 1
    assert "PolicyAffineRows<" in src.body


def test_interleaved_source_differs_from_mlx_layout():
    """The linear kernel over an interleaved weight is another kernel (name and source)
    than the one over MLX's layout of the same weight."""
    rows_p, rows_a, rows_k = catalog.get("linear_rows_q4g64_f16").build()
    mlx_p, mlx_a, mlx_k = catalog.get("linear_q4g64_f16").build()
    rows_src = rows_p.source(*rows_a, backend="metal", **rows_k)
    mlx_src = mlx_p.source(*mlx_a, backend="metal", **mlx_k)
    assert rows_p.name != mlx_p.name and rows_src.name != mlx_src.name
    assert rows_src.body != mlx_src.body and rows_src.header != mlx_src.header
    assert "PolicyAffineRows" not in mlx_src.header
    assert "w_scales" in mlx_src.input_names and "w_scales" not in rows_src.input_names


# ---------------------------------------------------------------------------------------
# 8. CUDA compile (nvcc + MLX's CUDA headers; skipped otherwise)
# ---------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("bits,gs,half", [(4, 64, True), (3, 32, False)])
def test_half_path_with_interleaved_weights(bits, gs, half, tmp_path):
    """float16 x with a 4-bit interleaved weight compiles to packed HFMA2 (fma.rn.f16x2);
    a 3-bit one keeps the float path."""
    _, rows = _pair(64, 256, bits, gs, mx.float16, seed=50 + bits)
    kern = linear_kernel(rows.signature())
    nvcc_compile(kern, tmp_path / "k.ptx", "-ptx", x=mx.ones((1, 256), mx.float16),
                 **rows.inputs("w"))
    n = (tmp_path / "k.ptx").read_text().count("fma.rn.f16x2")
    assert (n > 0) == half, n


# ---------------------------------------------------------------------------------------
# 9. Bench cases on the reference backend
# ---------------------------------------------------------------------------------------
def test_bench_interleaved_cases_run_on_the_reference():
    """bench.run(only=["interleaved"]) on the reference backend runs the two interleaved
    linear cases and the interleaved MLP block, each "ok" (results checked against
    MLX's layout by the bench)."""
    from mlx_foundry import bench

    res = bench.run(backend="reference", quick=True, only=["interleaved"], progress=False)
    got = res["cases"]
    assert len(got) == 3, [c["name"] for c in got]
    assert sum(c["op"] == "linear (interleaved)" for c in got) == 2
    assert sum(c["op"] == "decode MLP block (interleaved)" for c in got) == 1
    for c in got:
        assert "rows" in c["name"], c["name"]
        assert c["status"] == "ok", c
        assert c["baseline_us"] > 0 and c["ours_us"] > 0 and c["speedup"] > 0, c
