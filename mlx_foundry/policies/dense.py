"""Dense weight policies: f16, bf16 and f32 weights stored ``[N, K]`` (MLX's Linear layout).

The Metal struct ``PolicyDense<W, K>`` (``policies/dense.metal``) holds the weight
pointer and computes the dot product of a 32-element chunk of a row with float
activations, reading rows whose byte length is a multiple of 16 with 16-byte loads.
"""

import functools

import mlx.core as mx

from .._names import check_identifier
from ..args import Constant, Tensor
from ..types import FLOAT_DTYPES
from .base import Policy

DENSE_HEADER = "policies/dense.metal"


class DensePolicy(Policy):
    """A dense weight of any float dtype (the dtype is a compile-time constant).

    Args:
        prefix (str): the name of the weight argument; the dtype constant is
            ``{prefix}_W``. Several policies in one kernel use distinct prefixes.
        k (str): the name of the int constant holding the reduction length ``K``.

    Example:
        >>> p = dense_policy("w")
        >>> p.metal_type()
        'PolicyDense<w_W, K>'
    """

    quantized = False

    def __init__(self, prefix="w", k="K", chunk=None):
        check_identifier(prefix, "policy prefix", who="DensePolicy")
        self.prefix = prefix
        self.chunk = chunk
        weight = Tensor(prefix, FLOAT_DTYPES, ndim=2)
        super().__init__(
            f"dense_{prefix}", header=DENSE_HEADER, struct_name="PolicyDense",
            template=(f"{prefix}_W", k) + ((int(chunk),) if chunk else ()),
            params={"w": prefix},
            args=(weight, Constant(f"{prefix}_W", "dtype", like=prefix)),
            dequantize=lambda b: b[prefix].astype(mx.float32))

    def signature(self):
        """What distinguishes kernels built with this policy (for caches)."""
        return ("dense", self.prefix, self.chunk)

    def inputs(self, weight):
        """Kernel argument name -> array, from a :class:`~mlx_foundry.ops.Weight`."""
        return {self.prefix: weight.weight}


@functools.lru_cache(maxsize=None)
def dense_policy(prefix="w", k="K", chunk=None):
    """The (cached) :class:`DensePolicy` for argument ``prefix``.

    ``chunk`` forces the elements per lane and step (32 to share a dual GEMV with a
    quantized policy); by default one 16-byte load, for coalesced reads.
    """
    return DensePolicy(prefix, k, chunk)
