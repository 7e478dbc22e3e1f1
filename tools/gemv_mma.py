"""The 4-bit decode GEMV on tensor cores: a measure for ``tools/gemv_ab.py`` (``mma:``).

Since session 23 the closing notes have named fewer instructions per weight byte as what
might close the GEMVs' last 9-11% to a plain read on an H200: the packed-half path
spends ~13 instructions per word of eight weights (4 LOP3, 1 shift, 4 HFMA2 to
dequantize, 4 HFMA2 to multiply) plus the conversions of its half sums to float, 92-98
SASS instructions per 16 bytes of weights in the decode GEMVs' loops. Tensor cores take
the multiply and the sums: this GEMV dequantizes as the package does
(``metal_src/policies/affine.metal``) and hands the words to ``mma.sync.m16n8k16`` (f16
in, f32 accumulate): 63-67 instructions per 16 bytes, ~31% fewer executed under ncu.

It is CUDA-only text (inline PTX): the Metal dialect has no ``simdgroup_matrix`` in the
prelude, and Metal's 8x8 fragments would not map onto CUDA's without shuffles. So it is a
measure of what the tensor cores would buy, not a candidate. MLX affine, 4 bits, group
64, half ``x``, one row of ``x``; K a multiple of 256 and N of 16 * T.

Measured on an H200 (session 28, ``docs/gemv_mma_h200_s28.txt``, five calls), it never
beat the package's kernels by a margin that matters. Under ncu (one launch alone) it was
slower at every launch: 16.1-22.0 us against 12.7 (4096 -> 14336) and 13.3 us (14336 ->
4096), with 23-35% fewer instructions executed. In the bench's method (independent
calls) it took 13.7-16.1 against 11.7 us at 4096 -> 14336, and at 14336 -> 4096 from a
tie (T2 S4: 13.94 against 14.03 us, with 6% of the warp slots: the calls overlap) to 16%
slower; chained (the first text) 15-23% slower at 4096 -> 14336, from 9% slower to 2%
faster at 14336 -> 4096. At the same bytes in flight per SM (4096 -> 14336, T2 S4 with
128 registers and 256 bytes per lane, against R4's 72 registers, 128 bytes per lane and
1.7x the warps) it took 16.3 against 12.7 us under ncu; at the same warps per SM
(14336 -> 4096, T1 S8) 16.5 against 13.3 us, with half the bytes in flight per lane.
Fewer instructions per weight byte do not buy the GEMVs time on an H200.

Layout (``MMA_SOURCE``): the weights are A (16 rows x 16 k), ``x`` is B (16 k x 8
columns). A threadgroup holds 16 * T rows (T tiles of sixteen), and its SIMDS SIMD-groups
split K in steps of 256 elements (four groups of 64). Lane (g, c) = (lane / 4, lane % 4)
holds rows 16t + g and 16t + g + 8; of each row's 128 bytes in a step it loads bytes 16c
and 64 + 16c (every load instruction reads 64 contiguous bytes of each of its rows), i.e.
elements 32c.. (group c / 2 of the step) and 128 + 32c.. (group 2 + c / 2). Word j of a
row (eight elements) becomes the pairs (e0, e4) (e1, e5) (e2, e6) (e3, e7), the A
fragment of two MMAs as they are (no register moves); ``x``, staged once per
threadgroup in shared memory in the same pairs, is B, and B's column n is group n of the
step: a lane's ``x`` where its word lies in group g, zero elsewhere (columns 4..7 are
not read). So D[row][n] is group n's partial dot of that row, and lane (g, c < 2) folds
D[g][2c], D[g][2c + 1] (and rows g + 8) with their groups' scales, biases and sums of
``x``.
"""

import re

BITS, GROUP = 4, 64
STEP = 256  # elements of K per row per step: four groups of 64

