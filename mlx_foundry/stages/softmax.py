"""Numerically stable row softmax (float accumulation, output dtype = input dtype).

One threadgroup per row (rows on grid x); the row length ``n_cols`` is a
runtime value, so attention scores of growing length do not recompile.
Compile-time: ``T`` and ``THREADS`` (256 for rows up to 8192 elements, else
1024: at most two compiles per dtype).
"""

import mlx.core as mx

from ..args import Constant, Output, Scalar, Tensor
from ..dispatch import DispatchConfig
from ..kernel import Kernel
from ..types import FLOAT_DTYPES, u32


def softmax_threads(n_cols):
    """Threads per threadgroup for rows of ``n_cols`` elements."""
    return 256 if n_cols <= 8192 else 1024


def softmax_math(x):
    """``mx.softmax(x, axis=-1, precise=True)`` in plain MLX ops (float32 inside)."""
    xf = x.astype(mx.float32)
    e = mx.exp(xf - mx.max(xf, axis=-1, keepdims=True))
    return (e / mx.sum(e, axis=-1, keepdims=True)).astype(x.dtype)


softmax = Kernel(
    "softmax", source="stages/softmax.metal",
    includes=("utils/reduce.metal", "utils/row_io.metal"), function="softmax_rows",
    template=("T", "THREADS"),
    args=[
        Tensor("x", FLOAT_DTYPES),
        Output("out", shape=lambda b: b.x.shape, dtype="x"),
        Scalar("n_rows", u32),
        Scalar("n_cols", u32),
        Constant("T", "dtype", like="x"),
        Constant("THREADS", value=lambda b: softmax_threads(b.x.shape[-1])),
    ],
    attributes=("threadgroup_position_in_grid", "thread_index_in_threadgroup"),
    threadgroup=("float softmax_scratch[32]",),
    dispatch=lambda b: DispatchConfig((b.n_rows,), (b.THREADS,)),
    reference=lambda b: softmax_math(b.x),
)
"""The softmax :class:`Kernel`: ``softmax(x, n_rows=M, n_cols=N)`` over the last axis."""
