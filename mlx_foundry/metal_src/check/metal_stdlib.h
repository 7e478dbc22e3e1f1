// metal_stdlib.h — a declaration-only stub of Apple's Metal standard library,
// for `python -m mlx_foundry check` (mlx_foundry/metal_check.py).
//
// It lets a stock clang front-end (libclang from PyPI, plain C++17 mode) parse
// Metal Shading Language the way the Metal compiler would, so that type and
// address-space errors, undeclared names and wrong calls are found on Linux.
// Written from Apple's Metal Shading Language Specification (MSL 3.x):
//   2.1  scalar types            2.2  vector types (vec<T,N>, packed_*)
//   4    address spaces          5.2  attributes (handled by metal_check.py)
//   6.2  type traits / limits    6.3  common functions   6.4 integer functions
//   6.5  relational functions    6.5  math (metal::, metal::fast::, metal::precise::)
//   6.7  geometric functions     6.9  SIMD-group and quad-group functions
//   6.9  threadgroup/simdgroup synchronization (mem_flags)
//   6.15 atomic functions        2.19 as_type<T>
// Nothing here is compiled for a GPU: functions are declared, not defined
// (except constexpr helpers that the language needs to evaluate).
//
// How Metal maps onto clang here:
//   device      -> __attribute__((address_space(1)))
//   constant    -> __attribute__((address_space(2)))
//   threadgroup -> __attribute__((address_space(3)))
//   thread      -> the default address space (unqualified), as in Metal
// Pointers in different address spaces do not convert into each other, which
// is Metal's rule. Vector types are clang ext_vector types (the same types the
// Metal compiler uses), so .x/.xy access and vector arithmetic are real.
// Metal's constructor-call syntax `float4(a, b, c, d)` is rewritten by the
// checker into `__metal_vector_ctor<float4>(a, b, c, d)` (defined below),
// which applies Metal's component-count rule.
#pragma once
#ifndef __MLX_FOUNDRY_METAL_STDLIB_STUB__
#define __MLX_FOUNDRY_METAL_STDLIB_STUB__

#ifndef __METAL_VERSION__
#define __METAL_VERSION__ 310
#endif
#define __METAL__ 1
#define __METAL_MACOS__ 1
#define __HAVE_BFLOAT__ 1
#define __HAVE_NATIVE_FAST_MATH__ 1

// ---- address spaces (MSL 4) ------------------------------------------------
#define device __attribute__((address_space(1)))
#define constant __attribute__((address_space(2)))
#define threadgroup __attribute__((address_space(3)))
#define threadgroup_imageblock __attribute__((address_space(4)))
#define ray_data __attribute__((address_space(5)))
#define object_data __attribute__((address_space(6)))
#define thread
// A threadgroup variable declared in a kernel body; the checker rewrites the
// `threadgroup` keyword of such a declaration to this (same length) so that
// clang accepts the address space on a function-scope variable.
#define __mtl_tgvar static __attribute__((address_space(3)))

#define METAL_FUNC inline __attribute__((__always_inline__))
#define METAL_INTERNAL
#define METAL_CONST_ARG(A)
#define METAL_ENABLE_IF(P, M)

// ---- scalar types (MSL 2.1) ---------------------------------------------------
typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
typedef unsigned long ulong;
typedef _Float16 half;
typedef __bf16 bfloat;
typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef short int16_t;
typedef unsigned short uint16_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long int64_t;
typedef unsigned long uint64_t;
typedef __SIZE_TYPE__ size_t;
typedef __PTRDIFF_TYPE__ ptrdiff_t;
typedef __INTPTR_TYPE__ intptr_t;
typedef __UINTPTR_TYPE__ uintptr_t;
typedef decltype(nullptr) nullptr_t;

// ---- vector types (MSL 2.2) -----------------------------------------------------
#define __MTL_VEC(T)                                            \
  typedef T T##2 __attribute__((ext_vector_type(2)));           \
  typedef T T##3 __attribute__((ext_vector_type(3)));           \
  typedef T T##4 __attribute__((ext_vector_type(4)));           \
  typedef T packed_##T##2 __attribute__((ext_vector_type(2)));  \
  typedef T packed_##T##3 __attribute__((ext_vector_type(3)));  \
  typedef T packed_##T##4 __attribute__((ext_vector_type(4)));
__MTL_VEC(bool)
__MTL_VEC(char)
__MTL_VEC(uchar)
__MTL_VEC(short)
__MTL_VEC(ushort)
__MTL_VEC(int)
__MTL_VEC(uint)
__MTL_VEC(long)
__MTL_VEC(ulong)
__MTL_VEC(half)
__MTL_VEC(float)
__MTL_VEC(bfloat)
#undef __MTL_VEC

