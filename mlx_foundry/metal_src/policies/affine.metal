// MLX affine quantization policy (mx.quantize, nn.QuantizedLinear), read as stored.
//
// w: uint32 [N, K*BITS/32]; element i of a row occupies bits [i*BITS, (i+1)*BITS) of a
// little-endian bit stream, so 3, 5 and 6-bit elements straddle words. scales and
// biases: S [N, K/GS]; w = scale * q + bias.
//
// A chunk is 32 elements = BITS words (16 bytes for 4 bits), always inside one group
// (GS is 32, 64 or 128), so dot(w, x) over a chunk = scale * dot(q, x) + bias * sum(x):
// the GEMV passes sum(x) of the chunk as xs.
//
// Packed-half path (BITS 4 and 8 with half or bfloat activations, bfloat converted to
// half by the GEMV; HALF_PAIRS > 0): the GEMV reads
// a chunk with load_h and hands dot_h the chunk of x as 16 half2 pairs in the order that
// the extraction below produces (HALF_PAIRS = S: pair p of a block of 2S elements is
// (x[i], x[i + S]), i = 2S * (p / S) + p % S); dot_h returns scale * dot(q, x) +
// bias * sum(x) in float.

// BITS words of one chunk: 16-byte loads when BITS is 4 or 8, 8-byte for 2, else words.
template <int BITS>
METAL_FUNC void affine_load_words(const device uint* p, thread uint* wd) {
  if (BITS % 4 == 0) {
    const device uint4* q = reinterpret_cast<const device uint4*>(p);
#pragma unroll
    for (int j = 0; j < BITS / 4; ++j) {
      uint4 v = q[j];
      wd[4 * j + 0] = v.x;
      wd[4 * j + 1] = v.y;
      wd[4 * j + 2] = v.z;
      wd[4 * j + 3] = v.w;
    }
  } else if (BITS % 2 == 0 && BITS < 4) {
    const device uint2* q = reinterpret_cast<const device uint2*>(p);
    uint2 v = q[0];
    wd[0] = v.x;
    wd[1] = v.y;
  } else {
#pragma unroll
    for (int j = 0; j < BITS; ++j) {
      wd[j] = p[j];
    }
  }
}

// Element i (0..31) of a chunk as the float 1 + q * 2^-BITS: q is moved straight to the
// top mantissa bits [23 - BITS, 23) and OR-ed with the bits of 1.0f, one shift and one
// AND-OR per element (no int-to-float conversion). Exact. The caller undoes the
// offset: dot(q, x) = 2^BITS * (sum((1 + q 2^-BITS) x) - sum(x)).
template <int BITS>
METAL_FUNC float affine_qf(thread const uint* wd, int i) {
  const int b = i * BITS;
  const int wi = b >> 5;
  const int sh = b & 31;
  const int d = sh - (23 - BITS);
  uint v = d >= 0 ? (wd[wi] >> uint(d)) : (wd[wi] << uint(-d));
  if (sh + BITS > 32) {
    // The element straddles two words: its high bits are the low bits of the next.
    v |= wd[wi + 1 < BITS ? wi + 1 : wi] << uint(55 - BITS - sh);
  }
  return as_type<float>((v & (((1u << uint(BITS)) - 1u) << uint(23 - BITS))) | 0x3F800000u);
}

// Packed-half dequantization (FasterTransformer / Marlin style): OR-ing 0x6400 (1024.0h)
// into a half whose low 10 mantissa bits hold v (v < 1024) gives exactly 1024 + v. One
// mask-and-OR per half2 extracts two elements; one HFMA2 turns them into
// qh = (q - 2^(BITS-1)) / 2^(BITS-1) in [-1, 1), exact in half (at most 8 significant
// bits). The GEMV undoes it in float: dot(q, x) = 2^(BITS-1) * (dot(qh, x) + sum(x)).
//   BITS 4, word w = nibbles e0..e7 (e_i at bits [4i, 4i+4)):
//     (w & 0x000F000F) | 0x6400_6400 = (1024 + e0, 1024 + e4): qh = h / 8 - 129
//     (w & 0x00F000F0) | 0x6400_6400 = (1024 + 16 e1, 1024 + 16 e5): qh = h / 128 - 9
//     the same on w >> 8: (e2, e6) and (e3, e7).  x pairs: (x0,x4) (x1,x5) (x2,x6) (x3,x7).
//   BITS 8, word w = bytes b0..b3:
//     (w & 0x00FF00FF) | 0x6400_6400 = (1024 + b0, 1024 + b2), the same on w >> 8 gives
//     (b1, b3): qh = h / 128 - 9.  x pairs: (x0,x2) (x1,x3).
// acc += qh * x with packed HFMA2 in the same order: 4 (BITS 4) or 2 (BITS 8) per word.
// magic: 0x64006400 as a value the compiler cannot fold (PolicyAffine::half_key), so that
// it stays in a register and each (w & mask) | magic is one LOP3 (with two immediate
// operands it takes two instructions).
template <int BITS>
METAL_FUNC half2 affine_hdot_word(uint w, uint magic, thread const half2* xp, half2 acc) {
  const half2 s_lo = as_type<half2>(BITS == 4 ? 0x30003000u : 0x20002000u);  // 1/8 or 1/128
  const half2 o_lo = as_type<half2>(BITS == 4 ? 0xD808D808u : 0xC880C880u);  // -129 or -9
  const half2 s_hi = as_type<half2>(0x20002000u);                            // 1/128
  const half2 o_hi = as_type<half2>(0xC880C880u);                            // -9
  const uint w8 = w >> 8u;
  if (BITS == 4) {
    const half2 q0 = metal::fma(as_type<half2>((w & 0x000F000Fu) | magic), s_lo, o_lo);
    const half2 q1 = metal::fma(as_type<half2>((w & 0x00F000F0u) | magic), s_hi, o_hi);
    const half2 q2 = metal::fma(as_type<half2>((w8 & 0x000F000Fu) | magic), s_lo, o_lo);
    const half2 q3 = metal::fma(as_type<half2>((w8 & 0x00F000F0u) | magic), s_hi, o_hi);
    acc = metal::fma(q0, xp[0], acc);
    acc = metal::fma(q1, xp[1], acc);
    acc = metal::fma(q2, xp[2], acc);
    acc = metal::fma(q3, xp[3], acc);
  } else {
    const half2 q0 = metal::fma(as_type<half2>((w & 0x00FF00FFu) | magic), s_lo, o_lo);
    const half2 q1 = metal::fma(as_type<half2>((w8 & 0x00FF00FFu) | magic), s_lo, o_lo);
    acc = metal::fma(q0, xp[0], acc);
    acc = metal::fma(q1, xp[1], acc);
  }
  return acc;
}

