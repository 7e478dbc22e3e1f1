"""The bench's plain read: how long a streaming read of a case's bytes takes.

The copy ceiling (:func:`.timing.copy_ceiling`) answers "how fast can MLX move
memory"; it does not say how long a kernel that reads ``B`` bytes takes, and at decode
sizes (8-100 MB) that time has a fixed part (the ramp-up and the tail of one launch)
that a bandwidth leaves out. The bench therefore times, beside every case, a kernel
that does nothing but read the same number of bytes, with the case's method (rotated
pool, the same calls per timing, medians). It is a yardstick, not a bound: it is a
plain kernel, a GEMV that keeps as many bytes in flight can match it, and it carries
the run's noise (``tools/read_sweep.py`` times its launch shapes;
``docs/ncu_h100_gemv.md`` section 10 has the same comparison under ncu).

The kernel (``read_probe``) is written in the Metal dialect like every other
mlx_foundry kernel, so it runs on Metal and, through the compat prelude, on CUDA. The
buffer is cut into chunks of ``iters`` x 32 16-byte words; a 32-lane SIMD-group reads
a chunk with lane ``l`` taking words ``l, l + 32, ...`` (every load of the SIMD-group
is 512 contiguous bytes, ``iters`` of them in flight per lane), then the chunk
``groups`` further on, and so on; it adds the 32-bit words up (wrapping) and writes
one sum. The sums are the output, so no load can be optimized away and the reference
can check them. By default every SIMD-group reads one chunk (as many SIMD-groups as
chunks); ``groups`` fewer than that makes them loop (a persistent grid).
"""

import functools
import math
import numbers

import mlx.core as mx

from ..args import Constant, Output, Scalar, Tensor
from ..dispatch import DispatchConfig
from ..kernel import Kernel
from ..types import dtype_name, u32

ITERS = 8
"""Default 16-byte loads per lane and chunk (the loop is unrolled: all in flight)."""

SIMDGROUPS = 4
"""Default SIMD-groups per threadgroup (128 threads). On an H100 no launch of the probe
(2-32 loads per lane, 128 or 256 threads, one chunk per SIMD-group or a persistent
grid) was the fastest in two sweeps running (``tools/read_sweep.py``,
``docs/read_sweep_h100.json``): at 33 MB they spread over 13.5-16.5 us, the stream's
noise, and from 66 MB over 2-5%. This one was among the fastest in the first."""

_SOURCE = """
template <int ITERS>
METAL_FUNC void read_probe_sum(const device uint* x, device uint* sums, uint n_vec,
                               uint3 tg, uint3 tgs, uint sg, uint lane, uint sgs) {
  // 16-byte loads: MLX allocates every buffer 16-byte aligned.
  const device uint4* v = reinterpret_cast<const device uint4*>(x);
  const uint n_groups = tgs.x * sgs;
  const uint group = tg.x * sgs + sg;
  const uint chunk = 32u * uint(ITERS);
  uint acc = 0u;
  // n_vec + n_groups * chunk < 2**32 (checked on the host): no index wraps.
  for (uint first = group * chunk + lane; first < n_vec + lane; first += n_groups * chunk) {
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const uint i = first + uint(it) * 32u;
      if (i < n_vec) {
        const uint4 w = v[i];
        acc += w.x + w.y + w.z + w.w;
      }
    }
  }
  acc = simd_sum(acc);
  if (lane == 0u) {
    sums[group] = acc;
  }
}
"""


def chunk_words(iters=ITERS):
    """32-bit words in one chunk (one SIMD-group's ``iters`` loads per lane)."""
    return iters * 32 * 4


def groups_for(words, iters=ITERS, simdgroups=SIMDGROUPS):
    """SIMD-groups (and sums) of the default grid for ``words`` 32-bit words: one per
    chunk, rounded up to whole threadgroups."""
    return simdgroups * math.ceil(math.ceil(words / chunk_words(iters)) / simdgroups)


def reference_sums(x, iters=ITERS, groups=None):
    """The probe's output from plain MLX ops: SIMD-group ``g`` sums the chunks ``g, g +
    groups, ...`` of ``chunk_words(iters)`` words, modulo 2**32."""
    size = chunk_words(iters)
    groups = groups or groups_for(x.size, iters)
    chunks = math.ceil(x.size / size)
    padded = mx.pad(x.astype(mx.uint64), (0, chunks * size - x.size))
    per_chunk = mx.sum(padded.reshape(chunks, size), axis=1)
    rounds = math.ceil(chunks / groups)  # groups past the last chunk sum nothing: 0
    per_chunk = mx.pad(per_chunk, (0, rounds * groups - chunks))
    sums = mx.sum(per_chunk.reshape(rounds, groups), axis=0)
    return (sums & 0xFFFFFFFF).astype(mx.uint32)


