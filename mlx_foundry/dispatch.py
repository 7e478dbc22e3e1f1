"""Dispatch configuration -> MLX grid and threadgroup.

MLX counts the grid in *threads* on both backends (``grid = threadgroups x
threads-per-threadgroup``).  Metal dispatches exactly that many threads; CUDA
launches ``ceil(grid / threadgroup)`` blocks.  CUDA also caps grid y and z at
65535 blocks, so the presets put large extents on x.
"""

import numbers
from dataclasses import dataclass

CUDA_MAX_GRID_YZ = 65535
MAX_THREADS_PER_GROUP = 1024
_INT32_MAX = 2**31 - 1


def _is_int(x):
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _triple(v, what):
    if _is_int(v):
        v = (v,)
    if not isinstance(v, (tuple, list)) or not all(_is_int(x) for x in v):
        raise TypeError(f"[DispatchConfig] '{what}' must be an int or a tuple of 1 to 3 ints "
                        f"but got {v!r}.")
    v = tuple(int(x) for x in v)  # NumPy's too
    if not 1 <= len(v) <= 3:
        raise ValueError(f"[DispatchConfig] '{what}' must have 1 to 3 dimensions but got {v}.")
    if any(x < 1 for x in v):
        raise ValueError(f"[DispatchConfig] '{what}' must be positive in every dimension "
                         f"but got {v}.")
    return v + (1,) * (3 - len(v))


@dataclass(frozen=True)
class DispatchConfig:
    """Threadgroups x threads per threadgroup, in up to three dimensions.

    Args:
        groups (int or tuple): threadgroups per grid dimension.
        threads (int or tuple): threads per threadgroup dimension.

    Example:
        >>> DispatchConfig(groups=(448, 1), threads=(256, 1)).mlx_launch()
        ((114688, 1, 1), (256, 1, 1))
    """

    groups: tuple
    threads: tuple

    def __post_init__(self):
        g = _triple(self.groups, "groups")
        t = _triple(self.threads, "threads")
        total = t[0] * t[1] * t[2]
        if total > MAX_THREADS_PER_GROUP:
            raise ValueError(f"[DispatchConfig] {total} threads per threadgroup exceeds "
                             f"{MAX_THREADS_PER_GROUP}.")
        for i in range(3):
            if g[i] * t[i] > _INT32_MAX:
                raise ValueError(f"[DispatchConfig] Grid dimension {i} has "
                                 f"{g[i] * t[i]} threads, over MLX's int32 limit.")
        object.__setattr__(self, "groups", g)
        object.__setattr__(self, "threads", t)

    @classmethod
    def d1(cls, groups, threads):
        """The seed's ``DispatchConfig::d1``: a 1-D launch."""
        return cls((groups,), (threads,))

    def grid(self):
        """MLX's grid: threads in each dimension."""
        return tuple(g * t for g, t in zip(self.groups, self.threads))

    def mlx_launch(self, backend="metal"):
        """``(grid, threadgroup)`` as MLX's kernel call takes them.

        Raises:
            ValueError: for CUDA, when grid y or z exceeds 65535 threadgroups.
        """
        if backend == "cuda":
            for i, axis in ((1, "y"), (2, "z")):
                if self.groups[i] > CUDA_MAX_GRID_YZ:
                    raise ValueError(
                        f"[DispatchConfig] {self.groups[i]} threadgroups on grid {axis} "
                        f"exceed CUDA's limit of {CUDA_MAX_GRID_YZ}; put large extents on x."
                    )
        return self.grid(), self.threads


def _cdiv(a, b):
    return -(-a // b)


def per_element(n, threads=256):
    """One thread per element of ``n``, in 1-D groups of ``threads``."""
    return DispatchConfig((_cdiv(n, threads),), (threads,))


def per_row(rows, threads=256, batch=1):
    """One threadgroup of ``threads`` per row; ``batch`` on y (rows on x)."""
    return DispatchConfig((rows, batch), (threads, 1))


def warp_per_row(rows, rows_per_warp=1, warps_per_group=8, batch=1):
    """One 32-lane SIMD-group per ``rows_per_warp`` rows, ``warps_per_group`` per threadgroup."""
    groups = _cdiv(_cdiv(rows, rows_per_warp), warps_per_group)
    return DispatchConfig((groups, batch), (32 * warps_per_group, 1))
