"""Decode attention: one new token per sequence against a joint K/V cache.

The kernel reads the cache's joint buffer ``[B, 2 * H_kv, capacity, D]``
(:class:`mlx_foundry.kv_cache.KVCache`) and this token's keys and values
``[B, 2 * H_kv, 1, D]`` as they come from ``norm_qkv_rope(..., joint_kv=True)``,
so a decode step needs no key/value views of the cache (two graph nodes per
layer and token).  With ``PEND`` 1 a third array ``pend`` (the same shape as ``kv``)
holds one more token between the cached positions and the new one, at position
``past_len``: a token whose write into the buffer has not happened yet (the compiled
decode step, :mod:`mlx_foundry.lm_compiled`, writes it during the next token, so that
the write runs beside the blocks).  With ``PEND`` 0 ``pend`` is never read.

Two forms (``attention.metal``):

- :data:`decode_attention`: one threadgroup of 1024 threads (32 SIMD-groups) per
  (batch, query head) takes every position (short contexts);
- :data:`decode_attention_split` + :data:`decode_attention_combine`: the positions
  of a head split into chunks of :data:`SPLIT_CHUNK`, one threadgroup of
  :data:`SPLIT_SIMDS` SIMD-groups each, their partial softmax states merged by a
  second kernel (long contexts: more threadgroups than query heads).

Compile-time: ``T``, ``H``, ``KV``, ``D``, ``PEND``. Runtime: ``past_len`` and ``past_cap`` (the
cache grows without recompiling), ``scale`` and ``splits``.
"""

import mlx.core as mx

from ..args import Constant, Output, Scalar, Tensor
from ..dispatch import DispatchConfig
from ..kernel import Kernel
from ..stage import Threadgroup
from ..types import FLOAT_DTYPES, f32, u32

ATTENTION_SIMDS = 32
"""SIMD-groups per threadgroup of the one-pass kernel."""

SPLIT_SIMDS = 8
"""SIMD-groups per threadgroup of the split kernel."""

SPLIT_CHUNK = 32 * SPLIT_SIMDS
"""Positions per threadgroup of the split kernel (32 per SIMD-group)."""


