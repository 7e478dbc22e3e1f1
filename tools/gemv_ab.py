"""The 4-bit decode GEMV against other launches, source variants and plain reads (diagnostics).

Where does the time of a bandwidth-bound GEMV go that a plain read of its bytes does not
spend? This tool times, in one process, the bench's linear case (4-bit, group 64, fp16,
one row of ``x``) as the op runs it against variants of it, round by round so that a
drift of the machine hits every variant alike::

    python tools/gemv_ab.py --shape 14336x4096 --rounds 7 --json ab.json \\
        --variants read mlx op r8t128s1 r8t64s1 sbi:r8t128s1 xpf:r8t128s1b4 pattern:wsb

Variants:

- ``read``: the bench's plain read of the case's bytes; ``mlx``: ``mx.quantized_matmul``;
  ``op``: ``ops.linear`` as the bench calls it (bare arrays: checks and plan lookup on
  every call); ``weight``: ``ops.linear`` with a ``Weight`` per input set (from the
  second call on, the launch kept for it: ``ops/_calls.py``).
- ``rRtTsS[bB]``: the op's kernel at a launch of its own (``ROWS`` R, ``THREADS`` T,
  ``SPLITK`` S, ``MINBLOCKS`` B), any the stages take, also those outside the tuner's
  grid (``THREADS`` 96 or 224).
- ``sbi:<launch>``: the GEMV reading each group's scale and bias as one 4-byte word of
  one interleaved array, a layout MLX does not store (the pool holds a repacked copy).
- ``hsum:<launch>``: the four half2 sums of a chunk and row added in half before one
  conversion to float (3 half2 adds, 2 conversions and 1 add instead of 8 conversions
  and 7 adds: 9 of the loop's ~97 instructions per row and chunk), a measure of what
  fewer instructions buy where the GEMV is issue-bound. Not a candidate: 16 products
  per half lane exceed the packed-half path's error budget
  (``metal_src/policies/affine.metal``).
- ``sbs:<launch>``: the GEMV with the scales and biases of each threadgroup's rows (two
  contiguous ranges in MLX's layout) copied into shared memory with 16-byte loads before
  its loop, each chunk's scale and bias read from there instead of by a 2-byte load from
  global memory per row and chunk. CUDA-only text (a function-scope ``__shared__``
  array); N must be a multiple of the threadgroup's rows. On an H200 (session 30,
  ``docs/gemv_loads_h200_s30.txt``) slower at every launch: under ncu 17.06 against
  13.54 us (14336 -> 4096, four registers past 128) and 14.11 against 12.64 us (4096 ->
  14336): the loop waits for the staging's round trip to DRAM; not a candidate.
- ``l2sb:<launch>`` / ``l2w:<launch>``: the GEMV with its scale and bias loads (``l2sb``)
  or those and its weight loads (``l2w``) as read-only loads with the L2 prefetch-size
  hint ``.L2::256B`` (the weights also ``.L1::no_allocate``). CUDA-only text. A warp's
  scale (or bias) load of one row and chunk touches 32 bytes; the hint asks L2 to fetch
  the next 224 with it, which the next iterations read. On an H200 (session 30,
  ``docs/gemv_loads_h200_s30.txt``) within the spread or slower by both methods (bounded
  to 128 registers at the tall launch, which the asm loads otherwise push to 130); not a
  candidate.
- ``xpf:<launch>``: the GEMV loading the next chunk of ``x`` together with the next
  weights (the split-K path with one row of ``x``), where the kernel loads a chunk of
  ``x`` in the iteration that uses it.
- ``fence:<launch>``: the GEMV with ``simdgroup_barrier(mem_none)`` right after the loads
  of the next chunk's weights, so that ptxas keeps them a whole iteration ahead of their
  use. As compiled for sm_90 without it, ptxas works on the rows side by side (every
  row's weights live to the end of the iteration) and issues those loads only 95-170
  instructions before their first use, in loops of 277-783. The fence keeps the two
  chunks' registers live together: 128 -> 242 registers at R8 split K, 96 -> 122 at R4,
  80 -> 98 at R3, 64 -> 70 at R2, 72 -> 104 at 4096 -> 14336's R4 (the CUDA text MLX
  would compile, nvcc; no spills). A measure of what a real one-chunk-ahead pipeline
  buys against the occupancy it costs: on an H200 (session 26,
  ``docs/gemv_fence_h200_s26.json``) every fenced launch was 9-23% slower than the
  default in independent calls and 16-44% under ncu; not a candidate.
- ``acp:<launch>`` / ``acq:<launch>``: the GEMV with one policy and one row of ``x``
  copying each lane's weight chunks into a two-stage ring in shared memory with
  ``cp.async`` (one chunk ahead, no registers held while the copy is in flight), scales
  and biases loaded one chunk ahead as before; where ``x`` is not staged (split K) its
  chunk rides in the ring too (``acp``) or is loaded in the iteration that uses it
  (``acq``). CUDA-only text (inline PTX and a function-scope ``__shared__`` array, 48 KB
  of static shared memory at most: ``acp`` at R8 with split K does not fit): a measure of
  what decoupling the loads in flight from the registers buys. On an H200 (session 27,
  docs/bench_journal.md "Weights through a cp.async ring") it tied at best (4096 -> 14336, R8:
  13.09 against 12.91 us) and lost on 14336 -> 4096 (``acq`` R8: 13.60 against 13.37
  us, under ncu 16.4-16.9 against 13.8 us; ``acp`` R4 2.8x slower, throttled on shared
  memory); not a candidate.
- ``l2p:<launch>``: the GEMV with one bulk L2 prefetch (``cp.async.bulk.prefetch.L2``,
  sm_90) of each SIMD-group's rows (weights, scales, biases) before its first loads:
  bytes requested from DRAM without registers or shared memory to hold them. CUDA-only
  text. On an H200 (session 28, ``docs/gemv_l2p_h200_s28.txt``) slower at every launch:
  under ncu 16.42 against 14.14 us (14336 -> 4096) and 16.67 against 12.80 us; not a
  candidate.
- ``mma:tTsS[aA][bB]``: the GEMV on tensor cores (``tools/gemv_mma.py``: T tiles of 16
  rows per threadgroup, S SIMD-groups splitting K, A accumulators per tile, B the
  ``MINBLOCKS`` bound), CUDA-only text: a measure of what fewer instructions per weight
  byte buy. On an H200 (session 28, ``docs/gemv_mma_h200_s28.txt``) 23-35% fewer
  instructions executed and slower alone under ncu at every launch; not a candidate.
- ``pattern:w|wsb|wsbi``: a read of the weights, and the scales and biases (separate or
  interleaved), in the GEMV's access pattern (``pattern:...@rRtTsS``, default the op's
  split-K launch of 14336 -> 4096, R8 T128 S1), summing words: no dequantization.

The source variants are edits of the package's ``stages/gemv.metal`` and
``policies/affine.metal``, applied as text to a copy in a source root of their own;
each edit names the text it replaces and must find it once, so a changed kernel fails
here rather than timing something else. Every variant is checked before it is timed:
the GEMVs against ``mx.quantized_matmul``, the pattern reads against NumPy.

``--chain`` makes every call depend on the one before it: its ``x`` is the set's ``x``
plus zero times the previous call's first output (``autotune.depending_on``, as the tuner
times; two small elementwise kernels per call, the same for every variant; ``read`` and
the pattern reads take no ``x`` and are refused). The bench's calls are independent, so
the GPU may run one call's kernel beside the next one's; in a decode step each GEMV
waits for the kernel before it. A launch that wins only unchained wins by that overlap.

``--ncu LABELS`` launches each variant but ``mlx`` once per round between
``cuProfilerStart``/``cuProfilerStop`` (``ncu --profile-from-start off``, L2 flushed
by ncu's default) and writes the labels; ``tools/gemv_sweep.py --table CSV LABELS``
prints the medians. On a machine without CUDA the tool builds every variant, records
its launch and returns them without running anything (``--dry``, the CPU test).
"""

