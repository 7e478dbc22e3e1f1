"""A kernel boundary against a grid barrier inside one kernel (diagnostic, CUDA only).

A patched decode block runs o_proj -> norm + gate/up -> down as three kernels, because
each needs the whole output of the one before, and MLX's custom kernels have no
grid-wide barrier. A compiled token of the 8B-shaped model spends ~1.1 ms beyond a read
of its weights at the copy ceiling, at six kernel boundaries per block (docs/bench_journal.md,
session 31). Would one persistent kernel with a grid barrier between the phases be
faster? This tool measures the cost of one boundary against one barrier on plain reads
of two buffers, A then B (by default the bytes of o_proj and of gate/up at 4-bit), each
call chained to the one before it, as in a decode step::

    python tools/barrier_ab.py --rounds 7 --json barrier.json

Variants (every one returns the same sums, checked against NumPy before timing):

- ``two``: read A in one kernel, then B in a second that takes A's sums as an input,
  so MLX orders it after A (a boundary, as between two decode kernels); both grids as
  large as the bytes ask (``--chunk`` 16-byte loads per thread, ``--full-threads`` per
  threadgroup);
- ``two-p``: the same with both grids persistent (``--blocks`` threadgroups);
- ``barrier``: one persistent kernel that reads A, waits at a grid barrier (an atomic
  counter in an output that MLX fills with zeros, ``init_value``), then reads B, its last
  threadgroup adding A's first sum, which threadgroup 0 wrote before the barrier;
- ``barrier-pf``: ``barrier`` with each thread's first ``--prefetch`` 16-byte loads of B
  issued before the barrier (as a fused kernel could load the next phase's weights while
  it waits: they do not depend on the phase before);
- ``one``: one persistent kernel that reads A then B with no barrier (no dependency: the
  floor of the two reads).

With ``--trace`` the tool also runs the ``barrier`` variant with the GPU's clock read at
each threadgroup's start, arrival at the barrier, release and end (and its SM), and
prints when the last threadgroup started, arrived and was released: whether every
threadgroup was resident at once, and how much of the barrier's time is the wait for the
slowest.

MLX fills every output of a kernel called with ``init_value`` before the launch (the
fused kernel has two outputs, so two fills), and the ``barrier`` time includes them.

The barrier needs every threadgroup resident at once: ``--blocks`` must not exceed what
the GPU holds (one threadgroup of ``--threads`` per SM always fits; the H100 and H200 have
132 SMs). A waiting threadgroup gives up after ``SPINS`` polls and raises a flag that the
tool reports as an error instead of hanging the device. CUDA-only text: the Metal
dialect (and its CUDA prelude) has no atomics.
"""

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SYNC_WORDS = 4
"""uint32 words of the barrier's output (counter, flag, unused). Not 2: MLX's CUDA
allocator puts arrays of at most 8 bytes in managed memory that the GPU reaches over the
host link (``mlx_foundry.args.SCALAR_LANES``), where polled atomics took ~4 us per
threadgroup per barrier (H100, session 32: all 132 arrived by 17.6 us, the first left
at 551 us)."""

import grid_barrier  # noqa: E402  (tools/grid_barrier.py: the barrier's CUDA text)

SPINS = grid_barrier.SPINS

HEADER = r"""
// Wrapping sum of v[i] over i = first, first + stride, ... < n, 8 loads in flight.
__device__ __forceinline__ unsigned barrier_ab_read(const uint4* v, unsigned n,
                                                    unsigned first, unsigned stride) {
  unsigned acc = 0u;
#pragma unroll 8
  for (unsigned i = first; i < n; i += stride) {
    const uint4 w = v[i];
    acc += w.x + w.y + w.z + w.w;
  }
  return acc;
}

// One sum per warp into out[global warp].
__device__ __forceinline__ void barrier_ab_store(unsigned* out, unsigned acc) {
  for (int o = 16; o > 0; o >>= 1) {
    acc += __shfl_xor_sync(0xffffffffu, acc, o);
  }
  if ((threadIdx.x & 31u) == 0u) {
    out[(blockIdx.x * blockDim.x + threadIdx.x) >> 5] = acc;
  }
}

// Every threadgroup arrives, then waits until all gridDim.x have (all resident).
__device__ __forceinline__ void barrier_ab_grid_sync(unsigned* counter, unsigned* flag) {
  __syncthreads();
  if (threadIdx.x == 0u) {
    grid_barrier_arrive_and_wait(counter, flag);
  }
  __syncthreads();
}

// The GPU's nanosecond clock (for --trace).
__device__ __forceinline__ unsigned long long barrier_ab_now() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
"""