template <typename S, int BITS, int GS, int K>
struct PolicyAffine {
  const device uint* w;
  const device S* scales;
  const device S* biases;

  // HALF_PAIRS: the x pair stride of the packed-half path (0: none for this BITS).
  enum : int { CHUNK = 32, VEC = 1, HALF_PAIRS = BITS == 4 ? 4 : (BITS == 8 ? 2 : 0) };
  enum : uint { WORDS_PER_ROW = uint(K / 32 * BITS), GROUPS_PER_ROW = uint(K / GS) };

  METAL_FUNC float dot_chunk(uint n, int c, thread const float* xv, float xs) const {
    uint wd[BITS];
    affine_load_words<BITS>(w + n * WORDS_PER_ROW + uint(c * BITS), wd);
    float a0 = 0.0f, a1 = 0.0f;
#pragma unroll
    for (int i = 0; i < 32; i += 2) {
      a0 = metal::fma(affine_qf<BITS>(wd, i), xv[i], a0);
      a1 = metal::fma(affine_qf<BITS>(wd, i + 1), xv[i + 1], a1);
    }
    // scale * dot(q, x) + bias * sum(x), with dot(q, x) = 2^BITS * (a - sum(x)).
    const uint g = n * GROUPS_PER_ROW + uint(c * 32 / GS);
    const float s = float(scales[g]) * float(1 << BITS);
    return metal::fma(s, a0 + a1, (float(biases[g]) - s) * xs);
  }

  // ---- packed-half path (HALF_PAIRS > 0) ----
  // In two steps, so that the GEMV issues the loads of all its rows before any arithmetic
  // (memory-level parallelism): load_h reads chunk c of row n (BITS words, its group's
  // scale and bias), dot_h returns scale * dot(q, x) + bias * sum(x) for x given as 16
  // half2 pairs in HALF_PAIRS order (xh) and xs = sum(x) in float. Each half lane of a
  // half2 accumulator takes 4 products (8 elements) before it is added to a float: four
  // accumulators per chunk (with 8 products per lane the error of the half partial sums
  // reached the f16 GEMV tolerance over ~1e5 outputs).
  struct HalfChunk {
    uint wd[BITS];
    S scale;
    S bias;
  };

  // The extraction's OR constant, 0x64006400, as lane 0's 0x64006400 + lane: call it
  // once per GEMV call (all lanes, uniform control flow, lane = the lane's index) and
  // pass it to every dot_h. (A shuffle of the constant alone was folded back into an
  // immediate: ncu on an H100 showed two LOP3 per extraction.)
  METAL_FUNC uint half_key(uint lane) const {
    return simd_shuffle(0x64006400u + lane, ushort(0));
  }

  METAL_FUNC HalfChunk load_h(uint n, int c) const {
    HalfChunk ch;
    affine_load_words<BITS>(w + n * WORDS_PER_ROW + uint(c * BITS), ch.wd);
    const uint g = n * GROUPS_PER_ROW + uint(c * 32 / GS);
    ch.scale = scales[g];
    ch.bias = biases[g];
    return ch;
  }

  METAL_FUNC float dot_h(thread const HalfChunk& ch, thread const half2* xh, float xs,
                         uint key) const {
    constexpr int WPA = BITS / 4;    // words per accumulator (8 elements)
    constexpr int PPW = 16 / BITS;   // x pairs per word
    half2 h[4];
#pragma unroll
    for (int a = 0; a < 4; ++a) {
      h[a] = as_type<half2>(0u);
#pragma unroll
      for (int j = 0; j < WPA; ++j) {
        h[a] = affine_hdot_word<BITS>(ch.wd[a * WPA + j], key, xh + (a * WPA + j) * PPW, h[a]);
      }
    }
    const float d = ((float(h[0].x) + float(h[0].y)) + (float(h[1].x) + float(h[1].y))) +
                    ((float(h[2].x) + float(h[2].y)) + (float(h[3].x) + float(h[3].y)));
    // scale * dot(q, x) + bias * sum(x) = s * d + (s + bias) * sum(x), s = scale 2^(BITS-1).
    const float s = float(ch.scale) * float(1 << (BITS - 1));
    return metal::fma(s, d, (s + float(ch.bias)) * xs);
  }

  // K is a multiple of GS >= 32: there is never a partial chunk.
  METAL_FUNC float dot_tail(uint n, int c, thread const float* xv, int avail) const {
    return 0.0f;
  }
};