import argparse
import json
import os
import re
import statistics
import sys
import tempfile

BITS, GROUP = 4, 64
CALLS = 200  # calls per timing: the bench's (mlx_foundry.bench.CALLS_PER_TIMING)

PATTERN_SOURCE = """
// Reads what the split-K GEMV reads, in its order, and sums words (no arithmetic on
// them): SB 0 weights only, 1 weights + scales + biases, 2 weights + interleaved
// (scale, bias) words. One sum per SIMD-group.
template <int ROWS, int SIMDS, int FULL, int SB, bool SPLIT>
METAL_FUNC void gemv_pattern_read(const device uint* w, const device ushort* s,
                                  const device ushort* b, device uint* out, uint3 tg,
                                  uint sg, uint lane) {
  const uint row0 = (SPLIT ? tg.x : tg.x * uint(SIMDS) + sg) * uint(ROWS);
  const device uint4* w4 = reinterpret_cast<const device uint4*>(w);
  uint acc = 0u;
  for (int c = int(lane) + (SPLIT ? 32 * int(sg) : 0); c < FULL;
       c += 32 * (SPLIT ? SIMDS : 1)) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const uint4 v = w4[(row0 + uint(r)) * uint(FULL) + uint(c)];
      acc += v.x ^ v.y ^ v.z ^ v.w;
      const uint g = (row0 + uint(r)) * uint(FULL / 2) + uint(c / 2);
      if (SB == 1) {
        acc += uint(s[g]) * 3u + uint(b[g]);
      } else if (SB == 2) {
        acc += reinterpret_cast<const device uint*>(s)[g];
      }
    }
  }
  acc = simd_sum(acc);
  if (lane == 0u) {
    out[tg.x * uint(SIMDS) + sg] = acc;
  }
}
"""
PATTERN_SB = {"w": 0, "wsb": 1, "wsbi": 2}

# sbi: the policy reads (scale, bias) of group g as word g of `scales` (biases unused).
SBI_POLICY = """
template <typename S, int BITS, int GS, int K>
struct PolicyAffineSBI : PolicyAffine<S, BITS, GS, K> {
  using Base = PolicyAffine<S, BITS, GS, K>;
  METAL_FUNC typename Base::HalfChunk load_h(uint n, int c) const {
    typename Base::HalfChunk ch;
    affine_load_words<BITS>(this->w + n * uint(Base::WORDS_PER_ROW) + uint(c * BITS), ch.wd);
    const uint g = n * uint(Base::GROUPS_PER_ROW) + uint(c * 32 / GS);
    const uint v = reinterpret_cast<const device uint*>(this->scales)[g];
    ch.scale = as_type<S>(ushort(v & 0xFFFFu));
    ch.bias = as_type<S>(ushort(v >> 16u));
    return ch;
  }
};
"""

# hsum: (text of affine.metal, replacement) pairs.
HSUM_EDITS = [
    ("""    const float d = ((float(h[0].x) + float(h[0].y)) + (float(h[1].x) + float(h[1].y))) +
                    ((float(h[2].x) + float(h[2].y)) + (float(h[3].x) + float(h[3].y)));""",
     """    const half2 hs = (h[0] + h[1]) + (h[2] + h[3]);
    const float d = float(hs.x) + float(hs.y);"""),
]