# Bodies for mx.fast.cuda_kernel (MLX writes the signature: inputs const T*, outputs T*).
READ_AFTER = r"""
  const unsigned stride = gridDim.x * blockDim.x;
  const unsigned first = blockIdx.x * blockDim.x + threadIdx.x;
  unsigned acc = barrier_ab_read(reinterpret_cast<const uint4*>(x), n_vec[0], first, stride);
  if (first == 0u) {
    acc += dep[0];  // the call before (or phase A): orders this kernel after it
  }
  barrier_ab_store(sums, acc);
"""

FUSED = r"""
  const unsigned stride = gridDim.x * blockDim.x;
  const unsigned first = blockIdx.x * blockDim.x + threadIdx.x;
  // Two outputs, so that init_value costs two fills: the sums of A then of B, and the
  // barrier's counter and time-out flag.
  unsigned* sums_a = sums;
  unsigned* sums_b = sums + (stride >> 5);
  unsigned* counter = sync;
  unsigned* flag = sync + 1;
  unsigned acc = barrier_ab_read(reinterpret_cast<const uint4*>(a), n_vec[0], first, stride);
  if (first == 0u) {
    acc += dep[0];
  }
  barrier_ab_store(sums_a, acc);
  // With PREFETCH, each thread's first PREFETCH loads of B are issued before the
  // barrier (B's bytes do not depend on phase A, as a GEMV's weights do not depend on
  // the vector it waits for) and summed after it.
  const uint4* vb = reinterpret_cast<const uint4*>(b);
  uint4 early[PREFETCH > 0 ? PREFETCH : 1];
#pragma unroll
  for (int p = 0; p < PREFETCH; ++p) {
    const unsigned i = first + unsigned(p) * stride;
    early[p] = i < n_vec[1] ? __ldcs(vb + i) : make_uint4(0u, 0u, 0u, 0u);
  }
  if (BARRIER) {
    barrier_ab_grid_sync(counter, flag);
  }
  acc = barrier_ab_read(vb, n_vec[1], first + unsigned(PREFETCH) * stride, stride);
#pragma unroll
  for (int p = 0; p < PREFETCH; ++p) {
    acc += early[p].x + early[p].y + early[p].z + early[p].w;
  }
  if (BARRIER && first == (gridDim.x - 1u) * blockDim.x) {
    acc += __ldcg(sums_a);  // threadgroup 0 wrote it before the barrier: read through L2
  }
  barrier_ab_store(sums_b, acc);
"""

# The barrier variant with a clock: per threadgroup its start, its arrival at the barrier,
# its release and its end (globaltimer, ns) and the SM it ran on.
TRACED = r"""
  const unsigned stride = gridDim.x * blockDim.x;
  const unsigned first = blockIdx.x * blockDim.x + threadIdx.x;
  uint64_t* stamps = trace + 4 * blockIdx.x;
  if (threadIdx.x == 0u) {
    stamps[0] = barrier_ab_now();
    unsigned sm;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    smid[blockIdx.x] = sm;
  }
  unsigned* counter = sync;
  unsigned* flag = sync + 1;
  unsigned acc = barrier_ab_read(reinterpret_cast<const uint4*>(a), n_vec[0], first, stride);
  barrier_ab_store(sums, acc);
  if (threadIdx.x == 0u) {
    stamps[1] = barrier_ab_now();
  }
  barrier_ab_grid_sync(counter, flag);
  if (threadIdx.x == 0u) {
    stamps[2] = barrier_ab_now();
  }
  acc = barrier_ab_read(reinterpret_cast<const uint4*>(b), n_vec[1], first, stride);
  barrier_ab_store(sums + (stride >> 5), acc + dep[0]);
  __syncthreads();
  if (threadIdx.x == 0u) {
    stamps[3] = barrier_ab_now();
  }
"""


