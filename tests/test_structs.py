import struct as pystruct

import pytest

import mlx_foundry as mf


@mf.struct(name="GemvParams")
class GemvParams:
    k: mf.u32 = mf.field(name="K")
    n: mf.u32
    note: str = mf.field(skip=True, default="")


def test_metal_text_with_renames_and_skipped_fields():
    assert GemvParams.metal_struct_def == "struct GemvParams {\n  uint K;\n  uint n;\n};"
    assert GemvParams.metal_name == "GemvParams"


def test_type_mapping_covers_the_seed_table():
    @mf.struct
    class AllTypes:
        a: mf.u8
        b: mf.u16
        c: mf.u32
        d: mf.u64
        e: mf.i32
        f: mf.f32
        g: mf.f16

    lines = AllTypes.metal_struct_def.splitlines()[1:-1]
    assert [l.split()[0] for l in lines] == ["uchar", "ushort", "uint", "ulong", "int", "float",
                                             "half"]
    assert AllTypes.metal_name == "AllTypes"


def test_pack_uses_c_layout_and_alignment():
    @mf.struct
    class Mixed:
        flag: mf.u8
        count: mf.u32
        h: mf.f16
        big: mf.u64

    layout = Mixed.metal_layout
    # u8 at 0, u32 aligned to 4, f16 at 8, u64 aligned to 16; size rounded to 8.
    assert [f.offset for f in layout.fields] == [0, 4, 8, 16]
    assert layout.size == 24 and layout.alignment == 8
    data = Mixed(flag=1, count=7, h=1.5, big=2**40).pack()
    assert len(data) == 24
    assert data[0] == 1 and data[1:4] == b"\0\0\0"
    assert pystruct.unpack_from("<I", data, 4)[0] == 7
    assert pystruct.unpack_from("<e", data, 8)[0] == 1.5
    assert pystruct.unpack_from("<Q", data, 16)[0] == 2**40


def test_skipped_field_is_not_packed():
    p = GemvParams(k=4096, n=14336, note="python only")
    assert p.pack() == pystruct.pack("<II", 4096, 14336)


def test_to_array_is_padded_and_cached():
    p = GemvParams(k=1, n=2)
    a = p.to_array()
    assert a.size >= 16 and a.dtype == mf.u8.dtype
    assert p.to_array() is a  # a repeated call re-packs nothing


def test_bad_annotation_is_an_error():
    with pytest.raises(TypeError, match="Bad.x"):
        @mf.struct
        class Bad:
            x: int


def test_bad_field_name_is_an_error():
    with pytest.raises(ValueError, match="identifier"):
        @mf.struct
        class BadName:
            x: mf.u32 = mf.field(name="not valid")


def test_duplicate_metal_field_name_is_an_error():
    with pytest.raises(ValueError, match="Duplicate"):
        @mf.struct
        class Dup:
            x: mf.u32 = mf.field(name="y")
            y: mf.u32


def test_pack_rejects_wrong_value_type_and_range():
    with pytest.raises(TypeError, match="GemvParams.k"):
        GemvParams(k=1.5, n=2).pack()
    with pytest.raises(ValueError, match=r"GemvParams\.k \(u32\) cannot hold -1"):
        GemvParams(k=-1, n=2).pack()