# xpf: (text of gemv.metal, replacement) pairs.
XPF_EDITS = [
    ("""  if (STAGED) {
    // The first weight loads are in flight while the threadgroup stages x.""",
     """  constexpr bool XPF = !STAGED && MB == 1;
  uint ux[16];
  if (XPF) {
    gemv_load_chunk_words<T>(
        xr + uint(metal::min(int(lane) + 32 * int(part), FULL - 1) * 32), ux);
  }
  if (STAGED) {
    // The first weight loads are in flight while the threadgroup stages x."""),
    ("""    uint gw[16];
    if (GAMMA && !STAGED) {""",
     """    uint nux[16];
    if (XPF) {
      gemv_load_chunk_words<T>(xr + uint(cn * 32), nux);
    }
    uint gw[16];
    if (GAMMA && !STAGED) {"""),
    ("""        uint u[16];
        gemv_load_chunk_words<T>(xr + metal::min(uint(j), last) * uint(K) + uint(c * 32), u);""",
     """        uint u[16];
        if (XPF) {
#pragma unroll
          for (int q = 0; q < 16; ++q) {
            u[q] = ux[q];
          }
        } else {
          gemv_load_chunk_words<T>(xr + metal::min(uint(j), last) * uint(K) + uint(c * 32), u);
        }"""),
    ("""      ch[r] = nx[r];
      if (DUAL) {
        ch2[r] = nx2[r];
      }
    }
  }
#pragma unroll
  for (int j = 0; j < MB; ++j) {
    ss[j] = ss_lo[j] + ss_hi[j];""",
     """      ch[r] = nx[r];
      if (DUAL) {
        ch2[r] = nx2[r];
      }
    }
    if (XPF) {
#pragma unroll
      for (int q = 0; q < 16; ++q) {
        ux[q] = nux[q];
      }
    }
  }
#pragma unroll
  for (int j = 0; j < MB; ++j) {
    ss[j] = ss_lo[j] + ss_hi[j];"""),
]

# fence: (text of gemv.metal, replacement) pairs.
FENCE_EDITS = [
    ("""#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      nx[r] = pol.load_h(rows[r], cn);
      if (DUAL) {
        nx2[r] = pol2.load_h(rows[r], cn);
      }
    }
""",
     """#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      nx[r] = pol.load_h(rows[r], cn);
      if (DUAL) {
        nx2[r] = pol2.load_h(rows[r], cn);
      }
    }
    // fence: the next chunk's loads stay issued before this chunk's arithmetic.
    simdgroup_barrier(mem_flags::mem_none);
"""),
]

# acp: (text of gemv.metal, replacement) pairs. CUDA-only text (inline PTX, a function-
# scope __shared__ array): the packed-half path with one policy and one row of x copies
# each lane's weight chunks (and, where x is not staged, its chunk of x) into a two-stage
# ring in shared memory with cp.async, one chunk ahead, instead of loading them into
# registers; scales and biases stay ordinary loads one chunk ahead.
ACP_FUNCTION = """
// acp (gemv_ab): weights streamed global -> shared by cp.async, two stages per thread.
// ACP_X_IN_RING: where x is not staged, its chunk rides in the ring (1, acp) or each
// lane loads it from global memory in the iteration that uses it (0, acq).
#ifndef ACP_X_IN_RING
#define ACP_X_IN_RING 1
#endif
METAL_FUNC void acp_copy16(uint4* dst, const uint* src) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\\n" ::"r"(s), "l"(src));
}
METAL_FUNC void acp_commit() { asm volatile("cp.async.commit_group;\\n" ::); }
template <int N>
METAL_FUNC void acp_wait() { asm volatile("cp.async.wait_group %0;\\n" ::"n"(N)); }

// Chunk c of the lane's rows (and, XU 4, of x) into its ring slot; one group per call
// (empty past the last chunk).
template <typename P, typename T, int K, int ROWS, int CW, int XU, int LS>
METAL_FUNC void acp_issue(P pol, const device T* xr, thread const uint* rows, int c,
                          uint4* slot) {
  constexpr int FULL = K / 32;
  if (c < FULL) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const uint* src = pol.w + rows[r] * uint(P::WORDS_PER_ROW) + uint(c * 4 * CW);
#pragma unroll
      for (int j = 0; j < CW; ++j) {
        acp_copy16(slot + (r * CW + j) * LS, src + 4 * j);
      }
    }
    const uint* xs = reinterpret_cast<const uint*>(xr + c * 32);
#pragma unroll
    for (int q = 0; q < XU; ++q) {
      acp_copy16(slot + (ROWS * CW + q) * LS, xs + 4 * q);
    }
  }
  acp_commit();
}

template <typename P, typename T, int K, int ROWS, int NORM, int SPLIT, int SIMDS,
          bool STAGED>
METAL_FUNC void gemv_dot_rows_acp(P pol, const device T* xr, const device T* gr,
                                  thread const uint* rows, uint lane, uint part, uint sg,
                                  threadgroup uint4* xst, thread float* out,
                                  thread float* ss) {
  constexpr bool GAMMA = NORM == GEMV_NORM_WEIGHT;
  constexpr bool BF = gemv_is_bf16<T>::value != 0;
  constexpr int FULL = K / 32;
  constexpr int S1 = gemv_half_pairs<P>::value;
  constexpr int STRIDE = 32 * SPLIT;
  constexpr int CWORDS = int(P::WORDS_PER_ROW) / FULL;
  static_assert(CWORDS % 4 == 0, "acp: 16-byte chunks");
  constexpr int CW = CWORDS / 4;
  constexpr int GS = K / int(P::GROUPS_PER_ROW);
  // Not staged: the lane's chunk of x (64 bytes) rides in the ring after the weights.
  constexpr int XU = STAGED || !ACP_X_IN_RING ? 0 : 4;
  constexpr int UNITS = ROWS * CW + XU;
  // Unit-major: the lanes' 16-byte units of one unit index are consecutive (no bank
  // conflicts).
  constexpr int LS = SIMDS * 32;
  __shared__ uint4 ring[2][UNITS][LS];
  const uint tid = sg * 32u + lane;
  const uint key = pol.half_key(lane);
  float s[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    s[r] = 0.0f;
  }
  const int c0 = int(lane) + 32 * int(part);
  acp_issue<P, T, K, ROWS, CW, XU, LS>(pol, xr, rows, c0, &ring[0][0][tid]);
  acp_issue<P, T, K, ROWS, CW, XU, LS>(pol, xr, rows, c0 + STRIDE, &ring[1][0][tid]);
  typename P::HalfChunk ch[ROWS];
  {
    const int cc = metal::min(c0, FULL - 1);
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const uint g = rows[r] * uint(P::GROUPS_PER_ROW) + uint(cc * 32 / GS);
      ch[r].scale = pol.scales[g];
      ch[r].bias = pol.biases[g];
    }
  }
  float ss_lo = 0.0f;
  float ss_hi = 0.0f;
  if (STAGED) {
    ss_lo = gemv_stage_x<T, K, NORM, S1, SIMDS>(xr, gr, sg, lane, xst);
  }
  int stage = 0;
  for (int c = c0; c < FULL; c += STRIDE) {
    typename P::HalfChunk nx[ROWS];
    const int cn = metal::min(c + STRIDE, FULL - 1);
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const uint g = rows[r] * uint(P::GROUPS_PER_ROW) + uint(cn * 32 / GS);
      nx[r].scale = pol.scales[g];
      nx[r].bias = pol.biases[g];
    }
    uint gw[16];
    if (GAMMA && !STAGED) {
      gemv_load_chunk_words<T>(gr + c * 32, gw);
    }
    acp_wait<1>();
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
#pragma unroll
      for (int j = 0; j < CW; ++j) {
        const uint4 v = ring[stage][r * CW + j][tid];
        ch[r].wd[4 * j + 0] = v.x;
        ch[r].wd[4 * j + 1] = v.y;
        ch[r].wd[4 * j + 2] = v.z;
        ch[r].wd[4 * j + 3] = v.w;
      }
    }
    half2 xh[16];
    float xs;
    float cb;
    if (STAGED) {
      cb = gemv_stage_get<FULL, BF>(xst, c, xh, xs);
    } else {
      uint u[16];
      if (XU == 0) {
        gemv_load_chunk_words<T>(xr + c * 32, u);
      }
#pragma unroll
      for (int q = 0; q < XU; ++q) {
        const uint4 v = ring[stage][ROWS * CW + q][tid];
        u[4 * q + 0] = v.x;
        u[4 * q + 1] = v.y;
        u[4 * q + 2] = v.z;
        u[4 * q + 3] = v.w;
      }
      cb = gemv_half_chunk<T, NORM>(u, gw, ss_lo, ss_hi, xs);
      gemv_half_pairs_of<S1>(u, xh);
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const float d = pol.dot_h(ch[r], xh, xs, key);
      s[r] = BF ? metal::fma(d, cb, s[r]) : s[r] + d;
    }
    acp_issue<P, T, K, ROWS, CW, XU, LS>(pol, xr, rows, c + 2 * STRIDE, &ring[stage][0][tid]);
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      ch[r].scale = nx[r].scale;
      ch[r].bias = nx[r].bias;
    }
    stage ^= 1;
  }
  acp_wait<0>();
  ss[0] = ss_lo + ss_hi;
  const float back = GAMMA && !BF ? 16.0f : 1.0f;
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    out[r] = simd_sum(s[r]) * back;
  }
}

"""

