"""Assembly: golden sources, chain checks, names, the cache, the Metal capture."""

import threading

import mlx.core as mx
import pytest

import mlx_foundry as mf
from mlx_foundry import cache, kernel as kernel_mod
from mlx_foundry.backends import metal as metal_backend

import core_kernels as ck


def test_golden_standalone_body():
    k = ck.axpb_kernel()
    x = ck.seeded((10,), mx.float16)
    src = k.source(x, params=ck.AxpbParams(n=10, a=2.0, b=1.0), backend="metal")
    assert src.body == (
        "using T = half;\n"
        "const device AxpbParams* params = reinterpret_cast<const device AxpbParams*>(params_bytes);\n"
        "axpb_kernel<T>(x, y, params, thread_position_in_grid);"
    )
    assert src.input_names == ("x", "params_bytes") and src.output_names == ("y",)
    assert "struct AxpbParams {\n  uint n;\n  float a;\n  float b;\n};" in src.header
    # The struct comes before the template that uses it.
    assert src.header.index("struct AxpbParams") < src.header.index("axpb_kernel")
    assert src.name.startswith("axpb_") and len(src.name) == len("axpb_") + 16


def test_golden_compound_body():
    k = ck.center_scale_relu_kernel()
    x = ck.seeded((3, 100), mx.bfloat16)
    body = k.source(x, scale=0.5, backend="metal").body
    assert body.splitlines() == [
        "using T = bfloat16_t;",
        "constexpr int K = 100;",
        "constexpr int THREADS = 128;",
        "threadgroup float scratch[32];",
        "const float scale = scale_value[0];",
        "float mean;",
        "row_mean_stage<T, K, THREADS>(x, mean, threadgroup_position_in_grid, "
        "thread_position_in_threadgroup, thread_index_in_simdgroup, "
        "simdgroup_index_in_threadgroup, scratch);",
        "float acc;",
        "uint index;",
        "bool valid;",
        "center_stage<T, K, THREADS>(x, mean, acc, index, valid, threadgroup_position_in_grid, "
        "thread_position_in_threadgroup);",
        "scale_relu_stage(scale, acc);",
        "if (valid) { out[index] = static_cast<bfloat16_t>(acc); }",
    ]


def test_compound_reference_composes_stage_references():
    k = ck.center_scale_relu_kernel()
    x = ck.seeded((4, 37), mx.float32)
    expected = mx.maximum((x - x.mean(axis=-1, keepdims=True)) * 0.5, 0.0)
    assert mx.allclose(k(x, scale=0.5, backend="reference"), expected, atol=1e-6).item()


def _stage(name, consumes=None, produces=None, writes_output=False):
    return mf.Stage(name, function=f"{name}_fn", source_text="", consumes=consumes,
                    produces=produces, writes_output=writes_output)


OUT = [mf.Output("out", shape=lambda b: (1,), dtype=mx.float32)]
DISPATCH = lambda b: mf.per_element(1)  # noqa: E731


@pytest.mark.parametrize("prologues, main, epilogues, match", [
    ([], _stage("m", consumes={"inv_rms": "float"}), [], "consumes 'inv_rms', which no earlier"),
    ([_stage("p", produces={"s": "half"})], _stage("m", consumes={"s": "float"}), [],
     "consumes 's' as float but stage 'p' produces it as half"),
    ([_stage("p", produces={"acc": "float"})], _stage("m", produces={"acc": "float"}), [],
     "produced by both"),
    ([], _stage("m", produces={"acc": "float"}), [], "index value 'index' is produced by no stage"),
    ([], _stage("m", produces={"acc": "float", "index": "uint", "valid": "int"}), [],
     "must be bool"),
])
def test_chain_errors(prologues, main, epilogues, match):
    with pytest.raises(mf.ChainError, match=match):
        mf.CompoundKernel("k", prologues=prologues, main=main, epilogues=epilogues,
                          outputs=OUT, dispatch=DISPATCH)


