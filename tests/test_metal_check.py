"""The Metal front-end check (mlx_foundry.metal_check).

Every broken kernel below goes through the real path: MLX builds the full Metal
source (under mx.export_function, verbose) without complaint — so nothing but the
check can catch the bug — and the check must report it at the right line of the
generated source. The same kernel with the bug fixed must pass, so each test can
fail. A sample of real kernels from mlx-lm must pass (the check does not cry wolf).
"""

from __future__ import annotations

import importlib
import io
import re
import sys

import pytest

mx = pytest.importorskip("mlx.core")

from mlx_foundry import metal_check  # noqa: E402
from mlx_foundry.metal_check import (  # noqa: E402
    Diagnostic,
    MetalCheckUnavailable,
    check_source,
    format_diagnostics,
    libclang_available,
    metal_source_from_export,
    run_check,
    verbose_metal_kernels,
)

needs_libclang = pytest.mark.skipif(
    not libclang_available(),
    reason="libclang is not installed: pip install 'mlx-kernel-foundry[check]'",
)


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def generate(body: str, *, header: str = "", inputs=None, template=None, name="k", n_out=1):
    """The full Metal source MLX would compile for one kernel (no Metal needed)."""
    inputs = inputs if inputs is not None else {"inp": mx.zeros((64,), dtype=mx.float32)}
    kernel = mx.fast.metal_kernel(
        name=name,
        input_names=list(inputs),
        output_names=[f"out{i}" if i else "out" for i in range(n_out)],
        source=body,
        header=header,
    )

    def fn(*arrays):
        return kernel(
            inputs=list(arrays),
            template=template or [("T", mx.float32)],
            grid=(64, 1, 1),
            threadgroup=(32, 1, 1),
            output_shapes=[(64,)] * n_out,
            output_dtypes=[mx.float32] * n_out,
            verbose=True,
        )

    sources = metal_source_from_export(fn, *inputs.values())
    assert len(sources) == 1, sources
    got_name, source = sources[0]
    assert got_name == name
    assert "[[kernel]]" in source  # the full source, signature and instantiation included
    return source


def line_of(source: str, marker: str) -> int:
    hits = [i for i, line in enumerate(source.splitlines(), 1) if marker in line]
    assert len(hits) == 1, f"marker {marker!r} found on lines {hits}"
    return hits[0]


def errors(diags):
    return [d for d in diags if d.severity == "error"]


# --------------------------------------------------------------------------------------
# The broken-kernel suite: (id, header, body with the bug, the fix, marker, message regex)
# The marker is a piece of the faulty line; the error must be reported on that line.
# --------------------------------------------------------------------------------------

_PRELUDE = "uint i = thread_position_in_grid.x;\n"

