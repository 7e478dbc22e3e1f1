// GEMV main stages over weights stored [N, K] (MLX's Linear layout).
// Needs policies/dense.metal (loaders) and the weight policies' headers.
//
// Layout: batch row m of x = threadgroup_position_in_grid.y; each threadgroup has SIMDS
// SIMD-groups, each SIMD-group computes ROWS consecutive output rows. The 32 lanes of a
// SIMD-group stride over K in chunks of 32 elements: a lane loads its x chunk once
// (times the norm weight when fused with RMSNorm) and dots it with the same chunk of
// its ROWS weight rows (ROWS independent wide loads in flight). After the SIMD
// reduction lane r (< ROWS) holds row r of the group: acc, row, index, valid.

// Dot products of ROWS (or 2 x ROWS when DUAL) weight rows with one row of x.
// rows[r]: the weight row of slot r (already clamped to a valid row). Every lane
// gets all sums (out, and out2 when DUAL).
template <typename P, typename P2, typename T, int K, int ROWS, bool GAMMA, bool DUAL>
METAL_FUNC void gemv_dot_rows(P pol, P2 pol2, const device T* xr, const device T* gr,
                              thread const uint* rows, uint lane, thread float* out,
                              thread float* out2) {
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
  for (int c = int(lane); c < FULL; c += 32) {
    float xv[C];
    dense_load<T, C, XVEC>(xr + c * C, xv);
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
  if (TAIL > 0 && int(lane) == FULL % 32) {
    float xv[C];
    dense_load_tail<T, C>(xr + FULL * C, TAIL, xv);
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

template <typename P, typename P2, typename T, int K, int N, int ROWS, int SIMDS, bool GAMMA,
          bool DUAL>
METAL_FUNC void gemv_rows_impl(P pol, P2 pol2, const device T* x, const device T* gamma,
                               thread float& acc, thread float& acc2, thread uint& row,
                               thread uint& index, thread bool& valid, uint3 tg_pos,
                               uint sg, uint lane) {
  const uint m = tg_pos.y;
  const uint row0 = (tg_pos.x * uint(SIMDS) + sg) * uint(ROWS);
  acc = 0.0f;
  acc2 = 0.0f;
  row = row0 + lane;
  index = m * uint(N) + row;
  valid = lane < uint(ROWS) && row < uint(N);
  if (row0 >= uint(N)) {
    return;  // the whole SIMD-group is past the last row
  }
  uint rows[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    rows[r] = metal::min(row0 + uint(r), uint(N - 1));
  }
  float sums[ROWS];
  float sums2[ROWS];
  gemv_dot_rows<P, P2, T, K, ROWS, GAMMA, DUAL>(pol, pol2, x + m * uint(K), gamma, rows,
                                                lane, sums, sums2);
  acc = gemv_pick<ROWS>(sums, lane);
  if (DUAL) {
    acc2 = gemv_pick<ROWS>(sums2, lane);
  }
}

// ---- stage functions ------------------------------------------------------------------
// acc = dot(W[row], x[m]).
template <typename P, typename T, int K, int N, int ROWS, int SIMDS>
METAL_FUNC void gemv_main(P wpol, const device T* x, thread float& acc, thread uint& row,
                          thread uint& index, thread bool& valid, uint3 tg_pos, uint sg,
                          uint lane) {
  float unused;
  gemv_rows_impl<P, P, T, K, N, ROWS, SIMDS, false, false>(
      wpol, wpol, x, x, acc, unused, row, index, valid, tg_pos, sg, lane);
}

// acc = dot(W[row], x[m] * norm_weight) (the RMSNorm scale epilogue applies inv_rms).
template <typename P, typename T, int K, int N, int ROWS, int SIMDS>
METAL_FUNC void gemv_norm_main(P wpol, const device T* x, const device T* norm_weight,
                               thread float& acc, thread uint& row, thread uint& index,
                               thread bool& valid, uint3 tg_pos, uint sg, uint lane) {
  float unused;
  gemv_rows_impl<P, P, T, K, N, ROWS, SIMDS, true, false>(
      wpol, wpol, x, norm_weight, acc, unused, row, index, valid, tg_pos, sg, lane);
}

// Gate and up projections sharing the x loads: acc = gate row, acc2 = up row
// (produced values in declaration order: acc, row, index, valid, acc2).
template <typename P, typename P2, typename T, int K, int N, int ROWS, int SIMDS>
METAL_FUNC void gemv_dual_main(P gpol, P2 upol, const device T* x, thread float& acc,
                               thread uint& row, thread uint& index, thread bool& valid,
                               thread float& acc2, uint3 tg_pos, uint sg, uint lane) {
  gemv_rows_impl<P, P2, T, K, N, ROWS, SIMDS, false, true>(
      gpol, upol, x, x, acc, acc2, row, index, valid, tg_pos, sg, lane);
}

template <typename P, typename P2, typename T, int K, int N, int ROWS, int SIMDS>
METAL_FUNC void gemv_dual_norm_main(P gpol, P2 upol, const device T* x,
                                    const device T* norm_weight, thread float& acc,
                                    thread uint& row, thread uint& index, thread bool& valid,
                                    thread float& acc2, uint3 tg_pos, uint sg, uint lane) {
  gemv_rows_impl<P, P2, T, K, N, ROWS, SIMDS, true, true>(
      gpol, upol, x, norm_weight, acc, acc2, row, index, valid, tg_pos, sg, lane);
}
