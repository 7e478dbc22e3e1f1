"""Tests of the Metal-compat prelude for CUDA and its Python glue.

CPU only. Two kinds:

* pure Python: wrap_header / attribute_preamble / shared_declaration /
  check_body, plus a cross-check of the attribute table against MLX's own
  Metal source generation (through ``mx.export_function`` tracing with
  ``verbose=True``, which prints the Metal source on Linux too);
* compile tests: the Metal-dialect sample kernel (tests/data/compat_sample.metal)
  wrapped exactly as MLX's ``build_kernel`` (mlx/backend/cuda/custom_kernel.cpp)
  does, compiled for sm_90 with ``nvcc`` and, when available, with NVRTC using
  MLX's own options. No GPU is needed.

The compile tests need MLX's CUDA device headers
(``mlx/backend/cuda/device/utils.cuh`` and what it includes). MLX embeds them in
``libmlx.so`` and hands them to NVRTC from memory, so no wheel has them on disk.
Extract them from an ``mlx-cuda-13`` wheel::

    pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux_2_35_x86_64 "mlx-cuda-13==0.32.4" -d /tmp/mlxcuda
    (cd /tmp/mlxcuda && unzip -q -o mlx_cuda_13-*.whl)
    python tests/test_cuda_compat.py --extract-headers \
        /tmp/mlxcuda/mlx/lib/libmlx.so /tmp/mlxinc
    export MLX_FOUNDRY_CUDA_INCLUDE=/tmp/mlxinc

For the NVRTC test, also point ``MLX_FOUNDRY_NVRTC`` at ``libnvrtc.so.13`` (e.g.
from the ``nvidia-cuda-nvrtc`` wheel, ``nvidia/cu13/lib/libnvrtc.so.13``), or
install that package so it is found in site-packages.
"""

from __future__ import annotations

import ctypes
import glob
import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLE = Path(__file__).resolve().parent / "data" / "compat_sample.metal"
DTYPES = ("float", "__half", "__nv_bfloat16")


