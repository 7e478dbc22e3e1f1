"""Prepared launches (Program.prepare, prepare_op) and the patched mlx-lm decode path
that uses them, on the reference backend and through a stand-in GPU backend
(tests/fake_gpu.py) that receives the exact MLX input lists a GPU launch gets."""

import mlx.core as mx
import pytest

import core_kernels as ck
import mlx_foundry as mf
from fake_gpu import fake_gpu
from mlx_foundry import ops
from mlx_foundry.prepared import PreparedLaunch, prepare_op
from tolerances import assert_close


def _weight(n=48, k=128, bits=4, group_size=32, seed=0):
    w = mx.random.normal((n, k), key=mx.random.key(seed)) * 0.1
    return ops.Weight(*mx.quantize(w, group_size=group_size, bits=bits), group_size=group_size,
                      bits=bits)


@pytest.mark.parametrize("backend", ["reference", "cuda"])
def test_prepared_kernel_matches_a_call(monkeypatch, backend):
    record = fake_gpu(monkeypatch) if backend == "cuda" else None
    k = ck.axpb_kernel()
    x0 = ck.seeded((3, 37), mx.float16, seed=1)
    params = ck.AxpbParams(n=x0.size, a=2.0, b=-1.0)
    step = k.prepare(x0, params=params, vary=("x",), backend=backend)
    assert isinstance(step, PreparedLaunch) and step.vary == ("x",)
    assert step.backend == backend
    for seed in (2, 3):
        x = ck.seeded((3, 37), mx.float16, seed=seed)
        assert_close(step(x), k(x, params=params, backend="reference"))
    if record is not None:
        assert record.calls["axpb"] == 2


def test_prepared_launch_passes_the_same_inputs_as_a_call(monkeypatch):
    """Fixed inputs converted once must equal what a plain call converts each time."""
    record = fake_gpu(monkeypatch)
    w = _weight()
    x = ck.seeded((1, 128), mx.float32, seed=4)
    r = ck.seeded((1, 48), mx.float32, seed=5)
    g = 1.0 + 0.1 * ck.seeded((128,), mx.float32, seed=6)
    ops.norm_linear(x, g, 1e-5, w, residual=r, backend="cuda")
    plain = record.last_inputs
    step = prepare_op(ops.norm_linear, x, g, 1e-5, w, residual=r,
                      vary={"x": x, "residual": r}, backend="cuda")
    step(x, r)
    prepared = record.last_inputs
    assert len(plain) == len(prepared)
    for a, b in zip(plain, prepared):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert mx.array_equal(a, b).item()


def test_prepared_scalar_may_change(monkeypatch):
    fake_gpu(monkeypatch)
    wq, wk, wv = _weight(64, 128, seed=1), _weight(32, 128, seed=2), _weight(32, 128, seed=3)
    x = ck.seeded((1, 1, 128), mx.float32, seed=7)
    kw = dict(n_heads=4, n_kv_heads=2, head_dim=16)
    step = prepare_op(ops.norm_qkv_rope, x, None, 1e-5, wq, wk, wv, offset=3,
                      vary={"x": x, "rope_offset": 3}, backend="cuda", **kw)
    for offset in (3, 11, 200):
        got = step(x, offset)
        want = ops.norm_qkv_rope(x, None, 1e-5, wq, wk, wv, offset=offset,
                                 backend="reference", **kw)
        for a, b in zip(got, want):
            assert_close(a, b, k=128)


def test_prepare_errors_name_the_argument(monkeypatch):
    fake_gpu(monkeypatch)
    k = ck.axpb_kernel()
    x = ck.seeded((4, 40), mx.float32)
    params = ck.AxpbParams(n=x.size, a=1.0, b=0.0)
    with pytest.raises(ValueError, match="'nope'"):
        k.prepare(x, params=params, vary=("nope",), backend="cuda")
    with pytest.raises(ValueError, match="'T'"):
        k.prepare(x, params=params, vary=("T",), backend="cuda")
    with pytest.raises(ValueError, match="repeats"):
        k.prepare(x, params=params, vary=("x", "x"), backend="cuda")
    step = k.prepare(x, params=params, vary=("x",), backend="cuda")
    with pytest.raises(ValueError, match=r"'x'.*\(4, 40\)"):
        step(ck.seeded((4, 41), mx.float32))
    with pytest.raises(ValueError, match="'x'.*float32"):
        step(x.astype(mx.float16))
    with pytest.raises(TypeError, match="'x'"):
        step([1.0])
    with pytest.raises(TypeError, match="takes 1 input"):
        step(x, x)


