// What programmatic dependent launch (PDL) would buy the decode kernels: a diagnostic,
// not part of the package (MLX's custom kernels do not expose PDL; see BENCHMARKS.md).
//
// A chain of streaming reads, each kernel reading its own weights (a pool of buffers
// larger than L2, rotated) and one word written by the kernel before it, as a decode
// GEMV reads x from the op before it. The access pattern is the bench's plain read
// (mlx_foundry/bench/read_probe.py): a warp reads a chunk of 32 x ITERS 16-byte words,
// lane l taking words l, l + 32, ..., all ITERS loads in flight, one chunk per warp.
// Four modes, each timed as launches on a stream and as one captured CUDA graph (as
// MLX's CUDA backend runs a token's kernels):
//   plain       ordinary launches: kernel i + 1 starts when kernel i has finished;
//   pdl-first   PDL: kernel i + 1 may be scheduled once kernel i's blocks have started,
//               and waits for it (griddepcontrol.wait) before reading anything;
//   pdl-last    PDL, reading its weights before the wait and the previous kernel's word
//               after it: a GEMV whose weight loads do not wait for x (the upper bound of
//               what overlap can hide in a chain);
//   independent PDL with no wait and no word read: kernels that do not depend on each
//               other (as the bench's calls do not, though MLX launches them without
//               PDL): the most any overlap can hide.
// Every chained mode's final words are checked against the plain chain's (the wait is
// honoured); the independent mode's are not comparable ("-").
//
//   nvcc -O3 -std=c++17 -arch=sm_90 tools/pdl_read_ab.cu -o /tmp/pdl_read_ab
//   /tmp/pdl_read_ab [calls=200] [reps=9] [MB ...]      (default sizes: the decode's)
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CHECK(call)                                                                    \
  do {                                                                                 \
    cudaError_t e_ = (call);                                                           \
    if (e_ != cudaSuccess) {                                                           \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call,                \
                   cudaGetErrorString(e_));                                            \
      std::exit(1);                                                                    \
    }                                                                                  \
  } while (0)

constexpr int ITERS = 8;         // 16-byte loads in flight per lane (the probe's default)
constexpr int THREADS = 128;     // four warps a block (the probe's default)
constexpr int WARPS = THREADS / 32;
constexpr size_t POOL_BYTES = size_t(1) << 30;  // rotated weights: ~20x the H100's L2
constexpr int MIN_POOL = 32;                    // and at least the bench's 32 sets

enum Mode { PLAIN = 0, PDL_FIRST = 1, PDL_LAST = 2, INDEPENDENT = 3 };
const char* kModeName[] = {"plain", "pdl-first", "pdl-last", "independent"};

template <int MODE>
__global__ void __launch_bounds__(THREADS) read_chain(const uint4* __restrict__ w,
                                                      unsigned n_vec,
                                                      const unsigned* prev,
                                                      unsigned* out) {
  if (MODE != PLAIN) {
    // Let the next kernel's blocks be scheduled as this kernel's blocks retire.
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  }
  if (MODE == PDL_FIRST) {
    asm volatile("griddepcontrol.wait;" ::: "memory");
  }
  const unsigned lane = threadIdx.x % 32;
  const unsigned warp = blockIdx.x * WARPS + threadIdx.x / 32;
  const unsigned first = warp * 32u * ITERS + lane;
  unsigned acc = 0;
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const unsigned i = first + unsigned(it) * 32u;
    if (i < n_vec) {
      const uint4 v = __ldg(w + i);
      acc += v.x + v.y + v.z + v.w;
    }
  }
  if (MODE == PDL_LAST) {
    // The weights are read; now the word the previous kernel wrote (x of a GEMV).
    asm volatile("griddepcontrol.wait;" ::: "memory");
  }
  acc = acc * 2654435761u + (MODE == INDEPENDENT ? 0u : *prev);
  for (int o = 16; o > 0; o /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  // One word per warp, as the probe writes its sums (an atomic on one word from every
  // warp serializes in L2 and would time the atomics, not the reads).
  if (lane == 0) out[warp] = acc;
}

struct Chain {
  std::vector<uint4*> pool;
  unsigned n_vec;
  unsigned blocks;
  unsigned n_warps;
  unsigned* sums;  // three rows of n_warps words: kernel i writes row i % 3 and reads
                   // word 0 of row (i - 1) % 3, which kernel i - 1 wrote
};

static void launch(const Chain& c, int mode, int i, cudaStream_t s) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(c.blocks);
  cfg.blockDim = dim3(THREADS);
  cfg.stream = s;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = mode != PLAIN;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  const uint4* w = c.pool[i % c.pool.size()];
  // Every kernel writes only after its wait, when the kernel before it (and so every
  // kernel before that) has finished: kernel i + 2 cannot overwrite row (i - 1) % 3
  // while kernel i still reads it.
  const unsigned* prev = c.sums + size_t((i + 2) % 3) * c.n_warps;
  unsigned* out = c.sums + size_t(i % 3) * c.n_warps;
  static void (*const kernels[])(const uint4*, unsigned, const unsigned*, unsigned*) = {
      read_chain<PLAIN>, read_chain<PDL_FIRST>, read_chain<PDL_LAST>,
      read_chain<INDEPENDENT>};
  CHECK(cudaLaunchKernelEx(&cfg, kernels[mode], w, c.n_vec, prev, out));
}

