// GEMV main stages over weights stored [N, K] (MLX's Linear layout).
// Needs policies/dense.metal (loaders) and the weight policies' headers.
//
// Layout: each threadgroup has SIMDS SIMD-groups, each SIMD-group computes ROWS
// consecutive output rows for MB rows of x (x rows MB * threadgroup_position_in_grid.x
// onwards; the block of output rows is gemv_row_block, grid y and z). The 32 lanes of a
// SIMD-group stride over K in chunks of 32 elements: a lane loads its chunk of each x row
// (times the norm weight when fused with RMSNorm) and dots it with the same chunk of its
// ROWS weight rows (ROWS independent wide loads in flight, loaded once for the MB rows of
// x). After the SIMD reduction lane j * ROWS + r (< ROWS * MB) holds output row r of x
// row j: acc, row, index, valid.
// RMSNorm fused (NORM): the lanes also add up x^2 of the chunks they load, so every lane
// gets inv_rms of the row without a separate pass over x.
// Staged x (XS > 1: one row of half or bfloat x on the packed-half path): the threadgroup
// first prepares the row's chunks in threadgroup memory, once (gemv_stage_x), and the
// lanes read them from there instead of loading x themselves.
// Split K (SPLIT == SIMDS): the SIMD-groups of a threadgroup share its ROWS rows instead,
// each takes every SIMDS-th stride of K, and they add their sums (and sums of squares)
// through threadgroup memory (`gemv_partials`, THREADS floats): SIMDS times the loads in
// flight per row, for shapes with few rows (N = 4096) that would otherwise leave most SMs
// idle.
//
// UNROLL: the unroll count of the loop over a lane's chunks of K (`#pragma unroll`), a
// launch constant the tuner chooses per device (1, the default: not unrolled). Deeper
// unrolling puts more chunks' loads in flight at the cost of registers; at the 4-bit
// decode launches on an H100, 2 took -3% to +7% and 4 took 0 to +14% of the time of 1
// (docs/tune_unroll_h100.json). Before the constant the loop had no pragma (the
// compiler's choice); on CUDA that and 1 took the same times within the noise
// (docs/unroll_pragma_h100.txt). A body of several hundred instructions with a trip
// count known only at run time is unlikely to be unrolled by Apple's compiler either,
// but that is not measured.
//
// Two paths, chosen at compile time by gemv_dot_rows_mb:
// - float (any policy and activation type): x converted to float, policy.dot_chunk;
// - packed half (x is half or bfloat and every weight policy of the call has HALF_PAIRS >
//   0, i.e. MLX affine with 4 or 8 bits; bfloat x converted to half per chunk, scaled by
//   a power of two): the chunk of x stays 16 half2 registers, permuted once
//   per chunk into each policy's pair order (shared by its ROWS rows); policy.load_h
//   reads a row's chunk, policy.dot_h dequantizes and multiplies with HFMA2
//   (policies/affine.metal). The loads of the next chunk are issued before the
//   arithmetic on this one.

// The blocks of x rows vary fastest in the grid (x), so that the threadgroups that read
// one block of weight rows, one per block of x rows, run together and share those loads
// through the L2 cache (with the row block on x, a batch of M rows read the weights M / MB
// times from DRAM). The row block is on y, and past GEMV_GRID_Y blocks on z as well (CUDA
// caps y and z at 65535).
constant constexpr uint GEMV_GRID_Y = 32768;

METAL_FUNC uint gemv_row_block(uint3 tg_pos) {
  return tg_pos.y + tg_pos.z * GEMV_GRID_Y;
}

// The norm a GEMV applies to x (template argument NORM).
constant constexpr int GEMV_NORM_NONE = 0;    // x as given
constant constexpr int GEMV_NORM_PLAIN = 1;   // RMSNorm without weight: sum(x^2) too
constant constexpr int GEMV_NORM_WEIGHT = 2;  // RMSNorm with weight: x * gamma, sum(x^2)

// The RMSNorm part of a chunk of x in the float path: adds its squares to ss (before
// the norm weight, which scales x only) and multiplies it by gv when NORM has a weight.
template <int C, int NORM>
METAL_FUNC void gemv_norm_chunk_f(thread float* xv, thread const float* gv,
                                  thread float& ss) {
  if (NORM != GEMV_NORM_NONE) {
#pragma unroll
    for (int i = 0; i < C; ++i) {
      ss = metal::fma(xv[i], xv[i], ss);
    }
  }
  if (NORM == GEMV_NORM_WEIGHT) {
#pragma unroll
    for (int i = 0; i < C; ++i) {
      xv[i] *= gv[i];
    }
  }
}

// Dot products of ROWS (or 2 x ROWS when DUAL) weight rows with MB rows of x: the float
// path. x row j is xr + min(j, last) * K (rows past `last` repeat it; the caller drops
// their sums). rows[r]: the weight row of slot r (already clamped to a valid row). Every
// lane gets all sums, out[j * ROWS + r] (and out2 when DUAL); ss[j] is this lane's part of
// sum(x_j^2) when NORM is not GEMV_NORM_NONE (the caller reduces it).
template <typename P, typename P2, typename T, int K, int ROWS, int NORM, bool DUAL,
          int SPLIT, int MB, int UNROLL>
