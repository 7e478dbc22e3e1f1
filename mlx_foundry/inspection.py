"""Inspection: the full Metal source MLX would compile, captured on any OS.

On Linux there is no Metal device, but a Metal kernel can be *traced* inside
``mx.export_function``; with ``verbose=True`` MLX prints the whole generated
source (signature and template instantiation included) to C++ stdout.  We
capture file descriptor 1 while tracing.
"""

import os
import re
import sys
import tempfile
import threading

import mlx.core as mx

from .types import _METAL_DTYPE_NAMES

_lock = threading.Lock()
_FENCE = re.compile(r"Generated source code for `([^`]*)`:\n```\n(.*?)\n```", re.S)


def capture_stdout(fn):
    """Run ``fn()`` and return ``(result, text written to fd 1)``."""
    with _lock, tempfile.TemporaryFile(mode="w+b") as tmp:
        sys.stdout.flush()
        saved = os.dup(1)
        try:
            os.dup2(tmp.fileno(), 1)
            result = fn()
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        tmp.seek(0)
        return result, tmp.read().decode(errors="replace")


def traced_metal_sources(fn, *example_inputs):
    """Trace ``fn(*example_inputs)`` for export; return ``[(name, source), ...]``.

    ``fn`` must launch Metal kernels with ``verbose=True``.
    """
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.mlxfn")
        _, text = capture_stdout(lambda: mx.export_function(path, fn, *example_inputs))
    return _FENCE.findall(text)


def metal_source_of(program, *args, **kwargs):
    """The full Metal source of ``program`` for these example arguments."""
    bound, given = program.bind(*args, **kwargs)
    consts = program._constants(bound, given)
    src = program.render("metal", consts, bound)
    full = bound.with_constants(consts)
    out_specs = [o.resolve(full) for o in program.outputs]
    grid, tg = program.dispatch_config(full).mlx_launch("metal")
    kernel = mx.fast.metal_kernel(
        name=src.name, input_names=list(src.input_names),
        output_names=list(src.output_names), source=src.body, header=src.header,
        ensure_row_contiguous=True)
    inputs = program._kernel_inputs(bound)

    def launch(*arrays):
        return kernel(inputs=list(arrays), output_shapes=[s for s, _ in out_specs],
                      output_dtypes=[d for _, d in out_specs], grid=grid, threadgroup=tg,
                      verbose=True)

    found = traced_metal_sources(launch, *inputs)
    if not found:
        raise RuntimeError(f"[{program.who}] MLX printed no Metal source while tracing.")
    return found[-1][1]


# The CUDA types MLX 0.32 writes in a custom kernel's signature (dtype_to_cuda_type):
# the names of its Metal signatures (float, bool and the <cstdint> integers), but CUDA's
# own half types.
_CUDA_TYPES = {**_METAL_DTYPE_NAMES, mx.float16: "__half", mx.bfloat16: "__nv_bfloat16"}


def cuda_source_of(program, *args, **kwargs):
    """The CUDA translation unit MLX's ``cuda_kernel`` would compile for ``program`` with
    these example arguments, as MLX 0.32 writes it (``custom_kernel.cpp``,
    ``build_kernel``), for compiling and inspecting a kernel without a GPU (``nvcc
    -arch=sm_90``; ``tools/gemv_regs.py``). The kernel has MLX's name for it,
    ``custom_kernel_<name>`` (the name launch attributes such as ``MINBLOCKS`` refer to).

    It needs MLX's CUDA device headers and the installed prelude on the include path:
    ``MLX_FOUNDRY_CUDA_INCLUDE`` (see ``tests/test_cuda_compat.py``) and MLX's
    ``include`` folder.
    """
    bound, given = program.bind(*args, **kwargs)
    full = bound.with_constants(program._constants(bound, given))
    src = program.source(*args, backend="cuda", **kwargs)
    params = [f"const {_CUDA_TYPES[a.dtype]}* {d.input_name}"
              for d, a in zip(program.inputs, program._kernel_inputs(bound))]
    params += [f"{_CUDA_TYPES[o.resolve(full)[1]]}* {o.name}" for o in program.outputs]
    return ('#include "mlx/backend/cuda/device/utils.cuh"\n#include <cooperative_groups.h>\n'
            + src.header + "namespace mlx::core::cu {\nnamespace cg = cooperative_groups;\n"
            + f"__global__ void custom_kernel_{src.name}({', '.join(params)}) {{\n{src.body}"
            + "\n}\n}\n")
