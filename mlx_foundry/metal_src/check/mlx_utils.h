// mlx_utils.h — what MLX prepends to every custom Metal kernel (`metal::utils()`,
// built from mlx/backend/metal/kernels/utils.h with bf16.h, bf16_math.h,
// complex.h, defines.h and logging.h), reduced to the declarations a kernel can
// use, for the front-end check in mlx_foundry/metal_check.py. The checker
// force-includes this file before the generated kernel source, so line numbers
// in diagnostics are the lines of the generated source itself.
// Names and signatures follow MLX 0.32 (MIT licence, Copyright © 2023-2025 Apple Inc.).
#pragma once
#ifndef __MLX_FOUNDRY_MLX_UTILS_STUB__
#define __MLX_FOUNDRY_MLX_UTILS_STUB__

#include "metal_stdlib.h"

using namespace metal;

// ---- bf16.h -----------------------------------------------------------------------
typedef bfloat bfloat16_t;
inline uint16_t bfloat16_to_uint16(const bfloat16_t x) { return as_type<uint16_t>(x); }
inline bfloat16_t uint16_to_bfloat16(const uint16_t x) { return as_type<bfloat16_t>(x); }

typedef half float16_t;

// ---- defines.h ---------------------------------------------------------------------
#define MTL_CONST constant
static MTL_CONST constexpr int MAX_REDUCE_SPECIALIZED_DIMS = 4;
static MTL_CONST constexpr int REDUCE_N_READS = 4;
static MTL_CONST constexpr int REDUCE_N_WRITES = 4;
static MTL_CONST constexpr int SOFTMAX_N_READS = 4;
static MTL_CONST constexpr int RMS_N_READS = 4;
static MTL_CONST constexpr int RMS_LOOPED_LIMIT = 4096;
#define instantiate_kernel(name, func, ...) \
  template decltype(func<__VA_ARGS__>) func<__VA_ARGS__>;

// ---- logging.h ---------------------------------------------------------------------
namespace mlx {
struct os_log {
  constexpr os_log(constant char*, constant char*) {}
  template <typename... Args>
  void log_debug(constant char*, Args...) const {}
};
} // namespace mlx

// ---- complex.h (the value type and its arithmetic) ---------------------------------
template <typename T>
struct complex_t;
template <typename T>
static constexpr constant bool is_complex_v = false;
template <typename T>
static constexpr constant bool is_complex_v<complex_t<T>> = true;

template <typename T>
struct complex_t {
  using value_type = T;
  T real;
  T imag;
  constexpr complex_t(T real, T imag) : real(real), imag(imag) {}
  constexpr complex_t() : real(0), imag(0) {}
  template <typename U, typename = typename enable_if<!is_complex_v<U>>::type>
  constexpr complex_t(U x) : real(static_cast<T>(x)), imag(static_cast<T>(0)) {}
  template <typename U, typename = typename enable_if<!is_same_v<U, T>>::type>
  constexpr complex_t(complex_t<U> x)
      : real(static_cast<T>(x.real)), imag(static_cast<T>(x.imag)) {}
  constexpr complex_t(vec<T, 2> v) : real(v.x), imag(v.y) {}
  constexpr operator vec<T, 2>() const { return vec<T, 2>{real, imag}; }
};
using complex32_t = complex_t<half>;
using complex64_t = complex_t<float>;

template <typename T> constexpr complex_t<T> operator-(complex_t<T> x) { return {-x.real, -x.imag}; }
template <typename T> constexpr complex_t<T> operator+(complex_t<T> a, complex_t<T> b) { return {a.real + b.real, a.imag + b.imag}; }
template <typename T> constexpr complex_t<T> operator-(complex_t<T> a, complex_t<T> b) { return {a.real - b.real, a.imag - b.imag}; }
template <typename T> constexpr complex_t<T> operator*(complex_t<T> a, complex_t<T> b) { return {a.real * b.real - a.imag * b.imag, a.real * b.imag + a.imag * b.real}; }
template <typename T> constexpr complex_t<T> operator/(complex_t<T> a, complex_t<T> b) {
  auto d = b.real * b.real + b.imag * b.imag;
  return {(a.real * b.real + a.imag * b.imag) / d, (a.imag * b.real - a.real * b.imag) / d};
}
template <typename T> constexpr bool operator==(complex_t<T> a, complex_t<T> b) { return a.real == b.real && a.imag == b.imag; }
template <typename T> constexpr bool operator!=(complex_t<T> a, complex_t<T> b) { return !(a == b); }
template <typename T> constexpr bool operator<(complex_t<T> a, complex_t<T> b) { return (a.real < b.real) || (a.real == b.real && a.imag < b.imag); }
template <typename T> constexpr bool operator>(complex_t<T> a, complex_t<T> b) { return b < a; }
template <typename T> constexpr bool operator<=(complex_t<T> a, complex_t<T> b) { return !(b < a); }
template <typename T> constexpr bool operator>=(complex_t<T> a, complex_t<T> b) { return !(a < b); }
template <typename T> constexpr thread complex_t<T>& operator+=(thread complex_t<T>& a, complex_t<T> b) { a.real += b.real; a.imag += b.imag; return a; }
template <typename T> constexpr thread complex_t<T>& operator-=(thread complex_t<T>& a, complex_t<T> b) { a.real -= b.real; a.imag -= b.imag; return a; }
template <typename T> constexpr thread complex_t<T>& operator*=(thread complex_t<T>& a, complex_t<T> b) { a = a * b; return a; }

