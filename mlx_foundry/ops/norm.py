"""Normalization, RoPE and softmax ops: validated at the boundary, one kernel each."""

import functools

import mlx.core as mx

from ..backends import check_backend
from ..stages import norm as _norm
from ..stages import rope as _rope
from ..stages import softmax as _softmax
from ..types import dtype_name
from ._checks import check_eps, check_float_array, check_same_dtype, is_finite_number
from ._rope import check_offset


def _check_weight(who, weight, x):
    """Shape only: a weight of another float dtype is promoted, as in
    ``mx.fast.rms_norm``."""
    if weight is None:
        return
    check_float_array(who, "weight", weight)
    if weight.ndim != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"[{who}] 'weight' must have shape ({x.shape[-1]},) (the last "
                         f"dimension of 'x') but has shape {tuple(weight.shape)}.")


def _check_backend(who, backend):
    if backend is not None:
        check_backend(backend, who)


def rms_norm(x, weight, eps, *, backend=None):
    r"""Root Mean Square normalization over the last axis (like ``mx.fast.rms_norm``).

    .. math::

        y = \frac{x}{\sqrt{\mathrm{mean}(x^2) + \epsilon}} \cdot \gamma

    Accumulates in float32; the normalized value is rounded to the input dtype
    before the weight is applied, as ``mx.fast.rms_norm`` does.

    Args:
        x (array): input, float16/bfloat16/float32, at least 1-D.
        weight (array or None): :math:`\gamma`, shape ``(x.shape[-1],)``; ``None``
            for no scaling. Of another float dtype, both are cast to the promoted
            dtype first and the output has it, as in ``mx.fast.rms_norm``.
        eps (float): added to the mean square; finite and non-negative.
        backend (str, optional): ``"metal"``, ``"cuda"`` or ``"reference"``.
            Default: chosen automatically.

    Shape:
        - x: :math:`(*, K)`; output: the same.

    Examples:
        >>> import mlx.core as mx
        >>> from mlx_foundry.ops import rms_norm
        >>> x = mx.random.normal((2, 4096)).astype(mx.float16)
        >>> y = rms_norm(x, mx.ones((4096,), mx.float16), 1e-5)
    """
    who = "rms_norm"
    check_float_array(who, "x", x)
    _check_weight(who, weight, x)
    check_eps(who, eps)
    _check_backend(who, backend)
    if weight is not None and weight.dtype != x.dtype:
        # MLX's promotion rule, read off an unevaluated product (no promote_types in
        # the Python API).
        dtype = (mx.zeros((), x.dtype) * mx.zeros((), weight.dtype)).dtype
        x, weight = x.astype(dtype), weight.astype(dtype)
    rows = x.size // x.shape[-1]
    if weight is None:
        return _norm.make_rms_norm(False)(x, n_rows=rows, eps=float(eps), backend=backend)
    return _norm.rms_norm(x, weight, n_rows=rows, eps=float(eps), backend=backend)


def add_rms_norm(x, residual, weight, eps, *, backend=None):
    r"""Residual add followed by RMSNorm, in one pass; returns ``(normed, h)``.

    .. math::

        h = x + r, \qquad y = \frac{h}{\sqrt{\mathrm{mean}(h^2) + \epsilon}} \cdot \gamma

    ``h`` is rounded to the input dtype (as ``x + residual`` would be) and
    normalized as :func:`rms_norm` does.

    Args:
        x (array): input, float16/bfloat16/float32, at least 1-D.
        residual (array): same shape and dtype as ``x``.
        weight (array or None): :math:`\gamma`, shape ``(x.shape[-1],)``. Of another
            float dtype, the normalized output is promoted as in :func:`rms_norm`
            (``h`` keeps the dtype of ``x``) and two kernels run instead of one.
        eps (float): added to the mean square; finite and non-negative.
        backend (str, optional): ``"metal"``, ``"cuda"`` or ``"reference"``.
            Default: chosen automatically.

    Shape:
        - x, residual: :math:`(*, K)`; both outputs: the same.

    Examples:
        >>> x = mx.random.normal((1, 4096)).astype(mx.float16)
        >>> r = mx.random.normal((1, 4096)).astype(mx.float16)
        >>> y, h = add_rms_norm(x, r, mx.ones((4096,), mx.float16), 1e-5)
    """
    who = "add_rms_norm"
    check_float_array(who, "x", x)
    check_float_array(who, "residual", residual)
    if residual.shape != x.shape:
        raise ValueError(f"[{who}] 'residual' must have the shape of 'x' {tuple(x.shape)} "
                         f"but has shape {tuple(residual.shape)}.")
    check_same_dtype(who, "residual", residual, "x", x)
    _check_weight(who, weight, x)
    check_eps(who, eps)
    _check_backend(who, backend)
    if weight is not None and weight.dtype != x.dtype:
        # h stays in the dtype of x while the norm promotes (as rms_norm does): two
        # kernels, as `h = x + residual; rms_norm(h, weight)` would be.
        h = x + residual
        return rms_norm(h, weight, eps, backend=backend), h
    rows = x.size // x.shape[-1]
    if weight is None:
        return _norm.make_add_rms_norm(False)(x, residual, n_rows=rows, eps=float(eps),
                                              backend=backend)
    return _norm.add_rms_norm(x, residual, weight, n_rows=rows, eps=float(eps),
                              backend=backend)