namespace metal {
template <typename T, int N>
using vec = T __attribute__((ext_vector_type(N)));
template <typename T, int N>
using packed_vec = T __attribute__((ext_vector_type(N)));
#define __MTL_USE_VEC(T)                                                      \
  using ::T##2; using ::T##3; using ::T##4;                                   \
  using ::packed_##T##2; using ::packed_##T##3; using ::packed_##T##4;
__MTL_USE_VEC(bool)
__MTL_USE_VEC(char)
__MTL_USE_VEC(uchar)
__MTL_USE_VEC(short)
__MTL_USE_VEC(ushort)
__MTL_USE_VEC(int)
__MTL_USE_VEC(uint)
__MTL_USE_VEC(long)
__MTL_USE_VEC(ulong)
__MTL_USE_VEC(half)
__MTL_USE_VEC(float)
__MTL_USE_VEC(bfloat)
#undef __MTL_USE_VEC
using ::half;
using ::bfloat;
using ::uchar;
using ::ushort;
using ::uint;
using ::ulong;
using ::size_t;
using ::ptrdiff_t;
using ::int8_t; using ::uint8_t; using ::int16_t; using ::uint16_t;
using ::int32_t; using ::uint32_t; using ::int64_t; using ::uint64_t;

// ---- type traits (MSL 6.2; the subset of <type_traits> Metal provides) --------
template <typename T, T v>
struct integral_constant {
  static constexpr constant T value = v;
  typedef T value_type;
  constexpr operator value_type() const { return value; }
};
template <bool B>
using bool_constant = integral_constant<bool, B>;
typedef bool_constant<true> true_type;
typedef bool_constant<false> false_type;

template <bool B, typename T = void> struct enable_if {};
template <typename T> struct enable_if<true, T> { typedef T type; };
template <bool B, typename T = void>
using enable_if_t = typename enable_if<B, T>::type;

template <bool B, typename T, typename F> struct conditional { typedef T type; };
template <typename T, typename F> struct conditional<false, T, F> { typedef F type; };
template <bool B, typename T, typename F>
using conditional_t = typename conditional<B, T, F>::type;

template <typename T, typename U> struct is_same : false_type {};
template <typename T> struct is_same<T, T> : true_type {};
template <typename T, typename U>
constexpr constant bool is_same_v = is_same<T, U>::value;

template <typename T> struct remove_const { typedef T type; };
template <typename T> struct remove_const<const T> { typedef T type; };
template <typename T> struct remove_volatile { typedef T type; };
template <typename T> struct remove_volatile<volatile T> { typedef T type; };
template <typename T> struct remove_cv {
  typedef typename remove_volatile<typename remove_const<T>::type>::type type;
};
template <typename T> struct remove_reference { typedef T type; };
template <typename T> struct remove_reference<T&> { typedef T type; };
template <typename T> struct remove_reference<T&&> { typedef T type; };
template <typename T> struct remove_pointer { typedef T type; };
template <typename T> struct remove_pointer<T*> { typedef T type; };
template <typename T> struct remove_pointer<T* const> { typedef T type; };
template <typename T> using remove_const_t = typename remove_const<T>::type;
template <typename T> using remove_volatile_t = typename remove_volatile<T>::type;
template <typename T> using remove_cv_t = typename remove_cv<T>::type;
template <typename T> using remove_reference_t = typename remove_reference<T>::type;
template <typename T> using remove_pointer_t = typename remove_pointer<T>::type;
template <typename T> struct decay { typedef remove_cv_t<remove_reference_t<T>> type; };
template <typename T> using decay_t = typename decay<T>::type;
template <typename T> struct add_const { typedef const T type; };
template <typename T> using add_const_t = const T;
template <typename T> struct type_identity { typedef T type; };
template <typename T> using type_identity_t = typename type_identity<T>::type;
template <typename T> T&& declval() noexcept;

template <typename T> struct is_const : false_type {};
template <typename T> struct is_const<const T> : true_type {};
template <typename T> constexpr constant bool is_const_v = is_const<T>::value;
template <typename T> struct is_pointer : false_type {};
template <typename T> struct is_pointer<T*> : true_type {};
template <typename T> struct is_pointer<T* const> : true_type {};
template <typename T> constexpr constant bool is_pointer_v = is_pointer<T>::value;
template <typename T> struct is_void : is_same<remove_cv_t<T>, void> {};
template <typename T> constexpr constant bool is_void_v = is_void<T>::value;
template <typename From, typename To>
struct is_convertible : bool_constant<__is_convertible_to(From, To)> {};
template <typename From, typename To>
constexpr constant bool is_convertible_v = is_convertible<From, To>::value;
template <typename B, typename D>
struct is_base_of : bool_constant<__is_base_of(B, D)> {};
template <typename B, typename D>
constexpr constant bool is_base_of_v = is_base_of<B, D>::value;

namespace __detail {
template <typename T> struct __int : false_type {};
template <> struct __int<bool> : true_type {};
template <> struct __int<char> : true_type {};
template <> struct __int<signed char> : true_type {};
template <> struct __int<unsigned char> : true_type {};
template <> struct __int<short> : true_type {};
template <> struct __int<unsigned short> : true_type {};
template <> struct __int<int> : true_type {};
template <> struct __int<unsigned int> : true_type {};
template <> struct __int<long> : true_type {};
template <> struct __int<unsigned long> : true_type {};
template <> struct __int<long long> : true_type {};
template <> struct __int<unsigned long long> : true_type {};
template <typename T> struct __fp : false_type {};
template <> struct __fp<half> : true_type {};
template <> struct __fp<float> : true_type {};
template <> struct __fp<bfloat> : true_type {};
template <> struct __fp<double> : true_type {};

// Vector traits: element type and component count of scalars and ext vectors.
template <typename T> struct __vt {
  static constexpr constant int n = 1;
  static constexpr constant bool is_vec = false;
  typedef T elem;
};
template <typename T, int N> struct __vt<T __attribute__((ext_vector_type(N)))> {
  static constexpr constant int n = N;
  static constexpr constant bool is_vec = true;
  typedef T elem;
};
} // namespace __detail

template <typename T>
struct is_integral : __detail::__int<remove_cv_t<T>> {};
template <typename T> constexpr constant bool is_integral_v = is_integral<T>::value;
template <typename T>
struct is_floating_point : __detail::__fp<remove_cv_t<T>> {};
template <typename T>
constexpr constant bool is_floating_point_v = is_floating_point<T>::value;
template <typename T>
struct is_arithmetic : bool_constant<is_integral_v<T> || is_floating_point_v<T>> {};
template <typename T> constexpr constant bool is_arithmetic_v = is_arithmetic<T>::value;
template <typename T>
struct is_scalar : bool_constant<is_arithmetic_v<T> || is_pointer_v<T> || __is_enum(T)> {};
template <typename T> constexpr constant bool is_scalar_v = is_scalar<T>::value;
template <typename T>
struct is_signed : bool_constant<is_arithmetic_v<T> && (remove_cv_t<T>(-1) < remove_cv_t<T>(0))> {};
template <typename T> constexpr constant bool is_signed_v = is_signed<T>::value;
template <typename T>
struct is_unsigned : bool_constant<is_integral_v<T> && !is_signed_v<T>> {};
template <typename T> constexpr constant bool is_unsigned_v = is_unsigned<T>::value;
template <typename T>
struct is_vector : bool_constant<__detail::__vt<remove_cv_t<T>>::is_vec> {};
template <typename T> constexpr constant bool is_vector_v = is_vector<T>::value;
template <typename T>
struct vec_elements : integral_constant<int, __detail::__vt<remove_cv_t<T>>::n> {};
template <typename T>
struct make_scalar { typedef typename __detail::__vt<remove_cv_t<T>>::elem type; };
template <typename T> using make_scalar_t = typename make_scalar<T>::type;
template <typename T> struct make_unsigned;
template <> struct make_unsigned<char> { typedef uchar type; };
template <> struct make_unsigned<signed char> { typedef uchar type; };
template <> struct make_unsigned<uchar> { typedef uchar type; };
template <> struct make_unsigned<short> { typedef ushort type; };
template <> struct make_unsigned<ushort> { typedef ushort type; };
template <> struct make_unsigned<int> { typedef uint type; };
template <> struct make_unsigned<uint> { typedef uint type; };
template <> struct make_unsigned<long> { typedef ulong type; };
template <> struct make_unsigned<ulong> { typedef ulong type; };
template <typename T> using make_unsigned_t = typename make_unsigned<T>::type;
template <typename T> struct make_signed;
template <> struct make_signed<char> { typedef char type; };
template <> struct make_signed<uchar> { typedef char type; };
template <> struct make_signed<short> { typedef short type; };
template <> struct make_signed<ushort> { typedef short type; };
template <> struct make_signed<int> { typedef int type; };
template <> struct make_signed<uint> { typedef int type; };
template <> struct make_signed<long> { typedef long type; };
template <> struct make_signed<ulong> { typedef long type; };
template <typename T> using make_signed_t = typename make_signed<T>::type;

// ---- numeric_limits (MSL 6.2) ------------------------------------------------
template <typename T> struct numeric_limits {
  static constexpr constant bool is_specialized = false;
};
#define __MTL_INT_LIMITS(T, MIN, MAX, SIGNED, DIGITS)                          \
  template <> struct numeric_limits<T> {                                       \
    static constexpr constant bool is_specialized = true;                      \
    static constexpr constant bool is_signed = SIGNED;                         \
    static constexpr constant bool is_integer = true;                          \
    static constexpr constant bool is_exact = true;                            \
    static constexpr constant bool has_infinity = false;                       \
    static constexpr constant bool has_quiet_NaN = false;                      \
    static constexpr constant int digits = DIGITS;                             \
    static constexpr T min() { return MIN; }                                   \
    static constexpr T max() { return MAX; }                                   \
    static constexpr T lowest() { return MIN; }                                \
    static constexpr T epsilon() { return 0; }                                 \
    static constexpr T round_error() { return 0; }                             \
    static constexpr T infinity() { return 0; }                                \
    static constexpr T quiet_NaN() { return 0; }                               \
    static constexpr T signaling_NaN() { return 0; }                           \
    static constexpr T denorm_min() { return 0; }                              \
  };
__MTL_INT_LIMITS(bool, false, true, false, 1)
__MTL_INT_LIMITS(char, (char)-128, (char)127, true, 7)
__MTL_INT_LIMITS(signed char, (signed char)-128, (signed char)127, true, 7)
__MTL_INT_LIMITS(uchar, (uchar)0, (uchar)255, false, 8)
__MTL_INT_LIMITS(short, (short)-32768, (short)32767, true, 15)
__MTL_INT_LIMITS(ushort, (ushort)0, (ushort)65535, false, 16)
__MTL_INT_LIMITS(int, -2147483647 - 1, 2147483647, true, 31)
__MTL_INT_LIMITS(uint, 0u, 4294967295u, false, 32)
__MTL_INT_LIMITS(long, -9223372036854775807L - 1, 9223372036854775807L, true, 63)
__MTL_INT_LIMITS(ulong, 0ul, 18446744073709551615ul, false, 64)
#undef __MTL_INT_LIMITS
#define __MTL_FP_LIMITS(T, MIN, MAX, EPS, DENORM, DIGITS)                      \
  template <> struct numeric_limits<T> {                                       \
    static constexpr constant bool is_specialized = true;                      \
    static constexpr constant bool is_signed = true;                           \
    static constexpr constant bool is_integer = false;                         \
    static constexpr constant bool is_exact = false;                           \
    static constexpr constant bool has_infinity = true;                        \
    static constexpr constant bool has_quiet_NaN = true;                       \
    static constexpr constant int digits = DIGITS;                             \
    static constexpr T min() { return T(MIN); }                                \
    static constexpr T max() { return T(MAX); }                                \
    static constexpr T lowest() { return T(-(MAX)); }                          \
    static constexpr T epsilon() { return T(EPS); }                            \
    static constexpr T round_error() { return T(0.5f); }                       \
    static constexpr T infinity() { return T(__builtin_inff()); }              \
    static constexpr T quiet_NaN() { return T(__builtin_nanf("")); }           \
    static constexpr T signaling_NaN() { return T(__builtin_nansf("")); }      \
    static constexpr T denorm_min() { return T(DENORM); }                      \
  };
__MTL_FP_LIMITS(half, 6.103515625e-05f, 65504.0f, 9.765625e-04f, 5.9604644775390625e-08f, 11)
__MTL_FP_LIMITS(float, 1.17549435e-38f, 3.40282347e+38f, 1.1920929e-07f, 1.40129846e-45f, 24)
__MTL_FP_LIMITS(bfloat, 1.17549435e-38f, 3.38953139e+38f, 7.8125e-03f, 9.18354962e-41f, 8)
#undef __MTL_FP_LIMITS
} // namespace metal

