// Metal-dialect sample kernel for the CUDA compat prelude (tests/test_cuda_compat.py).
//
// One text, two backends: the "header" section is what we pass as header= (on
// CUDA after cuda_compat.wrap_header()), the "body" section is the kernel body
// (source=). The "threadgroup" section lists threadgroup arrays the body uses,
// one per line as "<type> <name> <count>"; the generator turns each into
// `threadgroup float partial[32];` on Metal and
// cuda_compat.shared_declaration() on CUDA.
//
// Kernel contract (both backends):
//   template args: T (dtype of x, w, out), BLOCK (threads per threadgroup, multiple of 32)
//   inputs:  x (T, [rows, n]), w (T, [n]), params (uint32 x 2: n, float bits of eps),
//            wq (uint32, packed 4-bit weights: n/8 words), wscale (T, [1])
//   outputs: out (T, [rows, n]) = rms_norm(x) * w, dq (float, [n]) = dequantized wq,
//            checks (float, [rows, 4]) = dialect exercise results
//   grid: (BLOCK, rows, 1), threadgroup: (BLOCK, 1, 1)
//
// ==== header ====
// Parameter struct: normally injected by structs.py.
struct SampleParams {
  uint n;
  float eps;
};

// A templated load helper: pointer type templated so that it accepts both
// `device` and `constant` inputs on Metal.
template <typename T>
METAL_FUNC float4 load_float4(const device T* p, uint i) {
  return float4(float(p[i]), float(p[i + 1]), float(p[i + 2]), float(p[i + 3]));
}

// Wide load: reinterpret as a 4-vector of the storage type, convert once.
template <typename T>
METAL_FUNC float4 load_vec4(const device T* p, uint i) {
  return float4(*reinterpret_cast<const device vec<T, 4>*>(p + i));
}

// 4-bit dequantization of one uint32 word (8 values) with as_type.
METAL_FUNC void dequant_word(uint word, float scale, thread float* out8) {
  uchar4 bytes = as_type<uchar4>(word);
  for (int i = 0; i < 4; ++i) {
    uint b = bytes[i];
    out8[2 * i] = scale * float(b & 0xfu);
    out8[2 * i + 1] = scale * float(b >> 4);
  }
}