@functools.lru_cache(maxsize=None)
def _no_freqs():
    return mx.zeros((8,), dtype=mx.float32)


@functools.lru_cache(maxsize=1024)
def _offset_array(offset):
    return mx.full((8,), offset, dtype=mx.int32)


def rope(x, dims, *, traditional, base, scale, offset, freqs=None, backend=None):
    r"""Rotary positional encoding (like ``mx.fast.rope``).

    Rotates pairs of the first ``dims`` features of each vector by
    :math:`\theta_j = s\,(p + \text{offset})\,b^{-2j/\text{dims}}` for position
    :math:`p` along axis ``-2``; features past ``dims`` pass through.

    The offset, base and scale are runtime values: decoding does not recompile
    per position.

    Args:
        x (array): input, float16/bfloat16/float32, at least 3-D.
        dims (int): features to rotate; positive, even, at most ``x.shape[-1]``.
        traditional (bool): rotate adjacent pairs ``(2j, 2j+1)`` instead of
            ``(j, j + dims/2)``.
        base (float or None): the frequency base; ``None`` when ``freqs`` is given.
        scale (float): scales the positions.
        offset (int or array): position offset; an int, or an integer array of
            one value or ``x.shape[0]`` values (one per batch entry).
        freqs (array, optional): ``dims // 2`` frequencies to use instead of
            ``base``. Default: ``None``.
        backend (str, optional): ``"metal"``, ``"cuda"`` or ``"reference"``.

    Shape:
        - x: :math:`(B, *, L, D)`; output: the same.

    Examples:
        >>> q = mx.random.normal((1, 32, 1, 128)).astype(mx.float16)
        >>> q = rope(q, 128, traditional=False, base=10000.0, scale=1.0, offset=17)
    """
    who = "rope"
    check_float_array(who, "x", x, min_ndim=3)
    D = x.shape[-1]
    if isinstance(dims, bool) or not isinstance(dims, int):
        raise TypeError(f"[{who}] 'dims' must be an int but got {type(dims).__name__}.")
    if dims <= 0 or dims % 2 or dims > D:
        raise ValueError(f"[{who}] 'dims' must be positive, even and at most the last "
                         f"dimension of 'x' ({D}) but got {dims}.")
    if not isinstance(traditional, bool):
        raise TypeError(f"[{who}] 'traditional' must be a bool but got "
                        f"{type(traditional).__name__}.")
    if not is_finite_number(scale):
        raise ValueError(f"[{who}] 'scale' must be a finite number but got {scale!r}.")
    if freqs is not None:
        if base is not None:
            raise ValueError(f"[{who}] Only one of 'base' or 'freqs' can have a value.")
        if not isinstance(freqs, mx.array):
            raise TypeError(f"[{who}] 'freqs' must be an mlx.core.array but got "
                            f"{type(freqs).__name__}.")
        if freqs.ndim != 1 or freqs.shape[0] != dims // 2:
            raise ValueError(f"[{who}] 'freqs' must have shape ({dims // 2},) but has shape "
                             f"{tuple(freqs.shape)}.")
        freqs_arr = freqs.astype(mx.float32)
        base_value = 1.0
    else:
        if base is None:
            raise ValueError(f"[{who}] Neither 'base' nor 'freqs' has a value.")
        if not (is_finite_number(base) and base > 0):
            raise ValueError(f"[{who}] 'base' must be a finite positive number but got "
                             f"{base!r}.")
        freqs_arr = _no_freqs()
        base_value = float(base)
    B = x.shape[0]
    if isinstance(offset, mx.array):
        if not mx.issubdtype(offset.dtype, mx.integer):
            raise ValueError(f"[{who}] 'offset' must be an integer but has dtype "
                             f"{dtype_name(offset.dtype)}.")
        if offset.ndim > 1 or offset.size not in (1, B):
            raise ValueError(f"[{who}] 'offset' must be a scalar or a vector of {B} values "
                             f"but has shape {tuple(offset.shape)}.")
        stride = 0 if offset.size == 1 else 1
        off = offset.reshape(-1).astype(mx.int32)
    else:
        stride, off = 0, _offset_array(check_offset(who, offset))
    _check_backend(who, backend)
    L = x.shape[-2]
    rows = x.size // D
    heads = rows // (B * L)
    return _rope.rope(x, off, freqs_arr, n_rows=rows, seq_len=L, heads=heads,
                      offset_stride=stride, base=base_value, scale=float(scale), DIMS=dims,
                      TRADITIONAL=traditional, USE_FREQS=freqs is not None, backend=backend)


def softmax(x, *, backend=None):
    r"""Numerically stable softmax over the last axis (like ``mx.softmax(x, -1, precise=True)``).

    .. math::

        y_i = \frac{e^{x_i - \max x}}{\sum_j e^{x_j - \max x}}

    Accumulates in float32; the output has the dtype of ``x``.

    Args:
        x (array): input, float16/bfloat16/float32, at least 1-D.
        backend (str, optional): ``"metal"``, ``"cuda"`` or ``"reference"``.

    Shape:
        - x: :math:`(*, N)`; output: the same.

    Examples:
        >>> p = softmax(mx.random.normal((4, 1000)))
    """
    who = "softmax"
    check_float_array(who, "x", x)
    _check_backend(who, backend)
    n = x.shape[-1]
    return _softmax.softmax(x, n_rows=x.size // n, n_cols=n, backend=backend)