MMA_SOURCE = """
// mma (gemv_ab): the 4-bit GEMV on tensor cores; CUDA-only (inline PTX). See
// tools/gemv_mma.py for the layout.
METAL_FUNC void mma_m16n8k16(thread float* d, uint a0, uint a1, uint a2, uint a3, uint b0,
                             uint b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Word w (nibbles e0..e7) as the half2 pairs (e0,e4) (e1,e5) (e2,e6) (e3,e7), each
// (q - 8) / 8: the package's packed-half extraction (policies/affine.metal).
METAL_FUNC void mma_dequant(uint w, uint magic, thread uint* q) {
  const half2 s_lo = as_type<half2>(0x30003000u);  // 1/8
  const half2 o_lo = as_type<half2>(0xD808D808u);  // -129
  const half2 s_hi = as_type<half2>(0x20002000u);  // 1/128
  const half2 o_hi = as_type<half2>(0xC880C880u);  // -9
  const uint w8 = w >> 8u;
  q[0] = as_type<uint>(metal::fma(as_type<half2>((w & 0x000F000Fu) | magic), s_lo, o_lo));
  q[1] = as_type<uint>(metal::fma(as_type<half2>((w & 0x00F000F0u) | magic), s_hi, o_hi));
  q[2] = as_type<uint>(metal::fma(as_type<half2>((w8 & 0x000F000Fu) | magic), s_lo, o_lo));
  q[3] = as_type<uint>(metal::fma(as_type<half2>((w8 & 0x00F000F0u) | magic), s_hi, o_hi));
}

// Step s of the lane's two rows in each tile (rows g and g + 8: two 16-byte loads each),
// and the scales and biases of those rows in the two groups the lane folds (4 s + 2 (c % 2)
// and the next).
template <int K, int T>
METAL_FUNC void mma_load(const device uint* w, const device half* scales,
                         const device half* biases, uint row0, uint g, uint c, int s,
                         thread uint4* wv, thread half* sb) {
  constexpr uint WPR = uint(K / 8);
  constexpr uint GPR = uint(K / 64);
#pragma unroll
  for (int t = 0; t < T; ++t) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint r = row0 + uint(16 * t + 8 * h) + g;
      // Bytes 16 c and 64 + 16 c of the row's 128 in this step (each load instruction
      // reads 64 contiguous bytes of each of its eight rows).
      const device uint4* p =
          reinterpret_cast<const device uint4*>(w + r * WPR + uint(s * 32) + 4u * c);
      wv[4 * t + 2 * h] = p[0];
      wv[4 * t + 2 * h + 1] = p[4];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const uint at = r * GPR + uint(4 * s) + 2u * (c & 1u) + uint(i);
        sb[8 * t + 4 * h + 2 * i] = scales[at];
        sb[8 * t + 4 * h + 2 * i + 1] = biases[at];
      }
    }
  }
}

// The threadgroup's x, staged once: K / 8 units of 16 bytes, each the pairs
// (x0,x4) (x1,x5) (x2,x6) (x3,x7) of eight elements, in the order the lanes read them
// (below); then a zero unit; then sum(x) of every group of 64 as floats.
template <int K>
METAL_FUNC void mma_stage_x(const device half* x, uint tid, uint nthreads,
                            threadgroup uint4* xst) {
  constexpr uint NG = uint(K / 64);
  const device uint4* xq = reinterpret_cast<const device uint4*>(x);
  for (uint v = tid; v < uint(K / 8); v += nthreads) {
    const uint4 u = xq[v];
    // Unit u of step s holds elements 8 u..; lane c reads its word j (units 4 c + j and
    // 16 + 4 c + j - 4) at 32 s + 4 j + c: the four lanes of a j are consecutive.
    const uint u8 = v % 32u;
    const uint lc = (u8 % 16u) / 4u;
    const uint lj = u8 % 4u + (u8 >= 16u ? 4u : 0u);
    xst[(v / 32u) * 32u + 4u * lj + lc] =
        uint4((u.x & 0xFFFFu) | (u.z << 16u), (u.x >> 16u) | (u.z & 0xFFFF0000u),
              (u.y & 0xFFFFu) | (u.w << 16u), (u.y >> 16u) | (u.w & 0xFFFF0000u));
  }
  if (tid == 0u) {
    xst[uint(K / 8)] = uint4(0u, 0u, 0u, 0u);
  }
  threadgroup float* xsum = reinterpret_cast<threadgroup float*>(xst + uint(K / 8) + 1u);
  for (uint gi = tid; gi < NG; gi += nthreads) {
    uint u[32];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const uint4 v = xq[gi * 8u + uint(i)];
      u[4 * i] = v.x;
      u[4 * i + 1] = v.y;
      u[4 * i + 2] = v.z;
      u[4 * i + 3] = v.w;
    }
    float xs = 0.0f;
#pragma unroll
    for (int k = 0; k < 16; ++k) {
      const half2 p = as_type<half2>(u[k]) + as_type<half2>(u[k + 16]);
      xs += float(p.x) + float(p.y);
    }
    xsum[gi] = xs;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

template <int K, int N, int T, int SIMDS, int ACC>
METAL_FUNC void gemv_mma(const device half* x, const device uint* w,
                         const device half* scales, const device half* biases,
                         device half* out, uint3 tg_pos, uint sg, uint lane,
                         threadgroup uint4* mma_xst, threadgroup float* mma_part) {
  constexpr int STEPS = K / 256;
  const uint g = lane >> 2u;
  const uint c = lane & 3u;
  const uint row0 = tg_pos.x * uint(16 * T);
  // 0x64006400 kept in a register (see PolicyAffine::half_key).
  const uint magic = simd_shuffle(0x64006400u + lane, ushort(0));
  float acc[2 * T];
#pragma unroll
  for (int i = 0; i < 2 * T; ++i) {
    acc[i] = 0.0f;
  }
  uint4 wv[4 * T];
  half sb[8 * T];
  mma_load<K, T>(w, scales, biases, row0, g, c, metal::min(int(sg), STEPS - 1), wv, sb);
  mma_stage_x<K>(x, sg * 32u + lane, uint(32 * SIMDS), mma_xst);
  threadgroup const float* xsum =
      reinterpret_cast<threadgroup const float*>(mma_xst + uint(K / 8) + 1u);
  for (int s = int(sg); s < STEPS; s += SIMDS) {
    uint4 nv[4 * T];
    half nsb[8 * T];
    mma_load<K, T>(w, scales, biases, row0, g, c, metal::min(s + SIMDS, STEPS - 1), nv, nsb);
    uint4 xp[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      // Word j's group in the step: c / 2 for j < 4, 2 + c / 2 after.
      const bool keep = g >= 4u || g == (c >> 1u) + (j < 4 ? 0u : 2u);
      xp[j] = mma_xst[keep ? uint(32 * s + 4 * j) + c : uint(K / 8)];
    }
    const uint g0 = uint(4 * s) + 2u * (c & 1u);
    const float xs0 = xsum[g0];
    const float xs1 = xsum[g0 + 1u];
#pragma unroll
    for (int t = 0; t < T; ++t) {
      // ACC independent accumulators: chains of 16 / ACC dependent MMAs.
      float da[ACC][4];
#pragma unroll
      for (int a = 0; a < ACC; ++a) {
        da[a][0] = da[a][1] = da[a][2] = da[a][3] = 0.0f;
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const uint4 va = wv[4 * t + j / 4];
        const uint4 vb = wv[4 * t + 2 + j / 4];
        const uint wa = j % 4 == 0 ? va.x : (j % 4 == 1 ? va.y : (j % 4 == 2 ? va.z : va.w));
        const uint wb = j % 4 == 0 ? vb.x : (j % 4 == 1 ? vb.y : (j % 4 == 2 ? vb.z : vb.w));
        uint qa[4];
        uint qb[4];
        mma_dequant(wa, magic, qa);
        mma_dequant(wb, magic, qb);
        mma_m16n8k16(da[(2 * j) % ACC], qa[0], qb[0], qa[1], qb[1], xp[j].x, xp[j].y);
        mma_m16n8k16(da[(2 * j + 1) % ACC], qa[2], qb[2], qa[3], qb[3], xp[j].z, xp[j].w);
      }
      float d[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        d[i] = da[0][i];
#pragma unroll
        for (int a = 1; a < ACC; ++a) {
          d[i] += da[a][i];
        }
      }
      // Rows g (d0, d1) and g + 8 (d2, d3), groups g0 and g0 + 1:
      // scale * sum(q x) + bias * sum(x), sum(q x) = 8 (d + sum(x)).
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float s0 = float(sb[8 * t + 4 * h]) * 8.0f;
        const float b0 = float(sb[8 * t + 4 * h + 1]);
        const float s1 = float(sb[8 * t + 4 * h + 2]) * 8.0f;
        const float b1 = float(sb[8 * t + 4 * h + 3]);
        float a = acc[2 * t + h];
        a = metal::fma(s0, d[2 * h] + xs0, metal::fma(b0, xs0, a));
        a = metal::fma(s1, d[2 * h + 1] + xs1, metal::fma(b1, xs1, a));
        acc[2 * t + h] = a;
      }
    }
#pragma unroll
    for (int i = 0; i < 4 * T; ++i) {
      wv[i] = nv[i];
    }
#pragma unroll
    for (int i = 0; i < 8 * T; ++i) {
      sb[i] = nsb[i];
    }
  }
  // Lanes c = 0 and 1 hold the four groups of each step; then the SIMD-groups.
#pragma unroll
  for (int i = 0; i < 2 * T; ++i) {
    acc[i] += simd_shuffle_xor(acc[i], ushort(1));
  }
  if (c == 0u) {
#pragma unroll
    for (int t = 0; t < T; ++t) {
      mma_part[sg * uint(16 * T) + uint(16 * t) + g] = acc[2 * t];
      mma_part[sg * uint(16 * T) + uint(16 * t + 8) + g] = acc[2 * t + 1];
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const uint tid = sg * 32u + lane;
  if (tid < uint(16 * T)) {
    float v = 0.0f;
#pragma unroll
    for (int p = 0; p < SIMDS; ++p) {
      v += mma_part[uint(p * 16 * T) + tid];
    }
    out[row0 + tid] = half(v);
  }
}
"""

