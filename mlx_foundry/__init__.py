"""mlx_foundry: write, fuse and ship custom GPU kernels for MLX.

Descriptors (structs, policies, args, kernels, stages, compound kernels) are
assembled into one kernel source, compiled by MLX's JIT (Metal, or CUDA through
a Metal-compat prelude), cached by content, and checked against a reference
made of plain MLX ops.
"""

from .args import Bound, Constant, Output, Params, Scalar, Tensor
from .backends import BACKENDS, select_backend
from .cache import CacheInfo, cache_info, clear_cache
from .compound import ChainError, CompoundKernel
from .dispatch import DispatchConfig, per_element, per_row, warp_per_row
from .kernel import Kernel, KernelSource, Program
from .policies import Policy
from .sources import add_source_root
from .stage import Stage, Threadgroup
from .structs import field, struct
from .types import f16, f32, i32, u8, u16, u32, u64

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "Bound", "CacheInfo", "ChainError", "CompoundKernel", "Constant",
    "DispatchConfig", "Kernel", "KernelSource", "Output", "Params", "Policy", "Program",
    "Scalar", "Stage", "Tensor", "Threadgroup", "add_source_root", "cache_info",
    "clear_cache", "f16", "f32", "field", "i32", "per_element", "per_row",
    "select_backend", "struct", "u8", "u16", "u32", "u64", "warp_per_row",
]


# -- mlx-lm integration (lazy: importing mlx_foundry does not import mlx_lm) -----------
def patch(model, **options):
    """Fuse the decode path of an mlx-lm model in place; returns a ``PatchReport``.

    See :func:`mlx_foundry.lm.patch` for the options.
    """
    from .lm import patch as _patch

    return _patch(model, **options)


def unpatch(model):
    """Restore the blocks :func:`patch` changed; returns how many were restored."""
    from .lm import unpatch as _unpatch

    return _unpatch(model)


def __getattr__(name):
    if name == "PatchReport":
        from .lm import PatchReport

        return PatchReport
    if name == "ops":  # ``mf.ops.linear(...)`` after ``import mlx_foundry as mf``
        import importlib

        return importlib.import_module(".ops", __name__)
    raise AttributeError(f"module 'mlx_foundry' has no attribute {name!r}")


__all__ += ["PatchReport", "patch", "unpatch"]
