// GEMV main stages over weights stored [N, K] (MLX's Linear layout).
// Needs policies/dense.metal (loaders) and the weight policies' headers.
//
// Layout: batch row m of x = threadgroup_position_in_grid.y; each threadgroup has SIMDS
// SIMD-groups, each SIMD-group computes ROWS consecutive output rows. The 32 lanes of a
// SIMD-group stride over K in chunks of 32 elements: a lane loads its x chunk once
// (times the norm weight when fused with RMSNorm) and dots it with the same chunk of
// its ROWS weight rows (ROWS independent wide loads in flight). After the SIMD
// reduction lane r (< ROWS) holds row r of the group: acc, row, index, valid.
// RMSNorm fused (NORM): the lanes also add up x^2 of the chunks they load, so every lane
// gets inv_rms of the row without a separate pass over x.
// Split K (SPLIT == SIMDS): the SIMD-groups of a threadgroup share its ROWS rows instead,
// each takes every SIMDS-th stride of K, and they add their sums (and sums of squares)
// through threadgroup memory (`gemv_partials`, THREADS floats): SIMDS times the loads in
// flight per row, for shapes with few rows (N = 4096) that would otherwise leave most SMs
// idle.
//
// Two paths, chosen at compile time by gemv_dot_rows:
// - float (any policy and activation type): x converted to float, policy.dot_chunk;
// - packed half (x is half and every weight policy of the call has HALF_PAIRS > 0, i.e.
//   MLX affine with 4 or 8 bits): the chunk of x stays 16 half2 registers, permuted once
//   per chunk into each policy's pair order (shared by its ROWS rows); policy.load_h
//   reads a row's chunk, policy.dot_h dequantizes and multiplies with HFMA2
//   (policies/affine.metal). The loads of the next chunk are issued before the
//   arithmetic on this one.

// The norm a GEMV applies to x (template argument NORM).
constant constexpr int GEMV_NORM_NONE = 0;    // x as given
constant constexpr int GEMV_NORM_PLAIN = 1;   // RMSNorm without weight: sum(x^2) too
constant constexpr int GEMV_NORM_WEIGHT = 2;  // RMSNorm with weight: x * gamma, sum(x^2)

// Dot products of ROWS (or 2 x ROWS when DUAL) weight rows with one row of x: the float
// path. rows[r]: the weight row of slot r (already clamped to a valid row). Every lane
// gets all sums (out, and out2 when DUAL); ss is this lane's part of sum(x^2) when NORM
// is not GEMV_NORM_NONE (the caller reduces it).
template <typename P, typename P2, typename T, int K, int ROWS, int NORM, bool DUAL,
          int SPLIT>
