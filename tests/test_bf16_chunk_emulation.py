"""bfloat16 x on the packed-half GEMV path, replayed in numpy (CPU, no kernel involved).

stages/gemv.metal, gemv_bf16_chunk_as_half<NORM>, turns a lane's chunk of 32 bfloat16
values (16 words, low half x[2k], high half x[2k+1]) into half2 words: bf16 -> float by
a shift, sum(x^2) of the raw values when there is a norm, times the norm weight gamma
with GEMV_NORM_WEIGHT, then times a power of two sc that puts the chunk's largest
magnitude m in [2^12, 2^13), rounded to half. bf16 has half's precision to spare (8
significant bits against 11) but not its range; the scale moves the chunk into it. The
function returns cb = 1 / sc, and gemv_dot_rows_h scales the chunk's result back,
s = fma(dot_h(...), cb, s): dot_h's sum(x) (xs) comes from the same scaled halves, so
both parts of scale * dot(q, x) + bias * sum(x) come back through the one cb.

The replay below does each float operation as the kernel does, with one IEEE rounding
(float32 numpy arithmetic, or float64 where the exact result fits and is rounded once),
float -> half with round-to-nearest-even (numpy's astype, as __float2half / Metal's
conversion do), so the properties of the kernel's comment are checked on its exact
arithmetic: the range of the scaled maximum, exactness of the conversion, cb * sc == 1,
specials, extreme magnitudes, and that sum(x^2) is taken before gamma.

Assumed: IEEE float32 subnormals. With flush-to-zero (Metal's fast math, CUDA -ftz),
bf16 subnormals (|x| < 2^-126) would count as zero; that changes sums by < 2^-126 each.
"""

from pathlib import Path

import numpy as np
import pytest

from test_half_dequant import _chunk_dot, _codes, _h2

NORM_NONE, NORM_PLAIN, NORM_WEIGHT = 0, 1, 2  # GEMV_NORM_* (checked against the source)
HI = np.uint32(0xFFFF0000)
SRC = Path(__file__).resolve().parent.parent / "mlx_foundry" / "metal_src"


def _f32(bits):
    return np.asarray(bits, np.uint32).view(np.float32)


def _fma32(a, b, c):
    """metal::fma in float32: a * b + c in float64, rounded once to float32. For bf16 a, b
    the product is exact (16 bits); the float64 sum of it and a float32 is rounded twice,
    which is innocuous since 53 >= 2 * 24 + 2 (Figueroa)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return (np.asarray(a, np.float64) * np.asarray(b, np.float64)
                + np.asarray(c, np.float64)).astype(np.float32)


class Chunk:
    """What gemv_bf16_chunk_as_half leaves: h (..., 32) float16 (the half2 words are
    h.view(uint32)), the returned cb, and the intermediates for the assertions."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def chunk_as_half(u, gw=None, norm=NORM_NONE):
    """gemv_bf16_chunk_as_half<norm> on (..., 16) uint32 words (batched over chunks)."""
    u = np.asarray(u, np.uint32)
    a, b = _f32(u << np.uint32(16)), _f32(u & HI)
    ss_lo = np.zeros(u.shape[:-1], np.float32)
    ss_hi = np.zeros(u.shape[:-1], np.float32)
    if norm != NORM_NONE:  # of the raw values, before gamma (the kernel's order)
        for k in range(16):
            ss_lo = _fma32(a[..., k], a[..., k], ss_lo)
            ss_hi = _fma32(b[..., k], b[..., k], ss_hi)
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        if norm == NORM_WEIGHT:  # float32 products, one rounding each
            gw = np.asarray(gw, np.uint32)
            a, b = a * _f32(gw << np.uint32(16)), b * _f32(gw & HI)
        v = np.empty(u.shape[:-1] + (32,), np.float32)
        v[..., 0::2], v[..., 1::2] = a, b
        # metal::max is fmaxf on CUDA (and fmax on Metal): a NaN operand is dropped.
        m = np.fmax.reduce(np.abs(v), axis=-1, initial=np.float32(0))
        e = np.asarray(m).view(np.uint32) >> np.uint32(23)
        sb = np.minimum(np.uint32(266) - e, np.uint32(253))
        sc = _f32(sb << np.uint32(23))
        h = (v * sc[..., None]).astype(np.float16)  # float32 product, then RNE to half
    cb = _f32((np.uint32(254) - sb) << np.uint32(23))
    return Chunk(h=h, cb=cb, sc=sc, m=m, e=e, sb=sb, v=v, ss_lo=ss_lo, ss_hi=ss_hi)


