import mlx.core as mx
import pytest

import mlx_foundry as mf
from mlx_foundry.args import order_args


def test_buffer_order_and_inputs_before_outputs():
    args = [mf.Output("y", shape=lambda b: (1,), dtype=mx.float32, buffer=0),
            mf.Tensor("x", buffer=1), mf.Scalar("n", mf.u32, buffer=2)]
    inputs, outputs, consts = order_args(args, "t")
    assert [a.name for a in inputs] == ["x", "n"]
    assert [a.name for a in outputs] == ["y"]


@pytest.mark.parametrize("buffers, match", [
    ((0, 0), "used by both"),
    ((0, 2), "missing \\[1\\]"),
    ((0, None), "Buffer index missing"),
])
def test_buffer_index_errors(buffers, match):
    args = [mf.Tensor("a", buffer=buffers[0]),
            mf.Output("b", shape=lambda b: (1,), dtype=mx.float32, buffer=buffers[1])]
    with pytest.raises(ValueError, match=match):
        order_args(args, "t")


def test_duplicate_names_rejected():
    with pytest.raises(ValueError, match="Duplicate argument name 'a'"):
        order_args([mf.Tensor("a"), mf.Tensor("a")], "t")


@pytest.mark.parametrize("name", ["x_shape", "w_strides", "a_ndim", "my_thread_position_in_grid",
                                  "1x", "has space", "float", "__x", "mf_reserved"])
def test_names_that_would_break_generated_source(name):
    with pytest.raises(ValueError, match="argument name|reserved|identifier|may not"):
        mf.Tensor(name)


def test_metal_type_inference_follows_the_seed_rules():
    @mf.struct
    class P:
        n: mf.u32

    k = mf.Kernel("sig", source_text="", function="f",
                  args=[mf.Tensor("matrix"), mf.Output("result", shape=lambda b: (1,),
                                                       dtype="matrix"),
                        mf.Params("params", P), mf.Scalar("scale", mf.f32),
                        mf.Tensor("q", metal_type="const device uchar*")],
                  dispatch=lambda b: mf.per_element(1))
    rows = k.signature({"matrix": mx.float16, "result": mx.float16, "q": mx.uint32})
    assert rows == [("matrix", 0, "const device half*"), ("params", 1, "const device P*"),
                    ("scale", 2, "float"), ("q", 3, "const device uchar*"),
                    ("result", 4, "device half*")]


def test_tensor_validation_names_the_argument():
    t = mf.Tensor("x", (mx.float16,), ndim=2)
    with pytest.raises(TypeError, match="'x' must be an mlx.core.array"):
        t.convert([1, 2], "op")
    with pytest.raises(ValueError, match="'x' has dtype float32"):
        t.convert(mx.zeros((2, 2)), "op")
    with pytest.raises(ValueError, match="'x' must have ndim"):
        t.convert(mx.zeros((2,), dtype=mx.float16), "op")
    with pytest.raises(ValueError, match="'x' is empty"):
        t.convert(mx.zeros((0, 3), dtype=mx.float16), "op")


def test_scalar_and_params_validation():
    s = mf.Scalar("n", mf.u32)
    with pytest.raises(ValueError, match="'n' must be a non-negative int"):
        s.convert(-3, "op")
    with pytest.raises(TypeError, match="'n' must be a number"):
        s.convert("3", "op")

    @mf.struct
    class P:
        n: mf.u32

    with pytest.raises(TypeError, match="'p' must be a P"):
        mf.Params("p", P).convert(3, "op")
    with pytest.raises(TypeError, match="@mlx_foundry.struct"):
        mf.Params("p", dict)


def test_constant_kinds():
    c = mf.Constant("N", value=lambda b: b["x"].shape[0])
    assert c.resolve({"x": mx.zeros((5,))}, None) == 5
    assert c.declaration(5) == "constexpr int N = 5;"
    assert mf.Constant("T", "dtype", like="x").declaration(mx.bfloat16) == "using T = bfloat16_t;"
    with pytest.raises(TypeError, match="'N' must be an int"):
        mf.Constant("N").resolve({}, 1.5)
    with pytest.raises(ValueError, match="Missing compile-time constant 'N'"):
        mf.Constant("N").resolve({}, None)


def test_tiny_inputs_are_padded_to_device_memory():
    x = mx.array([1.0, 2.0, 3.0])
    padded = mf.Tensor.to_kernel_input(x)
    assert padded.size == 8 and padded[:3].tolist() == [1.0, 2.0, 3.0]
    big = mx.zeros((9,))
    assert mf.Tensor.to_kernel_input(big) is big


def _kernel(args, dispatch=lambda b: mf.per_element(b.x.size)):
    return mf.Kernel("k", source_text="template <typename T> void f() {}", function="f",
                     args=args, dispatch=dispatch, reference=lambda b: b.x)


def test_dtype_references_must_name_a_tensor_input():
    """A misspelt dtype source is an error when the kernel is declared, naming it, not a
    KeyError at the first launch."""
    x = mf.Tensor("x", ndim=1)
    shape = lambda b: b.x.shape  # noqa: E731
    with pytest.raises(ValueError, match=r"Output 'y' takes its dtype from 'xx'.*Tensor "
                                         r"inputs: x"):
        _kernel([x, mf.Output("y", shape=shape, dtype="xx")])
    with pytest.raises(ValueError, match=r"Constant 'T' takes its dtype from 'n'.*not a "
                                         r"Tensor input"):
        _kernel([x, mf.Scalar("n", mf.u32), mf.Output("y", shape=shape, dtype="x"),
                 mf.Constant("T", "dtype", like="n")])
    with pytest.raises(ValueError, match=r"'like' is for a dtype constant"):
        mf.Constant("N", "int", like="x")
    with pytest.raises(ValueError, match=r"'like' is for a dtype constant"):
        mf.Constant("T", "dtype", like="x", value=mx.float16)
    with pytest.raises(TypeError, match=r"'dtype' of 'y' must be a dtype"):
        mf.Output("y", shape=shape, dtype=3)
    k = _kernel([x, mf.Output("y", shape=shape, dtype="x"), mf.Constant("T", "dtype",
                                                                        like="x")])
    assert k.source(mx.zeros((4,), mx.float16)).body.count("using T = half;") == 1
