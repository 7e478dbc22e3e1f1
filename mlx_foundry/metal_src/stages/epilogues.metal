// Epilogue stages: per-element updates of a GEMV result `acc` (float) in place.
// Needs utils/activations.metal. Lanes holding no element have valid == false.

// RMSNorm: y = W (x * gamma) * inv_rms.
METAL_FUNC void ep_scale(float inv_rms, thread float& acc) {
  acc *= inv_rms;
}

template <typename B>
METAL_FUNC void ep_bias(const device B* bias, uint row, bool valid, thread float& acc) {
  if (valid) {
    acc += float(bias[row]);
  }
}

METAL_FUNC void ep_silu(thread float& acc) {
  acc = silu(acc);
}

METAL_FUNC void ep_gelu(thread float& acc) {
  acc = gelu(acc);
}

METAL_FUNC void ep_gelu_approx(thread float& acc) {
  acc = gelu_approx(acc);
}

METAL_FUNC void ep_relu(thread float& acc) {
  acc = relu(acc);
}

// SwiGLU (mlx-lm's MLP): acc = silu(gate) * up, gate = acc, up = acc2.
METAL_FUNC void ep_swiglu(float acc2, thread float& acc) {
  acc = silu(acc) * acc2;
}

template <typename R>
METAL_FUNC void ep_residual(const device R* residual, uint index, bool valid,
                            thread float& acc) {
  if (valid) {
    acc += float(residual[index]);
  }
}
