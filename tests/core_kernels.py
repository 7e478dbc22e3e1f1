"""Descriptors of the core test kernels (tests/data/core_kernels.metal)."""

from pathlib import Path

import mlx.core as mx

import mlx_foundry as mf

mf.add_source_root(Path(__file__).parent / "data")

THREADS = 128


@mf.struct(name="AxpbParams")
class AxpbParams:
    n: mf.u32
    a: mf.f32
    b: mf.f32


def axpb_kernel():
    """Elementwise with struct params: y = a*x + b."""
    return mf.Kernel(
        "axpb",
        source="axpb.metal",
        function="axpb_kernel",
        template=("T",),
        args=[
            mf.Tensor("x", (mx.float16, mx.bfloat16, mx.float32), buffer=0),
            mf.Output("y", shape=lambda b: b.x.shape, dtype="x", buffer=1),
            mf.Params("params", AxpbParams, buffer=2),
            mf.Constant("T", "dtype", like="x"),
        ],
        attributes=("thread_position_in_grid",),
        dispatch=lambda b: mf.per_element(b.x.size),
        reference=lambda b: (b.params.a * b.x.astype(mx.float32) + b.params.b).astype(b.x.dtype),
    )


def row_sum_kernel():
    """Threadgroup memory + SIMD reductions: y[r] = scale * sum(x[r, :])."""
    return mf.Kernel(
        "row_sum",
        source="core_kernels.metal",
        function="row_sum_kernel",
        template=("T", "K", "THREADS"),
        args=[
            mf.Tensor("x", (mx.float16, mx.bfloat16, mx.float32), ndim=2),
            mf.Output("y", shape=lambda b: (b.x.shape[0],), dtype=mx.float32),
            mf.Scalar("scale", mf.f32),
            mf.Constant("T", "dtype", like="x"),
            mf.Constant("K", value=lambda b: b.x.shape[1]),
            mf.Constant("THREADS", value=THREADS),
        ],
        attributes=("threadgroup_position_in_grid", "thread_position_in_threadgroup",
                    "thread_index_in_simdgroup", "simdgroup_index_in_threadgroup"),
        threadgroup=("float scratch[32]",),
        dispatch=lambda b: mf.per_row(b.x.shape[0], threads=b.THREADS),
        reference=lambda b: b.x.astype(mx.float32).sum(axis=1) * b.scale,
    )


def _row_mean_ref(bound, values):
    return {"mean": bound.x.astype(mx.float32).mean(axis=-1, keepdims=True)}


def _center_ref(bound, values):
    return {"acc": bound.x.astype(mx.float32) - values["mean"]}


def _scale_relu_ref(bound, values):
    return {"acc": mx.maximum(values["acc"] * bound.scale, 0.0)}


def stages():
    x = mf.Tensor("x", (mx.float16, mx.bfloat16, mx.float32), ndim=2)
    consts = [mf.Constant("T", "dtype", like="x"),
              mf.Constant("K", value=lambda b: b.x.shape[1]),
              mf.Constant("THREADS", value=THREADS)]
    mean = mf.Stage(
        "row_mean", function="row_mean_stage", source="core_kernels.metal",
        args=[x, *consts], template=("T", "K", "THREADS"), produces={"mean": "float"},
        attributes=("threadgroup_position_in_grid", "thread_position_in_threadgroup",
                    "thread_index_in_simdgroup", "simdgroup_index_in_threadgroup"),
        threadgroup=("float scratch[32]",), reference=_row_mean_ref)
    center = mf.Stage(
        "center", function="center_stage", source="core_kernels.metal",
        args=[x, *consts], template=("T", "K", "THREADS"), consumes={"mean": "float"},
        produces={"acc": "float", "index": "uint", "valid": "bool"},
        attributes=("threadgroup_position_in_grid", "thread_position_in_threadgroup"),
        reference=_center_ref)
    scale_relu = mf.Stage(
        "scale_relu", function="scale_relu_stage", source="core_kernels.metal",
        args=[mf.Scalar("scale", mf.f32)], consumes={"acc": "float"},
        produces={"acc": "float"}, reference=_scale_relu_ref)
    return mean, center, scale_relu


def center_scale_relu_kernel():
    """Three stages fused: prologue (row mean) -> main (centre) -> epilogue (scale, relu)."""
    mean, center, scale_relu = stages()
    return mf.CompoundKernel(
        "center_scale_relu", prologues=[mean], main=center, epilogues=[scale_relu],
        outputs=[mf.Output("out", shape=lambda b: b.x.shape, dtype="x")],
        dispatch=lambda b: mf.DispatchConfig(
            groups=(-(-b.x.shape[1] // b.THREADS), b.x.shape[0]), threads=(b.THREADS, 1)),
    )


def seeded(shape, dtype, seed=0):
    return mx.random.normal(shape, key=mx.random.key(seed)).astype(dtype)