METAL_FUNC void gemv_dot_rows_f(P pol, P2 pol2, const device T* xr, uint last,
                                const device T* gr, thread const uint* rows, uint lane,
                                uint part, thread float* out, thread float* out2,
                                thread float* ss) {
  constexpr bool GAMMA = NORM == GEMV_NORM_WEIGHT;
  // The chunk: elements per lane per step, the weight policy's load unit.
  constexpr int C = int(P::CHUNK);
  static_assert(int(P2::CHUNK) == C, "the two policies of a dual GEMV need one chunk size");
  constexpr int FULL = K / C;
  constexpr int TAIL = K - FULL * C;
  constexpr bool XVEC = (K * int(sizeof(T))) % 16 == 0 && (C * int(sizeof(T))) % 16 == 0;
  float s[MB * ROWS];
  float s2[MB * ROWS];
#pragma unroll
  for (int i = 0; i < MB * ROWS; ++i) {
    s[i] = 0.0f;
    s2[i] = 0.0f;
  }
#pragma unroll
  for (int j = 0; j < MB; ++j) {
    ss[j] = 0.0f;
  }
#pragma unroll (UNROLL)
  for (int c = int(lane) + 32 * int(part); c < FULL; c += 32 * SPLIT) {
    float gv[C];
    if (GAMMA) {
      dense_load<T, C, XVEC>(gr + c * C, gv);
    }
#pragma unroll
    for (int j = 0; j < MB; ++j) {
      float xv[C];
      dense_load<T, C, XVEC>(xr + metal::min(uint(j), last) * uint(K) + uint(c * C), xv);
      gemv_norm_chunk_f<C, NORM>(xv, gv, ss[j]);
      float xs = 0.0f;
#pragma unroll
      for (int i = 0; i < C; ++i) {
        xs += xv[i];
      }
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        s[j * ROWS + r] += pol.dot_chunk(rows[r], c, xv, xs);
        if (DUAL) {
          s2[j * ROWS + r] += pol2.dot_chunk(rows[r], c, xv, xs);
        }
      }
    }
  }
  if (TAIL > 0 && int(lane) == FULL % 32 && int(part) == (FULL / 32) % SPLIT) {
    float gv[C];
    if (GAMMA) {
      dense_load_tail<T, C>(gr + FULL * C, TAIL, gv);
    }
#pragma unroll
    for (int j = 0; j < MB; ++j) {
      float xv[C];
      dense_load_tail<T, C>(xr + metal::min(uint(j), last) * uint(K) + uint(FULL * C), TAIL,
                            xv);
      gemv_norm_chunk_f<C, NORM>(xv, gv, ss[j]);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        s[j * ROWS + r] += pol.dot_tail(rows[r], FULL, xv, TAIL);
        if (DUAL) {
          s2[j * ROWS + r] += pol2.dot_tail(rows[r], FULL, xv, TAIL);
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < MB * ROWS; ++i) {
    out[i] = simd_sum(s[i]);
    if (DUAL) {
      out2[i] = simd_sum(s2[i]);
    }
  }
}

// ---- packed-half path ----------------------------------------------------------------
// P::HALF_PAIRS when the policy declares it, else 0 (no packed-half path).
template <typename P, typename = void>
struct gemv_half_pairs {
  enum : int { value = 0 };
};
template <typename P>
struct gemv_half_pairs<P, decltype(void(P::HALF_PAIRS))> {
  enum : int { value = int(P::HALF_PAIRS) };
};

template <typename T>
struct gemv_is_half {
  enum : int { value = 0 };
};
template <>
struct gemv_is_half<half> {
  enum : int { value = 1 };
};

template <typename T>
struct gemv_is_bf16 {
  enum : int { value = 0 };
};
template <>
struct gemv_is_bf16<bfloat16_t> {
  enum : int { value = 1 };
};

// bfloat16 x on the packed-half path: the 16 words u[k] = (x[2k], x[2k+1]) of a lane's
// chunk become half2 words in place, times a power of two 2^p that puts the chunk's
// largest magnitude (after the norm weight, gw, with GEMV_NORM_WEIGHT) in [2^12, 2^13)
// (x * gamma may round up to 2^13 itself: tests/test_bf16_chunk_emulation.py).
// bf16 fits half's 11 significant bits but not its range; scaled, raw bf16 values are
// exact in half down to 2^-29 of the largest (half's subnormals keep 8 bits down to
// 2^-17; smaller ones lose bits they cannot move the sum by; x * gamma is rounded to
// half once), and the dot products' half sums of 4 products (|q| <= 1) stay at or
// under 2^15.
// With a norm, ss_lo / ss_hi take sum(x^2) of the raw values in float. Returns 2^-p,
// by which the caller scales the chunk's sums back (exact).
template <int NORM>
METAL_FUNC float gemv_bf16_chunk_as_half(thread uint* u, thread const uint* gw,
                                         thread float& ss_lo, thread float& ss_hi) {
  float v[32];
  float m = 0.0f;
#pragma unroll
  for (int k = 0; k < 16; ++k) {
    float a = as_type<float>(u[k] << 16u);
    float b = as_type<float>(u[k] & 0xFFFF0000u);
    if (NORM != GEMV_NORM_NONE) {
      ss_lo = metal::fma(a, a, ss_lo);
      ss_hi = metal::fma(b, b, ss_hi);
    }
    if (NORM == GEMV_NORM_WEIGHT) {
      a *= as_type<float>(gw[k] << 16u);
      b *= as_type<float>(gw[k] & 0xFFFF0000u);
    }
    v[2 * k] = a;
    v[2 * k + 1] = b;
    m = metal::max(m, metal::max(metal::abs(a), metal::abs(b)));
  }
  // m's biased exponent e: 2^(e - 127) <= m < 2^(e - 126) (e = 0 for zero, 255 for inf;
  // max drops a NaN, which spreads through its own products). Scale 2^(139 - e), as the
  // float of biased exponent 266 - e, at most 253 so that the inverse (254 - that) is a
  // normal float.
  const uint e = as_type<uint>(m) >> 23u;
  const uint sb = metal::min(266u - e, 253u);
  const float sc = as_type<float>(sb << 23u);
#pragma unroll
  for (int k = 0; k < 16; ++k) {
    u[k] = as_type<uint>(half2(half(v[2 * k] * sc), half(v[2 * k + 1] * sc)));
  }
  return as_type<float>((254u - sb) << 23u);
}

template <bool H>
struct gemv_path {};

// The 16 words u[k] = (x[2k], x[2k+1]) of a chunk as half2 pairs in stride-S order: pair
// p of block b = p / S is (x[2S b + i], x[2S b + i + S]), i = p % S (S = 2 or 4).
template <int S>
METAL_FUNC void gemv_half_pairs_of(thread const uint* u, thread half2* xh) {
#pragma unroll
  for (int p = 0; p < 16; ++p) {
    const int i = p % S;
    const uint a = u[S * (p / S) + i / 2];
    const uint b = u[S * (p / S) + i / 2 + S / 2];
    xh[p] = as_type<half2>((i & 1) ? ((a >> 16u) | (b & 0xFFFF0000u))
                                   : ((a & 0x0000FFFFu) | (b << 16u)));
  }
}

// The 16 words u[k] = (x[2k], x[2k+1]) of the 32-element chunk at p (16-byte loads).
template <typename T>
METAL_FUNC void gemv_load_chunk_words(const device T* p, thread uint* u) {
  const device uint4* q = reinterpret_cast<const device uint4*>(p);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint4 v = q[i];
    u[4 * i + 0] = v.x;
    u[4 * i + 1] = v.y;
    u[4 * i + 2] = v.z;
    u[4 * i + 3] = v.w;
  }
}