BROKEN = [
    pytest.param(
        "", _PRELUDE + "thread const float* p = inp;\nout[i] = p[i];\n",
        ("thread const float* p = inp;", "const device float* p = inp;"),
        "thread const float* p", r"cannot initialize .*'const float \*' .*'device float const \*'",
        id="address-space-device-to-thread",
    ),
    pytest.param(
        # `small` has fewer than 8 elements, so MLX puts it in the constant address space
        "", _PRELUDE + "device const float* s = small;\nout[i] = inp[i] * s[0];\n",
        ("device const float* s", "constant const float* s"),
        "device const float* s", r"cannot initialize .*'device float const \*'.*'constant float const \*'",
        id="address-space-constant-to-device",
    ),
    pytest.param(
        # the same mistake inside a helper hard-coded on `device` (DESIGN: template helpers
        # on their pointer types): reported at the call in the kernel body
        "METAL_FUNC float first(const device float* p) { return p[0]; }\n"
        "template <typename P> METAL_FUNC float first_t(P p) { return p[0]; }\n",
        _PRELUDE + "out[i] = inp[i] * first(small);\n",
        ("first(small)", "first_t(small)"),
        "first(small)", r"no matching function for call to 'first'",
        id="address-space-constant-to-device-helper",
    ),
    pytest.param(
        "", _PRELUDE + "float acc = inp[i];\nout[i] = acc * scal;\n",
        ("acc * scal;", "acc * 2.0f;"),
        "acc * scal", r"use of undeclared identifier 'scal'",
        id="undeclared-identifier",
    ),
    pytest.param(
        "", _PRELUDE + "float v = inp[i];\nv += __shfl_xor_sync(0xffffffff, v, 1);\nout[i] = v;\n",
        ("__shfl_xor_sync(0xffffffff, v, 1)", "simd_shuffle_xor(v, 1)"),
        "v += ", r"use of undeclared identifier '__shfl_xor_sync'",
        id="cuda-intrinsic-shfl",
    ),
    pytest.param(
        "", _PRELUDE + "__half h = static_cast<__half>(inp[i]);\nout[i] = float(h);\n",
        ("__half h = static_cast<__half>", "half h = static_cast<half>"),
        "h = static_cast", r"unknown type name '__half'|use of undeclared identifier '__half'",
        id="cuda-type-half",
    ),
    pytest.param(
        "", _PRELUDE + "uint j = blockIdx.x * blockDim.x + threadIdx.x;\nout[j] = inp[i];\n",
        ("blockIdx.x * blockDim.x + threadIdx.x", "thread_position_in_grid.x"),
        "uint j = ", r"use of undeclared identifier '(blockIdx|blockDim|threadIdx)'",
        id="cuda-builtin-threadIdx",
    ),
    pytest.param(
        "", _PRELUDE + "threadgroup float buf[32];\nbuf[i % 32] = inp[i];\n__syncthreads();\nout[i] = buf[(i + 1) % 32];\n",
        ("__syncthreads();", "threadgroup_barrier(mem_flags::mem_threadgroup);"),
        "__sync", r"use of undeclared identifier '__syncthreads'",
        id="cuda-intrinsic-syncthreads",
    ),
    pytest.param(
        "", _PRELUDE + "float x = inp[i];\nout[i] = metal::fma(x, x);\n",
        ("metal::fma(x, x)", "metal::fma(x, x, 1.0f)"),
        "metal::fma", r"no matching function for call to 'fma'",
        id="wrong-arity-fma",
    ),
    pytest.param(
        "", _PRELUDE + "float x = inp[i];\nout[i] = simd_shuffle_xor(x);\n",
        ("simd_shuffle_xor(x)", "simd_shuffle_xor(x, 16)"),
        "simd_shuffle_xor", r"no matching function for call to 'simd_shuffle_xor'",
        id="wrong-arity-simd-shuffle-xor",
    ),
    pytest.param(
        "", _PRELUDE + "float x = inp[i];\nout[i] = metal::clamp(x, 0.0f);\n",
        ("metal::clamp(x, 0.0f)", "metal::clamp(x, 0.0f, 1.0f)"),
        "metal::clamp", r"no matching function for call to 'clamp'",
        id="wrong-arity-clamp",
    ),
    pytest.param(
        "", _PRELUDE + "threadgroup_barrier();\nout[i] = inp[i];\n",
        ("threadgroup_barrier();", "threadgroup_barrier(mem_flags::mem_none);"),
        "threadgroup_barrier", r"no matching function for call to 'threadgroup_barrier'",
        id="wrong-arity-barrier",
    ),
    pytest.param(
        # a stage in the header (a template helper, as the stages are) misses a ';'
        "template <typename T, typename P>\n"
        "METAL_FUNC float scale_stage(P x, uint i) {\n"
        "  float acc = static_cast<float>(x[i]) * 2.0f\n"
        "  return acc;\n"
        "}\n",
        _PRELUDE + "out[i] = scale_stage<T>(inp, i);\n",
        ("* 2.0f\n", "* 2.0f;\n"),
        "float acc = static_cast", r"expected ';'",
        id="missing-semicolon-in-stage",
    ),
    pytest.param(
        "", _PRELUDE + "float4 v = float4(inp[i], 1.0f, 2.0f);\nout[i] = v.x + v.w;\n",
        ("float4(inp[i], 1.0f, 2.0f)", "float4(inp[i], 1.0f, 2.0f, 3.0f)"),
        "float4 v", r"vector constructor: the arguments do not have exactly as many components",
        id="vector-constructor-components",
    ),
    pytest.param(
        "", _PRELUDE + "uint bits = as_type<uint>(half(inp[i]));\nout[i] = float(bits);\n",
        ("as_type<uint>(half(inp[i]))", "as_type<uint>(inp[i])"),
        "uint bits", r"as_type<T>\(x\): T and the type of x must have the same size",
        id="as-type-size",
    ),
    pytest.param(
        "", _PRELUDE + "double d = inp[i];\nout[i] = float(d);\n",
        ("double d", "float d"),
        "d = inp", r"double",
        id="no-double",
    ),
    pytest.param(
        "template <typename T> [[clang_only]] METAL_FUNC T twice(T x) { return x + x; }\n",
        _PRELUDE + "out[i] = twice(inp[i]);\n",
        ("[[clang_only]] ", ""),
        "[[clang_only]]", r"unknown attribute 'clang_only'",
        id="unknown-attribute",
    ),
]


