"""MLX affine quantization with each row one stream: scales and biases beside their weights.

The values are MLX's (``mx.quantize``), rearranged once by :func:`interleave_arrays`:
``w`` uint32 ``[N, row_words(K, bits, group_size)]``, each row a run of records of 512
elements, a record being its elements' weight words (MLX's bit stream) followed by one
word per group holding ``(scale, bias)`` as two 2-byte floats, the scale in the low half.
The last record may hold fewer elements (``K % 512``, whole groups); rows are padded to
a multiple of four words. The Metal struct is ``PolicyAffineRows<S, BITS, GROUP_SIZE,
K>`` (``policies/affine_rows.metal``), with ``PolicyAffine``'s arithmetic: the same
results, bit for bit.

Why: a decode GEMV over MLX's layout reads three streams per row, and on an H200 the
2-byte scale and bias loads cost the tall 4-bit GEMV's access pattern as much as 8 MB of
weights (``docs/bench_journal.md``, session 30). The bytes are the same in both layouts.
"""

import functools

import mlx.core as mx

from .._names import check_identifier
from ..args import Tensor
from ..types import dtype_name, metal_type_name
from .affine import AFFINE_HEADER, check_affine
from .base import Policy

AFFINE_ROWS_HEADER = "policies/affine_rows.metal"
RECORD = 512
"""Elements per record: 16 chunks of 32."""
SCALE_DTYPES = (mx.float16, mx.bfloat16)
"""Scale and bias dtypes a record word holds two of."""


def row_words(k, bits, group_size):
    """uint32 words per row of an interleaved weight with ``k`` inputs."""
    return (k * bits // 32 + k // group_size + 3) // 4 * 4


def check_scale_dtype(dtype, who, name="scales"):
    if dtype not in SCALE_DTYPES:
        raise ValueError(f"[{who}] '{name}' must have dtype float16 or bfloat16 to be "
                         f"interleaved (two per word) but has {dtype_name(dtype)}.")


def interleave_arrays(w, scales, biases, bits, group_size):
    """MLX's ``(w, scales, biases)`` as one ``[N, row_words]`` uint32 array, with plain
    MLX ops (lazy, on any device)."""
    n, k = w.shape[0], w.shape[1] * 32 // bits
    rec_words, rec_groups = RECORD * bits // 32, RECORD // group_size
    full, last = divmod(k, RECORD)
    pairs = mx.stack([scales, biases], axis=-1).view(mx.uint32).reshape(n, k // group_size)
    parts = []
    if full:
        wr = w[:, :full * rec_words].reshape(n, full, rec_words)
        sr = pairs[:, :full * rec_groups].reshape(n, full, rec_groups)
        parts.append(mx.concatenate([wr, sr], axis=2).reshape(n, -1))
    if last:
        parts += [w[:, full * rec_words:], pairs[:, full * rec_groups:]]
    pad = row_words(k, bits, group_size) - (k * bits // 32 + k // group_size)
    if pad:
        parts.append(mx.zeros((n, pad), mx.uint32))
    return mx.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]


def deinterleave_arrays(packed, k, bits, group_size, dtype):
    """The inverse of :func:`interleave_arrays`: MLX's ``(w, scales, biases)``, scales and
    biases of ``dtype``."""
    n = packed.shape[0]
    rec_words, rec_groups = RECORD * bits // 32, RECORD // group_size
    full, last = divmod(k, RECORD)
    ws, ps = [], []
    if full:
        recs = packed[:, :full * (rec_words + rec_groups)].reshape(n, full, -1)
        ws.append(recs[:, :, :rec_words].reshape(n, -1))
        ps.append(recs[:, :, rec_words:].reshape(n, -1))
    if last:
        at = full * (rec_words + rec_groups)
        lw = last * bits // 32
        ws.append(packed[:, at:at + lw])
        ps.append(packed[:, at + lw:at + lw + last // group_size])
    w = mx.concatenate(ws, axis=1) if len(ws) > 1 else ws[0]
    p = mx.concatenate(ps, axis=1) if len(ps) > 1 else ps[0]
    sb = p.reshape(n, -1, 1).view(dtype)
    return w, sb[..., 0], sb[..., 1]


class AffineRowsPolicy(Policy):
    """Interleaved MLX affine weights (:func:`mlx_foundry.ops.interleave`): ``bits``,
    ``group_size`` and the scales' dtype fixed at compile time.

    Args:
        bits (int): 2, 3, 4, 5, 6 or 8.
        group_size (int): 32, 64 or 128.
        scale_dtype (Dtype): ``float16`` or ``bfloat16``.
        prefix (str): the weight argument's name.
        k (str): the name of the int constant holding ``K``.

    Example:
        >>> affine_rows_policy(4, 64, mx.float16, "w").metal_type()
        'PolicyAffineRows<half, 4, 64, K>'
    """

    quantized = True

    def __init__(self, bits=4, group_size=64, scale_dtype=mx.float16, prefix="w", k="K"):
        check_affine(bits, group_size, "AffineRowsPolicy")
        check_scale_dtype(scale_dtype, "AffineRowsPolicy", "scale_dtype")
        check_identifier(prefix, "policy prefix", who="AffineRowsPolicy")
        self.bits, self.group_size, self.prefix = bits, group_size, prefix
        self.scale_dtype = scale_dtype

        def dequantize(b):
            w, s, bi = deinterleave_arrays(b[prefix], b[k], bits, group_size, scale_dtype)
            return mx.dequantize(w, s.astype(mx.float32), bi.astype(mx.float32),
                                 group_size=group_size, bits=bits)

        super().__init__(
            f"affine_rows{bits}_g{group_size}_{dtype_name(scale_dtype)}_{prefix}",
            header=(AFFINE_HEADER, AFFINE_ROWS_HEADER), struct_name="PolicyAffineRows",
            template=(metal_type_name(scale_dtype), str(bits), str(group_size), k),
            params={"w": prefix}, args=(Tensor(prefix, mx.uint32, ndim=2),),
            dequantize=dequantize)

    @property
    def half_pairs(self):
        """``HALF_PAIRS`` of ``PolicyAffineRows``: 4 and 8 bits only."""
        return {4: 4, 8: 2}.get(self.bits, 0)

    def signature(self):
        return ("affine_rows", self.bits, self.group_size, dtype_name(self.scale_dtype),
                self.prefix)

    def inputs(self, weight):
        return {self.prefix: weight.weight}


@functools.lru_cache(maxsize=None)
def affine_rows_policy(bits=4, group_size=64, scale_dtype=mx.float16, prefix="w", k="K"):
    """The (cached) :class:`AffineRowsPolicy` for these settings."""
    return AffineRowsPolicy(bits, group_size, scale_dtype, prefix, k)
