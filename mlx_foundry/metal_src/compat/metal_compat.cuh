// mlx_foundry Metal-compat prelude for CUDA (NVRTC via mx.fast.cuda_kernel).
//
// Gives CUDA the Metal dialect of DESIGN.md ("The Metal dialect"), so that one
// kernel text (header + body) written in Metal runs on MLX's Metal backend and
// on MLX's CUDA backend.
//
// HOW THE TEXT IS ASSEMBLED ON CUDA (see mlx_foundry/backends/cuda_compat.py):
//
//   #include "mlx/backend/cuda/device/utils.cuh"      <- MLX
//   #include <cooperative_groups.h>                   <- MLX
//   <this prelude>                                    <- header=, part 1
//   namespace mlx::core::cu {                         <- header=, wrap_header()
//   <our Metal-dialect header: structs, policies, stages>
//   }                                                 <- header=, wrap_header()
//   namespace mlx::core::cu { __global__ void custom_kernel_NAME(...) {
//     constexpr int X = ..; using T = __half;         <- MLX (template args)
//     <attribute_preamble(body)> <body>               <- source=
//   } }
//
// RULES FOR METAL-DIALECT SOURCES (the contract this prelude implements):
//
// 1. METAL_FUNC. Every function in a .metal header (free functions, templates,
//    member functions of helper structs) is declared with METAL_FUNC, e.g.
//        template <typename T> METAL_FUNC float load_x(const device T* p, uint i);
//    On Metal, metal_stdlib defines METAL_FUNC as
//    `inline __attribute__((__always_inline__))`; here it is
//    `__device__ __forceinline__`. (MLX's NVRTC call passes
//    --device-as-default-execution-space, so plain `inline` would also work
//    there, but not under nvcc; always write METAL_FUNC.)
// 2. Metal types shadow CUDA's. CUDA has global aggregates `float4`, `uint3`,
//    `half2`, ... without Metal semantics. This prelude defines the Metal
//    vector types (and everything else) inside namespace mlx::core::cu, where
//    MLX's kernel body lives; our header is wrapped into that namespace by
//    wrap_header(). Unqualified `float4` in header and body therefore means the
//    Metal type. Do not put `#include` lines in the header.
// 3. Address spaces. `device`, `thread`, `threadgroup` are empty macros;
//    `constant` is `const` (MLX passes every input as `const T*`, so a
//    `constant T*` parameter must accept it). `const constant T*` gives a
//    duplicate `const`, which is legal here (warning #83 is suppressed).
//    These four words are therefore reserved: never use them as identifiers.
// 4. Threadgroup memory. `threadgroup` is empty, so a body must NOT declare
//    `threadgroup float buf[N];` on CUDA (it would silently become a per-thread
//    array): the generator emits cuda_compat.shared_declaration() instead
//    (`__shared__ alignas(16) float buf[N];`), and passes pointers to stages.
//    cuda_compat.check_body() rejects such declarations.
// 5. Thread attributes (thread_position_in_grid, ...) are kernel parameters on
//    Metal; on CUDA cuda_compat.attribute_preamble(body) declares each one the
//    body mentions as a const local of the Metal type, computed from
//    threadIdx/blockIdx/blockDim/gridDim (helpers in namespace metal_compat
//    below). threads_per_grid / grid_size are gridDim*blockDim (CUDA rounds
//    the grid up to whole blocks: kernels bounds-check anyway).
// 6. SIMD-groups are warps of 32 lanes. simd_* functions use the full warp
//    mask: call them from all 32 lanes of a warp (uniform control flow, thread
//    counts per threadgroup a multiple of 32).
// 7. Scalars: `half` is __half, `bfloat` is __nv_bfloat16 (the types MLX
//    emits for `using T = ...`). Mixed half/bfloat with float arithmetic and
//    comparisons promote to float as in Metal; with integers they stay half.
//    Not supported: `1.0h` literals (write half(1.0f)), `c ? h : 0.0f`
//    (mixed half/float in ?: is ambiguous in C++: cast one side).
// 8. Not supported (yet): swizzles (.xy, .xyz, ...), .rgba names, packed_*
//    types, simdgroup_matrix, quad_* functions, texture/sampler types,
//    threadgroup variables declared inside functions, atomics.

#ifndef MLX_FOUNDRY_METAL_COMPAT_CUH
#define MLX_FOUNDRY_METAL_COMPAT_CUH

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda/std/cstdint>
#include <cuda/std/limits>
#include <cuda/std/type_traits>

// duplicate type qualifier (`const constant T*` -> `const const T*`).
#pragma nv_diag_suppress 83

#define MLX_FOUNDRY_CUDA 1
#define MLX_FOUNDRY_SIMD_SIZE 32

#ifndef METAL_FUNC
#define METAL_FUNC __device__ __forceinline__
#endif

// Address-space qualifiers.
#define device
#define thread
#define threadgroup
#define constant const

// CUDA spells __device__ as __location__(device) -> __attribute__((device)),
// and __constant__ likewise: with `device`/`constant` now macros, those
// expansions would break. Respell them with the reserved attribute names
// (GNU attribute syntax treats __device__ as device).
#undef __device__
#define __device__ __attribute__((__device__))
#undef __constant__
#define __constant__ __attribute__((__constant__))

// Metal stdlib constants.
#ifndef INFINITY
#define INFINITY (__int_as_float(0x7f800000))
#endif
#ifndef NAN
#define NAN (__int_as_float(0x7fffffff))
#endif
#ifndef HUGE_VALF
#define HUGE_VALF INFINITY
#endif
#ifndef FLT_MAX
#define FLT_MAX 3.402823466e+38F
#endif
#ifndef FLT_MIN
#define FLT_MIN 1.175494351e-38F
#endif
#ifndef FLT_EPSILON
#define FLT_EPSILON 1.192092896e-07F
#endif
#ifndef MAXFLOAT
#define MAXFLOAT FLT_MAX
#endif
#ifndef HALF_MAX
#define HALF_MAX 65504.0f
#endif
#ifndef M_PI_F
#define M_PI_F 3.14159265358979323846264338327950288f
#define M_PI_2_F 1.57079632679489661923132169163975144f
#define M_E_F 2.71828182845904523536028747135266250f
#define M_LOG2E_F 1.44269504088896340735992468100189214f
#define M_LOG10E_F 0.434294481903251827651128918916605082f
#define M_LN2_F 0.693147180559945309417232121458176568f
#define M_LN10_F 2.30258509299404568401799145468436421f
#define M_SQRT2_F 1.41421356237309504880168872420969808f
#define M_SQRT1_2_F 0.707106781186547524400844362104849039f
#endif