@needs_libclang
@pytest.mark.parametrize("header, body, fix, marker, message", BROKEN)
def test_broken_kernel_is_caught_and_fixed_kernel_passes(header, body, fix, marker, message):
    inputs = {
        "inp": mx.zeros((64,), dtype=mx.float32),
        "small": mx.zeros((4,), dtype=mx.float32),  # < 8 elements: `constant` in Metal
    }
    # MLX accepts the broken kernel: it builds the full source without complaint
    broken_src = generate(body, header=header, inputs=inputs)
    bad_line = line_of(broken_src, marker)
    diags = check_source(broken_src, kernel_name="k")
    errs = errors(diags)
    assert errs, f"not caught:\n{broken_src}"
    hits = [d for d in errs if re.search(message, d.message)]
    assert hits, format_diagnostics(diags)
    assert any(d.line == bad_line for d in hits), format_diagnostics(diags)
    hit = next(d for d in hits if d.line == bad_line)
    assert hit.kernel == "k" and hit.source_line == broken_src.splitlines()[bad_line - 1]
    # and the same kernel with the bug fixed passes
    old, new = fix
    assert old in header + body
    fixed_src = generate(body.replace(old, new), header=header.replace(old, new), inputs=inputs)
    fixed = check_source(fixed_src, kernel_name="k")
    assert not errors(fixed), format_diagnostics(fixed)


# --------------------------------------------------------------------------------------
# A correct kernel using the whole dialect passes
# --------------------------------------------------------------------------------------

DIALECT_HEADER = """
struct Params {
  uint n;
  float eps;
  uint2 pad;
};

constant Params kDefaults = {64u, 1e-6f, {0u, 0u}};
constant float kTable[4] = {1.0f, 0.5f, 0.25f, 0.125f};

template <typename P>
METAL_FUNC float load_f(P ptr, uint i) {
  return static_cast<float>(ptr[i]);
}

METAL_FUNC float eps_of(constant const Params& p) {
  return p.eps;
}

template <int TG>
METAL_FUNC float block_sum(float v, threadgroup float* buf, uint lane, uint sg) {
  v = simd_sum(v);
  if (TG > 32) {
    if (lane == 0) {
      buf[sg] = v;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    v = simd_sum(lane < TG / 32 ? buf[lane] : 0.0f);
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  return v;
}

template <typename T, int N>
struct Acc {
  float v[N];
  METAL_FUNC void add(uint k, T x) thread { v[k % N] += static_cast<float>(x); }
  METAL_FUNC float total() const thread {
    float s = 0.0f;
    for (int k = 0; k < N; ++k) s += v[k];
    return s;
  }
};
"""

