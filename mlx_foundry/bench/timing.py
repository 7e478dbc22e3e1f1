"""How every published number is measured (DESIGN.md, "How to measure").

The method, for one callable ``fn`` and a *pool* of input sets:

1. **Pool larger than the last-level cache.**  :func:`make_pool` builds distinct
   input sets (weights and activations) until their bytes exceed ``pool_bytes``
   (by default ``max(2 x 60 MB, 2 x LLC)``: H100 L2 is 50 MB, H200 60 MB, Apple's SLC
   up to 96 MB), and at least :data:`MIN_POOL_SETS` (32) sets however large one set
   is: with fewer, calls that overlap on the GPU shared weights in L2.
   Every call takes the next set of the pool, round-robin, and the rotation goes on
   across timings, so no call finds its weights in the cache. Tiny sets (one
   activation row: the 1x4096 norms) stop at 512 sets, a pool under the cache: their
   inputs live in the cache in real decoding too.
2. **Warm-up.**  A first batch is evaluated untimed: the first call of a custom
   kernel pays its JIT compile (NVRTC on CUDA can take seconds).
3. **Many independent calls per timing.**  One timing builds the lazy graphs of
   ``calls`` calls (a list of outputs) and then ``mx.eval``-uates them together (the
   bench passes the same ``calls`` to baseline and candidate: on CUDA the number of
   calls per evaluation changes the result, see ``bench.CALLS_PER_TIMING``);
   the time of ``mx.eval`` divided by ``calls`` is the per-call time.  Building
   the graph first and timing only the evaluation measures what the device
   spends per call, kernel launches and inter-kernel gaps included, without the
   Python time of building graphs: in a real decode loop mlx-lm overlaps that
   with the device through ``mx.async_eval``.  The Python time per call
   (graph building: argument checks, kernel-cache lookups) is reported
   separately as ``host_us``: it must stay small, but it is not device time.
   ``mx.eval`` returns only when the work is done, so the clock is honest.
   The calls are independent, and the GPU may run one call's kernels beside the
   next one's (measured on an H200 in session 24: a GEMV launch that leaves SMs free
   took 0.94x the default's time with independent calls and 1.06x with each call
   waiting for the one before, docs/bench_journal.md); baseline and candidate get the same
   treatment. The tuner times dependent calls instead (``autotune.depending_on``).
   When the outputs of all calls would not fit ``out_budget`` bytes, a timing
   is split into batches, each evaluated (and timed) separately, and summed.
4. **Median of many timings** (>= 10 by default, fewer with ``--quick``).

The copy ceiling (:func:`copy_ceiling`) is measured the same way on a plain
elementwise copy (``x + 0``) of a large buffer, counting bytes read + written. The
plain read of a case (:func:`plain_read`) is the time of a kernel that only reads as
many bytes as the case moves (:mod:`.read_probe`), measured exactly as the case is.
"""

import math
import platform
import statistics
import time
from dataclasses import dataclass, field

import mlx.core as mx
from mlx.utils import tree_flatten

MB = 1 << 20

# Last-level cache sizes we know of (bytes); the default pool is twice the largest.
LLC_BYTES = {"H100": 50 * MB, "H200": 60 * MB, "apple": 96 * MB}
DEFAULT_POOL_BYTES = max(2 * 60 * MB, 2 * max(LLC_BYTES.values()))
SMALL_POOL_BYTES = 1 * MB          # reference backend / CPU: the command only has to run


def device_name():
    """A readable name of the default device (``"NVIDIA H100 80GB HBM3"``, ``"Apple M3 Max"``)."""
    try:
        info = mx.device_info()
        name = info.get("device_name")
        if name:
            return str(name)
    except Exception:  # noqa: BLE001 - older MLX or no device info
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_info():
    """``mx.device_info()`` as plain JSON-able values (empty dict if unavailable)."""
    try:
        return {str(k): (v if isinstance(v, (int, float, str)) else str(v))
                for k, v in mx.device_info().items()}
    except Exception:  # noqa: BLE001
        return {}


def mlx_version():
    return str(getattr(mx, "__version__", "unknown"))


def default_pool_bytes(backend, quick=False):
    """Bytes of the rotated input pool: larger than any last-level cache on a GPU.

    ``--quick`` keeps the full pool on a GPU (building it takes milliseconds and a
    smaller pool would let the cache flatter every number); on the reference
    backend the pool is small, since only the command itself is being exercised.
    """
    if backend == "reference":
        return SMALL_POOL_BYTES
    return DEFAULT_POOL_BYTES


