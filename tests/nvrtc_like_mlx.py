"""Compile a CUDA unit the way MLX 0.32's ``cuda_kernel`` does, without a GPU.

``nvcc`` checks that the text compiles, but MLX builds custom kernels with NVRTC and
looks the kernel up by name (``nvrtcAddNameExpression("mlx::core::cu::<name>")``,
``jit_module.cpp``); NVRTC preprocesses that name with the source, so a macro that
names the kernel can break the lookup while ``nvcc`` is content. This helper repeats
MLX's calls (name expression, ``--device-as-default-execution-space``, sm_90a) through
``ctypes``; tests skip where the library or MLX's CUDA headers are missing.

``libnvrtc``: ``MLX_FOUNDRY_NVRTC``, else the ``nvidia-cuda-nvrtc`` wheel, else the
system's. Headers: ``MLX_FOUNDRY_CUDA_INCLUDE`` (MLX's device headers, see
``test_cuda_compat.py``), MLX's ``include`` folder and the toolkit next to ``nvcc``.
"""

import ctypes
import ctypes.util
import glob
import os
import shutil
from pathlib import Path

import mlx.core as mx
import pytest


def _library():
    path = os.environ.get("MLX_FOUNDRY_NVRTC")
    if not path:
        try:
            import nvidia  # the namespace package of NVIDIA's CUDA wheels
            found = [f for d in nvidia.__path__
                     for f in glob.glob(os.path.join(d, "cu*", "lib", "libnvrtc.so.*"))]
            path = found[0] if found else None
        except ImportError:
            path = None
    path = path or ctypes.util.find_library("nvrtc")
    if not path:
        pytest.skip("libnvrtc not found (MLX_FOUNDRY_NVRTC, nvidia-cuda-nvrtc)")
    lib = ctypes.CDLL(path)
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    return lib


def nvcc_and_mlx_headers():
    """``(nvcc, folder of MLX's CUDA device headers)``; skips the test without either
    (``MLX_FOUNDRY_CUDA_INCLUDE``, see ``test_cuda_compat.py``; default /tmp/mlxinc)."""
    inc = os.environ.get("MLX_FOUNDRY_CUDA_INCLUDE", "/tmp/mlxinc")
    nvcc = shutil.which("nvcc")
    if nvcc is None or not (Path(inc) / "mlx/backend/cuda/device/utils.cuh").is_file():
        pytest.skip("nvcc or MLX's CUDA headers (MLX_FOUNDRY_CUDA_INCLUDE) not available")
    return nvcc, inc


def nvcc_compile(program, out, mode, *args, **kwargs):
    """Compile the CUDA unit MLX would build for ``program`` with these example arguments
    (``inspection.cuda_source_of``) to ``out`` with ``nvcc`` for sm_90 (``mode``:
    ``-ptx`` or ``-c``); skips without nvcc or MLX's CUDA headers."""
    import subprocess

    from mlx_foundry.inspection import cuda_source_of

    nvcc, inc = nvcc_and_mlx_headers()
    cu = out.with_suffix(".cu")
    cu.write_text(cuda_source_of(program, *args, **kwargs))
    r = subprocess.run([nvcc, "-arch=sm_90", "-std=c++17", mode, str(cu), "-o", str(out),
                        f"-I{inc}", f"-I{Path(mx.__file__).resolve().parent / 'include'}"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-6000:]


def include_dirs():
    """MLX's device headers, MLX's ``include`` and the CUDA toolkit's (with CCCL)."""
    nvcc, inc = nvcc_and_mlx_headers()
    toolkit = Path(os.path.realpath(nvcc)).parent.parent / "include"
    if not (toolkit / "cuda_fp16.h").is_file():  # a wrapper script: ask it
        import subprocess
        line = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull],
                              capture_output=True, text=True).stderr
        top = next((w.split("=", 1)[1] for w in line.split() if w.startswith("TOP=")), None)
        toolkit = Path(top) / "include" if top else toolkit
    return [inc, str(Path(mx.__file__).resolve().parent / "include"), str(toolkit),
            str(toolkit / "cccl")]


def compile_like_mlx(source, kernel_name, options=()):
    """``(lowered_name, log)`` of ``source`` compiled by NVRTC as MLX compiles it, with
    ``kernel_name`` (``custom_kernel_<name>``) looked up as MLX looks it up. Raises
    ``RuntimeError`` with NVRTC's log when either step fails."""
    lib = _library()
    dirs = include_dirs()
    prog = ctypes.c_void_p()
    code = lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"kernel.cu", 0,
                                  None, None)
    if code:
        raise RuntimeError(f"nvrtcCreateProgram: {lib.nvrtcGetErrorString(code)}")
    try:
        expression = f"mlx::core::cu::{kernel_name}".encode()
        if lib.nvrtcAddNameExpression(prog, expression):
            raise RuntimeError("nvrtcAddNameExpression failed")
        args = [b"--device-as-default-execution-space", b"--gpu-architecture=sm_90a",
                *(f"--include-path={d}".encode() for d in dirs),
                *(o.encode() for o in options)]
        code = lib.nvrtcCompileProgram(prog, len(args), (ctypes.c_char_p * len(args))(*args))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        log = log.value.decode(errors="replace")
        if code:
            raise RuntimeError(f"NVRTC failed to compile: {log[-4000:]}")
        lowered = ctypes.c_char_p()
        code = lib.nvrtcGetLoweredName(prog, expression, ctypes.byref(lowered))
        if code:
            raise RuntimeError(f"nvrtcGetLoweredName: {lib.nvrtcGetErrorString(code)}; "
                               f"{log[-4000:]}")
        return lowered.value.decode(), log
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