DIALECT_BODY = """
uint i = thread_position_in_grid.x;
uint lane = thread_index_in_simdgroup;
uint sg = simdgroup_index_in_threadgroup;
threadgroup float buf[32];
threadgroup float4 tile[8];
constant const Params* prm = reinterpret_cast<constant const Params*>(params);

float x = load_f(inp, i) * load_f(weight, i % 4) * kTable[i % 4];
T t = static_cast<T>(x);
float4 v = float4(x, 1.0f, 2.0h, 3);
float2 xy = v.xy + float2(1.0f);
half4 h = half4(v);
float4 back = float4(h) + float4(xy, xy);
vec<float, 4> w = vec<float, 4>(back.x, back.yz, 0.0f);
int4 iv = int4(w);
uint bits = as_type<uint>(x);
bfloat16_t b = static_cast<bfloat16_t>(x);
float s = block_sum<64>(dot(v, w) + float(iv.x) + float(b) + float(t), buf, lane, sg);
s += simd_shuffle_xor(s, 16) + simd_broadcast(s, 0) + simd_prefix_exclusive_sum(s);
s = metal::max(s, simd_max(s)) + metal::fast::exp(-s) + metal::precise::rsqrt(s + eps_of(*prm));
s += metal::clamp(s, 0.0f, Limits<float>::max) + metal::numeric_limits<half>::max();
s += select(0.0f, 1.0f, metal::isnan(s)) + float(popcount(bits)) + kDefaults.eps;
if (lane == 0) {
  tile[sg % 8] = float4(s);
}
threadgroup_barrier(mem_flags::mem_threadgroup | mem_flags::mem_device);
Acc<T, 4> acc = {};
acc.add(i, t);
if (i < prm->n) {
  out[i] = s + tile[0].w + acc.total();
  atomic_fetch_add_explicit(counter, 1u, memory_order_relaxed);
}
"""


@needs_libclang
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_dialect_kernel_passes(dtype):
    inputs = {
        "inp": mx.zeros((64,), dtype=dtype),
        "weight": mx.zeros((4,), dtype=dtype),  # constant address space
        "params": mx.zeros((4,), dtype=mx.uint32),  # a packed Params in constant
    }
    kernel = mx.fast.metal_kernel(
        name="dialect",
        input_names=list(inputs),
        output_names=["out", "counter_buf"],
        source=DIALECT_BODY.replace(
            "atomic_fetch_add_explicit(counter,",
            "atomic_fetch_add_explicit((device atomic_uint*)counter_buf,",
        ),
        header=DIALECT_HEADER,
    )

    def fn(*arrays):
        return kernel(
            inputs=list(arrays),
            template=[("T", dtype)],
            grid=(64, 1, 1),
            threadgroup=(64, 1, 1),
            output_shapes=[(64,), (1,)],
            output_dtypes=[mx.float32, mx.uint32],
            verbose=True,
        )

    [(name, source)] = metal_source_from_export(fn, *inputs.values())
    assert "const constant uint32_t* params" in source
    assert "const constant" in source and "threadgroup float buf[32]" in source
    diags = check_source(source, kernel_name=name)
    assert not errors(diags), format_diagnostics(diags)

    # the same source with an address-space mistake in it is caught, so the test is live
    broken = source.replace(
        "constant const Params* prm = reinterpret_cast<constant const Params*>(params);",
        "const device Params* prm = reinterpret_cast<const device Params*>(params);",
    )
    assert broken != source
    assert errors(check_source(broken, kernel_name=name))


@needs_libclang
def test_threadgroup_variable_outside_kernel_is_an_error():
    header = "METAL_FUNC float f(uint i) { threadgroup float b[4]; b[i % 4] = 1.0f; return b[0]; }\n"
    src = generate("uint i = thread_position_in_grid.x;\nout[i] = f(i);\n", header=header)
    errs = errors(check_source(src, kernel_name="k"))
    assert any("outside a kernel function" in d.message for d in errs), errs


