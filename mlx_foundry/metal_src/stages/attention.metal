// Decode attention: one new token per sequence against a joint K/V cache.
//
// q [B, H, 1, D]; kv [B, 2 KV, 1, D], this token's keys (heads 0 .. KV-1) and values
// (heads KV .. 2 KV - 1); past [B, 2 KV, CAP, D], a joint K/V cache buffer whose first
// past_len positions hold the earlier tokens (the rest is never read; a past_len over
// CAP is taken as CAP, so a bad length kept on the device never reads out of bounds).
// With PEND (1), pend [B, 2 KV, 1, D] is one more token between them, at position
// past_len: a token not yet written to the buffer (the compiled decode step writes each
// token's keys and values during the next token, beside its blocks); without (0) pend is
// never read.
// out [B, H, 1, D]: softmax(scale * q K^T) V over the past_len + PEND + 1 positions (the
// new token last), query head h reading K/V head h / (H / KV) (grouped-query attention).
//
// A threadgroup of SIMDS SIMD-groups works on one (batch, query head) (grid x) and a
// range of positions. SIMD-group s takes positions lo + s, lo + s + SIMDS, ...; lane l
// holds elements [l E, l E + E) of a head (E = ceil(D / 32)). A position is one dot
// product (simd_sum), then an online-softmax update of the SIMD-group's running max, sum
// and weighted values; the loads of its next position are issued before that
// arithmetic. The SIMD-groups' states are merged through threadgroup memory (attn_state:
// 32 + SIMDS x (D + 1) floats), one output element per thread.
//
// Two forms:
// - decode_attention_rows: one threadgroup of 32 SIMD-groups takes every position and
//   writes the output (short contexts);
// - decode_attention_split + decode_attention_combine: threadgroup y of a head takes
//   positions [y CHUNK, (y + 1) CHUNK) and writes its unnormalised state (max, sum,
//   weighted values: D + 2 floats) to `partials` [B H, splits, D + 2]; the combine
//   kernel merges a head's splits (long contexts: many more threadgroups).

// Row j of K (or V, by `base`) for this head: a cached position, the pending token
// (j == past_len, with PEND), or the new token.
template <typename T, int D, int PEND>
METAL_FUNC const device T* attn_row(const device T* past, const device T* pend,
                                    const device T* fresh, size_t base, uint j,
                                    uint past_len) {
  return j < past_len ? past + base + size_t(j) * size_t(D)
                      : (PEND != 0 && j == past_len ? pend : fresh);
}

// This lane's E elements of a row (0 past D).
template <typename T, int D, int E>
METAL_FUNC void attn_load(const device T* r, uint lane, thread float* v) {
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const uint d = lane * uint(E) + uint(e);
    v[e] = (D % 32 == 0 || d < uint(D)) ? float(r[d]) : 0.0f;
  }
}