def full_header():
    """The kernels' header: the grid barrier (``tools/grid_barrier.py``), then ``HEADER``."""
    return grid_barrier.header(SPINS) + HEADER


def kernels():
    """The two MLX kernel objects (built on first use: they need MLX's CUDA back-end)."""
    import mlx.core as mx

    header = full_header()
    read_after = mx.fast.cuda_kernel(
        name="barrier_ab_read_after", input_names=["x", "dep", "n_vec"],
        output_names=["sums"], source=READ_AFTER, header=header)
    fused = mx.fast.cuda_kernel(
        name="barrier_ab_fused", input_names=["a", "b", "dep", "n_vec"],
        output_names=["sums", "sync"], source=FUSED, header=header)
    return read_after, fused


def trace_row(stamps, smids, timed_out):
    """One traced call: ``stamps`` [threadgroups, 4] (start, arrival, release, end; ns of
    the GPU clock) and the SM of each threadgroup, as times in us from the first start."""
    import numpy as np

    st = stamps.astype(np.int64)
    st -= st[:, 0].min()
    us = st / 1e3
    return {"last_start": us[:, 0].max(), "first_arrival": us[:, 1].min(),
            "last_arrival": us[:, 1].max(), "first_release": us[:, 2].min(),
            "last_release": us[:, 2].max(), "last_end": us[:, 3].max(),
            "sms": int(np.unique(smids).size), "timed_out": int(timed_out)}