ACP_EDITS = [
    ("""template <typename P, typename P2, typename T, int K, int ROWS, int NORM, bool DUAL,
          int SPLIT, int MB, int UNROLL, int SIMDS, int XS>
METAL_FUNC void gemv_dot_rows_on(gemv_path<false>,""",
     ACP_FUNCTION + """template <typename P, typename P2, typename T, int K, int ROWS, int NORM, bool DUAL,
          int SPLIT, int MB, int UNROLL, int SIMDS, int XS>
METAL_FUNC void gemv_dot_rows_on(gemv_path<false>,"""),
    ("""  gemv_dot_rows_h<P, P2, T, K, ROWS, NORM, DUAL, SPLIT, MB, UNROLL, SIMDS, XS>(
      pol, pol2, xr, last, gr, rows, lane, part, sg, xst, out, out2, ss);""",
     """  if constexpr (MB == 1 && !DUAL) {
    gemv_dot_rows_acp<P, T, K, ROWS, NORM, SPLIT, SIMDS, (XS > 1)>(pol, xr, gr, rows, lane,
                                                                   part, sg, xst, out, ss);
  } else {
    gemv_dot_rows_h<P, P2, T, K, ROWS, NORM, DUAL, SPLIT, MB, UNROLL, SIMDS, XS>(
        pol, pol2, xr, last, gr, rows, lane, part, sg, xst, out, out2, ss);
  }"""),
]

# The head of gemv.metal's packed-half dot product: CUDA-only variants put their helper
# functions right before it.
DOT_ROWS_H = """template <typename P, typename P2, typename T, int K, int ROWS, int NORM, bool DUAL,
          int SPLIT, int MB, int UNROLL, int SIMDS, int XS>
METAL_FUNC void gemv_dot_rows_h("""


def functions_before_dot_rows_h(functions):
    """The edit that inserts ``functions`` before ``gemv_dot_rows_h``."""
    return DOT_ROWS_H, functions + DOT_ROWS_H


# l2p: (text of gemv.metal, replacement) pairs. CUDA-only text (inline PTX, sm_90): each
# SIMD-group's first lane (with split K, the first SIMD-group's) asks for its rows'
# weights, scales and biases with one bulk L2 prefetch each (cp.async.bulk.prefetch.L2,
# no registers, no shared memory) before the first loads, so that the loads that follow
# find them in L2.
L2P_FUNCTION = """
// l2p (gemv_ab): a bulk prefetch of [p, p + bytes) into L2 (sm_90; 16-byte aligned).
METAL_FUNC void l2p_prefetch(const device void* p, uint bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\\n" ::"l"(p), "r"(bytes)
               : "memory");
}

"""

L2P_EDITS = [
    functions_before_dot_rows_h(L2P_FUNCTION),
    ("""  typename P::HalfChunk ch[ROWS];
  typename P2::HalfChunk ch2[ROWS];
  {
    const int c0 = metal::min(int(lane) + 32 * int(part), FULL - 1);""",
     """  if (lane == 0u && part == 0u) {
    // The rows are consecutive (the last ones clamped to N - 1: counted once).
    constexpr uint WB = uint(P::WORDS_PER_ROW) * 4u;
    constexpr uint SB = uint(P::GROUPS_PER_ROW) * uint(sizeof(pol.scales[0]));
    static_assert(WB % 16u == 0u && SB % 16u == 0u, "l2p: 16-byte rows");
    const uint nr = rows[ROWS - 1] - rows[0] + 1u;
    l2p_prefetch(pol.w + rows[0] * uint(P::WORDS_PER_ROW), nr * WB);
    l2p_prefetch(pol.scales + rows[0] * uint(P::GROUPS_PER_ROW), nr * SB);
    l2p_prefetch(pol.biases + rows[0] * uint(P::GROUPS_PER_ROW), nr * SB);
  }
  typename P::HalfChunk ch[ROWS];
  typename P2::HalfChunk ch2[ROWS];
  {
    const int c0 = metal::min(int(lane) + 32 * int(part), FULL - 1);"""),
]