METAL_FUNC void gemv_dot_rows_f(P pol, P2 pol2, const device T* xr, const device T* gr,
                                thread const uint* rows, uint lane, uint part,
                                thread float* out, thread float* out2, thread float& ss) {
  constexpr bool GAMMA = NORM == GEMV_NORM_WEIGHT;
  // The chunk: elements per lane per step, the weight policy's load unit.
  constexpr int C = int(P::CHUNK);
  static_assert(int(P2::CHUNK) == C, "the two policies of a dual GEMV need one chunk size");
  constexpr int FULL = K / C;
  constexpr int TAIL = K - FULL * C;
  constexpr bool XVEC = (K * int(sizeof(T))) % 16 == 0 && (C * int(sizeof(T))) % 16 == 0;
  float s[ROWS];
  float s2[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    s[r] = 0.0f;
    s2[r] = 0.0f;
  }
  ss = 0.0f;
  for (int c = int(lane) + 32 * int(part); c < FULL; c += 32 * SPLIT) {
    float xv[C];
    dense_load<T, C, XVEC>(xr + c * C, xv);
    if (NORM != GEMV_NORM_NONE) {
#pragma unroll
      for (int i = 0; i < C; ++i) {
        ss = metal::fma(xv[i], xv[i], ss);
      }
    }
    if (GAMMA) {
      float gv[C];
      dense_load<T, C, XVEC>(gr + c * C, gv);
#pragma unroll
      for (int i = 0; i < C; ++i) {
        xv[i] *= gv[i];
      }
    }
    float xs = 0.0f;
#pragma unroll
    for (int i = 0; i < C; ++i) {
      xs += xv[i];
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      s[r] += pol.dot_chunk(rows[r], c, xv, xs);
      if (DUAL) {
        s2[r] += pol2.dot_chunk(rows[r], c, xv, xs);
      }
    }
  }
  if (TAIL > 0 && int(lane) == FULL % 32 && int(part) == (FULL / 32) % SPLIT) {
    float xv[C];
    dense_load_tail<T, C>(xr + FULL * C, TAIL, xv);
    if (NORM != GEMV_NORM_NONE) {
#pragma unroll
      for (int i = 0; i < C; ++i) {
        ss = metal::fma(xv[i], xv[i], ss);
      }
    }
    if (GAMMA) {
      float gv[C];
      dense_load_tail<T, C>(gr + FULL * C, TAIL, gv);
#pragma unroll
      for (int i = 0; i < C; ++i) {
        xv[i] *= gv[i];
      }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      s[r] += pol.dot_tail(rows[r], FULL, xv, TAIL);
      if (DUAL) {
        s2[r] += pol2.dot_tail(rows[r], FULL, xv, TAIL);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    out[r] = simd_sum(s[r]);
    if (DUAL) {
      out2[r] = simd_sum(s2[r]);
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

// The packed-half path (T is half; K is a multiple of 32). With GAMMA (x is the
// un-normalised row, the RMSNorm scale comes later) x * gamma is rounded to half as
// x * (gamma / 16), so that it overflows only past 16 x 65504; the sums are scaled back
// by 16 (exact) in float.
template <typename P, typename P2, typename T, int K, int ROWS, int NORM, bool DUAL,
          int SPLIT>
METAL_FUNC void gemv_dot_rows_h(P pol, P2 pol2, const device T* xr, const device T* gr,
                                thread const uint* rows, uint lane, uint part,
                                thread float* out, thread float* out2, thread float& ss) {
  constexpr bool GAMMA = NORM == GEMV_NORM_WEIGHT;
  static_assert(int(P::CHUNK) == 32 && K % 32 == 0, "packed-half GEMV: 32-element chunks");
  constexpr int FULL = K / 32;
  constexpr int S1 = gemv_half_pairs<P>::value;
  constexpr int S2 = DUAL ? int(gemv_half_pairs<P2>::value) : S1;
  const uint key = pol.half_key(lane);
  const uint key2 = DUAL ? pol2.half_key(lane) : key;
  float s[ROWS];
  float s2[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    s[r] = 0.0f;
    s2[r] = 0.0f;
  }
  // Software pipelined: the weights of the lane's next chunk are loaded before the
  // arithmetic on this one (clamped to the last chunk: branch-free, always in bounds).
  float ss_lo = 0.0f;
  float ss_hi = 0.0f;
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
    uint u[16];
    const device uint4* xq = reinterpret_cast<const device uint4*>(xr + c * 32);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint4 v = xq[j];
      u[4 * j + 0] = v.x;
      u[4 * j + 1] = v.y;
      u[4 * j + 2] = v.z;
      u[4 * j + 3] = v.w;
    }
    if (NORM != GEMV_NORM_NONE) {
      // sum(x^2) of the raw row for the RMSNorm scale, from the loads the dot products
      // make anyway (two float accumulators per lane).
#pragma unroll
      for (int k = 0; k < 16; ++k) {
        const float2 f = float2(as_type<half2>(u[k]));
        ss_lo = metal::fma(f.x, f.x, ss_lo);
        ss_hi = metal::fma(f.y, f.y, ss_hi);
      }
    }
    if (GAMMA) {
      const device uint4* gq = reinterpret_cast<const device uint4*>(gr + c * 32);
      const half2 sixteenth = as_type<half2>(0x2C002C00u);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint4 v = gq[j];
        const uint g[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int t = 0; t < 4; ++t) {
          u[4 * j + t] = as_type<uint>(as_type<half2>(u[4 * j + t]) *
                                       (as_type<half2>(g[t]) * sixteenth));
        }
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
    const float xs = xs0 + xs1;
    half2 xh[16];
    half2 xh2[16];
    gemv_half_pairs_of<S1>(u, xh);
    if (DUAL) {
      gemv_half_pairs_of<S2>(u, xh2);
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      s[r] += pol.dot_h(ch[r], xh, xs, key);
      if (DUAL) {
        s2[r] += pol2.dot_h(ch2[r], xh2, xs, key2);
      }
      ch[r] = nx[r];
      if (DUAL) {
        ch2[r] = nx2[r];
      }
    }
  }
  ss = ss_lo + ss_hi;
  const float back = GAMMA ? 16.0f : 1.0f;
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    out[r] = simd_sum(s[r]) * back;
    if (DUAL) {
      out2[r] = simd_sum(s2[r]) * back;
    }
  }
}

template <typename P, typename P2, typename T, int K, int ROWS, int NORM, bool DUAL,
          int SPLIT>
METAL_FUNC void gemv_dot_rows_on(gemv_path<false>, P pol, P2 pol2, const device T* xr,
                                 const device T* gr, thread const uint* rows, uint lane,
                                 uint part, thread float* out, thread float* out2,
                                 thread float& ss) {
  gemv_dot_rows_f<P, P2, T, K, ROWS, NORM, DUAL, SPLIT>(pol, pol2, xr, gr, rows, lane, part,
                                                        out, out2, ss);
}

template <typename P, typename P2, typename T, int K, int ROWS, int NORM, bool DUAL,
          int SPLIT>
METAL_FUNC void gemv_dot_rows_on(gemv_path<true>, P pol, P2 pol2, const device T* xr,
                                 const device T* gr, thread const uint* rows, uint lane,
                                 uint part, thread float* out, thread float* out2,
                                 thread float& ss) {
  gemv_dot_rows_h<P, P2, T, K, ROWS, NORM, DUAL, SPLIT>(pol, pol2, xr, gr, rows, lane, part,
                                                        out, out2, ss);
}

// Dot products of ROWS (or 2 x ROWS when DUAL) weight rows with one row of x, on the
// packed-half path when x is half and every policy has one, else on the float path.
// SPLIT SIMD-groups share the rows: this one (part, 0 <= part < SPLIT) takes every
// SPLIT-th 32-chunk stride of K; the caller adds the SPLIT partial sums. With a norm,
// ss returns this lane's part of sum(x^2) over the same chunks.
template <typename P, typename P2, typename T, int K, int ROWS, int NORM, bool DUAL,
          int SPLIT>
METAL_FUNC void gemv_dot_rows(P pol, P2 pol2, const device T* xr, const device T* gr,
                              thread const uint* rows, uint lane, uint part,
                              thread float* out, thread float* out2, thread float& ss) {
  constexpr bool H = gemv_is_half<T>::value != 0 && gemv_half_pairs<P>::value > 0 &&
                     (!DUAL || gemv_half_pairs<P2>::value > 0);
  gemv_dot_rows_on<P, P2, T, K, ROWS, NORM, DUAL, SPLIT>(gemv_path<H>(), pol, pol2, xr, gr,
                                                         rows, lane, part, out, out2, ss);
}

// Split K: adds the partial sums of the SPLIT SIMD-groups of a threadgroup (which all
// hold the same rows) through threadgroup memory: SPLIT * ROWS floats (twice when DUAL),
// then SPLIT sums of squares when SS (the RMSNorm of a norm GEMV). Every thread gets the
// totals; every thread of the threadgroup must call it.
template <int ROWS, int SPLIT, bool DUAL, bool SS>
METAL_FUNC void gemv_split_sum(thread float* sums, thread float* sums2, thread float& ss,
                               uint sg, uint lane, threadgroup float* partials) {
  constexpr int SS_AT = (DUAL ? 2 : 1) * SPLIT * ROWS;
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      partials[sg * uint(ROWS) + uint(r)] = sums[r];
      if (DUAL) {
        partials[uint(SPLIT * ROWS) + sg * uint(ROWS) + uint(r)] = sums2[r];
      }
    }
    if (SS) {
      partials[uint(SS_AT) + sg] = ss;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    float t = 0.0f;
    float t2 = 0.0f;
#pragma unroll
    for (int p = 0; p < SPLIT; ++p) {
      t += partials[p * ROWS + r];
      if (DUAL) {
        t2 += partials[SPLIT * ROWS + p * ROWS + r];
      }
    }
    sums[r] = t;
    if (DUAL) {
      sums2[r] = t2;
    }
  }
  if (SS) {
    float t = 0.0f;
#pragma unroll
    for (int p = 0; p < SPLIT; ++p) {
      t += partials[SS_AT + p];
    }
    ss = t;
  }
}

// The RMSNorm scale of a row from its sum of squares (as the RMSNorm kernels compute it).
template <int K>
METAL_FUNC float gemv_inv_rms(float ss, float eps) {
  return metal::rsqrt(ss / float(K) + eps);
}

// sums[lane] for lane < ROWS (0 otherwise), without dynamic register indexing.
template <int ROWS>
METAL_FUNC float gemv_pick(thread const float* sums, uint lane) {
  float v = 0.0f;
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    v = lane == uint(r) ? sums[r] : v;
  }
  return v;
}

// NORM (GEMV_NORM_*): with a norm, x is the un-normalised row; the GEMV also returns
// inv_rms = rsqrt(mean(x^2) + eps), its sum of squares taken from the same x loads as the
// dot products (a separate pass over x in every threadgroup before the first weight load
// stalled the whole grid: ncu, H100, 1x4096 -> 14336 q4: 36 us against 16 us without it).
template <typename P, typename P2, typename T, int K, int N, int ROWS, int SIMDS, int NORM,
          bool DUAL, int SPLIT>
METAL_FUNC void gemv_rows_impl(P pol, P2 pol2, const device T* x, const device T* gamma,
                               float eps, thread float& acc, thread float& acc2,
                               thread uint& row, thread uint& index, thread bool& valid,
                               thread float& inv_rms, uint3 tg_pos, uint sg, uint lane,
                               threadgroup float* partials) {
  static_assert(SPLIT == 1 || SPLIT == SIMDS, "split K: 1 or every SIMD-group");
  const uint m = tg_pos.y;
  // Split K: the whole threadgroup holds ROWS rows (a uniform early return below).
  const uint row0 = (SPLIT > 1 ? tg_pos.x : tg_pos.x * uint(SIMDS) + sg) * uint(ROWS);
  const uint part = SPLIT > 1 ? sg : 0u;
  acc = 0.0f;
  acc2 = 0.0f;
  inv_rms = 0.0f;
  row = row0 + lane;
  index = m * uint(N) + row;
  valid = lane < uint(ROWS) && row < uint(N) && part == 0u;
  if (row0 >= uint(N)) {
    return;  // the whole SIMD-group (threadgroup when split) is past the last row
  }
  uint rows[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    rows[r] = metal::min(row0 + uint(r), uint(N - 1));
  }
  float sums[ROWS];
  float sums2[ROWS];
  float ss;
  gemv_dot_rows<P, P2, T, K, ROWS, NORM, DUAL, SPLIT>(pol, pol2, x + m * uint(K), gamma, rows,
                                                      lane, part, sums, sums2, ss);
  if (NORM != GEMV_NORM_NONE) {
    ss = simd_sum(ss);
  }
  if (SPLIT > 1) {
    gemv_split_sum<ROWS, SPLIT, DUAL, NORM != GEMV_NORM_NONE>(sums, sums2, ss, sg, lane,
                                                               partials);
  }
  if (NORM != GEMV_NORM_NONE) {
    inv_rms = gemv_inv_rms<K>(ss, eps);
  }
  acc = gemv_pick<ROWS>(sums, lane);
  if (DUAL) {
    acc2 = gemv_pick<ROWS>(sums2, lane);
  }
}

// ---- stage functions ------------------------------------------------------------------
// acc = dot(W[row], x[m]).
template <typename P, typename T, int K, int N, int ROWS, int SIMDS, int SPLIT>
METAL_FUNC void gemv_main(P wpol, const device T* x, thread float& acc, thread uint& row,
                          thread uint& index, thread bool& valid, uint3 tg_pos, uint sg,
                          uint lane, threadgroup float* gemv_partials) {
  float unused, unused_rms;
  gemv_rows_impl<P, P, T, K, N, ROWS, SIMDS, GEMV_NORM_NONE, false, SPLIT>(
      wpol, wpol, x, x, 0.0f, acc, unused, row, index, valid, unused_rms, tg_pos, sg, lane,
      gemv_partials);
}

// acc = dot(W[row], x[m] * norm_weight) and inv_rms of x[m] (the RMSNorm scale epilogue
// applies it).
template <typename P, typename T, int K, int N, int ROWS, int SIMDS, int SPLIT>
METAL_FUNC void gemv_norm_main(P wpol, const device T* x, const device T* norm_weight,
                               float eps, thread float& acc, thread uint& row,
                               thread uint& index, thread bool& valid, thread float& inv_rms,
                               uint3 tg_pos, uint sg, uint lane,
                               threadgroup float* gemv_partials) {
  float unused;
  gemv_rows_impl<P, P, T, K, N, ROWS, SIMDS, GEMV_NORM_WEIGHT, false, SPLIT>(
      wpol, wpol, x, norm_weight, eps, acc, unused, row, index, valid, inv_rms, tg_pos, sg,
      lane, gemv_partials);
}

// acc = dot(W[row], x[m]) and inv_rms of x[m] (RMSNorm without weight).
template <typename P, typename T, int K, int N, int ROWS, int SIMDS, int SPLIT>
METAL_FUNC void gemv_rms_main(P wpol, const device T* x, float eps, thread float& acc,
                              thread uint& row, thread uint& index, thread bool& valid,
                              thread float& inv_rms, uint3 tg_pos, uint sg, uint lane,
                              threadgroup float* gemv_partials) {
  float unused;
  gemv_rows_impl<P, P, T, K, N, ROWS, SIMDS, GEMV_NORM_PLAIN, false, SPLIT>(
      wpol, wpol, x, x, eps, acc, unused, row, index, valid, inv_rms, tg_pos, sg, lane,
      gemv_partials);
}

// Gate and up projections sharing the x loads: acc = gate row, acc2 = up row
// (produced values in declaration order: acc, row, index, valid, [inv_rms,] acc2).
template <typename P, typename P2, typename T, int K, int N, int ROWS, int SIMDS, int SPLIT>
METAL_FUNC void gemv_dual_main(P gpol, P2 upol, const device T* x, thread float& acc,
                               thread uint& row, thread uint& index, thread bool& valid,
                               thread float& acc2, uint3 tg_pos, uint sg, uint lane,
                               threadgroup float* gemv_partials) {
  float unused_rms;
  gemv_rows_impl<P, P2, T, K, N, ROWS, SIMDS, GEMV_NORM_NONE, true, SPLIT>(
      gpol, upol, x, x, 0.0f, acc, acc2, row, index, valid, unused_rms, tg_pos, sg, lane,
      gemv_partials);
}

template <typename P, typename P2, typename T, int K, int N, int ROWS, int SIMDS, int SPLIT>
METAL_FUNC void gemv_dual_norm_main(P gpol, P2 upol, const device T* x,
                                    const device T* norm_weight, float eps, thread float& acc,
                                    thread uint& row, thread uint& index, thread bool& valid,
                                    thread float& inv_rms, thread float& acc2, uint3 tg_pos,
                                    uint sg, uint lane, threadgroup float* gemv_partials) {
  gemv_rows_impl<P, P2, T, K, N, ROWS, SIMDS, GEMV_NORM_WEIGHT, true, SPLIT>(
      gpol, upol, x, norm_weight, eps, acc, acc2, row, index, valid, inv_rms, tg_pos, sg,
      lane, gemv_partials);
}

template <typename P, typename P2, typename T, int K, int N, int ROWS, int SIMDS, int SPLIT>
METAL_FUNC void gemv_dual_rms_main(P gpol, P2 upol, const device T* x, float eps,
                                   thread float& acc, thread uint& row, thread uint& index,
                                   thread bool& valid, thread float& inv_rms,
                                   thread float& acc2, uint3 tg_pos, uint sg, uint lane,
                                   threadgroup float* gemv_partials) {
  gemv_rows_impl<P, P2, T, K, N, ROWS, SIMDS, GEMV_NORM_PLAIN, true, SPLIT>(
      gpol, upol, x, x, eps, acc, acc2, row, index, valid, inv_rms, tg_pos, sg, lane,
      gemv_partials);
}