def trace(args, pool, words_a, words_b, calls=20):
    """The barrier variant with a clock, ``calls`` chained calls: per call, in us from the
    first threadgroup's start, when the last started, the first and last arrived at the
    barrier, the last was released, the last ended; and how many SMs the grid ran on
    (the barrier assumes every threadgroup resident at once)."""
    import mlx.core as mx
    import numpy as np

    header = full_header()
    traced = mx.fast.cuda_kernel(
        name="barrier_ab_traced", input_names=["a", "b", "dep", "n_vec"],
        output_names=["sums", "sync", "trace", "smid"], source=TRACED, header=header)
    n, t = args.blocks, args.threads
    nv = mx.array([words_a // 4, words_b // 4], mx.uint32)
    dep = mx.zeros((1,), mx.uint32)
    outs = []
    for i in range(calls):
        a, b = pool[i % len(pool)]
        sums, sync, stamps, sm = traced(
            inputs=[a, b, dep, nv], grid=(n * t, 1, 1), threadgroup=(t, 1, 1),
            output_shapes=[(2 * warps(n, t),), (SYNC_WORDS,), (n, 4), (n,)],
            output_dtypes=[mx.uint32, mx.uint32, mx.uint64, mx.uint32], init_value=0)
        dep = sums[-1:]
        outs.append((sync, stamps, sm))
    mx.eval(outs)
    rows = [trace_row(np.array(stamps), np.array(sm), int(np.array(sync)[1]))
            for sync, stamps, sm in outs]
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print("trace (median of %d calls, us from the first start): last start %.2f, arrivals "
          "%.2f-%.2f, releases %.2f-%.2f, last end %.2f; %d SMs; timed out in %d calls"
          % (calls, med["last_start"], med["first_arrival"], med["last_arrival"],
             med["first_release"], med["last_release"], med["last_end"], med["sms"],
             sum(r["timed_out"] for r in rows)))
    return {"median": med, "calls": rows}


def warps(blocks, threads):
    return blocks * threads // 32


def full_blocks(words, threads, chunk):
    """Threadgroups for one 16-byte load per thread ``chunk`` times over ``words``."""
    vec = words // 4
    return max(1, -(-vec // (threads * chunk)))


def reference(a, b, dep, blocks, threads, kind):
    """The sums a variant returns, from NumPy: (sums of A, sums of B), one per warp.

    Thread ``t`` of a grid of ``n`` threads adds the 16-byte words ``t, t + n, ...``;
    the first thread of A adds ``dep``; B adds A's first sum at its first thread
    (``"two"``: the second kernel's input), at the first thread of its last threadgroup
    (``"barrier"``) or nowhere (``"one"``)."""
    import numpy as np

    def sums(x, blks, add, at):
        v = np.asarray(x, dtype=np.uint64).reshape(-1, 4).sum(axis=1)
        stride = blks * threads
        per_thread = np.zeros(stride, dtype=np.uint64)
        np.add.at(per_thread, np.arange(v.size) % stride, v)
        per_thread[at] += add
        return (per_thread.reshape(-1, 32).sum(axis=1) % 2**32).astype(np.uint32)

    sa = sums(a, blocks[0], int(dep), 0)
    add, at = {"two": (int(sa[0]), 0), "barrier": (int(sa[0]), (blocks[1] - 1) * threads),
               "one": (0, 0)}[kind]
    sb = sums(b, blocks[1], add, at)
    return sa, sb


def runners(read_after, fused, args, words_a, words_b):
    """``{variant: (run, (threadgroups of A, of B), kind, threads)}``, where
    ``run(a, b, dep)`` returns ``(sums_a, sums_b, flag or None)``."""
    import mlx.core as mx

    t = args.threads
    nv = mx.array([words_a // 4, words_b // 4], mx.uint32)
    ft = args.full_threads
    fa, fb = full_blocks(words_a, ft, args.chunk), full_blocks(words_b, ft, args.chunk)

    def two(blocks_a, blocks_b, t):
        def run(a, b, dep):
            (sa,) = read_after(inputs=[a, dep, nv[:1]], grid=(blocks_a * t, 1, 1),
                               threadgroup=(t, 1, 1),
                               output_shapes=[(warps(blocks_a, t),)],
                               output_dtypes=[mx.uint32])
            (sb,) = read_after(inputs=[b, sa, nv[1:]], grid=(blocks_b * t, 1, 1),
                               threadgroup=(t, 1, 1),
                               output_shapes=[(warps(blocks_b, t),)],
                               output_dtypes=[mx.uint32])
            return sa, sb, None
        return run, (blocks_a, blocks_b), "two", t

    def one_kernel(barrier, prefetch=0):
        n = args.blocks

        def run(a, b, dep):
            sums, sync = fused(
                inputs=[a, b, dep, nv],
                template=[("BARRIER", barrier), ("PREFETCH", prefetch)],
                grid=(n * t, 1, 1), threadgroup=(t, 1, 1),
                output_shapes=[(2 * warps(n, t),), (SYNC_WORDS,)],
                output_dtypes=[mx.uint32] * 2, init_value=0)
            return sums[:warps(n, t)], sums[warps(n, t):], sync[1:2]
        return run, (n, n), "barrier" if barrier else "one", t

    runs = {"two": two(fa, fb, ft), "two-p": two(args.blocks, args.blocks, t),
            "barrier": one_kernel(True), "one": one_kernel(False)}
    if args.prefetch:
        runs["barrier-pf"] = one_kernel(True, args.prefetch)
    return runs


def check(runs, a, b):
    """Every variant's sums against NumPy; raises on a difference or a raised flag."""
    import mlx.core as mx
    import numpy as np

    dep = mx.array([12345], mx.uint32)
    for name, (run, blocks, kind, threads) in runs.items():
        sa, sb, flag = run(a, b, dep)
        mx.eval(sa, sb)
        want_a, want_b = reference(np.array(a), np.array(b), 12345, blocks, threads, kind)
        if flag is not None and int(flag.item()):
            raise RuntimeError(f"{name}: the grid barrier timed out (a threadgroup was not "
                               "resident: lower --blocks)")
        if not (np.array_equal(np.array(sa), want_a) and np.array_equal(np.array(sb), want_b)):
            raise RuntimeError(f"{name}: sums differ from NumPy")


def time_rounds(runs, pool, rounds, calls):
    """Median us per chained call of every variant, round by round (one timing each).

    As the bench times (``mlx_foundry.bench.timing.measure``): the calls' graph is built
    first, and the timing covers its evaluation only, so that the variants' Python (two
    kernel calls against one) does not count."""
    import time

    import mlx.core as mx

    per = {name: [] for name in runs}
    flags = []
    for _ in range(rounds):
        for name, (run, *_) in runs.items():
            dep = mx.zeros((1,), mx.uint32)
            mx.eval(dep)
            outs = []
            for i in range(calls):
                a, b = pool[i % len(pool)]
                sa, sb, flag = run(a, b, dep)
                dep = sb[:1]
                outs.append(sb)
                if flag is not None:
                    flags.append(flag)
            t0 = time.perf_counter()
            mx.eval(outs)
            per[name].append((time.perf_counter() - t0) / calls * 1e6)
        if flags and int(mx.sum(mx.concatenate(flags)).item()):
            raise RuntimeError("a grid barrier timed out while timing: lower --blocks")
        flags.clear()
    return {name: statistics.median(v) for name, v in per.items()}, per


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--a-mb", type=float, default=9.4, help="bytes of A (default: o_proj)")
    p.add_argument("--b-mb", type=float, default=66.0, help="bytes of B (default: gate/up)")
    p.add_argument("--blocks", type=grid_barrier.count, default=132,
                   help="threadgroups of the persistent grids (one per SM fits always)")
    p.add_argument("--threads", type=grid_barrier.threadgroup_size, default=1024,
                   help="threads per threadgroup")
    p.add_argument("--chunk", type=grid_barrier.count, default=4,
                   help="16-byte loads per thread of the full grids (variant two)")
    p.add_argument("--full-threads", type=grid_barrier.threadgroup_size, default=256,
                   help="threads per threadgroup of the full grids (variant two)")
    grid_barrier.add_timing_arguments(p, calls=100)
    p.add_argument("--prefetch", type=int, default=4,
                   help="loads of B per thread issued before the barrier (variant "
                        "barrier-pf; 0 leaves it out)")
    p.add_argument("--trace", action="store_true",
                   help="also time the barrier variant's phases inside the kernel")
    p.add_argument("--dry", action="store_true",
                   help="print the CUDA text and the launches, run nothing")
    args = p.parse_args(argv)
    if not 0 <= args.prefetch <= 8:
        # ptxas (sm_90): 14 / 30 / 48 / 80 registers at 0 / 4 / 8 / 16; a threadgroup of
        # 1024 threads may use 64 a thread.
        p.error("--prefetch must be in [0, 8] (four registers a load)")
    if args.a_mb <= 0 or args.b_mb <= 0:
        p.error("--a-mb and --b-mb must be positive")
    words_a = 4 * max(1, round(args.a_mb * 2**20 / 16))
    words_b = 4 * max(1, round(args.b_mb * 2**20 / 16))
    launches = {"two": (full_blocks(words_a, args.full_threads, args.chunk),
                        full_blocks(words_b, args.full_threads, args.chunk)),
                "two-p": (args.blocks, args.blocks), "barrier": (args.blocks, args.blocks),
                "one": (args.blocks, args.blocks)}
    if args.prefetch:
        launches["barrier-pf"] = (args.blocks, args.blocks)
    if args.dry:
        print(full_header() + "\n// read_after\n" + READ_AFTER + "\n// fused\n" + FUSED
              + "\n// traced\n" + TRACED)
        for name, blocks in launches.items():
            t = args.full_threads if name == "two" else args.threads
            print(f"{name}: threadgroups {blocks[0]} (A), {blocks[1]} (B) of {t} threads")
        return launches

    import mlx.core as mx

    if not mx.cuda.is_available():
        print("barrier_ab: needs MLX's CUDA back-end (an NVIDIA GPU)", file=sys.stderr)
        return 2
    read_after, fused = kernels()
    runs = runners(read_after, fused, args, words_a, words_b)
    pool = []
    for i in range(args.sets):
        key = mx.random.key(i)
        ka, kb = mx.random.split(key)
        pool.append((mx.random.randint(0, 2**31, (words_a,), mx.uint32, key=ka),
                     mx.random.randint(0, 2**31, (words_b,), mx.uint32, key=kb)))
    mx.eval(pool)
    check(runs, *pool[0])
    traced = trace(args, pool, words_a, words_b) if args.trace else None
    medians, per = time_rounds(runs, pool, args.rounds, args.calls)
    grid_barrier.report(medians, per, args, args.json, launches=launches, trace=traced)
    return 0


if __name__ == "__main__":
    r = main()
    sys.exit(r if isinstance(r, int) else 0)