// ---- constants (MSL 6.5.1) ------------------------------------------------------
#define MAXFLOAT 3.40282347e+38f
#define HUGE_VALF __builtin_huge_valf()
#define HUGE_VALH ((half)__builtin_huge_valf())
#define INFINITY __builtin_inff()
#define NAN __builtin_nanf("")
#define FLT_DIG 6
#define FLT_MANT_DIG 24
#define FLT_MAX 3.40282347e+38f
#define FLT_MIN 1.17549435e-38f
#define FLT_EPSILON 1.1920929e-07f
#define FLT_MAX_EXP 128
#define FLT_MIN_EXP -125
#define HALF_MAX ((half)65504.0f)
#define HALF_MIN ((half)6.103515625e-05f)
#define HALF_EPSILON ((half)9.765625e-04f)
#define CHAR_BIT 8
#define SCHAR_MAX 127
#define SCHAR_MIN (-128)
#define UCHAR_MAX 255
#define CHAR_MAX SCHAR_MAX
#define CHAR_MIN SCHAR_MIN
#define SHRT_MAX 32767
#define SHRT_MIN (-32768)
#define USHRT_MAX 65535
#define INT_MAX 2147483647
#define INT_MIN (-2147483647 - 1)
#define UINT_MAX 4294967295u
#define LONG_MAX 9223372036854775807L
#define LONG_MIN (-9223372036854775807L - 1)
#define ULONG_MAX 18446744073709551615UL
#define M_E_F 2.71828182845904523536028747135266250f
#define M_LOG2E_F 1.44269504088896340735992468100189214f
#define M_LOG10E_F 0.434294481903251827651128918916605082f
#define M_LN2_F 0.693147180559945309417232121458176568f
#define M_LN10_F 2.30258509299404568401799145468436421f
#define M_PI_F 3.14159265358979323846264338327950288f
#define M_PI_2_F 1.57079632679489661923132169163975144f
#define M_PI_4_F 0.785398163397448309615660845819875721f
#define M_1_PI_F 0.318309886183790671537767526745028724f
#define M_2_PI_F 0.636619772367581343075535053490057448f
#define M_2_SQRTPI_F 1.12837916709551257389615890312154517f
#define M_SQRT2_F 1.41421356237309504880168872420969808f
#define M_SQRT1_2_F 0.707106781186547524400844362104849039f
#define M_E_H ((half)M_E_F)
#define M_LOG2E_H ((half)M_LOG2E_F)
#define M_LOG10E_H ((half)M_LOG10E_F)
#define M_LN2_H ((half)M_LN2_F)
#define M_LN10_H ((half)M_LN10_F)
#define M_PI_H ((half)M_PI_F)
#define M_PI_2_H ((half)M_PI_2_F)
#define M_PI_4_H ((half)M_PI_4_F)
#define M_1_PI_H ((half)M_1_PI_F)
#define M_2_PI_H ((half)M_2_PI_F)
#define M_2_SQRTPI_H ((half)M_2_SQRTPI_F)
#define M_SQRT2_H ((half)M_SQRT2_F)
#define M_SQRT1_2_H ((half)M_SQRT1_2_F)

