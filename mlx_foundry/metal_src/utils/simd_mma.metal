// Matrix-vector products of 16-row blocks on the SIMD-group's matrix unit where there is
// one (NVIDIA tensor cores), with the same results from plain arithmetic elsewhere.
//
// The 32 lanes of a SIMD-group form 8 quads: lane = 4 g + t (g = lane / 4, t = lane % 4).
// A block is 16 rows by 16 k-values: lane (g, t) holds rows g and g + 8 at four k-values
// of its own (two half2 pairs per row: a0, a2 of row g and a1, a3 of row g + 8), and the
// vector's values at the same four k-values (b0 pairs with a0 and a1, b1 with a2 and a3).
// Which k a lane's pairs stand for does not matter as long as all four pairs agree: the
// quad of a g covers 16 k-values, and the products are summed over the quad.
//
//   simd_quad_mma(acc, a0, a1, a2, a3, b0, b1)  accumulates one block into acc (opaque);
//   simd_quad_rows(acc)                          float2(row g, row g + 8): the sums over
//                                                the quad of everything accumulated, in
//                                                every lane of the quad.
//
// Every lane must call both (uniform control flow). Products are exact in float (half
// times half) and the sums are float.
//
// CUDA (sm_80 and later): one mma.sync.m16n8k16 (f16 inputs, f32 accumulators) per call.
// The vector is every column of B, so the four accumulators of a lane are row g, row g,
// row g + 8, row g + 8, already summed over the quad. Elsewhere (Metal): each lane sums its
// own products in float (x = row g, z = row g + 8), and simd_quad_rows adds the quad's.
// MLX_FOUNDRY_PORTABLE_MMA selects the plain version on CUDA too (tests compare the two).

#if defined(MLX_FOUNDRY_CUDA) && !defined(MLX_FOUNDRY_PORTABLE_MMA)

METAL_FUNC void simd_quad_mma(thread float4& acc, half2 a0, half2 a1, half2 a2, half2 a3,
                              half2 b0, half2 b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
      : "+f"(acc.x), "+f"(acc.y), "+f"(acc.z), "+f"(acc.w)
      : "r"(as_type<uint>(a0)), "r"(as_type<uint>(a1)), "r"(as_type<uint>(a2)),
        "r"(as_type<uint>(a3)), "r"(as_type<uint>(b0)), "r"(as_type<uint>(b1)));
}

METAL_FUNC float2 simd_quad_rows(float4 acc) {
  return float2(acc.x, acc.z);
}

#else

METAL_FUNC float simd_quad_dot2(half2 a, half2 b) {
  return float(a.x) * float(b.x) + float(a.y) * float(b.y);
}

METAL_FUNC void simd_quad_mma(thread float4& acc, half2 a0, half2 a1, half2 a2, half2 a3,
                              half2 b0, half2 b1) {
  acc.x += simd_quad_dot2(a0, b0) + simd_quad_dot2(a2, b1);
  acc.z += simd_quad_dot2(a1, b0) + simd_quad_dot2(a3, b1);
}

METAL_FUNC float2 simd_quad_rows(float4 acc) {
  float r0 = acc.x;
  float r1 = acc.z;
  r0 += simd_shuffle_xor(r0, ushort(1));
  r1 += simd_shuffle_xor(r1, ushort(1));
  r0 += simd_shuffle_xor(r0, ushort(2));
  r1 += simd_shuffle_xor(r1, ushort(2));
  return float2(r0, r1);
}

#endif
