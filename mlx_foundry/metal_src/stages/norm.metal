// RMSNorm: standalone row kernels and the fusion prologue.
// Needs utils/reduce.metal and utils/row_io.metal.
//
// One threadgroup of THREADS threads (a multiple of 32) per row of K elements.
// Rows whose length in bytes is a multiple of 16 are read and written with
// 16-byte vector accesses; the row is kept in registers between the
// sum-of-squares pass and the scaling pass when it takes at most
// RMS_KEEP_FLOATS floats per thread, and read again (from cache) otherwise.

constant constexpr int RMS_KEEP_FLOATS = 64;

// Sum of squares of one row, accumulated in float. When KEEP, every chunk of the
// thread is loaded first (ITEMS independent loads in flight) and kept packed in
// `keep` for the scaling pass. Returns this thread's partial sum.
template <typename T, int E, int NCH, int ITEMS, int THREADS, bool KEEP>
METAL_FUNC float rms_row_sumsq(const device T* xr, uint tid,
                               thread typename RowIO<T, E>::Raw* keep) {
  typedef RowIO<T, E> IO;
  float ss = 0.0f;
  if (KEEP) {
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      uint c = tid + uint(i * THREADS);
      keep[i] = (NCH % THREADS == 0 || c < uint(NCH)) ? IO::load_raw(xr, c) : IO::zero();
    }
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      float t[E];
      IO::unpack(keep[i], t);
      for (int e = 0; e < E; ++e) ss += t[e] * t[e];
    }
    return ss;
  }
  for (int i = 0; i < ITEMS; ++i) {
    uint c = tid + uint(i * THREADS);
    float t[E];
    if (c < uint(NCH)) {
      IO::load(xr, c, t);
    } else {
      for (int e = 0; e < E; ++e) t[e] = 0.0f;
    }
    for (int e = 0; e < E; ++e) ss += t[e] * t[e];
  }
  return ss;
}

// One chunk of the scaling pass: T(w * T(x * inv)), as mx.fast.rms_norm rounds.
template <typename T, int E, bool HAS_W>
struct RmsScale {
  typedef typename RowIO<T, E>::Raw Raw;
  static METAL_FUNC Raw apply(Raw xr, Raw wr, float inv) {
    float t[E];
    RowIO<T, E>::unpack(xr, t);
    float wt[E];
    if (HAS_W) {
      RowIO<T, E>::unpack(wr, wt);
    }
    for (int e = 0; e < E; ++e) {
      float n = float(static_cast<T>(t[e] * inv));
      t[e] = HAS_W ? n * wt[e] : n;
    }
    return RowIO<T, E>::pack(t);
  }
};

// half rows, packed: n = half2(x * inv) and n * w with one HMUL2 per pair. The product
// of two halves is exact in float, so rounding it once to half (HMUL2) equals the
// generic T(float(n) * float(w)); fewer registers and instructions per chunk.
template <bool HAS_W>
struct RmsScale<half, 8, HAS_W> {
  static METAL_FUNC uint rms_word(uint xw, uint ww, float inv) {
    const half2 n = half2(float2(as_type<half2>(xw)) * inv);
    return as_type<uint>(HAS_W ? n * as_type<half2>(ww) : n);
  }
  static METAL_FUNC uint4 apply(uint4 xr, uint4 wr, float inv) {
    return uint4(rms_word(xr.x, wr.x, inv), rms_word(xr.y, wr.y, inv),
                 rms_word(xr.z, wr.z, inv), rms_word(xr.w, wr.w, inv));
  }
};

