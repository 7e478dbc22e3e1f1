// SIMD-group and threadgroup reductions (float accumulation).
//
// A SIMD-group is 32 lanes. Threadgroup reductions take the caller's lane,
// SIMD-group index and number of SIMD-groups, and a threadgroup scratch of at
// least 32 floats declared by the generated body (never inside a function).
// Every thread of the threadgroup must call them (they contain barriers), with
// the threadgroup size a multiple of 32 and at most 1024. Every thread gets
// the result. They begin with a barrier, so one scratch can serve several
// reductions in a row.

METAL_FUNC float threadgroup_sum(float v, threadgroup float* scratch, uint simd_lane,
                                 uint simd_group, uint n_simd) {
  v = simd_sum(v);
  if (n_simd == 1) {
    return v;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (simd_lane == 0) {
    scratch[simd_group] = v;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  v = simd_lane < n_simd ? scratch[simd_lane] : 0.0f;
  return simd_sum(v);
}

METAL_FUNC float threadgroup_max(float v, threadgroup float* scratch, uint simd_lane,
                                 uint simd_group, uint n_simd) {
  v = simd_max(v);
  if (n_simd == 1) {
    return v;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (simd_lane == 0) {
    scratch[simd_group] = v;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  v = simd_lane < n_simd ? scratch[simd_lane] : -INFINITY;
  return simd_max(v);
}

// Sum of a value over lanes of a SIMD-group only (no barrier).
METAL_FUNC float simdgroup_sum(float v) {
  return simd_sum(v);
}