# l2sb / l2w: loads with the L2 prefetch-size hint (``.L2::256B``, sm_80+). CUDA-only
# text (inline PTX), prepended to a copy of affine.metal; the edits route the policy's
# loads through it: l2sb the 2-byte scale and bias loads, l2w those and the 16-byte
# weight loads (also ``.L1::no_allocate``: streamed, never reused by the SM).
L2H_FUNCTIONS = """
// l2h (gemv_ab): read-only loads that ask L2 to fetch 256 bytes around the address.
template <typename S>
METAL_FUNC S l2h_load16(const device S* p) {
  unsigned short u;
  asm("ld.global.nc.L2::256B.b16 %0, [%1];" : "=h"(u) : "l"(p));
  return *reinterpret_cast<const S*>(&u);
}
METAL_FUNC uint4 l2h_load128(const device uint4* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
"""
L2H_SB_EDIT = ("""    ch.scale = scales[g];
    ch.bias = biases[g];""", """    ch.scale = l2h_load16(scales + g);
    ch.bias = l2h_load16(biases + g);""")
L2H_W_EDIT = ("""      uint4 v = q[j];""", """      uint4 v = l2h_load128(q + j);""")

# sbs: (text of gemv.metal, replacement) pairs. The scales and biases of a threadgroup's
# rows are contiguous in MLX's layout ([N, K / GS]); the threadgroup copies them into
# shared memory with 16-byte loads before the loop, and each chunk's scale and bias come
# from there. CUDA-only text (a function-scope __shared__ array); affine policy, one
# policy (not DUAL), N a multiple of the threadgroup's rows (checked by the tool).
SBS_FUNCTIONS = """
template <typename Q>
struct sbs_pointee;
template <typename Q>
struct sbs_pointee<const Q*> {
  using type = Q;
};
// sbs (gemv_ab): chunk c of row n's weights only (BITS = WORDS_PER_ROW / FULL).
template <typename P, int FULL>
METAL_FUNC void sbs_load_w(P pol, uint n, int c, thread typename P::HalfChunk& ch) {
  constexpr int PB = int(P::WORDS_PER_ROW) / FULL;
  affine_load_words<PB>(pol.w + n * uint(P::WORDS_PER_ROW) + uint(c * PB), ch.wd);
}
// Its scale and bias from the staging: RT rows of G scales, then RT rows of G biases.
template <typename P, typename S, int FULL, int RT>
METAL_FUNC void sbs_fill(threadgroup const S* st, uint local_row, int c,
                         thread typename P::HalfChunk& ch) {
  constexpr int G = int(P::GROUPS_PER_ROW);
  const uint g = local_row * uint(G) + uint(c * G / FULL);
  ch.scale = st[g];
  ch.bias = st[uint(RT * G) + g];
}
"""
SBS_EDITS = [
    functions_before_dot_rows_h(SBS_FUNCTIONS),
    ("""  typename P::HalfChunk ch[ROWS];
  typename P2::HalfChunk ch2[ROWS];
  {
    const int c0 = metal::min(int(lane) + 32 * int(part), FULL - 1);
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      ch[r] = pol.load_h(rows[r], c0);
      if (DUAL) {
        ch2[r] = pol2.load_h(rows[r], c0);
      }
    }
  }""",
     """  typename P::HalfChunk ch[ROWS];
  typename P2::HalfChunk ch2[ROWS];
  static_assert(!DUAL, "sbs: one policy");
  using SBS_S = typename sbs_pointee<decltype(pol.scales)>::type;
  constexpr int RT = SPLIT > 1 ? ROWS : ROWS * SIMDS;  // the threadgroup's rows
  constexpr int SBS_UNITS = RT * int(P::GROUPS_PER_ROW) * int(sizeof(SBS_S)) / 16;
  static_assert(SBS_UNITS * 16 == RT * int(P::GROUPS_PER_ROW) * int(sizeof(SBS_S)),
                "sbs: whole 16-byte units");
  __shared__ uint4 sbs_st[2 * SBS_UNITS];
  threadgroup const SBS_S* sbs_h = reinterpret_cast<threadgroup const SBS_S*>(sbs_st);
  const uint tg_row0 = SPLIT > 1 ? rows[0] : rows[0] - sg * uint(ROWS);
  {
    const int c0 = metal::min(int(lane) + 32 * int(part), FULL - 1);
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      sbs_load_w<P, FULL>(pol, rows[r], c0, ch[r]);
    }
    const device uint4* s4 = reinterpret_cast<const device uint4*>(
        pol.scales + tg_row0 * uint(P::GROUPS_PER_ROW));
    const device uint4* b4 = reinterpret_cast<const device uint4*>(
        pol.biases + tg_row0 * uint(P::GROUPS_PER_ROW));
    for (int u = int(sg * 32u + lane); u < SBS_UNITS; u += 32 * SIMDS) {
      sbs_st[u] = s4[u];
      sbs_st[SBS_UNITS + u] = b4[u];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      sbs_fill<P, SBS_S, FULL, RT>(sbs_h, rows[r] - tg_row0, c0, ch[r]);
    }
  }"""),
    ("""      nx[r] = pol.load_h(rows[r], cn);""",
     """      sbs_load_w<P, FULL>(pol, rows[r], cn, nx[r]);
      sbs_fill<P, SBS_S, FULL, RT>(sbs_h, rows[r] - tg_row0, cn, nx[r]);"""),
]

# The variants that edit affine.metal (after their functions, if any), and their edits.
POLICY_EDITS = {"hsum": ("", HSUM_EDITS), "l2sb": (L2H_FUNCTIONS, [L2H_SB_EDIT]),
                "l2w": (L2H_FUNCTIONS, [L2H_SB_EDIT, L2H_W_EDIT])}

