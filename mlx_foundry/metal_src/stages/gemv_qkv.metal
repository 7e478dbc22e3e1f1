// Fused RMSNorm + Q/K/V projections + RoPE (grouped-query shapes).
// Needs stages/gemv.metal.
//
// Output rows are walked in a "virtual" order: Q rows [0, NQ), then K rows, then V
// rows, NQ = H * D, NKV = H_kv * D. Inside a Q or K head the two members of each RoPE
// pair are adjacent virtual rows (2p, 2p + 1): pair p is (2p, 2p + 1) when TRAD
// (traditional RoPE) and (p, p + D/2) otherwise. With ROWS even and dividing D, every
// SIMD-group stays inside one projection and holds both members of its pairs in
// neighbouring lanes, so RoPE is one simd_shuffle_xor(acc, 1) after the reduction.
//
// RoPE (as mx.fast.rope): pos = float(l + offset) * scale with l = m % seq_len,
// theta = pos * inv_freq[p], (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos); precise
// sin/cos (Metal compiles with fast math by default; positions reach large angles).

template <int D, bool TRAD>
METAL_FUNC uint qkv_actual_row(uint t) {
  if (TRAD) {
    return t;
  }
  const uint j = t % uint(D);
  return (t - j) + (j >> 1) + (j & 1u) * uint(D / 2);
}

// Whether the three projections share one policy type (the usual case: one format).
template <bool SAME>
struct qkv_same_tag {};
template <typename A, typename B, typename C>
struct qkv_same : qkv_same_tag<false> {};
template <typename A>
struct qkv_same<A, A, A> : qkv_same_tag<true> {};

// The dot products of this SIMD-group's rows with one policy chosen by segment. With
// one policy type the policy value is selected and the GEMV loop is instantiated once;
// three inlined copies of it behind a branch kept the compiler from holding the
// weight chunks in registers (ncu, H200: 27 cycles per issued instruction, 7% DRAM).
template <typename PQ, typename PK, typename PV, typename T, int K, int ROWS, int NORM,
          int SPLIT, int UNROLL>
METAL_FUNC void qkv_dot(qkv_same_tag<true>, PQ qpol, PK kpol, PV vpol, int seg,
                        const device T* xr, const device T* gamma, thread const uint* rows,
                        uint lane, uint part, thread float* sums, thread float& ss) {
  PQ pol = seg == 0 ? qpol : (seg == 1 ? kpol : vpol);
  float unused[ROWS];
  gemv_dot_rows<PQ, PQ, T, K, ROWS, NORM, false, SPLIT, UNROLL>(
      pol, pol, xr, gamma, rows, lane, part, sums, unused, ss);
}

template <typename PQ, typename PK, typename PV, typename T, int K, int ROWS, int NORM,
          int SPLIT, int UNROLL>
METAL_FUNC void qkv_dot(qkv_same_tag<false>, PQ qpol, PK kpol, PV vpol, int seg,
                        const device T* xr, const device T* gamma, thread const uint* rows,
                        uint lane, uint part, thread float* sums, thread float& ss) {
  float unused[ROWS];
  if (seg == 0) {
    gemv_dot_rows<PQ, PQ, T, K, ROWS, NORM, false, SPLIT, UNROLL>(
        qpol, qpol, xr, gamma, rows, lane, part, sums, unused, ss);
  } else if (seg == 1) {
    gemv_dot_rows<PK, PK, T, K, ROWS, NORM, false, SPLIT, UNROLL>(
        kpol, kpol, xr, gamma, rows, lane, part, sums, unused, ss);
  } else {
    gemv_dot_rows<PV, PV, T, K, ROWS, NORM, false, SPLIT, UNROLL>(
        vpol, vpol, xr, gamma, rows, lane, part, sums, unused, ss);
  }
}

template <typename PQ, typename PK, typename PV, typename T, int K, int NQ, int NKV, int D,
          int ROWS, int SIMDS, int SPLIT, bool TRAD, bool GAMMA, bool BIAS, bool JOINT,
          int UNROLL>
