"""Descriptors built the wrong way fail when they are built (or at their first launch),
with an error that names what is wrong: names the generated body or MLX's signature
would misread, strings where tuples belong, values of the wrong kind; and the REPL loop
of editing a source file."""

import subprocess
import sys
import textwrap

import mlx.core as mx
import numpy as np
import pytest

import mlx_foundry as mf
from mlx_foundry import ops
from mlx_foundry.compound import ChainError

import core_kernels as ck

SRC = """
template <typename T>
void load_stage(const device T* x, thread float& acc, thread uint& index, uint3 gid) {
  index = gid.x;
  acc = float(x[index]);
}
void twice_stage(thread float& acc) { acc *= 2.0f; }
"""


def _load(**kw):
    return mf.Stage("load", function="load_stage", source_text=SRC,
                    args=[mf.Tensor("x", ndim=1), mf.Constant("T", "dtype", like="x")],
                    template=("T",), produces={"acc": "float", "index": "uint"},
                    attributes=("thread_position_in_grid",),
                    reference=lambda b, v: {"acc": b.x.astype(mx.float32)}, **kw)


def _twice(produces=None, **kw):
    return mf.Stage("twice", function="twice_stage", source_text=SRC,
                    consumes={"acc": "float"}, produces=produces or {"acc": "float"},
                    reference=lambda b, v: {"acc": v["acc"] * 2}, **kw)


def _compound(*epilogues, name="load_twice"):
    return mf.CompoundKernel(name, main=_load(), epilogues=list(epilogues),
                             outputs=[mf.Output("y", shape=lambda b: b.x.shape, dtype="x")],
                             dispatch=lambda b: mf.per_element(b.x.size))


# -- names ---------------------------------------------------------------------------

@pytest.mark.parametrize("name, match", [
    ("x_shape", "may not end in '_shape'"), ("acc_ndim", "may not end in '_ndim'"),
    ("my_thread_position_in_grid", "contains the Metal attribute name"),
])
def test_value_names_obey_mlx_name_detection(name, match):
    """MLX adds a parameter for any `<input>_shape` it finds in the body, and a thread
    attribute for any attribute name: a value so named would change the signature."""
    with pytest.raises(ValueError, match=rf"produced value name '{name}' {match}"):
        _twice(produces={"acc": "float", name: "float"})
    with pytest.raises(ValueError, match=rf"constant name '{name}' {match}"):
        mf.Constant(name, value=3)


@pytest.mark.parametrize("name, what", [("x", "an argument"), ("y", "an argument"),
                                        ("T", "an argument"),
                                        ("thread_position_in_grid", None)])
def test_a_value_may_not_shadow_a_kernel_name(name, what):
    if what is None:  # refused by the name rules already
        with pytest.raises(ValueError, match="Metal attribute"):
            _twice(produces={"acc": "float", name: "float"})
        return
    with pytest.raises(ChainError, match=rf"Stage 'twice' declares value '{name}', which is "
                                         rf"already the name of {what}"):
        _compound(_twice(produces={"acc": "float", name: "float"}))


def test_one_inline_text_shared_by_stages_is_pasted_once():
    src = _compound(_twice()).source(mx.zeros((5,), mx.float32), backend="metal")
    assert src.header.count("void twice_stage") == 1
    assert src.header.count("void load_stage") == 1


# -- sequences -----------------------------------------------------------------------

@pytest.mark.parametrize("field", ["template", "attributes", "threadgroup", "includes"])
def test_a_string_where_a_tuple_belongs_is_an_error(field):
    value = {"template": "T", "attributes": "thread_position_in_grid",
             "threadgroup": "float s[32]", "includes": "utils/a.metal"}[field]
    with pytest.raises(TypeError, match=rf"'{field}' must be a tuple but got str"):
        mf.Stage("s", function="f", **{field: value})
    if field != "includes":
        with pytest.raises(TypeError, match=rf"'{field}' must be a tuple but got str"):
            mf.Kernel("k", source_text="", function="f",
                      args=[mf.Tensor("x"), mf.Output("y", shape=lambda b: (1,), dtype="x")],
                      dispatch=lambda b: mf.per_element(1), **{field: value})


def test_tensor_and_output_declarations_are_checked():
    with pytest.raises(TypeError, match=r"'dtype' of 'x' must be an mlx.core.Dtype"):
        mf.Tensor("x", "float32")
    assert mf.Tensor("x", [mx.float16, mx.float32]).dtypes == (mx.float16, mx.float32)
    assert mf.Tensor("x", ndim=[1, 2]).ndims == (1, 2)
    with pytest.raises(TypeError, match=r"'ndim' of 'x' must be a non-negative int"):
        mf.Tensor("x", ndim=1.5)
    for bad in (lambda b: 10, lambda b: (10.5,), lambda b: (-1,)):
        k = mf.Kernel("k", source_text="", function="f", args=[
            mf.Tensor("x"), mf.Output("y", shape=bad, dtype="x")],
            dispatch=lambda b: mf.per_element(1), reference=lambda b: b.x)
        with pytest.raises(ValueError, match=r"shape rule of 'y' must return a tuple of "
                                             r"non-negative ints"):
            k(mx.zeros((4,)), backend="reference")