# --- bf16 data as bit patterns -----------------------------------------------------------

def _bf16_bits(rng, e_lo, e_hi):
    """Random bf16 patterns (any sign and mantissa), biased exponents e_lo..e_hi (arrays
    broadcast to the output shape); e = 0 gives zeros and subnormals."""
    e = np.asarray(e_lo) + np.floor(rng.random(np.broadcast(e_lo, e_hi).shape)
                                    * (np.asarray(e_hi) - e_lo + 1)).astype(np.int64)
    sign = rng.integers(0, 2, e.shape)
    mant = rng.integers(0, 128, e.shape)
    return ((sign << 15) | (e << 7) | mant).astype(np.uint16)


def _pack(b16):
    """(..., 32) bf16 patterns -> (..., 16) words (x[2k] low, x[2k+1] high)."""
    b = np.asarray(b16, np.uint16).astype(np.uint32)
    return b[..., 0::2] | (b[..., 1::2] << np.uint32(16))


def _val(b16):
    """bf16 patterns -> float64 values (independent of the words' packing)."""
    return (np.asarray(b16, np.uint16).astype(np.uint32) << np.uint32(16)).view(
        np.float32).astype(np.float64)


def _spread_chunks(rng, n, top_lo=1, top_hi=254, spread=40):
    """n chunks: the top exponent per chunk uniform in [top_lo, top_hi], elements
    spread up to `spread` binades under it (clipped at 0), one element at the top."""
    top = rng.integers(top_lo, top_hi + 1, (n, 1))
    lo = np.maximum(top - rng.integers(0, spread + 1, (n, 1)), 0)
    b = _bf16_bits(rng, lo, np.broadcast_to(top, (n, 32)))
    b[:, rng.integers(0, 32)] = (top[:, 0] << 7).astype(np.uint16)  # 2^(top - 127)
    return b


def _gamma_bits(rng, shape, lo=-8, hi=8):
    """Norm weights log-uniform over [2^lo, 2^hi], rounded to bf16 (truncated)."""
    g = np.exp2(rng.uniform(lo, hi, shape)).astype(np.float32)
    return (g.view(np.uint32) >> np.uint32(16)).astype(np.uint16)


# --- the properties ----------------------------------------------------------------------

def test_source_is_what_is_replayed():
    """The constants and the order of operations replayed here are the kernel's."""
    gemv = (SRC / "stages" / "gemv.metal").read_text()
    body = gemv[gemv.index("METAL_FUNC float gemv_bf16_chunk_as_half"):
                gemv.index("struct gemv_path")]
    for c in ("as_type<float>(u[k] << 16u)", "as_type<float>(u[k] & 0xFFFF0000u)",
              "metal::max(m, metal::max(metal::abs(a), metal::abs(b)))",
              "as_type<uint>(m) >> 23u", "metal::min(266u - e, 253u)",
              "as_type<float>(sb << 23u)", "half(v[2 * k] * sc)",
              "as_type<float>((254u - sb) << 23u)"):
        assert c in body, c
    # sum(x^2) before x *= gamma: the squares are of the raw values
    assert body.index("ss_lo = metal::fma(a, a, ss_lo)") < body.index(
        "a *= as_type<float>(gw[k] << 16u)")
    for name, val in (("NONE", NORM_NONE), ("PLAIN", NORM_PLAIN), ("WEIGHT", NORM_WEIGHT)):
        assert f"GEMV_NORM_{name} = {val};" in gemv
    assert "metal::fma(d, cb, s[j * ROWS + r])" in gemv
    # on CUDA metal::max is fmaxf, which returns the other operand for a NaN
    assert "MFC_MATH2(max, ::fmaxf(x, y))" in (SRC / "compat" / "metal_compat.cuh").read_text()