def _load_cuda_compat():
    try:
        return importlib.import_module("mlx_foundry.backends.cuda_compat")
    except Exception:  # noqa: BLE001 - sibling modules may be mid-edit
        # Package __init__ files are written elsewhere; load the module by path.
        path = REPO / "mlx_foundry" / "backends" / "cuda_compat.py"
        spec = importlib.util.spec_from_file_location("_mlx_foundry_cuda_compat", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod


cc = _load_cuda_compat()


# ---------------------------------------------------------------------------
# The sample and MLX's source assembly
# ---------------------------------------------------------------------------


def load_sample(path: Path = SAMPLE):
    """(header, [(ctype, name, count)], body) of a sample .metal file."""
    text = path.read_text()
    _, rest = text.split("// ==== header ====\n", 1)
    header, rest = rest.split("// ==== threadgroup ====\n", 1)
    tg, body = rest.split("// ==== body ====\n", 1)
    shared = []
    for line in tg.strip().splitlines():
        ctype, name, count = line.split()
        shared.append((ctype, name, int(count)))
    return header, shared, body


# (name, CUDA type) of the sample's inputs and outputs; "T" is the dtype.
SAMPLE_INPUTS = [("x", "T"), ("w", "T"), ("params", "uint32_t"), ("wq", "uint32_t"), ("wscale", "T")]
SAMPLE_OUTPUTS = [("out", "T"), ("dq", "float"), ("checks", "float")]


def build_kernel_like_mlx(name, header, source, inputs, outputs, template_args):
    """Python copy of mlx::core::fast::build_kernel (custom_kernel.cpp, 0.32.x),
    without shape/stride arguments (our bodies do not reference them)."""
    src = '\n#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n'
    src += header
    src += "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
    src += f"__global__ void custom_kernel_{name}(\n"
    for n, t in inputs:
        src += f"    const {t}* {n},\n"
    for i, (n, t) in enumerate(outputs):
        src += f"    {t}* {n}" + (",\n" if i < len(outputs) - 1 else ") {\n")
    for n, v in template_args:
        if isinstance(v, bool):
            src += f"  constexpr bool {n} = {'true' if v else 'false'};\n"
        elif isinstance(v, int):
            src += f"  constexpr int {n} = {v};\n"
        else:
            src += f"  using {n} = {v};\n"
    if template_args:
        src += "\n"
    src += source
    src += "\n}\n\n} // namespace mlx::core::cu\n"
    return src


def sample_cuda_source(dtype: str, wrap: bool = True) -> str:
    header, shared, body = load_sample()
    full_header = cc.wrap_header(header) if wrap else cc.prelude() + header
    resolve = lambda t: dtype if t == "T" else t  # noqa: E731
    return build_kernel_like_mlx(
        "compat_sample",
        full_header,
        cc.cuda_body(body, shared),
        [(n, resolve(t)) for n, t in SAMPLE_INPUTS],
        [(n, resolve(t)) for n, t in SAMPLE_OUTPUTS],
        [("BLOCK", 256), ("T", dtype)],
    )


# ---------------------------------------------------------------------------
# Toolchain discovery (skip cleanly without it)
# ---------------------------------------------------------------------------


def _mlx_cuda_include():
    inc = os.environ.get("MLX_FOUNDRY_CUDA_INCLUDE")
    if not inc:
        pytest.skip(
            "MLX_FOUNDRY_CUDA_INCLUDE is not set: MLX's CUDA device headers "
            "(mlx/backend/cuda/device/utils.cuh) are needed; see this module's docstring"
        )
    dirs = [d for d in inc.split(os.pathsep) if d]
    if not any((Path(d) / "mlx/backend/cuda/device/utils.cuh").is_file() for d in dirs):
        pytest.skip(f"no mlx/backend/cuda/device/utils.cuh under MLX_FOUNDRY_CUDA_INCLUDE={inc!r}")
    return dirs


def _nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH (CUDA toolkit absent): CUDA compile test skipped")
    return nvcc


def _cuda_toolkit_include():
    cands = []
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            cands.append(Path(os.environ[env]) / "include")
    cands.append(Path("/usr/local/cuda/include"))
    cands += [Path(p) for p in sorted(glob.glob("/usr/local/cuda-*/include"), reverse=True)]
    purelib = Path(sysconfig.get_paths()["purelib"])
    cands += [purelib / "nvidia" / "cu13" / "include", purelib / "nvidia" / "cuda_runtime" / "include"]
    for c in cands:
        if (c / "cuda_fp16.h").is_file():
            return c
    return None


def _nvrtc_lib():
    path = os.environ.get("MLX_FOUNDRY_NVRTC")
    if not path:
        purelib = Path(sysconfig.get_paths()["purelib"])
        found = sorted(glob.glob(str(purelib / "nvidia" / "cu13" / "lib" / "libnvrtc.so.*")))
        found += sorted(glob.glob("/usr/local/cuda*/lib64/libnvrtc.so.13*"))
        found = [f for f in found if "builtins" not in f and ".alt." not in f]
        if not found:
            pytest.skip(
                "NVRTC not found: set MLX_FOUNDRY_NVRTC to libnvrtc.so.13 "
                "(nvidia-cuda-nvrtc wheel) to compile exactly as MLX does"
            )
        path = found[0]
    lib_dir = Path(path).parent
    for b in sorted(lib_dir.glob("libnvrtc-builtins.so.*")):
        if ".alt." not in b.name:
            ctypes.CDLL(str(b), mode=ctypes.RTLD_GLOBAL)
            break
    try:
        return ctypes.CDLL(path)
    except OSError as e:
        pytest.skip(f"cannot load NVRTC from {path}: {e}")


def nvcc_compile(source: str, tmp_path: Path) -> subprocess.CompletedProcess:
    nvcc = _nvcc()
    incs = _mlx_cuda_include()
    cu = tmp_path / "kernel.cu"
    cu.write_text(source)
    cmd = [nvcc, "-arch=sm_90", "-std=c++17", "-c", str(cu), "-o", str(tmp_path / "kernel.o")]
    cmd += [f"-I{d}" for d in incs]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def nvrtc_compile(source: str) -> tuple[int, str]:
    """Compile with NVRTC and MLX's options (jit_module.cpp). (result, log)."""
    incs = _mlx_cuda_include()
    cuda_inc = _cuda_toolkit_include()
    if cuda_inc is None:
        pytest.skip("CUDA toolkit headers (cuda_fp16.h) not found for NVRTC")
    lib = _nvrtc_lib()
    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"compat_sample.cu", 0, None, None)
    assert rc == 0, f"nvrtcCreateProgram failed: {rc}"
    opts = ["--device-as-default-execution-space", "--gpu-architecture=sm_90a"]
    opts += [f"--include-path={d}" for d in incs]
    if (cuda_inc / "cccl").is_dir():
        opts.append(f"--include-path={cuda_inc / 'cccl'}")
    opts.append(f"--include-path={cuda_inc}")
    arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    try:
        rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, buf)
        return rc, buf.value.decode(errors="replace")
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


