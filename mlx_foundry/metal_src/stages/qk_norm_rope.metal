// Per-head RMSNorm of the queries and keys, then RoPE: the part of Qwen3's attention
// between its projections and the attention itself, over heads in the attention layouts
// q [B, H, L, D] and kv [B, 2 KV, L, D] (keys, then values: what
// norm_qkv_rope(..., rope=False, joint_kv=True) leaves for one token).
//
// One SIMD-group per head row (threadgroup x = row): rows [0, q_rows) are query rows,
// the next rows those of kv (value rows are copied unchanged). Lane l holds elements
// [l E, l E + E) of its row (E = D / 32). The sum of squares is one simd_sum; a RoPE
// pair (p, p + D/2) lies in lanes l and l + 16 (simd_shuffle_xor 16), a traditional pair
// (2p, 2p + 1) in one lane (E even).
//
// As mlx-lm computes it: n = T(T(x * rsqrt(mean(x^2) + eps)) * w) (nn.RMSNorm), then
// RoPE as mx.fast.rope on n: pos = float(l + offset) * scale, theta = pos * inv_freq[p],
// (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos) in float, rounded once; precise sin/cos.

template <typename T, int H, int KV, int D, int L, bool TRAD>
METAL_FUNC void qk_norm_rope_rows(const device T* q, const device T* kv,
                                  const device T* q_norm, const device T* k_norm,
                                  const device float* inv_freq, device T* q_out,
                                  device T* kv_out, float eps, int rope_offset,
                                  float rope_scale, uint q_rows, uint3 tg_pos, uint lane) {
  static_assert(D % 32 == 0 && D <= 256, "qk_norm_rope: head_dim a multiple of 32, <= 256");
  static_assert(!TRAD || (D / 32) % 2 == 0, "qk_norm_rope: traditional RoPE needs D % 64 == 0");
  constexpr int E = D / 32;
  const uint r = tg_pos.x;
  const bool is_q = r < q_rows;
  const uint row = is_q ? r : r - q_rows;
  const device T* src = (is_q ? q : kv) + size_t(row) * size_t(D) + lane * uint(E);
  device T* dst = (is_q ? q_out : kv_out) + size_t(row) * size_t(D) + lane * uint(E);
  if (!is_q && (row / uint(L)) % uint(2 * KV) >= uint(KV)) {
    // A value row (uniform across the SIMD-group): copied.
#pragma unroll
    for (int e = 0; e < E; ++e) {
      dst[e] = src[e];
    }
    return;
  }
  const device T* w = (is_q ? q_norm : k_norm) + lane * uint(E);
  float v[E];
  float ss = 0.0f;
#pragma unroll
  for (int e = 0; e < E; ++e) {
    v[e] = float(src[e]);
    ss = metal::fma(v[e], v[e], ss);
  }
  ss = simd_sum(ss);
  const float inv = metal::rsqrt(ss / float(D) + eps);
#pragma unroll
  for (int e = 0; e < E; ++e) {
    v[e] = float(static_cast<T>(float(static_cast<T>(v[e] * inv)) * float(w[e])));
  }
  const float pos = float(int(row % uint(L)) + rope_offset) * rope_scale;
  if (TRAD) {
#pragma unroll
    for (int e = 0; e < E; e += 2) {
      const float theta = pos * inv_freq[(lane * uint(E) + uint(e)) / 2u];
      const float c = metal::precise::cos(theta);
      const float s = metal::precise::sin(theta);
      const float x1 = v[e];
      const float x2 = v[e + 1];
      v[e] = x1 * c - x2 * s;
      v[e + 1] = x1 * s + x2 * c;
    }
  } else {
    const bool first = lane < 16u;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const float other = simd_shuffle_xor(v[e], ushort(16));
      const float theta = pos * inv_freq[(lane % 16u) * uint(E) + uint(e)];
      const float c = metal::precise::cos(theta);
      const float s = metal::precise::sin(theta);
      v[e] = first ? (v[e] * c - other * s) : (other * s + v[e] * c);
    }
  }
#pragma unroll
  for (int e = 0; e < E; ++e) {
    dst[e] = static_cast<T>(v[e]);
  }
}