def test_words_are_half2_pairs_in_order():
    """h.view(uint32) is as_type<uint>(half2(x[2k], x[2k+1])): the layout _chunk_dot
    (test_half_dequant) reads."""
    rng = np.random.default_rng(0)
    b = _spread_chunks(rng, 1)[0]
    c = chunk_as_half(_pack(b))
    lo, hi = _h2(c.h.view(np.uint32))
    np.testing.assert_array_equal(lo, c.h[0::2])
    np.testing.assert_array_equal(hi, c.h[1::2])
    assert np.all(np.sign(c.h.astype(np.float64)) == np.sign(_val(b)))


@pytest.mark.parametrize("norm", [NORM_NONE, NORM_WEIGHT])
def test_scaled_max_is_in_2_12_2_13(norm):
    """sc = 2^(139 - e) takes m in [2^(e-127), 2^(e-126)) to [2^12, 2^13), unless
    266 - e > 253, i.e. e <= 12 (m < 2^-114; e = 13 gives exactly 253, unclamped): then
    sc = 2^126 and m * sc < 2^12. Without gamma only bf16 chunks below 2^-114 are
    clamped, and there every value, down to the least subnormal 2^-133, lands at or above
    2^-7: the clamp costs nothing. Without gamma the half maximum is the exact scaled bf16
    value, < 2^13; with gamma x * gamma has 24 bits and may round up to 2^13 in half
    (hence the kernel's 'at or under 2^15' for sums of 4 products with |q| <= 1)."""
    rng = np.random.default_rng(1 + norm)
    b = _spread_chunks(rng, 4000)
    g = _gamma_bits(rng, b.shape) if norm == NORM_WEIGHT else None
    c = chunk_as_half(_pack(b), None if g is None else _pack(g), norm)
    hmax = np.abs(c.h.astype(np.float64)).max(axis=-1)
    ms = c.m.astype(np.float64) * c.sc
    ok = (c.e >= 13) & (c.e <= 254)
    low = c.e <= 12
    # e = 255 only where x * gamma overflowed float32 (bf16 near 2^128 times gamma > 1)
    assert np.all(ok | low | (c.e == 255))
    assert ok.sum() > 3000 and low.sum() > 10  # both sides of the clamp are seen
    assert np.all((ms[ok] >= 2 ** 12) & (ms[ok] < 2 ** 13))
    assert np.all(hmax[ok] >= 2 ** 12)
    assert np.all(hmax[ok] < 2 ** 13) if norm == NORM_NONE else np.all(hmax[ok] <= 2 ** 13)
    assert np.all(c.sb[low] == 253) and np.all(ms[low] < 2 ** 12)
    # every e at the clamp's edge: e = 13 unclamped, e = 12 clamped
    for e, sb in ((14, 252), (13, 253), (12, 253), (1, 253)):
        c1 = chunk_as_half(_pack(np.full(32, e << 7, np.uint16)))
        assert int(c1.sb) == sb and float(c1.h[0]) == (2.0 ** 12 if e >= 13 else 2.0 ** (e - 1))
    # gamma rounding the maximum up to 2^13: x = 1 + 126/128, gamma = 1 + 1/128,
    # x * gamma = 1.99987793 in [1, 2), scaled 8191.5, half spacing 4 there -> 8192
    x = np.full(32, 0x3FFE, np.uint16)
    c2 = chunk_as_half(_pack(x), _pack(np.full(32, 0x3F81, np.uint16)), NORM_WEIGHT)
    assert float(c2.m) * float(c2.sc) < 2 ** 13 and float(c2.h[0]) == 2 ** 13


