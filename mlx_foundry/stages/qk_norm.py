"""Per-head RMSNorm of queries and keys, then RoPE (Qwen3's attention between its
projections and the attention), over the attention layouts ``q [B, H, L, D]`` and
``kv [B, 2 * H_kv, L, D]`` (keys, then values, which are passed through).

One SIMD-group per head row (``qk_norm_rope.metal``). Compile-time: ``T``, ``H``,
``KV``, ``D``, ``L`` and the RoPE style; runtime: ``eps``, the position offset, the
RoPE scale and the number of query rows (the batch size), so that a model compiles
it once.
"""

import functools

import mlx.core as mx

from ..args import Constant, Output, Scalar, Tensor
from ..dispatch import DispatchConfig
from ..kernel import Kernel
from ..types import FLOAT_DTYPES, f32, i32, u32
from .attention import head_constants
from .gemv import rope_rotate

QK_NORM_SOURCE = "stages/qk_norm_rope.metal"


def qk_norm_rope_math(q, kv, q_norm, k_norm, eps, inv_freq, offset, scale, traditional):
    """The kernel's computation in MLX ops, as mlx-lm's Qwen3 attention computes it:
    ``mx.fast.rms_norm`` per head (rounded to the dtype), then RoPE in float32.

    Args:
        q (array): ``[B, H, L, D]``. kv (array): ``[B, 2 * KV, L, D]``.
        q_norm, k_norm (array): ``[D]`` norm weights. eps (float): the norms' epsilon.
        inv_freq (array): float32 ``[D / 2]``. offset (int or array): position of
            ``L``'s first row. scale (float): RoPE position scale.
        traditional (bool): rotate adjacent pairs.

    Returns:
        (array, array): ``q`` and ``kv`` normalised and rotated (values unchanged).
    """
    B, H, L, D = q.shape
    kv_heads = kv.shape[1] // 2
    pos = (mx.arange(L).astype(mx.float32) + mx.array(offset).reshape(-1)[:1]
           .astype(mx.float32)) * mx.array(scale, dtype=mx.float32)
    pos = mx.broadcast_to(pos[None], (B, L)).reshape(-1)

    def rotate(t, w):
        n = mx.fast.rms_norm(t, w.astype(t.dtype), eps).astype(mx.float32)
        heads = t.shape[1]
        rows = n.transpose(0, 2, 1, 3).reshape(B * L, heads, D)
        y = rope_rotate(rows, pos, inv_freq, traditional)
        return y.reshape(B, L, heads, D).transpose(0, 2, 1, 3).astype(t.dtype)

    k = rotate(kv[:, :kv_heads], k_norm)
    return rotate(q, q_norm), mx.concatenate([k, kv[:, kv_heads:]], axis=1)


@functools.lru_cache(maxsize=2)
def qk_norm_rope_kernel(traditional):
    """The :class:`Kernel` for one RoPE style:
    ``kernel(q, kv, q_norm, k_norm, rope_inv_freq, eps=..., rope_offset=...,
    rope_scale=..., q_rows=B * H * L)`` returns ``(q_out, kv_out)``."""

    def reference(b):
        return qk_norm_rope_math(b.q, b.kv, b.q_norm, b.k_norm, b.eps, b.rope_inv_freq,
                                 b.rope_offset, b.rope_scale, traditional)

    def dispatch(b):
        return DispatchConfig((b.q.shape[0] * (b.q.shape[1] + b.kv.shape[1]) * b.q.shape[2],),
                              (32,))

    return Kernel(
        "qk_norm_rope" + ("_trad" if traditional else ""), source=QK_NORM_SOURCE,
        function="qk_norm_rope_rows", template=("T", "H", "KV", "D", "L", bool(traditional)),
        args=[
            Tensor("q", FLOAT_DTYPES, ndim=4),
            Tensor("kv", FLOAT_DTYPES, ndim=4),
            Tensor("q_norm", FLOAT_DTYPES, ndim=1),
            Tensor("k_norm", FLOAT_DTYPES, ndim=1),
            Tensor("rope_inv_freq", mx.float32, ndim=1),
            Output("q_out", shape=lambda b: b.q.shape, dtype="q"),
            Output("kv_out", shape=lambda b: b.kv.shape, dtype="q"),
            Scalar("eps", f32),
            Scalar("rope_offset", i32),
            Scalar("rope_scale", f32),
            Scalar("q_rows", u32),
            Constant("L", value=lambda b: b.q.shape[2]),
        ] + head_constants(),
        attributes=("threadgroup_position_in_grid", "thread_index_in_simdgroup"),
        dispatch=dispatch, reference=reference)
