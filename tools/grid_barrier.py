"""The grid barrier of the CUDA-only diagnostics (``tools/barrier_ab.py``,
``tools/persistent_mlp_ab.py``): CUDA text for a kernel's header.

Thread 0 of each threadgroup counts its threadgroup in with an atomic add, then polls
the count until all ``gridDim.x`` threadgroups have arrived. That needs every
threadgroup resident at once, which nothing checks, so a poller gives up after
``SPINS`` polls and sets a flag for the host to report, instead of hanging the device.
The counter must live in device memory: MLX's CUDA allocator puts arrays of at most 8
bytes in managed memory behind the host link, where the polls took ~4 us per
threadgroup (``barrier_ab.SYNC_WORDS``). The Metal dialect has no atomics, and Metal
does not promise that threadgroups waiting on each other make progress.
"""

SPINS = 1 << 22
"""Polls of the counter before a threadgroup gives up (tens of milliseconds)."""

TEXT = r"""
// Thread 0 of a threadgroup: count it in at *arrivals, then wait until all gridDim.x
// threadgroups are in, or give up after GRID_BARRIER_SPINS polls and set *flag. The
// fences order this threadgroup's writes before its arrival, and the others' after.
__device__ __forceinline__ void grid_barrier_arrive_and_wait(unsigned* arrivals,
                                                             unsigned* flag) {
  __threadfence();
  atomicAdd(arrivals, 1u);
  unsigned spins = 0u;
  while (atomicAdd(arrivals, 0u) < gridDim.x) {
    if (++spins > GRID_BARRIER_SPINS) {
      atomicExch(flag, 1u);
      break;
    }
    __nanosleep(32);
  }
  __threadfence();
}
"""


def header(spins=SPINS):
    """The CUDA text that defines ``grid_barrier_arrive_and_wait``."""
    return f"#define GRID_BARRIER_SPINS {int(spins)}u\n" + TEXT


def count(text):
    """An argument that counts something: an int of at least 1."""
    import argparse

    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be an int of at least 1, not {text!r}")
    return n


def threadgroup_size(text):
    """An argument that sizes a threadgroup: a multiple of 32, at most 1024."""
    import argparse

    n = count(text)
    if n % 32 or n > 1024:
        raise argparse.ArgumentTypeError(f"must be a multiple of 32, at most 1024, not {n}")
    return n


def add_timing_arguments(parser, calls):
    """The diagnostics' common options: ``--sets`` (input sets rotated, together larger
    than the L2), ``--rounds``, ``--calls`` (chained calls per timing, default ``calls``)
    and ``--json`` (where ``report`` writes)."""
    parser.add_argument("--sets", type=count, default=3,
                        help="input sets rotated (together larger than the L2)")
    parser.add_argument("--rounds", type=count, default=7)
    parser.add_argument("--calls", type=count, default=calls,
                        help="chained calls per timing")
    parser.add_argument("--json", help="write the rounds and medians here")


def report(medians, per, args, path=None, against="barrier", **extra):
    """Print each variant's median and how far each lies from ``against``'s, and with
    ``path`` write them, every round and ``extra`` to a JSON file beside the device's
    name and MLX's version (the diagnostics' common output)."""
    import json

    import mlx.core as mx

    from mlx_foundry.bench.timing import device_name

    for name, us in medians.items():
        print(f"median {name:8s} {us:8.2f} us per chained call")
    print("; ".join(f"{name} - {against}: {us - medians[against]:+.2f} us"
                    for name, us in medians.items() if name != against))
    if path:
        with open(path, "w") as f:
            json.dump({"device": device_name(), "mlx": mx.__version__, "args": vars(args),
                       "median_us": medians, "rounds_us": per, **extra}, f, indent=1)