def test_structural_errors():
    m = _stage("m", produces={"acc": "float", "index": "uint"})
    with pytest.raises(mf.ChainError, match="exactly one main"):
        mf.CompoundKernel("k", main=[m, m], outputs=OUT, dispatch=DISPATCH)
    with pytest.raises(mf.ChainError, match="unique"):
        mf.CompoundKernel("k", prologues=[m], main=m, outputs=OUT, dispatch=DISPATCH)
    with pytest.raises(mf.ChainError, match="manual_output needs"):
        mf.CompoundKernel("k", main=m, outputs=OUT, dispatch=DISPATCH, manual_output=True)
    w = _stage("w", writes_output=True)
    with pytest.raises(mf.ChainError, match="set manual_output"):
        mf.CompoundKernel("k", main=w, outputs=OUT, dispatch=DISPATCH)
    with pytest.raises(TypeError, match="as_stage"):
        mf.CompoundKernel("k", main=ck.axpb_kernel(), outputs=OUT, dispatch=DISPATCH)
    with pytest.raises(ValueError, match="kernel name"):
        mf.CompoundKernel("bad name", main=m, outputs=OUT, dispatch=DISPATCH)


def test_conflicting_argument_declarations():
    a = mf.Stage("a", function="f", source_text="", args=[mf.Tensor("x", mx.float16)],
                 produces={"acc": "float", "index": "uint"})
    b = mf.Stage("b", function="g", source_text="", args=[mf.Tensor("x", mx.float32)])
    with pytest.raises(ValueError, match="Two different declarations of argument 'x'"):
        mf.CompoundKernel("k", main=a, epilogues=[b], outputs=OUT, dispatch=DISPATCH)


def test_kernel_as_stage_skips_stage_skip_args():
    k = mf.Kernel("rms", source_text="", function="rms_kernel", stage_function="run_rms_core",
                  args=[mf.Tensor("input", stage_skip=True), mf.Tensor("gamma"),
                        mf.Output("output", shape=lambda b: b.input.shape, dtype="input")],
                  dispatch=DISPATCH, stage_produces={"acc": "float"})
    s = k.as_stage()
    assert s.function == "run_rms_core"
    assert [a.name for a in s.args] == ["gamma", "output"]
    with pytest.raises(ValueError, match="no stage_function"):
        ck.axpb_kernel().as_stage()


def test_policy_init_code_maps_args_and_struct_fields():
    @mf.struct
    class QParams:
        weights_per_block: mf.u32

    pol = mf.Policy("q8", header="policies/none.metal", struct_name="PolicyQ8",
                    params={"matrix": "matrix", "scales": "scale_bytes",
                            "weights_per_block": "params.weights_per_block"},
                    args=[mf.Tensor("matrix"), mf.Tensor("scale_bytes"),
                          mf.Params("params", QParams)])
    assert pol.init_code("pp") == [
        "PolicyQ8 pp;", "pp.matrix = matrix;", "pp.scales = scale_bytes;",
        "pp.weights_per_block = params->weights_per_block;"]
    with pytest.raises(ValueError, match="no argument 'nope'"):
        mf.Policy("bad", header="x", struct_name="P", params={"a": "nope"}, args=[])


def test_generated_bodies_always_reference_a_thread_attribute():
    k = mf.Kernel("noattr", source_text="", function="f", attributes=(),
                  args=[mf.Tensor("x"), mf.Output("y", shape=lambda b: b.x.shape, dtype="x")],
                  dispatch=DISPATCH)
    body = k.source(mx.zeros((9,)), backend="metal").body
    assert "thread_position_in_grid" in body


def test_comments_are_stripped_from_bodies():
    k = ck.axpb_kernel()
    body = k.source(mx.zeros((9,)), params=ck.AxpbParams(n=9, a=1.0, b=0.0)).body
    assert "//" not in body and "/*" not in body


# -- the cache ------------------------------------------------------------------------

class _FakeBackend:
    """Stands in for the metal backend on CPU: records builds, returns zeros."""

    threadgroup_declaration = staticmethod(metal_backend.threadgroup_declaration)
    wrap_header = staticmethod(metal_backend.wrap_header)
    body_preamble = staticmethod(metal_backend.body_preamble)
    launch_attributes = staticmethod(metal_backend.launch_attributes)
    launch_attribute_lines = staticmethod(metal_backend.launch_attribute_lines)

    def __init__(self):
        self.built = []

    def build(self, src):
        self.built.append(src.name)

        def run(*, inputs, output_shapes, output_dtypes, grid, threadgroup, stream):
            return [mx.zeros(s, dtype=d) for s, d in zip(output_shapes, output_dtypes)]

        return run


