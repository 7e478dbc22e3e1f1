"""Parameter structs: a typed dataclass -> Metal ``struct`` text + packed bytes.

The Python equivalent of the seed's ``#[derive(MetalStruct)]``::

    @mf.struct(name="GemvParams")
    class GemvParams:
        k: mf.u32 = mf.field(name="K")
        n: mf.u32
        note: str = mf.field(skip=True, default="")

    GemvParams.metal_struct_def   # 'struct GemvParams {\\n  uint K;\\n  uint n;\\n};'
    GemvParams(k=4096, n=14336).pack()   # 8 bytes, C layout

Structs are never written by hand in a ``.metal`` file: the assembler injects
``metal_struct_def`` into the kernel header.  A kernel receives a struct as a
byte buffer; the generated body reinterprets it as ``const device S*`` (see
``kernel.py``), and stage functions take that pointer (``stage.py``): read a field as
``p->n``.
"""

import dataclasses
import numbers
import struct as _struct
import typing

import mlx.core as mx
import numpy as np

from ._names import check_identifier
from .types import ScalarType

# Struct buffers are padded to at least this many bytes so that MLX always passes
# them in the `device` address space (inputs under 8 elements go to `constant`).
MIN_STRUCT_BYTES = 16

_FIELD_KEY = "mlx_foundry"


def field(*, name=None, skip=False, **kwargs):
    """Declare options of one struct field.

    Args:
        name (str, optional): the field's name in Metal. Default: the Python name.
        skip (bool, optional): leave the field out of the Metal struct and the
            packed bytes (a Python-only field). Default: ``False``.
        **kwargs: passed to :func:`dataclasses.field` (``default=`` ...).
    """
    metadata = dict(kwargs.pop("metadata", {}) or {})
    metadata[_FIELD_KEY] = {"name": name, "skip": skip}
    return dataclasses.field(metadata=metadata, **kwargs)


@dataclasses.dataclass(frozen=True)
class StructField:
    python_name: str
    metal_name: str
    type: ScalarType
    offset: int


@dataclasses.dataclass(frozen=True)
class StructLayout:
    """The C layout of a struct: fields with offsets, size and alignment."""

    metal_name: str
    fields: tuple
    size: int
    alignment: int
    format: str  # struct module format, little-endian, with explicit padding

    @property
    def definition(self):
        lines = [f"struct {self.metal_name} {{"]
        lines += [f"  {f.type.metal} {f.metal_name};" for f in self.fields]
        lines.append("};")
        return "\n".join(lines)


def _layout(cls, metal_name):
    fields = []
    offset = 0
    alignment = 1
    fmt = "<"
    seen = set()
    try:
        # Annotations are strings under `from __future__ import annotations`.
        hints = typing.get_type_hints(cls)
    except Exception:  # a name only the defining scope knows: keep what dataclasses saw
        hints = {}
    for f in dataclasses.fields(cls):
        opts = f.metadata.get(_FIELD_KEY, {"name": None, "skip": False})
        if opts["skip"]:
            continue
        ftype = hints.get(f.name, f.type)
        if not isinstance(ftype, ScalarType):
            raise TypeError(
                f"[struct] Field {cls.__name__}.{f.name} must be annotated with a "
                f"scalar type (u8, u16, u32, u64, i32, f32, f16) or be marked "
                f"field(skip=True) but got {ftype!r}."
            )
        mname = check_identifier(opts["name"] or f.name, f"field name of {cls.__name__}",
                                 who="struct")
        if mname in seen:
            raise ValueError(f"[struct] Duplicate Metal field name {mname!r} in {cls.__name__}.")
        seen.add(mname)
        t = ftype
        pad = (-offset) % t.size
        if pad:
            fmt += f"{pad}x"
            offset += pad
        fields.append(StructField(f.name, mname, t, offset))
        fmt += t.fmt
        offset += t.size
        alignment = max(alignment, t.size)
    if not fields:
        raise ValueError(f"[struct] {cls.__name__} has no Metal fields.")
    tail = (-offset) % alignment
    if tail:
        fmt += f"{tail}x"
        offset += tail
    return StructLayout(metal_name, tuple(fields), offset, alignment, fmt)


def _pack(self):
    """Pack the struct to bytes with the C layout Metal and CUDA read."""
    cached = self.__dict__.get("_mf_packed")
    if cached is not None:
        return cached
    layout = type(self).metal_layout
    values = []
    for f in layout.fields:
        v = getattr(self, f.python_name)
        if f.type.fmt == "?":
            if not isinstance(v, (bool, np.bool_)):
                raise TypeError(f"[struct] {type(self).__name__}.{f.python_name} is bool "
                                f"and must be a bool but got {type(v).__name__}.")
            values.append(bool(v))
            continue
        integer = f.type.is_integer
        wanted = numbers.Integral if integer else numbers.Real
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, wanted):
            raise TypeError(
                f"[struct] {type(self).__name__}.{f.python_name} is {f.type.name} "
                f"and must be {'an int' if integer else 'a number'} but got "
                f"{type(v).__name__}."
            )
        values.append(int(v) if integer else float(v))  # NumPy scalars too
    try:
        data = _struct.pack(layout.format, *values)
    except (_struct.error, OverflowError) as e:
        # Neither error says which value: find it, so the message names the field.
        for f, v in zip(layout.fields, values):
            try:
                _struct.pack("=" + f.type.fmt, v)
            except (_struct.error, OverflowError) as fe:
                raise ValueError(f"[struct] {type(self).__name__}.{f.python_name} "
                                 f"({f.type.name}) cannot hold {v!r}: {fe}.") from None
        raise ValueError(f"[struct] Cannot pack {type(self).__name__}: {e}.") from None
    object.__setattr__(self, "_mf_packed", data)
    return data


def _to_array(self):
    """The packed bytes as a ``uint8`` array, padded to ``MIN_STRUCT_BYTES``.

    Cached on the (frozen) instance: passing the same params object again
    re-packs nothing.
    """
    cached = self.__dict__.get("_mf_array")
    if cached is not None:
        return cached
    data = self.pack()
    data = data + b"\0" * max(0, MIN_STRUCT_BYTES - len(data))
    arr = mx.array(list(data), dtype=mx.uint8)
    object.__setattr__(self, "_mf_array", arr)
    return arr


def struct(cls=None, *, name=None):
    """Make a class a Metal parameter struct (a frozen, keyword-only dataclass).

    Args:
        name (str, optional): the struct's name in Metal. Default: the class name.

    The class gains ``metal_name``, ``metal_struct_def``, ``metal_layout``, and
    instances gain ``pack()`` (bytes) and ``to_array()`` (``uint8`` array).
    """

    def wrap(cls):
        dc = dataclasses.dataclass(frozen=True, kw_only=True)(cls)
        metal_name = check_identifier(name or cls.__name__, "struct name", who="struct")
        layout = _layout(dc, metal_name)
        dc.metal_name = metal_name
        dc.metal_layout = layout
        dc.metal_struct_def = layout.definition
        dc.pack = _pack
        dc.to_array = _to_array
        dc.__mf_struct__ = True
        return dc

    return wrap if cls is None else wrap(cls)


def is_struct_type(obj):
    return isinstance(obj, type) and getattr(obj, "__mf_struct__", False)
