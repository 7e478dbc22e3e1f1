"""Glue between Metal-dialect kernel text and MLX's CUDA custom kernels.

Kernel sources are written once in the Metal dialect (DESIGN.md). On NVIDIA,
``mx.fast.cuda_kernel`` compiles them with NVRTC after this module has

* prepended the Metal-compat prelude (``metal_src/compat/metal_compat.cuh``)
  and wrapped our header into ``namespace mlx::core::cu`` (:func:`wrap_header`),
  so that the prelude's Metal types (``float4`` with constructors, ...) shadow
  CUDA's global aggregates of the same names;
* declared the Metal thread attributes the body mentions, computed from
  ``threadIdx``/``blockIdx``/``blockDim``/``gridDim`` (:func:`attribute_preamble`);
* written threadgroup arrays as ``__shared__`` (:func:`shared_declaration`).

The full CUDA source MLX builds is then::

    #include "mlx/backend/cuda/device/utils.cuh"
    #include <cooperative_groups.h>
    <wrap_header(header)>
    namespace mlx::core::cu {
    __global__ void custom_kernel_NAME(const T0* in0, ..., T* out0, ...) {
      constexpr int X = 4; using T = __half;
      <attribute_preamble(body)><shared declarations><body>
    }
    }

No MLX import is needed here.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
from pathlib import Path

__all__ = [
    "PRELUDE_RESOURCE",
    "METAL_ATTRIBUTES",
    "prelude",
    "wrap_header",
    "attribute_preamble",
    "mentioned_attributes",
    "shared_declaration",
    "check_body",
    "cuda_body",
]

# Package-relative location of the prelude.
PRELUDE_RESOURCE = ("mlx_foundry", "metal_src/compat/metal_compat.cuh")

# MLX's Metal side (mlx/backend/common/metal_kernel.cpp) adds these as kernel
# parameters, with these types, when the body contains the name as a plain
# substring (comments included). Same list, same order, same detection here.
METAL_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
)

_NS = "mlx::core::cu::metal_compat::"

# CUDA expression for each attribute (helpers defined in the prelude).
# Notes: threads_per_grid / grid_size are gridDim * blockDim, i.e. the grid
# rounded up to whole threadgroups (MLX's CUDA launch does not pass the exact
# grid). dispatch_* equal their non-dispatch forms (CUDA has no non-uniform
# threadgroups).
_ATTRIBUTE_EXPR: dict[str, str] = {
    "dispatch_quadgroups_per_threadgroup": _NS + "attr_quadgroups_per_threadgroup()",
    "dispatch_simdgroups_per_threadgroup": _NS + "attr_simdgroups_per_threadgroup()",
    "dispatch_threads_per_threadgroup": _NS + "attr_threads_per_threadgroup()",
    "grid_origin": _NS + "attr_grid_origin()",
    "grid_size": _NS + "attr_threads_per_grid()",
    "quadgroup_index_in_threadgroup": _NS + "attr_quadgroup_index_in_threadgroup()",
    "quadgroups_per_threadgroup": _NS + "attr_quadgroups_per_threadgroup()",
    "simdgroup_index_in_threadgroup": _NS + "attr_simdgroup_index_in_threadgroup()",
    "simdgroups_per_threadgroup": _NS + "attr_simdgroups_per_threadgroup()",
    "thread_execution_width": "32u",
    "thread_index_in_quadgroup": _NS + "attr_thread_index_in_quadgroup()",
    "thread_index_in_simdgroup": _NS + "attr_thread_index_in_simdgroup()",
    "thread_index_in_threadgroup": _NS + "attr_thread_index_in_threadgroup()",
    "thread_position_in_grid": _NS + "attr_thread_position_in_grid()",
    "thread_position_in_threadgroup": _NS + "attr_thread_position_in_threadgroup()",
    "threadgroup_position_in_grid": _NS + "attr_threadgroup_position_in_grid()",
    "threadgroups_per_grid": _NS + "attr_threadgroups_per_grid()",
    "threads_per_grid": _NS + "attr_threads_per_grid()",
    "threads_per_simdgroup": "32u",
    "threads_per_threadgroup": _NS + "attr_threads_per_threadgroup()",
}

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# A C++ type as our generators write it: names, ::, template arguments,
# spaces, digits, commas (e.g. "float", "uint32_t", "vec<half, 4>").
_CTYPE = re.compile(r"[A-Za-z_][A-Za-z0-9_:<>, ]*\Z")
_INCLUDE_LINE = re.compile(r"^[ \t]*#[ \t]*include\b", re.MULTILINE)
_PRAGMA_ONCE_LINE = re.compile(r"^[ \t]*#[ \t]*pragma[ \t]+once[ \t]*$\n?", re.MULTILINE)
# `threadgroup <type> <name>[` : a threadgroup array declared in a body.
_THREADGROUP_ARRAY = re.compile(
    r"\bthreadgroup\s+(?:const\s+)?[A-Za-z_][\w:<>, ]*?\s+[A-Za-z_]\w*\s*\["
)


def _read_prelude_text() -> str:
    try:
        res = importlib.resources.files(PRELUDE_RESOURCE[0]).joinpath(PRELUDE_RESOURCE[1])
        return res.read_text(encoding="utf-8")
    except Exception:  # noqa: BLE001 - package not importable: read by path
        # Loaded by path (package __init__ not importable): read next to us.
        here = Path(__file__).resolve().parent.parent
        return (here / PRELUDE_RESOURCE[1]).read_text(encoding="utf-8")


@functools.lru_cache(maxsize=1)
def prelude() -> str:
    """Text of the Metal-compat prelude (cached)."""
    text = _read_prelude_text()
    return text if text.endswith("\n") else text + "\n"


def wrap_header(header: str, *, prelude_text: str | None = None) -> str:
    """The full ``header=`` for ``mx.fast.cuda_kernel``.

    ``prelude_text`` replaces the inline prelude (e.g. with an ``#include`` of an
    installed copy, see ``backends/cuda.py``).

    The prelude, then ``header`` inside ``namespace mlx::core::cu`` (where the
    kernel body lives, and where the Metal types shadow CUDA's). ``#pragma once``
    lines are dropped; ``#include`` lines are rejected (they cannot sit inside a
    namespace, and our sources resolve their includes before this point).
    """
    if not isinstance(header, str):
        raise TypeError(f"header must be str, not {type(header).__name__}")
    if _INCLUDE_LINE.search(header):
        line = _INCLUDE_LINE.search(header)
        end = header.find("\n", line.start())
        raise ValueError(
            "Metal-dialect header for CUDA must not contain #include lines "
            f"(found {header[line.start():end if end >= 0 else None].strip()!r}); "
            "resolve includes before wrap_header()"
        )
    body = _PRAGMA_ONCE_LINE.sub("", header)
    if body and not body.endswith("\n"):
        body += "\n"
    return (
        (prelude() if prelude_text is None else prelude_text)
        + "\n// ---- mlx_foundry kernel header (Metal dialect) ----\n"
        + "namespace mlx::core::cu {\n\n"
        + body
        + "\n} // namespace mlx::core::cu\n"
    )


def mentioned_attributes(body: str) -> list[tuple[str, str]]:
    """(name, Metal type) of each thread attribute MLX's Metal side would add
    for ``body``: plain substring search, comments included, MLX's order."""
    return [(name, t) for name, t in METAL_ATTRIBUTES if name in body]