// One chunk of x on the packed-half path, in place: u (the chunk's words, see
// gemv_load_chunk_words) becomes the half2 words the dot products take, gw being the norm
// weight's words (read with GEMV_NORM_WEIGHT only). Adds the raw chunk's x^2 to ss_lo /
// ss_hi with a norm; xs = sum(x) of the result; returns the factor by which the chunk's
// sums are scaled back (2^-p for bfloat x, else 1).
template <typename T, int NORM>
METAL_FUNC float gemv_half_chunk(thread uint* u, thread const uint* gw, thread float& ss_lo,
                                 thread float& ss_hi, thread float& xs) {
  constexpr bool BF = gemv_is_bf16<T>::value != 0;
  float cb = 1.0f;
  if (BF) {
    cb = gemv_bf16_chunk_as_half<NORM>(u, gw, ss_lo, ss_hi);
  }
  if (!BF && NORM != GEMV_NORM_NONE) {
    // sum(x^2) of the raw row for the RMSNorm scale, from the loads the dot products
    // make anyway (two float accumulators per lane and row of x).
#pragma unroll
    for (int k = 0; k < 16; ++k) {
      const float2 f = float2(as_type<half2>(u[k]));
      ss_lo = metal::fma(f.x, f.x, ss_lo);
      ss_hi = metal::fma(f.y, f.y, ss_hi);
    }
  }
  if (!BF && NORM == GEMV_NORM_WEIGHT) {
    const half2 sixteenth = as_type<half2>(0x2C002C00u);
#pragma unroll
    for (int k = 0; k < 16; ++k) {
      u[k] = as_type<uint>(as_type<half2>(u[k]) * (as_type<half2>(gw[k]) * sixteenth));
    }
  }
  // sum(x) in float, from pair sums (one half rounding per pair).
  float xs0 = 0.0f;
  float xs1 = 0.0f;
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const half2 p = as_type<half2>(u[k]) + as_type<half2>(u[k + 8]);
    xs0 += float(p.x);
    xs1 += float(p.y);
  }
  xs = xs0 + xs1;
  return cb;
}

// ---- x staged in threadgroup memory (XS > 1) -------------------------------------------
// With one row of x per threadgroup, every SIMD-group of a threadgroup would load the
// same chunks of x (and the norm weight) and redo the same per-chunk work: the norm's
// squares, the norm weight, the bfloat conversion, sum(x) and the pair permutation
// (a fifth of the loop's instructions in the fused gate/up GEMV: 878 -> 703 SASS
// instructions per iteration on sm_90; and the loop's first wait on memory, the load of
// x in the iteration that uses it). Staged, the threadgroup does that work once per
// chunk, right after the first weight loads are issued, and the loop reads each chunk
// back with four 16-byte threadgroup loads. Registers on sm_90: down 14336 -> 4096
// 128 -> 96, o_proj 96 -> 64, gate/up 128 (unchanged). An A/B on an H100 took 0.95-0.98
// of the time at the 4-bit decode GEMVs (docs/xstage_ab_h100.json).
// Layout of xst (16-byte units), FULL = K / 32 chunks:
// plane q (0..3) of chunk c, its half2 pairs 4q..4q+3 in the policy's order, at
// q * FULL + c (the lanes of a SIMD-group read consecutive chunks: consecutive 16 bytes,
// no bank conflicts); then FULL floats xs, with bfloat x FULL floats cb; then one sum of
// squares per SIMD-group. XS (the array's length) is chosen on the host
// (stages/gemv.py, xstage_units); 1 means not staged.