///////////////////////////////////////////////////////////////////////////////
// half / bfloat scalar arithmetic mixed with float and integers.
// cuda_fp16/cuda_bf16 only define (__half, __half) operators; `h * 2.0f` is
// ambiguous in C++. Metal promotes half op float to float and keeps half op
// int as half. These live in the global namespace, where ADL finds them.
///////////////////////////////////////////////////////////////////////////////

#define MFC_MIXED_SCALAR_OPS(H)                                                 \
  __device__ __forceinline__ float operator+(H a, float b) { return float(a) + b; } \
  __device__ __forceinline__ float operator-(H a, float b) { return float(a) - b; } \
  __device__ __forceinline__ float operator*(H a, float b) { return float(a) * b; } \
  __device__ __forceinline__ float operator/(H a, float b) { return float(a) / b; } \
  __device__ __forceinline__ float operator+(float a, H b) { return a + float(b); } \
  __device__ __forceinline__ float operator-(float a, H b) { return a - float(b); } \
  __device__ __forceinline__ float operator*(float a, H b) { return a * float(b); } \
  __device__ __forceinline__ float operator/(float a, H b) { return a / float(b); } \
  __device__ __forceinline__ bool operator<(H a, float b) { return float(a) < b; }   \
  __device__ __forceinline__ bool operator>(H a, float b) { return float(a) > b; }   \
  __device__ __forceinline__ bool operator<=(H a, float b) { return float(a) <= b; } \
  __device__ __forceinline__ bool operator>=(H a, float b) { return float(a) >= b; } \
  __device__ __forceinline__ bool operator==(H a, float b) { return float(a) == b; } \
  __device__ __forceinline__ bool operator!=(H a, float b) { return float(a) != b; } \
  __device__ __forceinline__ bool operator<(float a, H b) { return a < float(b); }   \
  __device__ __forceinline__ bool operator>(float a, H b) { return a > float(b); }   \
  __device__ __forceinline__ bool operator<=(float a, H b) { return a <= float(b); } \
  __device__ __forceinline__ bool operator>=(float a, H b) { return a >= float(b); } \
  __device__ __forceinline__ bool operator==(float a, H b) { return a == float(b); } \
  __device__ __forceinline__ bool operator!=(float a, H b) { return a != float(b); } \
  template <typename I, typename = cuda::std::enable_if_t<cuda::std::is_integral_v<I>>> \
  __device__ __forceinline__ H operator+(H a, I b) { return a + H(b); }               \
  template <typename I, typename = cuda::std::enable_if_t<cuda::std::is_integral_v<I>>> \
  __device__ __forceinline__ H operator-(H a, I b) { return a - H(b); }               \
  template <typename I, typename = cuda::std::enable_if_t<cuda::std::is_integral_v<I>>> \
  __device__ __forceinline__ H operator*(H a, I b) { return a * H(b); }               \
  template <typename I, typename = cuda::std::enable_if_t<cuda::std::is_integral_v<I>>> \
  __device__ __forceinline__ H operator/(H a, I b) { return a / H(b); }               \
  template <typename I, typename = cuda::std::enable_if_t<cuda::std::is_integral_v<I>>> \
  __device__ __forceinline__ H operator+(I a, H b) { return H(a) + b; }               \
  template <typename I, typename = cuda::std::enable_if_t<cuda::std::is_integral_v<I>>> \
  __device__ __forceinline__ H operator-(I a, H b) { return H(a) - b; }               \
  template <typename I, typename = cuda::std::enable_if_t<cuda::std::is_integral_v<I>>> \
  __device__ __forceinline__ H operator*(I a, H b) { return H(a) * b; }               \
  template <typename I, typename = cuda::std::enable_if_t<cuda::std::is_integral_v<I>>> \
  __device__ __forceinline__ H operator/(I a, H b) { return H(a) / b; }               \
  template <typename I, typename = cuda::std::enable_if_t<cuda::std::is_integral_v<I>>> \
  __device__ __forceinline__ bool operator<(H a, I b) { return float(a) < float(b); }  \
  template <typename I, typename = cuda::std::enable_if_t<cuda::std::is_integral_v<I>>> \
  __device__ __forceinline__ bool operator>(H a, I b) { return float(a) > float(b); }  \
  template <typename I, typename = cuda::std::enable_if_t<cuda::std::is_integral_v<I>>> \
  __device__ __forceinline__ bool operator<=(H a, I b) { return float(a) <= float(b); } \
  template <typename I, typename = cuda::std::enable_if_t<cuda::std::is_integral_v<I>>> \
  __device__ __forceinline__ bool operator>=(H a, I b) { return float(a) >= float(b); } \
  template <typename I, typename = cuda::std::enable_if_t<cuda::std::is_integral_v<I>>> \
  __device__ __forceinline__ bool operator==(H a, I b) { return float(a) == float(b); } \
  template <typename I, typename = cuda::std::enable_if_t<cuda::std::is_integral_v<I>>> \
  __device__ __forceinline__ bool operator!=(H a, I b) { return float(a) != float(b); }

MFC_MIXED_SCALAR_OPS(__half)
MFC_MIXED_SCALAR_OPS(__nv_bfloat16)
#undef MFC_MIXED_SCALAR_OPS