# -- values --------------------------------------------------------------------------

def _scalar_kernel(scalar_type):
    return mf.Kernel("add_n", source_text="template <typename T> void f() {}", function="f",
                     args=[mf.Tensor("x", mx.float32), mf.Scalar("n", scalar_type),
                           mf.Output("y", shape=lambda b: b.x.shape, dtype="x")],
                     dispatch=lambda b: mf.per_element(b.x.size),
                     reference=lambda b: b.x + b.n)


def test_integer_scalars_take_ints_only():
    """An i32 scalar given 2.5 would be 2 in the kernel and 2.5 in the reference."""
    k = _scalar_kernel(mf.i32)
    x = mx.zeros((3,), mx.float32)
    with pytest.raises(TypeError, match=r"'n' is i32 and must be an int but got 2.5"):
        k(x, 2.5, backend="reference")
    with pytest.raises(ValueError, match=r"'n' \(i32\) must be in \[-2147483648, "
                                         r"2147483647\] but got 2147483648"):
        k(x, 2**31, backend="reference")
    assert k(x, np.int64(-3), backend="reference").tolist() == [-3.0] * 3
    u = _scalar_kernel(mf.u32)
    with pytest.raises(ValueError, match=r"'n' must be a non-negative int"):
        u(x, -1, backend="reference")
    f = _scalar_kernel(mf.f32)
    assert f(x, np.float32(0.5), backend="reference").tolist() == [0.5] * 3


def test_integer_scalars_on_the_cached_launch_path(monkeypatch):
    """The plan of a launch skips binding: its scalar conversion checks too."""
    from fake_gpu import fake_gpu

    launches = fake_gpu(monkeypatch)
    k = _scalar_kernel(mf.i32)
    x = mx.zeros((3,), mx.float32)
    assert k(x, 2, backend="cuda").tolist() == [2.0] * 3  # plan made here
    with pytest.raises(TypeError, match=r"'n' is i32 and must be an int"):
        k(x, 2.5, backend="cuda")
    with pytest.raises(ValueError, match=r"'n' \(i32\) must be in"):
        k(x, -2**31 - 1, backend="cuda")
    assert k(x, np.int32(7), backend="cuda").tolist() == [7.0] * 3
    assert launches.total() == 2


def test_constants_are_checked():
    k = ck.row_sum_kernel()
    x = ck.seeded((2, 40), mx.float16)
    with pytest.raises(ValueError, match=r"'T' takes the dtype of 'x'; it cannot be passed"):
        k.source(x, scale=1.0, T=mx.float32)
    with pytest.raises(ValueError, match=r"'N' must fit in int32 but got 1099511627776"):
        mf.Constant("N").resolve({}, 2**40)
    assert mf.Constant("N").resolve({}, np.int64(5)) == 5
    with pytest.raises(TypeError, match=r"'T' must be an mlx.core.Dtype"):
        mf.Constant("T", "dtype").resolve({}, "float16")


def test_dispatch_config_takes_numpy_ints_and_names_bad_extents():
    assert mf.DispatchConfig(np.int64(4), 256).groups == (4, 1, 1)
    with pytest.raises(TypeError, match=r"'groups' must be an int or a tuple of 1 to 3 ints"):
        mf.DispatchConfig("4", 256)
    with pytest.raises(TypeError, match=r"'threads' must be an int or a tuple"):
        mf.DispatchConfig(4, (2.5,))


def test_signature_uses_the_declared_dtype():
    k = mf.Kernel("k", source_text="", function="f",
                  args=[mf.Tensor("x", mx.float32), mf.Tensor("w"),
                        mf.Output("y", shape=lambda b: b.x.shape, dtype="x"),
                        mf.Output("z", shape=lambda b: b.x.shape, dtype=mx.bfloat16)],
                  dispatch=lambda b: mf.per_element(1))
    assert k.signature() == [("x", 0, "const device float*"), ("w", 1, "const device half*"),
                             ("y", 2, "device float*"), ("z", 3, "device bfloat16_t*")]


# -- ops take NumPy scalars where MLX does ---------------------------------------------