def test_conversion_is_exact_without_gamma():
    """half * cb == x exactly for every |x| >= 2^-26 m: scaled it is >= 2^-14 (half
    normal), and bf16's 8 significant bits fit half's 11. In fact half's subnormals (2^-24
    apart) still hold 8 bits down to 2^-17, so it is exact from 2^-29 m (asserted too);
    smaller values are off by at most half a subnormal step, 2^-25 scaled (2^-25 cb)."""
    rng = np.random.default_rng(2)
    b = np.concatenate([_spread_chunks(rng, 3000, spread=60),
                        _spread_chunks(rng, 500, top_lo=0, top_hi=20, spread=20),
                        # arbitrary finite patterns: exponents anywhere in 0..254
                        _bf16_bits(rng, np.zeros((500, 32), int), 254)])
    x = _val(b)
    c = chunk_as_half(_pack(b))
    back = c.h.astype(np.float64) * c.cb[:, None]
    m = c.m.astype(np.float64)[:, None]
    big = np.abs(x) >= 2.0 ** -26 * m
    np.testing.assert_array_equal(back[big], x[big])
    fine = np.abs(x) >= 2.0 ** -29 * m
    np.testing.assert_array_equal(back[fine], x[fine])
    assert (fine & ~big).sum() > 500 and (~fine).sum() > 500  # both regimes exercised
    err = np.abs(back - x) / np.broadcast_to(c.cb[:, None], x.shape)
    assert np.all(err <= 2.0 ** -25)
    # chunks under the clamp (e <= 12): everything exact, subnormal bf16 included
    low = (c.e <= 12)
    assert low.sum() > 50
    np.testing.assert_array_equal(back[low], x[low])


def test_cb_is_the_exact_inverse_for_every_exponent():
    """For every biased exponent of m, 0 (zero or subnormal chunk) through 255 (inf):
    sc and cb are normal powers of two with cb * sc == 1 exactly (sb in [11, 253], so
    254 - sb in [1, 243])."""
    seen = set()
    chunks = [np.zeros(32, np.uint16), np.full(32, 0x0001, np.uint16),
              np.full(32, 0x007F, np.uint16), np.full(32, 0x7F80, np.uint16)]
    chunks += [np.full(32, (e << 7) | mant, np.uint16) for e in range(1, 255)
               for mant in (0, 127)]
    for b in chunks:
        c = chunk_as_half(_pack(b))
        e = int(c.e)
        seen.add(e)
        assert e == (int(b[0]) >> 7) & 0xFF
        for p in (c.sc, c.cb):
            bits = int(np.asarray(p, np.float32).view(np.uint32))
            assert bits & 0x7FFFFF == 0 and 1 <= bits >> 23 <= 254, (e, hex(bits))
        assert float(c.cb * c.sc) == 1.0 and float(c.cb) * float(c.sc) == 1.0
    assert seen == set(range(256))


def test_specials():
    """Zeros -> zeros (signs kept) and cb = 2^-126 (finite). An inf makes m = inf, e = 255,
    sc = 2^-116: it stays inf in half (the sum is inf anyway), finite values of its chunk
    shrink to 0. A NaN is dropped by the max, so the chunk is scaled as if it were 0, and
    the NaN stays in its own element (and in sum(x^2)); an all-NaN chunk has m = 0."""
    z = np.zeros(32, np.uint16)
    z[1::3] = 0x8000
    c = chunk_as_half(_pack(z), norm=NORM_PLAIN)
    assert np.all(c.h == 0) and np.array_equal(np.signbit(c.h), np.signbit(_val(z)))
    assert float(c.cb) == 2.0 ** -126 and c.ss_lo == 0 and c.ss_hi == 0

    rng = np.random.default_rng(3)
    b = _bf16_bits(rng, np.full(32, 120), 130)
    b[4], b[9] = 0x7F80, 0xFF80  # +inf, -inf
    c = chunk_as_half(_pack(b), norm=NORM_PLAIN)
    assert float(c.cb) == 2.0 ** 116 and float(c.sc) == 2.0 ** -116
    assert c.h[4] == np.inf and c.h[9] == -np.inf
    fin = np.isfinite(c.h)
    assert fin.sum() == 30 and np.all(c.h[fin] == 0)
    assert np.isinf(c.ss_lo + c.ss_hi)

    b = _bf16_bits(rng, np.full(32, 100), 140)
    ref = chunk_as_half(_pack(np.where(np.arange(32) == 5, 0, b)))
    b[5] = 0x7FC1  # NaN, the largest pattern of the chunk
    c = chunk_as_half(_pack(b), norm=NORM_PLAIN)
    assert np.isnan(c.h[5]) and np.isnan(c.ss_hi) and not np.isnan(c.ss_lo)
    assert float(c.cb) == float(ref.cb)
    keep = np.arange(32) != 5
    np.testing.assert_array_equal(c.h[keep], ref.h[keep])

    c = chunk_as_half(_pack(np.full(32, 0xFFC0, np.uint16)))
    assert int(c.e) == 0 and float(c.cb) == 2.0 ** -126 and np.all(np.isnan(c.h))