namespace metal {
// ---- as_type<T> (MSL 2.19): reinterpret bits; sizes must match -------------------
template <typename T, typename U>
constexpr T as_type(U x) {
  static_assert(sizeof(T) == sizeof(U),
                "as_type<T>(x): T and the type of x must have the same size");
  return __builtin_bit_cast(T, x);
}

// ---- Metal vector constructors: float4(a, b, c, d), float4(x), half4(float4) ------
namespace __detail {
template <typename V, typename A>
constexpr void __put(thread V& r, thread int& i, A a) {
  static_assert(is_arithmetic_v<A> || __vt<A>::is_vec,
                "vector constructor arguments must be scalars or vectors");
  if constexpr (__vt<A>::is_vec) {
    for (int k = 0; k < __vt<A>::n; ++k)
      r[i++] = static_cast<typename __vt<V>::elem>(a[k]);
  } else {
    r[i++] = static_cast<typename __vt<V>::elem>(a);
  }
}
template <typename V, typename A>
constexpr V __ctor1(A a) {
  if constexpr (__vt<A>::is_vec) {
    return __builtin_convertvector(a, V);
  } else {
    return V(static_cast<typename __vt<V>::elem>(a));
  }
}
} // namespace __detail

template <typename V, typename... A>
constexpr V __metal_vector_ctor(A... a) {
  constexpr int N = __detail::__vt<V>::n;
  static_assert(__detail::__vt<V>::is_vec, "not a vector type");
  if constexpr (sizeof...(A) == 0) {
    return V(0);
  } else if constexpr (sizeof...(A) == 1) {
    // float4(x): x a scalar (replicated) or a vector of the same length (converted)
    static_assert(((is_arithmetic_v<A> ||
                    (__detail::__vt<A>::is_vec && __detail::__vt<A>::n == N)) && ...),
                  "vector constructor with one argument needs a scalar or a "
                  "vector with the same number of components");
    return __detail::__ctor1<V>(a...);
  } else {
    static_assert((__detail::__vt<A>::n + ...) == N,
                  "vector constructor: the arguments do not have exactly as many "
                  "components as the vector");
    V r = V(0);
    int i = 0;
    (__detail::__put(r, i, a), ...);
    return r;
  }
}
} // namespace metal
using metal::__metal_vector_ctor;