// ---- utils.h --------------------------------------------------------------------------
template <typename U>
struct WorkPerThread {
  static_assert(sizeof(U) <= 8, "Type too large");
  static constexpr int constant n = 8 / sizeof(U);
};

template <typename U>
struct Limits {
  static const constant U max = metal::numeric_limits<U>::max();
  static const constant U min = metal::numeric_limits<U>::min();
  static const constant U finite_max = metal::numeric_limits<U>::max();
  static const constant U finite_min = metal::numeric_limits<U>::min();
};
#define __MLX_INT_LIMIT(type)                                                \
  template <>                                                                \
  struct Limits<type> {                                                      \
    static constexpr constant type max = metal::numeric_limits<type>::max(); \
    static constexpr constant type min = metal::numeric_limits<type>::min(); \
    static constexpr constant type finite_max = metal::numeric_limits<type>::max(); \
    static constexpr constant type finite_min = metal::numeric_limits<type>::min(); \
  };
__MLX_INT_LIMIT(uint8_t)
__MLX_INT_LIMIT(uint16_t)
__MLX_INT_LIMIT(uint32_t)
__MLX_INT_LIMIT(uint64_t)
__MLX_INT_LIMIT(int8_t)
__MLX_INT_LIMIT(int16_t)
__MLX_INT_LIMIT(int32_t)
__MLX_INT_LIMIT(int64_t)
#undef __MLX_INT_LIMIT
#define __MLX_FLOAT_LIMIT(type)                                                 \
  template <>                                                                   \
  struct Limits<type> {                                                         \
    static constexpr constant type max = metal::numeric_limits<type>::infinity(); \
    static constexpr constant type min = -metal::numeric_limits<type>::infinity(); \
    static constexpr constant type finite_max = metal::numeric_limits<type>::max(); \
    static constexpr constant type finite_min = -metal::numeric_limits<type>::max(); \
  };
__MLX_FLOAT_LIMIT(half)
__MLX_FLOAT_LIMIT(float)
__MLX_FLOAT_LIMIT(bfloat16_t)
#undef __MLX_FLOAT_LIMIT
template <>
struct Limits<bool> {
  static constexpr constant bool max = true;
  static constexpr constant bool min = false;
};

#define MLX_MTL_PRAGMA_UNROLL _Pragma("clang loop unroll(full)")

template <typename IdxT = int64_t>
METAL_FUNC IdxT elem_to_loc(IdxT elem, constant const int* shape,
                            constant const int64_t* strides, int ndim) {
  IdxT loc = 0;
  for (int i = ndim - 1; i >= 0 && elem > 0; --i) {
    loc += (elem % shape[i]) * IdxT(strides[i]);
    elem /= shape[i];
  }
  return loc;
}
template <typename IdxT = int64_t>
METAL_FUNC IdxT elem_to_loc(uint3 elem, constant const int* shape,
                            constant const int64_t* strides, int ndim) {
  IdxT loc = elem.x * IdxT(strides[ndim - 1]) + elem.y * IdxT(strides[ndim - 2]);
  for (int d = ndim - 3; d >= 0; --d) {
    loc += (elem.z % shape[d]) * IdxT(strides[d]);
    elem.z /= shape[d];
  }
  return loc;
}
template <typename IdxT = int64_t>
METAL_FUNC IdxT elem_to_loc_1(uint elem, constant const int64_t& stride) {
  return elem * IdxT(stride);
}
template <typename IdxT = int64_t>
METAL_FUNC IdxT elem_to_loc_2(uint2 elem, constant const int64_t* strides) {
  return elem.x * IdxT(strides[1]) + elem.y * IdxT(strides[0]);
}
template <typename IdxT = int64_t>
METAL_FUNC IdxT elem_to_loc_3(uint3 elem, constant const int64_t* strides) {
  return elem.x * IdxT(strides[2]) + elem.y * IdxT(strides[1]) + elem.z * IdxT(strides[0]);
}
template <typename IdxT = int64_t>
vec<IdxT, 2> elem_to_loc_2_nd(uint3 elem, constant const int* shape,
                                         constant const int64_t* a_strides,
                                         constant const int64_t* b_strides, int ndim);