def _extreme_chunks(rng, n):
    """(label, bf16 patterns, norm-weight exponent range): chunk maxima at bf16's largest
    finite (0x7F7F, e = 254) with elements down 60 binades, and at the bottom (e 0..2:
    subnormals and the least normals). At the top gamma <= 1 keeps x * gamma finite in
    float32 (beyond that it is float32 that overflows, as the float path does)."""
    top = _spread_chunks(rng, n, top_lo=254, top_hi=254, spread=60)
    top[:, 7] = 0x7F7F
    bottom = _bf16_bits(rng, np.zeros((n, 32), int), 2)
    return [("top", top, (-8, 0)), ("bottom", bottom, (-8, 8))]


@pytest.mark.parametrize("norm", [NORM_NONE, NORM_WEIGHT])
def test_extreme_magnitudes_dot(norm):
    """No inf in the halves of finite chunks, and dot(h, q) * cb against dot(x g, q) in
    float64, q = (code - 8) / 8 in [-1, 1) (4-bit). Per element, scaled units:
    |h - x g sc| <= |RN32(x g) - x g| sc + |RN16(v sc) - v sc|
                 <= (2^-24 |x g| + 2^-150) sc + max(2^-11 |v sc|, 2^-25)
    (2^-11: half's unit roundoff; 2^-25: half a half-subnormal step; 2^-150: half the
    float32 subnormal step), so scaled back
    |err| <= (2^-11 + 2^-23) sum|x g q| + (2^-25 cb + 2^-150) sum|q|  (+ float64 sums).
    Without gamma the conversion is exact above 2^-29 m, so only the elements under it
    (tiny) add 2^-25 cb |q|; and where there are none the two float64 dots are the
    same sums of the same products up to the exact power-of-two scale: equal."""
    rng = np.random.default_rng(4 + norm)
    for label, b, (glo, ghi) in _extreme_chunks(rng, 400):
        x = _val(b)
        g = _gamma_bits(rng, b.shape, glo, ghi) if norm == NORM_WEIGHT else None
        xg = x * (_val(g) if g is not None else 1.0)  # exact in float64
        c = chunk_as_half(_pack(b), None if g is None else _pack(g), norm)
        h = c.h.astype(np.float64)
        assert np.all(np.isfinite(h)) and np.all(np.abs(h) <= 2 ** 13), label
        q = (rng.integers(0, 16, b.shape) - 8) / 8.0
        cb = c.cb.astype(np.float64)
        got = np.einsum("ij,ij->i", h, q) * cb
        want = np.einsum("ij,ij->i", xg, q)
        absq = np.abs(q)
        sums = 2.0 ** -46 * np.sum(np.abs(xg * q), axis=-1)  # two float64 dots of 32
        if g is None:
            tiny = np.abs(x) < 2.0 ** -29 * c.m.astype(np.float64)[:, None]
            bound = 2.0 ** -25 * cb * np.sum(absq * tiny, axis=-1) + sums
            none = ~tiny.any(axis=-1)
            assert none.sum() > 20, label
            np.testing.assert_array_equal(got[none], want[none])
        else:
            bound = ((2.0 ** -11 + 2.0 ** -23) * np.sum(np.abs(xg * q), axis=-1)
                     + (2.0 ** -25 * cb + 2.0 ** -150) * absq.sum(axis=-1) + sums)
        assert np.all(np.abs(got - want) <= bound), label


