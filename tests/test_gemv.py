"""GEMV stages and epilogues: references, dispatch, assembled source, CUDA compile check."""

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlx_foundry import ChainError, CompoundKernel, Output
from mlx_foundry.args import Bound
from mlx_foundry.inspection import cuda_source_of
from mlx_foundry.ops.linear import gate_up_kernel, linear_kernel, qkv_kernel
from mlx_foundry.stages.epilogues import activation_epilogue, swiglu_epilogue
from mlx_foundry.stages.gemv import (DEFAULT_ROWS, DEFAULT_THREADS, XSTAGE_MAX_BYTES, gemv_decls,
                                     gemv_dispatch, gemv_stage, rope_rotate, xstage_units)
from mlx_foundry.policies.affine import affine_policy
from mlx_foundry.policies.dense import dense_policy

from nvrtc_like_mlx import compile_like_mlx, nvcc_and_mlx_headers, nvcc_compile
from tolerances import assert_close


def _affine_args(n, k, bits=4, gs=64, dtype=mx.float16, prefix="w"):
    wq, s, b = mx.quantize(mx.random.normal((n, k)).astype(dtype), group_size=gs, bits=bits)
    return {prefix: wq, f"{prefix}_scales": s, f"{prefix}_biases": b}


def test_gemv_stage_reference():
    decls = gemv_decls()
    st = gemv_stage(affine_policy(4, 64, "w"), decls)
    x = mx.random.normal((3, 128))
    args = _affine_args(40, 128, dtype=mx.float32)
    got = st.reference(Bound(x=x, **args), {})["acc"]
    want = mx.quantized_matmul(x, args["w"], args["w_scales"], args["w_biases"],
                               transpose=True, group_size=64, bits=4)
    assert got.shape == (3, 40)
    assert_close(got, want, mx.float32, k=128)


def test_gemv_stage_reference_with_norm_weight():
    decls = gemv_decls("weight")
    st = gemv_stage(dense_policy("w"), decls)
    x, g, w = mx.random.normal((2, 64)), mx.random.normal((64,)), mx.random.normal((8, 64))
    got = st.reference(Bound(x=x, norm_weight=g, w=w), {})["acc"]
    assert_close(got, (x * g) @ w.T, mx.float32, k=64)


# Batch rows on x; row blocks on y, then z in steps of 32768 (CUDA caps y and z at 65535).
@pytest.mark.parametrize("rows,threads,n,m,groups", [
    (4, 128, 100, 1, (1, 7, 1)), (4, 128, 16, 3, (3, 1, 1)), (2, 64, 151936, 1, (1, 32768, 2)),
    (1, 32, 262145, 2, (2, 32768, 9)), (8, 256, 4096, 6, (6, 64, 1))])
def test_dispatch(rows, threads, n, m, groups):
    d = gemv_dispatch(lambda b: n)(Bound(x=mx.zeros((m, 8)), ROWS=rows, THREADS=threads))
    assert d.groups == groups and d.threads == (threads, 1, 1)


@pytest.mark.parametrize("threads,rows,match", [(100, 4, "THREADS"), (2048, 4, "THREADS"),
                                                (512, 4, r"\[32, 256\]"),
                                                (128, 0, "ROWS"), (128, 33, "ROWS")])
def test_dispatch_rejects_bad_launch(threads, rows, match):
    with pytest.raises(ValueError, match=match):
        gemv_dispatch(lambda b: 8)(Bound(x=mx.zeros((1, 8)), ROWS=rows, THREADS=threads))


@pytest.mark.parametrize("unroll", [0, 17, True, 2.0, "2"])
def test_dispatch_rejects_bad_unroll(unroll):
    with pytest.raises(ValueError, match="'UNROLL' must be an int in \\[1, 16\\]"):
        gemv_dispatch(lambda b: 8)(Bound(x=mx.zeros((1, 8)), ROWS=4, THREADS=128,
                                         UNROLL=unroll))


def test_linear_source_metal():
    k = linear_kernel(("affine", 4, 64), has_bias=True, activation="silu", has_residual=True)
    args = _affine_args(64, 256)
    src = k.source(x=mx.ones((1, 256), mx.float16), bias=mx.ones((64,), mx.float16),
                   residual=mx.ones((1, 64), mx.float16), **args)
    body = src.body
    assert "constexpr int K = 256;" in body and "constexpr int N = 64;" in body
    assert f"constexpr int ROWS = {DEFAULT_ROWS};" in body
    assert f"constexpr int THREADS = {DEFAULT_THREADS};" in body
    assert "constexpr int M = 1;" in body and "constexpr int MBLOCK = 1;" in body
    assert "constexpr int UNROLL = 1;" in body
    assert (f"gemv_main<PolicyAffine<w_S, 4, 64, K>, T, K, N, M, ROWS, {DEFAULT_THREADS // 32},"
            " 1, MBLOCK, UNROLL, XSTAGE>(wpol, x, acc, row, index, valid,") in body
    assert "gemv_partials" in body  # split-K scratch, declared by the stage
    # One row of half x, 4-bit: staged in 8 chunks x 4 planes of 16 bytes, then 8 sums of
    # chunks and 8 sums of squares (4 units of four floats).
    assert "constexpr int XSTAGE = 36;" in body
    assert "gemv_xstage" in body
    calls = [body.index(s) for s in ("gemv_main<", "ep_bias(", "ep_silu(", "ep_residual(")]
    assert calls == sorted(calls)
    assert "if (valid) { out[index] = static_cast<half>(acc); }" in body
    for name in ("struct PolicyAffine", "METAL_FUNC void gemv_main", "METAL_FUNC void ep_bias",
                 "METAL_FUNC float silu"):
        assert name in src.header
    assert src.input_names == ("w", "w_scales", "w_biases", "x", "bias", "residual")