// Writes chunk c's pairs, xs and cb to xst.
template <int FULL, bool BF>
METAL_FUNC void gemv_stage_put(threadgroup uint4* xst, int c, thread const half2* xh,
                               float xs, float cb) {
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    xst[q * FULL + c] = uint4(as_type<uint>(xh[4 * q]), as_type<uint>(xh[4 * q + 1]),
                              as_type<uint>(xh[4 * q + 2]), as_type<uint>(xh[4 * q + 3]));
  }
  threadgroup float* f = reinterpret_cast<threadgroup float*>(xst + 4 * FULL);
  f[c] = xs;
  if (BF) {
    f[FULL + c] = cb;
  }
}

// Reads chunk c back: its pairs, xs; returns cb.
template <int FULL, bool BF>
METAL_FUNC float gemv_stage_get(threadgroup const uint4* xst, int c, thread half2* xh,
                                thread float& xs) {
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const uint4 v = xst[q * FULL + c];
    xh[4 * q + 0] = as_type<half2>(v.x);
    xh[4 * q + 1] = as_type<half2>(v.y);
    xh[4 * q + 2] = as_type<half2>(v.z);
    xh[4 * q + 3] = as_type<half2>(v.w);
  }
  threadgroup const float* f = reinterpret_cast<threadgroup const float*>(xst + 4 * FULL);
  xs = f[c];
  return BF ? f[FULL + c] : 1.0f;
}

