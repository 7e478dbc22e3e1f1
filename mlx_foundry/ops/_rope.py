"""RoPE arguments shared by the ops that rotate (``norm_qkv_rope``, ``qk_norm_rope``):
checked at the boundary, turned into the kernels' float32 inverse frequencies."""

import functools
import math
import numbers

import mlx.core as mx

from ..types import dtype_name
from ._checks import is_finite_number


def check_offset(who, offset):
    """An int (NumPy's too; returned as ``int``), or a one-element integer array (a
    position known only on the device, returned as it is)."""
    if isinstance(offset, mx.array):
        if offset.size != 1 or not mx.issubdtype(offset.dtype, mx.integer):
            raise ValueError(f"[{who}] 'offset' must be an int or a one-element integer array "
                             f"but got shape {tuple(offset.shape)}, {dtype_name(offset.dtype)}.")
        return offset
    if isinstance(offset, bool) or not isinstance(offset, numbers.Integral):
        raise TypeError(f"[{who}] 'offset' must be an int or an integer array but got "
                        f"{type(offset).__name__}.")
    offset = int(offset)
    if not -2**31 <= offset < 2**31:
        # The kernels take the position as int32, as mx.fast.rope does.
        raise ValueError(f"[{who}] 'offset' must fit in int32 but got {offset}.")
    return offset


def check_rope(who, head_dim, rope_base, rope_freqs, rope_scale=1.0, rope_traditional=False):
    """``rope_freqs`` of shape ``[head_dim / 2]``, else a finite positive ``rope_base``; a
    finite ``rope_scale`` and a bool ``rope_traditional`` (any other truthy value would
    silently pick the other rotation)."""
    if not isinstance(rope_traditional, bool):
        raise TypeError(f"[{who}] 'rope_traditional' must be a bool but got "
                        f"{type(rope_traditional).__name__}.")
    if not is_finite_number(rope_scale):
        raise ValueError(f"[{who}] 'rope_scale' must be a finite number but got "
                         f"{rope_scale!r}.")
    if rope_freqs is not None:
        if not isinstance(rope_freqs, mx.array) or tuple(rope_freqs.shape) != (head_dim // 2,):
            got = tuple(rope_freqs.shape) if isinstance(rope_freqs, mx.array) else rope_freqs
            raise ValueError(f"[{who}] 'rope_freqs' must be an array of shape "
                             f"({head_dim // 2},) but got {got!r}.")
    elif not (is_finite_number(rope_base) and rope_base > 0):
        raise ValueError(f"[{who}] 'rope_base' must be a finite positive number but got "
                         f"{rope_base!r}.")


def inv_freq(head_dim, rope_base, rope_freqs):
    """The float32 ``[head_dim / 2]`` inverse frequencies, as ``mx.fast.rope`` uses them."""
    if rope_freqs is not None:
        return mx.reciprocal(rope_freqs.astype(mx.float32))
    # The device's type, not the mx.Device: Device objects compare equal but hash by
    # identity, so with them as keys every call missed (and recomputed the frequencies:
    # three more kernels per call).
    return default_inv_freq(head_dim, float(rope_base), mx.default_device().type)


@functools.lru_cache(maxsize=64)
def default_inv_freq(head_dim, base, device_type):
    # mx.fast.rope's fallback: exp(-i * log(base) / (D/2)), in float32, computed on the
    # default device of the call. Keyed by its type because MLX's CPU and GPU exp may
    # differ in the last bit, which moves the angle at position p by up to p * 2^-23: an
    # op on one device must not reuse frequencies computed on the other (in the tests the
    # reference runs on the CPU beside the GPU kernels).
    half = head_dim // 2
    return mx.exp(mx.arange(0, -half, -1, dtype=mx.float32)
                  * mx.array(math.log(base) / half, dtype=mx.float32))


@functools.lru_cache(maxsize=16)
def no_rotation(head_dim):
    """Inverse frequencies of 0: every angle 0, the rotation the identity."""
    return mx.zeros((head_dim // 2,), mx.float32)