namespace mlx::core::cu {

///////////////////////////////////////////////////////////////////////////////
// Scalar types
///////////////////////////////////////////////////////////////////////////////

using half = __half;
using bfloat = __nv_bfloat16;
using float16_t = __half;
using bfloat16_t = __nv_bfloat16;
using uchar = unsigned char;
using ushort = unsigned short;
using uint = unsigned int;
using ulong = unsigned long;
using cuda::std::int8_t;
using cuda::std::int16_t;
using cuda::std::int32_t;
using cuda::std::int64_t;
using cuda::std::uint8_t;
using cuda::std::uint16_t;
using cuda::std::uint32_t;
using cuda::std::uint64_t;
using cuda::std::size_t;

namespace metal_compat {

template <typename T>
inline constexpr bool is_scalar_v = cuda::std::is_arithmetic_v<T> ||
    cuda::std::is_same_v<T, __half> || cuda::std::is_same_v<T, __nv_bfloat16>;

template <typename T>
inline constexpr bool is_float_like_v = cuda::std::is_floating_point_v<T> ||
    cuda::std::is_same_v<T, __half> || cuda::std::is_same_v<T, __nv_bfloat16>;

} // namespace metal_compat

///////////////////////////////////////////////////////////////////////////////
// Vector types: vec<T, N>, float4, half4, uint2, ...
// Size and alignment follow Metal: sizeof(vec<T,3>) == sizeof(vec<T,4>).
///////////////////////////////////////////////////////////////////////////////

template <typename T, int N>
struct vec;

#define MFC_VEC_COMMON(N)                                                     \
  using value_type = T;                                                       \
  static constexpr int size = N;                                              \
  vec() = default;                                                            \
  /* splat; implicit like Metal's scalar-to-vector conversion */              \
  template <typename S,                                                       \
            typename = cuda::std::enable_if_t<metal_compat::is_scalar_v<S>>>  \
  __host__ __device__ __forceinline__ vec(S s) : vec(vec_splat_tag{}, T(s)) {} \
  /* converting constructor: float4(half4_value). By value: one wide load. */\
  template <typename U>                                                       \
  __host__ __device__ __forceinline__ explicit vec(vec<U, N> o)        \
      : vec(vec_convert_tag{}, o) {}                                          \
  __device__ __forceinline__ T& operator[](int i) { return (&x)[i]; }         \
  __device__ __forceinline__ const T& operator[](int i) const { return (&x)[i]; }

struct vec_splat_tag {};
struct vec_convert_tag {};

template <typename T>
struct alignas(2 * sizeof(T)) vec<T, 2> {
  T x, y;
  MFC_VEC_COMMON(2)
  __host__ __device__ __forceinline__ vec(T a, T b) : x(a), y(b) {}

 private:
  __host__ __device__ __forceinline__ vec(vec_splat_tag, T s) : x(s), y(s) {}
  template <typename U>
  __host__ __device__ __forceinline__ vec(vec_convert_tag, vec<U, 2> o)
      : x(static_cast<T>(o.x)), y(static_cast<T>(o.y)) {}
};

template <typename T>
struct alignas(4 * sizeof(T)) vec<T, 3> {
  T x, y, z;
  MFC_VEC_COMMON(3)
  __host__ __device__ __forceinline__ vec(T a, T b, T c) : x(a), y(b), z(c) {}
  __host__ __device__ __forceinline__ vec(vec<T, 2> a, T c)
      : x(a.x), y(a.y), z(c) {}
  __host__ __device__ __forceinline__ vec(T a, vec<T, 2> b)
      : x(a), y(b.x), z(b.y) {}

 private:
  __host__ __device__ __forceinline__ vec(vec_splat_tag, T s)
      : x(s), y(s), z(s) {}
  template <typename U>
  __host__ __device__ __forceinline__ vec(vec_convert_tag, vec<U, 3> o)
      : x(static_cast<T>(o.x)), y(static_cast<T>(o.y)),
        z(static_cast<T>(o.z)) {}
};

template <typename T>
struct alignas(4 * sizeof(T)) vec<T, 4> {
  T x, y, z, w;
  MFC_VEC_COMMON(4)
  __host__ __device__ __forceinline__ vec(T a, T b, T c, T d)
      : x(a), y(b), z(c), w(d) {}
  __host__ __device__ __forceinline__ vec(vec<T, 2> a, vec<T, 2> b)
      : x(a.x), y(a.y), z(b.x), w(b.y) {}
  __host__ __device__ __forceinline__ vec(vec<T, 2> a, T c, T d)
      : x(a.x), y(a.y), z(c), w(d) {}
  __host__ __device__ __forceinline__ vec(T a, vec<T, 2> b, T d)
      : x(a), y(b.x), z(b.y), w(d) {}
  __host__ __device__ __forceinline__ vec(T a, T b, vec<T, 2> c)
      : x(a), y(b), z(c.x), w(c.y) {}
  __host__ __device__ __forceinline__ vec(vec<T, 3> a, T d)
      : x(a.x), y(a.y), z(a.z), w(d) {}
  __host__ __device__ __forceinline__ vec(T a, vec<T, 3> b)
      : x(a), y(b.x), z(b.y), w(b.z) {}