// Every thread of the threadgroup (SIMDS SIMD-groups) stages its chunks of the row xr
// (norm weight gr), then waits for the others. Returns sum(x^2) of the whole row with a
// norm (every thread gets it), else 0.
template <typename T, int K, int NORM, int S, int SIMDS>
METAL_FUNC float gemv_stage_x(const device T* xr, const device T* gr, uint sg, uint lane,
                              threadgroup uint4* xst) {
  constexpr int FULL = K / 32;
  constexpr bool BF = gemv_is_bf16<T>::value != 0;
  float ss_lo = 0.0f;
  float ss_hi = 0.0f;
  for (int c = int(sg * 32u + lane); c < FULL; c += 32 * SIMDS) {
    uint u[16];
    uint gw[16];
    gemv_load_chunk_words<T>(xr + c * 32, u);
    if (NORM == GEMV_NORM_WEIGHT) {
      gemv_load_chunk_words<T>(gr + c * 32, gw);
    }
    float xs;
    const float cb = gemv_half_chunk<T, NORM>(u, gw, ss_lo, ss_hi, xs);
    half2 xh[16];
    gemv_half_pairs_of<S>(u, xh);
    gemv_stage_put<FULL, BF>(xst, c, xh, xs, cb);
  }
  threadgroup float* ssf =
      reinterpret_cast<threadgroup float*>(xst + 4 * FULL) + (BF ? 2 : 1) * FULL;
  if (NORM != GEMV_NORM_NONE) {
    const float ss = simd_sum(ss_lo + ss_hi);
    if (lane == 0) {
      ssf[sg] = ss;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float total = 0.0f;
  if (NORM != GEMV_NORM_NONE) {
#pragma unroll
    for (int i = 0; i < SIMDS; ++i) {
      total += ssf[i];
    }
  }
  return total;
}

// The packed-half path (T is half or bfloat; K is a multiple of 32), MB rows of x as in
// gemv_dot_rows_f: a lane's weight chunks are loaded once and dotted with the chunk of
// every row of x. With GAMMA (x is the un-normalised row, the RMSNorm scale comes later)
// half x * gamma is rounded to half as x * (gamma / 16), so that it overflows only past
// 16 x 65504; the sums are scaled back by 16 (exact) in float. bfloat x is converted
// per chunk (gemv_bf16_chunk_as_half) and each chunk's sums scaled back. With XS > 1 (and
// MB 1) x is staged in threadgroup memory first (gemv_stage_x; every thread of the
// threadgroup must call it then, SIMDS SIMD-groups of them) and ss returns the whole
// row's sum of squares.
template <typename P, typename P2, typename T, int K, int ROWS, int NORM, bool DUAL,
          int SPLIT, int MB, int UNROLL, int SIMDS, int XS>
METAL_FUNC void gemv_dot_rows_h(P pol, P2 pol2, const device T* xr, uint last,
                                const device T* gr, thread const uint* rows, uint lane,
                                uint part, uint sg, threadgroup uint4* xst, thread float* out,
                                thread float* out2, thread float* ss) {
  constexpr bool GAMMA = NORM == GEMV_NORM_WEIGHT;
  constexpr bool BF = gemv_is_bf16<T>::value != 0;
  static_assert(int(P::CHUNK) == 32 && K % 32 == 0, "packed-half GEMV: 32-element chunks");
  constexpr int FULL = K / 32;
  constexpr int S1 = gemv_half_pairs<P>::value;
  constexpr int S2 = DUAL ? int(gemv_half_pairs<P2>::value) : S1;
  constexpr bool STAGED = XS > 1 && MB == 1;
  static_assert(!STAGED || S1 == S2, "staged x: one pair order for both policies");
  const uint key = pol.half_key(lane);
  const uint key2 = DUAL ? pol2.half_key(lane) : key;
  float s[MB * ROWS];
  float s2[MB * ROWS];
#pragma unroll
  for (int i = 0; i < MB * ROWS; ++i) {
    s[i] = 0.0f;
    s2[i] = 0.0f;
  }
  // Software pipelined: the weights of the lane's next chunk are loaded before the
  // arithmetic on this one (clamped to the last chunk: branch-free, always in bounds).
  float ss_lo[MB];
  float ss_hi[MB];
#pragma unroll
  for (int j = 0; j < MB; ++j) {
    ss_lo[j] = 0.0f;
    ss_hi[j] = 0.0f;
  }
  typename P::HalfChunk ch[ROWS];
  typename P2::HalfChunk ch2[ROWS];
  {
    const int c0 = metal::min(int(lane) + 32 * int(part), FULL - 1);
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      ch[r] = pol.load_h(rows[r], c0);
      if (DUAL) {
        ch2[r] = pol2.load_h(rows[r], c0);
      }
    }
  }
  if (STAGED) {
    // The first weight loads are in flight while the threadgroup stages x.
    ss_lo[0] = gemv_stage_x<T, K, NORM, S1, SIMDS>(xr, gr, sg, lane, xst);
  }
#pragma unroll (UNROLL)
  for (int c = int(lane) + 32 * int(part); c < FULL; c += 32 * SPLIT) {
    typename P::HalfChunk nx[ROWS];
    typename P2::HalfChunk nx2[ROWS];
    const int cn = metal::min(c + 32 * SPLIT, FULL - 1);
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      nx[r] = pol.load_h(rows[r], cn);
      if (DUAL) {
        nx2[r] = pol2.load_h(rows[r], cn);
      }
    }
    uint gw[16];
    if (GAMMA && !STAGED) {
      gemv_load_chunk_words<T>(gr + c * 32, gw);
    }
#pragma unroll
    for (int j = 0; j < MB; ++j) {
      // The chunk of x as 16 half2 pairs in each policy's order (xh2: the second
      // policy's, when it differs), its sum xs and the factor cb of its sums.
      half2 xh[16];
      half2 xh2[16];
      float xs;
      float cb;
      if (STAGED) {
        cb = gemv_stage_get<FULL, BF>(xst, c, xh, xs);
      } else {
        uint u[16];
        gemv_load_chunk_words<T>(xr + metal::min(uint(j), last) * uint(K) + uint(c * 32), u);
        cb = gemv_half_chunk<T, NORM>(u, gw, ss_lo[j], ss_hi[j], xs);
        gemv_half_pairs_of<S1>(u, xh);
        if (DUAL && S2 != S1) {
          gemv_half_pairs_of<S2>(u, xh2);
        }
      }
      thread const half2* xq2 = DUAL && S2 != S1 ? xh2 : xh;
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        // Half x adds its chunk sums as they are (no multiply by 1 in the loop).
        const float d = pol.dot_h(ch[r], xh, xs, key);
        s[j * ROWS + r] = BF ? metal::fma(d, cb, s[j * ROWS + r]) : s[j * ROWS + r] + d;
        if (DUAL) {
          const float d2 = pol2.dot_h(ch2[r], xq2, xs, key2);
          s2[j * ROWS + r] = BF ? metal::fma(d2, cb, s2[j * ROWS + r]) : s2[j * ROWS + r] + d2;
        }
      }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      ch[r] = nx[r];
      if (DUAL) {
        ch2[r] = nx2[r];
      }
    }
  }
#pragma unroll
  for (int j = 0; j < MB; ++j) {
    ss[j] = ss_lo[j] + ss_hi[j];
  }
  const float back = GAMMA && !BF ? 16.0f : 1.0f;
#pragma unroll
  for (int i = 0; i < MB * ROWS; ++i) {
    out[i] = simd_sum(s[i]) * back;
    if (DUAL) {
      out2[i] = simd_sum(s2[i]) * back;
    }
  }
}

template <typename P, typename P2, typename T, int K, int ROWS, int NORM, bool DUAL,
          int SPLIT, int MB, int UNROLL, int SIMDS, int XS>
METAL_FUNC void gemv_dot_rows_on(gemv_path<false>, P pol, P2 pol2, const device T* xr,
                                 uint last, const device T* gr, thread const uint* rows,
                                 uint lane, uint part, uint sg, threadgroup uint4* xst,
                                 thread float* out, thread float* out2, thread float* ss) {
  gemv_dot_rows_f<P, P2, T, K, ROWS, NORM, DUAL, SPLIT, MB, UNROLL>(
      pol, pol2, xr, last, gr, rows, lane, part, out, out2, ss);
}

template <typename P, typename P2, typename T, int K, int ROWS, int NORM, bool DUAL,
          int SPLIT, int MB, int UNROLL, int SIMDS, int XS>