@pytest.fixture
def fake_backend(monkeypatch):
    fake = _FakeBackend()
    monkeypatch.setattr(kernel_mod, "_backend_module", lambda name: fake)
    # The fake is the backend here: it is available (the real check is tested below).
    monkeypatch.setattr(kernel_mod, "require_available", lambda backend, who: backend)
    mf.clear_cache()
    yield fake
    mf.clear_cache()


def test_cache_hit_renders_and_hashes_nothing(fake_backend, monkeypatch):
    k = ck.row_sum_kernel()
    x = ck.seeded((4, 50), mx.float16)
    k(x, scale=1.0, backend="metal")
    assert mf.cache_info().misses == 1 and mf.cache_info().compiles == 1

    def boom(*a, **kw):
        raise AssertionError("rendered or hashed on a cache hit")

    monkeypatch.setattr(kernel_mod.Program, "render", boom)
    monkeypatch.setattr(cache, "content_hash", boom)
    for _ in range(5):
        k(x, scale=2.0, backend="metal")  # a runtime scalar change is still a hit
    info = mf.cache_info()
    assert info.hits == 5 and info.misses == 1 and info.compiles == 1


def test_a_derived_constant_sees_the_constants_declared_before_it():
    """``Constant(value=fn)``: ``fn`` gets the arguments and the constants before it,
    given or derived (the GEMV's XSTAGE follows its SPLITK)."""
    k = mf.Kernel("derived", source_text="template <int A, int B> void f() {}", function="f",
                  template=("A", "B"),
                  args=[mf.Tensor("x", (mx.float32,)),
                        mf.Output("y", shape=lambda b: b.x.shape, dtype="x"),
                        mf.Constant("A", value=lambda b: b.x.shape[0]),
                        mf.Constant("B", value=lambda b: 10 * b.A + b.x.shape[0])],
                  dispatch=lambda b: mf.per_element(b.x.size), reference=lambda b: b.x)
    x = mx.zeros((3,))
    assert "constexpr int B = 33;" in k.source(x).body
    assert "constexpr int B = 73;" in k.source(x, A=7).body
    assert "constexpr int B = 5;" in k.source(x, B=5).body


def test_a_constant_outside_the_body_adds_no_line(fake_backend):
    """``Constant(in_body=False)``: a value only a backend reads (a launch attribute); the
    body declares it nowhere, and on Metal, which takes no such attribute, every value
    is the one kernel."""
    k = mf.Kernel("attr", source_text="template <int A> void f() {}", function="f",
                  template=("A",),
                  args=[mf.Tensor("x", (mx.float32,)),
                        mf.Output("y", shape=lambda b: b.x.shape, dtype="x"),
                        mf.Constant("A", value=1),
                        mf.Constant("HINT", value=0, in_body=False)],
                  dispatch=lambda b: mf.per_element(b.x.size), reference=lambda b: b.x)
    x = mx.zeros((3,))
    plain, hinted = k.source(x), k.source(x, HINT=4)
    assert "HINT" not in plain.body and "constexpr int A = 1;" in plain.body
    assert (hinted.name, hinted.header, hinted.body) == (plain.name, plain.header, plain.body)
    k(x, backend="metal")
    k(x, HINT=4, backend="metal")
    assert len(set(fake_backend.built)) == 1


def _bounded_kernel(*constants):
    return mf.Kernel("bounded", source_text="template <int A> void f() {}", function="f",
                     template=("A",),
                     args=[mf.Tensor("x", (mx.float32,)),
                           mf.Output("y", shape=lambda b: b.x.shape, dtype="x"),
                           mf.Constant("A", value=1), *constants],
                     dispatch=lambda b: mf.per_element(b.x.size), reference=lambda b: b.x)