@needs_libclang
def test_columns_map_back_through_rewrites():
    body = "uint i = thread_position_in_grid.x;\nfloat4 v = float4(1.0h, 2, 3, 4); float q = v.x + undefined_name;\nout[i] = q;\n"
    src = generate(body)
    line = line_of(src, "undefined_name")
    [d] = errors(check_source(src, kernel_name="k"))
    assert d.line == line
    assert d.column == src.splitlines()[line - 1].index("undefined_name") + 1


@needs_libclang
def test_prelude_alone_is_clean():
    # the stub of metal_stdlib and of MLX's prefix parse without any diagnostic
    assert check_source("", kernel_name="empty") == []


@needs_libclang
def test_run_check_output_and_exit_code():
    good = generate("uint i = thread_position_in_grid.x;\nout[i] = inp[i];\n")
    bad = generate("uint i = thread_position_in_grid.x;\nout[i] = inp[i] + __ldg(inp);\n")
    buf = io.StringIO()
    assert run_check([("good_kernel", good)], file=buf) == 0
    assert "[ok] good_kernel" in buf.getvalue()
    buf = io.StringIO()
    assert run_check([("good_kernel", good), ("bad_kernel", bad)], file=buf) == 1
    text = buf.getvalue()
    line = line_of(bad, "__ldg")
    assert f"bad_kernel:{line}:" in text
    assert "use of undeclared identifier '__ldg'" in text
    assert "out[i] = inp[i] + __ldg(inp);" in text  # the offending line is shown
    assert "1 passed, 1 failed" in text


def test_missing_libclang_gives_install_hint(monkeypatch):
    monkeypatch.setattr(metal_check, "_INDEX", None)
    monkeypatch.setitem(sys.modules, "clang.cindex", None)
    monkeypatch.setitem(sys.modules, "clang", None)
    with pytest.raises(MetalCheckUnavailable, match=r"mlx-kernel-foundry\[check\]"):
        check_source("", kernel_name="k")
    assert run_check([("k", "")], file=io.StringIO()) == 2


def test_parse_verbose_output():
    text = (
        "noise\nGenerated source code for `a`:\n```\nline1\nline2\n```\n"
        "Generated source code for `a`:\n```\nline1\nline2\n```\n"
        "Generated source code for `b`:\n```\nx\n```\n"
    )
    assert metal_check.parse_verbose_output(text) == [("a", "line1\nline2\n"), ("b", "x\n")]


def test_diagnostic_str():
    d = Diagnostic("k", 3, 5, "error", "boom", "  int x = y;")
    assert str(d).splitlines()[0] == "k:3:5: error: boom"
    assert "int x = y;" in str(d)


# --------------------------------------------------------------------------------------
# Real Metal from outside the project: the kernels of mlx-lm pass
# --------------------------------------------------------------------------------------