// ---- math, common, integer, relational, geometric functions (MSL 6.3-6.7) -------
// Declared as the overload sets the specification lists: each function for half,
// float and bfloat (MLX adds the bfloat ones) and their 2/3/4-vectors.
#define __MTL_FP1(F, T)  T F(T); T##2 F(T##2); T##3 F(T##3); T##4 F(T##4);
#define __MTL_FP2(F, T)  T F(T, T); T##2 F(T##2, T##2); T##3 F(T##3, T##3); T##4 F(T##4, T##4);
#define __MTL_FP3(F, T)  T F(T, T, T); T##2 F(T##2, T##2, T##2); T##3 F(T##3, T##3, T##3); T##4 F(T##4, T##4, T##4);
#define __MTL_FP1_B(F, T) bool F(T); bool2 F(T##2); bool3 F(T##3); bool4 F(T##4);
#define __MTL_FP2_B(F, T) bool F(T, T); bool2 F(T##2, T##2); bool3 F(T##3, T##3); bool4 F(T##4, T##4);
#define __MTL_FP1_I(F, T) int F(T); int2 F(T##2); int3 F(T##3); int4 F(T##4);
#define __MTL_FP_LDEXP(F, T) T F(T, int); T##2 F(T##2, int2); T##3 F(T##3, int3); T##4 F(T##4, int4);
#define __MTL_FP_MIX(F, T) T F(T, T, T); T##2 F(T##2, T##2, T##2); T##3 F(T##3, T##3, T##3); T##4 F(T##4, T##4, T##4); \
  T##2 F(T##2, T##2, T); T##3 F(T##3, T##3, T); T##4 F(T##4, T##4, T);
#define __MTL_FOR_HFB(M, F) M(F, half) M(F, float) M(F, bfloat)
#define __MTL_FOR_F(M, F) M(F, float)
#define __MTL_FOR_INT(M, F) M(F, char) M(F, uchar) M(F, short) M(F, ushort) M(F, int) M(F, uint) M(F, long) M(F, ulong)

// unary floating-point functions (metal::, metal::fast::, metal::precise::)
#define __MTL_UNARY_FP_LIST(X, FOR)                                                   \
  X(acos, FOR) X(acosh, FOR) X(asin, FOR) X(asinh, FOR) X(atan, FOR) X(atanh, FOR)   \
  X(ceil, FOR) X(cos, FOR) X(cosh, FOR) X(cospi, FOR) X(exp, FOR) X(exp2, FOR)       \
  X(exp10, FOR) X(fabs, FOR) X(floor, FOR) X(fract, FOR) X(log, FOR) X(log2, FOR)    \
  X(log10, FOR) X(rint, FOR) X(round, FOR) X(rsqrt, FOR) X(sin, FOR) X(sinh, FOR)    \
  X(sinpi, FOR) X(sqrt, FOR) X(tan, FOR) X(tanh, FOR) X(tanpi, FOR) X(trunc, FOR)    \
  X(saturate, FOR)
#define __MTL_BINARY_FP_LIST(X, FOR)                                                  \
  X(atan2, FOR) X(copysign, FOR) X(fdim, FOR) X(fmax, FOR) X(fmin, FOR) X(fmod, FOR) \
  X(nextafter, FOR) X(pow, FOR) X(powr, FOR) X(divide, FOR)
#define __MTL_TERNARY_FP_LIST(X, FOR) X(fma, FOR) X(fmax3, FOR) X(fmin3, FOR) X(fmedian3, FOR)
#define __MTL_X1(F, FOR) FOR(__MTL_FP1, F)
#define __MTL_X2(F, FOR) FOR(__MTL_FP2, F)
#define __MTL_X3(F, FOR) FOR(__MTL_FP3, F)

