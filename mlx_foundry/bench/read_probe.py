"""The read floor: how long a plain streaming read of a case's bytes takes.

The copy ceiling (:func:`.timing.copy_ceiling`) answers "how fast can MLX move
memory"; it does not say how long a kernel that must *read* ``B`` bytes needs at
least, and at decode sizes (8-100 MB) that time has a fixed part (the ramp-up and the
tail of one launch) that a bandwidth leaves out. The bench therefore times, beside
every case, a kernel that does nothing but read the same number of bytes, with the
case's method (rotated pool, the same calls per timing, medians). A target time
below the read floor of the same run asks for more than any kernel of this launch
shape can give (``docs/ncu_h100_gemv.md`` section 10 measured the same under ncu).

The kernel (``read_probe``) is written in the Metal dialect like every other
mlx_foundry kernel, so it runs on Metal and, through the compat prelude, on CUDA. Each
32-lane SIMD-group reads one contiguous chunk of :data:`ITERS` x 32 16-byte words,
lane ``l`` taking words ``l, l + 32, ...`` (every load of the SIMD-group is 512
contiguous bytes), adds the 32-bit words up (wrapping) and writes one sum; the sums
are its output, so no load can be optimized away and the reference can check them.
"""

import functools
import math

import mlx.core as mx

from ..args import Constant, Output, Scalar, Tensor
from ..dispatch import DispatchConfig
from ..kernel import Kernel
from ..types import u32

ITERS = 8
"""16-byte loads per lane (the loop is unrolled: all of them in flight at once)."""

SIMDGROUPS = 8
"""SIMD-groups per threadgroup (256 threads)."""

WORDS_PER_GROUP = ITERS * 32 * 4
"""32-bit words one SIMD-group reads (and sums)."""

_SOURCE = """
template <int ITERS>
METAL_FUNC void read_probe_sum(const device uint* x, device uint* sums, uint n_vec,
                               uint3 tg, uint sg, uint lane, uint sgs) {
  // 16-byte loads: MLX allocates every buffer 16-byte aligned.
  const device uint4* v = reinterpret_cast<const device uint4*>(x);
  const uint group = tg.x * sgs + sg;
  const uint first = group * (32u * uint(ITERS)) + lane;
  uint acc = 0u;
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const uint i = first + uint(it) * 32u;
    if (i < n_vec) {
      const uint4 w = v[i];
      acc += w.x + w.y + w.z + w.w;
    }
  }
  acc = simd_sum(acc);
  if (lane == 0u) {
    sums[group] = acc;
  }
}
"""


def groups_for(words):
    """SIMD-groups (and sums) for a buffer of ``words`` 32-bit words."""
    return SIMDGROUPS * math.ceil(math.ceil(words / WORDS_PER_GROUP) / SIMDGROUPS)


def reference_sums(x):
    """The probe's output from plain MLX ops: per chunk of :data:`WORDS_PER_GROUP`
    words, their sum modulo 2**32."""
    n = groups_for(x.size)
    padded = mx.pad(x.astype(mx.uint64), (0, n * WORDS_PER_GROUP - x.size))
    sums = mx.sum(padded.reshape(n, WORDS_PER_GROUP), axis=1)
    return (sums & 0xFFFFFFFF).astype(mx.uint32)


@functools.cache
def _kernel():
    return Kernel(
        "read_probe", source_text=_SOURCE, function="read_probe_sum", template=("ITERS",),
        args=[Tensor("x", (mx.uint32,), ndim=1),
              Output("sums", shape=lambda b: (groups_for(b.x.size),), dtype=mx.uint32),
              Scalar("n_vec", u32),
              Constant("ITERS", value=ITERS)],
        attributes=("threadgroup_position_in_grid", "simdgroup_index_in_threadgroup",
                    "thread_index_in_simdgroup", "simdgroups_per_threadgroup"),
        dispatch=lambda b: DispatchConfig((groups_for(b.x.size) // SIMDGROUPS,),
                                          (32 * SIMDGROUPS,)),
        reference=lambda b: reference_sums(b.x))


def read_probe(x, *, backend=None):
    """Read every byte of ``x`` once; return one wrapping 32-bit sum per chunk.

    Args:
        x (array): ``uint32``, 1-D, row-contiguous, a non-zero multiple of 4 words
            (whole 16-byte loads).
        backend (str, optional): ``"metal"``, ``"cuda"`` or ``"reference"``.
            Default: chosen automatically.

    Returns:
        array: ``uint32`` of shape ``(groups_for(x.size),)``, equal to
        :func:`reference_sums` of ``x``.

    Example:
        >>> sums = read_probe(mx.arange(4096, dtype=mx.uint32))
    """
    who = "read_probe"
    if not isinstance(x, mx.array):
        raise TypeError(f"[{who}] 'x' must be an mlx.core.array but got {type(x).__name__}.")
    if x.dtype != mx.uint32:
        raise ValueError(f"[{who}] 'x' must have dtype uint32 but got {x.dtype}.")
    if x.ndim != 1:
        raise ValueError(f"[{who}] 'x' must be 1-D but has shape {tuple(x.shape)}.")
    if x.size == 0 or x.size % 4:
        raise ValueError(f"[{who}] 'x' must hold a non-zero multiple of 4 words (whole "
                         f"16-byte loads) but holds {x.size}.")
    if x.size // 4 >= 2**32 - WORDS_PER_GROUP:
        raise ValueError(f"[{who}] 'x' holds {x.size} words; the probe indexes 16-byte "
                         f"words with 32 bits.")
    return _kernel()(x, n_vec=x.size // 4, backend=backend)


def probe_words(nbytes):
    """Words of the probe's buffer for ``nbytes`` bytes (rounded up to 16 bytes)."""
    return 4 * max(1, math.ceil(nbytes / 16))