 private:
  __host__ __device__ __forceinline__ vec(vec_splat_tag, T s)
      : x(s), y(s), z(s), w(s) {}
  template <typename U>
  __host__ __device__ __forceinline__ vec(vec_convert_tag, vec<U, 4> o)
      : x(static_cast<T>(o.x)), y(static_cast<T>(o.y)),
        z(static_cast<T>(o.z)), w(static_cast<T>(o.w)) {}
};

#undef MFC_VEC_COMMON

#define MFC_VEC_NAMES(P, T) \
  using P##2 = vec<T, 2>;   \
  using P##3 = vec<T, 3>;   \
  using P##4 = vec<T, 4>;

MFC_VEC_NAMES(float, float)
MFC_VEC_NAMES(half, __half)
MFC_VEC_NAMES(bfloat, __nv_bfloat16)
MFC_VEC_NAMES(int, int)
MFC_VEC_NAMES(uint, unsigned int)
MFC_VEC_NAMES(short, short)
MFC_VEC_NAMES(ushort, unsigned short)
MFC_VEC_NAMES(char, char)
MFC_VEC_NAMES(uchar, unsigned char)
MFC_VEC_NAMES(long, long)
MFC_VEC_NAMES(ulong, unsigned long)
MFC_VEC_NAMES(bool, bool)
#undef MFC_VEC_NAMES

namespace metal_compat {
template <typename T>
struct is_vec : cuda::std::false_type {};
template <typename T, int N>
struct is_vec<vec<T, N>> : cuda::std::true_type {};
template <typename T>
inline constexpr bool is_vec_v = is_vec<T>::value;

template <typename T, int N, typename F>
__device__ __forceinline__ auto map(vec<T, N> a, F f) {
  using R = decltype(f(a.x));
  vec<R, N> r;
#pragma unroll
  for (int i = 0; i < N; ++i) r[i] = f(a[i]);
  return r;
}
template <typename T, int N, typename F>
__device__ __forceinline__ auto map2(vec<T, N> a, vec<T, N> b, F f) {
  using R = decltype(f(a.x, b.x));
  vec<R, N> r;
#pragma unroll
  for (int i = 0; i < N; ++i) r[i] = f(a[i], b[i]);
  return r;
}
} // namespace metal_compat

// Elementwise arithmetic: vec op vec, vec op scalar, scalar op vec.
#define MFC_VEC_BINOP(OP, OPEQ)                                                  \
  template <typename T, int N>                                                   \
  __device__ __forceinline__ vec<T, N> operator OP(vec<T, N> a, vec<T, N> b) { \
    _Pragma("unroll") for (int i = 0; i < N; ++i) a[i] = T(a[i] OP b[i]);        \
    return a;                                                                    \
  }                                                                              \
  template <typename T, int N, typename S,                                       \
            typename = cuda::std::enable_if_t<metal_compat::is_scalar_v<S>>>     \
  __device__ __forceinline__ vec<T, N> operator OP(vec<T, N> a, S s) {           \
    const T t = T(s);                                                            \
    _Pragma("unroll") for (int i = 0; i < N; ++i) a[i] = T(a[i] OP t);           \
    return a;                                                                    \
  }                                                                              \
  template <typename T, int N, typename S,                                       \
            typename = cuda::std::enable_if_t<metal_compat::is_scalar_v<S>>>     \
  __device__ __forceinline__ vec<T, N> operator OP(S s, vec<T, N> a) {           \
    const T t = T(s);                                                            \
    _Pragma("unroll") for (int i = 0; i < N; ++i) a[i] = T(t OP a[i]);           \
    return a;                                                                    \
  }                                                                              \
  template <typename T, int N>                                                   \
  __device__ __forceinline__ vec<T, N>& operator OPEQ(vec<T, N>& a, vec<T, N> b) { \
    a = a OP b;                                                                  \
    return a;                                                                    \
  }                                                                              \
  template <typename T, int N, typename S,                                       \
            typename = cuda::std::enable_if_t<metal_compat::is_scalar_v<S>>>     \
  __device__ __forceinline__ vec<T, N>& operator OPEQ(vec<T, N>& a, S s) {       \
    a = a OP s;                                                                  \
    return a;                                                                    \
  }

MFC_VEC_BINOP(+, +=)
MFC_VEC_BINOP(-, -=)
MFC_VEC_BINOP(*, *=)
MFC_VEC_BINOP(/, /=)
MFC_VEC_BINOP(%, %=)
MFC_VEC_BINOP(&, &=)
MFC_VEC_BINOP(|, |=)
MFC_VEC_BINOP(^, ^=)
MFC_VEC_BINOP(<<, <<=)
MFC_VEC_BINOP(>>, >>=)
#undef MFC_VEC_BINOP

template <typename T, int N>
__device__ __forceinline__ vec<T, N> operator-(vec<T, N> a) {
#pragma unroll
  for (int i = 0; i < N; ++i) a[i] = T(-a[i]);
  return a;
}
template <typename T, int N>
__device__ __forceinline__ vec<T, N> operator+(vec<T, N> a) {
  return a;
}
template <typename T, int N>
__device__ __forceinline__ vec<T, N> operator~(vec<T, N> a) {
#pragma unroll
  for (int i = 0; i < N; ++i) a[i] = T(~a[i]);
  return a;
}

// Packed half2 arithmetic. vec<__half, 2> has __half2's layout (two halves, 4-byte
// aligned), but the templates above work component by component and leave the packing to
// the compiler, which often emits two scalar HADD/HMUL/HFMA. These exact-match
// overloads (preferred to the templates) give one packed HADD2/HSUB2/HMUL2/HNEG2 each;
// metal::fma(half2, half2, half2) below gives one HFMA2. Same rounding as the component
// operations (round to nearest per component).
namespace metal_compat {
__device__ __forceinline__ __half2 to_half2(vec<__half, 2> v) {
  __half2 r;
  memcpy(&r, &v, sizeof(r));
  return r;
}
__device__ __forceinline__ vec<__half, 2> from_half2(__half2 h) {
  vec<__half, 2> r;
  memcpy(&r, &h, sizeof(r));
  return r;
}
} // namespace metal_compat

__device__ __forceinline__ vec<__half, 2> operator+(vec<__half, 2> a, vec<__half, 2> b) {
  return metal_compat::from_half2(__hadd2(metal_compat::to_half2(a), metal_compat::to_half2(b)));
}
__device__ __forceinline__ vec<__half, 2> operator-(vec<__half, 2> a, vec<__half, 2> b) {
  return metal_compat::from_half2(__hsub2(metal_compat::to_half2(a), metal_compat::to_half2(b)));
}
__device__ __forceinline__ vec<__half, 2> operator*(vec<__half, 2> a, vec<__half, 2> b) {
  return metal_compat::from_half2(__hmul2(metal_compat::to_half2(a), metal_compat::to_half2(b)));
}
__device__ __forceinline__ vec<__half, 2> operator-(vec<__half, 2> a) {
  return metal_compat::from_half2(__hneg2(metal_compat::to_half2(a)));
}

// Comparisons give bool vectors, as in Metal.
#define MFC_VEC_CMP(OP)                                                        \
  template <typename T, int N>                                                 \
  __device__ __forceinline__ vec<bool, N> operator OP(vec<T, N> a, vec<T, N> b) { \
    vec<bool, N> r;                                                            \
    _Pragma("unroll") for (int i = 0; i < N; ++i) r[i] = a[i] OP b[i];         \
    return r;                                                                  \
  }                                                                            \
  template <typename T, int N, typename S,                                     \
            typename = cuda::std::enable_if_t<metal_compat::is_scalar_v<S>>>   \
  __device__ __forceinline__ vec<bool, N> operator OP(vec<T, N> a, S s) { \
    return a OP vec<T, N>(s);                                                  \
  }                                                                            \
  template <typename T, int N, typename S,                                     \
            typename = cuda::std::enable_if_t<metal_compat::is_scalar_v<S>>>   \
  __device__ __forceinline__ vec<bool, N> operator OP(S s, vec<T, N> a) { \
    return vec<T, N>(s) OP a;                                                  \
  }

MFC_VEC_CMP(==)
MFC_VEC_CMP(!=)
MFC_VEC_CMP(<)
MFC_VEC_CMP(>)
MFC_VEC_CMP(<=)
MFC_VEC_CMP(>=)
#undef MFC_VEC_CMP

template <int N>
__device__ __forceinline__ bool all(vec<bool, N> v) {
  bool r = true;
#pragma unroll
  for (int i = 0; i < N; ++i) r = r && v[i];
  return r;
}
template <int N>
__device__ __forceinline__ bool any(vec<bool, N> v) {
  bool r = false;
#pragma unroll
  for (int i = 0; i < N; ++i) r = r || v[i];
  return r;
}
__device__ __forceinline__ bool all(bool b) { return b; }
__device__ __forceinline__ bool any(bool b) { return b; }

///////////////////////////////////////////////////////////////////////////////
// as_type<T>(v): bit casts between types of the same size.
///////////////////////////////////////////////////////////////////////////////

template <typename To, typename From>
__device__ __forceinline__ To as_type(const From& v) {
  static_assert(sizeof(To) == sizeof(From), "as_type: sizes differ");
  To r;
  memcpy(&r, &v, sizeof(To));
  return r;
}

///////////////////////////////////////////////////////////////////////////////
// Barriers
///////////////////////////////////////////////////////////////////////////////

enum class mem_flags : unsigned int {
  mem_none = 0,
  mem_device = 1,
  mem_threadgroup = 2,
  mem_texture = 4,
  mem_threadgroup_imageblock = 8,
  mem_object_data = 16,
};
__host__ __device__ constexpr mem_flags operator|(mem_flags a, mem_flags b) {
  return mem_flags(static_cast<unsigned int>(a) | static_cast<unsigned int>(b));
}
__host__ __device__ constexpr mem_flags operator&(mem_flags a, mem_flags b) {
  return mem_flags(static_cast<unsigned int>(a) & static_cast<unsigned int>(b));
}

// __syncthreads orders global and shared memory within the block, which is
// what Metal's threadgroup_barrier guarantees for mem_device/mem_threadgroup.
__device__ __forceinline__ void threadgroup_barrier(mem_flags = mem_flags::mem_none) {
  __syncthreads();
}
__device__ __forceinline__ void simdgroup_barrier(mem_flags = mem_flags::mem_none) {
  __syncwarp();
}

///////////////////////////////////////////////////////////////////////////////
// Math: namespace metal (+ metal::fast, metal::precise). A using-directive at
// the end of this file makes the names usable unqualified, as after Metal's
// `using namespace metal;`.
///////////////////////////////////////////////////////////////////////////////

namespace metal {

using ::mlx::core::cu::all;
using ::mlx::core::cu::any;
using ::mlx::core::cu::as_type;

template <typename T>
struct numeric_limits : cuda::std::numeric_limits<T> {};

#define MFC_MATH1(NAME, FEXPR)                                                 \
  __device__ __forceinline__ float NAME(float x) { return FEXPR; }             \
  __device__ __forceinline__ __half NAME(__half h) {                           \
    float x = __half2float(h);                                                 \
    return __float2half(FEXPR);                                                \
  }                                                                            \
  __device__ __forceinline__ __nv_bfloat16 NAME(__nv_bfloat16 h) {             \
    float x = __bfloat162float(h);                                             \
    return __float2bfloat16(FEXPR);                                            \
  }                                                                            \
  template <typename T, int N>                                                 \
  __device__ __forceinline__ vec<T, N> NAME(vec<T, N> v) {              \
    vec<T, N> r;                                                               \
    _Pragma("unroll") for (int i = 0; i < N; ++i) r[i] = NAME(v[i]);           \
    return r;                                                                  \
  }

#define MFC_MATH2(NAME, FEXPR)                                                 \
  __device__ __forceinline__ float NAME(float x, float y) { return FEXPR; }    \
  __device__ __forceinline__ __half NAME(__half hx, __half hy) {               \
    float x = __half2float(hx), y = __half2float(hy);                          \
    return __float2half(FEXPR);                                                \
  }                                                                            \
  __device__ __forceinline__ __nv_bfloat16 NAME(__nv_bfloat16 hx, __nv_bfloat16 hy) { \
    float x = __bfloat162float(hx), y = __bfloat162float(hy);                  \
    return __float2bfloat16(FEXPR);                                            \
  }                                                                            \
  template <typename T, int N>                                                 \
  __device__ __forceinline__ vec<T, N> NAME(vec<T, N> a, vec<T, N> b) { \
    vec<T, N> r;                                                               \
    _Pragma("unroll") for (int i = 0; i < N; ++i) r[i] = NAME(a[i], b[i]);     \
    return r;                                                                  \
  }

#define MFC_MATH3(NAME, FEXPR)                                                 \
  __device__ __forceinline__ float NAME(float x, float y, float z) { return FEXPR; } \
  __device__ __forceinline__ __half NAME(__half hx, __half hy, __half hz) {    \
    float x = __half2float(hx), y = __half2float(hy), z = __half2float(hz);    \
    return __float2half(FEXPR);                                                \
  }                                                                            \
  __device__ __forceinline__ __nv_bfloat16 NAME(                               \
      __nv_bfloat16 hx, __nv_bfloat16 hy, __nv_bfloat16 hz) {                  \
    float x = __bfloat162float(hx), y = __bfloat162float(hy),                  \
          z = __bfloat162float(hz);                                            \
    return __float2bfloat16(FEXPR);                                            \
  }                                                                            \
  template <typename T, int N>                                                 \
  __device__ __forceinline__ vec<T, N> NAME(                                   \
      vec<T, N> a, vec<T, N> b, vec<T, N> c) {            \
    vec<T, N> r;                                                               \
    _Pragma("unroll") for (int i = 0; i < N; ++i) r[i] = NAME(a[i], b[i], c[i]); \
    return r;                                                                  \
  }

// Accurate versions (metal:: and metal::precise::).
MFC_MATH1(exp, ::expf(x))
MFC_MATH1(exp2, ::exp2f(x))
MFC_MATH1(exp10, ::exp10f(x))
MFC_MATH1(log, ::logf(x))
MFC_MATH1(log2, ::log2f(x))
MFC_MATH1(log10, ::log10f(x))
MFC_MATH1(sqrt, ::sqrtf(x))
MFC_MATH1(rsqrt, ::rsqrtf(x))
MFC_MATH1(fabs, ::fabsf(x))
MFC_MATH1(sin, ::sinf(x))
MFC_MATH1(cos, ::cosf(x))
MFC_MATH1(tan, ::tanf(x))
MFC_MATH1(asin, ::asinf(x))
MFC_MATH1(acos, ::acosf(x))
MFC_MATH1(atan, ::atanf(x))
MFC_MATH1(sinh, ::sinhf(x))
MFC_MATH1(cosh, ::coshf(x))
MFC_MATH1(tanh, ::tanhf(x))
MFC_MATH1(erf, ::erff(x))
MFC_MATH1(floor, ::floorf(x))
MFC_MATH1(ceil, ::ceilf(x))
MFC_MATH1(round, ::roundf(x))
MFC_MATH1(rint, ::rintf(x))
MFC_MATH1(trunc, ::truncf(x))
MFC_MATH1(fract, ::fminf(x - ::floorf(x), 0x1.fffffep-1f))
MFC_MATH1(saturate, ::fminf(::fmaxf(x, 0.0f), 1.0f))
MFC_MATH1(sign, (x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f)))
MFC_MATH2(pow, ::powf(x, y))
MFC_MATH2(powr, ::powf(x, y))
MFC_MATH2(atan2, ::atan2f(x, y))
MFC_MATH2(fmod, ::fmodf(x, y))
MFC_MATH2(copysign, ::copysignf(x, y))
MFC_MATH2(fmin, ::fminf(x, y))
MFC_MATH2(fmax, ::fmaxf(x, y))
MFC_MATH2(step, (y < x ? 0.0f : 1.0f))
MFC_MATH2(divide, x / y)
MFC_MATH3(fma, ::fmaf(x, y, z))
MFC_MATH3(mix, (x + (y - x) * z))

// fma on half2: one packed HFMA2 (a * b + c rounded once per component), preferred to
// the component-wise template (which goes through float for each half).
__device__ __forceinline__ vec<__half, 2> fma(vec<__half, 2> a, vec<__half, 2> b,
                                              vec<__half, 2> c) {
  return metal_compat::from_half2(__hfma2(metal_compat::to_half2(a), metal_compat::to_half2(b),
                                          metal_compat::to_half2(c)));
}

// min / max / clamp / abs for every scalar type (non-template overloads, as
// in Metal), plus vectors (vector-vector and vector-scalar).
#define MFC_MINMAX_INT(T)                                                      \
  __device__ __forceinline__ T min(T a, T b) { return b < a ? b : a; }         \
  __device__ __forceinline__ T max(T a, T b) { return a < b ? b : a; }         \
  __device__ __forceinline__ T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
MFC_MINMAX_INT(char)
MFC_MINMAX_INT(signed char)
MFC_MINMAX_INT(unsigned char)
MFC_MINMAX_INT(short)
MFC_MINMAX_INT(unsigned short)
MFC_MINMAX_INT(int)
MFC_MINMAX_INT(unsigned int)
MFC_MINMAX_INT(long)
MFC_MINMAX_INT(unsigned long)
MFC_MINMAX_INT(long long)
MFC_MINMAX_INT(unsigned long long)
#undef MFC_MINMAX_INT
MFC_MATH2(min, ::fminf(x, y))
MFC_MATH2(max, ::fmaxf(x, y))
MFC_MATH3(clamp, ::fminf(::fmaxf(x, y), z))

template <typename T, int N, typename S,
          typename = cuda::std::enable_if_t<metal_compat::is_scalar_v<S>>>
__device__ __forceinline__ vec<T, N> min(vec<T, N> a, S s) {
  return min(a, vec<T, N>(s));
}
template <typename T, int N, typename S,
          typename = cuda::std::enable_if_t<metal_compat::is_scalar_v<S>>>
__device__ __forceinline__ vec<T, N> max(vec<T, N> a, S s) {
  return max(a, vec<T, N>(s));
}
template <typename T, int N, typename S,
          typename = cuda::std::enable_if_t<metal_compat::is_scalar_v<S>>>
__device__ __forceinline__ vec<T, N> fmin(vec<T, N> a, S s) {
  return fmin(a, vec<T, N>(s));
}
template <typename T, int N, typename S,
          typename = cuda::std::enable_if_t<metal_compat::is_scalar_v<S>>>
__device__ __forceinline__ vec<T, N> fmax(vec<T, N> a, S s) {
  return fmax(a, vec<T, N>(s));
}
template <typename T, int N, typename S,
          typename = cuda::std::enable_if_t<metal_compat::is_scalar_v<S>>>
__device__ __forceinline__ vec<T, N> clamp(vec<T, N> x, S lo, S hi) {
  return clamp(x, vec<T, N>(lo), vec<T, N>(hi));
}
template <typename T, int N, typename S,
          typename = cuda::std::enable_if_t<metal_compat::is_scalar_v<S>>>
__device__ __forceinline__ vec<T, N> mix(vec<T, N> x, vec<T, N> y, S a) {
  return mix(x, y, vec<T, N>(a));
}
template <typename T, int N, typename S,
          typename = cuda::std::enable_if_t<metal_compat::is_scalar_v<S>>>
__device__ __forceinline__ vec<T, N> pow(vec<T, N> x, S y) {
  return pow(x, vec<T, N>(y));
}

__device__ __forceinline__ float abs(float x) { return ::fabsf(x); }
__device__ __forceinline__ __half abs(__half x) { return __habs(x); }
__device__ __forceinline__ __nv_bfloat16 abs(__nv_bfloat16 x) { return __habs(x); }
__device__ __forceinline__ char abs(char x) { return x < 0 ? char(-x) : x; }
__device__ __forceinline__ signed char abs(signed char x) { return x < 0 ? (signed char)(-x) : x; }
__device__ __forceinline__ short abs(short x) { return x < 0 ? short(-x) : x; }
__device__ __forceinline__ int abs(int x) { return x < 0 ? -x : x; }
__device__ __forceinline__ long abs(long x) { return x < 0 ? -x : x; }
__device__ __forceinline__ long long abs(long long x) { return x < 0 ? -x : x; }
__device__ __forceinline__ unsigned char abs(unsigned char x) { return x; }
__device__ __forceinline__ unsigned short abs(unsigned short x) { return x; }
__device__ __forceinline__ unsigned int abs(unsigned int x) { return x; }
__device__ __forceinline__ unsigned long abs(unsigned long x) { return x; }
__device__ __forceinline__ unsigned long long abs(unsigned long long x) { return x; }
template <typename T, int N>
__device__ __forceinline__ vec<T, N> abs(vec<T, N> v) {
  vec<T, N> r;
#pragma unroll
  for (int i = 0; i < N; ++i) r[i] = abs(v[i]);
  return r;
}

// Classification (bool, or bool vectors).
__device__ __forceinline__ bool isnan(float x) { return x != x; }
__device__ __forceinline__ bool isnan(__half x) { return __hisnan(x); }
__device__ __forceinline__ bool isnan(__nv_bfloat16 x) { return __hisnan(x); }
__device__ __forceinline__ bool isinf(float x) {
  return ::fabsf(x) == __int_as_float(0x7f800000);
}
__device__ __forceinline__ bool isinf(__half x) { return __hisinf(x) != 0; }
__device__ __forceinline__ bool isinf(__nv_bfloat16 x) { return __hisinf(x) != 0; }
__device__ __forceinline__ bool isfinite(float x) { return !isnan(x) && !isinf(x); }
__device__ __forceinline__ bool isfinite(__half x) { return !isnan(x) && !isinf(x); }
__device__ __forceinline__ bool isfinite(__nv_bfloat16 x) { return !isnan(x) && !isinf(x); }
template <typename T, int N>
__device__ __forceinline__ vec<bool, N> isnan(vec<T, N> v) {
  return metal_compat::map(v, [](T a) { return isnan(a); });
}
template <typename T, int N>
__device__ __forceinline__ vec<bool, N> isinf(vec<T, N> v) {
  return metal_compat::map(v, [](T a) { return isinf(a); });
}
template <typename T, int N>
__device__ __forceinline__ vec<bool, N> isfinite(vec<T, N> v) {
  return metal_compat::map(v, [](T a) { return isfinite(a); });
}

// select(a, b, c): c ? b : a (per component for vectors).
template <typename T, typename = cuda::std::enable_if_t<!metal_compat::is_vec_v<T>>>
__device__ __forceinline__ T select(T a, T b, bool c) {
  return c ? b : a;
}
template <typename T, int N>
__device__ __forceinline__ vec<T, N> select(vec<T, N> a, vec<T, N> b, vec<bool, N> c) {
  vec<T, N> r;
#pragma unroll
  for (int i = 0; i < N; ++i) r[i] = c[i] ? b[i] : a[i];
  return r;
}
template <typename T, int N>
__device__ __forceinline__ vec<T, N> select(vec<T, N> a, vec<T, N> b, bool c) {
  return c ? b : a;
}

// Geometric.
template <typename T, int N>
__device__ __forceinline__ T dot(vec<T, N> a, vec<T, N> b) {
  T r = a[0] * b[0];
#pragma unroll
  for (int i = 1; i < N; ++i) r = T(r + a[i] * b[i]);
  return r;
}
template <int N>
__device__ __forceinline__ float dot(vec<float, N> a, vec<float, N> b) {
  float r = a[0] * b[0];
#pragma unroll
  for (int i = 1; i < N; ++i) r = ::fmaf(a[i], b[i], r);
  return r;
}
template <typename T, int N>
__device__ __forceinline__ T length_squared(vec<T, N> a) { return dot(a, a); }
template <typename T, int N>
__device__ __forceinline__ T length(vec<T, N> a) { return sqrt(dot(a, a)); }
template <typename T, int N>
__device__ __forceinline__ T distance(vec<T, N> a, vec<T, N> b) {
  return length(a - b);
}
template <typename T, int N>
__device__ __forceinline__ vec<T, N> normalize(vec<T, N> a) {
  return a * rsqrt(dot(a, a));
}

namespace precise {
// Everything in metal:: is already the accurate version.
using namespace ::mlx::core::cu::metal;
} // namespace precise

namespace fast {
// Qualified lookup (fast::exp) sees the declarations below first and falls
// back to metal:: for the rest (fast::max, fast::mix, ...).
using namespace ::mlx::core::cu::metal;
// Hardware approximations (like Metal's fast-math versions).
MFC_MATH1(exp, ::__expf(x))
MFC_MATH1(exp2, ::exp2f(x))
MFC_MATH1(log, ::__logf(x))
MFC_MATH1(log2, ::__log2f(x))
MFC_MATH1(rsqrt, ::rsqrtf(x))
MFC_MATH1(sin, ::__sinf(x))
MFC_MATH1(cos, ::__cosf(x))
MFC_MATH1(tanh, ::tanhf(x))
MFC_MATH2(pow, ::__powf(x, y))
MFC_MATH2(powr, ::__powf(x, y))
MFC_MATH2(divide, ::__fdividef(x, y))
} // namespace fast

#undef MFC_MATH1
#undef MFC_MATH2
#undef MFC_MATH3

} // namespace metal