def test_only_an_outside_minblocks_bounds_a_cuda_kernel():
    """The CUDA register bound is an out-of-body constant named MINBLOCKS, with the
    program's THREADS: a constant of that name in the body is the program's own, and an
    outside one without THREADS is an error naming both."""
    x = mx.zeros((3,))
    own = _bounded_kernel(mf.Constant("MINBLOCKS", value=4), mf.Constant("THREADS", value=64))
    assert "__launch_bounds__" not in own.source(x, backend="cuda").header
    bounded = _bounded_kernel(mf.Constant("MINBLOCKS", value=4, in_body=False),
                              mf.Constant("THREADS", value=64))
    src = bounded.source(x, backend="cuda")
    assert src.header.endswith(f"#define custom_kernel_{src.name}(...) __launch_bounds__(64, 4) "
                               f"custom_kernel_{src.name}(__VA_ARGS__)\n")
    alone = _bounded_kernel(mf.Constant("MINBLOCKS", value=4, in_body=False))
    with pytest.raises(ValueError, match="MINBLOCKS.*THREADS"):
        alone.source(x, backend="cuda")


def test_same_name_different_constant_gives_different_kernels(fake_backend):
    k = ck.row_sum_kernel()
    a = k.source(ck.seeded((2, 64), mx.float32), scale=1.0)
    b = k.source(ck.seeded((2, 65), mx.float32), scale=1.0)
    assert a.name != b.name and a.name.startswith("row_sum_") and b.name.startswith("row_sum_")
    k(ck.seeded((2, 64), mx.float32), scale=1.0, backend="metal")
    k(ck.seeded((2, 65), mx.float32), scale=1.0, backend="metal")
    assert len(set(fake_backend.built)) == 2
    # dtype changes the source too (different name, separate compile)
    k(ck.seeded((2, 64), mx.float16), scale=1.0, backend="metal")
    assert len(set(fake_backend.built)) == 3


def test_identical_content_is_shared_across_descriptors(fake_backend):
    x = ck.seeded((2, 64), mx.float32)
    ck.row_sum_kernel()(x, scale=1.0, backend="metal")
    ck.row_sum_kernel()(x, scale=1.0, backend="metal")
    info = mf.cache_info()
    assert info.misses == 2 and info.compiles == 1 and len(fake_backend.built) == 1


def test_cache_under_threads(fake_backend):
    kernels = [ck.row_sum_kernel() for _ in range(4)]
    shapes = [(2, 32 + i) for i in range(6)]
    errors = []

    def hammer(seed):
        try:
            for i in range(60):
                k = kernels[(seed + i) % len(kernels)]
                x = mx.zeros(shapes[(seed * 7 + i) % len(shapes)], dtype=mx.float16)
                k(x, scale=1.0, backend="metal")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=hammer, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    info = mf.cache_info()
    # one compile per distinct source, one miss per (descriptor, shape) at most
    assert info.compiles == len(set(fake_backend.built)) == len(shapes)
    assert info.misses <= len(kernels) * len(shapes)
    assert info.hits + info.misses == 8 * 60


# -- the full Metal source ------------------------------------------------------------

def test_full_metal_source_is_captured_on_linux():
    k = ck.row_sum_kernel()
    x = ck.seeded((3, 70), mx.float16)
    src = k.source(x, scale=1.0, backend="metal")
    full = k.metal_source(x, scale=1.0)
    assert f"[[kernel]] void custom_kernel_{src.name}" in full
    assert "const device float16_t* x [[buffer(0)]]" in full
    assert "uint simdgroup_index_in_threadgroup [[simdgroup_index_in_threadgroup]]" in full
    assert src.body in full and "struct" not in src.body


def test_two_kernels_one_trace_keep_their_own_sources():
    """Same readable name, one constant different: both traced in one function."""
    from mlx_foundry.inspection import traced_metal_sources

    k = ck.row_sum_kernel()
    xa, xb = ck.seeded((2, 64), mx.float32), ck.seeded((2, 96), mx.float32)
    srcs = [k.source(x, scale=1.0, backend="metal") for x in (xa, xb)]
    kernels = [mx.fast.metal_kernel(name=s.name, input_names=list(s.input_names),
                                    output_names=list(s.output_names), source=s.body,
                                    header=s.header) for s in srcs]

    def both(a, b, scale):
        outs = []
        for kern, x in zip(kernels, (a, b)):
            outs += kern(inputs=[x, scale], output_shapes=[(2,)], output_dtypes=[mx.float32],
                         grid=(2 * 128, 1, 1), threadgroup=(128, 1, 1), verbose=True)
        return outs

    found = traced_metal_sources(both, xa, xb, mx.array([1.0]))
    assert len(found) == 2
    texts = [t for _, t in found]
    assert "constexpr int K = 64;" in texts[0] and "constexpr int K = 96;" in texts[1]
    assert srcs[0].name in texts[0] and srcs[1].name in texts[1]