def nbytes(tree):
    """Total bytes of the arrays in a (nested) output."""
    return sum(a.nbytes for _, a in tree_flatten(tree) if isinstance(a, mx.array))


def arrays(tree):
    return [a for _, a in tree_flatten(tree) if isinstance(a, mx.array)]


MIN_POOL_SETS = 32
"""Distinct input sets in every pool, however large one set is.

The bytes of the pool are not enough: the count matters. On an H100 (session 14,
`docs/pool_sweep_h100.json`), with 2, 4 or 8 sets our fp16 GEMV 14336 -> 4096 read its
112 MiB of weights at 3.7-3.9 TB/s, over the HBM's 3.35 TB/s, even from an 896 MB
pool; with 16 or 32 sets, 2.9 TB/s. The 4-bit GEMV took 12.0-12.4 us with 2-8 sets
(63-252 MB) and 13.5-13.9 us with 16-32. The step follows the number of sets, not the
pool's bytes: consistent with the independent calls of one evaluation overlapping on
the GPU, so that calls a few sets apart read the same weights while they are in L2. A
decode step never reads a weight twice; 32 sets put every repeat out of reach."""


def make_pool(make, set_bytes, pool_bytes, *, min_sets=MIN_POOL_SETS, max_sets=512):
    """Build ``ceil(pool_bytes / set_bytes)`` input sets (clamped) with ``make(i)``.

    Args:
        make (callable): ``make(i) -> tuple`` of inputs; distinct ``i`` give distinct data.
        set_bytes (int): bytes one set occupies (weights + activations).
        pool_bytes (int): the pool should hold at least this many bytes.
        min_sets (int): at least this many sets (default :data:`MIN_POOL_SETS`).
        max_sets (int): at most this many sets (default ``512``): tiny inputs
            (activations of one row) live in the cache in real decoding too.

    Returns:
        list of tuples, each evaluated.
    """
    n = min(max_sets, max(min_sets, math.ceil(pool_bytes / max(1, set_bytes))))
    pool = []
    for i in range(n):
        s = make(i)
        s = tuple(s) if isinstance(s, (tuple, list)) else (s,)
        mx.eval(arrays(s))
        pool.append(s)
    return pool


@dataclass
class Timing:
    """The result of :func:`measure` (all times per call, in seconds).

    Attributes:
        median_s: median over timings of (device time of ``calls`` calls) / ``calls``.
        timings_s: the per-call time of every timing.
        host_s: median Python time to build one call's graph.
        calls: calls per timing.
        pool_size: input sets in the pool.
        sets_used: distinct pool sets the timed calls used.
    """

    median_s: float
    timings_s: list = field(default_factory=list)
    host_s: float = 0.0
    calls: int = 0
    pool_size: int = 0
    sets_used: int = 0

    @property
    def us(self):
        return self.median_s * 1e6

    def as_dict(self):
        return {"median_us": self.median_s * 1e6,
                "timings_us": [t * 1e6 for t in self.timings_s],
                "host_us": self.host_s * 1e6, "calls": self.calls,
                "pool_size": self.pool_size, "sets_used": self.sets_used}