def test_prepare_op_rejects_a_vary_that_names_no_input():
    """A typo in ``vary`` is an error naming it, not a silent ``None`` (which means "this
    op does not launch one kernel here")."""
    x = ck.seeded((2, 128), mx.float16)
    w = _weight()
    with pytest.raises(ValueError, match=r"\['y'\].*inputs: .*\bx\b"):
        prepare_op(ops.linear, x, w, vary={"y": x}, backend="reference")
    with pytest.raises(TypeError, match="'vary' must be a dict"):
        prepare_op(ops.linear, x, w, vary=("x",), backend="reference")
    assert prepare_op(ops.linear, x, w, vary={"x": x}, backend="reference") is not None


@pytest.mark.parametrize("backend", ["reference", "cuda"])
def test_reshaped_launch_declares_other_output_shapes(monkeypatch, backend):
    """One token's Q/K/V as [B, heads, 1, head_dim]: the same values, no reshape after."""
    if backend == "cuda":
        fake_gpu(monkeypatch)
    wq, wk, wv = _weight(64, 128, seed=1), _weight(32, 128, seed=2), _weight(32, 128, seed=3)
    x = ck.seeded((2, 1, 128), mx.float16, seed=8)
    kw = dict(n_heads=4, n_kv_heads=2, head_dim=16)
    step = prepare_op(ops.norm_qkv_rope, x, None, 1e-5, wq, wk, wv, offset=5,
                      vary={"x": x, "rope_offset": 5}, backend=backend, **kw)
    heads = step.reshaped((2, 4, 1, 16), (2, 2, 1, 16), (2, 2, 1, 16))
    assert heads is not step
    flat = step(x, 9)
    got = heads(x, 9)
    assert [tuple(t.shape) for t in flat] == [(2, 1, 64), (2, 1, 32), (2, 1, 32)]
    assert [tuple(t.shape) for t in got] == [(2, 4, 1, 16), (2, 2, 1, 16), (2, 2, 1, 16)]
    for a, b, n in zip(got, flat, (4, 2, 2)):
        want = b.reshape(2, 1, n, 16).transpose(0, 2, 1, 3)
        assert mx.array_equal(a, want).item()


def test_reshaped_errors_name_the_argument(monkeypatch):
    fake_gpu(monkeypatch)
    k = ck.axpb_kernel()
    x = ck.seeded((4, 40), mx.float32)
    step = k.prepare(x, params=ck.AxpbParams(n=x.size, a=1.0, b=0.0), vary=("x",),
                     backend="cuda")
    assert tuple(step.reshaped((160,))(x).shape) == (160,)
    with pytest.raises(ValueError, match="'shapes'.*one shape per output"):
        step.reshaped((160,), (160,))
    with pytest.raises(ValueError, match=r"'shapes\[0\]'.*160 elements"):
        step.reshaped((4, 41))
    with pytest.raises(ValueError, match=r"'shapes\[0\]'.*non-negative ints"):
        step.reshaped((4.0, 40))


@pytest.mark.parametrize("backend", ["reference", "cuda"])
def test_reshaped_inputs_take_another_shape_of_the_same_size(monkeypatch, backend):
    """The attention output [B, heads, 1, head_dim] straight into the output projection
    prepared for [B, 1, heads * head_dim]: the same result, and the original launch
    still wants its own shape."""
    if backend == "cuda":
        fake_gpu(monkeypatch)
    w = _weight(64, 128, seed=4)
    x = ck.seeded((2, 1, 128), mx.float16, seed=5)
    r = ck.seeded((2, 1, 64), mx.float16, seed=6)
    step = prepare_op(ops.linear, x, w, residual=r, vary={"x": x, "residual": r},
                      backend=backend)
    heads = step.reshaped_inputs(x=(2, 8, 1, 16))
    assert heads is not step
    x2 = ck.seeded((2, 8, 1, 16), mx.float16, seed=7)
    got = heads(x2, r)
    want = step(x2.reshape(2, 1, 128), r)
    assert tuple(got.shape) == (2, 1, 64)
    assert mx.array_equal(got, want).item()
    assert mx.array_equal(got, ops.linear(x2.reshape(2, 1, 128), w, residual=r,
                                          backend="reference")).item()
    with pytest.raises(ValueError, match="'x'.*keep the shape"):
        step(x2, r)
    with pytest.raises(ValueError, match="'x'.*keep the shape"):
        heads(x, r)
    # Back to the prepared shape: the same launch as the original.
    back = heads.reshaped_inputs(x=(2, 1, 128))
    assert mx.array_equal(back(x2.reshape(2, 1, 128), r), want).item()
    with pytest.raises(ValueError, match="'x'.*keep the shape"):
        back(x2, r)


