"""RoPE (rotary position embedding) like ``mx.fast.rope``.

The kernel works on ``x`` viewed as ``[B, H, L, D]`` (row-contiguous): one
thread per rotated pair or passed-through element, all on grid x.

Compile-time: ``T``, ``D`` (head dim), ``DIMS`` (rotated dims),
``TRADITIONAL``, ``USE_FREQS``. Runtime (no recompile): the position
``offset`` (an int32 array of one value, or one per batch entry, read as
``offset[b * offset_stride]``), ``base``, ``scale``, and the sizes
``n_rows``, ``seq_len``, ``heads``. Decoding therefore compiles once per
model, not once per position.
"""

import math

import mlx.core as mx

from ..args import Constant, Output, Scalar, Tensor
from ..dispatch import per_element
from ..kernel import Kernel
from ..types import FLOAT_DTYPES, f32, u32

ROPE_SOURCE = "stages/rope.metal"
ROPE_INCLUDES = ("utils/rope.metal",)


def rope_math(x, dims, traditional, base, scale, offset, freqs=None):
    """``mx.fast.rope`` in plain MLX ops, computed in float32.

    ``offset`` is an int or an integer array of one value or ``x.shape[0]``
    values (one per batch entry).
    """
    shape = x.shape
    dtype = x.dtype
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim > 4:
        x = x.reshape(shape[0], -1, shape[-2], shape[-1])
    B, _, L, D = x.shape
    half = dims // 2
    off = mx.array(offset, dtype=mx.int32) if not isinstance(offset, mx.array) else offset
    off = off.astype(mx.float32).reshape(-1)
    off = off.reshape(-1, 1, 1, 1) if off.size > 1 else off.reshape(())
    pos = (mx.arange(L, dtype=mx.float32).reshape(1, 1, L, 1) + off) * scale
    if freqs is not None:
        inv = 1.0 / freqs.astype(mx.float32)
    else:
        inv = mx.exp(mx.arange(0, -half, -1, dtype=mx.float32) * (math.log(base) / half))
    theta = pos * inv
    c, s = mx.cos(theta), mx.sin(theta)
    xf = x.astype(mx.float32)
    if traditional:
        x1, x2 = xf[..., 0:dims:2], xf[..., 1:dims:2]
        r1, r2 = x1 * c - x2 * s, x1 * s + x2 * c
        rot = mx.stack([r1, r2], axis=-1).reshape(B, x.shape[1], L, dims)
    else:
        x1, x2 = xf[..., :half], xf[..., half:dims]
        rot = mx.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)
    out = rot.astype(dtype)
    if dims < D:
        out = mx.concatenate([out, x[..., dims:]], axis=-1)
    return out.reshape(shape)


def _reference(b):
    off = b.offset.reshape(-1)
    if b.offset_stride == 0:
        off = off[:1]
    else:
        off = off[: b.x.shape[0]]
    freqs = b.freqs[: b.DIMS // 2] if b.USE_FREQS else None
    return rope_math(b.x, b.DIMS, b.TRADITIONAL, b.base, b.scale, off, freqs)


rope = Kernel(
    "rope", source=ROPE_SOURCE, includes=ROPE_INCLUDES, function="rope_rows",
    template=("T", "D", "DIMS", "TRADITIONAL", "USE_FREQS"),
    args=[
        Tensor("x", FLOAT_DTYPES),
        Tensor("offset", mx.int32, ndim=1),
        Tensor("freqs", mx.float32, ndim=1),
        Output("out", shape=lambda b: b.x.shape, dtype="x"),
        Scalar("n_rows", u32),
        Scalar("seq_len", u32),
        Scalar("heads", u32),
        Scalar("offset_stride", u32),
        Scalar("base", f32),
        Scalar("scale", f32),
        Constant("T", "dtype", like="x"),
        Constant("D", value=lambda b: b.x.shape[-1]),
        Constant("DIMS"),
        Constant("TRADITIONAL", "bool"),
        Constant("USE_FREQS", "bool"),
    ],
    attributes=("thread_position_in_grid",),
    dispatch=lambda b: per_element(b.n_rows * (b.DIMS // 2 + b.D - b.DIMS)),
    reference=_reference,
)
"""The RoPE :class:`Kernel`. Call as ``rope(x, offset, freqs, n_rows=..., seq_len=...,
heads=..., offset_stride=0 or 1, base=..., scale=..., DIMS=..., TRADITIONAL=...,
USE_FREQS=...)``; ``mlx_foundry.ops.rope`` does this for you."""