def _lm_cases():
    """(id, module, call) for the Metal kernels in mlx-lm: each call runs the kernel
    the way mlx-lm does (its public wrapper where there is one)."""
    f16, bf16, f32 = mx.float16, mx.bfloat16, mx.float32
    z = mx.zeros

    def gated_delta(m, shape=(1, 2, 1, 64, 2, 32), g=None, mask=False, fn="gated_delta_kernel"):
        B, T, Hk, Dk, Hv, Dv = shape
        q = z((B, T, Hk, Dk), dtype=f16)
        k = z((B, T, Hk, Dk), dtype=f16)
        v = z((B, T, Hv, Dv), dtype=f16)
        gate = z(g or (B, T, Hv), dtype=f32)
        beta = z((B, T, Hv), dtype=f16)
        state = z((B, Hv, Dv, Dk), dtype=f32)
        return getattr(m, fn)(q, k, v, gate, beta, state, z((B, T), dtype=mx.bool_) if mask else None)

    def nn():
        import mlx.nn

        return mlx.nn

    return [
        ("qk_norm", "mlx_lm.kernels.qk_norm",
         lambda m: m.qk_norm(z((1, 384), dtype=f16), n_heads=2, n_kv_heads=1, head_dim=64,
                             eps=1e-6, query_scale=0.125)),
        ("qk_norm_rope", "mlx_lm.kernels.qk_norm_rope",
         lambda m: m.qk_norm_rope(z((1, 384), dtype=bf16), n_heads=2, n_kv_heads=1, head_dim=64,
                                  eps=1e-6, query_scale=0.125, rope_base=10000.0, offset=3)),
        ("expert_routing", "mlx_lm.kernels.expert_routing",
         lambda m: m.expert_routing(z((2, 8)), z((8,)), top_k=2, multiplier=1.0, score_eps=1e-6,
                                    route_scale=1.0)),
        ("post_expert_norm_combine", "mlx_lm.kernels.post_expert_norm_combine",
         lambda m: m.post_expert_norm_combine(z((1, 2, 64), dtype=bf16), z((1, 2)),
                                              norm_weight=z((64,), dtype=bf16), eps=1e-6)),
        ("rms_norm_sigmoid_gate", "mlx_lm.kernels.rms_norm_sigmoid_gate",
         lambda m: m.rms_norm_sigmoid_gate(z((1, 2, 1, 64), dtype=f16), z((1, 1, 128), dtype=f16),
                                           eps=1e-6)),
        ("norm_add_norm", "mlx_lm.kernels.norm_add_norm",
         lambda m: m.norm_add_norm(z((1, 256), dtype=bf16), z((1, 256)), alpha=z((256,)),
                                   beta=z((256,)), post_weight=z((256,), dtype=bf16), post_eps=1e-6,
                                   next_norm=nn().RMSNorm(256))),
        ("norm_add", "mlx_lm.kernels.norm_add_norm",
         lambda m: m.norm_add_norm(z((1, 256), dtype=f16), z((1, 256)), alpha=z((256,)),
                                   beta=z((256,)), post_weight=None, post_eps=1e-6, next_norm=None)),
        ("pre_norm", "mlx_lm.kernels.norm_add_norm",
         lambda m: m.pre_norm(z((1, 256)), nn().RMSNorm(256), dtype=f16)),
        ("gated_delta", "mlx_lm.models.gated_delta", lambda m: gated_delta(m)),
        ("gated_delta_mask", "mlx_lm.models.gated_delta", lambda m: gated_delta(m, mask=True)),
        ("gated_delta_vec", "mlx_lm.models.gated_delta", lambda m: gated_delta(m, g=(1, 2, 2, 64))),
        ("gated_delta_packed", "mlx_lm.models.gated_delta",
         lambda m: gated_delta(m, shape=(1, 2, 1, 128, 2, 16))),
        ("gated_delta_xtree", "mlx_lm.models.gated_delta",
         lambda m: gated_delta(m, fn="gated_delta_kernel_xtree")),
        ("ssm", "mlx_lm.models.ssm",
         lambda m: m.ssm_update_kernel(z((1, 1, 2, 32), dtype=f16), z((2,)), z((1, 1, 32), dtype=f16),
                                       z((1, 1, 32), dtype=f16), z((2,)), z((1, 1, 2), dtype=f16),
                                       z((2,)), z((1, 2, 32, 32)), (0.001, 100.0))),
        ("wkv7", "mlx_lm.models.rwkv7",
         lambda m: m.wkv7_kernel(*[z((1, 2, 1, 32), dtype=bf16)] * 6, z((1, 1, 32, 32), dtype=bf16))),
        ("bitlinear", "mlx_lm.models.bitlinear_layers",
         lambda m: m.BitLinear(64, 16).execute_matmul_kernel(z((1, 64)), z((4, 64), dtype=mx.uint8))),
        ("attnres_mix", "mlx_lm.models.kimi_k3",
         lambda m: m._attn_res_kernel(
             inputs=[z((2, 1, 64), dtype=bf16), z((2, 1)), z((1, 64), dtype=bf16), z((3,)), z((1,)), 1],
             template=[("InT", bf16), ("K", 2), ("D", 64), ("THREADS", 512)],
             grid=(512, 1, 1), threadgroup=(512, 1, 1), output_shapes=[(1, 64)], output_dtypes=[bf16])),
        ("sinkhorn", "mlx_lm.models.deepseek_v41",
         lambda m: m._sinkhorn_kernel(
             inputs=[z((2, 4, 4)), mx.array([1e-6])], template=[("HC", 4), ("ITERS", 3)],
             grid=(2, 1, 1), threadgroup=(2, 1, 1), output_shapes=[(2, 4, 4)], output_dtypes=[f32])),
        ("kl_forward", "mlx_lm.tuner.losses",
         lambda m: m._kl_forward_kernel(
             inputs=[z((2, 100)), z((2, 100))], output_shapes=[(2,)], output_dtypes=[f32],
             template=[("T", f32), ("V", 100)], grid=(1024, 2, 1), threadgroup=(1024, 1, 1))),
        ("kl_backward", "mlx_lm.tuner.losses",
         lambda m: m._kl_backward_kernel(
             inputs=[z((2, 100), dtype=bf16), z((2, 100), dtype=bf16), z((2,), dtype=bf16)],
             output_shapes=[(2, 100)], output_dtypes=[bf16], template=[("T", bf16), ("V", 100)],
             grid=(1024, 2, 1), threadgroup=(1024, 1, 1))),
        ("js_forward", "mlx_lm.tuner.losses",
         lambda m: m._js_forward_kernel(
             inputs=[z((2, 100)), z((2, 100))], output_shapes=[(2,), (2,)], output_dtypes=[f32, f32],
             template=[("T", f32), ("V", 100)], grid=(1024, 2, 1), threadgroup=(1024, 1, 1))),
        ("js_backward", "mlx_lm.tuner.losses",
         lambda m: m._js_backward_kernel(
             inputs=[z((2, 100)), z((2, 100)), z((2,)), z((2,))], output_shapes=[(2, 100)],
             output_dtypes=[f32], template=[("T", f32), ("V", 100)], grid=(1024, 2, 1),
             threadgroup=(1024, 1, 1))),
    ]