// Reduce one float across the threadgroup through threadgroup memory.
template <int BLOCK>
METAL_FUNC float threadgroup_sum(float v, threadgroup float* partial, uint simd_lane, uint simd_group) {
  v = simd_sum(v);
  if (simd_lane == 0) {
    partial[simd_group] = v;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (simd_group == 0) {
    float s = simd_lane < uint(BLOCK / 32) ? partial[simd_lane] : 0.0f;
    s = simd_sum(s);
    if (simd_lane == 0) {
      partial[0] = s;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float total = partial[0];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  return total;
}

// The stage: RMSNorm of one row times a weight vector.
template <typename T, int BLOCK>
METAL_FUNC void rms_norm_stage(
    const device T* x,
    const device T* w,
    device T* out,
    threadgroup float* partial,
    const constant SampleParams* params,
    uint tid,
    uint simd_lane,
    uint simd_group) {
  const uint n = params->n;
  float acc = 0.0f;
  uint i = tid * 4;
  for (; i + 3 < n; i += BLOCK * 4) {
    float4 v = load_float4(x, i);
    acc += dot(v, v);
  }
  for (uint j = (n & ~3u) + tid; j < n; j += BLOCK) {
    float v = static_cast<float>(x[j]);
    acc = metal::fma(v, v, acc);
  }
  float total = threadgroup_sum<BLOCK>(acc, partial, simd_lane, simd_group);
  float inv = metal::precise::rsqrt(total / float(n) + params->eps);
  for (uint j = tid; j < n; j += BLOCK) {
    out[j] = static_cast<T>(static_cast<float>(x[j]) * inv * static_cast<float>(w[j]));
  }
}

// Touches the rest of the dialect; returns 4 floats per row.
template <typename T>
METAL_FUNC float4 dialect_exercise(const device T* x, uint n, uint lane) {
  // Scalars and conversions.
  T t = x[lane % n];
  half h = static_cast<half>(t);
  bfloat b = static_cast<bfloat>(h);
  float f = static_cast<float>(b) + h * 2.0f - h * 2;
  half hh = h + h;
  hh *= half(0.5f);
  hh += 1;
  bool flag = h > 0.0f && hh >= 0;
  float16_t h16 = h;
  bfloat16_t b16 = b;
  ushort bits = as_type<ushort>(h16);
  h16 = as_type<half>(bits);
  uint fbits = as_type<uint>(f);
  f = as_type<float>(fbits);
  int8_t i8 = -3;
  uint8_t u8 = 7;
  int16_t i16 = -300;
  uint16_t u16 = 60000;
  int32_t i32 = i8 * i16;
  uint64_t u64 = ulong(u8) + u16;
  int64_t i64 = long(i32) - long(u64);

  // Vectors: constructors, component access, arithmetic.
  float4 a = float4(1.0f, 2.0f, 3.0f, f);
  float4 splat = float4(0.5f);
  float4 splat_int = 2;
  half4 hv = half4(a);
  float4 back = float4(hv);
  bfloat4 bv = bfloat4(back);
  float2 p = float2(a.x, a.y);
  float3 q = float3(p, a.z);
  float4 r = float4(p, p) + float4(q, 1.0f) + float4(p, 0.0f, 1.0f) + float4(0.0f, q);
  r += splat;
  r *= 2.0f;
  r = -r / splat_int + back * a - float4(bv);
  r.w = r[0] + r.y;
  hv = hv * h + half4(1.0f) - hv / half(2.0f);
  hv *= half(0.25f);
  uint4 u = uint4(1u, 2u, 3u, 4u) * 3u + uint4(lane);
  u >>= 1;
  u = u & uint4(0xffu) | uint4(1u);
  int2 iv = int2(-1, 2) * 3;
  ushort2 us = ushort2(bits, ushort(lane));
  uchar4 uc = as_type<uchar4>(u.x);
  short4 sv = short4(short(1), short(-2), short(3), short(-4));
  char4 cv = char4(sv);
  uint2 packed = as_type<uint2>(hv);
  hv = as_type<half4>(packed);
  long2 lv = long2(i64, long(lane));
  ulong2 ulv = ulong2(u64);
  bool4 mask = a > splat;

  // Math (metal::, fast::, precise::, unqualified as after `using namespace metal`).
  float m = metal::exp(a.x) + metal::exp2(a.y) + metal::log(a.z + 1.0f) + metal::log2(a.w + 2.0f);
  m += sqrt(fabs(m)) + rsqrt(m * m + 1.0f) + abs(-m) + metal::abs(-1.0f);
  m += fast::exp(-m * 0.01f) + precise::exp(-m * 0.01f) + metal::fast::tanh(a.x);
  m += min(m, 1.0f) + max(m, 0.0f) + fmin(m, 2.0f) + fmax(m, -2.0f) + clamp(m, -1.0f, 1.0f);
  m += pow(2.0f, 0.5f) + sin(m) + cos(m) + tanh(m) + erf(m) + floor(m) + ceil(m) + round(m);
  m += metal::fma(m, 0.5f, 1.0f) + select(1.0f, 2.0f, m > 0.0f) + mix(0.0f, 1.0f, 0.25f);
  m += (isnan(m) ? 1.0f : 0.0f) + (isinf(m) ? 1.0f : 0.0f);
  m += min(int(lane), 3) + max(lane, 2u) + clamp(int(lane), 0, 7) + abs(-int(lane));
  float4 va = metal::exp(a * 0.1f) + metal::max(a, splat) + clamp(a, 0.0f, 1.0f) + metal::abs(-a);
  va += mix(a, splat, 0.5f) + select(a, splat, mask) + fast::exp(-a) + sqrt(a) + floor(a);
  half hm = metal::exp(h) + metal::max(h, hh) + metal::abs(h) + clamp(h, half(0.0f), half(1.0f));
  bfloat bm = metal::exp(b) + metal::max(b, b16);
  half4 hva = metal::exp(hv) + metal::max(hv, half4(h)) + metal::tanh(hv);
  m += float(hm) + float(bm) + float(hva.x) + va.y;
  m += dot(a, splat) + dot(p, p) + dot(q, q) + float(dot(hv, hv));
  m += metal::numeric_limits<float>::max() > 0.0f ? 0.0f : 1.0f;
  m += -INFINITY < m ? 0.0f : 1.0f;
  m += all(mask) ? 1.0f : 0.0f;
  m += any(mask) ? 1.0f : 0.0f;

  // SIMD-group functions for several types.
  float s = simd_sum(m) + simd_max(m) + simd_min(m);
  s += simd_prefix_inclusive_sum(m) + simd_prefix_exclusive_sum(m);
  s += simd_shuffle(m, ushort(0)) + simd_shuffle_xor(m, ushort(1));
  s += simd_shuffle_down(m, ushort(1)) + simd_shuffle_up(m, ushort(1)) + simd_broadcast(m, ushort(3));
  half hs = simd_sum(hh) + simd_max(hh) + simd_shuffle_xor(hh, ushort(2));
  bfloat bs = simd_sum(b) + simd_min(b) + simd_shuffle_down(b, ushort(1));
  int is = simd_sum(int(lane)) + simd_max(int(lane)) + simd_prefix_exclusive_sum(int(lane));
  uint uis = simd_sum(lane) + simd_min(lane) + simd_broadcast(lane, ushort(0));
  float4 s4 = simd_sum(a) + simd_shuffle_xor(a, ushort(4));
  half4 hs4 = simd_sum(hv);
  ushort uss = simd_shuffle(us.x, ushort(5));
  bool all_ok = simd_all(flag) || simd_any(!flag);
  simdgroup_barrier(mem_flags::mem_none);

  float misc = float(i8 + u8 + i16 + u16) + float(iv.x + iv.y) + float(uc.x + us.y + uss) +
      float(sv.w + cv.y) + float(lv.x + long(ulv.y)) + float(u.w) + r.x + r.w;
  return float4(s + float(hs) + float(bs), float(is) + float(uis) + s4.x + float(hs4.y),
                misc + (all_ok ? 1.0f : 0.0f), m);
}
// ==== threadgroup ====
float partial 32
// ==== body ====
const uint tid = thread_position_in_threadgroup.x;
const uint row = threadgroup_position_in_grid.y;
const uint simd_lane = thread_index_in_simdgroup;
const uint simd_group = simdgroup_index_in_threadgroup;
const constant SampleParams* p = reinterpret_cast<const constant SampleParams*>(params);
const uint n = p->n;
if (row >= threads_per_grid.y) {
  return;
}
rms_norm_stage<T, BLOCK>(x + row * n, w, out + row * n, partial, p, tid, simd_lane, simd_group);
if (row == 0) {
  float scale = static_cast<float>(wscale[0]);
  for (uint k = tid; k < n / 8; k += BLOCK) {
    thread float vals[8];
    dequant_word(wq[k], scale, vals);
    for (int e = 0; e < 8; ++e) {
      dq[k * 8 + e] = vals[e];
    }
  }
}
float4 wide = (n % 4 == 0 && n >= 4) ? load_vec4(x + row * n, 0) : float4(0.0f);
float4 c = dialect_exercise<T>(x + row * n, n, simd_lane) + wide * 0.0f;
if (tid == 0) {
  checks[row * 4 + 0] = c.x;
  checks[row * 4 + 1] = c.y;
  checks[row * 4 + 2] = c.z;
  checks[row * 4 + 3] = c.w;
}
