"""CPU tests: RMSNorm / add+RMSNorm references vs MLX, validation, source assembly."""

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mlx_foundry as mf
from mlx_foundry.ops import add_rms_norm, rms_norm
from mlx_foundry.stages import norm as N
from tolerances import assert_close

DTYPES = [mx.float16, mx.bfloat16, mx.float32]
SHAPES = [(1, 4096), (7, 2880), (3, 4128), (2, 3, 100), (5, 7), (1, 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm_reference_matches_mlx(dtype, shape, with_weight):
    x = mx.random.normal(shape).astype(dtype)
    w = (1 + 0.1 * mx.random.normal((shape[-1],))).astype(dtype) if with_weight else None
    got = rms_norm(x, w, 1e-5, backend="reference")
    assert got.dtype == dtype and got.shape == x.shape
    assert_close(got, mx.fast.rms_norm(x, w, 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_weight", [True, False])
def test_add_rms_norm_reference_matches_mlx(dtype, with_weight):
    x = mx.random.normal((3, 2880)).astype(dtype)
    r = mx.random.normal((3, 2880)).astype(dtype)
    w = mx.random.normal((2880,)).astype(dtype) if with_weight else None
    y, h = add_rms_norm(x, r, w, 1e-6, backend="reference")
    assert_close(h, x + r, dtype)
    assert_close(y, mx.fast.rms_norm(x + r, w, 1e-6), dtype)


@pytest.mark.parametrize("x_dtype, w_dtype, out", [(mx.float16, mx.float32, mx.float32),
                                                   (mx.float32, mx.float16, mx.float32),
                                                   (mx.bfloat16, mx.float16, mx.float32)])
def test_rms_norm_weight_of_another_dtype_promotes_like_mlx(x_dtype, w_dtype, out):
    """As mx.fast.rms_norm: both cast to the promoted dtype, which the output has."""
    mx.random.seed(3)
    x = mx.random.normal((3, 200)).astype(x_dtype)
    w = (1 + 0.5 * mx.random.normal((200,))).astype(w_dtype)
    want = mx.fast.rms_norm(x, w, 1e-5)
    got = rms_norm(x, w, 1e-5, backend="reference")
    assert got.dtype == want.dtype == out and got.shape == x.shape
    assert_close(got, want, got.dtype)


def test_add_rms_norm_weight_of_another_dtype():
    """The norm promotes as rms_norm (and mx.fast.rms_norm) does; h keeps the dtype of x."""
    mx.random.seed(4)
    x = mx.random.normal((3, 130)).astype(mx.float16)
    r = mx.random.normal((3, 130)).astype(mx.float16)
    w = (1 + 0.5 * mx.random.normal((130,))).astype(mx.float32)
    y, h = add_rms_norm(x, r, w, 1e-5, backend="reference")
    assert h.dtype == mx.float16 and y.dtype == mx.float32
    assert_close(h, x + r, mx.float16)
    assert_close(y, mx.fast.rms_norm(x + r, w, 1e-5), mx.float32)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 9), k=st.integers(1, 600), eps=st.floats(0, 1e-2),
       dtype=st.sampled_from(DTYPES))
def test_rms_norm_reference_hypothesis(rows, k, eps, dtype):
    x = mx.array(np.random.RandomState(rows * 1000 + k).randn(rows, k)).astype(dtype)
    w = mx.ones((k,), dtype)
    assert_close(rms_norm(x, w, eps, backend="reference"), mx.fast.rms_norm(x, w, eps), dtype)


def test_inv_rms_prologue_reference():
    x = mx.random.normal((4, 256)).astype(mx.float16)
    st_ = N.rms_norm_prologue()
    b = mf.Bound(x=x, eps=1e-5, K=256)
    inv = st_.reference(b, {})["inv_rms"]
    assert inv.shape == (4, 1)
    xf = np.array(x.astype(mx.float32))
    np.testing.assert_allclose(np.array(inv), 1 / np.sqrt((xf**2).mean(-1, keepdims=True) + 1e-5),
                               rtol=1e-5)


# ---- validation ------------------------------------------------------------------
x16 = mx.zeros((2, 8), mx.float16)


@pytest.mark.parametrize("call, exc, arg", [
    (lambda: rms_norm([1.0], None, 1e-5), TypeError, "'x'"),
    (lambda: rms_norm(mx.zeros((2, 8), mx.int32), None, 1e-5), ValueError, "'x'"),
    (lambda: rms_norm(mx.zeros((0, 8), mx.float16), None, 1e-5), ValueError, "'x'"),
    (lambda: rms_norm(x16, mx.zeros((7,), mx.float16), 1e-5), ValueError, "'weight'"),
    (lambda: rms_norm(x16, mx.zeros((1, 8), mx.float16), 1e-5), ValueError, "'weight'"),
    (lambda: rms_norm(x16, mx.zeros((8,), mx.int32), 1e-5), ValueError, "'weight'"),
    (lambda: add_rms_norm(x16, x16, mx.zeros((8,), mx.int32), 1e-5), ValueError, "'weight'"),
    (lambda: rms_norm(x16, np.zeros(8), 1e-5), TypeError, "'weight'"),
    (lambda: rms_norm(x16, None, -1.0), ValueError, "'eps'"),
    (lambda: rms_norm(x16, None, float("nan")), ValueError, "'eps'"),
    (lambda: rms_norm(x16, None, "1e-5"), TypeError, "'eps'"),
    (lambda: rms_norm(x16, None, 1e-5, backend="vulkan"), ValueError, "vulkan"),
    (lambda: add_rms_norm(x16, mx.zeros((2, 9), mx.float16), None, 1e-5), ValueError, "'residual'"),
    (lambda: add_rms_norm(x16, mx.zeros((2, 8), mx.float32), None, 1e-5), ValueError, "'residual'"),
    (lambda: add_rms_norm(x16, 3.0, None, 1e-5), TypeError, "'residual'"),
    (lambda: add_rms_norm(x16, x16, mx.zeros((9,), mx.float16), 1e-5), ValueError, "'weight'"),
    (lambda: add_rms_norm(x16, x16, None, True), TypeError, "'eps'"),
])
def test_validation_names_the_argument(call, exc, arg):
    with pytest.raises(exc, match=arg):
        call()


# ---- source assembly --------------------------------------------------------------
def test_rms_norm_source_assembly():
    x = mx.zeros((3, 4096), mx.float16)
    w = mx.zeros((4096,), mx.float16)
    src = N.rms_norm.source(x, w, n_rows=3, eps=1e-5, backend="metal")
    assert "constexpr int K = 4096;" in src.body
    assert "threadgroup float norm_scratch[32];" in src.body
    assert ("rms_norm_rows<T, K, THREADS>(x, norm_weight, out, n_rows, eps, "
            "threadgroup_position_in_grid, thread_index_in_threadgroup, norm_scratch);") in src.body
    assert "METAL_FUNC float threadgroup_sum" in src.header
    assert "struct RowIO<T, 8>" in src.header
    assert src.input_names == ("x", "norm_weight", "n_rows_value", "eps_value")
    # eps is runtime: another eps gives the same kernel.
    assert N.rms_norm.source(x, w, n_rows=5, eps=1e-3).name == src.name


def test_add_rms_norm_source_has_two_outputs():
    x = mx.zeros((1, 2880), mx.bfloat16)
    src = N.add_rms_norm.source(x, x, x[0], n_rows=1, eps=1e-5)
    assert src.output_names == ("out", "h")
    assert "add_rms_norm_rows<T, K, THREADS>(x, residual, norm_weight, out, h," in src.body


def test_threads_choice():
    assert N.norm_threads(8192, mx.float16) == 256
    assert N.norm_threads(4096, mx.float16) == 128
    assert N.norm_threads(7, mx.float16) == 32
    # capped: more threads with the row in registers failed to launch on CUDA
    assert N.norm_threads(100000, mx.float32) == N.MAX_NORM_THREADS == 256
    assert N.chunk_elements(4128, mx.float16) == 8
    assert N.chunk_elements(100, mx.float16) == 1


def test_prologue_stage_call_line_and_contract():
    st_ = N.rms_norm_prologue()
    assert st_.produces == {"inv_rms": "float"}
    assert [a.name for a in st_.args] == ["x", "norm_weight", "eps", "T", "K", "THREADS"]
    assert [t.name for t in st_.threadgroup] == ["norm_scratch"]
    lines = st_.call_lines({"K": 4096, "THREADS": 256}, {"norm_scratch": "norm_scratch"}, set())
    assert lines == [
        "float inv_rms;",
        "rms_norm_prologue_w<T, K, THREADS>(x, norm_weight, eps, inv_rms, "
        "threadgroup_position_in_grid, thread_index_in_threadgroup, norm_scratch);",
    ]
    nw = N.rms_norm_prologue(False)
    assert [a.name for a in nw.args] == ["x", "eps", "T", "K", "THREADS"]


def test_prologue_shares_declarations():
    x = mf.Tensor("x")
    st_ = N.rms_norm_prologue(x=x)
    assert st_.args[0] is x


def test_prologue_in_compound_kernel():
    """The prologue fused with a trivial main stage: chain check, body and reference."""
    main_src = """
    template <typename T, int K>
    METAL_FUNC void scale_first(const device T* x, float inv_rms, thread float& acc,
                                thread uint& index, thread bool& valid, uint3 tgid, uint tid) {
      index = tgid.y; valid = tid == 0; acc = float(x[tgid.y * K]) * inv_rms;
    }"""
    pro = N.rms_norm_prologue(False)
    main = mf.Stage("first", function="scale_first", source_text=main_src,
                    args=[pro.args[0]], consumes={"inv_rms": "float"},
                    produces={"acc": "float", "index": "uint", "valid": "bool"},
                    template=("T", "K"),
                    attributes=("threadgroup_position_in_grid", "thread_index_in_threadgroup"),
                    reference=lambda b, v: {"acc": b.x.astype(mx.float32)[:, :1] * v["inv_rms"]})
    k = mf.CompoundKernel("norm_first", prologues=[pro], main=main,
                          outputs=[mf.Output("out", shape=lambda b: (b.x.shape[0], 1), dtype="x")],
                          dispatch=lambda b: mf.DispatchConfig((1, b.x.shape[0]), (b.THREADS, 1)))
    x = mx.random.normal((3, 64)).astype(mx.float32)
    src = k.source(x, eps=1e-5, THREADS=64)
    assert "rms_norm_prologue<T, K, THREADS>(x, eps, inv_rms," in src.body
    got = k(x, eps=1e-5, THREADS=64, backend="reference")
    assert_close(got, x[:, :1] * mx.rsqrt(mx.mean(x * x, -1, keepdims=True) + 1e-5), mx.float32)