# The variants that edit gemv.metal, and their edits.
ACQ_EDITS = [(ACP_EDITS[0][0], "#define ACP_X_IN_RING 0\n" + ACP_EDITS[0][1]), ACP_EDITS[1]]

GEMV_EDITS = {"xpf": XPF_EDITS, "fence": FENCE_EDITS, "acp": ACP_EDITS, "acq": ACQ_EDITS,
              "l2p": L2P_EDITS, "sbs": SBS_EDITS}

LAUNCH = re.compile(r"r(\d+)t(\d+)s([01])(?:b(\d+))?$")
DEFAULT_PATTERN_LAUNCH = "r8t128s1"


def parse_launch(text):
    """``"r8t128s1b4"`` -> ``{"ROWS": 8, "THREADS": 128, "SPLITK": 1, "MINBLOCKS": 4}``,
    checked as the GEMV stages check a launch."""
    from mlx_foundry.stages.gemv import check_launch, check_min_blocks

    m = LAUNCH.match(text)
    if m is None:
        raise ValueError(f"[gemv_ab] a launch is written rRtTsS[bB] (e.g. r8t128s1b4) but "
                         f"got {text!r}.")
    rows, threads, split = int(m[1]), int(m[2]), int(m[3])
    check_launch(rows, threads, split)
    launch = {"ROWS": rows, "THREADS": threads, "SPLITK": split}
    if m[4] is not None:
        check_min_blocks(int(m[4]), threads)
        launch["MINBLOCKS"] = int(m[4])
    return launch


def parse_variant(text):
    """``(kind, launch or pattern)``: kind is read, mlx, op, weight, launch, sbi, hsum,
    l2sb, l2w, sbs, xpf, fence, acp, acq, l2p, mma or pattern."""
    if text in ("read", "mlx", "op", "weight"):
        return text, None
    kind, _, rest = text.partition(":")
    if kind == "mma":
        from gemv_mma import parse_launch as mma_launch

        return kind, mma_launch(rest)
    if kind == "pattern":
        what, _, launch = rest.partition("@")
        if what not in PATTERN_SB:
            raise ValueError(f"[gemv_ab] 'pattern:' takes one of {', '.join(PATTERN_SB)} but "
                             f"got {what!r}.")
        return kind, (what, parse_launch(launch or DEFAULT_PATTERN_LAUNCH))
    if kind == "sbi" or kind in POLICY_EDITS or kind in GEMV_EDITS:
        return kind, parse_launch(rest)
    if not rest:
        return "launch", parse_launch(text)
    raise ValueError(f"[gemv_ab] unknown variant {text!r}: read, mlx, op, weight, a launch "
                     f"(r8t128s1), sbi:<launch>, hsum:<launch>, l2sb:<launch>, "
                     f"l2w:<launch>, sbs:<launch>, xpf:<launch>, "
                     f"fence:<launch>, acp:<launch>, acq:<launch>, l2p:<launch>, mma:tTsS or "
                     f"pattern:w|wsb|wsbi.")


def _source_root(files):
    """A fresh source root holding ``{relpath: text}``, added to the package's roots."""
    from mlx_foundry import sources

    root = tempfile.mkdtemp(prefix="gemv_ab_")
    for rel, text in files.items():
        os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
        with open(os.path.join(root, rel), "w") as f:
            f.write(text)
    sources.add_source_root(root)


def apply_edits(text, edits):
    """``text`` with every ``(old, new)`` of ``edits`` replaced; each old text must occur
    exactly once."""
    for old, new in edits:
        if text.count(old) != 1:
            raise RuntimeError(f"[gemv_ab] the edit of {old.splitlines()[0].strip()!r}... "
                               f"finds its text {text.count(old)} times, not once: the kernel "
                               f"changed, update the variant.")
        text = text.replace(old, new)
    return text


def variant_kernel(kind):
    """The op's GEMV kernel (no epilogue) built from a variant's sources: ``sbi``,
    ``hsum``, ``l2sb``, ``l2w``, ``sbs``, ``xpf``, ``fence``, ``acp``, ``acq`` or ``l2p``."""
    from mlx_foundry import sources
    from mlx_foundry.args import Output
    from mlx_foundry.compound import CompoundKernel
    from mlx_foundry.policies.affine import AFFINE_HEADER, AffinePolicy
    import mlx_foundry.stages.gemv as G

    read = lambda rel: (sources._PACKAGE_ROOT / rel).read_text()  # noqa: E731
    policy = AffinePolicy(BITS, GROUP, "w")
    gemv_source = G.GEMV_SOURCE
    if kind == "sbi":
        rel = f"gemv_ab/{kind}/affine_sbi.metal"
        _source_root({rel: read(AFFINE_HEADER) + SBI_POLICY})
        policy.header, policy.struct_name = rel, "PolicyAffineSBI"
    elif kind in POLICY_EDITS:
        rel = f"gemv_ab/{kind}/affine.metal"
        functions, edits = POLICY_EDITS[kind]
        _source_root({rel: functions + apply_edits(read(AFFINE_HEADER), edits)})
        policy.header = rel
    else:
        gemv_source = f"gemv_ab/{kind}/gemv.metal"
        _source_root({gemv_source: apply_edits(read(G.GEMV_SOURCE), GEMV_EDITS[kind])})
    saved, G.GEMV_SOURCE = G.GEMV_SOURCE, gemv_source
    try:
        main = G.gemv_stage(policy, G.gemv_decls())
    finally:
        G.GEMV_SOURCE = saved
    out = Output("out", shape=lambda b: tuple(b.x.shape[:-1]) + (b.w.shape[0],), dtype="x")
    return CompoundKernel(f"linear_affine_{BITS}_{GROUP}_{kind}", main=main, outputs=[out],
                          dispatch=G.gemv_dispatch(lambda b: b.w.shape[0]))


