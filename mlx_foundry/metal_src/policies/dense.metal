// Dense weight policy: W stored [N, K] (MLX's Linear layout) as half, bfloat or float.
//
// A policy value holds the weight pointer; GEMV stages call dot_chunk(n, c, xv, xs):
// the dot product of chunk c (CHUNK = 32 consecutive elements of K) of weight row n with
// the float values xv[0..CHUNK). xs (the sum of xv) is unused by dense weights.
// Rows whose byte length is a multiple of 16 are read with 16-byte loads.

// Converts the 32-bit words of a 16-byte load to floats.
template <typename W>
struct DenseWords;

template <>
struct DenseWords<float> {
  enum : int { PER_WORD = 1 };
  static METAL_FUNC void cvt(uint u, thread float* o) { o[0] = as_type<float>(u); }
};

template <>
struct DenseWords<half> {
  enum : int { PER_WORD = 2 };
  static METAL_FUNC void cvt(uint u, thread float* o) {
    o[0] = float(as_type<half>(ushort(u & 0xFFFFu)));
    o[1] = float(as_type<half>(ushort(u >> 16)));
  }
};

template <>
struct DenseWords<bfloat16_t> {
  enum : int { PER_WORD = 2 };
  static METAL_FUNC void cvt(uint u, thread float* o) {
    o[0] = as_type<float>(u << 16);
    o[1] = as_type<float>(u & 0xFFFF0000u);
  }
};

// Loads C values of type V at p into floats. VEC: p is 16-byte aligned and
// C * sizeof(V) is a multiple of 16 (then 16-byte loads), else scalar loads.
template <typename V, int C, bool VEC>
METAL_FUNC void dense_load(const device V* p, thread float* o) {
  if (VEC) {
    constexpr int PW = DenseWords<V>::PER_WORD;
    const device uint4* q = reinterpret_cast<const device uint4*>(p);
#pragma unroll
    for (int j = 0; j < C / (4 * PW); ++j) {
      uint4 v = q[j];
      DenseWords<V>::cvt(v.x, o + (4 * j + 0) * PW);
      DenseWords<V>::cvt(v.y, o + (4 * j + 1) * PW);
      DenseWords<V>::cvt(v.z, o + (4 * j + 2) * PW);
      DenseWords<V>::cvt(v.w, o + (4 * j + 3) * PW);
    }
  } else {
#pragma unroll
    for (int i = 0; i < C; ++i) {
      o[i] = float(p[i]);
    }
  }
}

// Loads the first `avail` of C values (the rest are 0): the partial last chunk.
template <typename V, int C>
METAL_FUNC void dense_load_tail(const device V* p, int avail, thread float* o) {
#pragma unroll
  for (int i = 0; i < C; ++i) {
    o[i] = i < avail ? float(p[i]) : 0.0f;
  }
}

template <typename W, int K, int CH = 0>
struct PolicyDense {
  const device W* w;

  // A chunk is one 16-byte load per lane (8 half/bfloat or 4 float elements), so the
  // 32 lanes of a SIMD-group read 512 consecutive bytes per load: fully coalesced.
  // CH > 0 forces a chunk of CH elements (32 when fused with a quantized policy, whose
  // chunk is 32, in one dual GEMV). VEC: rows are whole 16-byte vectors.
  // (enums, not static data members: Metal wants those in the constant space.)
  // HALF_PAIRS = 0: no packed-half path (the GEMV's float path serves dense weights).
  enum : int {
    CHUNK = CH > 0 ? CH : 16 / int(sizeof(W)),
    VEC = (K * int(sizeof(W))) % 16 == 0,
    HALF_PAIRS = 0
  };

  METAL_FUNC float dot_chunk(uint n, int c, thread const float* xv, float xs) const {
    float wv[CHUNK];
    dense_load<W, CHUNK, bool(VEC)>(w + n * uint(K) + uint(c * CHUNK), wv);
    float d0 = 0.0f, d1 = 0.0f;
#pragma unroll
    for (int i = 0; i < CHUNK; i += 2) {
      d0 = metal::fma(wv[i], xv[i], d0);
      d1 = metal::fma(wv[i + 1], xv[i + 1], d1);
    }
    return d0 + d1;
  }

  // The partial chunk c (elements c*CHUNK .. K); xv is zero past K.
  METAL_FUNC float dot_tail(uint n, int c, thread const float* xv, int avail) const {
    float wv[CHUNK];
    dense_load_tail<W, CHUNK>(w + n * uint(K) + uint(c * CHUNK), avail, wv);
    float d = 0.0f;
#pragma unroll
    for (int i = 0; i < CHUNK; ++i) {
      d = metal::fma(wv[i], xv[i], d);
    }
    return d;
  }
};