def measure(fn, pool, *, repeats=10, calls=None, target_s=0.02, min_calls=8,
            max_calls=2000, warmup=1, out_budget=1 << 30):
    """Time ``fn(*pool[i])`` with the rotated-pool method described in this module.

    Args:
        fn (callable): builds one call's (lazy) output from one input set.
        pool (list[tuple]): input sets, from :func:`make_pool`.
        repeats (int): timings; the median is reported (default ``10``).
        calls (int, optional): calls per timing; default: enough calls for about
            ``target_s`` seconds per timing, within ``[min_calls, max_calls]``.
        target_s (float): wanted duration of one timing (default ``0.02``).
        warmup (int): untimed batches first (default ``1``).
        out_budget (int): bytes of outputs alive at once (default 1 GiB).

    Returns:
        Timing
    """
    if not pool:
        raise ValueError("[bench.measure] 'pool' must hold at least one input set.")
    if repeats < 1:
        raise ValueError(f"[bench.measure] 'repeats' must be >= 1 but got {repeats}.")
    cursor = 0
    used = set()

    def batch(n, record):
        nonlocal cursor
        outs = []
        t0 = time.perf_counter()
        for _ in range(n):
            i = cursor % len(pool)
            cursor += 1
            if record:
                used.add(i)
            outs.append(fn(*pool[i]))
        t1 = time.perf_counter()
        mx.eval(arrays(outs))
        t2 = time.perf_counter()
        return t2 - t1, t1 - t0, outs

    # Warm-up (compiles), and the size of one call's output.
    dt, _, outs = batch(1, False)
    out_bytes = max(1, nbytes(outs))
    del outs
    per_batch = max(1, min(max_calls, out_budget // out_bytes))
    for _ in range(max(0, warmup)):
        dt, _, outs = batch(min(per_batch, max(1, min_calls)), False)
        dt /= max(1, min(per_batch, max(1, min_calls)))
        del outs
    if calls is None:
        calls = int(min(max_calls, max(min_calls, target_s / max(dt, 1e-7))))
    calls = max(1, int(calls))
    per_batch = min(per_batch, calls)

    timings, hosts = [], []
    for _ in range(repeats):
        done, dev, host = 0, 0.0, 0.0
        while done < calls:
            n = min(per_batch, calls - done)
            d, h, outs = batch(n, True)
            del outs
            dev += d
            host += h
            done += n
        timings.append(dev / calls)
        hosts.append(host / calls)
    return Timing(median_s=statistics.median(timings), timings_s=timings,
                  host_s=statistics.median(hosts), calls=calls, pool_size=len(pool),
                  sets_used=len(used))


COPY_BUFFERS = 8
"""Buffers the copy ceiling rotates through (session 14: with 2, overlapping copies
found part of their input in L2 and read 2593-2645 GB/s against 2248 GB/s with 8)."""


def copy_ceiling(nbytes_buffer, *, repeats=10, dtype=mx.float32, target_s=0.05, **kw):
    """The bandwidth of a plain copy (``x + 0``), bytes read + written per second.

    Args:
        nbytes_buffer (int): bytes of the buffer copied (each call reads and writes it);
            the calls rotate through :data:`COPY_BUFFERS` such buffers.
        repeats (int): timings; the median is reported.

    Returns:
        dict: ``{"gbps", "us", "bytes", "buffer_bytes", "timing"}`` (``bytes`` = 2 x buffer).
    """
    itemsize = mx.zeros((1,), dtype=dtype).itemsize
    n = max(1, nbytes_buffer // itemsize)
    pool = [(mx.full((n,), float(i), dtype=dtype),) for i in range(COPY_BUFFERS)]
    mx.eval(pool)
    # Batches of at least 8 copies, so one synchronization per batch stays negligible.
    kw.setdefault("out_budget", max(1 << 30, 8 * n * itemsize))
    t = measure(lambda x: x + 0, pool, repeats=repeats, target_s=target_s, **kw)
    moved = 2 * n * itemsize
    return {"gbps": moved / t.median_s / 1e9, "us": t.us, "bytes": moved,
            "buffer_bytes": n * itemsize, "timing": t.as_dict()}


def plain_read_call(nbytes, *, backend, pool_bytes, probe=None):
    """``(fn, pool, nbytes read)``: the plain read of :func:`plain_read` as a case's call
    and its input pool (``nbytes`` rounded up to 16 bytes, one distinct buffer per set, a
    pool built by :func:`make_pool` with ``pool_bytes``), for timings of one's own."""
    from .read_probe import probe_words, read_probe

    words = probe_words(nbytes)
    pool = make_pool(lambda i: (mx.full((words,), i, dtype=mx.uint32),), 4 * words,
                     pool_bytes)
    probe = probe or {}
    return (lambda x: read_probe(x, backend=backend, **probe)), pool, 4 * words


def plain_read(nbytes, *, backend, pool_bytes, repeats=10, probe=None, **kw):
    """The time of a plain streaming read of ``nbytes`` bytes, measured as a case is.

    The buffers (``nbytes`` rounded up to 16 bytes, distinct contents) rotate through a
    pool built by :func:`make_pool` with ``pool_bytes``, as a case's input sets do, and
    each call runs :func:`~mlx_foundry.bench.read_probe.read_probe` on one of them.

    Args:
        nbytes (int): bytes one call reads.
        backend (str): the backend the probe runs on.
        pool_bytes (int): bytes of the rotated pool.
        repeats (int): timings; the median is reported.
        probe (dict, optional): launch keywords of the probe (``iters``,
            ``simdgroups``, ``groups``). Default: its defaults.
        **kw: passed to :func:`measure` (``calls``, ...).

    Returns:
        dict: ``{"us", "gbps", "bytes", "timing"}``.
    """
    fn, pool, read = plain_read_call(nbytes, backend=backend, pool_bytes=pool_bytes,
                                     probe=probe)
    t = measure(fn, pool, repeats=repeats, **kw)
    return {"us": t.us, "gbps": read / t.median_s / 1e9, "bytes": read,
            "timing": t.as_dict()}
