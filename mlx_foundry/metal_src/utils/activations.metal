// Activation functions on float values (the epilogues call these).
// They match mlx.nn.silu, mlx.nn.gelu, mlx.nn.gelu_approx and mlx.nn.relu.

// Error function (Metal's standard library has none). The approximation MLX's
// Metal kernels use (maximum error about 1 ulp), from
// https://stackoverflow.com/a/35148199 via mlx/backend/metal/kernels/erf.h.
METAL_FUNC float foundry_erf(float a) {
  float r, s, t, u;
  t = metal::abs(a);
  s = a * a;
  if (t > 0.927734375f) {
    r = metal::fma(-1.72853470e-5f, t, 3.83197126e-4f);
    u = metal::fma(-3.88396438e-3f, t, 2.42546219e-2f);
    r = metal::fma(r, s, u);
    r = metal::fma(r, t, -1.06777877e-1f);
    r = metal::fma(r, t, -6.34846687e-1f);
    r = metal::fma(r, t, -1.28717512e-1f);
    r = metal::fma(r, t, -t);
    r = 1.0f - metal::exp(r);
    r = metal::copysign(r, a);
  } else {
    r = -5.96761703e-4f;
    r = metal::fma(r, s, 4.99119423e-3f);
    r = metal::fma(r, s, -2.67681349e-2f);
    r = metal::fma(r, s, 1.12819925e-1f);
    r = metal::fma(r, s, -3.76125336e-1f);
    r = metal::fma(r, s, 1.28379166e-1f);
    r = metal::fma(r, a, a);
  }
  return r;
}

// silu(x) = x * sigmoid(x)
METAL_FUNC float silu(float x) {
  return x / (1.0f + metal::exp(-x));
}

// gelu(x) = x * (1 + erf(x / sqrt(2))) / 2
METAL_FUNC float gelu(float x) {
  return x * (1.0f + foundry_erf(x * 0.70710678118654752f)) * 0.5f;
}

// gelu_approx(x) = 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))
METAL_FUNC float gelu_approx(float x) {
  return 0.5f * x *
         (1.0f + metal::precise::tanh(0.79788456080286536f * (x + 0.044715f * x * x * x)));
}

// relu(x) = max(x, 0)
METAL_FUNC float relu(float x) {
  return metal::max(x, 0.0f);
}