def test_compound_reference_rejects_a_stage_reference_with_unknown_names():
    """A stage reference that returns a name its stage does not produce (a typo) is an
    error: dropped silently, the oracle would skip the stage."""
    k = ck.center_scale_relu_kernel()
    stage = k.stages[-1]
    real = stage.reference
    stage.reference = lambda b, v: {"accc": real(b, v)["acc"]}
    try:
        with pytest.raises(ValueError, match=r"stage '.*' must return.*\['accc'\]"):
            k(ck.seeded((4, 37), mx.float32), scale=0.5, backend="reference")
    finally:
        stage.reference = real


@pytest.mark.parametrize("bad", [lambda b: b.x[:3], lambda b: b.x.astype(mx.float32)],
                         ids=["shape", "dtype"])
def test_reference_must_match_the_declared_outputs(bad):
    """A reference is the oracle of its kernel: one that returns another shape or dtype
    than the kernel's declared output is an error, not a result."""
    args = [mf.Tensor("x", (mx.float16, mx.bfloat16, mx.float32), buffer=0),
            mf.Output("y", shape=lambda b: b.x.shape, dtype="x", buffer=1),
            mf.Params("params", ck.AxpbParams, buffer=2), mf.Constant("T", "dtype", like="x")]
    wrong = mf.Kernel("axpb_wrong_ref", source="axpb.metal", function="axpb_kernel",
                      template=("T",), args=args, attributes=("thread_position_in_grid",),
                      dispatch=lambda b: mf.per_element(b.x.size), reference=bad)
    x = ck.seeded((4, 5), mx.float16)
    with pytest.raises(ValueError, match=r"reference returned .* for output 'y', declared as "
                                         r"shape \(4, 5\), mlx.core.float16"):
        wrong(x, params=ck.AxpbParams(n=x.size, a=1.0, b=0.0), backend="reference")


def test_dispatch_must_return_a_dispatch_config(fake_backend):
    """A dispatch rule that returns (grid, threadgroup) instead of a DispatchConfig fails
    at its first launch with the kernel's name, not an AttributeError inside the plan."""
    k = mf.Kernel("scale_bad_dispatch", source="core_kernels.metal", function="row_sum_kernel",
                  args=[mf.Tensor("x", ndim=2),
                        mf.Output("y", shape=lambda b: (b.x.shape[0],), dtype=mx.float32)],
                  dispatch=lambda b: ((b.x.shape[0] * 32, 1, 1), (32, 1, 1)),
                  reference=lambda b: b.x.sum(axis=1))
    with pytest.raises(TypeError, match=r"\[Kernel scale_bad_dispatch\] 'dispatch' must "
                                        r"return a DispatchConfig.*returned tuple"):
        k(mx.zeros((2, 8)), backend="metal")


@pytest.mark.parametrize("backend", ["metal", "cuda"])
def test_a_backend_this_machine_lacks_is_named_at_the_first_launch(backend):
    """Asking for a GPU backend the machine lacks fails before MLX's own "No ... back-end",
    with the op and the backends that are available; recording still walks it."""
    from mlx_foundry import ops
    from mlx_foundry.backends import BackendUnavailableError, is_available

    if is_available(backend):
        pytest.skip(f"{backend} is available here: nothing to refuse")
    mf.clear_cache()
    x = ck.seeded((2, 64), mx.float16)
    w = ck.seeded((64,), mx.float16)
    with pytest.raises(BackendUnavailableError,
                       match=rf"\[Kernel rms_norm\] Backend '{backend}' is not available on "
                             rf"this machine \(available: .*reference\)"):
        ops.rms_norm(x, w, 1e-5, backend=backend)
    with pytest.raises(BackendUnavailableError, match=f"'{backend}'"):
        ck.row_sum_kernel().prepare(x, scale=1.0, vary=("x",), backend=backend)
    with kernel_mod.record_launches() as launches:
        ops.rms_norm(x, w, 1e-5, backend=backend)
    assert len(launches) == 1