def attribute_preamble(body: str) -> str:
    """Declarations to prepend to a CUDA body, one per thread attribute the
    body mentions, e.g.
    ``const uint3 thread_position_in_grid = ...attr_thread_position_in_grid();``.
    Empty string when the body mentions none."""
    lines = [
        f"  const {t} {name} = {_ATTRIBUTE_EXPR[name]};\n"
        for name, t in mentioned_attributes(body)
    ]
    return "".join(lines)


def shared_declaration(ctype: str, name: str, count: int, align: int = 16) -> str:
    """How a threadgroup array is declared in a CUDA kernel body.

    Metal: ``threadgroup float name[count];``.
    CUDA:  ``__shared__ alignas(16) float name[count];`` -- aligned to 16 bytes
    so that stages may read it through ``float4``/``uint4`` pointers, as Metal
    threadgroup memory allows.
    """
    if not isinstance(ctype, str) or not _CTYPE.match(ctype.strip()):
        raise ValueError(f"invalid C type for shared memory: {ctype!r}")
    if not isinstance(name, str) or not _IDENT.match(name):
        raise ValueError(f"invalid identifier for shared memory: {name!r}")
    if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
        raise ValueError(f"shared memory count must be a positive int, got {count!r}")
    if isinstance(align, bool) or not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise ValueError(f"alignment must be a positive power of two, got {align!r}")
    return f"__shared__ alignas({align}) {' '.join(ctype.split())} {name}[{count}];"


def check_body(body: str) -> None:
    """Reject Metal-dialect constructs that compile on CUDA but mean something
    else: a ``threadgroup T name[N];`` declaration would become a per-thread
    array (``threadgroup`` is an empty macro on CUDA). Use
    :func:`shared_declaration` (and its Metal counterpart) instead."""
    m = _THREADGROUP_ARRAY.search(body)
    if m:
        raise ValueError(
            "threadgroup arrays must be declared by the generator "
            f"(cuda_compat.shared_declaration), found {m.group(0)!r}"
        )


def cuda_body(body: str, shared: tuple[tuple[str, str, int], ...] | list = ()) -> str:
    """Convenience: attribute preamble + shared declarations + body, as the
    ``source=`` of ``mx.fast.cuda_kernel``. ``shared`` holds
    ``(ctype, name, count)`` triples."""
    check_body(body)
    decls = "".join(f"  {shared_declaration(t, n, c)}\n" for t, n, c in shared)
    return attribute_preamble(body) + decls + body