using namespace metal;

///////////////////////////////////////////////////////////////////////////////
// SIMD-group (warp) functions. Full-warp mask: call from all 32 lanes.
///////////////////////////////////////////////////////////////////////////////

namespace metal_compat {

constexpr unsigned int kFullMask = 0xffffffffu;

__device__ __forceinline__ unsigned int lane_id() {
  unsigned int l;
  asm("mov.u32 %0, %%laneid;" : "=r"(l));
  return l;
}

template <typename T>
inline constexpr bool shfl_native_v =
    cuda::std::is_same_v<T, int> || cuda::std::is_same_v<T, unsigned int> ||
    cuda::std::is_same_v<T, long> || cuda::std::is_same_v<T, unsigned long> ||
    cuda::std::is_same_v<T, long long> ||
    cuda::std::is_same_v<T, unsigned long long> ||
    cuda::std::is_same_v<T, float> || cuda::std::is_same_v<T, double> ||
    cuda::std::is_same_v<T, __half> || cuda::std::is_same_v<T, __nv_bfloat16>;

// kind: 0 = idx, 1 = xor, 2 = down, 3 = up
template <int Kind, typename T>
__device__ __forceinline__ T shfl(const T& v, unsigned int arg) {
  if constexpr (is_vec_v<T>) {
    T r;
#pragma unroll
    for (int i = 0; i < T::size; ++i) r[i] = shfl<Kind>(v[i], arg);
    return r;
  } else if constexpr (shfl_native_v<T>) {
    if constexpr (Kind == 0) return __shfl_sync(kFullMask, v, arg);
    else if constexpr (Kind == 1) return __shfl_xor_sync(kFullMask, v, arg);
    else if constexpr (Kind == 2) return __shfl_down_sync(kFullMask, v, arg);
    else return __shfl_up_sync(kFullMask, v, arg);
  } else {
    static_assert(sizeof(T) <= 4, "simd shuffle: unsupported type");
    // bool, char, short and their unsigned forms travel as int.
    return static_cast<T>(shfl<Kind>(static_cast<int>(v), arg));
  }
}

template <typename T>
__device__ __forceinline__ T zero() {
  return T(0);
}
template <typename T>
__device__ __forceinline__ T one() {
  return T(1);
}

} // namespace metal_compat