template <typename IdxT = int64_t>
vec<IdxT, 3> elem_to_loc_3_nd(uint3 elem, constant const int* shape,
                                         constant const int64_t* a_strides,
                                         constant const int64_t* b_strides,
                                         constant const int64_t* c_strides, int ndim);

template <int DIM, typename OffsetT = size_t, bool General = true>
struct LoopedElemToLoc {
  int dim;
  LoopedElemToLoc<DIM - 1, OffsetT, General> inner_looper;
  OffsetT offset{0};
  int index{0};
  LoopedElemToLoc(int dim) thread : dim(dim), inner_looper(dim - 1) {}
  void next(const constant int* shape, const constant int64_t* strides) thread;
  void next(int n, const constant int* shape, const constant int64_t* strides) thread;
  OffsetT location() thread { return offset; }
};
template <typename OffsetT>
struct LoopedElemToLoc<1, OffsetT, true> {
  int dim;
  OffsetT offset{0};
  uint index{0};
  LoopedElemToLoc(int dim) thread : dim(dim) {}
  void next(const constant int* shape, const constant int64_t* strides) thread;
  void next(int n, const constant int* shape, const constant int64_t* strides) thread;
  OffsetT location() thread { return offset; }
};
template <typename OffsetT>
struct LoopedElemToLoc<1, OffsetT, false> {
  OffsetT offset{0};
  LoopedElemToLoc(int) thread {}
  void next(const constant int*, const constant int64_t* strides) thread;
  void next(int n, const constant int*, const constant int64_t* strides) thread;
  OffsetT location() thread { return offset; }
};

template <typename T, typename U>
inline T ceildiv(T N, U M) {
  return (N + M - 1) / M;
}

float log1p(float x);
bfloat16_t log1p(bfloat16_t x);
complex64_t log1p(complex64_t in);

// 64-bit, bool and complex SIMD shuffles (MLX builds them from 32-bit ones)
inline uint64_t simd_shuffle_down(uint64_t data, uint16_t delta) {
  return as_type<uint64_t>(metal::simd_shuffle_down(as_type<uint2>(data), delta));
}
inline int64_t simd_shuffle_down(int64_t data, uint16_t delta) {
  return as_type<int64_t>(metal::simd_shuffle_down(as_type<uint2>(data), delta));
}
inline bool simd_shuffle_down(bool data, uint16_t delta) {
  return simd_shuffle_down(static_cast<uint32_t>(data), delta);
}
complex64_t simd_shuffle_down(complex64_t data, uint16_t delta);
uint64_t simd_shuffle_up(uint64_t data, uint16_t delta);
int64_t simd_shuffle_up(int64_t data, uint16_t delta);
bool simd_shuffle_up(bool data, uint16_t delta);
complex64_t simd_shuffle_up(complex64_t data, uint16_t delta);
uint64_t simd_shuffle_and_fill_up(uint64_t data, uint64_t filling, uint16_t delta);
int64_t simd_shuffle_and_fill_up(int64_t data, int64_t filling, uint16_t delta);
bool simd_shuffle_and_fill_up(bool data, bool filling, uint16_t delta);
complex64_t simd_shuffle_and_fill_up(complex64_t data, complex64_t filling, uint16_t delta);
uint64_t simd_shuffle(uint64_t data, uint16_t lane);
int64_t simd_shuffle(int64_t data, uint16_t lane);
bool simd_shuffle(bool data, uint16_t lane);
complex64_t simd_shuffle(complex64_t data, uint16_t lane);

// std::conditional is not included with Metal
template <bool condition, typename T, typename U>
struct ConditionalType {
  using type = U;
};
template <typename T, typename U>
struct ConditionalType<true, T, U> {
  using type = T;
};

template <typename U, typename T>
inline U cast_to(T val) {
  return static_cast<U>(val);
}

#endif // __MLX_FOUNDRY_MLX_UTILS_STUB__