def pattern_kernel():
    import mlx.core as mx

    from mlx_foundry import Kernel
    from mlx_foundry.args import Constant, Output, Tensor
    from mlx_foundry.dispatch import DispatchConfig

    def groups(b):  # threadgroups
        return b.w.shape[0] // b.ROWS // (1 if b.SPLIT else b.SIMDS)

    return Kernel(
        "gemv_pattern_read", source_text=PATTERN_SOURCE, function="gemv_pattern_read",
        template=("ROWS", "SIMDS", "FULL", "SB", "SPLIT"),
        args=[Tensor("w", (mx.uint32,), ndim=2), Tensor("s", (mx.uint16,), ndim=2),
              Tensor("b", (mx.uint16,), ndim=2),
              Output("out", shape=lambda b: (groups(b) * b.SIMDS,),
                     dtype=mx.uint32),
              Constant("ROWS"), Constant("SIMDS"),
              Constant("FULL", value=lambda b: b.w.shape[1] // 4),
              Constant("SB"), Constant("SPLIT", "bool")],
        attributes=("threadgroup_position_in_grid", "simdgroup_index_in_threadgroup",
                    "thread_index_in_simdgroup"),
        dispatch=lambda b: DispatchConfig((groups(b),), (32 * b.SIMDS,)))


def pattern_sum(w, s, b, sbi, sb):
    """What the pattern read returns, summed (mod 2**32), from NumPy: every chunk (four
    words) XOR-ed, and per chunk its group's scale and bias (two chunks per group)."""
    import numpy as np

    wn = np.array(w).reshape(w.shape[0], -1, 4)
    v = int((wn[..., 0] ^ wn[..., 1] ^ wn[..., 2] ^ wn[..., 3]).astype(np.uint64).sum())
    if sb == 1:
        v += 2 * int((np.array(s).astype(np.uint64) * 3 + np.array(b)).sum())
    elif sb == 2:
        pairs = np.array(sbi).astype(np.uint64)
        v += 2 * int((pairs[:, 0::2] + (pairs[:, 1::2] << 16)).sum())
    return v % 2**32


def _runs(names, case, pool, n):
    """``{name: (fn(*set) -> array, check)}`` over the tool's pool sets ``(x, w, scales,
    biases, interleaved, launch kwargs)``; check: ``"gemv"``, ``("pattern", SB)`` or
    ``None``."""
    import mlx.core as mx

    from mlx_foundry.bench.read_probe import probe_words, read_probe
    from mlx_foundry.kernel import record_launches

    be = "cuda"
    with record_launches() as launches:
        case.candidate(be)(*pool[0][:4])
    (gemv, _, _), = launches
    op = case.candidate(be)
    kernels, pattern, runs = {}, None, {}
    for name in names:
        kind, spec = parse_variant(name)
        if kind == "read":
            # Timed by the bench's plain_read; this one buffer serves --ncu (which flushes
            # L2 before every launch).
            buf = mx.zeros((probe_words(case.nbytes),), mx.uint32)
            runs[name] = (lambda *st, buf=buf: read_probe(buf, backend=be), None)
        elif kind == "mlx":
            runs[name] = (lambda x, w, s, b, sbi, kw: case.baseline(x, w, s, b), None)
        elif kind == "op":
            runs[name] = (lambda x, w, s, b, sbi, kw: op(x, w, s, b), "gemv")
        elif kind == "weight":
            from mlx_foundry.ops import Weight, linear

            weights = {id(st[1]): Weight(*st[1:4], group_size=GROUP, bits=BITS) for st in pool}
            runs[name] = (lambda x, w, s, b, sbi, kw: linear(x, weights[id(w)], backend=be),
                          "gemv")
        elif kind == "mma":  # its shape checked by main(), and again by its dispatch
            from gemv_mma import mma_kernel

            kernels["mma"] = kernels.get("mma") or mma_kernel()
            runs[name] = (lambda x, w, s, b, sbi, kw, kern=kernels["mma"], launch=spec:
                          kern(x, w, s, b, backend=be, **launch), "gemv")
        elif kind == "pattern":
            pattern = pattern or pattern_kernel()
            what, launch = spec
            rows = launch["ROWS"] * (1 if launch["SPLITK"] else launch["THREADS"] // 32)
            if n % rows:
                raise ValueError(f"[gemv_ab] {name}: N must be a multiple of the {rows} rows "
                                 f"of one threadgroup.")
            p = {"ROWS": launch["ROWS"], "SIMDS": launch["THREADS"] // 32,
                 "SB": PATTERN_SB[what], "SPLIT": bool(launch["SPLITK"])}

            def run(x, w, s, b, sbi, kw, p=p):
                if p["SB"] == 2:
                    s = b = sbi
                return pattern(w, s.view(mx.uint16), b.view(mx.uint16), backend=be, **p)
            runs[name] = (run, ("pattern", p["SB"]))
        else:
            if kind == "sbs":
                tg_rows = spec["ROWS"] * (1 if spec["SPLITK"] else spec["THREADS"] // 32)
                if n % tg_rows:
                    raise ValueError(f"[gemv_ab] {name}: N must be a multiple of the "
                                     f"{tg_rows} rows of one threadgroup.")
            if kind != "launch" and kind not in kernels:
                kernels[kind] = variant_kernel(kind)  # one per kind: one source root each
            kern = gemv if kind == "launch" else kernels[kind]

            def run(x, w, s, b, sbi, kw, kern=kern, launch=spec, kind=kind):
                extra = {"w_scales": sbi} if kind == "sbi" else {}
                return kern(backend=be, **dict(kw, **extra), **launch)
            runs[name] = (run, "gemv")
    return runs


def chained(fn):
    """``fn`` with each call's ``x`` made to wait for the previous call's output
    (``autotune.depending_on``, as the tuner times its candidates). The kernel variants
    take ``x`` from their launch kwargs, so it is replaced there too."""
    from mlx_foundry.bench.autotune import Chain

    chain = Chain()

    def run(x, w, s, b, sbi, kw):
        x = chain.wait(x)
        if "x" in kw:
            kw = dict(kw, x=x)
        return chain.done(fn(x, w, s, b, sbi, kw))
    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="14336x4096", help="KxN: x has K, the output N")
    p.add_argument("--variants", nargs="+",
                   default=["read", "mlx", "op", "pattern:wsb", "sbi:r8t128s1",
                            "xpf:r8t128s1b4"])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--json", help="write the rounds and medians here")
    p.add_argument("--ncu", metavar="LABELS", help="one launch per variant and round, for "
                   "ncu --profile-from-start off (mlx left out); write the labels here")
    p.add_argument("--chain", action="store_true",
                   help="each call's x depends on the previous call's output (no overlap)")
    p.add_argument("--dry", action="store_true",
                   help="build and record every variant, run nothing (also without CUDA)")
    args = p.parse_args(argv)
    import mlx.core as mx

    from mlx_foundry.bench import cases, timing
    from mlx_foundry.bench.autotune import LAUNCH_CONSTANTS
    from mlx_foundry.kernel import record_launches

    try:
        k, n = (int(v) for v in args.shape.lower().split("x"))
    except ValueError:
        p.error(f"--shape must be KxN (e.g. 14336x4096) but got {args.shape!r}")
    if k % GROUP or k < 1:
        p.error(f"--shape: K must be a positive multiple of the group size {GROUP}")
    if n < 1:
        p.error("--shape: N must be positive")
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1 but got {args.rounds}")
    for name in args.variants:
        kind, spec = parse_variant(name)  # every error before any work
        if kind == "mma":
            from gemv_mma import check_shape

            try:
                check_shape(k, n, spec)
            except ValueError as e:
                p.error(str(e))
    if args.chain and (args.ncu or any(parse_variant(name)[0] in ("read", "pattern")
                                       for name in args.variants)):
        p.error("--chain times GEMVs only: leave out 'read', the pattern reads and --ncu")
    dry = args.dry or not mx.cuda.is_available()
    if dry and not args.dry:
        print("gemv_ab: no CUDA here: a dry run (every variant built and recorded, nothing "
              "timed)", file=sys.stderr)
    be = "cuda"
    case = cases._linear_case(k, n, BITS, GROUP, mx.float16)

    def make(i):
        x, w, s, b = case.make(i)
        return x, w, s, b, mx.stack([s, b], axis=-1).reshape(s.shape[0], -1)

    pool_bytes = timing.default_pool_bytes("reference" if dry else be)
    pool = []
    for st in timing.make_pool(make, case.nbytes, pool_bytes):
        with record_launches() as launches:
            case.candidate(be)(*st[:4])
        (_, _, kw), = launches
        pool.append(st + ({c: v for c, v in kw.items() if c not in LAUNCH_CONSTANTS},))
    runs = _runs(args.variants, case, pool, n)
    if args.chain:
        runs = {name: (chained(fn), check) for name, (fn, check) in runs.items()}
    print(f"device: {timing.device_name()}, mlx {mx.__version__}, {k} -> {n}, 4-bit, "
          f"{len(pool)} sets", flush=True)
    if dry:
        recorded = {}
        for name, (fn, _) in runs.items():
            with record_launches() as launches:
                fn(*pool[0])
            recorded[name] = launches[0] if launches else None  # mlx: none of ours
            if launches:
                prog, _, kw = launches[0]
                print(name, prog.name, {c: kw[c] for c in kw if c in LAUNCH_CONSTANTS
                                        or c in ("SIMDS", "SB", "SPLIT")})
        return recorded
    # Each variant checked on one set before anything is timed.
    ref = case.baseline(*pool[0][:4]).astype(mx.float32)
    scale = mx.abs(ref).max().item()
    for name, (fn, check) in runs.items():
        got = fn(*pool[0])
        mx.eval(got)
        if check == "gemv":
            err = mx.abs(got.astype(mx.float32) - ref).max().item() / scale
            if not err < 1e-2:
                raise RuntimeError(f"[gemv_ab] {name}: max |ours - mlx| / max |mlx| = {err}")
        elif check is not None:
            x, w, s, b, sbi, _ = pool[0]
            want = pattern_sum(w, s.view(mx.uint16), b.view(mx.uint16), sbi.view(mx.uint16),
                               check[1])
            if int(got.astype(mx.uint64).sum().item()) % 2**32 != want:
                raise RuntimeError(f"[gemv_ab] {name}: the sums differ from NumPy's")
    if args.ncu:
        return _profile(runs, pool, args.rounds, args.ncu)
    rounds = []
    for rnd in range(args.rounds):
        row = {}
        for name in args.variants:
            if name == "read":
                row[name] = timing.plain_read(case.nbytes, backend=be, pool_bytes=pool_bytes,
                                              calls=CALLS)["us"]
            else:
                row[name] = timing.measure(runs[name][0], pool, calls=CALLS).us
        rounds.append(row)
        print(f"round {rnd}: " + " ".join(f"{a}={v:.2f}" for a, v in row.items()), flush=True)
    med = {name: statistics.median(r[name] for r in rounds) for name in args.variants}
    for name, v in med.items():
        extra = f"  mlx / this {med['mlx'] / v:5.2f}x" if "mlx" in med else ""
        extra += f"  this / read {v / med['read']:5.3f}" if "read" in med else ""
        print(f"median {name:18s} {v:7.2f} us{extra}")
    res = {"device": timing.device_name(), "mlx": mx.__version__, "shape": f"{k}->{n}",
           "chain": args.chain, "calls": CALLS, "pool_sets": len(pool), "rounds": rounds,
           "median_us": med}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


def _profile(runs, pool, rounds, labels_path):
    """Each variant but ``mlx`` once per round, round-robin, between
    cuProfilerStart/Stop; the labels in the launch order of one round."""
    import ctypes

    import mlx.core as mx

    names = [name for name in runs if name != "mlx"]
    with open(labels_path, "w") as f:
        f.write("\n".join(names))
    driver = ctypes.CDLL("libcuda.so.1")
    mx.synchronize()
    driver.cuProfilerStart()
    for rnd in range(rounds):
        for i, name in enumerate(names):
            mx.eval(runs[name][0](*pool[(rnd + i) % len(pool)]))
            mx.synchronize()
    driver.cuProfilerStop()
    return names


if __name__ == "__main__":
    main()
    sys.exit(0)
