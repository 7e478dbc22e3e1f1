"""The packed-half affine GEMV path, simulated in numpy (CPU, no kernel involved).

policies/affine.metal (affine_hdot_word, PolicyAffine::dot_h) and stages/gemv.metal
(gemv_half_pairs_of, gemv_dot_rows_h) dequantize 4- and 8-bit MLX affine weights with
the FasterTransformer/Marlin bit trick: OR-ing 0x6400 (1024.0 in half) into a half whose
low mantissa bits hold v gives 1024 + v; one half2 FMA turns two of them into
qh = (q - 2^(BITS-1)) / 2^(BITS-1); products are accumulated with half2 FMAs against x
permuted into the same pair order, flushed to float every 4 products per half lane, and
finished in float as s * d + (s + bias) * sum(x) with s = scale * 2^(BITS-1).

These tests replay exactly those steps (every half operation rounded as the hardware
rounds it: exact result, one rounding to float16) and check them against the plain
unpacked nibbles/bytes and against MLX's own dequantization.
"""

import mlx.core as mx
import numpy as np
import pytest

MAGIC = np.uint32(0x64006400)
SPECIAL_WORDS = np.array([0x00000000, 0xFFFFFFFF, 0x12345678, 0x87654321, 0x0F0F0F0F,
                          0xF0F0F0F0, 0x80000001, 0x7FFFFFFE], dtype=np.uint32)


