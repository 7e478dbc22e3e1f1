"""Decode attention: one new token per sequence against a joint K/V cache.

The kernel reads the cache's joint buffer ``[B, 2 * H_kv, capacity, D]``
(:class:`mlx_foundry.kv_cache.KVCache`) and this token's keys and values
``[B, 2 * H_kv, 1, D]`` as they come from ``norm_qkv_rope(..., joint_kv=True)``,
so a decode step needs no key/value views of the cache (two graph nodes per
layer and token).

One threadgroup of 1024 threads (32 SIMD-groups) per (batch, query head).
Compile-time: ``T``, ``H``, ``KV``, ``D``. Runtime: ``past_len`` and
``past_cap`` (the cache grows without recompiling) and ``scale``.
"""

import mlx.core as mx

from ..args import Constant, Output, Scalar, Tensor
from ..dispatch import DispatchConfig
from ..kernel import Kernel
from ..stage import Threadgroup
from ..types import FLOAT_DTYPES, f32, u32

ATTENTION_SIMDS = 32
"""SIMD-groups per threadgroup (the merge in ``attention.metal`` assumes 32)."""


def decode_attention_math(q, kv, past, past_len, scale):
    """The kernel's computation in plain MLX ops (float32 inside).

    Args:
        q (array): ``[B, H, 1, D]``.
        kv (array): ``[B, 2 * KV, 1, D]``, keys then values of the new token.
        past (array): ``[B, 2 * KV, capacity, D]``; the first ``past_len`` positions
            are read.
        past_len (int): cached positions before the new token.
        scale (float): applied to ``q K^T``.
    """
    B, H, _, D = q.shape
    kv_heads = kv.shape[1] // 2
    if past_len:
        kv = mx.concatenate([past[:, :, :past_len].astype(kv.dtype), kv], axis=2)
    kv = kv.astype(mx.float32)
    k = kv[:, :kv_heads, None]                      # [B, KV, 1, L, D]
    v = kv[:, kv_heads:, None]
    qf = q.astype(mx.float32).reshape(B, kv_heads, H // kv_heads, 1, D) * scale
    p = mx.softmax(qf @ k.swapaxes(-1, -2), axis=-1)  # [B, KV, G, 1, L]
    return (p @ v).reshape(B, H, 1, D).astype(q.dtype)


def _reference(b):
    past_len = b.past_len
    if isinstance(past_len, mx.array):
        past_len = past_len.item()
    return decode_attention_math(b.q, b.kv, b.past, int(past_len), b.scale)


decode_attention = Kernel(
    "decode_attention", source="stages/attention.metal", function="decode_attention_rows",
    template=("T", "H", "KV", "D"),
    args=[
        Tensor("q", FLOAT_DTYPES, ndim=4),
        Tensor("kv", FLOAT_DTYPES, ndim=4),
        Tensor("past", FLOAT_DTYPES, ndim=4),
        Output("out", shape=lambda b: b.q.shape, dtype="q"),
        Scalar("past_len", u32),
        Scalar("past_cap", u32),
        Scalar("scale", f32),
        Constant("T", "dtype", like="q"),
        Constant("H", value=lambda b: b.q.shape[1]),
        Constant("KV", value=lambda b: b.kv.shape[1] // 2),
        Constant("D", value=lambda b: b.q.shape[3]),
        Constant("STATE", value=lambda b: ATTENTION_SIMDS * (b.q.shape[3] + 2)),
    ],
    attributes=("threadgroup_position_in_grid", "simdgroup_index_in_threadgroup",
                "thread_index_in_simdgroup"),
    threadgroup=(Threadgroup("float", "attn_state", "STATE"),),
    dispatch=lambda b: DispatchConfig((b.q.shape[0] * b.q.shape[1],),
                                      (32 * ATTENTION_SIMDS,)),
    reference=_reference,
)
"""The decode attention :class:`Kernel`:
``decode_attention(q, kv, past, past_len=n, past_cap=past.shape[2], scale=s)``."""
