"""Scalar types shared by structs, arguments and policies."""

from dataclasses import dataclass

import mlx.core as mx


@dataclass(frozen=True)
class ScalarType:
    """A scalar type as Python, Metal and MLX see it.

    Attributes:
        name (str): the short name used in descriptors (``"u32"``).
        metal (str): the Metal spelling (``"uint"``).
        fmt (str): the ``struct`` module format character.
        size (int): size in bytes (equal to the C alignment for these types).
        dtype (mlx.core.Dtype): the MLX dtype used to pass a runtime scalar.
    """

    name: str
    metal: str
    fmt: str
    size: int
    dtype: object

    def __repr__(self):
        return self.name

    @property
    def is_integer(self):
        return self.fmt in "BHIQbhiq"

    @property
    def bounds(self):
        """``(lo, hi)`` of an integer type (``None`` for the others)."""
        if not self.is_integer:
            return None
        bits = 8 * self.size
        if self.fmt in "BHIQ":
            return 0, 2**bits - 1
        return -2**(bits - 1), 2**(bits - 1) - 1


u8 = ScalarType("u8", "uchar", "B", 1, mx.uint8)
u16 = ScalarType("u16", "ushort", "H", 2, mx.uint16)
u32 = ScalarType("u32", "uint", "I", 4, mx.uint32)
u64 = ScalarType("u64", "ulong", "Q", 8, mx.uint64)
i32 = ScalarType("i32", "int", "i", 4, mx.int32)
f32 = ScalarType("f32", "float", "f", 4, mx.float32)
f16 = ScalarType("f16", "half", "e", 2, mx.float16)
boolean = ScalarType("bool", "bool", "?", 1, mx.bool_)

SCALAR_TYPES = {t.name: t for t in (u8, u16, u32, u64, i32, f32, f16, boolean)}

# MLX dtype -> the Metal type name MLX itself uses in generated signatures.
_METAL_DTYPE_NAMES = {
    mx.float32: "float",
    mx.float16: "half",
    mx.bfloat16: "bfloat16_t",
    mx.uint8: "uint8_t",
    mx.uint16: "uint16_t",
    mx.uint32: "uint32_t",
    mx.uint64: "uint64_t",
    mx.int8: "int8_t",
    mx.int16: "int16_t",
    mx.int32: "int32_t",
    mx.int64: "int64_t",
    mx.bool_: "bool",
}

FLOAT_DTYPES = (mx.float16, mx.bfloat16, mx.float32)


def metal_type_name(dtype):
    """The Metal type name of an MLX dtype (``mx.float16`` -> ``"half"``)."""
    try:
        return _METAL_DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"[mlx_foundry] No Metal type for dtype {dtype}.") from None


def dtype_name(dtype):
    """A short, stable name of an MLX dtype (``mx.float16`` -> ``"float16"``)."""
    return str(dtype).rsplit(".", 1)[-1]