STATIC_SHARED = 48 * 1024  # bytes of static shared memory a CUDA kernel may declare


def x_units(k):
    """16-byte units of the staged ``x``: its pairs (K / 8 units), a zero unit, and the
    sums of x per group (floats, padded to whole units)."""
    return k // 8 + 1 + (k // GROUP + 3) // 4


def shared_bytes(k, launch):
    """Shared memory of a launch: the staged ``x`` and the SIMD-groups' partial sums."""
    return 16 * x_units(k) + 4 * 16 * launch["T"] * launch["SIMDS"]


def parse_launch(text):
    """``"t2s8a2b2"`` -> ``{"T": 2, "SIMDS": 8, "ACC": 2, "MINBLOCKS": 2}``: ``aA``, the
    independent MMA accumulators per tile (default 1: one chain of 16 dependent MMAs per
    step); ``bB``, CUDA's ``__launch_bounds__(THREADS, B)`` (the GEMV stages'
    ``MINBLOCKS``)."""
    m = re.match(r"t(\d+)s(\d+)(?:a(\d+))?(?:b(\d+))?$", text)
    if m is None:
        raise ValueError(f"[gemv_mma] a launch is written tTsS[aA][bB] (e.g. t2s4, t2s8a2b2) "
                         f"but got {text!r}.")
    tiles, simds = int(m[1]), int(m[2])
    if not 1 <= tiles <= 4:
        raise ValueError(f"[gemv_mma] T (tiles of 16 rows) must be 1 to 4 but got {tiles}.")
    if simds not in (1, 2, 4, 8):
        raise ValueError(f"[gemv_mma] S (SIMD-groups) must be 1, 2, 4 or 8 but got {simds}.")
    launch = {"T": tiles, "SIMDS": simds, "ACC": int(m[3] or 1)}
    if launch["ACC"] not in (1, 2, 4):
        raise ValueError(f"[gemv_mma] A (accumulators per tile) must be 1, 2 or 4 but got "
                         f"{launch['ACC']}.")
    if m[4] is not None:
        from mlx_foundry.stages.gemv import check_min_blocks

        check_min_blocks(int(m[4]), 32 * simds)
        launch["MINBLOCKS"] = int(m[4])
    return launch


