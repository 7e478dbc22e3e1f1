"""Decode attention against a joint K/V cache: validated at the boundary; one kernel, or
two for long contexts."""

import math
import numbers

import mlx.core as mx

from ..backends import check_backend
from ..kernel import SCALAR_LANES
from ..stages import attention as _attention
from ..types import dtype_name
from ._checks import check_float_array, check_same_dtype

ONE_PASS_MAX_LEN = 1024
"""Positions (``past_len + 1``) up to which one threadgroup per query head takes them all;
longer contexts split the positions over more threadgroups and merge the parts in a
second kernel."""

MAX_HEAD_DIM = 256
"""The largest ``head_dim`` :func:`decode_attention` takes (its threadgroup memory holds
32 x (head_dim + 2) floats)."""


def decode_attention(q, kv, past=None, *, past_len=0, pending=None, scale, backend=None):
    r"""Attention of one new token per sequence over a joint K/V cache and itself.

    .. math::

        o_h = \mathrm{softmax}\left(s\, q_h [K_{past}; k]^T\right) [V_{past}; v]

    over the first ``past_len`` positions of ``past`` (then ``pending``, if given) and the
    new token, with query head ``h`` reading key/value head ``h // (n_heads //
    n_kv_heads)`` (grouped-query attention). No mask: every cached position is visible,
    as in a causal decode step. Keys and values come in the joint layout of
    :class:`mlx_foundry.kv_cache.KVCache` (keys in the first ``n_kv_heads`` heads,
    values in the rest), the layout ``norm_qkv_rope(..., joint_kv=True)`` writes, so
    the step needs no key/value views of the cache.
    Accumulates in float32. Up to :data:`ONE_PASS_MAX_LEN` positions one kernel runs
    one threadgroup per query head; longer contexts take two kernels (chunks of
    positions, then their merge), as MLX's attention does.

    Args:
        q (array): the queries, ``[B, n_heads, 1, head_dim]``, float16/bfloat16/float32.
        kv (array): the new token's keys and values, ``[B, 2 * n_kv_heads, 1, head_dim]``,
            the dtype of ``q``.
        past (array, optional): the cache buffer, ``[B, 2 * n_kv_heads, capacity,
            head_dim]``, the dtype of ``q``. Default: no earlier tokens.
        past_len (int or array): how many positions of ``past`` hold earlier tokens
            (``0 <= past_len <= capacity``). An integer array of one value, or of
            :data:`~mlx_foundry.kernel.SCALAR_LANES` equal ``uint32`` values (passed to
            the kernel as it is), keeps the length on the device, e.g. in a compiled
            decode step. It is not checked on the host; the kernels take a value over
            the capacity (or negative, read as ``uint32``) as the capacity, so they
            never read past ``past``. Default: ``0``.
        pending (array, optional): one more token's keys and values, the shape and dtype
            of ``kv``, at position ``past_len`` (before the new token): a token that is
            cached but not yet written into ``past``. The compiled decode step
            (:mod:`mlx_foundry.lm_compiled`) writes each token into the buffer during the
            next token, beside that token's blocks, and passes it here meanwhile.
            Needs ``past``. Default: none.
        scale (float): the factor on ``q K^T`` (usually ``head_dim ** -0.5``).
        backend (str, optional): ``"metal"``, ``"cuda"`` or ``"reference"``.
            Default: chosen automatically.

    Returns:
        array: ``[B, n_heads, 1, head_dim]`` in the dtype of ``q``.

    Example:
        >>> q = mx.random.normal((1, 32, 1, 128)).astype(mx.float16)
        >>> kv = mx.random.normal((1, 16, 1, 128)).astype(mx.float16)
        >>> past = mx.zeros((1, 16, 256, 128), mx.float16)
        >>> o = decode_attention(q, kv, past, past_len=20, scale=128 ** -0.5)
    """
    who = "decode_attention"
    check_float_array(who, "q", q, min_ndim=4)
    if q.ndim != 4 or q.shape[2] != 1:
        raise ValueError(f"[{who}] 'q' must be [batch, n_heads, 1, head_dim] (one token) "
                         f"but has shape {tuple(q.shape)}.")
    B, H, _, D = q.shape
    if D > MAX_HEAD_DIM:
        raise ValueError(f"[{who}] head_dim (the last dimension of 'q') must be at most "
                         f"{MAX_HEAD_DIM} but is {D}.")
    check_float_array(who, "kv", kv, min_ndim=4)
    if (kv.ndim != 4 or kv.shape[0] != B or kv.shape[1] % 2 or kv.shape[2] != 1
            or kv.shape[3] != D):
        raise ValueError(f"[{who}] 'kv' must be [{B}, 2 * n_kv_heads, 1, {D}] (the keys "
                         f"and values of the token of 'q') but has shape {tuple(kv.shape)}.")
    kv_heads = kv.shape[1] // 2
    if H % kv_heads:
        raise ValueError(f"[{who}] n_heads ({H}, from 'q') must be a multiple of "
                         f"n_kv_heads ({kv_heads}, from 'kv').")
    check_same_dtype(who, "kv", kv, "q", q)
    on_device = isinstance(past_len, mx.array)
    if on_device:
        if (past is None or not mx.issubdtype(past_len.dtype, mx.integer)
                or past_len.size not in (1, SCALAR_LANES) or past_len.ndim > 1):
            raise ValueError(f"[{who}] 'past_len' given as an array must be an integer "
                             f"array of 1 or {SCALAR_LANES} equal values, with 'past', but "
                             f"got shape {tuple(past_len.shape)}, "
                             f"{dtype_name(past_len.dtype)}.")
    elif isinstance(past_len, bool) or not isinstance(past_len, numbers.Integral):
        raise TypeError(f"[{who}] 'past_len' must be an int but got "
                        f"{type(past_len).__name__}.")
    else:
        past_len = int(past_len)  # NumPy's too
    if past is None:
        if pending is not None:
            raise ValueError(f"[{who}] 'pending' needs 'past' (the cache buffer it is "
                             f"not yet written to).")
        if past_len != 0:
            raise ValueError(f"[{who}] 'past_len' must be 0 without 'past' but is "
                             f"{past_len}.")
        past = kv  # never read
    else:
        check_float_array(who, "past", past, min_ndim=4)
        if (past.ndim != 4 or past.shape[0] != B or past.shape[1] != kv.shape[1]
                or past.shape[3] != D):
            raise ValueError(f"[{who}] 'past' must be [{B}, {kv.shape[1]}, capacity, {D}] "
                             f"(the joint K/V layout of 'kv') but has shape "
                             f"{tuple(past.shape)}.")
        check_same_dtype(who, "past", past, "q", q)
        if not on_device and not 0 <= past_len <= past.shape[2]:
            raise ValueError(f"[{who}] 'past_len' must be in [0, {past.shape[2]}] (the "
                             f"capacity of 'past') but is {past_len}.")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"[{who}] 'scale' must be a number but got {type(scale).__name__}.")
    if not math.isfinite(scale):
        raise ValueError(f"[{who}] 'scale' must be finite but is {scale}.")
    pend = 0
    if pending is not None:
        check_float_array(who, "pending", pending, min_ndim=4)
        if pending.shape != kv.shape:
            raise ValueError(f"[{who}] 'pending' must have the shape of 'kv', "
                             f"{tuple(kv.shape)}, but has shape {tuple(pending.shape)}.")
        check_same_dtype(who, "pending", pending, "q", q)
        pend = 1
    if backend is not None:
        check_backend(backend, who)
    cap = past.shape[2]
    pend_input = pending if pend else kv  # read by the kernels only with PEND 1
    # A device-side length is only known to be at most the capacity: choose by that.
    if (cap if on_device else past_len) + pend + 1 <= ONE_PASS_MAX_LEN:
        return _attention.decode_attention(q, kv, pend_input, past, past_len=past_len,
                                           past_cap=cap, scale=float(scale), PEND=pend,
                                           backend=backend)
    splits = _attention.split_count(cap, pend)
    partials = _attention.decode_attention_split(q, kv, pend_input, past, past_len=past_len,
                                                 past_cap=cap, scale=float(scale),
                                                 splits=splits, PEND=pend, backend=backend)
    out = _attention.decode_attention_combine(partials, splits=splits, T=q.dtype,
                                              backend=backend)
    return out.reshape(B, H, 1, D)
