// MLX affine quantization with each row one stream (mlx_foundry.interleave): the same
// values as policies/affine.metal's layout, with every group's scale and bias stored
// beside the weights they scale. Needs policies/affine.metal (declared before it).
//
// Why: a GEMV over MLX's layout reads three streams per row (weights, scales, biases);
// on an H200 the tall 4-bit GEMV's 2-byte scale and bias loads cost its access pattern
// 2.6 us of 13.7 (docs/bench_journal.md, session 30). Here a row is one stream.
//
// w: uint32 [N, ROW_WORDS]. A row is a run of records of 16 chunks (512 elements): a
// record's weight words (16 * BITS, MLX's bit stream of those elements), then one word
// per group of the record: (scale, bias) as two S, scale in the low half. The last record
// may be shorter (K % 512 elements, whole groups). Rows are padded to a multiple of four
// words, so every row and every record starts 16-byte aligned. S is 2 bytes (half or
// bfloat16_t).
//
// A warp's 32 lanes read 32 consecutive chunks: two records, 576 contiguous bytes at
// 4 bits and group 64, scale and bias words included.

template <typename S, int BITS, int GS, int K>
struct PolicyAffineRows {
  const device uint* w;

  enum : int { CHUNK = 32, VEC = 1, HALF_PAIRS = BITS == 4 ? 4 : (BITS == 8 ? 2 : 0) };
  enum : uint {
    REC_CHUNKS = 16u,
    REC_GROUPS = uint(512 / GS),
    REC_WORDS = uint(16 * BITS + 512 / GS),
    CHUNKS = uint(K / 32),
    FULL_RECS = uint(K / 32 / 16),
    LAST_CHUNKS = uint(K / 32 % 16),
    ROW_WORDS = (uint(K / 32 * BITS + K / GS) + 3u) & ~3u
  };
  static_assert(sizeof(S) == 2, "PolicyAffineRows: 2-byte scales and biases");
  static_assert(512 % GS == 0 && K % GS == 0, "PolicyAffineRows: whole groups per record");

  // First weight word of chunk c of row n.
  METAL_FUNC uint chunk_word(uint n, int c) const {
    return n * ROW_WORDS + uint(c) / REC_CHUNKS * REC_WORDS + uint(c) % REC_CHUNKS * uint(BITS);
  }

  // The (scale, bias) word of chunk c's group: after its record's weight words.
  METAL_FUNC uint group_word(uint n, int c) const {
    const uint r = uint(c) / REC_CHUNKS;
    const uint here = r < FULL_RECS ? REC_CHUNKS : LAST_CHUNKS;
    return n * ROW_WORDS + r * REC_WORDS + here * uint(BITS) +
           uint(c) % REC_CHUNKS * 32u / uint(GS);
  }

  METAL_FUNC float dot_chunk(uint n, int c, thread const float* xv, float xs) const {
    uint wd[BITS];
    affine_load_words<BITS>(w + chunk_word(n, c), wd);
    float a0 = 0.0f, a1 = 0.0f;
#pragma unroll
    for (int i = 0; i < 32; i += 2) {
      a0 = metal::fma(affine_qf<BITS>(wd, i), xv[i], a0);
      a1 = metal::fma(affine_qf<BITS>(wd, i + 1), xv[i + 1], a1);
    }
    const uint sb = w[group_word(n, c)];
    const float s = float(as_type<S>(ushort(sb & 0xFFFFu))) * float(1 << BITS);
    return metal::fma(s, a0 + a1, (float(as_type<S>(ushort(sb >> 16u))) - s) * xs);
  }

  // ---- packed-half path (HALF_PAIRS > 0): as PolicyAffine's ----
  struct HalfChunk {
    uint wd[BITS];
    uint sb;
  };

  METAL_FUNC uint half_key(uint lane) const {
    return simd_shuffle(0x64006400u + lane, ushort(0));
  }

  METAL_FUNC HalfChunk load_h(uint n, int c) const {
    HalfChunk ch;
    affine_load_words<BITS>(w + chunk_word(n, c), ch.wd);
    ch.sb = w[group_word(n, c)];
    return ch;
  }

  METAL_FUNC float dot_h(thread const HalfChunk& ch, thread const half2* xh, float xs,
                         uint key) const {
    constexpr int WPA = BITS / 4;
    constexpr int PPW = 16 / BITS;
    half2 h[4];
#pragma unroll
    for (int a = 0; a < 4; ++a) {
      h[a] = as_type<half2>(0u);
#pragma unroll
      for (int j = 0; j < WPA; ++j) {
        h[a] = affine_hdot_word<BITS>(ch.wd[a * WPA + j], key, xh + (a * WPA + j) * PPW, h[a]);
      }
    }
    const float d = ((float(h[0].x) + float(h[0].y)) + (float(h[1].x) + float(h[1].y))) +
                    ((float(h[2].x) + float(h[2].y)) + (float(h[3].x) + float(h[3].y)));
    const float s = float(as_type<S>(ushort(ch.sb & 0xFFFFu))) * float(1 << (BITS - 1));
    return metal::fma(s, d, (s + float(as_type<S>(ushort(ch.sb >> 16u)))) * xs);
  }

  METAL_FUNC float dot_tail(uint n, int c, thread const float* xv, int avail) const {
    return 0.0f;
  }
};
