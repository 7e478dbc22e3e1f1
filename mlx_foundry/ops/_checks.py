"""Input checks shared by the public ops: each error names the argument."""

import math
import numbers

import mlx.core as mx

from ..types import FLOAT_DTYPES, dtype_name

FLOAT_NAMES = ", ".join(dtype_name(d) for d in FLOAT_DTYPES)


def check_float_array(who, name, v, *, min_ndim=1, shape=None, none_ok=False):
    """A non-empty float16/bfloat16/float32 array (of ``shape`` when given)."""
    if v is None and none_ok:
        return None
    if not isinstance(v, mx.array):
        extra = " or None" if none_ok else ""
        raise TypeError(f"[{who}] '{name}' must be an mlx.core.array{extra} but got "
                        f"{type(v).__name__}.")
    if v.dtype not in FLOAT_DTYPES:
        raise ValueError(f"[{who}] '{name}' must have a floating dtype ({FLOAT_NAMES}) "
                         f"but got {dtype_name(v.dtype)}.")
    if shape is not None and tuple(v.shape) != tuple(shape):
        raise ValueError(f"[{who}] '{name}' must have shape {tuple(shape)} but has shape "
                         f"{tuple(v.shape)}.")
    if v.ndim < min_ndim:
        raise ValueError(f"[{who}] '{name}' must have at least {min_ndim} dimension(s) but "
                         f"has shape {tuple(v.shape)}.")
    if v.size == 0:
        raise ValueError(f"[{who}] '{name}' is empty (shape {tuple(v.shape)}).")
    return v


def check_same_dtype(who, name, v, ref_name, ref):
    """``v`` has the dtype of the array ``ref`` (the argument named ``ref_name``)."""
    if v.dtype != ref.dtype:
        raise ValueError(f"[{who}] '{name}' must have the dtype of '{ref_name}' "
                         f"({dtype_name(ref.dtype)}) but has {dtype_name(v.dtype)}.")


def in_dtype_of(a, ref):
    """``a`` in the dtype of ``ref`` (no copy when it already is): the fused kernels read
    norm weights and biases as their activation's dtype."""
    return a if a.dtype == ref.dtype else a.astype(ref.dtype)


def is_finite_number(v):
    """An int or float (numpy's included), not a bool, and finite."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def check_eps(who, eps):
    """A finite, non-negative number (as ``mx.fast.rms_norm`` takes)."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):  # NumPy's too
        raise TypeError(f"[{who}] 'eps' must be a number but got {type(eps).__name__}.")
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"[{who}] 'eps' must be a finite non-negative number but got {eps}.")
    return eps
