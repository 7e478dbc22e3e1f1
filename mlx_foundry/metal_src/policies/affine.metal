// MLX affine quantization policy (mx.quantize, nn.QuantizedLinear), read as stored.
//
// w: uint32 [N, K*BITS/32]; element i of a row occupies bits [i*BITS, (i+1)*BITS) of a
// little-endian bit stream, so 3, 5 and 6-bit elements straddle words. scales and
// biases: S [N, K/GS]; w = scale * q + bias.
//
// A chunk is 32 elements = BITS words (16 bytes for 4 bits), always inside one group
// (GS is 32, 64 or 128), so dot(w, x) over a chunk = scale * dot(q, x) + bias * sum(x):
// the GEMV passes sum(x) of the chunk as xs.

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

template <typename S, int BITS, int GS, int K>
struct PolicyAffine {
  const device uint* w;
  const device S* scales;
  const device S* biases;

  enum : int { CHUNK = 32, VEC = 1 };
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

  // K is a multiple of GS >= 32: there is never a partial chunk.
  METAL_FUNC float dot_tail(uint n, int c, thread const float* xv, int avail) const {
    return 0.0f;
  }
};