METAL_FUNC void qkv_rope_impl(PQ qpol, PK kpol, PV vpol, const device T* x,
                              const device T* gamma, const device T* q_bias,
                              const device T* k_bias, const device T* v_bias,
                              const device float* inv_freq, uint seq_len, int offset,
                              float scale, device T* q_out, device T* k_out, device T* v_out,
                              float eps, uint3 tg_pos, uint sg, uint lane,
                              threadgroup float* partials) {
  // The RMSNorm's sum of squares comes from the GEMV's own x loads (see gemv_rows_impl).
  constexpr int NORM = GAMMA ? GEMV_NORM_WEIGHT : GEMV_NORM_PLAIN;
  static_assert(SPLIT == 1 || SPLIT == SIMDS, "split K: 1 or every SIMD-group");
  const uint m = tg_pos.x;
  const uint block = gemv_row_block(tg_pos);
  const uint v0 = (SPLIT > 1 ? block : block * uint(SIMDS) + sg) * uint(ROWS);
  const uint part = SPLIT > 1 ? sg : 0u;
  if (v0 >= uint(NQ + 2 * NKV)) {
    return;  // the whole SIMD-group (threadgroup when split) is past the last row
  }
  // The projection of this SIMD-group (uniform across its lanes).
  const int seg = v0 < uint(NQ) ? 0 : (v0 < uint(NQ + NKV) ? 1 : 2);
  const uint base = seg == 0 ? 0u : (seg == 1 ? uint(NQ) : uint(NQ + NKV));
  const uint ns = seg == 0 ? uint(NQ) : uint(NKV);
  uint rows[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    uint t = metal::min(v0 - base + uint(r), ns - 1u);
    rows[r] = seg == 2 ? t : qkv_actual_row<D, TRAD>(t);
  }
  float sums[ROWS];
  float ss;
  const device T* xr = x + m * uint(K);
  qkv_dot<PQ, PK, PV, T, K, ROWS, NORM, SPLIT, UNROLL>(
      qkv_same<PQ, PK, PV>(), qpol, kpol, vpol, seg, xr, gamma, rows, lane, part, sums, ss);
  ss = simd_sum(ss);
  if (SPLIT > 1) {
    gemv_split_sum<ROWS, SPLIT, false, true>(sums, sums, ss, sg, lane, partials);
  }
  float acc = gemv_pick<ROWS>(sums, lane) * gemv_inv_rms<K>(ss, eps);
  const uint t = v0 - base + lane;
  // The output element of this lane (clamped: lanes past the rows compute garbage).
  const uint tc = metal::min(t, ns - 1u);
  const uint a = seg == 2 ? tc : qkv_actual_row<D, TRAD>(tc);
  if (BIAS) {
    // Projection biases (Qwen2) come before RoPE.
    const device T* bp = seg == 0 ? q_bias : (seg == 1 ? k_bias : v_bias);
    acc += float(bp[a]);
  }
  if (seg < 2) {
    const float other = simd_shuffle_xor(acc, ushort(1));
    const uint p = (t % uint(D)) >> 1;
    const float pos = float(int(m % seq_len) + offset) * scale;
    const float theta = pos * inv_freq[p];
    const float c = metal::precise::cos(theta);
    const float s = metal::precise::sin(theta);
    acc = (t & 1u) ? (other * s + acc * c) : (acc * c - other * s);
  }
  if (lane < uint(ROWS) && t < ns && part == 0u) {
    if (JOINT) {
      // One K/V output: row m holds its NKV keys, then its NKV values.
      device T* o = seg == 0 ? q_out + m * uint(NQ) : k_out + m * uint(2 * NKV);
      o[(seg == 2 ? uint(NKV) : 0u) + a] = static_cast<T>(acc);
    } else {
      device T* o = seg == 0 ? q_out : (seg == 1 ? k_out : v_out);
      o[m * ns + a] = static_cast<T>(acc);
    }
  }
}

// ---- stage functions (they write q_out, k_out, v_out themselves) ----------------------
// Argument order: policies, x, [norm_weight], eps, [q_bias, k_bias, v_bias] (x's dtype),
// RoPE values, outputs, thread attributes. The *_kv_main variants write K and V to one
// output kv_out (per row of x: its keys, then its values), so that one token's K/V are
// [B, 2 * H_kv, 1, D] for a cache that holds keys and values in one buffer.
template <typename PQ, typename PK, typename PV, typename T, int K, int NQ, int NKV, int D,
          int ROWS, int SIMDS, int SPLIT, bool TRAD, int UNROLL>