@functools.cache
def _kernel():
    return Kernel(
        "read_probe", source_text=_SOURCE, function="read_probe_sum", template=("ITERS",),
        args=[Tensor("x", (mx.uint32,), ndim=1),
              Output("sums", shape=lambda b: (b.GROUPS,), dtype=mx.uint32),
              Scalar("n_vec", u32),
              Constant("ITERS", value=ITERS),
              # The grid and the output's shape: launch constants, so that they key the
              # launch (a runtime scalar does not); the kernel reads the grid's size.
              Constant("SIMDGROUPS", in_body=False),
              Constant("GROUPS", in_body=False)],
        attributes=("threadgroup_position_in_grid", "threadgroups_per_grid",
                    "simdgroup_index_in_threadgroup", "thread_index_in_simdgroup",
                    "simdgroups_per_threadgroup"),
        dispatch=lambda b: DispatchConfig((b.GROUPS // b.SIMDGROUPS,), (32 * b.SIMDGROUPS,)),
        reference=lambda b: reference_sums(b.x, b.ITERS, b.GROUPS))


MAX_GROUPS = 1 << 24
"""The most SIMD-groups a launch may have (a grid of at most 2**24 threadgroups of one
SIMD-group, within CUDA's and Metal's limits, and 2**29 threads)."""


def _check_count(who, name, v, lo, hi):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"[{who}] '{name}' must be an int but got {type(v).__name__}.")
    if not lo <= v <= hi:
        raise ValueError(f"[{who}] '{name}' must be in [{lo}, {hi}] but got {v}.")
    return int(v)


def read_probe(x, *, iters=ITERS, simdgroups=SIMDGROUPS, groups=None, backend=None):
    """Read every byte of ``x`` once; return one wrapping 32-bit sum per SIMD-group.

    Args:
        x (array): ``uint32``, 1-D, a non-zero multiple of 4 words (whole 16-byte
            loads). A strided view is copied first by MLX, as for every kernel.
        iters (int): 16-byte loads per lane and chunk, 1 to 64. Default: 8.
        simdgroups (int): SIMD-groups per threadgroup, 1 to 32. Default: 4.
        groups (int, optional): SIMD-groups in all, a multiple of ``simdgroups``.
            Default: one per chunk (:func:`groups_for`).
        backend (str, optional): ``"metal"``, ``"cuda"`` or ``"reference"``.
            Default: chosen automatically.

    Returns:
        array: ``uint32`` of shape ``(groups,)``, equal to :func:`reference_sums`.

    Example:
        >>> sums = read_probe(mx.arange(4096, dtype=mx.uint32))
    """
    who = "read_probe"
    if not isinstance(x, mx.array):
        raise TypeError(f"[{who}] 'x' must be an mlx.core.array but got {type(x).__name__}.")
    if x.dtype != mx.uint32:
        raise ValueError(f"[{who}] 'x' must have dtype uint32 but got "
                         f"{dtype_name(x.dtype)}.")
    if x.ndim != 1:
        raise ValueError(f"[{who}] 'x' must be 1-D but has shape {tuple(x.shape)}.")
    if x.size == 0 or x.size % 4:
        raise ValueError(f"[{who}] 'x' must hold a non-zero multiple of 4 words (whole "
                         f"16-byte loads) but holds {x.size}.")
    iters = _check_count(who, "iters", iters, 1, 64)
    simdgroups = _check_count(who, "simdgroups", simdgroups, 1, 32)
    if groups is None:
        groups = groups_for(x.size, iters, simdgroups)
    else:
        groups = _check_count(who, "groups", groups, 1, MAX_GROUPS)
    if groups % simdgroups:
        raise ValueError(f"[{who}] 'groups' ({groups}) must be a multiple of 'simdgroups' "
                         f"({simdgroups}): whole threadgroups.")
    if groups > MAX_GROUPS:
        raise ValueError(f"[{who}] 'x' ({x.size} words) needs {groups} SIMD-groups at "
                         f"iters={iters}, more than {MAX_GROUPS}; raise 'iters'.")
    if x.size // 4 + groups * 32 * iters >= 2**32:
        raise ValueError(f"[{who}] 'x' ({x.size} words) with groups={groups} and "
                         f"iters={iters} would index past 2**32 16-byte words; use fewer "
                         f"'groups' or a smaller 'x'.")
    return _kernel()(x, n_vec=x.size // 4, ITERS=iters, SIMDGROUPS=simdgroups,
                     GROUPS=groups, backend=backend)


def probe_words(nbytes):
    """Words of the probe's buffer for ``nbytes`` bytes (rounded up to 16 bytes)."""
    return 4 * max(1, math.ceil(nbytes / 16))
