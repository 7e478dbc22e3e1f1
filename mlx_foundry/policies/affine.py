"""MLX affine quantization policies (``mx.quantize``, ``nn.QuantizedLinear``).

Reads MLX's own layout as stored, no repacking: ``w`` uint32 ``[N, K*bits/32]``
(a little-endian bit stream per row, so 3, 5 and 6-bit elements straddle words),
``scales`` and ``biases`` ``[N, K/group_size]``, ``w = scale * q + bias``.
The Metal struct is ``PolicyAffine<S, BITS, GROUP_SIZE, K>`` (``policies/affine.metal``):
a 32-element chunk is ``bits`` words (one 16-byte load for 4 bits) inside one group,
so ``dot(w, x) = scale * dot(q, x) + bias * sum(x)`` with ``sum(x)`` computed once
per chunk and shared by every row.

With half or bfloat16 activations and 4 or 8 bits the GEMV takes a packed-half path
(``HALF_PAIRS`` in the struct): two elements per 32-bit mask-and-OR with the 0x6400
magic number (exact), one half2 FMA to ``(q - 2^(bits-1)) / 2^(bits-1)``, half2 FMAs
against ``x`` kept as half2 pairs, flushed to float every 4 products per half lane
(bfloat16 ``x`` is converted to half per 32-element chunk, scaled by a power of two).
Other bit widths and float32 activations use the float path.
"""

import functools

import mlx.core as mx

from .._names import check_identifier
from ..args import Constant, Tensor
from ..types import FLOAT_DTYPES
from .base import Policy

AFFINE_HEADER = "policies/affine.metal"
AFFINE_BITS = (2, 3, 4, 5, 6, 8)
AFFINE_GROUP_SIZES = (32, 64, 128)


def check_affine(bits, group_size, who="affine"):
    """Validate ``bits`` and ``group_size``; raise a ValueError naming the argument."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in AFFINE_BITS:
        raise ValueError(f"[{who}] 'bits' must be one of {', '.join(map(str, AFFINE_BITS))} "
                         f"but got {bits!r}.")
    if (isinstance(group_size, bool) or not isinstance(group_size, int)
            or group_size not in AFFINE_GROUP_SIZES):
        raise ValueError(f"[{who}] 'group_size' must be one of "
                         f"{', '.join(map(str, AFFINE_GROUP_SIZES))} but got {group_size!r}.")


class AffinePolicy(Policy):
    """MLX affine quantized weights with ``bits`` and ``group_size`` fixed at compile time.

    Args:
        bits (int): 2, 3, 4, 5, 6 or 8.
        group_size (int): 32, 64 or 128.
        prefix (str): the weight argument's name; scales and biases are
            ``{prefix}_scales`` and ``{prefix}_biases``, their dtype constant ``{prefix}_S``.
        k (str): the name of the int constant holding ``K``.

    Example:
        >>> affine_policy(4, 64, "w").metal_type()
        'PolicyAffine<w_S, 4, 64, K>'
    """

    quantized = True

    def __init__(self, bits=4, group_size=64, prefix="w", k="K"):
        check_affine(bits, group_size, "AffinePolicy")
        check_identifier(prefix, "policy prefix", who="AffinePolicy")
        self.bits, self.group_size, self.prefix = bits, group_size, prefix
        sc, bi = f"{prefix}_scales", f"{prefix}_biases"
        args = (Tensor(prefix, mx.uint32, ndim=2), Tensor(sc, FLOAT_DTYPES, ndim=2),
                Tensor(bi, FLOAT_DTYPES, ndim=2), Constant(f"{prefix}_S", "dtype", like=sc))

        def dequantize(b):
            return mx.dequantize(b[prefix], b[sc].astype(mx.float32), b[bi].astype(mx.float32),
                                 group_size=group_size, bits=bits)

        super().__init__(
            f"affine{bits}_g{group_size}_{prefix}", header=AFFINE_HEADER,
            struct_name="PolicyAffine", template=(f"{prefix}_S", str(bits), str(group_size), k),
            params={"w": prefix, "scales": sc, "biases": bi}, args=args, dequantize=dequantize)

    @property
    def half_pairs(self):
        """``HALF_PAIRS`` of ``PolicyAffine`` (affine.metal): 4 and 8 bits only."""
        return {4: 4, 8: 2}.get(self.bits, 0)

    def signature(self):
        return ("affine", self.bits, self.group_size, self.prefix)

    def inputs(self, weight):
        p = self.prefix
        return {p: weight.weight, f"{p}_scales": weight.scales, f"{p}_biases": weight.biases}


@functools.lru_cache(maxsize=None)
def affine_policy(bits=4, group_size=64, prefix="w", k="K"):
    """The (cached) :class:`AffinePolicy` for these settings."""
    return AffinePolicy(bits, group_size, prefix, k)