namespace metal {
__MTL_UNARY_FP_LIST(__MTL_X1, __MTL_FOR_HFB)
__MTL_BINARY_FP_LIST(__MTL_X2, __MTL_FOR_HFB)
__MTL_TERNARY_FP_LIST(__MTL_X3, __MTL_FOR_HFB)
__MTL_FOR_HFB(__MTL_FP1_I, ilogb)
__MTL_FOR_HFB(__MTL_FP_LDEXP, ldexp)

// abs/min/max/clamp/... exist for floating-point and integer types
__MTL_FOR_HFB(__MTL_FP1, abs)
__MTL_FOR_HFB(__MTL_FP2, min)
__MTL_FOR_HFB(__MTL_FP2, max)
__MTL_FOR_HFB(__MTL_FP3, min3)
__MTL_FOR_HFB(__MTL_FP3, max3)
__MTL_FOR_HFB(__MTL_FP3, median3)
__MTL_FOR_HFB(__MTL_FP_MIX, clamp)
// common functions (MSL 6.3)
__MTL_FOR_HFB(__MTL_FP_MIX, mix)
__MTL_FOR_HFB(__MTL_FP1, sign)
__MTL_FOR_HFB(__MTL_FP3, smoothstep)
__MTL_FOR_HFB(__MTL_FP2, step)
// relational functions (MSL 6.5)
__MTL_FOR_HFB(__MTL_FP1_B, isfinite)
__MTL_FOR_HFB(__MTL_FP1_B, isinf)
__MTL_FOR_HFB(__MTL_FP1_B, isnan)
__MTL_FOR_HFB(__MTL_FP1_B, isnormal)
__MTL_FOR_HFB(__MTL_FP1_B, signbit)
__MTL_FOR_HFB(__MTL_FP2_B, isordered)
__MTL_FOR_HFB(__MTL_FP2_B, isunordered)

// integer functions (MSL 6.4)
__MTL_FOR_INT(__MTL_FP1, abs)
__MTL_FOR_INT(__MTL_FP2, absdiff)
__MTL_FOR_INT(__MTL_FP2, addsat)
__MTL_FOR_INT(__MTL_FP2, subsat)
__MTL_FOR_INT(__MTL_FP_MIX, clamp)
__MTL_FOR_INT(__MTL_FP1, clz)
__MTL_FOR_INT(__MTL_FP1, ctz)
__MTL_FOR_INT(__MTL_FP1, popcount)
__MTL_FOR_INT(__MTL_FP1, reverse_bits)
__MTL_FOR_INT(__MTL_FP2, hadd)
__MTL_FOR_INT(__MTL_FP2, rhadd)
__MTL_FOR_INT(__MTL_FP2, max)
__MTL_FOR_INT(__MTL_FP2, min)
__MTL_FOR_INT(__MTL_FP3, max3)
__MTL_FOR_INT(__MTL_FP3, min3)
__MTL_FOR_INT(__MTL_FP3, median3)
__MTL_FOR_INT(__MTL_FP2, mulhi)
__MTL_FOR_INT(__MTL_FP3, madhi)
__MTL_FOR_INT(__MTL_FP3, madsat)
__MTL_FOR_INT(__MTL_FP2, rotate)
int mul24(int, int); uint mul24(uint, uint);
int mad24(int, int, int); uint mad24(uint, uint, uint);
#define __MTL_BITS(F, T)                                                        \
  T extract_bits(T x, uint offset, uint bits);                                  \
  T##2 extract_bits(T##2 x, uint offset, uint bits);                            \
  T##3 extract_bits(T##3 x, uint offset, uint bits);                            \
  T##4 extract_bits(T##4 x, uint offset, uint bits);                            \
  T insert_bits(T base, T insert, uint offset, uint bits);                      \
  T##2 insert_bits(T##2 base, T##2 insert, uint offset, uint bits);             \
  T##3 insert_bits(T##3 base, T##3 insert, uint offset, uint bits);             \
  T##4 insert_bits(T##4 base, T##4 insert, uint offset, uint bits);
__MTL_FOR_INT(__MTL_BITS, _)
#undef __MTL_BITS

// relational functions on vectors: all/any/select (bool vectors; clang's vector
// comparisons give integer vectors, which are accepted too)
bool all(bool x);
bool any(bool x);
template <typename T, typename = enable_if_t<is_vector_v<T> && is_integral_v<make_scalar_t<T>>>>
bool all(T x);
template <typename T, typename = enable_if_t<is_vector_v<T> && is_integral_v<make_scalar_t<T>>>>
bool any(T x);
template <typename T, typename C,
          typename = enable_if_t<(is_arithmetic_v<make_scalar_t<T>>) &&
                                 is_integral_v<make_scalar_t<C>> &&
                                 vec_elements<C>::value == vec_elements<T>::value>>
T select(T a, T b, C c);
template <typename T, typename = enable_if_t<is_vector_v<T>>>
T select(T a, T b, bool c);

// geometric functions (MSL 6.7)
#define __MTL_GEO(F, T)                                                                \
  T dot(T##2, T##2); T dot(T##3, T##3); T dot(T##4, T##4);                             \
  T length(T##2); T length(T##3); T length(T##4);                                      \
  T length_squared(T##2); T length_squared(T##3); T length_squared(T##4);              \
  T distance(T##2, T##2); T distance(T##3, T##3); T distance(T##4, T##4);              \
  T distance_squared(T##2, T##2); T distance_squared(T##3, T##3); T distance_squared(T##4, T##4); \
  T##2 normalize(T##2); T##3 normalize(T##3); T##4 normalize(T##4);                    \
  T##3 cross(T##3, T##3);                                                              \
  T##2 reflect(T##2, T##2); T##3 reflect(T##3, T##3); T##4 reflect(T##4, T##4);        \
  T##2 faceforward(T##2, T##2, T##2); T##3 faceforward(T##3, T##3, T##3); T##4 faceforward(T##4, T##4, T##4);
__MTL_FOR_HFB(__MTL_GEO, _)
#define __MTL_DOT_INT(F, T) T dot(T##2, T##2); T dot(T##3, T##3); T dot(T##4, T##4);
__MTL_FOR_INT(__MTL_DOT_INT, _)
#undef __MTL_DOT_INT

// sincos / frexp / modf write through a thread reference
#define __MTL_OUT(F, T)                                                        \
  T sincos(T x, thread T& cosval); T##2 sincos(T##2 x, thread T##2& cosval);   \
  T##3 sincos(T##3 x, thread T##3& cosval); T##4 sincos(T##4 x, thread T##4& cosval); \
  T modf(T x, thread T& intval); T##2 modf(T##2 x, thread T##2& intval);       \
  T##3 modf(T##3 x, thread T##3& intval); T##4 modf(T##4 x, thread T##4& intval); \
  T frexp(T x, thread int& e); T##2 frexp(T##2 x, thread int2& e);             \
  T##3 frexp(T##3 x, thread int3& e); T##4 frexp(T##4 x, thread int4& e);
__MTL_FOR_HFB(__MTL_OUT, _)

// metal::fast and metal::precise declare the float functions of metal:: again.
#define __MTL_FLOAT_ONLY_FUNCS \
  __MTL_UNARY_FP_LIST(__MTL_X1, __MTL_FOR_F) \
  __MTL_BINARY_FP_LIST(__MTL_X2, __MTL_FOR_F) \
  __MTL_TERNARY_FP_LIST(__MTL_X3, __MTL_FOR_F) \
  __MTL_FOR_F(__MTL_FP2, min) \
  __MTL_FOR_F(__MTL_FP2, max) \
  __MTL_FOR_F(__MTL_FP_MIX, clamp) \
  __MTL_FOR_F(__MTL_OUT, _) \
  float length(float2); float length(float3); float length(float4); \
  float distance(float2, float2); float distance(float3, float3); float distance(float4, float4); \
  float2 normalize(float2); float3 normalize(float3); float4 normalize(float4);
namespace fast {
__MTL_FLOAT_ONLY_FUNCS
} // namespace fast
namespace precise {
__MTL_FLOAT_ONLY_FUNCS
} // namespace precise
#undef __MTL_FLOAT_ONLY_FUNCS
#undef __MTL_OUT
#undef __MTL_GEO

// ---- synchronization (MSL 6.9) ---------------------------------------------------
enum class mem_flags {
  mem_none = 0,
  mem_device = 1,
  mem_threadgroup = 2,
  mem_texture = 4,
  mem_threadgroup_imageblock = 8,
  mem_object_data = 16,
};
constexpr mem_flags operator|(mem_flags a, mem_flags b) {
  return mem_flags(int(a) | int(b));
}
constexpr mem_flags operator&(mem_flags a, mem_flags b) {
  return mem_flags(int(a) & int(b));
}
void threadgroup_barrier(mem_flags flags);
void simdgroup_barrier(mem_flags flags);
enum class thread_scope { thread_scope_thread, thread_scope_simdgroup, thread_scope_threadgroup, thread_scope_device };
void atomic_thread_fence(mem_flags flags, int order, thread_scope scope = thread_scope::thread_scope_device);

// ---- SIMD-group and quad-group functions (MSL 6.9.2) -----------------------------
// T: a scalar or vector of half, float, bfloat or an integer type up to 32 bits.
namespace __detail {
template <typename T>
struct __simd_ok
    : bool_constant<(is_arithmetic_v<make_scalar_t<T>> &&
                     !is_same_v<make_scalar_t<T>, bool> &&
                     !is_same_v<make_scalar_t<T>, double> &&
                     sizeof(make_scalar_t<T>) <= 4)> {};
template <typename T>
struct __simd_int_ok
    : bool_constant<(is_integral_v<make_scalar_t<T>> &&
                     !is_same_v<make_scalar_t<T>, bool> &&
                     sizeof(make_scalar_t<T>) <= 4)> {};
} // namespace __detail
#define __MTL_SIMD_T template <typename T, typename = enable_if_t<__detail::__simd_ok<T>::value>>
#define __MTL_SIMD_INT_T template <typename T, typename = enable_if_t<__detail::__simd_int_ok<T>::value>>

struct simd_vote {
  typedef uint64_t vote_t;
  explicit constexpr simd_vote(vote_t v = 0) : v(v) {}
  explicit constexpr operator vote_t() const { return v; }
  bool all() const;
  bool any() const;
  vote_t v;
};
struct quad_vote {
  typedef ushort vote_t;
  explicit constexpr quad_vote(vote_t v = 0) : v(v) {}
  explicit constexpr operator vote_t() const { return v; }
  bool all() const;
  bool any() const;
  vote_t v;
};

#define __MTL_GROUP_FUNCS(P, VOTE)                                             \
  __MTL_SIMD_T T P##_sum(T data);                                              \
  __MTL_SIMD_T T P##_product(T data);                                          \
  __MTL_SIMD_T T P##_max(T data);                                              \
  __MTL_SIMD_T T P##_min(T data);                                              \
  __MTL_SIMD_INT_T T P##_and(T data);                                          \
  __MTL_SIMD_INT_T T P##_or(T data);                                           \
  __MTL_SIMD_INT_T T P##_xor(T data);                                          \
  __MTL_SIMD_T T P##_prefix_inclusive_sum(T data);                             \
  __MTL_SIMD_T T P##_prefix_exclusive_sum(T data);                             \
  __MTL_SIMD_T T P##_prefix_inclusive_product(T data);                         \
  __MTL_SIMD_T T P##_prefix_exclusive_product(T data);                         \
  __MTL_SIMD_T T P##_broadcast(T data, ushort broadcast_lane_id);              \
  __MTL_SIMD_T T P##_broadcast_first(T data);                                  \
  __MTL_SIMD_T T P##_shuffle(T data, ushort simd_lane_id);                     \
  __MTL_SIMD_T T P##_shuffle_xor(T data, ushort mask);                         \
  __MTL_SIMD_T T P##_shuffle_up(T data, ushort delta);                         \
  __MTL_SIMD_T T P##_shuffle_down(T data, ushort delta);                       \
  __MTL_SIMD_T T P##_shuffle_rotate_up(T data, ushort delta);                  \
  __MTL_SIMD_T T P##_shuffle_rotate_down(T data, ushort delta);                \
  __MTL_SIMD_T T P##_shuffle_and_fill_up(T data, T filling_data, ushort delta); \
  __MTL_SIMD_T T P##_shuffle_and_fill_up(T data, T filling_data, ushort delta, ushort modulo); \
  __MTL_SIMD_T T P##_shuffle_and_fill_down(T data, T filling_data, ushort delta); \
  __MTL_SIMD_T T P##_shuffle_and_fill_down(T data, T filling_data, ushort delta, ushort modulo); \
  bool P##_all(bool expr);                                                     \
  bool P##_any(bool expr);                                                     \
  VOTE P##_ballot(bool expr);                                                  \
  VOTE P##_active_threads_mask();                                              \
  bool P##_is_first();
__MTL_GROUP_FUNCS(simd, simd_vote)
__MTL_GROUP_FUNCS(quad, quad_vote)
#undef __MTL_GROUP_FUNCS

// ---- atomics (MSL 6.15) -------------------------------------------------------------
enum memory_order {
  memory_order_relaxed,
  memory_order_acquire,
  memory_order_release,
  memory_order_acq_rel,
  memory_order_seq_cst,
};
template <typename T>
struct _atomic {
  static_assert(is_same_v<T, int> || is_same_v<T, uint> || is_same_v<T, bool> ||
                    is_same_v<T, float> || is_same_v<T, ulong> || is_same_v<T, long>,
                "Metal atomics exist for int, uint, bool, float (and ulong/long min/max)");
  _atomic() = default;
  _atomic(const thread _atomic&) = delete;
  T __value;
};
template <typename T> using atomic = _atomic<T>;
typedef atomic<int> atomic_int;
typedef atomic<uint> atomic_uint;
typedef atomic<bool> atomic_bool;
typedef atomic<float> atomic_float;
typedef atomic<ulong> atomic_ulong;
typedef atomic<long> atomic_long;

#define __MTL_ATOMIC_FUNCS(AS)                                                                 \
  template <typename T> void atomic_init(AS _atomic<T>* object, type_identity_t<T> desired);   \
  template <typename T>                                                                        \
  void atomic_store_explicit(volatile AS _atomic<T>* object, type_identity_t<T> desired,       \
                             memory_order order);                                              \
  template <typename T>                                                                        \
  T atomic_load_explicit(const volatile AS _atomic<T>* object, memory_order order);            \
  template <typename T>                                                                        \
  T atomic_exchange_explicit(volatile AS _atomic<T>* object, type_identity_t<T> desired,       \
                             memory_order order);                                              \
  template <typename T>                                                                        \
  bool atomic_compare_exchange_weak_explicit(volatile AS _atomic<T>* object,                   \
                                             thread type_identity_t<T>* expected,              \
                                             type_identity_t<T> desired,                       \
                                             memory_order succ, memory_order fail);            \
  template <typename T>                                                                        \
  bool atomic_compare_exchange_strong_explicit(volatile AS _atomic<T>* object,                 \
                                               thread type_identity_t<T>* expected,            \
                                               type_identity_t<T> desired,                     \
                                               memory_order succ, memory_order fail);          \
  template <typename T> T atomic_fetch_add_explicit(volatile AS _atomic<T>* object,            \
                                                    type_identity_t<T> operand, memory_order order); \
  template <typename T> T atomic_fetch_sub_explicit(volatile AS _atomic<T>* object,            \
                                                    type_identity_t<T> operand, memory_order order); \
  template <typename T> T atomic_fetch_and_explicit(volatile AS _atomic<T>* object,            \
                                                    type_identity_t<T> operand, memory_order order); \
  template <typename T> T atomic_fetch_or_explicit(volatile AS _atomic<T>* object,             \
                                                   type_identity_t<T> operand, memory_order order); \
  template <typename T> T atomic_fetch_xor_explicit(volatile AS _atomic<T>* object,            \
                                                    type_identity_t<T> operand, memory_order order); \
  template <typename T> T atomic_fetch_min_explicit(volatile AS _atomic<T>* object,            \
                                                    type_identity_t<T> operand, memory_order order); \
  template <typename T> T atomic_fetch_max_explicit(volatile AS _atomic<T>* object,            \
                                                    type_identity_t<T> operand, memory_order order);
__MTL_ATOMIC_FUNCS(device)
__MTL_ATOMIC_FUNCS(threadgroup)
#undef __MTL_ATOMIC_FUNCS
} // namespace metal

#undef __MTL_SIMD_T
#undef __MTL_SIMD_INT_T

// Metal has no double precision (MSL 2.1: double is not supported).
#define double __metal_has_no_double_type

#endif // __MLX_FOUNDRY_METAL_STDLIB_STUB__
