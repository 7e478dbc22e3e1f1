// Test kernels for the core: elementwise, SIMD/threadgroup reduction, and three
// fusable stages.  Templates only; mlx_foundry writes the body that calls them.

// One threadgroup per row: y[row] = sum(x[row, :]) * scale.
template <typename T, int K, int THREADS>
METAL_FUNC void row_sum_kernel(const device T* x, device float* y, float scale, uint3 gid,
                               uint3 lid, uint simd_lane, uint simd_group,
                               threadgroup float* scratch) {
  const device T* row = x + size_t(gid.x) * K;
  float acc = 0.0f;
  for (uint k = lid.x; k < uint(K); k += THREADS) {
    acc += float(row[k]);
  }
  acc = simd_sum(acc);
  if (simd_lane == 0) {
    scratch[simd_group] = acc;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (simd_group == 0) {
    float v = simd_lane < uint(THREADS / 32) ? scratch[simd_lane] : 0.0f;
    v = simd_sum(v);
    if (simd_lane == 0) {
      y[gid.x] = v * scale;
    }
  }
}

// Prologue: the mean of row gid.y of x (K elements), computed by the threadgroup.
template <typename T, int K, int THREADS>
METAL_FUNC void row_mean_stage(const device T* x, thread float& mean, uint3 gid, uint3 lid,
                               uint simd_lane, uint simd_group, threadgroup float* scratch) {
  const device T* row = x + size_t(gid.y) * K;
  float acc = 0.0f;
  for (uint k = lid.x; k < uint(K); k += THREADS) {
    acc += float(row[k]);
  }
  acc = simd_sum(acc);
  if (simd_lane == 0) {
    scratch[simd_group] = acc;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float total = 0.0f;
  for (uint s = 0; s < uint(THREADS / 32); ++s) {
    total += scratch[s];
  }
  mean = total / float(K);
}

// Main: one element per thread, centred by the row mean.
template <typename T, int K, int THREADS>
METAL_FUNC void center_stage(const device T* x, float mean, thread float& acc,
                             thread uint& index, thread bool& valid, uint3 gid, uint3 lid) {
  uint col = gid.x * THREADS + lid.x;
  valid = col < uint(K);
  index = gid.y * K + col;
  acc = valid ? float(x[index]) - mean : 0.0f;
}

// Epilogue: acc = max(acc * scale, 0).
METAL_FUNC void scale_relu_stage(float scale, thread float& acc) {
  acc = metal::max(acc * scale, 0.0f);
}
