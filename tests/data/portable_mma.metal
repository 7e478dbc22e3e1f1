// Selects the plain-arithmetic simd_quad_mma on CUDA too (utils/simd_mma.metal), so that
// tests can compare it with the tensor-core one on the same machine.
#define MLX_FOUNDRY_PORTABLE_MMA 1