@pytest.fixture(scope="module")
def mlx_lm_sources():
    """Generated Metal source of every sampled mlx-lm kernel, {case id: [(name, source)]}.

    mlx-lm builds its kernels only where Metal is available: its modules are reloaded
    inside verbose_metal_kernels() (which also forces verbose=True), then reloaded
    again afterwards to leave them as they were."""
    pytest.importorskip("mlx_lm")
    import mlx_lm.utils

    cases = _lm_cases()
    modules = sorted({mod for _, mod, _ in cases})
    saved = mlx_lm.utils.can_run_metal
    out: dict[str, object] = {}
    try:
        with verbose_metal_kernels():
            mlx_lm.utils.can_run_metal = lambda: True
            loaded = {name: importlib.reload(importlib.import_module(name)) for name in modules}
            for cid, mod, call in cases:
                try:
                    out[cid] = metal_source_from_export(lambda: call(loaded[mod]))
                except (AttributeError, TypeError) as e:  # an mlx-lm version without it
                    out[cid] = e
    finally:
        mlx_lm.utils.can_run_metal = saved
        for name in modules:
            importlib.reload(sys.modules[name])
    return out


@needs_libclang
@pytest.mark.parametrize("case", [c[0] for c in _lm_cases()])
def test_mlx_lm_kernels_pass(case, mlx_lm_sources):
    got = mlx_lm_sources[case]
    if isinstance(got, Exception):
        pytest.skip(f"this mlx-lm version has no such kernel call: {got}")
    assert got, "no kernel source was captured"
    for name, source in got:
        diags = check_source(source, kernel_name=name)
        assert not errors(diags), format_diagnostics(diags)


@needs_libclang
def test_mlx_lm_sample_is_large_enough(mlx_lm_sources):
    ok = [c for c, v in mlx_lm_sources.items() if not isinstance(v, Exception) and v]
    assert len(ok) >= 15, ok