METAL_FUNC void qkv_rope_norm_main(
    PQ qpol, PK kpol, PV vpol, const device T* x, const device T* norm_weight, float eps,
    const device float* rope_inv_freq, uint seq_len, int rope_offset, float rope_scale,
    device T* q_out, device T* k_out, device T* v_out, uint3 tg_pos, uint sg, uint lane,
    threadgroup float* gemv_partials) {
  qkv_rope_impl<PQ, PK, PV, T, K, NQ, NKV, D, ROWS, SIMDS, SPLIT, TRAD, true, false, false,
                UNROLL>(
      qpol, kpol, vpol, x, norm_weight, x, x, x, rope_inv_freq, seq_len, rope_offset,
      rope_scale, q_out, k_out, v_out, eps, tg_pos, sg, lane, gemv_partials);
}

template <typename PQ, typename PK, typename PV, typename T, int K, int NQ, int NKV, int D,
          int ROWS, int SIMDS, int SPLIT, bool TRAD, int UNROLL>
METAL_FUNC void qkv_rope_norm_nw_main(
    PQ qpol, PK kpol, PV vpol, const device T* x, float eps,
    const device float* rope_inv_freq, uint seq_len, int rope_offset, float rope_scale,
    device T* q_out, device T* k_out, device T* v_out, uint3 tg_pos, uint sg, uint lane,
    threadgroup float* gemv_partials) {
  qkv_rope_impl<PQ, PK, PV, T, K, NQ, NKV, D, ROWS, SIMDS, SPLIT, TRAD, false, false, false,
                UNROLL>(
      qpol, kpol, vpol, x, x, x, x, x, rope_inv_freq, seq_len, rope_offset,
      rope_scale, q_out, k_out, v_out, eps, tg_pos, sg, lane, gemv_partials);
}

template <typename PQ, typename PK, typename PV, typename T, int K, int NQ, int NKV, int D,
          int ROWS, int SIMDS, int SPLIT, bool TRAD, int UNROLL>
METAL_FUNC void qkv_rope_norm_bias_main(
    PQ qpol, PK kpol, PV vpol, const device T* x, const device T* norm_weight, float eps,
    const device T* q_bias, const device T* k_bias, const device T* v_bias,
    const device float* rope_inv_freq, uint seq_len, int rope_offset, float rope_scale,
    device T* q_out, device T* k_out, device T* v_out, uint3 tg_pos, uint sg, uint lane,
    threadgroup float* gemv_partials) {
  qkv_rope_impl<PQ, PK, PV, T, K, NQ, NKV, D, ROWS, SIMDS, SPLIT, TRAD, true, true, false,
                UNROLL>(
      qpol, kpol, vpol, x, norm_weight, q_bias, k_bias, v_bias, rope_inv_freq, seq_len,
      rope_offset, rope_scale, q_out, k_out, v_out, eps, tg_pos, sg, lane, gemv_partials);
}

template <typename PQ, typename PK, typename PV, typename T, int K, int NQ, int NKV, int D,
          int ROWS, int SIMDS, int SPLIT, bool TRAD, int UNROLL>
METAL_FUNC void qkv_rope_norm_nw_bias_main(
    PQ qpol, PK kpol, PV vpol, const device T* x, float eps, const device T* q_bias,
    const device T* k_bias, const device T* v_bias,
    const device float* rope_inv_freq, uint seq_len, int rope_offset, float rope_scale,
    device T* q_out, device T* k_out, device T* v_out, uint3 tg_pos, uint sg, uint lane,
    threadgroup float* gemv_partials) {
  qkv_rope_impl<PQ, PK, PV, T, K, NQ, NKV, D, ROWS, SIMDS, SPLIT, TRAD, false, true, false,
                UNROLL>(
      qpol, kpol, vpol, x, x, q_bias, k_bias, v_bias, rope_inv_freq, seq_len, rope_offset,
      rope_scale, q_out, k_out, v_out, eps, tg_pos, sg, lane, gemv_partials);
}