@pytest.mark.parametrize("k, dtype, rows, sigs, units", [
    # One row of half x: K / 32 chunks x 4 planes, then K / 32 + 8 floats in 16-byte units.
    (4096, mx.float16, 1, [(4, 64)], 128 * 4 + (128 + 8) // 4),
    (14336, mx.float16, 1, [(4, 64)], 448 * 4 + (448 + 8) // 4),  # 30496 bytes: fits
    (4096, mx.bfloat16, 1, [(8, 128)], 128 * 4 + (256 + 8) // 4),  # bf16: two floats a chunk
    (256, mx.float16, 1, [(4, 64), (4, 32)], 8 * 4 + (8 + 8) // 4),  # one pair order
    (14336, mx.bfloat16, 1, [(4, 64)], 1),  # 32288 bytes: over the budget
    (4096, mx.float16, 2, [(4, 64)], 1),  # more than one row of x
    (4096, mx.float32, 1, [(4, 64)], 1),  # the float path
    (4096, mx.float16, 1, [(3, 64)], 1),  # no packed-half form of 3 bits
    (4096, mx.float16, 1, [(4, 64), (8, 64)], 1),  # two pair orders
    (4096, mx.float16, 1, [None], 1),  # dense weights
])
def test_xstage_units(k, dtype, rows, sigs, units):
    pols = [dense_policy() if s is None else affine_policy(*s) for s in sigs]
    assert xstage_units(Bound(x=mx.zeros((rows, k), dtype)), pols) == units
    assert xstage_units(Bound(x=mx.zeros((rows, k), dtype), SPLITK=0), pols) == units
    assert 16 * units <= XSTAGE_MAX_BYTES
    # Split K: each SIMD-group reads its own slice of x; nothing to share.
    assert xstage_units(Bound(x=mx.zeros((rows, k), dtype), SPLITK=1), pols) == 1


def test_launch_constants_are_overridable():
    k = linear_kernel(("dense",))
    w = mx.ones((64, 96), mx.float16)
    body = k.source(x=mx.ones((1, 96), mx.float16), w=w, ROWS=2, THREADS=256).body
    assert ("constexpr int ROWS = 2;" in body
            and ", ROWS, 8, 1, MBLOCK, UNROLL, XSTAGE>(" in body)
    # Split K: every SIMD-group of the threadgroup shares the rows.
    split = k.source(x=mx.ones((1, 96), mx.float16), w=w, ROWS=2, THREADS=256, SPLITK=1).body
    assert ("constexpr int SPLITK = 1;" in split
            and ", ROWS, 8, 8, MBLOCK, UNROLL, XSTAGE>(" in split)
    unrolled = k.source(x=mx.ones((1, 96), mx.float16), w=w, UNROLL=4).body
    assert "constexpr int UNROLL = 4;" in unrolled
    # Rows of x per SIMD-group: M comes from x, MBLOCK is a launch constant.
    multi = k.source(x=mx.ones((5, 96), mx.float16), w=w, ROWS=4, MBLOCK=3).body
    assert "constexpr int M = 5;" in multi and "constexpr int MBLOCK = 3;" in multi


@pytest.mark.parametrize("split,rows,n,groups", [(0, 4, 4096, 256), (1, 4, 4096, 1024),
                                                 (1, 2, 7, 4)])
def test_split_k_dispatch(split, rows, n, groups):
    d = gemv_dispatch(lambda b: n)(Bound(x=mx.zeros((1, 8)), ROWS=rows, THREADS=128,
                                         SPLITK=split))
    assert d.groups == (1, groups, 1)


def test_split_k_dispatch_rejects_bad_values():
    with pytest.raises(ValueError, match="'SPLITK'"):
        gemv_dispatch(lambda b: 8)(Bound(x=mx.zeros((1, 8)), ROWS=4, THREADS=128, SPLITK=2))
    # The split-K partial sums (ROWS per SIMD-group, twice when dual, plus one sum of
    # squares) must fit the THREADS floats of gemv_partials.
    with pytest.raises(ValueError, match="'ROWS' must be at most 15"):
        gemv_dispatch(lambda b: 8, dual=True)(Bound(x=mx.zeros((1, 8)), ROWS=16, THREADS=128,
                                                    SPLITK=1))
    with pytest.raises(ValueError, match="'ROWS' must be at most 31"):
        gemv_dispatch(lambda b: 8)(Bound(x=mx.zeros((1, 8)), ROWS=32, THREADS=128, SPLITK=1))
    gemv_dispatch(lambda b: 8, dual=True)(Bound(x=mx.zeros((1, 8)), ROWS=15, THREADS=128,
                                                SPLITK=1))


def test_full_metal_source_has_signature():
    k = linear_kernel(("affine", 4, 64))
    src = k.metal_source(x=mx.ones((1, 128), mx.float16), **_affine_args(32, 128))
    assert "[[kernel]] void custom_kernel_linear_affine_4_64" in src
    for attr in ("threadgroup_position_in_grid", "simdgroup_index_in_threadgroup",
                 "thread_index_in_simdgroup"):
        assert f"[[{attr}]]" in src


def test_norm_linear_source_cuda():
    k = linear_kernel(("dense",), norm="weight")
    src = k.source(x=mx.ones((1, 64), mx.bfloat16), w=mx.ones((8, 64), mx.bfloat16),
                   eps=1e-5, norm_weight=mx.ones((64,), mx.bfloat16), backend="cuda")
    assert "__shared__" in src.body and "gemv_partials[128]" in src.body
    # The GEMV stage computes inv_rms from its own x loads: no separate norm pass.
    assert "rms_norm_prologue" not in src.body
    assert "gemv_norm_main<" in src.body and "norm_weight, eps, acc, row, index, valid, inv_rms" in src.body
    assert src.body.index("gemv_norm_main") < src.body.index("ep_scale(inv_rms, acc);")


def test_swiglu_needs_acc2():
    decls = gemv_decls()
    main = gemv_stage(dense_policy("w"), decls)
    with pytest.raises(ChainError, match="acc2"):
        CompoundKernel("bad", main=main, epilogues=[swiglu_epilogue()],
                       outputs=[Output("out", shape=lambda b: (1,), dtype="x")],
                       dispatch=gemv_dispatch(lambda b: 1))


def test_activation_epilogue_rejects_unknown():
    with pytest.raises(ValueError, match="'activation'"):
        activation_epilogue("tanh")


@pytest.mark.parametrize("kind,fn", [("silu", nn.silu), ("gelu", nn.gelu),
                                     ("gelu_approx", nn.gelu_approx), ("relu", nn.relu)])
def test_activation_references_match_mlx_nn(kind, fn):
    acc = mx.random.normal((4, 33)) * 3
    got = activation_epilogue(kind).reference(Bound(), {"acc": acc})["acc"]
    assert_close(got, fn(acc), mx.float32)


@pytest.mark.parametrize("traditional", [False, True])
def test_rope_rotate_matches_fast_rope(traditional):
    m, h, d, offset = 5, 3, 16, 7
    t = mx.random.normal((m, h, d))
    inv = mx.exp(mx.arange(0, -d // 2, -1, dtype=mx.float32) * (mx.log(mx.array(10000.0)) /
                                                                 (d // 2)))
    got = rope_rotate(t, (mx.arange(m) + offset).astype(mx.float32), inv, traditional)
    want = mx.fast.rope(t.transpose(1, 0, 2)[None], d, traditional=traditional, base=10000.0,
                        scale=1.0, offset=offset)[0].transpose(1, 0, 2)
    assert_close(got, want, mx.float32)


# ---- CUDA compile check (nvcc, no GPU needed) ---------------------------------------------
def _cuda_cases():
    w4 = _affine_args(64, 256, 4, 64, mx.bfloat16)
    w3 = _affine_args(64, 256, 3, 32, mx.bfloat16)
    wd = mx.random.normal((64, 250)).astype(mx.float16)
    yield "linear_affine4", linear_kernel(("affine", 4, 64), has_bias=True, activation="gelu",
                                          has_residual=True), dict(
        x=mx.ones((1, 256), mx.bfloat16), bias=mx.ones((64,), mx.bfloat16),
        residual=mx.ones((1, 64), mx.bfloat16), **w4)
    yield "norm_linear_dense", linear_kernel(("dense",), norm="weight", activation="silu"), dict(
        x=mx.ones((1, 250), mx.float16), w=wd, eps=1e-5, norm_weight=mx.ones((250,), mx.float16))
    yield "gate_up_mixed", gate_up_kernel(("affine", 4, 64), ("affine", 3, 32)), dict(
        x=mx.ones((1, 256), mx.bfloat16), eps=1e-5, norm_weight=mx.ones((256,), mx.bfloat16),
        **{k.replace("w", "wg", 1): v for k, v in w4.items()},
        **{k.replace("w", "wu", 1): v for k, v in w3.items()})
    yield "qkv_rope", qkv_kernel(("affine", 4, 64), ("affine", 3, 32), ("dense",),
                                 traditional=True, bias=True), dict(
        q_bias=mx.ones((64,), mx.bfloat16), k_bias=mx.ones((64,), mx.bfloat16),
        v_bias=mx.ones((64,), mx.bfloat16),
        x=mx.ones((1, 1, 256), mx.bfloat16), eps=1e-5, norm_weight=mx.ones((256,), mx.bfloat16),
        **{k.replace("w", "wq", 1): v for k, v in w4.items()},
        **{k.replace("w", "wk", 1): v for k, v in w3.items()},
        wv=mx.ones((64, 256), mx.bfloat16), rope_inv_freq=mx.ones((16,)), seq_len=1,
        rope_offset=0, rope_scale=1.0, HEAD_DIM=32)


def _half_cases():
    """Kernels with half or bfloat activations: (name, kernel, kwargs, packed-half path
    expected)."""
    f16, bf16 = mx.float16, mx.bfloat16

    def ren(args, prefix):
        return {k.replace("w", prefix, 1): v for k, v in args.items()}

    x = mx.ones((1, 256), f16)
    for bits, gs in ((4, 64), (8, 32), (3, 32)):
        yield (f"linear_affine{bits}_f16", linear_kernel(("affine", bits, gs)),
               dict(x=x, **_affine_args(64, 256, bits, gs, f16)), bits in (4, 8))
    yield "linear_affine4_bf16", linear_kernel(("affine", 4, 64)), dict(
        x=x.astype(bf16), **_affine_args(64, 256, 4, 64, bf16)), True
    yield "norm_gate_up_affine8_affine4_bf16", gate_up_kernel(
        ("affine", 8, 64), ("affine", 4, 64)), dict(
        x=x.astype(bf16), eps=1e-5, norm_weight=mx.ones((256,), bf16),
        **ren(_affine_args(64, 256, 8, 64, bf16), "wg"),
        **ren(_affine_args(64, 256, 4, 64, bf16), "wu")), True
    yield "linear_affine3_bf16", linear_kernel(("affine", 3, 32)), dict(
        x=x.astype(bf16), **_affine_args(64, 256, 3, 32, bf16)), False
    yield "norm_linear_affine4_f16", linear_kernel(("affine", 4, 64), norm="weight"), dict(
        x=x, eps=1e-5, norm_weight=mx.ones((256,), f16), **_affine_args(64, 256, 4, 64, f16)), True
    norm = dict(x=x, eps=1e-5, norm_weight=mx.ones((256,), f16))
    yield "gate_up_affine4_affine8_f16", gate_up_kernel(("affine", 4, 64), ("affine", 8, 64)), dict(
        **norm, **ren(_affine_args(64, 256, 4, 64, f16), "wg"),
        **ren(_affine_args(64, 256, 8, 64, f16), "wu")), True
    yield "gate_up_affine8_dense_f16", gate_up_kernel(("affine", 8, 32), ("dense",)), dict(
        **norm, **ren(_affine_args(64, 256, 8, 32, f16), "wg"),
        wu=mx.ones((64, 256), f16)), False
    yield "qkv_rope_affine_f16", qkv_kernel(("affine", 4, 64), ("affine", 8, 32), ("affine", 4, 32),
                                            traditional=False), dict(
        x=mx.ones((1, 1, 256), f16), eps=1e-5, norm_weight=mx.ones((256,), f16),
        **ren(_affine_args(64, 256, 4, 64, f16), "wq"), **ren(_affine_args(64, 256, 8, 32, f16), "wk"),
        **ren(_affine_args(64, 256, 4, 32, f16), "wv"), rope_inv_freq=mx.ones((16,)), seq_len=1,
        rope_offset=0, rope_scale=1.0, HEAD_DIM=32), True


@pytest.mark.slow
@pytest.mark.parametrize("case", [c[0] for c in _half_cases()])
def test_half_path_is_chosen_at_compile_time(case, tmp_path):
    """x half or bfloat with 4/8-bit affine weights (every policy of the call) compiles to
    packed HFMA2 (fma.rn.f16x2); other bit widths and dense partners keep the float path."""
    _, kern, kwargs, half = next(c for c in _half_cases() if c[0] == case)
    nvcc_compile(kern, tmp_path / "k.ptx", "-ptx", **kwargs)
    n = (tmp_path / "k.ptx").read_text().count("fma.rn.f16x2")
    assert (n > 0) == half, n


@pytest.mark.slow
@pytest.mark.parametrize("case", [c[0] for c in _cuda_cases()])
def test_kernels_compile_with_nvcc(case, tmp_path):
    _, kern, kwargs = next(c for c in _cuda_cases() if c[0] == case)
    nvcc_compile(kern, tmp_path / "k.o", "-c", **kwargs)


def test_default_launch_splits_k_only_for_tall_weights():
    from mlx_foundry.ops.linear import default_launch

    # 14336 -> 4096 (down projection): eight rows, the threadgroup splits K.
    assert default_launch(4096, 14336) == {"ROWS": 8, "THREADS": 128, "SPLITK": 1,
                                           "UNROLL": 1, "MBLOCK": 1}
    # Square (o_proj), quantized: two rows without split K (x staged).
    assert default_launch(4096, 4096) == {"ROWS": 2, "THREADS": DEFAULT_THREADS,
                                          "SPLITK": 0, "UNROLL": 1, "MBLOCK": 1}
    assert default_launch(5120, 8192) == default_launch(4096, 4096)
    # A dual (gate/up) square GEMV keeps split K.
    assert default_launch(4096, 4096, dual=True)["SPLITK"] == 1
    for n, k in ((14336, 4096), (6144, 4096), (4097, 4096), (48, 512), (1024, 1024)):
        assert default_launch(n, k) == {"ROWS": DEFAULT_ROWS, "THREADS": DEFAULT_THREADS,
                                        "SPLITK": 0, "UNROLL": 1, "MBLOCK": 1}
    # Q/K/V: ROWS must divide head_dim; one row of x per threadgroup (no MBLOCK).
    assert default_launch(6144, 4096, head_dim=128) == {"ROWS": 4, "THREADS": 128,
                                                        "SPLITK": 0, "UNROLL": 1}
    assert default_launch(6144, 4096, head_dim=6)["ROWS"] == 2
    # Dense weights, one row of x, K >= 2048 and N within 4x of K either way: two rows,
    # 256 threads splitting K; otherwise the same launch as quantized weights.
    dense_row = {"ROWS": 2, "THREADS": 256, "SPLITK": 1, "UNROLL": 1, "MBLOCK": 1}
    for n, k in ((14336, 4096), (4096, 14336), (4096, 4096), (8192, 2048), (1024, 4096)):
        assert default_launch(n, k, dense=True) == dense_row, (n, k)
    for n, k, m in ((4096, 4096, 2), (14336, 4096, 2), (8193, 2048, 1), (1023, 4096, 1),
                    (4096, 2047, 1), (128256, 4096, 1)):
        assert default_launch(n, k, m=m, dense=True) == default_launch(n, k, m=m), (n, k, m)
    assert default_launch(100, 14336, head_dim=100)["ROWS"] == 2


@pytest.mark.parametrize("n,k,m,dual,want", [
    # split K (k >= n): four rows, every row of x in one SIMD-group (2, 3 rows; 7 and more:
    # 4 per SIMD-group)
    (4096, 14336, 2, False, (4, 1, 2)), (4096, 14336, 8, False, (4, 1, 4)),
    (2048, 2048, 3, False, (4, 1, 3)), (2048, 8192, 3, False, (4, 1, 3)),
    # 3 rows of x, n >= 4096: k == n without split, k >= 2 n eight rows with split
    (4096, 4096, 3, False, (4, 0, 3)), (4096, 14336, 3, False, (8, 1, 3)),
    # k >= n with 4 to 7 rows of x: eight rows without split, two blocks of rows of x;
    # with fewer than 4096 output rows that grid is too small: split K stays
    (4096, 4096, 4, False, (8, 0, 2)), (4096, 14336, 5, False, (8, 0, 3)),
    (4096, 14336, 6, False, (8, 0, 3)), (4096, 14336, 7, False, (8, 0, 4)),
    (4096, 4096, 7, False, (8, 0, 4)), (2048, 8192, 4, False, (4, 1, 4)),
    (2048, 2048, 6, False, (4, 1, 6)),
    # the gate/up GEMV: 2 for even m (4 from 8 rows when they divide), odd m up to 5 whole
    (14336, 4096, 4, True, (4, 0, 2)), (14336, 4096, 6, True, (4, 0, 2)),
    (14336, 4096, 8, True, (4, 0, 4)), (14336, 4096, 3, True, (4, 0, 3)),
    (14336, 4096, 5, True, (4, 0, 5)),
    # a dual GEMV with split K: its partial sums cap MBLOCK at 3 (4 x 3 x 2 + 3 <= 32)
    (4096, 4096, 5, True, (4, 1, 3)),
    # others: every row of x in one SIMD-group up to 8, then 8 or 4 when m is a multiple
    (14336, 4096, 3, False, (4, 0, 3)), (14336, 4096, 4, False, (4, 0, 4)),
    (14336, 4096, 6, False, (4, 0, 6)), (14336, 4096, 16, False, (4, 0, 8)),
    (14336, 4096, 12, False, (4, 0, 4)), (14336, 4096, 10, False, (4, 0, 2))])
def test_default_launch_rows_of_x(n, k, m, dual, want):
    """Several rows of x share each SIMD-group's weight loads (MBLOCK), from the H100 sweep."""
    from mlx_foundry.ops.linear import default_launch

    got = default_launch(n, k, m=m, dual=dual)
    assert (got["ROWS"], got["SPLITK"], got["MBLOCK"]) == want
    # Every choice is a valid launch for its kernel.
    d = gemv_dispatch(lambda b: n, dual=dual)(Bound(x=mx.zeros((m, 8)), **got))
    assert d.groups[0] == -(-m // want[2])


def test_mblock_stays_within_lanes_and_partial_sums():
    from mlx_foundry.ops.linear import _mblock

    assert _mblock(1, 8, 1, False) == 1
    assert _mblock(6, 8, 0, False) == 3  # two blocks of 3: 8 x 3 lanes
    assert _mblock(2, 8, 0, False) == 2  # under 4 rows of x: one block
    assert _mblock(3, 8, 0, False) == 3
    assert _mblock(8, 8, 0, False) == 4  # 8 x 4 = 32 lanes
    assert _mblock(4, 16, 0, False) == 2  # 16 x 2 = 32 lanes
    assert _mblock(6, 4, 1, True) == 3  # dual split: 4 x 3 x 2 + 3 = 27 <= 32
    assert _mblock(6, 8, 1, False) == 3  # split: 8 x 3 + 3 = 27 <= 32


@pytest.mark.parametrize("rows,mblock,split,dual,match", [
    (8, 5, 0, False, r"'MBLOCK' must be in \[1, 32 // ROWS\] = \[1, 4\]"),
    (4, 0, 0, False, "'MBLOCK'"),
    (4, 4, 1, True, "'ROWS' must be at most 3 with 'SPLITK' in a dual GEMV and MBLOCK=4"),
    (8, 4, 1, False, "'ROWS' must be at most 7 with 'SPLITK' and MBLOCK=4")])
def test_dispatch_rejects_bad_mblock(rows, mblock, split, dual, match):
    with pytest.raises(ValueError, match=match):
        gemv_dispatch(lambda b: 64, dual=dual)(Bound(x=mx.zeros((4, 8)), ROWS=rows,
                                                     THREADS=128, SPLITK=split, MBLOCK=mblock))


def test_m_is_the_rows_of_x():
    """M (a compile-time constant) sizes the kernel's bounds: it cannot differ from x."""
    x = mx.zeros((2, 96), mx.float16)
    with pytest.raises(ValueError, match=r"'M' is the number of rows of x \(2\)"):
        gemv_dispatch(lambda b: 64)(Bound(x=x, ROWS=4, THREADS=128, M=8, MBLOCK=4))
    d = gemv_dispatch(lambda b: 64)(Bound(x=x, ROWS=4, THREADS=128, M=2, MBLOCK=4))
    assert d.groups == (1, 4, 1)  # ceil(2 / 4) groups of x rows, 64 / (4 x 4) row blocks


def test_valid_launch_agrees_with_the_dispatch():
    """ops.linear.valid_launch (the tuner's filter) accepts exactly what gemv_dispatch does."""
    import itertools

    from mlx_foundry.ops.linear import valid_launch

    x = mx.zeros((3, 8))
    for rows, threads, split, mb, dual in itertools.product(
            range(1, 33), (32, 64, 96, 128, 256, 512), (0, 1), (1, 2, 3, 4, 6, 8, 16, 32),
            (False, True)):
        params = {"ROWS": rows, "THREADS": threads, "SPLITK": split, "MBLOCK": mb}
        try:
            gemv_dispatch(lambda b: 64, dual=dual)(Bound(x=x, **params))
            accepted = True
        except ValueError:
            accepted = False
        assert valid_launch(params, dual=dual) is accepted, (params, dual)


def test_tuned_mblock_is_used_when_valid(monkeypatch):
    import importlib

    from mlx_foundry.bench import autotune

    lin = importlib.import_module("mlx_foundry.ops.linear")  # the module, not the op
    kern = lin.linear_kernel(("affine", 4, 64))
    found = {"ROWS": 4, "THREADS": 128, "SPLITK": 0, "MBLOCK": 2}
    monkeypatch.setattr(autotune, "lookup_linear", lambda *a, **kw: dict(found))
    assert lin._resolve_launch(kern, "cuda", 14336, 4096, 4, None, False)["MBLOCK"] == 2
    # Tuned for 4 rows (the class of 3 and 4 rows): 3 rows of x get one block of 3.
    found.update(MBLOCK=4)
    assert lin._resolve_launch(kern, "cuda", 14336, 4096, 3, None, False)["MBLOCK"] == 3
    found.update(MBLOCK=2)
    # A stored MBLOCK this launch cannot take (16 x 4 lanes): the default for m instead.
    found.update(ROWS=16, MBLOCK=4)
    got = lin._resolve_launch(kern, "cuda", 14336, 4096, 4, None, False)
    assert got == {"ROWS": 16, "THREADS": 128, "SPLITK": 0, "UNROLL": 1,
                   "MBLOCK": lin._mblock(4, 16, 0, False)}
    # A tuned unroll count is used; an entry without one (older) gets the default.
    found.update(UNROLL=2)
    assert lin._resolve_launch(kern, "cuda", 14336, 4096, 4, None, False)["UNROLL"] == 2
    found.pop("UNROLL")
    # An entry of one row of x (no MBLOCK): the default for m (16 rows: two blocks).
    found.pop("MBLOCK")
    assert lin._resolve_launch(kern, "cuda", 14336, 4096, 4, None, False)["MBLOCK"] == 2


def _gemv_regs_tool(monkeypatch):
    """tools/gemv_regs.py as a module (its folder on sys.path for decode_shapes)."""
    from tool_loader import TOOLS, load_tool

    monkeypatch.syspath_prepend(str(TOOLS))
    return load_tool("gemv_regs")


@pytest.mark.slow
def test_gemv_regs_tool_compiles_the_staged_decode_gemvs(monkeypatch, tmp_path):
    """tools/gemv_regs.py compiles the Llama-3-8B decode GEMVs for sm_90: every case
    fits the register file without spilling, and o_proj (x staged, two rows per
    SIMD-group) stays under the 96 registers of its launch before the staging."""
    _, inc = nvcc_and_mlx_headers()
    monkeypatch.setenv("MLX_FOUNDRY_CUDA_INCLUDE", inc)
    mod = _gemv_regs_tool(monkeypatch)
    seen = {}
    for label, kernel, kwargs in mod._cases(mx.float16):
        folder = tmp_path / str(len(seen))
        folder.mkdir()
        seen[label] = mod.compile_case(kernel, kwargs, str(folder))
    assert set(seen) >= {"down_proj+residual", "gate/up", "o_proj+residual"}
    assert all(0 < regs <= 255 and spill == 0 for regs, spill in seen.values()), seen
    assert seen["o_proj+residual"][0] < 96, seen


def _small_linear():
    x = mx.random.normal((1, 512), key=mx.random.key(1)).astype(mx.float16)
    return linear_kernel(("affine", 4, 64)), dict(x=x, **_affine_args(256, 512))


def test_min_blocks_zero_leaves_every_source_as_it_was():
    """MINBLOCKS is not a line of the body: 0 (the default) gives the same sources, names
    included, as not passing it, so the default launches keep their kernels."""
    kern, args = _small_linear()
    for backend in ("metal", "cuda"):
        plain = kern.source(**args, backend=backend)
        zero = kern.source(**args, MINBLOCKS=0, backend=backend)
        assert (zero.name, zero.header, zero.body) == (plain.name, plain.header, plain.body)
        assert "MINBLOCKS" not in plain.body and "__launch_bounds__" not in plain.header


def test_min_blocks_bounds_the_cuda_kernel_mlx_declares():
    """MINBLOCKS=5 adds one line after the CUDA header that gives MLX's declaration of the
    kernel (custom_kernel_<name>) __launch_bounds__(THREADS, 5); the body and the Metal
    source do not change."""
    kern, args = _small_linear()
    plain = kern.source(**args, backend="cuda")
    bound = kern.source(**args, MINBLOCKS=5, THREADS=128, backend="cuda")
    assert bound.name != plain.name and bound.body == plain.body
    line = (f"#define custom_kernel_{bound.name}(...) __launch_bounds__(128, 5) "
            f"custom_kernel_{bound.name}(__VA_ARGS__)\n")
    assert bound.header == plain.header + line
    assert kern.source(**args, MINBLOCKS=5, backend="metal").header == \
        kern.source(**args, backend="metal").header


@pytest.mark.parametrize("blocks", [-1, 17, 3.0, True])
def test_min_blocks_out_of_range_is_an_error_naming_it(blocks):
    """A bound no SM can hold (more than 2048 threads), a negative one, or not an int."""
    from mlx_foundry.stages.gemv import check_min_blocks

    with pytest.raises(ValueError, match="MINBLOCKS"):
        check_min_blocks(blocks, 128)
    check_min_blocks(16, 128)
    check_min_blocks(0, 256)


@pytest.mark.slow
def test_min_blocks_hold_gate_up_to_five_threadgroups(monkeypatch, tmp_path):
    """With MINBLOCKS=5 (__launch_bounds__(128, 5)) the gate/up GEMV (128 registers unbounded, four
    threadgroups of 128 threads per SM) compiles to at most 65536 / (5 * 128) registers."""
    _, inc = nvcc_and_mlx_headers()
    monkeypatch.setenv("MLX_FOUNDRY_CUDA_INCLUDE", inc)
    mod = _gemv_regs_tool(monkeypatch)
    label, kernel, kwargs = next(c for c in mod._cases(mx.float16) if c[0] == "gate/up")
    assert kwargs["THREADS"] == 128
    free = mod.compile_case(kernel, kwargs, str(tmp_path))
    (tmp_path / "b").mkdir()
    bound = mod.compile_case(kernel, dict(kwargs, MINBLOCKS=5), str(tmp_path / "b"))
    assert free[0] > 65536 // (5 * 128) >= bound[0], (free, bound)


@pytest.mark.slow
def test_min_blocks_kernel_compiles_and_is_found_as_mlx_builds_it():
    """MLX compiles with NVRTC and looks the kernel up by its name, which NVRTC
    preprocesses with the source: the bound must leave that name alone (an object-like
    macro broke exactly this on the GPU while nvcc compiled it) and still hold gate/up
    to 65536 / (5 * 128) registers, as ptxas reports through NVRTC."""
    import re

    kernel, kwargs = gate_up_kernel(("affine", 4, 64), ("affine", 4, 64)), dict(
        x=mx.ones((1, 4096), mx.float16), norm_weight=mx.ones((4096,), mx.float16), eps=1e-5,
        **_affine_args(14336, 4096, prefix="wg"), **_affine_args(14336, 4096, prefix="wu"),
        ROWS=4, THREADS=128, SPLITK=0)
    regs = {}
    for blocks in (0, 5):
        src = cuda_source_of(kernel, **kwargs, MINBLOCKS=blocks)
        name = re.search(r"__global__ void (custom_kernel_\w+)\(", src).group(1)
        lowered, log = compile_like_mlx(src, name, ["--ptxas-options=-v"])
        assert name in lowered, lowered
        regs[blocks] = int(re.search(r"Used (\d+) registers", log).group(1))
    assert regs[0] > 65536 // (5 * 128) >= regs[5], regs


def test_min_blocks_reaches_the_launch_of_an_op(monkeypatch, tmp_path):
    """A MINBLOCKS in the launch constants (a tuner's or a default's) is passed to the
    kernel the op launches, as ROWS and the others are."""
    import importlib

    from mlx_foundry.bench import tuner
    from mlx_foundry.kernel import record_launches
    from mlx_foundry.ops.weights import Weight

    lin = importlib.import_module("mlx_foundry.ops.linear")
    monkeypatch.setenv(tuner.ENV_DIR, str(tmp_path))
    monkeypatch.setattr(lin, "_TUNED", {})
    default = lin.default_launch
    monkeypatch.setattr(lin, "default_launch",
                        lambda *a, **kw: dict(default(*a, **kw), MINBLOCKS=5))
    args = _affine_args(256, 512)
    w = Weight(args["w"], args["w_scales"], args["w_biases"], group_size=64, bits=4)
    with record_launches() as launches:
        lin.linear(mx.zeros((1, 512), mx.float16), w, backend="cuda")
    (_, _, kwargs), = launches
    assert kwargs["MINBLOCKS"] == 5 and kwargs["THREADS"] == 128


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_untuned_register_bound_follows_the_measured_launches(monkeypatch, tmp_path, dtype):
    """The untuned launch bounds the quantized gate/up kernel at one row of x (both
    dtypes; four rows per SIMD-group, no split K) and the tall split-K linear with
    bfloat16 x only (fp16 is slower bounded); not the dense, multi-row or tall gate/up
    launches (measured slower bounded or not measured)."""
    import importlib

    from mlx_foundry import ops
    from mlx_foundry.bench import tuner
    from mlx_foundry.kernel import record_launches
    from mlx_foundry.ops.weights import Weight

    lin = importlib.import_module("mlx_foundry.ops.linear")
    monkeypatch.setenv(tuner.ENV_DIR, str(tmp_path))
    monkeypatch.setattr(lin, "_TUNED", {})
    bf16 = dtype == mx.bfloat16
    assert lin.default_launch(14336, 4096, dual=True, dtype=dtype)["MINBLOCKS"] == 4
    assert "MINBLOCKS" not in lin.default_launch(14336, 4096, dual=True, m=2, dtype=dtype)
    assert "MINBLOCKS" not in lin.default_launch(14336, 4096, dense=True, dual=True,
                                                 dtype=dtype)
    assert ("MINBLOCKS" in lin.default_launch(4096, 14336, dtype=dtype)) == bf16
    assert "MINBLOCKS" not in lin.default_launch(4096, 4096, dtype=dtype)  # o_proj
    assert "MINBLOCKS" not in lin.default_launch(256, 4096, dual=True, dtype=dtype)  # R8 S1
    tall, gate, up = (_affine_args(n, k, dtype=dtype)
                      for n, k in ((256, 4096), (512, 256), (512, 256)))
    weight = lambda a: Weight(a["w"], a["w_scales"], a["w_biases"], group_size=64, bits=4)  # noqa: E731
    with record_launches() as launches:
        lin.linear(mx.zeros((1, 4096), dtype), weight(tall), backend="cuda")
        ops.norm_gate_up_swiglu(mx.zeros((1, 256), dtype), mx.ones((256,), dtype), 1e-5,
                                weight(gate), weight(up), backend="cuda")
    (_, _, down_kw), (_, _, gate_up_kw) = launches
    assert down_kw.get("MINBLOCKS") == (4 if bf16 else None)
    assert gate_up_kw["MINBLOCKS"] == 4


def test_load_use_distances_go_round_the_main_loop(monkeypatch):
    """tools/gemv_regs.py's load-to-use count on nvdisasm-shaped text: the longest
    backward branch is the loop; a load's distance is counted to the first instruction
    that reads one of its four registers (not one that only writes it), round the loop
    if need be; predicated instructions and 64-bit address pairs count as reads."""
    mod = _gemv_regs_tool(monkeypatch)
    sass = "\n".join([
        "        /*0000*/                   MOV R1, c[0x0][0x28] ;",
        ".L_x_1:",
        "        /*0010*/                   LDG.E.128 R20, desc[UR4][R2.64] ;",
        "        /*0020*/                   HFMA2 R9, R4, R5, R9 ;",
        "        /*0030*/                   MOV R23, RZ ;",          # writes R23: no read
        "        /*0040*/              @P0  LOP3.LUT R8, R22, 0xf, RZ, 0xc0, !PT ;",
        "        /*0050*/                   LDG.E.128 R4, desc[UR4][R10.64] ;",
        "        /*0060*/                   STG.E desc[UR4][R12.64], R9 ;",
        "        /*0070*/              @!P1 BRA `(.L_x_1) ;",
        ".L_x_2:",
        "        /*0080*/                   LDG.E.128 R20, desc[UR4][R20.64] ;",
        "        /*0090*/                   BRA `(.L_x_2) ;",
    ])
    assert len(mod.main_loop(sass)) == 7
    # R20-R23: read by the predicated LOP3 (R22) 3 instructions on; R4-R7: by the HFMA2,
    # round the loop (past the store and the branch, then the first load): 4 on.
    assert mod.load_use_distances(sass) == (7, [3, 4])
    assert mod._reads("STG.E desc[UR4][R12.64], R9") == {12, 13, 9}
    assert mod._reads("LDG.E.128 R20, desc[UR4][R20.64]") == {20, 21}
    assert mod.load_use_distances("no loop here") == (0, [])


@pytest.mark.slow
def test_fence_keeps_the_next_weights_an_iteration_ahead(monkeypatch, tmp_path):
    """As compiled for sm_90, the tall 4-bit GEMV's next weights are requested a small
    part of an iteration before their use (ptxas moves the loop's prefetch down); with
    gemv_ab's fence most of an iteration ahead (docs/bench_journal.md, session 25). If ptxas or
    the loop changes this, the finding and the fence need another look."""
    _, inc = nvcc_and_mlx_headers()
    monkeypatch.setenv("MLX_FOUNDRY_CUDA_INCLUDE", inc)
    mod = _gemv_regs_tool(monkeypatch)
    label, kernel, kwargs = next(c for c in mod._cases(mx.float16)
                                 if c[0] == "linear 14336->4096")
    assert (kwargs["ROWS"], kwargs["SPLITK"]) == (8, 1)
    try:
        mod._nvdisasm()
    except SystemExit as e:
        pytest.skip(str(e))

    def distances(kern, folder):
        folder.mkdir()
        mod.compile_case(kern, kwargs, str(folder))
        return mod.load_use_distances(mod.sass_of(str(folder)))

    n, as_is = distances(kernel, tmp_path / "as_is")
    # Four loads of x's chunk, then the eight rows' weights (the last eight).
    assert len(as_is) == 12 and max(as_is[-8:]) < n / 4, (n, as_is)
    n, fenced = distances(mod._variant_kernel("fence"), tmp_path / "fence")
    weights = fenced[:8]  # the fenced loads come first in the loop
    assert len(fenced) == 12 and min(weights) > 3 * n / 4, (n, fenced)