@pytest.mark.parametrize("norm", [NORM_NONE, NORM_WEIGHT])
def test_row_through_packed_half_dot(norm):
    """gemv_dot_rows_h for one row of 4 chunks, each converted, dotted with 4-bit affine
    weights by the exact packed-half replay of test_half_dequant (dot_h: half2 HFMAs,
    xs from the scaled halves), finished as fma(s, d, (s + bias) xs) and added as
    s = fma(that, cb, s). Against sum((scale q + bias) x g) in float64: the half
    accumulators' rounding (4 HFMAs per lane, 2^-11 each, plus one per pair sum of xs,
    plus the conversion with gamma) stays inside 2^-8 of |s| sum|qh x g| + |s + bias|
    sum|x g| (qh = (q - 8) / 8; the float32 finish adds ~2^-22); no inf anywhere."""
    rng = np.random.default_rng(6 + norm)
    nc = 4
    for label, b, (glo, ghi) in _extreme_chunks(rng, 30):
        for r in range(0, len(b) - nc + 1, nc):
            bb = b[r:r + nc]
            g = _gamma_bits(rng, bb.shape, glo, ghi) if norm == NORM_WEIGHT else None
            xg = _val(bb) * (_val(g) if g is not None else 1.0)
            c = chunk_as_half(_pack(bb), None if g is None else _pack(g), norm)
            words = rng.integers(0, 2 ** 32, (nc, 4), dtype=np.uint64).astype(np.uint32)
            scale = np.float32(2.0 ** rng.uniform(-14, -10))  # the row's sum stays finite
            bias = np.float32(-scale * rng.uniform(0, 16))
            s = np.float32(scale * 8)
            acc, want, tol = np.float32(0), 0.0, 0.0
            for k in range(nc):
                d, xs = _chunk_dot(words[k], c.h[k], 4)
                ret = _fma32(s, d, np.float32((s + bias) * xs))
                acc = _fma32(ret, c.cb[k], acc)
                q = _codes(words[k], 4)
                want += float(np.dot(float(scale) * q + float(bias), xg[k]))
                tol += 2.0 ** -8 * (float(s) * np.sum(np.abs((q - 8) / 8 * xg[k]))
                                    + abs(float(s) + float(bias)) * np.sum(np.abs(xg[k])))
                tol += 2.0 ** -25 * float(c.cb[k]) * 32 * (float(s) + abs(float(s + bias)))
            assert np.isfinite(acc), label
            assert abs(float(acc) - want) <= tol + 2.0 ** -20 * abs(want), (label, acc, want)


def test_sum_of_squares_is_of_the_raw_values():
    """With GEMV_NORM_WEIGHT, ss_lo / ss_hi are sum(x^2) of the raw x (RMSNorm's scale is
    of x, gamma only scales the normalised x), in float32 fma order: bit-equal to a plain
    float32 fma loop over the raw even / odd elements, within 16 roundings of the float64
    sum, and far from sum((x gamma)^2) when gamma spreads over 2^-8..2^8 (taking the
    squares after gamma is the RMSNorm bug this guards against)."""
    rng = np.random.default_rng(8)
    n = 500
    b = _bf16_bits(rng, np.full((n, 32), 125), 128)  # |x| in [2^-2, 2^2)
    g = _gamma_bits(rng, b.shape)
    x, xg = _val(b), _val(b) * _val(g)
    c = chunk_as_half(_pack(b), _pack(g), NORM_WEIGHT)
    plain = chunk_as_half(_pack(b), norm=NORM_PLAIN)
    np.testing.assert_array_equal(c.ss_lo, plain.ss_lo)  # gamma does not touch ss
    np.testing.assert_array_equal(c.ss_hi, plain.ss_hi)
    ref_lo, ref_hi = np.zeros(n, np.float32), np.zeros(n, np.float32)
    for k in range(16):
        ref_lo = _fma32(x[:, 2 * k], x[:, 2 * k], ref_lo)
        ref_hi = _fma32(x[:, 2 * k + 1], x[:, 2 * k + 1], ref_hi)
    np.testing.assert_array_equal(c.ss_lo, ref_lo)
    np.testing.assert_array_equal(c.ss_hi, ref_hi)
    ss = (c.ss_lo + c.ss_hi).astype(np.float64)
    exact = np.sum(x * x, axis=-1)
    assert np.all(np.abs(ss - exact) <= 17 * 2.0 ** -24 * exact)
    ratio = ss / np.sum(xg * xg, axis=-1)
    assert np.all((ratio < 0.5) | (ratio > 2)), ratio.min()