template <typename PQ, typename PK, typename PV, typename T, int K, int NQ, int NKV, int D,
          int ROWS, int SIMDS, int SPLIT, bool TRAD, int UNROLL>
METAL_FUNC void qkv_rope_norm_kv_main(
    PQ qpol, PK kpol, PV vpol, const device T* x, const device T* norm_weight, float eps,
    const device float* rope_inv_freq, uint seq_len, int rope_offset, float rope_scale,
    device T* q_out, device T* kv_out, uint3 tg_pos, uint sg, uint lane,
    threadgroup float* gemv_partials) {
  qkv_rope_impl<PQ, PK, PV, T, K, NQ, NKV, D, ROWS, SIMDS, SPLIT, TRAD, true, false, true,
                UNROLL>(
      qpol, kpol, vpol, x, norm_weight, x, x, x, rope_inv_freq, seq_len, rope_offset,
      rope_scale, q_out, kv_out, kv_out, eps, tg_pos, sg, lane, gemv_partials);
}

template <typename PQ, typename PK, typename PV, typename T, int K, int NQ, int NKV, int D,
          int ROWS, int SIMDS, int SPLIT, bool TRAD, int UNROLL>
METAL_FUNC void qkv_rope_norm_nw_kv_main(
    PQ qpol, PK kpol, PV vpol, const device T* x, float eps,
    const device float* rope_inv_freq, uint seq_len, int rope_offset, float rope_scale,
    device T* q_out, device T* kv_out, uint3 tg_pos, uint sg, uint lane,
    threadgroup float* gemv_partials) {
  qkv_rope_impl<PQ, PK, PV, T, K, NQ, NKV, D, ROWS, SIMDS, SPLIT, TRAD, false, false, true,
                UNROLL>(
      qpol, kpol, vpol, x, x, x, x, x, rope_inv_freq, seq_len, rope_offset,
      rope_scale, q_out, kv_out, kv_out, eps, tg_pos, sg, lane, gemv_partials);
}

template <typename PQ, typename PK, typename PV, typename T, int K, int NQ, int NKV, int D,
          int ROWS, int SIMDS, int SPLIT, bool TRAD, int UNROLL>
METAL_FUNC void qkv_rope_norm_bias_kv_main(
    PQ qpol, PK kpol, PV vpol, const device T* x, const device T* norm_weight, float eps,
    const device T* q_bias, const device T* k_bias, const device T* v_bias,
    const device float* rope_inv_freq, uint seq_len, int rope_offset, float rope_scale,
    device T* q_out, device T* kv_out, uint3 tg_pos, uint sg, uint lane,
    threadgroup float* gemv_partials) {
  qkv_rope_impl<PQ, PK, PV, T, K, NQ, NKV, D, ROWS, SIMDS, SPLIT, TRAD, true, true, true,
                UNROLL>(
      qpol, kpol, vpol, x, norm_weight, q_bias, k_bias, v_bias, rope_inv_freq, seq_len,
      rope_offset, rope_scale, q_out, kv_out, kv_out, eps, tg_pos, sg, lane, gemv_partials);
}

template <typename PQ, typename PK, typename PV, typename T, int K, int NQ, int NKV, int D,
          int ROWS, int SIMDS, int SPLIT, bool TRAD, int UNROLL>
METAL_FUNC void qkv_rope_norm_nw_bias_kv_main(
    PQ qpol, PK kpol, PV vpol, const device T* x, float eps, const device T* q_bias,
    const device T* k_bias, const device T* v_bias,
    const device float* rope_inv_freq, uint seq_len, int rope_offset, float rope_scale,
    device T* q_out, device T* kv_out, uint3 tg_pos, uint sg, uint lane,
    threadgroup float* gemv_partials) {
  qkv_rope_impl<PQ, PK, PV, T, K, NQ, NKV, D, ROWS, SIMDS, SPLIT, TRAD, false, true, true,
                UNROLL>(
      qpol, kpol, vpol, x, x, q_bias, k_bias, v_bias, rope_inv_freq, seq_len, rope_offset,
      rope_scale, q_out, kv_out, kv_out, eps, tg_pos, sg, lane, gemv_partials);
}
