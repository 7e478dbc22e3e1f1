// RoPE helpers (usable by fused kernels, e.g. a QKV GEMV epilogue).

// Inverse frequency of rotation pair j of a RoPE over `dims` dimensions:
// base^(-2j / dims) = exp2(-j * log2(base) / (dims / 2)), as MLX computes it.
METAL_FUNC float rope_inv_freq(uint j, uint dims, float base) {
  return metal::exp2(-float(j) / float(dims / 2u) * metal::log2(base));
}

// Rotation angle of pair j at absolute position `position` (scale as in
// mx.fast.rope: theta = scale * position * inv_freq).
METAL_FUNC float rope_theta(float position, float scale, float inv_freq) {
  return scale * position * inv_freq;
}

// Rotates the pair (x1, x2) by theta in place (the forward rotation):
//   x1' = x1 cos - x2 sin,  x2' = x1 sin + x2 cos.
METAL_FUNC void rope_rotate_pair(thread float& x1, thread float& x2, float theta) {
  float c = metal::cos(theta);
  float s = metal::sin(theta);
  float a = x1 * c - x2 * s;
  float b = x1 * s + x2 * c;
  x1 = a;
  x2 = b;
}

// Element indices (within a head vector) of pair j: traditional RoPE rotates
// adjacent elements (2j, 2j + 1); the default rotates (j, j + dims / 2).
METAL_FUNC uint rope_first(uint j, uint dims, bool traditional) {
  return traditional ? 2u * j : j;
}
METAL_FUNC uint rope_second(uint j, uint dims, bool traditional) {
  return traditional ? 2u * j + 1u : j + dims / 2u;
}