def test_reshaped_inputs_errors_name_the_argument():
    w = _weight(64, 128, seed=4)
    x = ck.seeded((1, 128), mx.float16)
    q, k, v = _weight(64, 128, seed=1), _weight(32, 128, seed=2), _weight(32, 128, seed=3)
    step = prepare_op(ops.linear, x, w, vary={"x": x}, backend="reference")
    with pytest.raises(ValueError, match="'residual' is not a varying input"):
        step.reshaped_inputs(residual=(1, 64))
    with pytest.raises(ValueError, match="'x'.*128 elements"):
        step.reshaped_inputs(x=(1, 127))
    with pytest.raises(ValueError, match="'x'.*non-negative ints"):
        step.reshaped_inputs(x=(1, 128.0))
    x3 = x[None]
    qkv = prepare_op(ops.norm_qkv_rope, x3, None, 1e-5, q, k, v, offset=5,
                     vary={"x": x3, "rope_offset": 5}, backend="reference",
                     n_heads=4, n_kv_heads=2, head_dim=16)
    with pytest.raises(ValueError, match="'rope_offset' is a runtime scalar"):
        qkv.reshaped_inputs(rope_offset=(1,))


def test_prepare_op_refuses_what_it_cannot_prepare():
    w = _weight()
    x = ck.seeded((1, 128), mx.float16)
    # 'x + 0' is not the array the op received: it cannot vary.
    assert prepare_op(ops.linear, x, w, vary={"x": x + 0}, backend="reference") is None
    # A cast input (the norm weight becomes x's dtype) is not the op's array either.
    g = mx.ones((128,), mx.float32)
    assert prepare_op(ops.norm_linear, x, g, 1e-5, w, vary={"norm_weight": g},
                      backend="reference") is None
    # More rows than PREFILL_ROWS: the op runs MLX's matmul, no kernel to prepare.
    xs = ck.seeded((64, 128), mx.float16)
    assert prepare_op(ops.linear, xs, w, vary={"x": xs}, backend="cuda") is None


# ------------------------------------------------------------------------------------
# The patched decode path through the stand-in GPU backend
# ------------------------------------------------------------------------------------
def _tiny(model_type="llama", quant=(32, 4), **extra):
    from test_lm_patch import tiny_model

    return tiny_model(model_type, quant=quant, **extra)


@pytest.mark.parametrize("model_type,head_dim", [("llama", 16), ("qwen2", 16), ("qwen3", 16),
                                                ("qwen3", 32)])
def test_patched_decode_uses_prepared_launches(monkeypatch, model_type, head_dim):
    pytest.importorskip("mlx_lm")
    from test_lm_patch import greedy

    from mlx_foundry import lm

    record = fake_gpu(monkeypatch)
    model = _tiny(model_type, head_dim=head_dim)
    ref_toks, ref_lp = greedy(model, 24)
    mf.patch(model, backend="cuda", compile_decode=False)  # the ordinary step's launches
    try:
        toks, lp = greedy(model, 24)
        plan = model.model.layers[0].__dict__[lm._PLAN_ATTR]
        steps = list(plan.steps.values())
        one_token = [st for key, st in plan.steps.items() if key[0][1] == 1]
        stats = lm.patch_stats(model)[plan.path]
        fast_calls, fast = plan.fast_calls, one_token[0].fast
    finally:
        mf.unpatch(model)
    assert toks == ref_toks
    assert_close(lp, ref_lp, mx.float32, k=64)
    decode = [s for s in steps if isinstance(s.down, PreparedLaunch)]
    assert decode, "no prepared launch in the decode step"
    rope_fused = model_type in ("llama", "qwen2")
    # qwen3's q/k norms sit between the projections and RoPE: at head_dim 32 one token
    # runs Q/K/V (K and V joint) then qk_norm_rope, two prepared launches; at head_dim 16
    # (which qk_norm_rope does not take) the projections without RoPE, then the modules.
    qk_norm = model_type == "qwen3" and head_dim == 32
    for st in decode:
        one = st is one_token[0]
        # One token into mlx-lm's KVCache: the Q/K/V launch with K and V in one output.
        qkv = (("qkv_joint",) if one else ("qkv",)) if rope_fused else ("qkv_plain",)
        if qk_norm and one:
            chain = st.qkv_joint
            assert isinstance(chain.qkv, PreparedLaunch) and isinstance(chain.norm,
                                                                         PreparedLaunch)
            qkv = ()
        assert all(isinstance(getattr(st, n), PreparedLaunch)
                   for n in qkv + ("o", "gate_up", "down"))
    assert record.total() >= 24 * 4
    # After its first token, a block with the fused Q/K/V + RoPE (or Q/K/V, then
    # qk_norm_rope) decodes on its prepared launches alone.
    if rope_fused or qk_norm:
        assert fast_calls >= 20 and fast is not None
    else:
        assert fast_calls == 0 and fast is None
    assert stats["fused attention"] == stats["fused mlp"] >= 24
    if rope_fused:
        # One token: Q and K/V come out of the launch in the attention (cache) layout.
        assert [tuple(sh) for sh in one_token[0].qkv_joint._out_shapes] == [
            (1, 4, 1, 16), (1, 4, 1, 16)]