def test_ops_take_numpy_scalars():
    x = ck.seeded((2, 64), mx.float16)
    w = ck.seeded((64,), mx.float16)
    ref = "reference"
    assert mx.array_equal(ops.rms_norm(x, w, np.float32(1e-5), backend=ref),
                          ops.rms_norm(x, w, 1e-5, backend=ref)).item()
    q = ck.seeded((1, 4, 3, 32), mx.float16)
    assert mx.array_equal(
        ops.rope(q, 32, traditional=False, base=1e4, scale=np.float32(1.0),
                 offset=np.int64(3), backend=ref),
        ops.rope(q, 32, traditional=False, base=1e4, scale=1.0, offset=3, backend=ref)).item()
    qa = ck.seeded((1, 4, 1, 32), mx.float16)
    kv = ck.seeded((1, 4, 1, 32), mx.float16)
    past = ck.seeded((1, 4, 9, 32), mx.float16)
    a = ops.decode_attention(qa, kv, past, past_len=np.int64(5), scale=np.float32(0.25),
                             backend=ref)
    b = ops.decode_attention(qa, kv, past, past_len=5, scale=0.25, backend=ref)
    assert mx.array_equal(a, b).item()


# -- structs -------------------------------------------------------------------------

def test_struct_under_postponed_annotations(tmp_path):
    """`from __future__ import annotations` makes every annotation a string."""
    mod = tmp_path / "postponed_struct.py"
    mod.write_text(textwrap.dedent("""
        from __future__ import annotations
        import mlx_foundry as mf

        @mf.struct
        class R:
            a: mf.u32
            b: mf.f32
        print(R.metal_struct_def.replace("\\n", " "), len(R(a=1, b=2.0).pack()))
    """))
    out = subprocess.run([sys.executable, str(mod)], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "struct R {   uint a;   float b; }; 8"


# -- the REPL loop and the CLI --------------------------------------------------------

def test_clear_cache_reads_an_edited_source_file_again(tmp_path):
    (tmp_path / "edit_me.metal").write_text("void edit_me(thread float& acc) { acc *= 2.0f; }\n")
    mf.add_source_root(tmp_path)
    stage = mf.Stage("edit", function="edit_me", source="edit_me.metal",
                     consumes={"acc": "float"}, produces={"acc": "float"})
    k = mf.CompoundKernel("load_edit", main=_load(), epilogues=[stage],
                          outputs=[mf.Output("y", shape=lambda b: b.x.shape, dtype="x")],
                          dispatch=lambda b: mf.per_element(b.x.size))
    x = mx.zeros((4,), mx.float32)
    first = k.source(x, backend="metal")
    assert "acc *= 2.0f" in first.header
    (tmp_path / "edit_me.metal").write_text("void edit_me(thread float& acc) { acc *= 3.0f; }\n")
    mf.clear_cache()
    second = k.source(x, backend="metal")
    assert "acc *= 3.0f" in second.header and second.name != first.name


def test_check_with_a_filter_that_matches_nothing_fails():
    from mlx_foundry.__main__ import main

    assert main(["check", "no_such_kernel_xyz"]) == 2


def test_a_kernel_becomes_an_epilogue_without_its_output():
    """Output(stage_skip=True): the standalone kernel writes z, the derived stage only
    updates acc, and the fused kernel's automatic store writes y."""
    text = SRC + """
void scale_kernel(const device float* x, device float* z, uint3 gid) { z[gid.x] = x[gid.x] * 2; }
void scale_stage(thread float& acc, uint3 gid) { acc *= 2.0f; }
"""
    kk = mf.Kernel("scale2", source_text=text, function="scale_kernel",
                   args=[mf.Tensor("x", mx.float32, ndim=1, stage_skip=True),
                         mf.Output("z", shape=lambda b: b.x.shape, dtype="x", stage_skip=True)],
                   attributes=("thread_position_in_grid",),
                   dispatch=lambda b: mf.per_element(b.x.size),
                   reference=lambda b: b.x * 2,
                   stage_function="scale_stage", stage_consumes={"acc": "float"},
                   stage_produces={"acc": "float"},
                   stage_reference=lambda b, v: {"acc": v["acc"] * 2})
    stage = kk.as_stage()
    assert stage.args == () and not stage.writes_output
    k = mf.CompoundKernel("load_scale2", main=_load(), epilogues=[stage],
                          outputs=[mf.Output("y", shape=lambda b: b.x.shape, dtype="x")],
                          dispatch=lambda b: mf.per_element(b.x.size))
    x = mx.arange(5, dtype=mx.float32)
    body = k.source(x, backend="metal").body
    assert "scale_stage(acc, thread_position_in_grid);" in body and "y[index] = static_cast<float>(acc);" in body
    assert k(x, backend="reference").tolist() == [0.0, 2.0, 4.0, 6.0, 8.0]


def test_struct_bool_fields_take_bools():
    from mlx_foundry.types import boolean

    @mf.struct
    class Flags:
        n: mf.u32
        on: boolean

    assert Flags(n=3, on=True).pack() == b"\x03\x00\x00\x00\x01\x00\x00\x00"
    assert Flags(n=3, on=np.bool_(False)).pack() == b"\x03\x00\x00\x00\x00\x00\x00\x00"
    with pytest.raises(TypeError, match=r"Flags\.on is bool and must be a bool but got int"):
        Flags(n=3, on=1).pack()
    with pytest.raises(TypeError, match=r"Flags\.n is u32 and must be an int but got bool"):
        Flags(n=True, on=True).pack()