// Attention of query head bh over positions [lo, hi) of its K/V head. Every thread of
// the threadgroup must call it. Returns in gm the threadgroup's max score (-inf when the
// range is empty) and leaves at attn_state[32 + s * (D + 1)] SIMD-group s's sum of
// exp(score - gm), then its sums of exp(score - gm) * value (D floats).
template <typename T, int H, int KV, int D, int SIMDS, int PEND>
METAL_FUNC void attn_range(const device T* q, const device T* kv, const device T* pend,
                           const device T* past, uint past_len, uint past_cap, float scale,
                           uint bh, uint lo, uint hi, uint sg, uint lane,
                           threadgroup float* attn_state, thread float& gm) {
  constexpr int E = (D + 31) / 32;
  constexpr int G = H / KV;
  const uint b = bh / uint(H);
  const uint g = (bh % uint(H)) / uint(G);
  float qv[E];
  attn_load<T, D, E>(q + size_t(bh) * size_t(D), lane, qv);
#pragma unroll
  for (int e = 0; e < E; ++e) {
    qv[e] *= scale;
  }
  const size_t k_head = size_t(b) * size_t(2 * KV) + size_t(g);
  const size_t k_base = k_head * size_t(past_cap) * size_t(D);
  const size_t v_base = (k_head + size_t(KV)) * size_t(past_cap) * size_t(D);
  const device T* k_new = kv + k_head * size_t(D);
  const device T* v_new = kv + (k_head + size_t(KV)) * size_t(D);
  const device T* k_pend = pend + k_head * size_t(D);
  const device T* v_pend = pend + (k_head + size_t(KV)) * size_t(D);

  float m = -INFINITY;
  float l = 0.0f;
  float acc[E];
#pragma unroll
  for (int e = 0; e < E; ++e) {
    acc[e] = 0.0f;
  }
  if (lo < hi) {
    // Software pipelined: position j's rows are in kc / vc while j + SIMDS's load
    // (clamped to the last position of the range: always in bounds).
    float kc[E];
    float vc[E];
    const uint j0 = metal::min(lo + sg, hi - 1u);
    attn_load<T, D, E>(attn_row<T, D, PEND>(past, k_pend, k_new, k_base, j0, past_len), lane,
                       kc);
    attn_load<T, D, E>(attn_row<T, D, PEND>(past, v_pend, v_new, v_base, j0, past_len), lane,
                       vc);
    for (uint j = lo + sg; j < hi; j += uint(SIMDS)) {
      const uint jn = metal::min(j + uint(SIMDS), hi - 1u);
      float kn[E];
      float vn[E];
      attn_load<T, D, E>(attn_row<T, D, PEND>(past, k_pend, k_new, k_base, jn, past_len),
                         lane, kn);
      attn_load<T, D, E>(attn_row<T, D, PEND>(past, v_pend, v_new, v_base, jn, past_len),
                         lane, vn);
      float s = 0.0f;
#pragma unroll
      for (int e = 0; e < E; ++e) {
        s = metal::fma(qv[e], kc[e], s);
      }
      s = simd_sum(s);
      const float mn = metal::max(m, s);
      const float corr = metal::exp(m - mn);  // 0 for the first position (m = -inf)
      const float p = metal::exp(s - mn);
      l = l * corr + p;
#pragma unroll
      for (int e = 0; e < E; ++e) {
        acc[e] = metal::fma(p, vc[e], acc[e] * corr);
        kc[e] = kn[e];
        vc[e] = vn[e];
      }
      m = mn;
    }
  }

  // The threadgroup's max first (attn_state[0 .. SIMDS-1]: each SIMD-group's max), so
  // that each SIMD-group stores its sum and values already rescaled to it: the final
  // sums then need no exp and no dependent loads.
  if (lane == 0u) {
    attn_state[sg] = m;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  gm = simd_max(lane < uint(SIMDS) ? attn_state[lane] : -INFINITY);
  // 0 for a SIMD-group without positions; an empty range has no scale at all.
  const float w = gm == -INFINITY ? 0.0f : metal::exp(m - gm);
  threadgroup float* mine = attn_state + 32u + sg * uint(D + 1);
  if (lane == 0u) {
    mine[0] = l * w;
  }
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const uint d = lane * uint(E) + uint(e);
    if (D % 32 == 0 || d < uint(D)) {
      mine[1u + d] = acc[e] * w;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

// Thread t's sums over the SIMD-groups' rescaled states: total (the softmax
// denominator) and o (its output element, t < D).
template <int D, int SIMDS>
METAL_FUNC void attn_sums(threadgroup const float* attn_state, uint t, thread float& total,
                          thread float& o) {
  total = 0.0f;
  o = 0.0f;
#pragma unroll
  for (int s = 0; s < SIMDS; ++s) {
    total += attn_state[32 + s * (D + 1)];
    o += attn_state[32 + s * (D + 1) + 1 + int(t)];
  }
}

template <typename T, int H, int KV, int D, int PEND>
METAL_FUNC void decode_attention_rows(const device T* q, const device T* kv,
                                      const device T* pend, const device T* past,
                                      device T* out, uint past_len,
                                      uint past_cap, float scale, uint3 tg_pos, uint sg,
                                      uint lane, threadgroup float* attn_state) {
  const uint bh = tg_pos.x;  // b * H + h
  // A length kept on the device is unchecked on the host: never read past the cache.
  past_len = metal::min(past_len, past_cap);
  float gm;
  attn_range<T, H, KV, D, 32, PEND>(q, kv, pend, past, past_len, past_cap, scale, bh, 0u,
                                    past_len + uint(PEND) + 1u, sg, lane, attn_state, gm);
  const uint t = sg * 32u + lane;
  if (t >= uint(D)) {
    return;
  }
  float total;
  float o;
  attn_sums<D, 32>(attn_state, t, total, o);
  out[size_t(bh) * size_t(D) + size_t(t)] = static_cast<T>(o / total);
}

template <typename T, int H, int KV, int D, int SIMDS, int CHUNK, int PEND>
METAL_FUNC void decode_attention_split(const device T* q, const device T* kv,
                                       const device T* pend, const device T* past,
                                       device float* partials,
                                       uint past_len, uint past_cap, float scale,
                                       uint splits, uint3 tg_pos, uint sg, uint lane,
                                       threadgroup float* attn_state) {
  const uint bh = tg_pos.x;
  past_len = metal::min(past_len, past_cap);  // as in decode_attention_rows
  const uint n = past_len + uint(PEND) + 1u;
  const uint lo = metal::min(tg_pos.y * uint(CHUNK), n);
  const uint hi = metal::min(lo + uint(CHUNK), n);
  float gm;
  attn_range<T, H, KV, D, SIMDS, PEND>(q, kv, pend, past, past_len, past_cap, scale, bh, lo,
                                       hi, sg, lane, attn_state, gm);
  device float* st = partials + (size_t(bh) * size_t(splits) + size_t(tg_pos.y)) *
                                    size_t(D + 2);
  const uint t = sg * 32u + lane;
  if (t < uint(D)) {
    float total;
    float o;
    attn_sums<D, SIMDS>(attn_state, t, total, o);
    st[2u + t] = o;
    if (t == 0u) {
      st[0] = gm;
      st[1] = total;
    }
  }
}

// One threadgroup per query head (grid x); thread t < D merges element t of the head's
// `splits` states.
template <typename T, int D>
METAL_FUNC void decode_attention_combine(const device float* partials, device T* out,
                                         uint splits, uint3 tg_pos, uint tid) {
  const uint bh = tg_pos.x;
  if (tid >= uint(D)) {
    return;
  }
  const device float* st = partials + size_t(bh) * size_t(splits) * size_t(D + 2);
  float gm = -INFINITY;
  for (uint y = 0; y < splits; ++y) {
    gm = metal::max(gm, st[size_t(y) * size_t(D + 2)]);
  }
  float total = 0.0f;
  float o = 0.0f;
  for (uint y = 0; y < splits; ++y) {
    const device float* sy = st + size_t(y) * size_t(D + 2);
    const float w = sy[0] == -INFINITY ? 0.0f : metal::exp(sy[0] - gm);
    total = metal::fma(w, sy[1], total);
    o = metal::fma(w, sy[2 + tid], o);
  }
  out[size_t(bh) * size_t(D) + size_t(tid)] = static_cast<T>(o / total);
}