def test_prepared_launches_follow_new_weights(monkeypatch):
    """load_weights after patch(): the prepared launches must read the new arrays."""
    pytest.importorskip("mlx_lm")
    from mlx_lm.models import cache as lm_cache
    from mlx.utils import tree_flatten

    fake_gpu(monkeypatch)
    model = _tiny("llama")
    x = mx.array([[5]])

    def step_logits():
        cache = lm_cache.make_prompt_cache(model)
        return model(x, cache=cache)

    mf.patch(model, backend="cuda", compile_decode=False)
    try:
        step_logits()  # prepares the launches
        new = [(k, v * 1.5 if k.endswith(("scales", "biases")) or "layernorm" in k else v)
               for k, v in tree_flatten(model.parameters())]
        model.load_weights(new)
        mx.eval(model.parameters())
        patched = step_logits()
    finally:
        mf.unpatch(model)
    assert_close(patched, step_logits(), mx.float32, k=64)
    assert not mx.allclose(patched, mx.zeros_like(patched)).item()


def test_fused_lm_head_follows_new_weights(monkeypatch):
    """The fused lm_head reads the arrays the module holds now, not the ones it prepared."""
    pytest.importorskip("mlx_lm")
    from mlx_foundry import lm

    record = fake_gpu(monkeypatch)
    model = _tiny("llama")
    x = mx.random.normal((1, 1, 64), key=mx.random.key(3))
    mf.patch(model, backend="cuda")
    try:
        first = model.lm_head(x)
        model.lm_head.scales = model.lm_head.scales * 2.0
        second = model.lm_head(x)
        stats = lm.patch_stats(model)["lm_head"]
    finally:
        mf.unpatch(model)
    assert stats["fused"] == 2 and record.total() == 2
    assert_close(second, model.lm_head(x), mx.float32, k=64)
    assert not mx.allclose(first, second).item()


@pytest.mark.parametrize("eps", [1e-5, mx.array(1e-6)])
def test_scalar_inputs_are_device_sized_arrays(monkeypatch, eps):
    """A scalar reaches a GPU kernel as SCALAR_LANES copies (16 bytes): MLX's CUDA
    allocator serves arrays of at most 8 bytes from a managed pool the GPU reads over the
    host link, which stalled every thread that read ``eps``."""
    from mlx_foundry.kernel import SCALAR_LANES
    from mlx_foundry.ops.linear import linear_kernel

    record = fake_gpu(monkeypatch)
    w = _weight()
    x = ck.seeded((1, 128), mx.float32, seed=4)
    kern = linear_kernel(w.signature(), norm="plain")
    y = kern(x=x, **w.inputs("w"), eps=eps, backend="cuda")
    assert_close(y, kern(x=x, **w.inputs("w"), eps=eps, backend="reference"))
    got = record.last_inputs[[a.name for a in kern.inputs].index("eps")]
    assert SCALAR_LANES * got.dtype.size > 8 and got.shape == (SCALAR_LANES,)
    assert mx.allclose(got, mx.full((SCALAR_LANES,), eps, mx.float32)).item()


def test_scalar_arrays_made_inside_compile_stay_usable(monkeypatch):
    """The cached scalar inputs may first be made while mx.compile traces a function."""
    fake_gpu(monkeypatch)
    w = _weight()
    x = ck.seeded((1, 128), mx.float32, seed=8)
    g = 1.0 + 0.1 * ck.seeded((128,), mx.float32, seed=9)
    eps = 3e-4  # a value no other test caches first
    f = mx.compile(lambda x: ops.norm_linear(x, g, eps, w, backend="cuda"))
    want = ops.norm_linear(x, g, eps, w, backend="reference")
    assert_close(f(x), want)
    assert_close(ops.norm_linear(x, g, eps, w, backend="cuda"), want)
    assert_close(f(x + 1), ops.norm_linear(x + 1, g, eps, w, backend="reference"))