// Scales one row by inv (and the weight w when HAS_W) and stores it, rounding
// like mx.fast.rms_norm: out = T(w * T(x * inv)).
template <typename T, int E, int NCH, int ITEMS, int THREADS, bool KEEP, bool HAS_W>
METAL_FUNC void rms_row_scale(const device T* xr, const device T* w, device T* outr,
                              float inv, uint tid, thread const typename RowIO<T, E>::Raw* keep) {
  typedef RowIO<T, E> IO;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    uint c = tid + uint(i * THREADS);
    if (NCH % THREADS == 0 || c < uint(NCH)) {
      typename IO::Raw xv = KEEP ? keep[KEEP ? i : 0] : IO::load_raw(xr, c);
      typename IO::Raw wv = HAS_W ? IO::load_raw(w, c) : IO::zero();
      IO::store_raw(outr, c, RmsScale<T, E, HAS_W>::apply(xv, wv, inv));
    }
  }
}

template <typename T, int K, int THREADS, bool HAS_W, int E>
METAL_FUNC void rms_norm_rows_impl(const device T* x, const device T* w, device T* out,
                                   uint n_rows, float eps, uint row, uint tid,
                                   threadgroup float* norm_scratch) {
  constexpr int NCH = K / E;
  constexpr int ITEMS = (NCH + THREADS - 1) / THREADS;
  constexpr bool KEEP = ITEMS * E <= RMS_KEEP_FLOATS;
  if (row >= n_rows) {
    return;
  }
  const device T* xr = x + size_t(row) * size_t(K);
  typename RowIO<T, E>::Raw keep[KEEP ? ITEMS : 1];
  float ss = rms_row_sumsq<T, E, NCH, ITEMS, THREADS, KEEP>(xr, tid, keep);
  ss = threadgroup_sum(ss, norm_scratch, tid & 31u, tid >> 5, uint(THREADS / 32));
  float inv = metal::rsqrt(ss / float(K) + eps);
  rms_row_scale<T, E, NCH, ITEMS, THREADS, KEEP, HAS_W>(xr, w, out + size_t(row) * size_t(K),
                                                         inv, tid, keep);
}

// 16-byte chunks when a row is a whole number of them, else single elements.
template <typename T, int K>
struct RmsChunk {
  static constexpr int E = (K * int(sizeof(T))) % 16 == 0 ? RowVec<T>::E : 1;
};

// Standalone kernel: out[r] = rms_norm(x[r]) * w; row r = threadgroup x.
template <typename T, int K, int THREADS>
METAL_FUNC void rms_norm_rows(const device T* x, const device T* norm_weight, device T* out,
                              uint n_rows, float eps, uint3 tgid, uint tid,
                              threadgroup float* norm_scratch) {
  rms_norm_rows_impl<T, K, THREADS, true, RmsChunk<T, K>::E>(x, norm_weight, out, n_rows, eps,
                                                              tgid.x, tid, norm_scratch);
}

// Standalone kernel without weight.
template <typename T, int K, int THREADS>
METAL_FUNC void rms_norm_rows_nw(const device T* x, device T* out, uint n_rows, float eps,
                                 uint3 tgid, uint tid, threadgroup float* norm_scratch) {
  rms_norm_rows_impl<T, K, THREADS, false, RmsChunk<T, K>::E>(x, x, out, n_rows, eps, tgid.x,
                                                               tid, norm_scratch);
}

// add + RMSNorm: h = T(x + residual) is stored, and out = rms_norm(h) * w.
template <typename T, int K, int THREADS, bool HAS_W, int E>
METAL_FUNC void add_rms_norm_rows_impl(const device T* x, const device T* residual,
                                       const device T* w, device T* out, device T* h,
                                       uint n_rows, float eps, uint row, uint tid,
                                       threadgroup float* norm_scratch) {
  constexpr int NCH = K / E;
  constexpr int ITEMS = (NCH + THREADS - 1) / THREADS;
  constexpr bool KEEP = ITEMS * E <= RMS_KEEP_FLOATS;
  if (row >= n_rows) {
    return;
  }
  size_t base = size_t(row) * size_t(K);
  const device T* xr = x + base;
  const device T* rr = residual + base;
  device T* hr = h + base;
  typedef RowIO<T, E> IO;
  typename IO::Raw keep[KEEP ? ITEMS : 1];
  float ss = 0.0f;
  for (int i = 0; i < ITEMS; ++i) {
    uint c = tid + uint(i * THREADS);
    if (c < uint(NCH)) {
      float a[E];
      float b[E];
      IO::load(xr, c, a);
      IO::load(rr, c, b);
      for (int e = 0; e < E; ++e) {
        a[e] = float(static_cast<T>(a[e] + b[e]));
        ss += a[e] * a[e];
      }
      typename IO::Raw packed = IO::pack(a);
      if (KEEP) keep[i] = packed;
      IO::store_raw(hr, c, packed);
    }
  }
  ss = threadgroup_sum(ss, norm_scratch, tid & 31u, tid >> 5, uint(THREADS / 32));
  float inv = metal::rsqrt(ss / float(K) + eps);
  if (!KEEP) {
    // The second pass reads h back: make this threadgroup's stores visible.
    threadgroup_barrier(mem_flags::mem_device);
  }
  rms_row_scale<T, E, NCH, ITEMS, THREADS, KEEP, HAS_W>(hr, w, out + base, inv, tid, keep);
}