template <typename T>
__device__ __forceinline__ T simd_shuffle(T v, unsigned short lane) {
  return metal_compat::shfl<0>(v, lane);
}
template <typename T>
__device__ __forceinline__ T simd_broadcast(T v, unsigned short lane) {
  return metal_compat::shfl<0>(v, lane);
}
template <typename T>
__device__ __forceinline__ T simd_broadcast_first(T v) {
  return metal_compat::shfl<0>(v, __ffs(__activemask()) - 1);
}
template <typename T>
__device__ __forceinline__ T simd_shuffle_xor(T v, unsigned short mask) {
  return metal_compat::shfl<1>(v, mask);
}
// Lanes past the end keep their own value, as in Metal.
template <typename T>
__device__ __forceinline__ T simd_shuffle_down(T v, unsigned short delta) {
  return metal_compat::shfl<2>(v, delta);
}
template <typename T>
__device__ __forceinline__ T simd_shuffle_up(T v, unsigned short delta) {
  return metal_compat::shfl<3>(v, delta);
}
template <typename T>
__device__ __forceinline__ T simd_shuffle_rotate_down(T v, unsigned short delta) {
  return metal_compat::shfl<0>(v, (metal_compat::lane_id() + delta) & 31u);
}
template <typename T>
__device__ __forceinline__ T simd_shuffle_rotate_up(T v, unsigned short delta) {
  return metal_compat::shfl<0>(v, (metal_compat::lane_id() - delta) & 31u);
}