def check_shape(k, n, launch):
    """Raise unless the kernel covers a K x N case at ``launch`` exactly."""
    rows = 16 * launch["T"]
    if k % STEP:
        raise ValueError(f"[gemv_mma] K must be a multiple of {STEP} but got {k}.")
    if n % rows:
        raise ValueError(f"[gemv_mma] N must be a multiple of the {rows} rows of a "
                         f"threadgroup but got {n}.")
    if shared_bytes(k, launch) > STATIC_SHARED:
        raise ValueError(f"[gemv_mma] K {k} needs {shared_bytes(k, launch)} bytes of shared "
                         f"memory at this launch, over CUDA's {STATIC_SHARED} of static "
                         f"shared memory.")


def mma_kernel():
    """The variant as a :class:`mlx_foundry.Kernel` (CUDA only)."""
    import mlx.core as mx

    from mlx_foundry import Kernel
    from mlx_foundry.args import Constant, Output, Tensor
    from mlx_foundry.dispatch import DispatchConfig

    def dispatch(b):
        k, n = b.x.shape[1], b.w.shape[0]
        if b.x.shape[0] != 1:
            raise ValueError(f"[gemv_mma] 'x' must be one row (1, K) but has shape "
                             f"{tuple(b.x.shape)}.")
        if b.w.shape[1] * 32 // BITS != k:
            raise ValueError(f"[gemv_mma] 'w' must be (N, K / 8) = (N, {k // 8}) for x's K "
                             f"{k} but has shape {tuple(b.w.shape)}.")
        for name in ("scales", "biases"):
            if tuple(b[name].shape) != (n, k // GROUP):
                raise ValueError(f"[gemv_mma] {name!r} must be (N, K / {GROUP}) = "
                                 f"({n}, {k // GROUP}) but has shape {tuple(b[name].shape)}.")
        check_shape(k, n, {"T": b.T, "SIMDS": b.SIMDS})
        return DispatchConfig((n // (16 * b.T),), (32 * b.SIMDS,))

    return Kernel(
        "gemv_mma", source_text=MMA_SOURCE, function="gemv_mma",
        template=("K", "N", "T", "SIMDS", "ACC"),
        args=[Tensor("x", (mx.float16,), ndim=2), Tensor("w", (mx.uint32,), ndim=2),
              Tensor("scales", (mx.float16,), ndim=2), Tensor("biases", (mx.float16,), ndim=2),
              Output("out", shape=lambda b: (b.x.shape[0], b.w.shape[0]), dtype="x"),
              Constant("K", value=lambda b: b.x.shape[1]),
              Constant("N", value=lambda b: b.w.shape[0]),
              Constant("T"), Constant("SIMDS"), Constant("ACC", value=1),
              Constant("THREADS", value=lambda b: 32 * b.SIMDS),
              Constant("MINBLOCKS", value=0, in_body=False),
              Constant("PARTS", value=lambda b: 16 * b.T * b.SIMDS),
              Constant("XUNITS", value=lambda b: x_units(b.x.shape[1]))],
        threadgroup=("uint4 mma_xst[XUNITS]", "float mma_part[PARTS]"),
        attributes=("threadgroup_position_in_grid", "simdgroup_index_in_threadgroup",
                    "thread_index_in_simdgroup"),
        dispatch=dispatch)