static void run(const Chain& c, int mode, int calls, cudaStream_t s) {
  CHECK(cudaMemsetAsync(c.sums, 0, 3 * sizeof(unsigned) * c.n_warps, s));
  for (int i = 0; i < calls; ++i) launch(c, mode, i, s);
}

static unsigned final_word(const Chain& c, int calls) {
  std::vector<unsigned> h(c.n_warps);
  CHECK(cudaMemcpy(h.data(), c.sums + size_t((calls - 1) % 3) * c.n_warps,
                   h.size() * sizeof(unsigned), cudaMemcpyDeviceToHost));
  unsigned x = 0;
  for (unsigned v : h) x = x * 31u + v;
  return x;
}

int main(int argc, char** argv) {
  const int calls = argc > 1 ? std::atoi(argv[1]) : 200;
  const int reps = argc > 2 ? std::atoi(argv[2]) : 9;
  std::vector<double> sizes_mb;
  for (int a = 3; a < argc; ++a) {
    char* end = nullptr;
    const double mb = std::strtod(argv[a], &end);
    // At least one 16-byte word, and at most 16 GB (16-byte word indices fit 32 bits).
    if (end == argv[a] || *end != '\0' || !(mb >= 16e-6 && mb <= 16e3)) {
      std::fprintf(stderr, "size '%s' must be a number of MB in [1.6e-05, 16000]\n",
                   argv[a]);
      return 2;
    }
    sizes_mb.push_back(mb);
  }
  if (sizes_mb.empty()) sizes_mb = {9.5, 14.2, 33.0, 66.1, 99.1};
  if (calls < 3 || reps < 1) {
    std::fprintf(stderr, "calls must be at least 3 and reps at least 1\n");
    return 2;
  }
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device %s, %d SMs, L2 %d MB; %d calls per timing, median of %d\n",
              prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20, calls, reps);
  cudaStream_t s;
  CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));
  std::printf("%8s %-11s %12s %12s %8s\n", "MB", "mode", "stream us", "graph us", "check");
  bool any_wrong = false;
  for (double mb : sizes_mb) {
    Chain c;
    const size_t bytes = size_t(mb * 1e6) / 16 * 16;
    c.n_vec = unsigned(bytes / 16);
    c.blocks = (c.n_vec + 32 * ITERS * WARPS - 1) / (32 * ITERS * WARPS);
    c.n_warps = c.blocks * WARPS;
    const size_t n_pool = std::max<size_t>(MIN_POOL, POOL_BYTES / bytes + 1);
    for (size_t p = 0; p < n_pool; ++p) {
      uint4* b;
      CHECK(cudaMalloc(&b, bytes));
      CHECK(cudaMemset(b, int(p * 37 + 1), bytes));
      c.pool.push_back(b);
    }
    CHECK(cudaMalloc(&c.sums, 3 * sizeof(unsigned) * c.n_warps));
    unsigned want = 0;
    for (int mode = PLAIN; mode <= INDEPENDENT; ++mode) {
      double us[2];
      bool wrong = false;
      for (int graph = 0; graph < 2; ++graph) {
        cudaGraphExec_t exec = nullptr;
        if (graph) {
          cudaGraph_t g;
          CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
          run(c, mode, calls, s);
          CHECK(cudaStreamEndCapture(s, &g));
          CHECK(cudaGraphInstantiate(&exec, g, 0));
          CHECK(cudaGraphDestroy(g));
        }
        std::vector<float> t;
        for (int r = 0; r < reps + 1; ++r) {  // the first is a warm-up
          CHECK(cudaEventRecord(e0, s));
          if (graph) {
            CHECK(cudaGraphLaunch(exec, s));
          } else {
            run(c, mode, calls, s);
          }
          CHECK(cudaEventRecord(e1, s));
          CHECK(cudaEventSynchronize(e1));
          float ms;
          CHECK(cudaEventElapsedTime(&ms, e0, e1));
          if (r) t.push_back(ms);
        }
        std::sort(t.begin(), t.end());
        us[graph] = 1e3 * t[t.size() / 2] / calls;
        const unsigned w = final_word(c, calls);
        if (mode == PLAIN && graph == 0) want = w;
        wrong = wrong || w != want;
        if (exec) CHECK(cudaGraphExecDestroy(exec));
      }
      any_wrong = any_wrong || (mode != INDEPENDENT && wrong);
      std::printf("%8.1f %-11s %12.2f %12.2f %8s\n", mb, kModeName[mode], us[0], us[1],
                  mode == INDEPENDENT ? "-" : (wrong ? "WRONG" : "ok"));
    }
    for (uint4* b : c.pool) CHECK(cudaFree(b));
    CHECK(cudaFree(c.sums));
  }
  CHECK(cudaGetLastError());
  return any_wrong ? 1 : 0;  // a chained mode whose output differs from the plain chain's
}