def split_count(past_cap, pend=0):
    """Chunks of :data:`SPLIT_CHUNK` positions that cover ``past_cap + pend + 1``
    positions."""
    return -(-(past_cap + pend + 1) // SPLIT_CHUNK)


def decode_attention_math(q, kv, past, past_len, scale, pend=None):
    """The kernel's computation in plain MLX ops (float32 inside).

    Args:
        q (array): ``[B, H, 1, D]``.
        kv (array): ``[B, 2 * KV, 1, D]``, keys then values of the new token.
        past (array): ``[B, 2 * KV, capacity, D]``; the first ``past_len`` positions
            are read.
        past_len (int or array): cached positions before the new token (and before
            ``pend``).
        scale (float): applied to ``q K^T``.
        pend (array, optional): ``[B, 2 * KV, 1, D]``, a token between the cached
            positions and the new one. Default: none.
    """
    scores, values = _scores_and_values(q, kv, past, past_len, scale, pend)
    p = mx.softmax(scores, axis=-1)[:, None]         # [B * H, 1, n]
    return (p @ values).reshape(q.shape).astype(q.dtype)


def _scores_and_values(q, kv, past, past_len, scale, pend=None):
    """Per query head ``[B * H, n]`` scores and ``[B * H, n, D]`` values (float32).

    With ``past_len`` an array (a value known only on the device, as in a compiled decode
    step) ``n`` is ``capacity + 1`` (``+ 2`` with ``pend``): the fresh tokens (``pend``,
    then ``kv``) sit at positions ``past_len`` onwards as in the kernel, and the positions
    after them score ``-inf``."""
    B, H, _, D = q.shape
    kv_heads = kv.shape[1] // 2
    if pend is not None:
        kv = mx.concatenate([pend, kv], axis=2)
    visible = None
    if isinstance(past_len, mx.array):
        # As the kernels read it: uint32, at most the capacity (-1 is 2^32 - 1 -> capacity).
        n_past = mx.minimum(past_len.reshape(-1)[:1].astype(mx.uint32),
                            past.shape[2]).astype(mx.int32)
        fresh = kv.shape[2]
        idx = mx.arange(past.shape[2] + fresh, dtype=mx.int32)
        rows = mx.concatenate([past.astype(kv.dtype), mx.zeros_like(kv)], axis=2)
        for i in range(fresh):
            rows = mx.where((idx == n_past + i)[:, None], kv[:, :, i:i + 1], rows)
        kv = rows
        visible = idx < n_past + fresh
    elif past_len:
        kv = mx.concatenate([past[:, :, :past_len].astype(kv.dtype), kv], axis=2)
    kv = kv.astype(mx.float32)
    n = kv.shape[2]
    qf = q.astype(mx.float32).reshape(B, kv_heads, H // kv_heads, 1, D) * scale
    scores = (qf @ kv[:, :kv_heads, None].swapaxes(-1, -2)).reshape(B * H, n)
    if visible is not None:
        scores = mx.where(visible, scores, -float("inf"))
    values = mx.broadcast_to(kv[:, kv_heads:, None], (B, kv_heads, H // kv_heads, n, D))
    return scores, values.reshape(B * H, n, D)


def split_partials_math(q, kv, past, past_len, scale, splits, pend=None):
    """The split kernel's ``[B * H, splits, D + 2]`` states in plain MLX ops: per chunk of
    :data:`SPLIT_CHUNK` positions its max score (-inf when empty), the sum of
    ``exp(score - max)`` and the ``exp(score - max)``-weighted sum of values."""
    scores, values = _scores_and_values(q, kv, past, past_len, scale, pend)
    rows, n = scores.shape
    pad = splits * SPLIT_CHUNK - n
    scores = mx.pad(scores, [(0, 0), (0, pad)], constant_values=-float("inf"))
    values = mx.pad(values, [(0, 0), (0, pad), (0, 0)])
    scores = scores.reshape(rows, splits, SPLIT_CHUNK)
    values = values.reshape(rows, splits, SPLIT_CHUNK, -1)
    m = mx.max(scores, axis=-1)
    empty = m == -float("inf")
    p = mx.where(empty[..., None], 0.0, mx.exp(scores - mx.where(empty, 0.0, m)[..., None]))
    o = (p[..., None, :] @ values).squeeze(-2)
    return mx.concatenate([m[..., None], mx.sum(p, axis=-1)[..., None], o], axis=-1)


def combine_math(partials, dtype):
    """The combine kernel in plain MLX ops: ``[B * H, D]`` from the split states."""
    m, total, o = partials[..., 0], partials[..., 1], partials[..., 2:]
    gm = mx.max(m, axis=-1, keepdims=True)
    w = mx.where(m == -float("inf"), 0.0, mx.exp(m - gm))
    return (mx.sum(w[..., None] * o, axis=1) / mx.sum(w * total, axis=1)[..., None]).astype(dtype)


def _past_len(b):
    """The bound ``past_len``: an int, or an array (kept lazy; see ``_scores_and_values``)."""
    return b.past_len


def _kv_inputs():
    """The inputs of both attention kernels: q, kv, pend, past."""
    return [Tensor("q", FLOAT_DTYPES, ndim=4), Tensor("kv", FLOAT_DTYPES, ndim=4),
            Tensor("pend", FLOAT_DTYPES, ndim=4), Tensor("past", FLOAT_DTYPES, ndim=4)]


def _pend(b):
    """``pend`` when the kernel reads it (``PEND`` 1), else ``None``."""
    return b.pend if b.PEND else None


def head_constants():
    """``T``, ``H``, ``KV`` and ``D`` of a kernel over ``q [B, H, L, D]`` and a joint
    ``kv [B, 2 * KV, L, D]`` (the attention kernels, ``qk_norm_rope``)."""
    return [
        Constant("T", "dtype", like="q"),
        Constant("H", value=lambda b: b.q.shape[1]),
        Constant("KV", value=lambda b: b.kv.shape[1] // 2),
        Constant("D", value=lambda b: b.q.shape[3]),
    ]


def _head_args():
    """Runtime scalars and head constants of both attention kernels (``PEND``: 0, or 1
    when ``pend`` holds a token; given by the caller)."""
    return [Scalar("past_len", u32), Scalar("past_cap", u32),
            Scalar("scale", f32)] + head_constants() + [Constant("PEND", value=0)]


def _state(simds):
    """The size of the merge state in threadgroup memory for ``simds`` SIMD-groups."""
    return Constant("STATE", value=lambda b: 32 + simds * (b.q.shape[3] + 1))


_ATTRIBUTES = ("threadgroup_position_in_grid", "simdgroup_index_in_threadgroup",
               "thread_index_in_simdgroup")
_STATE = (Threadgroup("float", "attn_state", "STATE"),)


def _reference(b):
    return decode_attention_math(b.q, b.kv, b.past, _past_len(b), b.scale, _pend(b))


decode_attention = Kernel(
    "decode_attention", source="stages/attention.metal", function="decode_attention_rows",
    template=("T", "H", "KV", "D", "PEND"),
    args=_kv_inputs() + [Output("out", shape=lambda b: b.q.shape, dtype="q")]
    + _head_args() + [_state(ATTENTION_SIMDS)],
    attributes=_ATTRIBUTES, threadgroup=_STATE,
    dispatch=lambda b: DispatchConfig((b.q.shape[0] * b.q.shape[1],),
                                      (32 * ATTENTION_SIMDS,)),
    reference=_reference,
)
"""The decode attention :class:`Kernel`:
``decode_attention(q, kv, pend, past, past_len=n, past_cap=past.shape[2], scale=s,
PEND=0)`` (``pend`` is read only with ``PEND=1``)."""


decode_attention_split = Kernel(
    "decode_attention_split", source="stages/attention.metal",
    function="decode_attention_split",
    template=("T", "H", "KV", "D", "SIMDS", "CHUNK", "PEND"),
    args=_kv_inputs() + [
        Output("partials", shape=lambda b: (b.q.shape[0] * b.q.shape[1],
                                            split_count(b.past.shape[2], b.PEND),
                                            b.q.shape[3] + 2),
               dtype=mx.float32),
    ] + _head_args() + [
        Scalar("splits", u32),
        Constant("SIMDS", value=SPLIT_SIMDS),
        Constant("CHUNK", value=SPLIT_CHUNK),
        _state(SPLIT_SIMDS),
    ],
    attributes=_ATTRIBUTES, threadgroup=_STATE,
    dispatch=lambda b: DispatchConfig((b.q.shape[0] * b.q.shape[1],
                                       split_count(b.past.shape[2], b.PEND)),
                                      (32 * SPLIT_SIMDS,)),
    reference=lambda b: split_partials_math(b.q, b.kv, b.past, _past_len(b), b.scale,
                                            split_count(b.past.shape[2], b.PEND), _pend(b)),
)
"""Decode attention over chunks of positions: ``[B * H, splits, D + 2]`` float32 states
(``splits`` = :func:`split_count` of the capacity and ``PEND``; chunks past the positions
are empty)."""

decode_attention_combine = Kernel(
    "decode_attention_combine", source="stages/attention.metal",
    function="decode_attention_combine", template=("T", "D"),
    args=[
        Tensor("partials", (mx.float32,), ndim=3),
        Output("out", shape=lambda b: (b.partials.shape[0], b.partials.shape[2] - 2),
               dtype=lambda b: b.T),
        Scalar("splits", u32),
        Constant("T", "dtype"),
        Constant("D", value=lambda b: b.partials.shape[2] - 2),
    ],
    attributes=("threadgroup_position_in_grid", "thread_index_in_threadgroup"),
    dispatch=lambda b: DispatchConfig((b.partials.shape[0],),
                                      (32 * -(-(b.partials.shape[2] - 2) // 32),)),
    reference=lambda b: combine_math(b.partials, b.T),
)
"""Merges the split states of each query head: ``[B * H, D]`` in dtype ``T``."""