METAL_FUNC void gemv_dot_rows_on(gemv_path<true>, P pol, P2 pol2, const device T* xr,
                                 uint last, const device T* gr, thread const uint* rows,
                                 uint lane, uint part, uint sg, threadgroup uint4* xst,
                                 thread float* out, thread float* out2, thread float* ss) {
  gemv_dot_rows_h<P, P2, T, K, ROWS, NORM, DUAL, SPLIT, MB, UNROLL, SIMDS, XS>(
      pol, pol2, xr, last, gr, rows, lane, part, sg, xst, out, out2, ss);
}

// Whether a GEMV of these policies and x type takes the packed-half path.
template <typename P, typename P2, typename T, bool DUAL>
struct gemv_takes_half {
  enum : bool {
    value = (gemv_is_half<T>::value != 0 || gemv_is_bf16<T>::value != 0) &&
            gemv_half_pairs<P>::value > 0 && (!DUAL || gemv_half_pairs<P2>::value > 0)
  };
};

// Dot products of ROWS (or 2 x ROWS when DUAL) weight rows with MB rows of x (xr, and
// rows of K after it up to `last`), on the packed-half path when x is half or bfloat and
// every policy has one, else on the float path. SPLIT SIMD-groups share the rows: this one
// (part, 0 <= part < SPLIT) takes every SPLIT-th 32-chunk stride of K; the caller adds
// the SPLIT partial sums. With a norm, ss[j] returns this lane's part of sum(x_j^2) over
// the same chunks, or with x staged (XS > 1 on the packed-half path with MB 1: see
// gemv_stage_x; sg is the SIMD-group, xst the staging array) the whole sum.
template <typename P, typename P2, typename T, int K, int ROWS, int NORM, bool DUAL,
          int SPLIT, int MB, int UNROLL, int SIMDS, int XS>
METAL_FUNC void gemv_dot_rows_mb(P pol, P2 pol2, const device T* xr, uint last,
                                 const device T* gr, thread const uint* rows, uint lane,
                                 uint part, uint sg, threadgroup uint4* xst, thread float* out,
                                 thread float* out2, thread float* ss) {
  constexpr bool H = gemv_takes_half<P, P2, T, DUAL>::value;
  gemv_dot_rows_on<P, P2, T, K, ROWS, NORM, DUAL, SPLIT, MB, UNROLL, SIMDS, XS>(
      gemv_path<H>(), pol, pol2, xr, last, gr, rows, lane, part, sg, xst, out, out2, ss);
}

// One row of x, not staged (the Q/K/V stage): out[r], out2[r], and ss a scalar.
template <typename P, typename P2, typename T, int K, int ROWS, int NORM, bool DUAL,
          int SPLIT, int UNROLL>
METAL_FUNC void gemv_dot_rows(P pol, P2 pol2, const device T* xr, const device T* gr,
                              thread const uint* rows, uint lane, uint part,
                              thread float* out, thread float* out2, thread float& ss) {
  float ssv[1];
  gemv_dot_rows_mb<P, P2, T, K, ROWS, NORM, DUAL, SPLIT, 1, UNROLL, SPLIT, 1>(
      pol, pol2, xr, 0u, gr, rows, lane, part, part, nullptr, out, out2, ssv);
  ss = ssv[0];
}

// Split K: adds the partial sums of the SPLIT SIMD-groups of a threadgroup (which all
// hold the same rows) through threadgroup memory: SPLIT * R floats (twice when DUAL),
// then SPLIT * NSS sums of squares (one per row of x in a norm GEMV). Every thread gets
// the totals; every thread of the threadgroup must call it.
template <int R, int SPLIT, bool DUAL, int NSS>
METAL_FUNC void gemv_split_sums(thread float* sums, thread float* sums2, thread float* ss,
                                uint sg, uint lane, threadgroup float* partials) {
  constexpr int SS_AT = (DUAL ? 2 : 1) * SPLIT * R;
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      partials[sg * uint(R) + uint(r)] = sums[r];
      if (DUAL) {
        partials[uint(SPLIT * R) + sg * uint(R) + uint(r)] = sums2[r];
      }
    }
#pragma unroll
    for (int j = 0; j < NSS; ++j) {
      partials[uint(SS_AT) + sg * uint(NSS) + uint(j)] = ss[j];
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
#pragma unroll
  for (int r = 0; r < R; ++r) {
    float t = 0.0f;
    float t2 = 0.0f;
#pragma unroll
    for (int p = 0; p < SPLIT; ++p) {
      t += partials[p * R + r];
      if (DUAL) {
        t2 += partials[SPLIT * R + p * R + r];
      }
    }
    sums[r] = t;
    if (DUAL) {
      sums2[r] = t2;
    }
  }
#pragma unroll
  for (int j = 0; j < NSS; ++j) {
    float t = 0.0f;
#pragma unroll
    for (int p = 0; p < SPLIT; ++p) {
      t += partials[SS_AT + p * NSS + j];
    }
    ss[j] = t;
  }
}

// gemv_split_sums for one row of x (the Q/K/V stage): ROWS sums, one sum of squares if SS.
template <int ROWS, int SPLIT, bool DUAL, bool SS>
METAL_FUNC void gemv_split_sum(thread float* sums, thread float* sums2, thread float& ss,
                               uint sg, uint lane, threadgroup float* partials) {
  float ssv[1] = {ss};
  gemv_split_sums<ROWS, SPLIT, DUAL, SS ? 1 : 0>(sums, sums2, ssv, sg, lane, partials);
  ss = ssv[0];
}