def _words(n, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.integers(0, 2 ** 32, size=n, dtype=np.uint64).astype(np.uint32)
    return np.concatenate([SPECIAL_WORDS, w])


def _h2(u):
    """uint32 words -> (low half, high half) as float16 arrays (as_type<half2>(u))."""
    u = np.asarray(u, dtype=np.uint32)
    return (u & 0xFFFF).astype(np.uint16).view(np.float16), (u >> 16).astype(np.uint16).view(
        np.float16)


def _hfma(a, b, c):
    """Half FMA: a * b + c exactly (float64 holds it here), rounded once to float16."""
    return (np.float64(1) * a.astype(np.float64) * b.astype(np.float64)
            + c.astype(np.float64)).astype(np.float16)


def _const(bits16):
    return np.array(bits16, dtype=np.uint16).view(np.float16)


# The kernel's constants, as bit patterns (as_type<half2>(0x3000_3000) etc.).
EIGHTH, ONE_128, ONE_16 = _const(0x3000), _const(0x2000), _const(0x2C00)
M129, M9 = _const(0xD808), _const(0xC880)


def test_constants():
    assert float(EIGHTH) == 1 / 8 and float(ONE_128) == 1 / 128 and float(ONE_16) == 1 / 16
    assert float(M129) == -129 and float(M9) == -9
    assert float(_h2(MAGIC)[0]) == 1024 and float(_h2(MAGIC)[1]) == 1024


def _extract4(w):
    """affine_hdot_word<4>: the four half2 values of word w, in the kernel's order."""
    w8 = w >> np.uint32(8)
    hs = [(w & np.uint32(0x000F000F)) | MAGIC, (w & np.uint32(0x00F000F0)) | MAGIC,
          (w8 & np.uint32(0x000F000F)) | MAGIC, (w8 & np.uint32(0x00F000F0)) | MAGIC]
    scale = [EIGHTH, ONE_128, EIGHTH, ONE_128]
    off = [M129, M9, M129, M9]
    raw = [_h2(h) for h in hs]
    q = [tuple(_hfma(p, s, o) for p in r) for r, s, o in zip(raw, scale, off)]
    return raw, q


def _extract8(w):
    w8 = w >> np.uint32(8)
    hs = [(w & np.uint32(0x00FF00FF)) | MAGIC, (w8 & np.uint32(0x00FF00FF)) | MAGIC]
    raw = [_h2(h) for h in hs]
    q = [tuple(_hfma(p, ONE_128, M9) for p in r) for r in raw]
    return raw, q


def test_nibble_extraction_is_exact():
    w = _words(4096)
    e = [((w >> np.uint32(4 * i)) & np.uint32(0xF)).astype(np.float64) for i in range(8)]
    raw, q = _extract4(w)
    # (1024 + e0, 1024 + e4), (1024 + 16 e1, 1024 + 16 e5), (e2, e6), (16 e3, 16 e7)
    pairs = [(0, 4), (1, 5), (2, 6), (3, 7)]
    for k, (lo, hi) in enumerate(pairs):
        mult = 16.0 if k % 2 else 1.0
        np.testing.assert_array_equal(raw[k][0].astype(np.float64), 1024 + mult * e[lo])
        np.testing.assert_array_equal(raw[k][1].astype(np.float64), 1024 + mult * e[hi])
        # qh = (e - 8) / 8, exactly (no rounding in the HFMA2)
        np.testing.assert_array_equal(q[k][0].astype(np.float64), (e[lo] - 8) / 8)
        np.testing.assert_array_equal(q[k][1].astype(np.float64), (e[hi] - 8) / 8)
    # all 16 codes appear, including the extremes
    assert set(np.unique(e[0])) == set(range(16))


def test_byte_extraction_is_exact():
    w = _words(4096, seed=1)
    b = [((w >> np.uint32(8 * i)) & np.uint32(0xFF)).astype(np.float64) for i in range(4)]
    raw, q = _extract8(w)
    for k, (lo, hi) in enumerate([(0, 2), (1, 3)]):
        np.testing.assert_array_equal(raw[k][0].astype(np.float64), 1024 + b[lo])
        np.testing.assert_array_equal(raw[k][1].astype(np.float64), 1024 + b[hi])
        np.testing.assert_array_equal(q[k][0].astype(np.float64), (b[lo] - 128) / 128)
        np.testing.assert_array_equal(q[k][1].astype(np.float64), (b[hi] - 128) / 128)
    assert np.unique(b[1]).size == 256


def _pairs(u, s):
    """gemv_half_pairs_of<S>: 16 words (x[2k], x[2k+1]) -> 16 half2 words in stride-S order."""
    out = []
    for p in range(16):
        i = p % s
        a = u[s * (p // s) + i // 2]
        b = u[s * (p // s) + i // 2 + s // 2]
        if i & 1:
            out.append((a >> np.uint32(16)) | (b & np.uint32(0xFFFF0000)))
        else:
            out.append((a & np.uint32(0xFFFF)) | (b << np.uint32(16)))
    return out


@pytest.mark.parametrize("s", [2, 4])
def test_x_permutation(s):
    x = np.arange(32, dtype=np.float16) + 1  # x[i] = i + 1, exact
    u = x.view(np.uint32)  # little-endian: word k = (x[2k], x[2k+1])
    got = [tuple(float(v) for v in _h2(p)) for p in _pairs(list(u), s)]
    want = []
    for p in range(16):
        i = 2 * s * (p // s) + p % s
        want.append((float(x[i]), float(x[i + s])))
    assert got == want


def _chunk_dot(words, x, bits, gamma=None):
    """PolicyAffine::dot_h's d for one 32-element chunk: half2 accumulation with a float
    flush every 8 elements (4 products per half lane). words: BITS uint32 (or [rows, BITS]:
    then d is per row); x: 32 float16. Returns (d, xs)."""
    words = np.asarray(words, dtype=np.uint32)
    u = list(x.view(np.uint32))
    if gamma is not None:  # gemv_dot_rows_h with GAMMA: x * (gamma / 16) in half
        g = gamma.astype(np.float16)
        g16 = _hfma(g, np.full(32, ONE_16), np.zeros(32, np.float16))
        x = _hfma(x, g16, np.zeros(32, np.float16))
        u = list(x.view(np.uint32))
    # sum(x) from pair sums (u[k] + u[k + 8] in half), accumulated in float32
    xs0, xs1 = np.float32(0), np.float32(0)
    for k in range(8):
        lo_a, hi_a = _h2(u[k])
        lo_b, hi_b = _h2(u[k + 8])
        xs0 += np.float32(_hfma(lo_a, np.float16(1), lo_b))
        xs1 += np.float32(_hfma(hi_a, np.float16(1), hi_b))
    xs = xs0 + xs1
    xh = [_h2(p) for p in _pairs(u, 4 if bits == 4 else 2)]
    wpa, ppw = bits // 4, 16 // bits  # words per accumulator (8 elements), pairs per word
    extract = _extract4 if bits == 4 else _extract8
    flushed = []
    for a in range(4):
        acc = (np.float16(0), np.float16(0))
        for j in range(wpa):
            wi = a * wpa + j
            _, q = extract(words[..., wi])
            for t in range(ppw):
                xp = xh[wi * ppw + t]
                acc = (_hfma(q[t][0], xp[0], acc[0]), _hfma(q[t][1], xp[1], acc[1]))
        flushed.append(np.float32(acc[0]) + np.float32(acc[1]))
    d = (flushed[0] + flushed[1]) + (flushed[2] + flushed[3])
    return d, xs


def _codes(words, bits):
    """Plain unpacking of MLX's bit stream (element i at bits [i*bits, (i+1)*bits))."""
    per = 32 // bits
    mask = (1 << bits) - 1
    return np.array([(int(words[i // per]) >> (bits * (i % per))) & mask for i in range(32)],
                    dtype=np.float64)


@pytest.mark.parametrize("bits", [4, 8])
def test_chunk_dot_is_exact_for_small_integer_x(bits):
    """With x in {-2..2} every half product and partial sum is exact: the simulated
    packed-half dot must equal dot((q - 2^(B-1)) / 2^(B-1), x) exactly, so any error in
    the extraction or the permutation shows."""
    rng = np.random.default_rng(bits)
    half = 2 ** (bits - 1)
    for trial in range(200):
        if trial == 0:
            words = np.zeros(bits, np.uint32)
        elif trial == 1:
            words = np.full(bits, 0xFFFFFFFF, np.uint32)
        else:
            words = rng.integers(0, 2 ** 32, size=bits, dtype=np.uint64).astype(np.uint32)
        x = rng.integers(-2, 3, size=32).astype(np.float16)
        d, xs = _chunk_dot(words, x, bits)
        q = _codes(words, bits)
        assert float(d) == float(np.dot((q - half) / half, x.astype(np.float64)))
        assert float(xs) == float(x.astype(np.float64).sum())
        # and the finish recovers dot(q, x) = 2^(B-1) * (d + xs)
        assert half * (float(d) + float(xs)) == float(np.dot(q, x.astype(np.float64)))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("gs", [32, 64, 128])
@pytest.mark.parametrize("with_gamma", [False, True])
def test_half_path_matches_mlx_dequantize(bits, gs, with_gamma):
    """The whole per-row computation (chunks, groups, float finish) against
    x @ mx.dequantize(w).T in float64, for MLX's own quantized layout."""
    n, k = 6, 256
    rng = np.random.default_rng(10 * bits + gs)
    w = mx.array(rng.standard_normal((n, k)).astype(np.float32) / 16).astype(mx.float16)
    wq, scales, biases = mx.quantize(w, group_size=gs, bits=bits)
    wq, sc, bi = np.array(wq), np.array(scales.astype(mx.float32)), np.array(
        biases.astype(mx.float32))
    dense = np.array(mx.dequantize(mx.array(wq), mx.array(sc), mx.array(bi), group_size=gs,
                                   bits=bits)).astype(np.float64)
    x = (rng.standard_normal(k) * 3).astype(np.float16)
    gamma = (1 + 0.5 * rng.standard_normal(k)).astype(np.float16) if with_gamma else None
    xf = x.astype(np.float64) * (gamma.astype(np.float64) if with_gamma else 1.0)
    want = dense @ xf
    back = 16.0 if with_gamma else 1.0
    for r in range(n):
        acc = np.float32(0)
        for c in range(k // 32):
            words = wq[r, c * bits:(c + 1) * bits]
            d, xs = _chunk_dot(words, x[c * 32:(c + 1) * 32], bits,
                               None if gamma is None else gamma[c * 32:(c + 1) * 32])
            g = c * 32 // gs
            s = np.float32(sc[r, g]) * np.float32(2 ** (bits - 1))
            acc += np.float32(s * d + (s + np.float32(bi[r, g])) * xs)
        got = float(acc) * back
        # half accumulation: error ~ 2^-11 of the partial sums, far inside the f16 GEMV
        # tolerance (tests/tolerances.py)
        scale = np.abs(dense[r]) @ np.abs(xf)
        assert abs(got - want[r]) <= 2e-3 * scale, (r, got, want[r])


def test_simulated_constants_are_the_kernels():
    """The constants replayed here are the ones in the Metal source."""
    from pathlib import Path

    src = (Path(__file__).resolve().parent.parent / "mlx_foundry" / "metal_src" / "policies"
           / "affine.metal").read_text()
    body = src[src.index("METAL_FUNC half2 affine_hdot_word"):src.index("struct PolicyAffine")]
    for c in ("0x30003000u", "0x20002000u", "0xD808D808u", "0xC880C880u", "0x000F000Fu",
              "0x00F000F0u", "0x00FF00FFu", "w >> 8u"):
        assert c in body, c
    assert "simd_shuffle(0x64006400u" in src
    gemv = (Path(__file__).resolve().parent.parent / "mlx_foundry" / "metal_src" / "stages"
            / "gemv.metal").read_text()
    assert "as_type<half2>(0x2C002C00u)" in gemv  # gamma / 16


def _simulated_gemv(wq, scales, biases, x, bits, gs):
    """gemv_dot_rows_h for one row of x, every weight row at once (float32 sums)."""
    n, k = wq.shape[0], x.shape[0]
    out = np.zeros(n, np.float32)
    for c in range(k // 32):
        d, xs = _chunk_dot(wq[:, c * bits:(c + 1) * bits], x[c * 32:(c + 1) * 32], bits)
        g = c * 32 // gs
        s = scales[:, g].astype(np.float32) * np.float32(2 ** (bits - 1))
        out += s * d + (s + biases[:, g].astype(np.float32)) * xs
    return out


def test_vocabulary_sized_gpu_case_stays_in_tolerance():
    """tests/test_gpu_linear.py::test_linear_vocabulary_sized_n[(8, 32)-f16] (151936 rows,
    K = 256, same seed and data), replayed: the worst of 151936 outputs must stay inside
    the f16 tolerance with margin. (With a float flush every 8 products per half lane it
    reaches 0.98 of the tolerance on this data and 1.17 with seed 1.)"""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tolerances import tolerance

    mx.random.seed(0)
    n, k, bits, gs = 151936, 256, 8, 32
    w = (mx.random.normal((n, k)) / k ** 0.5).astype(mx.float16)
    wq, s, b = mx.quantize(w, group_size=gs, bits=bits)
    x = mx.random.normal((1, k)).astype(mx.float16)
    want = (x.astype(mx.float32) @ mx.dequantize(wq, s.astype(mx.float32), b.astype(mx.float32),
                                                 group_size=gs, bits=bits).T).astype(mx.float16)
    want = np.array(want.astype(mx.float32))[0]
    got = _simulated_gemv(np.array(wq), np.array(s), np.array(b), np.array(x)[0], bits, gs)
    got = got.astype(np.float16).astype(np.float32)
    rtol, atol = tolerance(mx.float16, k)
    worst = float((np.abs(got - want) / (atol + rtol * np.abs(want))).max())
    assert worst < 0.85, worst
