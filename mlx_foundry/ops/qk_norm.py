"""Per-head RMSNorm of queries and keys, then RoPE: validated at the boundary, one kernel."""

from ..backends import select_backend
from ..stages.qk_norm import qk_norm_rope_kernel
from . import _rope
from ._checks import check_eps, check_float_array, check_same_dtype, in_dtype_of

MAX_HEAD_DIM = 256
"""The largest ``head_dim`` :func:`qk_norm_rope` takes (a multiple of 32)."""


def qk_norm_rope(q, kv, q_norm_weight, k_norm_weight, eps, *, offset, rope_base=10000.0,
                 rope_scale=1.0, rope_traditional=False, rope_freqs=None, backend=None):
    """RMSNorm of every query and key head, then RoPE on both, in one kernel.

    What Qwen3's attention does between its projections and the attention::

        q = rope(rms_norm(q, q_norm_weight, eps))
        k = rope(rms_norm(k, k_norm_weight, eps))

    with each norm rounded to the dtype (as ``nn.RMSNorm`` returns it) and RoPE exactly
    as ``mx.fast.rope(t, head_dim, traditional=rope_traditional, base=rope_base,
    scale=rope_scale, offset=offset, freqs=rope_freqs)``. Keys and values come in the
    joint layout that ``norm_qkv_rope(..., rope=False, joint_kv=True)`` gives one token
    (keys in the first ``n_kv_heads`` heads); the values pass through unchanged.

    Args:
        q (array): ``[B, n_heads, L, head_dim]``, float16/bfloat16/float32.
        kv (array): ``[B, 2 * n_kv_heads, L, head_dim]``, the dtype of ``q``.
        q_norm_weight, k_norm_weight (array): ``[head_dim]`` norm weights.
        eps (float): the norms' epsilon.
        offset (int or array): position of the first of the ``L`` rows (an integer
            array of one value keeps it on the device).
        rope_base (float): Default: ``10000.0``. rope_scale (float): Default: ``1.0``.
        rope_traditional (bool): rotate adjacent pairs. Default: ``False``.
        rope_freqs (array, optional): ``[head_dim / 2]`` custom frequencies.
        backend (str, optional): ``"metal"``, ``"cuda"`` or ``"reference"``.
            Default: chosen automatically.

    Returns:
        tuple(array, array): ``q`` and ``kv`` of the same shapes and dtype.

    Example:
        >>> q, kv = mx.random.normal((1, 32, 1, 128)), mx.random.normal((1, 16, 1, 128))
        >>> w = mx.ones((128,))
        >>> q, kv = qk_norm_rope(q, kv, w, w, 1e-6, offset=17, rope_base=1e6)
    """
    who = "qk_norm_rope"
    check_float_array(who, "q", q)
    check_float_array(who, "kv", kv)
    if q.ndim != 4:
        raise ValueError(f"[{who}] 'q' must be [B, n_heads, L, head_dim] but has shape "
                         f"{tuple(q.shape)}.")
    B, _, L, D = q.shape
    if kv.ndim != 4 or kv.shape[1] % 2 or (kv.shape[0], kv.shape[2], kv.shape[3]) != (B, L, D):
        raise ValueError(f"[{who}] 'kv' must be [B, 2 * n_kv_heads, L, head_dim] with the B, "
                         f"L and head_dim of 'q' {tuple(q.shape)} but has shape "
                         f"{tuple(kv.shape)}.")
    check_same_dtype(who, "kv", kv, "q", q)
    if D % 32 or D > MAX_HEAD_DIM:
        raise ValueError(f"[{who}] 'head_dim' (the last dimension of 'q') must be a multiple "
                         f"of 32 up to {MAX_HEAD_DIM} but is {D}.")
    _rope.check_rope(who, D, rope_base, rope_freqs, rope_scale, rope_traditional)
    if rope_traditional and D % 64:
        raise ValueError(f"[{who}] traditional RoPE needs a 'head_dim' that is a multiple of "
                         f"64 but it is {D}.")
    check_float_array(who, "q_norm_weight", q_norm_weight, shape=(D,))
    check_float_array(who, "k_norm_weight", k_norm_weight, shape=(D,))
    check_eps(who, eps)
    offset = _rope.check_offset(who, offset)
    be = select_backend(backend, who)
    kern = qk_norm_rope_kernel(bool(rope_traditional))
    return kern(q, kv, in_dtype_of(q_norm_weight, q), in_dtype_of(k_norm_weight, q),
                _rope.inv_freq(D, rope_base, rope_freqs), eps=float(eps), rope_offset=offset,
                rope_scale=float(rope_scale), q_rows=q.shape[0] * q.shape[1] * L, backend=be)