#define MFC_SIMD_REDUCE(NAME, EXPR)                                            \
  template <typename T>                                                        \
  __device__ __forceinline__ T NAME(T v) {                                     \
    _Pragma("unroll") for (int o = 16; o > 0; o >>= 1) {                       \
      T u = metal_compat::shfl<1>(v, o);                                       \
      v = EXPR;                                                                \
    }                                                                          \
    return v;                                                                  \
  }
MFC_SIMD_REDUCE(simd_sum, T(v + u))
MFC_SIMD_REDUCE(simd_product, T(v * u))
MFC_SIMD_REDUCE(simd_max, metal::max(v, u))
MFC_SIMD_REDUCE(simd_min, metal::min(v, u))
MFC_SIMD_REDUCE(simd_and, T(v & u))
MFC_SIMD_REDUCE(simd_or, T(v | u))
MFC_SIMD_REDUCE(simd_xor, T(v ^ u))
#undef MFC_SIMD_REDUCE

template <typename T>
__device__ __forceinline__ T simd_prefix_inclusive_sum(T v) {
  const unsigned int lane = metal_compat::lane_id();
#pragma unroll
  for (unsigned int o = 1; o < 32; o <<= 1) {
    T u = metal_compat::shfl<3>(v, o);
    if (lane >= o) v = T(v + u);
  }
  return v;
}
template <typename T>
__device__ __forceinline__ T simd_prefix_exclusive_sum(T v) {
  T inc = simd_prefix_inclusive_sum(v);
  T prev = metal_compat::shfl<3>(inc, 1);
  return metal_compat::lane_id() == 0 ? metal_compat::zero<T>() : prev;
}
template <typename T>
__device__ __forceinline__ T simd_prefix_inclusive_product(T v) {
  const unsigned int lane = metal_compat::lane_id();
#pragma unroll
  for (unsigned int o = 1; o < 32; o <<= 1) {
    T u = metal_compat::shfl<3>(v, o);
    if (lane >= o) v = T(v * u);
  }
  return v;
}
template <typename T>
__device__ __forceinline__ T simd_prefix_exclusive_product(T v) {
  T inc = simd_prefix_inclusive_product(v);
  T prev = metal_compat::shfl<3>(inc, 1);
  return metal_compat::lane_id() == 0 ? metal_compat::one<T>() : prev;
}