// The RMSNorm scale of a row from its sum of squares (as the RMSNorm kernels compute it).
template <int K>
METAL_FUNC float gemv_inv_rms(float ss, float eps) {
  return metal::rsqrt(ss / float(K) + eps);
}

// sums[i] for i < COUNT (0 otherwise), without dynamic register indexing.
template <int COUNT>
METAL_FUNC float gemv_pick(thread const float* sums, uint i) {
  float v = 0.0f;
#pragma unroll
  for (int r = 0; r < COUNT; ++r) {
    v = i == uint(r) ? sums[r] : v;
  }
  return v;
}

// NORM (GEMV_NORM_*): with a norm, x is the un-normalised row; the GEMV also returns
// inv_rms = rsqrt(mean(x^2) + eps), its sum of squares taken from the same x loads as the
// dot products, or from the staging (a separate pass over x in every threadgroup before
// the first weight load stalled the whole grid: ncu, H100, 1x4096 -> 14336 q4: 36 us
// against 16 us without it; the staging comes after the first weight loads are issued).
// MB rows of x per SIMD-group (M rows in all): their weight loads are shared, and lane
// j * ROWS + r holds row r of x row j (ROWS * MB <= 32).
// XS > 1 (one row of x on the packed-half path): x staged in xst (see gemv_stage_x); then
// every SIMD-group of the threadgroup runs to the end, those past the last row on
// clamped rows with invalid lanes, as the staging needs all of them.
template <typename P, typename P2, typename T, int K, int N, int M, int ROWS, int SIMDS,
          int NORM, bool DUAL, int SPLIT, int MB, int UNROLL, int XS>
METAL_FUNC void gemv_rows_impl(P pol, P2 pol2, const device T* x, const device T* gamma,
                               float eps, thread float& acc, thread float& acc2,
                               thread uint& row, thread uint& index, thread bool& valid,
                               thread float& inv_rms, uint3 tg_pos, uint sg, uint lane,
                               threadgroup float* partials, threadgroup uint4* xst) {
  constexpr bool STAGED = XS > 1 && MB == 1 && gemv_takes_half<P, P2, T, DUAL>::value;
  static_assert(SPLIT == 1 || SPLIT == SIMDS, "split K: 1 or every SIMD-group");
  static_assert(ROWS * MB <= 32, "one lane per output: ROWS * MB <= 32");
  const uint m0 = tg_pos.x * uint(MB);
  const uint block = gemv_row_block(tg_pos);
  // Split K: the whole threadgroup holds ROWS rows (a uniform early return below).
  const uint row0 = (SPLIT > 1 ? block : block * uint(SIMDS) + sg) * uint(ROWS);
  const uint part = SPLIT > 1 ? sg : 0u;
  const uint xj = lane / uint(ROWS);
  acc = 0.0f;
  acc2 = 0.0f;
  inv_rms = 0.0f;
  row = row0 + lane % uint(ROWS);
  index = (m0 + xj) * uint(N) + row;
  valid = lane < uint(ROWS * MB) && row < uint(N) && m0 + xj < uint(M) && part == 0u;
  if (!STAGED && row0 >= uint(N)) {
    return;  // the whole SIMD-group (threadgroup when split) is past the last row
  }
  uint rows[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    rows[r] = metal::min(row0 + uint(r), uint(N - 1));
  }
  float sums[MB * ROWS];
  float sums2[MB * ROWS];
  float ss[MB];
  // Rows of x past the last (M not a multiple of MB) repeat it; their lanes are invalid.
  const uint last = metal::min(uint(M - 1) - m0, uint(MB - 1));
  gemv_dot_rows_mb<P, P2, T, K, ROWS, NORM, DUAL, SPLIT, MB, UNROLL, SIMDS, STAGED ? XS : 1>(
      pol, pol2, x + m0 * uint(K), last, gamma, rows, lane, part, sg, xst, sums, sums2, ss);
  // Staged, ss is already the whole row's.
  constexpr int NSS = NORM != GEMV_NORM_NONE && !STAGED ? MB : 0;
  if (NSS > 0) {
#pragma unroll
    for (int j = 0; j < MB; ++j) {
      ss[j] = simd_sum(ss[j]);
    }
  }
  if (SPLIT > 1) {
    gemv_split_sums<MB * ROWS, SPLIT, DUAL, NSS>(sums, sums2, ss, sg, lane, partials);
  }
  if (NORM != GEMV_NORM_NONE) {
    inv_rms = gemv_inv_rms<K>(gemv_pick<MB>(ss, xj), eps);
  }
  acc = gemv_pick<MB * ROWS>(sums, lane);
  if (DUAL) {
    acc2 = gemv_pick<MB * ROWS>(sums2, lane);
  }
}

// ---- stage functions ------------------------------------------------------------------
// acc = dot(W[row], x[m]).
template <typename P, typename T, int K, int N, int M, int ROWS, int SIMDS, int SPLIT, int MB,
          int UNROLL, int XS>
