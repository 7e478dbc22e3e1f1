"""The CUDA backend: Metal-dialect text -> ``mx.fast.cuda_kernel``.

The header gets the Metal-compat prelude (``metal_src/compat/``); the body gets
declarations of the Metal thread attributes it mentions, computed from CUDA's
built-ins.  Threadgroup arrays become ``__shared__`` arrays.
"""

import dataclasses
import functools
import os
from pathlib import Path

import mlx.core as mx

from . import cuda_compat, kernel_object

# Install the prelude as a header file where MLX's NVRTC call looks
# (``--include-path=<mlx>/include``) and include it by a content-hashed name,
# instead of pasting ~45 KB into every kernel.  MLX hashes the whole source of a
# custom kernel on *every evaluation* (to name its JIT module); with the prelude
# inline that cost ~15 us per launch on an H200.  The file name carries the
# prelude's hash, so an edited prelude is a new name (and a new kernel name).
INSTALL_PRELUDE = True  # also each kernel header, see build()


def build(src):
    """Create the MLX kernel object (NVRTC-compiled by MLX on first launch).

    With ``INSTALL_PRELUDE`` the kernel's header is installed too, as
    ``mlx_foundry/kernels/<kernel name>.cuh`` (the name carries the content hash),
    and MLX gets a one-line header: MLX copies the header into the kernel source
    on every call and hashes that source on every evaluation, so a 25 KB header
    (the Q/K/V kernel) would cost microseconds per launch.
    """
    line = _install(f"kernels/{src.name}.cuh", src.header) if INSTALL_PRELUDE else None
    if line is not None:
        src = dataclasses.replace(src, header=line)
    return kernel_object(mx.fast.cuda_kernel, src)


def threadgroup_declaration(ctype, name, count):
    return cuda_compat.shared_declaration(ctype, name, count)


def _install(relpath, text):
    """Write ``text`` to ``<mlx>/include/mlx_foundry/<relpath>`` once; its ``#include``
    line, or ``None`` when MLX's include directory is not writable."""
    try:
        root = Path(mx.__file__).resolve().parent / "include"
        if not root.is_dir():
            return None
        dest = root / "mlx_foundry" / relpath
        if not dest.is_file() or dest.read_text() != text:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(text)
            os.replace(tmp, dest)
    except OSError:
        return None
    return f'#include "mlx_foundry/{relpath}"\n'


@functools.lru_cache(maxsize=1)
def installed_prelude_include():
    """The ``#include`` line of the installed prelude, or ``None`` (then it is inlined)."""
    if not INSTALL_PRELUDE:
        return None
    from ..cache import content_hash

    text = cuda_compat.prelude()
    return _install(f"metal_compat_{content_hash(text)}.cuh", text)


def wrap_header(header):
    return cuda_compat.wrap_header(header, prelude_text=installed_prelude_include())


def body_preamble(body):
    return cuda_compat.attribute_preamble(body)


def launch_attributes(outside, constants):
    """``("launch_bounds", THREADS, MINBLOCKS)`` when the program's out-of-body constants
    (``Constant(in_body=False)``, ``outside``) ask for a register bound, else ``()``.

    ``__launch_bounds__(THREADS, MINBLOCKS)`` holds the kernel to the registers that let
    ``MINBLOCKS`` threadgroups of ``THREADS`` share an SM (the compiler spills past
    them): a decode GEMV's occupancy is set by its registers
    (``docs/ncu_h100_gemv.md`` sections 14 and 17). ``constants``: all of them (the
    bound needs the program's ``THREADS``).
    """
    blocks = outside.get("MINBLOCKS")
    if not blocks or blocks < 0:  # 0: no bound; a negative one fails at dispatch
        return ()
    threads = constants.get("THREADS")
    if threads is None:
        raise ValueError("[cuda] A 'MINBLOCKS' bound needs the program's 'THREADS' "
                         "constant (its threads per threadgroup).")
    return ("launch_bounds", threads, blocks)


def launch_attribute_lines(name, attrs):
    """Header lines that give the kernel MLX declares for ``name`` its attributes.

    MLX writes the declaration itself, after the header
    (``__global__ void custom_kernel_<name>(...)``, ``custom_kernel.cpp``), so the
    header defines the kernel's name as a function-like macro that puts the attribute
    before the name (a macro is not expanded again inside its own expansion). It has to
    be function-like: MLX also hands NVRTC the bare name
    (``nvrtcAddNameExpression("mlx::core::cu::custom_kernel_<name>")``), which NVRTC
    preprocesses with the source, and only a name followed by ``(`` expands. Were MLX
    to name kernels otherwise, the line would do nothing: ncu's registers per thread
    show whether it took.
    """
    _, threads, blocks = attrs
    kernel = f"custom_kernel_{name}"
    return (f"#define {kernel}(...) __launch_bounds__({threads}, {blocks}) "
            f"{kernel}(__VA_ARGS__)\n")