__device__ __forceinline__ bool simd_all(bool b) { return __all_sync(metal_compat::kFullMask, b); }
__device__ __forceinline__ bool simd_any(bool b) { return __any_sync(metal_compat::kFullMask, b); }

struct simd_vote {
  using vote_t = unsigned long long;
  vote_t v;
  __device__ __forceinline__ explicit simd_vote(vote_t x = 0) : v(x) {}
  __device__ __forceinline__ explicit operator vote_t() const { return v; }
  __device__ __forceinline__ bool all() const { return v == 0xffffffffull; }
  __device__ __forceinline__ bool any() const { return v != 0; }
};
__device__ __forceinline__ simd_vote simd_ballot(bool b) {
  return simd_vote(__ballot_sync(metal_compat::kFullMask, b));
}
__device__ __forceinline__ simd_vote simd_active_threads_mask() {
  return simd_vote(__activemask());
}
__device__ __forceinline__ bool simd_is_first() {
  return metal_compat::lane_id() == unsigned(__ffs(__activemask()) - 1);
}

///////////////////////////////////////////////////////////////////////////////
// Thread attributes (used by cuda_compat.attribute_preamble()).
///////////////////////////////////////////////////////////////////////////////

namespace metal_compat {

__device__ __forceinline__ unsigned int linear_tid() {
  return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}
__device__ __forceinline__ unsigned int threads_in_block() {
  return blockDim.x * blockDim.y * blockDim.z;
}
__device__ __forceinline__ uint3 attr_thread_position_in_grid() {
  return uint3(blockIdx.x * blockDim.x + threadIdx.x,
               blockIdx.y * blockDim.y + threadIdx.y,
               blockIdx.z * blockDim.z + threadIdx.z);
}
__device__ __forceinline__ uint3 attr_thread_position_in_threadgroup() {
  return uint3(threadIdx.x, threadIdx.y, threadIdx.z);
}
__device__ __forceinline__ uint3 attr_threadgroup_position_in_grid() {
  return uint3(blockIdx.x, blockIdx.y, blockIdx.z);
}
__device__ __forceinline__ uint3 attr_threads_per_threadgroup() {
  return uint3(blockDim.x, blockDim.y, blockDim.z);
}
__device__ __forceinline__ uint3 attr_threadgroups_per_grid() {
  return uint3(gridDim.x, gridDim.y, gridDim.z);
}
// CUDA launches whole blocks: this is the rounded-up grid.
__device__ __forceinline__ uint3 attr_threads_per_grid() {
  return uint3(gridDim.x * blockDim.x, gridDim.y * blockDim.y, gridDim.z * blockDim.z);
}
__device__ __forceinline__ uint3 attr_grid_origin() { return uint3(0u); }
__device__ __forceinline__ unsigned int attr_thread_index_in_threadgroup() {
  return linear_tid();
}
__device__ __forceinline__ unsigned int attr_thread_index_in_simdgroup() {
  return linear_tid() & 31u;
}
__device__ __forceinline__ unsigned int attr_simdgroup_index_in_threadgroup() {
  return linear_tid() >> 5;
}
__device__ __forceinline__ unsigned int attr_simdgroups_per_threadgroup() {
  return (threads_in_block() + 31u) >> 5;
}
__device__ __forceinline__ unsigned int attr_thread_index_in_quadgroup() {
  return linear_tid() & 3u;
}
__device__ __forceinline__ unsigned int attr_quadgroup_index_in_threadgroup() {
  return linear_tid() >> 2;
}
__device__ __forceinline__ unsigned int attr_quadgroups_per_threadgroup() {
  return (threads_in_block() + 3u) >> 2;
}

} // namespace metal_compat

} // namespace mlx::core::cu

#endif // MLX_FOUNDRY_METAL_COMPAT_CUH