template <typename T, int K, int THREADS>
METAL_FUNC void add_rms_norm_rows(const device T* x, const device T* residual,
                                  const device T* norm_weight, device T* out, device T* h,
                                  uint n_rows, float eps, uint3 tgid, uint tid,
                                  threadgroup float* norm_scratch) {
  add_rms_norm_rows_impl<T, K, THREADS, true, RmsChunk<T, K>::E>(
      x, residual, norm_weight, out, h, n_rows, eps, tgid.x, tid, norm_scratch);
}

template <typename T, int K, int THREADS>
METAL_FUNC void add_rms_norm_rows_nw(const device T* x, const device T* residual,
                                     device T* out, device T* h, uint n_rows, float eps,
                                     uint3 tgid, uint tid, threadgroup float* norm_scratch) {
  add_rms_norm_rows_impl<T, K, THREADS, false, RmsChunk<T, K>::E>(
      x, residual, x, out, h, n_rows, eps, tgid.x, tid, norm_scratch);
}

// ---- Fusion prologue ---------------------------------------------------------
// inv_rms = rsqrt(mean(x[m]^2) + eps) for row m = threadgroup_position_in_grid.y,
// computed by the whole threadgroup (THREADS threads, a multiple of 32, with
// linear index tid). Every thread of the threadgroup must call it.
template <typename T, int K, int THREADS>
METAL_FUNC void rms_norm_inv_rms(const device T* x, float eps, thread float& inv_rms,
                                 uint3 tgid, uint tid, threadgroup float* norm_scratch) {
  constexpr int E = RmsChunk<T, K>::E;
  constexpr int NCH = K / E;
  constexpr int ITEMS = (NCH + THREADS - 1) / THREADS;
  const device T* xr = x + size_t(tgid.y) * size_t(K);
  typename RowIO<T, E>::Raw unused[1];
  float ss = rms_row_sumsq<T, E, NCH, ITEMS, THREADS, false>(xr, tid, unused);
  ss = threadgroup_sum(ss, norm_scratch, tid & 31u, tid >> 5, uint(THREADS / 32));
  inv_rms = metal::rsqrt(ss / float(K) + eps);
}

// The prologue with the norm weight argument (the main stage applies it).
template <typename T, int K, int THREADS>
METAL_FUNC void rms_norm_prologue_w(const device T* x, const device T* norm_weight, float eps,
                                    thread float& inv_rms, uint3 tgid, uint tid,
                                    threadgroup float* norm_scratch) {
  (void)norm_weight;
  rms_norm_inv_rms<T, K, THREADS>(x, eps, inv_rms, tgid, tid, norm_scratch);
}

template <typename T, int K, int THREADS>
METAL_FUNC void rms_norm_prologue(const device T* x, float eps, thread float& inv_rms,
                                  uint3 tgid, uint tid, threadgroup float* norm_scratch) {
  rms_norm_inv_rms<T, K, THREADS>(x, eps, inv_rms, tgid, tid, norm_scratch);
}