# ---------------------------------------------------------------------------
# Compile tests
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_compiles_with_nvcc(dtype, tmp_path):
    res = nvcc_compile(sample_cuda_source(dtype), tmp_path)
    assert res.returncode == 0, res.stderr[-6000:]
    # The prelude makes every compat function __device__: no "__host__ function" errors,
    # and no warnings at all from our text.
    assert "warning" not in res.stderr, res.stderr[-6000:]


@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_compiles_with_nvrtc_like_mlx(dtype):
    rc, log = nvrtc_compile(sample_cuda_source(dtype))
    assert rc == 0, log[-6000:]


def test_unwrapped_header_does_not_compile(tmp_path):
    """Without wrap_header's namespace, `float4(a, b, c, d)` in the header means
    CUDA's constructor-less ::float4: the wrapping is what makes the dialect work
    (and this test shows the compile tests can fail)."""
    res = nvcc_compile(sample_cuda_source("float", wrap=False), tmp_path)
    assert res.returncode != 0
    assert "error" in res.stderr


def test_wide_loads_stay_wide(tmp_path):
    """float4(*(const device half4*)p) must be one 8-byte load, uint4 one 16-byte load."""
    header = """
template <typename T>
METAL_FUNC float4 load4(const device T* p, uint i) {
  return float4(*reinterpret_cast<const device vec<T, 4>*>(p + i));
}
"""
    body = """
const uint i = thread_position_in_grid.x;
float4 a = load4(x, i * 4);
uint4 q = reinterpret_cast<const device uint4*>(wq)[i];
reinterpret_cast<device float4*>(out)[i] = a + float4(q);
"""
    src = build_kernel_like_mlx(
        "wide", cc.wrap_header(header), cc.cuda_body(body),
        [("x", "__half"), ("wq", "uint32_t")], [("out", "float")], [],
    )
    nvcc = _nvcc()
    incs = _mlx_cuda_include()
    cu = tmp_path / "wide.cu"
    cu.write_text(src)
    ptx = tmp_path / "wide.ptx"
    res = subprocess.run(
        [nvcc, "-arch=sm_90", "-std=c++17", "-ptx", str(cu), "-o", str(ptx)] + [f"-I{d}" for d in incs],
        capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    text = ptx.read_text()
    assert re.search(r"ld\.global(\.nc)?\.v4\.u16", text), "half4 load was split"
    assert re.search(r"ld\.global(\.nc)?\.v4\.(u32|b32)", text), "uint4 load was split"
    assert re.search(r"st\.global\.v4\.f32", text), "float4 store was split"


def _ptx(header, body, inputs, outputs, tmp_path, name="k"):
    src = build_kernel_like_mlx(name, cc.wrap_header(header), cc.cuda_body(body), inputs, outputs, [])
    nvcc = _nvcc()
    incs = _mlx_cuda_include()
    cu = tmp_path / f"{name}.cu"
    cu.write_text(src)
    ptx = tmp_path / f"{name}.ptx"
    res = subprocess.run(
        [nvcc, "-arch=sm_90", "-std=c++17", "-ptx", str(cu), "-o", str(ptx)] + [f"-I{d}" for d in incs],
        capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    return ptx.read_text()


def test_half2_arithmetic_is_packed(tmp_path):
    """half2 fma/+/-/*/negation are one packed f16x2 instruction each (HFMA2, HADD2, ...),
    with no round trip through float and no scalar half operations."""
    header = """
METAL_FUNC half2 h2ops(half2 a, half2 b, half2 c) {
  half2 r = metal::fma(a, b, c) + a * b - c + (-a);
  r += a;
  r *= b;
  return fma(r, c, a);
}
"""
    body = """
const uint i = thread_position_in_grid.x;
half2 a = as_type<half2>(wq[3 * i]);
half2 b = as_type<half2>(wq[3 * i + 1]);
half2 c = as_type<half2>(wq[3 * i + 2]);
reinterpret_cast<device uint*>(out)[i] = as_type<uint>(h2ops(a, b, c));
"""
    text = _ptx(header, body, [("wq", "uint32_t")], [("out", "float")], tmp_path, "h2")
    assert len(re.findall(r"fma\.rn\.f16x2", text)) == 2, text
    assert len(re.findall(r"\badd(\.rn)?\.f16x2", text)) == 3, text
    assert len(re.findall(r"\bmul(\.rn)?\.f16x2", text)) == 2, text
    assert re.search(r"\bsub(\.rn)?\.f16x2", text) and re.search(r"\bneg\.f16x2", text), text
    assert not re.search(r"cvt\.(f32\.f16|rn\.f16\.f32)", text), "half2 math went through float"
    assert not re.search(r"\b(add|sub|mul|fma\.rn)\.f16\b", text), "half2 math was split"


def test_other_vector_math_keeps_its_behaviour(tmp_path):
    """bfloat2 and float2 keep the component-wise templates (bfloat2 fma through float)."""
    header = """
METAL_FUNC float2 v2ops(float2 a, float2 b, bfloat2 c, bfloat2 d) {
  bfloat2 e = metal::fma(c, d, c) + c * d;
  return metal::fma(a, b, a) + a * b + float2(e);
}
"""
    body = """
const uint i = thread_position_in_grid.x;
float2 a = float2(x[4 * i], x[4 * i + 1]);
float2 b = float2(x[4 * i + 2], x[4 * i + 3]);
bfloat2 c = as_type<bfloat2>(wq[2 * i]);
bfloat2 d = as_type<bfloat2>(wq[2 * i + 1]);
reinterpret_cast<device float2*>(out)[i] = v2ops(a, b, c, d);
"""
    text = _ptx(header, body, [("x", "float"), ("wq", "uint32_t")], [("out", "float")], tmp_path,
                "v2")
    assert "f16x2" not in text and "bf16x2" not in text
    assert len(re.findall(r"fma\.rn\.f32", text)) >= 4, text


def test_mlx_signature_pieces_survive_the_prelude(tmp_path):
    """`device`/`constant` are macros after the prelude: MLX's own spellings that
    follow it (__grid_constant__ Shape/Strides arguments, cooperative groups,
    __shared__, __constant__) must still compile."""
    body = """
auto blk = cg::this_thread_block();
__shared__ float tile[32];
tile[blk.thread_rank() % 32] = x[elem_to_loc(int64_t(threadIdx.x), x_shape.data(), x_strides.data(), x_ndim)];
blk.sync();
out[thread_position_in_grid.x] = tile[0];
"""
    src = build_kernel_like_mlx("sig", cc.wrap_header(""), cc.cuda_body(body), [("x", "float")], [("out", "float")], [])
    src = src.replace(
        "    const float* x,\n",
        "    const float* x,\n    const __grid_constant__ Shape x_shape,\n"
        "    const __grid_constant__ Strides x_strides,\n    const __grid_constant__ int x_ndim,\n",
    )
    src = src.replace("namespace mlx::core::cu {\n\nnamespace cg", "__constant__ float c_table[4];\nnamespace mlx::core::cu {\n\nnamespace cg")
    res = nvcc_compile(src, tmp_path)
    assert res.returncode == 0, res.stderr[-6000:]


# ---------------------------------------------------------------------------
# Pure Python behaviour
# ---------------------------------------------------------------------------


def test_prelude_is_cached_and_defines_the_dialect():
    p = cc.prelude()
    assert p is cc.prelude()
    for needle in (
        "#define METAL_FUNC __device__ __forceinline__",
        "#define device",
        "#define threadgroup",
        "#define constant const",
        "namespace mlx::core::cu",
        "simd_sum",
        "threadgroup_barrier",
        "as_type",
    ):
        assert needle in p, needle


def test_prelude_packs_half2_arithmetic():
    """half2 (vec<__half, 2>) has exact-match overloads on __half2 intrinsics, preferred to
    the component-wise templates, which stay for every other vector type."""
    p = cc.prelude()
    for op, intrinsic in (("operator+", "__hadd2"), ("operator-", "__hsub2"),
                          ("operator*", "__hmul2")):
        m = re.search(re.escape(op) + r"\(vec<__half, 2> a, vec<__half, 2> b\) \{\s*return[^;]*"
                      + re.escape(intrinsic) + r"\(", p)
        assert m, (op, intrinsic)
    assert re.search(r"operator-\(vec<__half, 2> a\) \{\s*return[^;]*__hneg2\(", p)
    m = re.search(r"namespace metal \{.*?vec<__half, 2> fma\(vec<__half, 2> a, vec<__half, 2> b,"
                  r"\s*vec<__half, 2> c\) \{\s*return[^;]*__hfma2\(", p, re.S)
    assert m, "metal::fma(half2, half2, half2) -> __hfma2"
    # the generic component-wise templates are still there for other types
    assert re.search(r"template <typename T, int N>\s*\\\s*__device__ __forceinline__ vec<T, N> "
                     r"operator OP\(vec<T, N> a, vec<T, N> b\)", p)
    assert "MFC_MATH3(fma, ::fmaf(x, y, z))" in p


def test_wrap_header_places_header_inside_cu_namespace():
    hdr = "template <typename T>\nMETAL_FUNC T twice(T x) { return x + x; }\n"
    out = cc.wrap_header(hdr)
    assert out.startswith(cc.prelude())
    rest = out[len(cc.prelude()):]
    open_at = rest.index("namespace mlx::core::cu {")
    assert rest.index(hdr) > open_at
    assert rest.rstrip().endswith("} // namespace mlx::core::cu")
    # Empty header still yields a well-formed namespace block.
    assert cc.wrap_header("").count("namespace mlx::core::cu {") == cc.prelude().count("namespace mlx::core::cu {") + 1


def test_wrap_header_rejects_includes_and_drops_pragma_once():
    with pytest.raises(ValueError, match="#include"):
        cc.wrap_header('#include "mlx_foundry/utils.metal"\nint x;\n')
    with pytest.raises(ValueError):
        cc.wrap_header("  #  include <metal_stdlib>\n")
    out = cc.wrap_header("#pragma once\nstruct P { uint n; };\n")
    assert "struct P { uint n; };" in out
    assert "#pragma once" not in out[len(cc.prelude()):]
    with pytest.raises(TypeError):
        cc.wrap_header(None)


def test_attribute_preamble_only_for_mentioned_attributes():
    assert cc.attribute_preamble("out[0] = in[0];") == ""
    pre = cc.attribute_preamble("uint i = thread_position_in_grid.x; out[i] = in[i];")
    assert pre.count(";") == 1
    assert re.match(r"\s*const uint3 thread_position_in_grid = .*attr_thread_position_in_grid\(\);\n$", pre)

    body = "uint l = thread_index_in_simdgroup; uint g = simdgroup_index_in_threadgroup;"
    pre = cc.attribute_preamble(body)
    assert "const uint thread_index_in_simdgroup = " in pre
    assert "const uint simdgroup_index_in_threadgroup = " in pre
    assert "thread_position_in_grid" not in pre
    assert pre.count("const ") == 2


def test_attribute_types_match_metal():
    expected_uint3 = {
        "thread_position_in_grid", "thread_position_in_threadgroup", "threadgroup_position_in_grid",
        "threads_per_threadgroup", "threadgroups_per_grid", "threads_per_grid",
    }
    expected_uint = {
        "thread_index_in_threadgroup", "thread_index_in_simdgroup", "simdgroup_index_in_threadgroup",
        "simdgroups_per_threadgroup", "threads_per_simdgroup",
    }
    table = dict(cc.METAL_ATTRIBUTES)
    for name in expected_uint3:
        assert table[name] == "uint3"
        assert f"const uint3 {name} = " in cc.attribute_preamble(f"x = {name};")
    for name in expected_uint:
        assert table[name] == "uint"
        assert f"const uint {name} = " in cc.attribute_preamble(f"x = {name};")


def test_attribute_detection_is_plain_substring_like_mlx():
    # Comments count, as in MLX's own detection: generated bodies strip comments.
    pre = cc.attribute_preamble("// uses threads_per_threadgroup\nout[0] = 1;")
    assert "const uint3 threads_per_threadgroup" in pre
    assert [n for n, _ in cc.mentioned_attributes("threads_per_grid threadgroups_per_grid")] == [
        "threadgroups_per_grid", "threads_per_grid",
    ]


def test_every_attribute_helper_exists_in_prelude():
    p = cc.prelude()
    for name, _ in cc.METAL_ATTRIBUTES:
        decl = cc.attribute_preamble(name)
        helper = re.search(r"metal_compat::(\w+)\(\)", decl)
        if helper:
            assert re.search(rf"\b{helper.group(1)}\(\)\s*\{{", p), helper.group(1)
        else:
            assert decl.strip().endswith("32u;")


def test_shared_declaration():
    assert cc.shared_declaration("float", "partial", 32) == "__shared__ alignas(16) float partial[32];"
    assert cc.shared_declaration("uint32_t", "words", 1, align=4) == "__shared__ alignas(4) uint32_t words[1];"
    assert cc.shared_declaration("vec<half,  4>", "hv", 8) == "__shared__ alignas(16) vec<half, 4> hv[8];"
    for bad in [("float", "9x", 4), ("float", "a b", 4), ("float; int", "x", 4), ("float", "x", 0),
                ("float", "x", -1), ("float", "x", True), ("float", "x", 2.0), ("", "x", 4)]:
        with pytest.raises(ValueError):
            cc.shared_declaration(*bad)
    with pytest.raises(ValueError):
        cc.shared_declaration("float", "x", 4, align=12)


def test_check_body_rejects_threadgroup_arrays():
    with pytest.raises(ValueError, match="shared_declaration"):
        cc.check_body("threadgroup float partial[32];\nout[0] = 0;")
    with pytest.raises(ValueError):
        cc.cuda_body("  threadgroup vec<half, 4> tile [64];")
    cc.check_body("threadgroup float* p = partial; threadgroup_barrier(mem_flags::mem_threadgroup);")
    body = "float v = partial[thread_index_in_threadgroup];"
    out = cc.cuda_body(body, [("float", "partial", 32)])
    assert out.index("thread_index_in_threadgroup =") < out.index("__shared__") < out.index(body)


def test_sample_body_is_clean_for_mlx():
    """The sample's body has no comments (MLX substring detection) and mentions
    only attributes it uses."""
    _, shared, body = load_sample()
    assert "//" not in body and "/*" not in body
    assert shared == [("float", "partial", 32)]
    assert {n for n, _ in cc.mentioned_attributes(body)} == {
        "thread_position_in_threadgroup", "threadgroup_position_in_grid", "thread_index_in_simdgroup",
        "simdgroup_index_in_threadgroup", "threads_per_grid",
    }


# ---------------------------------------------------------------------------
# Cross-check with MLX's Metal source generation (runs on Linux, CPU MLX)
# ---------------------------------------------------------------------------


def _metal_source(capfd, header, body, n_in=1):
    mx = pytest.importorskip("mlx.core", reason="MLX is needed to generate Metal source")
    if not hasattr(mx.fast, "metal_kernel") or not hasattr(mx, "export_function"):
        pytest.skip("this MLX has no mx.fast.metal_kernel / mx.export_function")
    names = [f"in{i}" for i in range(n_in)]
    kernel = mx.fast.metal_kernel(
        name="compat_probe", input_names=names, output_names=["out"], source=body, header=header,
    )

    def f(*xs):
        return kernel(
            inputs=list(xs), grid=(32, 1, 1), threadgroup=(32, 1, 1),
            output_shapes=[(32,)], output_dtypes=[mx.float32],
            template=[("T", mx.float16), ("BLOCK", 32)], verbose=True,
        )[0]

    import tempfile

    capfd.readouterr()
    with tempfile.TemporaryDirectory() as d:
        try:
            mx.export_function(os.path.join(d, "probe.mlxfn"), f, *[mx.zeros((32,)) for _ in names])
        except Exception:
            pass  # the source is printed while tracing, before any failure
    out = capfd.readouterr().out
    if "[[kernel]]" not in out:
        pytest.skip("this MLX does not print the Metal source while exporting")
    return out


@pytest.mark.parametrize(
    "body",
    [
        "out[0] = in0[0];",
        "uint i = thread_position_in_grid.x; out[i] = in0[i];",
        "uint l = thread_index_in_simdgroup; uint g = simdgroup_index_in_threadgroup; "
        "uint3 tg = threadgroup_position_in_grid; uint3 n = threads_per_threadgroup; out[l + g] = tg.x + n.x;",
        " ".join(f"(void){n};" for n, _ in cc.METAL_ATTRIBUTES) + " out[0] = 0;",
    ],
)
def test_attribute_table_matches_mlx_metal(capfd, body):
    src = _metal_source(capfd, "", body)
    sig = src[src.index("[[kernel]]"): src.index(") {", src.index("[[kernel]]"))]
    metal_attrs = re.findall(r"\b(uint3|uint)\s+(\w+)\s*\[\[(\w+)\]\]", sig)
    assert all(a == b for _, a, b in metal_attrs)
    assert [(n, t) for t, n, _ in metal_attrs] == cc.mentioned_attributes(body)


def test_sample_through_mlx_metal_path(capfd):
    """The same sample text goes through MLX's Metal source generation: header
    verbatim, threadgroup array declared in the body, attributes as parameters."""
    header, shared, body = load_sample()
    decls = "".join(f"threadgroup {t} {n}[{c}];\n" for t, n, c in shared)
    src = _metal_source(capfd, header, decls + body, n_in=5)
    assert "METAL_FUNC float4 load_float4(const device T* p, uint i)" in src
    assert "threadgroup float partial[32];" in src
    for name, t in cc.mentioned_attributes(body):
        assert f"{t} {name} [[{name}]]" in src


# ---------------------------------------------------------------------------
# Header extraction helper (see module docstring)
# ---------------------------------------------------------------------------


def extract_mlx_cuda_headers(libmlx: str, out_dir: str) -> list[str]:
    """Write MLX's embedded CUDA JIT headers (mlx::core::jit_source_*) from
    libmlx.so to out_dir/mlx/backend/cuda/device/. Needs binutils."""
    data = Path(libmlx).read_bytes()
    sections = []
    for line in subprocess.check_output(["readelf", "-SW", libmlx], text=True).splitlines():
        m = re.match(r"\s*\[\s*\d+\]\s+(\S+)\s+\S+\s+([0-9a-f]+)\s+([0-9a-f]+)\s+([0-9a-f]+)", line)
        if m:
            sections.append((int(m.group(2), 16), int(m.group(3), 16), int(m.group(4), 16)))
    dest = Path(out_dir) / "mlx" / "backend" / "cuda" / "device"
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for line in subprocess.check_output(["nm", "-S", libmlx], text=True).splitlines():
        m = re.match(r"([0-9a-f]+) ([0-9a-f]+) [rR] _ZN3mlx4coreL\d+jit_source_(\w+)E$", line)
        if not m:
            continue
        addr, size, name = int(m.group(1), 16), int(m.group(2), 16), m.group(3)
        fname = "config.h" if name == "config" else name + ".cuh"
        if fname in written:
            continue
        for va, off, sz in sections:
            if va <= addr < va + sz:
                blob = data[off + addr - va: off + addr - va + size].rstrip(b"\0")
                (dest / fname).write_bytes(blob)
                written.append(fname)
                break
    return written


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--extract-headers":
        for f in extract_mlx_cuda_headers(sys.argv[2], sys.argv[3]):
            print(f)
    else:
        print(__doc__)
