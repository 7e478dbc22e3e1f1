// Decode attention: one new token per sequence against a joint K/V cache.
//
// q [B, H, 1, D]; kv [B, 2 KV, 1, D], this token's keys (heads 0 .. KV-1) and values
// (heads KV .. 2 KV - 1); past [B, 2 KV, CAP, D], a joint K/V cache buffer whose first
// past_len positions hold the earlier tokens (the rest is never read). out [B, H, 1, D]:
// softmax(scale * q K^T) V over the past_len + 1 positions (the new token last), query
// head h reading K/V head h / (H / KV) (grouped-query attention).
//
// One threadgroup of 32 SIMD-groups per (batch, query head) on grid x. SIMD-group s takes
// positions s, s + 32, ...; lane l holds elements [l E, l E + E) of a head (E = ceil(D /
// 32)). A position is one dot product (simd_sum), then an online-softmax update of the
// SIMD-group's running max, sum and weighted values; the loads of its next position are
// issued before that arithmetic. The 32 partial states are merged through threadgroup
// memory (attn_state: 32 + 32 x (D + 1) floats), one output element per thread.

constant constexpr int ATTN_SIMDS = 32;

// Row j of K (or V, by `base`) for this head: a cached position, or the new token.
template <typename T, int D>
METAL_FUNC const device T* attn_row(const device T* past, const device T* fresh,
                                    size_t base, uint j, uint past_len) {
  return j < past_len ? past + base + size_t(j) * size_t(D) : fresh;
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

template <typename T, int H, int KV, int D>
METAL_FUNC void decode_attention_rows(const device T* q, const device T* kv,
                                      const device T* past, device T* out, uint past_len,
                                      uint past_cap, float scale, uint3 tg_pos, uint sg,
                                      uint lane, threadgroup float* attn_state) {
  constexpr int E = (D + 31) / 32;
  constexpr int G = H / KV;
  const uint bh = tg_pos.x;  // b * H + h
  const uint b = bh / uint(H);
  const uint g = (bh % uint(H)) / uint(G);
  const uint n = past_len + 1u;
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

  float m = -INFINITY;
  float l = 0.0f;
  float acc[E];
#pragma unroll
  for (int e = 0; e < E; ++e) {
    acc[e] = 0.0f;
  }
  // Software pipelined: position j's rows are in kc / vc while j + 32's load (clamped
  // to the last position: always in bounds).
  float kc[E];
  float vc[E];
  {
    const uint j0 = metal::min(sg, n - 1u);
    attn_load<T, D, E>(attn_row<T, D>(past, k_new, k_base, j0, past_len), lane, kc);
    attn_load<T, D, E>(attn_row<T, D>(past, v_new, v_base, j0, past_len), lane, vc);
  }
  for (uint j = sg; j < n; j += uint(ATTN_SIMDS)) {
    const uint jn = metal::min(j + uint(ATTN_SIMDS), n - 1u);
    float kn[E];
    float vn[E];
    attn_load<T, D, E>(attn_row<T, D>(past, k_new, k_base, jn, past_len), lane, kn);
    attn_load<T, D, E>(attn_row<T, D>(past, v_new, v_base, jn, past_len), lane, vn);
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

  // Merge. The threadgroup's max first (attn_state[0..31]: each SIMD-group's max), so
  // that each SIMD-group stores its sum and values already rescaled to it, at
  // attn_state[32 + s * (D + 1)]: the final sums then need no exp and no dependent loads.
  if (lane == 0u) {
    attn_state[sg] = m;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const float gm = simd_max(attn_state[lane]);  // lane s reads SIMD-group s's max
  const float w = metal::exp(m - gm);           // 0 for a SIMD-group without positions
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
  const uint t = sg * 32u + lane;
  if (t >= uint(D)) {
    return;
  }
  float total = 0.0f;
  float o = 0.0f;
#pragma unroll
  for (int s = 0; s < ATTN_SIMDS; ++s) {
    total += attn_state[32 + s * (D + 1)];
    o += attn_state[32 + s * (D + 1) + 1 + int(t)];
  }
  out[size_t(bh) * size_t(D) + size_t(t)] = static_cast<T>(o / total);
}
