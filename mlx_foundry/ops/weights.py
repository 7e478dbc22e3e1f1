"""``Weight``: a linear layer's weights as MLX stores them, validated once.

Dense: ``weight`` ``[N, K]`` (float16, bfloat16 or float32), as ``nn.Linear``.
Affine quantized: ``weight`` uint32 ``[N, K*bits/32]``, ``scales`` and ``biases``
``[N, K/group_size]``, as ``nn.QuantizedLinear`` (mode ``"affine"``). ``bias`` is the
layer's optional additive bias ``[N]``.
"""

import mlx.core as mx

from ..policies.affine import AFFINE_BITS, AFFINE_GROUP_SIZES, affine_policy, check_affine
from ..policies.dense import dense_policy
from ..types import FLOAT_DTYPES, dtype_name
from ._checks import FLOAT_NAMES, check_float_array, check_same_dtype


class Weight:
    """A linear layer's weights: dense or MLX affine quantized, plus an optional bias.

    Args:
        weight (array): ``[N, K]`` float weights, or uint32 ``[N, K*bits/32]`` when
            ``scales`` is given.
        scales (array, optional): ``[N, K/group_size]`` affine scales. Default: ``None``
            (dense).
        biases (array, optional): ``[N, K/group_size]`` affine biases (required with
            ``scales``).
        bias (array, optional): ``[N]`` bias added to the output. Default: ``None``.
        group_size (int): 32, 64 or 128 (quantized only). Default: ``64``.
        bits (int): 2, 3, 4, 5, 6 or 8 (quantized only). Default: ``4``.

    Shape:
        ``in_features`` = K, ``out_features`` = N.

    Examples:
        >>> w, s, b = mx.quantize(mx.random.normal((256, 512)), group_size=64, bits=4)
        >>> Weight(w, s, b, group_size=64, bits=4).in_features
        512
        >>> Weight.from_module(nn.Linear(512, 256)).out_features
        256
    """

    # Identity hashing and equality, and a __dict__ (weak references): ops/_calls.py keeps
    # the ops' prepared launches per Weight object in a WeakKeyDictionary.

    def __init__(self, weight, scales=None, biases=None, bias=None, group_size=64, bits=4):
        self.weight, self.scales, self.biases, self.bias = weight, scales, biases, bias
        self.group_size, self.bits = group_size, bits
        self.validate("Weight")

    # -- construction -----------------------------------------------------------------
    @classmethod
    def from_module(cls, module):
        """From an ``mlx.nn.Linear`` or an ``mlx.nn.QuantizedLinear`` (mode ``"affine"``).

        An ``mlx.nn.Embedding`` or ``mlx.nn.QuantizedEmbedding`` gives the weight of its
        ``as_linear`` (the output projection of a model with tied embeddings): the table
        ``[vocab, dims]`` is stored as a linear layer's ``[N, K]``.
        """
        import mlx.nn as nn

        quantized = (nn.QuantizedLinear, nn.QuantizedEmbedding)
        if isinstance(module, quantized):
            mode = getattr(module, "mode", "affine")
            if mode != "affine":
                raise ValueError(f"[Weight.from_module] Only mode 'affine' is supported but the "
                                 f"{type(module).__name__} has mode {mode!r}.")
            return cls(module["weight"], module["scales"], module.get("biases"),
                       module.get("bias"), group_size=module.group_size, bits=module.bits)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            return cls(module["weight"], bias=module.get("bias"))
        raise TypeError(f"[Weight.from_module] 'module' must be an mlx.nn.Linear, "
                        f"QuantizedLinear, Embedding or QuantizedEmbedding but got "
                        f"{type(module).__name__}.")

    # -- properties -------------------------------------------------------------------
    @property
    def quantized(self):
        return self.scales is not None

    @property
    def out_features(self):
        return self.weight.shape[0]

    @property
    def in_features(self):
        if self.quantized:
            return self.weight.shape[1] * 32 // self.bits
        return self.weight.shape[1]

    def signature(self):
        """The compile-time format: ``("dense",)`` or ``("affine", bits, group_size)``."""
        return ("affine", self.bits, self.group_size) if self.quantized else ("dense",)

    def policy(self, prefix="w"):
        """The weight :class:`~mlx_foundry.Policy` reading this format as ``prefix``."""
        return policy_for(self.signature(), prefix)

    def __repr__(self):
        fmt = (f"affine bits={self.bits} group_size={self.group_size}" if self.quantized
               else dtype_name(self.weight.dtype))
        return (f"Weight(in_features={self.in_features}, out_features={self.out_features}, "
                f"{fmt}, bias={self.bias is not None})")

    # -- validation -------------------------------------------------------------------
    def _state(self):
        return (id(self.weight), id(self.scales), id(self.biases), id(self.bias),
                self.group_size, self.bits)

    def validate(self, who):
        """Check every array; errors name the argument. Returns ``self``.

        A decode step validates the same weights every call: the result is kept
        until one of the arrays or settings is replaced (arrays are immutable).
        """
        if self.__dict__.get("_valid_state") == self._state():
            return self
        self._validate(who)
        self._valid_state = self._state()
        return self

    def _validate(self, who):
        w = self.weight
        if not isinstance(w, mx.array):
            raise TypeError(f"[{who}] 'weight' must be an mlx.core.array but got "
                            f"{type(w).__name__}.")
        if w.ndim != 2:
            raise ValueError(f"[{who}] 'weight' must have 2 dimensions [N, K] but has shape "
                             f"{tuple(w.shape)}.")
        if self.scales is None:
            if self.biases is not None:
                raise ValueError(f"[{who}] 'biases' was given without 'scales'.")
            if w.dtype not in FLOAT_DTYPES:
                raise ValueError(f"[{who}] Dense 'weight' must have dtype {FLOAT_NAMES} but has "
                                 f"{dtype_name(w.dtype)} (pass 'scales' and 'biases' for a "
                                 "quantized weight).")
        else:
            check_affine(self.bits, self.group_size, who)
            s = check_float_array(who, "scales", self.scales)
            if self.biases is None:
                raise ValueError(f"[{who}] 'biases' is required with 'scales' (MLX affine "
                                 "quantization).")
            bi = check_float_array(who, "biases", self.biases)
            # One policy dtype reads both (the kernels declare them alike).
            check_same_dtype(who, "biases", bi, "scales", s)
            if w.dtype != mx.uint32:
                raise ValueError(f"[{who}] Quantized 'weight' must have dtype uint32 but has "
                                 f"{dtype_name(w.dtype)}.")
            if (w.shape[1] * 32) % self.bits:
                raise ValueError(f"[{who}] 'weight' has {w.shape[1]} words per row, not a whole "
                                 f"number of {self.bits}-bit elements.")
            k = w.shape[1] * 32 // self.bits
            if k % self.group_size:
                raise ValueError(f"[{who}] 'group_size' {self.group_size} does not divide the "
                                 f"input dimension K={k}.")
            want = (w.shape[0], k // self.group_size)
            for name, a in (("scales", s), ("biases", bi)):
                if tuple(a.shape) != want:
                    raise ValueError(f"[{who}] '{name}' must have shape {want} (N, "
                                     f"K/group_size) for weight {tuple(w.shape)} with bits="
                                     f"{self.bits}, group_size={self.group_size} but has "
                                     f"shape {tuple(a.shape)}.")
        check_float_array(who, "bias", self.bias, shape=(w.shape[0],), none_ok=True)
        return self

    # -- plain MLX -------------------------------------------------------------------
    def matmul(self, x):
        """``x @ W.T`` with MLX's own kernels (``quantized_matmul`` or ``matmul``), no bias."""
        if self.quantized:
            return mx.quantized_matmul(x, self.weight, self.scales, self.biases, transpose=True,
                                       group_size=self.group_size, bits=self.bits)
        return x @ self.weight.T

    def inputs(self, prefix="w"):
        """Kernel argument name -> array for ``self.policy(prefix)``."""
        return self.policy(prefix).inputs(self)


def policy_for(signature, prefix, *, chunk=None):
    """The policy for a :meth:`Weight.signature` under argument name ``prefix``.

    ``chunk`` (dense only) forces the chunk size, to pair with a quantized policy.
    """
    if signature[0] == "affine":
        return affine_policy(signature[1], signature[2], prefix)
    return dense_policy(prefix, chunk=chunk)


__all__ = ["AFFINE_BITS", "AFFINE_GROUP_SIZES", "Weight", "policy_for"]
