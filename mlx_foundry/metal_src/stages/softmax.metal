// Numerically stable row softmax (float accumulation, output in T).
// Needs utils/reduce.metal and utils/row_io.metal.
//
// One threadgroup of THREADS threads (a multiple of 32) per row of n_cols
// elements (a runtime value, so attention lengths do not recompile); rows on
// grid x. Pass 1 keeps a running (max, sum of exp) per thread (online
// softmax), merged across the threadgroup; pass 2 writes exp(x - max) / sum.
// Rows whose length in bytes is a multiple of 16 use 16-byte accesses.

template <typename T, int E, int THREADS>
METAL_FUNC void softmax_row(const device T* xr, device T* outr, uint nch, uint tid,
                            threadgroup float* softmax_scratch) {
  float m = -INFINITY;
  float s = 0.0f;
  for (uint c = tid; c < nch; c += uint(THREADS)) {
    float t[E];
    RowIO<T, E>::load(xr, c, t);
    float cm = t[0];
    for (int e = 1; e < E; ++e) cm = metal::max(cm, t[e]);
    float nm = metal::max(m, cm);
    if (nm == -INFINITY) {
      continue;  // nothing but -inf so far
    }
    float cs = 0.0f;
    for (int e = 0; e < E; ++e) cs += metal::exp(t[e] - nm);
    s = (m == -INFINITY ? 0.0f : s * metal::exp(m - nm)) + cs;
    m = nm;
  }
  uint lane = tid & 31u;
  uint group = tid >> 5;
  constexpr uint NSIMD = uint(THREADS / 32);
  float gm = threadgroup_max(m, softmax_scratch, lane, group, NSIMD);
  float part = m == -INFINITY ? 0.0f : s * metal::exp(m - gm);
  float gs = threadgroup_sum(part, softmax_scratch, lane, group, NSIMD);
  float inv = 1.0f / gs;
  for (uint c = tid; c < nch; c += uint(THREADS)) {
    float t[E];
    RowIO<T, E>::load(xr, c, t);
    for (int e = 0; e < E; ++e) t[e] = metal::exp(t[e] - gm) * inv;
    RowIO<T, E>::store(outr, c, t);
  }
}

template <typename T, int THREADS>
METAL_FUNC void softmax_rows(const device T* x, device T* out, uint n_rows, uint n_cols,
                             uint3 tgid, uint tid, threadgroup float* softmax_scratch) {
  uint row = tgid.x;
  if (row >= n_rows) {
    return;
  }
  size_t base = size_t(row) * size_t(n_cols);
  constexpr int E = RowVec<T>::E;
  if ((n_cols % uint(E)) == 0u) {
    softmax_row<T, E, THREADS>(x + base, out + base, n_cols / uint(E), tid, softmax_scratch);
  } else {
    softmax_row<T, 1, THREADS>(x + base, out + base, n_cols, tid, softmax_scratch);
  }
}