METAL_FUNC void gemv_main(P wpol, const device T* x, thread float& acc, thread uint& row,
                          thread uint& index, thread bool& valid, uint3 tg_pos, uint sg,
                          uint lane, threadgroup float* gemv_partials,
                          threadgroup uint4* gemv_xstage) {
  float unused, unused_rms;
  gemv_rows_impl<P, P, T, K, N, M, ROWS, SIMDS, GEMV_NORM_NONE, false, SPLIT, MB, UNROLL, XS>(
      wpol, wpol, x, x, 0.0f, acc, unused, row, index, valid, unused_rms, tg_pos, sg, lane,
      gemv_partials, gemv_xstage);
}

// acc = dot(W[row], x[m] * norm_weight) and inv_rms of x[m] (the RMSNorm scale epilogue
// applies it).
template <typename P, typename T, int K, int N, int M, int ROWS, int SIMDS, int SPLIT, int MB,
          int UNROLL, int XS>
METAL_FUNC void gemv_norm_main(P wpol, const device T* x, const device T* norm_weight,
                               float eps, thread float& acc, thread uint& row,
                               thread uint& index, thread bool& valid, thread float& inv_rms,
                               uint3 tg_pos, uint sg, uint lane,
                               threadgroup float* gemv_partials,
                               threadgroup uint4* gemv_xstage) {
  float unused;
  gemv_rows_impl<P, P, T, K, N, M, ROWS, SIMDS, GEMV_NORM_WEIGHT, false, SPLIT, MB, UNROLL, XS>(
      wpol, wpol, x, norm_weight, eps, acc, unused, row, index, valid, inv_rms, tg_pos, sg,
      lane, gemv_partials, gemv_xstage);
}

// acc = dot(W[row], x[m]) and inv_rms of x[m] (RMSNorm without weight).
template <typename P, typename T, int K, int N, int M, int ROWS, int SIMDS, int SPLIT, int MB,
          int UNROLL, int XS>
METAL_FUNC void gemv_rms_main(P wpol, const device T* x, float eps, thread float& acc,
                              thread uint& row, thread uint& index, thread bool& valid,
                              thread float& inv_rms, uint3 tg_pos, uint sg, uint lane,
                              threadgroup float* gemv_partials,
                              threadgroup uint4* gemv_xstage) {
  float unused;
  gemv_rows_impl<P, P, T, K, N, M, ROWS, SIMDS, GEMV_NORM_PLAIN, false, SPLIT, MB, UNROLL, XS>(
      wpol, wpol, x, x, eps, acc, unused, row, index, valid, inv_rms, tg_pos, sg, lane,
      gemv_partials, gemv_xstage);
}

// Gate and up projections sharing the x loads: acc = gate row, acc2 = up row
// (produced values in declaration order: acc, row, index, valid, [inv_rms,] acc2).
template <typename P, typename P2, typename T, int K, int N, int M, int ROWS, int SIMDS,
          int SPLIT, int MB, int UNROLL, int XS>
METAL_FUNC void gemv_dual_main(P gpol, P2 upol, const device T* x, thread float& acc,
                               thread uint& row, thread uint& index, thread bool& valid,
                               thread float& acc2, uint3 tg_pos, uint sg, uint lane,
                               threadgroup float* gemv_partials,
                               threadgroup uint4* gemv_xstage) {
  float unused_rms;
  gemv_rows_impl<P, P2, T, K, N, M, ROWS, SIMDS, GEMV_NORM_NONE, true, SPLIT, MB, UNROLL, XS>(
      gpol, upol, x, x, 0.0f, acc, acc2, row, index, valid, unused_rms, tg_pos, sg, lane,
      gemv_partials, gemv_xstage);
}

template <typename P, typename P2, typename T, int K, int N, int M, int ROWS, int SIMDS,
          int SPLIT, int MB, int UNROLL, int XS>
METAL_FUNC void gemv_dual_norm_main(P gpol, P2 upol, const device T* x,
                                    const device T* norm_weight, float eps, thread float& acc,
                                    thread uint& row, thread uint& index, thread bool& valid,
                                    thread float& inv_rms, thread float& acc2, uint3 tg_pos,
                                    uint sg, uint lane, threadgroup float* gemv_partials,
                                    threadgroup uint4* gemv_xstage) {
  gemv_rows_impl<P, P2, T, K, N, M, ROWS, SIMDS, GEMV_NORM_WEIGHT, true, SPLIT, MB, UNROLL, XS>(
      gpol, upol, x, norm_weight, eps, acc, acc2, row, index, valid, inv_rms, tg_pos, sg,
      lane, gemv_partials, gemv_xstage);
}

template <typename P, typename P2, typename T, int K, int N, int M, int ROWS, int SIMDS,
          int SPLIT, int MB, int UNROLL, int XS>
METAL_FUNC void gemv_dual_rms_main(P gpol, P2 upol, const device T* x, float eps,
                                   thread float& acc, thread uint& row, thread uint& index,
                                   thread bool& valid, thread float& inv_rms,
                                   thread float& acc2, uint3 tg_pos, uint sg, uint lane,
                                   threadgroup float* gemv_partials,
                                   threadgroup uint4* gemv_xstage) {
  gemv_rows_impl<P, P2, T, K, N, M, ROWS, SIMDS, GEMV_NORM_PLAIN, true, SPLIT, MB, UNROLL, XS>(
      gpol, upol, x, x, eps, acc, acc2, row, index, valid, inv_rms, tg_pos, sg, lane,
      gemv_partials, gemv_xstage);
}
