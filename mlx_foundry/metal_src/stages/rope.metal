// RoPE over x of shape [B, H, L, D] (row-contiguous), like mx.fast.rope.
// Needs utils/rope.metal.
//
// One thread per work item of a row (a head vector of D elements): items
// [0, DIMS/2) rotate a pair; items [DIMS/2, DIMS/2 + D - DIMS) copy one of
// the trailing D - DIMS elements that RoPE leaves alone. Rows (B * H * L of
// them) and items are flattened onto grid x.
// Runtime values: n_rows, seq_len (L), heads (H), base, scale, and the
// position offset (offset[b * offset_stride]: one offset, or one per batch).
template <typename T, int D, int DIMS, bool TRADITIONAL, bool USE_FREQS>
METAL_FUNC void rope_rows(const device T* x, const device int* offset, const device float* freqs,
                          device T* out, uint n_rows, uint seq_len, uint heads,
                          uint offset_stride, float base, float scale, uint3 gid) {
  constexpr uint HALF = uint(DIMS / 2);
  constexpr uint ITEMS = HALF + uint(D - DIMS);
  uint r = gid.x / ITEMS;
  uint j = gid.x - r * ITEMS;
  if (r >= n_rows) {
    return;
  }
  size_t row = size_t(r) * size_t(D);
  if (j >= HALF) {
    uint k = uint(DIMS) + (j - HALF);
    out[row + k] = x[row + k];
    return;
  }
  uint l = r % seq_len;
  uint b = r / (seq_len * heads);
  float position = float(int(l) + offset[b * offset_stride]);
  float inv_freq = USE_FREQS ? 1.0f / freqs[j] : rope_inv_freq(j, uint(DIMS), base);
  uint i1 = rope_first(j, uint(DIMS), TRADITIONAL);
  uint i2 = rope_second(j, uint(DIMS), TRADITIONAL);
  float x1 = float(x[row + i1]);
  float x2 = float(x[row + i2]);
  rope_rotate_pair(x1, x2, rope_theta(position, scale, inv_freq));
  out[row + i1] = static_cast<T>(x1);
  out[row + i2] = static_cast<T>(x2);
}
