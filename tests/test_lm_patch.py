"""mlx_foundry.patch on tiny random mlx-lm models (CPU, reference backend).

Greedy decoding through mlx_lm's ``generate_step`` must give the same tokens
patched and unpatched, the log-probabilities must agree within tolerance,
and the report must name what was fused and what was left as it was.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

pytest.importorskip("mlx_lm")

from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.models import cache as lm_cache  # noqa: E402
from mlx_lm.models import gemma, llama, qwen2, qwen3  # noqa: E402

import mlx_foundry as mf  # noqa: E402
from mlx_foundry import lm  # noqa: E402
from tolerances import assert_close  # noqa: E402

BACKEND = "reference"
STEPS = 64
VOCAB = 128
PROMPT = [3, 17, 42, 99, 5, 64, 7]

_MODULES = {"llama": llama, "mistral": llama, "qwen2": qwen2, "qwen3": qwen3}


def tiny_model(model_type, *, dtype=mx.float32, quant=None, layers=2, seed=0,
               quant_embedding=False, **extra):
    """A tiny random mlx-lm model: hidden 64, 4 heads, 2 KV heads, vocab 128.

    ``quant=(group_size, bits)`` quantizes every linear layer (MLX affine), and the
    embedding too with ``quant_embedding``.
    """
    mx.random.seed(seed)
    cfg = dict(model_type=model_type, hidden_size=64, num_hidden_layers=layers,
               intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
               rms_norm_eps=1e-5, vocab_size=VOCAB, head_dim=16,
               max_position_embeddings=512, tie_word_embeddings=False, rope_theta=10000.0)
    cfg.update(extra)
    mod = _MODULES[model_type]
    model = mod.Model(mod.ModelArgs.from_dict(cfg))
    # Random norm weights (ones would hide a norm-weight bug) and sharper logits.
    params = {}
    for name, p in _flat(model.parameters()):
        if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
            params[name] = 1.0 + 0.2 * mx.random.normal(p.shape)
        elif name.endswith(".bias"):
            params[name] = 0.1 * mx.random.normal(p.shape)
    model.load_weights(list(params.items()), strict=False)
    if quant is not None:
        g, b = quant
        kinds = (nn.Linear, nn.Embedding) if quant_embedding else nn.Linear
        nn.quantize(model, group_size=g, bits=b,
                    class_predicate=lambda p, m: isinstance(m, kinds))
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def _flat(tree, prefix=""):
    from mlx.utils import tree_flatten
    return tree_flatten(tree)


def greedy(model, steps=STEPS, prompt=PROMPT, cache=None, **kw):
    toks, logps = [], []
    gen = generate_step(mx.array(prompt), model, max_tokens=steps, prompt_cache=cache, **kw)
    for tok, lp in gen:
        toks.append(int(tok))
        logps.append(lp)
    return toks, mx.stack(logps)


def check_parity(model, dtype, *, cache_fn=None, steps=STEPS, tol_dtype=None,
                 patch_kwargs=None, **gen_kw):
    ref_toks, ref_lp = greedy(model, steps, cache=cache_fn() if cache_fn else None, **gen_kw)
    report = mf.patch(model, backend=BACKEND, **(patch_kwargs or {}))
    try:
        toks, lp = greedy(model, steps, cache=cache_fn() if cache_fn else None, **gen_kw)
        stats = lm.patch_stats(model)
    finally:
        mf.unpatch(model)
    assert toks == ref_toks
    assert_close(lp, ref_lp, tol_dtype or dtype, k=64, msg="log-probabilities")
    return report, stats


def fused_calls(stats, what="fused attention"):
    """Fused calls of the least-used patched block."""
    return min(c[what] for path, c in stats.items() if ".layers." in path)


# ------------------------------------------------------------------------------------
# Parity: dense and quantized, every supported model type
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_dense_greedy_parity(model_type, dtype):
    model = tiny_model(model_type, dtype=dtype)
    report, stats = check_parity(model, dtype)
    assert len(report.patched_blocks) == 2
    assert [p for p, _ in report.fused] == [
        "model.layers.0.self_attn", "model.layers.0.mlp",
        "model.layers.1.self_attn", "model.layers.1.mlp", "lm_head"]
    # Every decode step's logits came from the fused GEMV (the prompt's from MLX).
    assert stats["lm_head"]["fused"] >= STEPS - 1
    # Every decode step ran fused in every block; the prompt too (under max_rows).
    assert fused_calls(stats) >= STEPS
    assert fused_calls(stats, "fused mlp") >= STEPS


@pytest.mark.parametrize("model_type,quant", [
    ("llama", (64, 4)), ("llama", (32, 8)), ("mistral", (32, 4)), ("qwen2", (64, 8)),
    ("qwen3", (32, 4)), ("llama", (32, 2)), ("llama", (64, 3)), ("qwen3", (32, 5)),
    ("qwen2", (32, 6)),
])
def test_quantized_greedy_parity(model_type, quant):
    model = tiny_model(model_type, quant=quant)
    report, stats = check_parity(model, mx.float32)
    g, b = quant
    assert any(f"affine {b}-bit g{g}" in w for _, w in report.fused), str(report)
    assert fused_calls(stats) >= STEPS


@pytest.mark.parametrize("model_type,head_dim,rope,norms", [
    ("llama", 16, True, 0), ("qwen3", 32, False, 2), ("qwen3", 16, False, 0)])
def test_one_qkv_launch_per_block(monkeypatch, model_type, head_dim, rope, norms):
    """A decoded token's Q/K/V projections are one prepared kernel per block: with RoPE
    inside it (Llama), or without (Qwen3, whose q/k norms come between the projections
    and RoPE: one more prepared kernel, qk_norm_rope, where it takes the head_dim);
    never three norm_linear launches."""
    prepared = []
    real = lm._prepare

    def record(op, *args, **kwargs):
        prepared.append((op.__name__, kwargs.get("rope", True)))
        return real(op, *args, **kwargs)

    monkeypatch.setattr(lm, "_prepare", record)
    model = tiny_model(model_type, quant=(32, 4), head_dim=head_dim)
    check_parity(model, mx.float32, steps=6)
    qkv = [r for name, r in prepared if name == "norm_qkv_rope"]
    # Prepared once per block and input shape: generate_step runs the prompt's first 6
    # rows (fused: not over max_rows), then one token at a time.
    assert qkv == [rope] * 4, prepared
    assert not any(name == "norm_linear" for name, _ in prepared), prepared
    assert sum(name == "qk_norm_rope" for name, _ in prepared) == norms, prepared


def test_report_names_what_was_fused():
    model = tiny_model("llama")
    report = mf.patch(model, backend=BACKEND)
    try:
        assert isinstance(report, mf.PatchReport)
        assert report.model_type == "llama" and report.backend == BACKEND
        assert report.blocks == 2 and report.skipped == []
        attn = dict(report.fused)["model.layers.0.self_attn"]
        assert "q/k/v+rope" in attn and "o_proj+residual" in attn
        assert "gate/up+swiglu" in dict(report.fused)["model.layers.0.mlp"]
        text = str(report)
        assert "2 of 2 blocks fused" in text and "model.layers.1.mlp" in text
        # A patched model prints as patched.
        assert "mlx_foundry: fused qkv_rope+mlp" in repr(model)
        assert type(model.model.layers[0]).__name__ == "FusedTransformerBlock"
        assert isinstance(model.model.layers[0], llama.TransformerBlock)
    finally:
        mf.unpatch(model)


def test_qwen3_qk_norms_in_the_report():
    """Qwen3's q/k norms and RoPE run in ops.qk_norm_rope when it takes the head_dim;
    otherwise the modules' own, and the report says why."""
    report = mf.patch(tiny_model("qwen3", head_dim=32), backend=BACKEND)
    attn = dict(report.fused)["model.layers.0.self_attn"]
    assert "q/k norms+rope" in attn, attn
    report = mf.patch(tiny_model("qwen3"), backend=BACKEND)  # head_dim 16
    attn = dict(report.fused)["model.layers.0.self_attn"]
    assert "module RoPE" in attn and "not a multiple of 32" in attn, attn


@pytest.mark.parametrize("dtype,quant,head_dim", [(mx.float32, None, 32),
                                                  (mx.float16, None, 64),
                                                  (mx.float32, (32, 4), 32),
                                                  (mx.float32, (64, 8), 64)])
def test_qwen3_qk_norm_rope_parity(dtype, quant, head_dim):
    """Qwen3 decoding through qk_norm_rope (and the joint K/V cache): the same greedy
    tokens and log-probabilities as unpatched."""
    model = tiny_model("qwen3", dtype=dtype, quant=quant, head_dim=head_dim)
    report, stats = check_parity(model, dtype)
    assert "q/k norms+rope" in dict(report.fused)["model.layers.0.self_attn"]
    assert fused_calls(stats) >= STEPS


def test_prefill_falls_back_and_is_counted():
    model = tiny_model("llama")
    mf.patch(model, backend=BACKEND, max_rows=4)
    try:
        greedy(model, steps=3)
        stats = lm.patch_stats(model)["model.layers.0"]
    finally:
        mf.unpatch(model)
    assert stats["original: rows > max_rows"] == 1        # the prompt (6 of its 7 tokens)
    assert stats["fused attention"] >= 3                  # last prompt token + decode steps


def test_fused_multi_token_prefill_matches():
    """With a large max_rows the causal-masked prompt runs through the fused ops too."""
    model = tiny_model("qwen2")
    x = mx.array([PROMPT])
    ref = model(x, cache=lm_cache.make_prompt_cache(model))
    mf.patch(model, backend=BACKEND, max_rows=1024)
    try:
        out = model(x, cache=lm_cache.make_prompt_cache(model))
        assert fused_calls(lm.patch_stats(model)) == 1
    finally:
        mf.unpatch(model)
    assert_close(out, ref, mx.float32, k=64)


@pytest.mark.parametrize("draft_seed", [0, 1], ids=["draft_accepted", "draft_rejected"])
@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_speculative_decoding_matches(model_type, draft_seed):
    """mlx-lm's speculative decoding with a patched main model: every verify step (the
    last token and 3 draft tokens, 4 rows at an offset, causal mask) runs fused, the
    cache is trimmed back after rejected drafts, and the tokens are the unpatched ones.
    A draft equal to the main model (seed 0) is always accepted; another one mostly not."""
    from mlx_lm.generate import speculative_generate_step

    model = tiny_model(model_type, quant=(64, 4))
    draft = tiny_model(model_type, quant=(64, 4), seed=draft_seed)

    def run():
        gen = speculative_generate_step(mx.array(PROMPT), model, draft, num_draft_tokens=3,
                                        max_tokens=24)
        return [(int(tok), bool(from_draft)) for tok, _, from_draft in gen]

    ref = run()
    mf.patch(model, backend=BACKEND)
    try:
        got = run()
        stats = lm.patch_stats(model)["model.layers.0"]
    finally:
        mf.unpatch(model)
    assert got == ref
    accepted = sum(f for _, f in ref)
    assert accepted >= 12 if draft_seed == 0 else accepted < 12
    # Every verify step after the prompt went through the fused path.
    assert stats["fused attention"] >= 24 - accepted and "original: rows > max_rows" not in stats


# ------------------------------------------------------------------------------------
# Caches, batches, RoPE variants
# ------------------------------------------------------------------------------------
def test_rotating_kv_cache():
    model = tiny_model("llama", quant=(64, 4))
    mk = lambda: [lm_cache.RotatingKVCache(max_size=16, keep=4) for _ in range(2)]  # noqa: E731
    _, stats = check_parity(model, mx.float32, cache_fn=mk)
    assert fused_calls(stats) >= STEPS


def _fast_calls(model):
    return [b.__dict__[lm._PLAN_ATTR].fast_calls for b in model.model.layers]


@pytest.mark.parametrize("joint_kv", [True, False])
def test_joint_kv_cache_is_adopted_or_left_alone(joint_kv):
    """Patched blocks switch plain mlx-lm KVCaches to the joint-buffer cache (one write
    per token) unless ``joint_kv=False``; tokens and log-probabilities are the same."""
    from mlx_foundry import kv_cache

    model = tiny_model("llama", quant=(64, 4), dtype=mx.float16)
    ref_caches = [lm_cache.KVCache() for _ in range(2)]
    ref = greedy(model, cache=ref_caches)
    mf.patch(model, backend=BACKEND, joint_kv=joint_kv)
    try:
        caches = [lm_cache.KVCache() for _ in range(2)]
        toks, lp = greedy(model, cache=caches)
        fast = _fast_calls(model)
    finally:
        mf.unpatch(model)
    assert toks == ref[0]
    assert_close(lp, ref[1], mx.float16, k=64, msg="log-probabilities")
    want = kv_cache.KVCache if joint_kv else lm_cache.KVCache
    assert all(type(c) is want for c in caches)
    for layer, (c, r) in enumerate(zip(caches, ref_caches)):
        assert c.offset == r.offset
        n = r.offset
        for got, want in ((c.keys, r.keys), (c.values, r.values)):
            # Unpatched, MLX rounds the normed row to float16 before the projection (the
            # fused op does not): ~1e-3 relative per row, more after the first block.
            got, want = (np.array(a[..., :n, :].astype(mx.float32)) for a in (got, want))
            assert np.linalg.norm(got - want) <= 1e-2 * np.linalg.norm(want), f"layer {layer}"
    assert min(fast) >= STEPS - 2  # the decode steps after the first ran the fast path


@pytest.mark.parametrize("attend, max_len", [(True, 1024), (True, 20), (False, 1024)])
def test_decode_attention_over_the_joint_cache(monkeypatch, attend, max_len):
    """With the joint cache a decoded token attends through ops.decode_attention over the
    cache buffer, up to DECODE_ATTENTION_MAX_LEN cached positions,
    then through key/value views and MLX's attention; the buffer grows (here every 8
    positions) under it. Same tokens and cache contents as unpatched either way."""
    from mlx_foundry.kernel import record_launches

    monkeypatch.setattr(lm, "DECODE_ATTENTION_MAX_LEN", max_len)
    model = tiny_model("llama", quant=(64, 4), dtype=mx.float16)

    def caches():
        cs = [lm_cache.KVCache() for _ in range(2)]
        for c in cs:
            c.step = 8
        return cs

    ref_caches = caches()
    ref = greedy(model, steps=40, cache=ref_caches)
    mf.patch(model, backend=BACKEND, decode_attention=attend)
    try:
        got_caches = caches()
        toks, lp = greedy(model, steps=40, cache=got_caches)
        attend_slots = [s.attend for b in model.model.layers
                        for s in b.__dict__[lm._PLAN_ATTR].steps.values()]
        # One more step, recorded: which kernels a decoded token launches now.
        with record_launches() as rec:
            model(mx.array([[1]]), cache=got_caches)
        launched = {program.name for program, _, _ in rec}
    finally:
        mf.unpatch(model)
    assert toks == ref[0]
    assert_close(lp, ref[1], mx.float16, k=64, msg="log-probabilities")
    for c, r in zip(got_caches, ref_caches):
        n = r.offset
        for got, want in ((c.keys, r.keys), (c.values, r.values)):
            got, want = (np.array(a[..., :n, :].astype(mx.float32)) for a in (got, want))
            assert np.linalg.norm(got - want) <= 1e-2 * np.linalg.norm(want)
    prepared = [s for s in attend_slots if s]
    if attend:
        # Prepared per capacity: the last one at the capacity the buffer grew to.
        if max_len == 1024:
            assert prepared and all(s[0] == c._kv.shape[2]
                                    for s, c in zip(prepared, got_caches))
        assert prepared and all(s[0] > 16 for s in prepared)
    else:
        assert not prepared
    assert ("decode_attention" in launched) == (attend and max_len == 1024)


def test_joint_cache_continues_through_a_second_prompt():
    """A multi-turn chat: decode (the cache becomes the joint-buffer cache), then a
    second prompt longer than max_rows (mlx-lm's original attention writes the adopted
    cache through update_and_fetch), then decode again; as unpatched."""
    from mlx_foundry import kv_cache

    model = tiny_model("llama", quant=(64, 4))
    second = [(7 * i + 3) % VOCAB for i in range(21)]

    def chat():
        caches = [lm_cache.KVCache() for _ in range(2)]
        first = greedy(model, steps=12, cache=caches)
        again = greedy(model, steps=12, prompt=second, cache=caches)
        return first, again, caches

    ref = chat()
    mf.patch(model, backend=BACKEND)
    try:
        got = chat()
        stats = lm.patch_stats(model)
    finally:
        mf.unpatch(model)
    for (toks, lp), (rtoks, rlp) in zip(got[:2], ref[:2]):
        assert toks == rtoks
        assert_close(lp, rlp, mx.float32, k=64, msg="log-probabilities")
    assert all(type(c) is kv_cache.KVCache for c in got[2])
    assert [c.offset for c in got[2]] == [c.offset for c in ref[2]]
    assert min(c["original: rows > max_rows"] for p, c in stats.items() if p != "lm_head") >= 1


def test_joint_cache_without_prepared_launches(monkeypatch):
    """When no launch can be prepared, the blocks call the fused ops each step, the
    joint K/V path included; same tokens as unpatched."""
    from mlx_foundry import kv_cache

    model = tiny_model("llama", quant=(64, 4))
    ref = greedy(model, steps=16)
    monkeypatch.setattr(lm, "_prepare", lambda *a, **k: False)
    mf.patch(model, backend=BACKEND)
    try:
        caches = [lm_cache.KVCache() for _ in range(2)]
        toks, lp = greedy(model, steps=16, cache=caches)
        stats = lm.patch_stats(model)
    finally:
        mf.unpatch(model)
    assert toks == ref[0]
    assert_close(lp, ref[1], mx.float32, k=64, msg="log-probabilities")
    assert all(type(c) is kv_cache.KVCache for c in caches)
    assert fused_calls(stats) >= 16


def test_cache_kinds_alternate_on_one_patched_model():
    """One patched model decoding with a joint cache, a rotating cache, then a joint
    cache again: each has its Q/K/V launch, and every run matches the unpatched one."""
    model = tiny_model("llama", quant=(32, 4))
    kinds = [lambda: [lm_cache.KVCache() for _ in range(2)],
             lambda: [lm_cache.RotatingKVCache(max_size=16, keep=4) for _ in range(2)]]
    refs = [greedy(model, steps=24, cache=mk()) for mk in kinds]
    mf.patch(model, backend=BACKEND)
    try:
        before = 0
        for i in (0, 1, 0, 1):
            toks, lp = greedy(model, steps=24, cache=kinds[i]())
            assert toks == refs[i][0], f"cache kind {i}"
            assert_close(lp, refs[i][1], mx.float32, k=64, msg=f"cache kind {i}")
            now = min(_fast_calls(model))
            assert now - before >= 20, f"cache kind {i}: fast path not taken"
            before = now
    finally:
        mf.unpatch(model)


def test_quantized_kv_cache():
    model = tiny_model("llama", head_dim=32)           # KV quantization groups of 32
    # 8-bit keys/values: a float32 rounding difference can move a cached value by one
    # quantization step (1/255 of its group's range), so compare at float16 tolerance.
    _, stats = check_parity(model, mx.float32, steps=24, kv_bits=8, kv_group_size=32,
                            quantized_kv_start=0, tol_dtype=mx.float16)
    assert fused_calls(stats) > 0


@pytest.mark.parametrize("model_type,quant,head_dim", [
    ("qwen3", None, 16), ("qwen3", (32, 4), 16), ("qwen3", (32, 4), 32), ("llama", (32, 4), 16)])
def test_batch_forward_equal(model_type, quant, head_dim):
    """Three sequences at once; llama's blocks, and qwen3's where qk_norm_rope takes its
    head_dim, decode through the joint K/V cache."""
    model = tiny_model(model_type, quant=quant, head_dim=head_dim)
    B = 3
    rng = np.random.RandomState(0)
    prompt = mx.array(rng.randint(0, VOCAB, size=(B, 5)))
    steps = mx.array(rng.randint(0, VOCAB, size=(4, B, 1)))

    def run():
        cache = lm_cache.make_prompt_cache(model)
        outs = [model(prompt, cache=cache)[:, -1]]
        for s in steps:
            outs.append(model(s, cache=cache)[:, -1])
        return mx.stack(outs), cache

    ref, _ = run()
    mf.patch(model, backend=BACKEND, max_rows=4)   # B x 5 prompt: original; B x 1: fused
    try:
        out, cache = run()
        stats = lm.patch_stats(model)["model.layers.0"]
    finally:
        mf.unpatch(model)
    assert stats["fused attention"] == 4 and stats["original: rows > max_rows"] == 1
    assert_close(out, ref, mx.float32, k=64)
    # qwen3 at head_dim 16 keeps the modules' q/k norms and mlx-lm's cache
    joint = model_type == "llama" or head_dim == 32
    assert all(type(c).__module__ == ("mlx_foundry.kv_cache" if joint else
                                      "mlx_lm.models.cache") for c in cache)


def test_llama3_rope_scaling():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    model = tiny_model("llama", rope_scaling=scaling, rope_theta=500000.0)
    report, stats = check_parity(model, mx.float32, steps=32)
    assert "+rope" in dict(report.fused)["model.layers.0.self_attn"]
    assert fused_calls(stats) >= 32


def test_unknown_rope_left_to_module():
    model = tiny_model("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    report, stats = check_parity(model, mx.float32, steps=16)
    reasons = dict(report.skipped)
    assert "DynamicNTKScalingRoPE" in reasons["model.layers.0.self_attn.rope"]
    assert "module RoPE" in dict(report.fused)["model.layers.0.self_attn"]
    assert fused_calls(stats) >= 16


def test_projection_biases():
    """q/k/v biases (qwen2, llama attention_bias) go into the fused norm + Q/K/V + RoPE
    kernel; MLP biases on gate/up are not supported by norm_gate_up_swiglu and leave the
    MLP as it was."""
    model = tiny_model("llama", attention_bias=True, mlp_bias=True)
    report, stats = check_parity(model, mx.float32, steps=16)
    fused = "rms_norm+q/k/v (+ q/k/v biases)+rope"
    assert fused in dict(report.fused)["model.layers.0.self_attn"]
    assert "has a bias" in dict(report.skipped)["model.layers.0.mlp.gate_proj"]
    assert fused_calls(stats) >= 16 and fused_calls(stats, "fused mlp") == 0
    model = tiny_model("qwen2", quant=(64, 4))
    report, stats = check_parity(model, mx.float32, steps=16)
    assert fused in dict(report.fused)["model.layers.0.self_attn"]
    assert fused_calls(stats) >= 16 and fused_calls(stats, "fused mlp") >= 16


def test_traditional_rope():
    model = tiny_model("llama", rope_traditional=True)
    check_parity(model, mx.float32, steps=16)


# ------------------------------------------------------------------------------------
# What is left alone
# ------------------------------------------------------------------------------------
def test_unknown_architecture_untouched():
    mx.random.seed(0)
    args = gemma.ModelArgs(model_type="gemma", hidden_size=64, num_hidden_layers=2,
                           intermediate_size=96, num_attention_heads=4, head_dim=16,
                           rms_norm_eps=1e-5, vocab_size=VOCAB, num_key_value_heads=2)
    model = gemma.Model(args)
    classes = [type(b) for b in model.layers]
    report = mf.patch(model, backend=BACKEND)
    assert not report and report.fused == []
    assert report.skipped[0][0] == "model" and "'gemma' is not supported" in report.skipped[0][1]
    assert [type(b) for b in model.layers] == classes
    assert not lm.is_patched(model)


def test_foreign_block_in_supported_model_untouched():
    model = tiny_model("llama")

    class MyBlock(llama.TransformerBlock):
        pass

    model.model.layers[1].__class__ = MyBlock
    report = mf.patch(model, backend=BACKEND)
    try:
        assert report.patched_blocks == ["model.layers.0"]
        assert "not a known transformer block" in dict(report.skipped)["model.layers.1"]
        assert type(model.model.layers[1]) is MyBlock
    finally:
        mf.unpatch(model)


def test_lora_layer_left_unfused():
    from mlx_lm.tuner.lora import LoRALinear

    model = tiny_model("llama")
    attn = model.model.layers[0].self_attn
    attn.q_proj = LoRALinear.from_base(attn.q_proj, r=4)
    attn.q_proj.lora_b = 0.05 * mx.random.normal(attn.q_proj.lora_b.shape)
    report, stats = check_parity(model, mx.float32, steps=16)
    assert "LoRA" in dict(report.skipped)["model.layers.0.self_attn.q_proj"]
    fused = [p for p, _ in report.fused]
    assert "model.layers.0.self_attn" not in fused
    assert "model.layers.0.mlp" in fused and "model.layers.1.self_attn" in fused
    assert stats["model.layers.0"]["fused attention"] == 0
    assert stats["model.layers.0"]["fused mlp"] >= 16


def test_unsupported_quant_mode_left_unfused():
    model = tiny_model("llama")
    nn.quantize(model, group_size=32, bits=4, mode="mxfp4",
                class_predicate=lambda p, m: p.startswith("model.layers.1.mlp")
                and isinstance(m, nn.Linear))
    report, stats = check_parity(model, mx.float32, steps=16)
    why = dict(report.skipped)["model.layers.1.mlp.gate_proj"]
    assert "'mxfp4'" in why and "affine" in why
    assert "model.layers.1.mlp" not in [p for p, _ in report.fused]
    assert stats["model.layers.1"]["fused mlp"] == 0
    assert stats["model.layers.1"]["fused attention"] >= 16


def test_module_replaced_after_patch_falls_back():
    from mlx_lm.tuner.lora import LoRALinear

    model = tiny_model("llama")
    mf.patch(model, backend=BACKEND)
    try:
        mlp = model.model.layers[0].mlp
        mlp.down_proj = LoRALinear.from_base(mlp.down_proj, r=4)
        model(mx.array([[1]]), cache=lm_cache.make_prompt_cache(model))
        stats = lm.patch_stats(model)["model.layers.0"]
    finally:
        mf.unpatch(model)
    assert stats["original mlp: weights"] == 1 and stats["fused mlp"] == 0


# ------------------------------------------------------------------------------------
# Patch / unpatch mechanics and validation
# ------------------------------------------------------------------------------------
def test_unpatch_restores_exactly():
    model = tiny_model("qwen2", quant=(64, 4))
    before_repr = repr(model)
    classes = [type(b) for b in model.layers]
    keys = [sorted(b.__dict__) for b in model.layers]
    params = dict(_flat(model.parameters()))
    mf.patch(model, backend=BACKEND)
    assert lm.is_patched(model)
    assert repr(model) != before_repr
    # Patching does not add parameters or copy weights.
    after = dict(_flat(model.parameters()))
    assert after.keys() == params.keys() and all(after[k] is params[k] for k in params)
    mf.patch(model, backend=BACKEND)                 # patching twice is idempotent
    assert mf.unpatch(model) == 2
    assert [type(b) for b in model.layers] == classes
    assert [sorted(b.__dict__) for b in model.layers] == keys
    assert repr(model) == before_repr
    assert not lm.is_patched(model)
    assert mf.unpatch(model) == 0


def test_patch_validates_arguments():
    model = tiny_model("llama", layers=1)
    with pytest.raises(TypeError, match="'model'"):
        mf.patch("not a model")
    with pytest.raises(ValueError, match="Unknown backend"):
        mf.patch(model, backend="vulkan")
    with pytest.raises(ValueError, match="'max_rows'"):
        mf.patch(model, max_rows=0)
    with pytest.raises(TypeError, match="'model'"):
        mf.unpatch(None)
    assert not lm.is_patched(model)


def test_lazy_import():
    import subprocess
    import sys

    code = ("import sys, mlx_foundry as mf; assert 'mlx_lm' not in sys.modules; "
            "assert 'mlx_foundry.lm' not in sys.modules; print(mf.patch.__doc__ is not None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


# ------------------------------------------------------------------------------------
# lm_head
# ------------------------------------------------------------------------------------
def test_lm_head_fused_and_restored():
    model = tiny_model("llama", quant=(32, 4))
    cls = type(model.lm_head)
    report = mf.patch(model, backend=BACKEND)
    try:
        assert ("lm_head", "linear (affine 4-bit g32)") in report.fused
        assert type(model.lm_head) is not cls and isinstance(model.lm_head, cls)
        assert len(report.patched_blocks) == 2  # the head is not a block
    finally:
        mf.unpatch(model)
    assert type(model.lm_head) is cls and "_mlx_foundry_head" not in model.lm_head.__dict__
    assert not lm.is_patched(model)


def test_lm_head_option():
    for tie in (False, True):
        model = tiny_model("llama", tie_word_embeddings=tie)
        report = mf.patch(model, backend=BACKEND, lm_head=False)
        stats = lm.patch_stats(model)
        mf.unpatch(model)
        paths = [p for p, _ in report.fused + report.skipped]
        assert "lm_head" not in paths and lm.TIED_HEAD not in paths, paths
        assert "lm_head" not in stats and lm.TIED_HEAD not in stats


@pytest.mark.parametrize("model_type,dtype,quant", [
    ("llama", mx.float32, None), ("qwen3", mx.float16, None), ("llama", mx.float32, (64, 4)),
    ("qwen2", mx.float32, (32, 8)), ("llama", mx.float16, (32, 4)),
])
def test_tied_embeddings_output_projection(model_type, dtype, quant):
    """With tied embeddings (no lm_head) the model's logits come from the embedding's
    as_linear: decode-sized calls run the fused GEMV over the embedding table (dense,
    or quantized like the rest of the model); lookups stay the embedding's own."""
    model = tiny_model(model_type, dtype=dtype, quant=quant, quant_embedding=True,
                       tie_word_embeddings=True)
    assert "lm_head" not in model
    emb = model.model.embed_tokens
    emb_cls = type(emb)
    assert emb_cls is (nn.QuantizedEmbedding if quant else nn.Embedding)
    report, stats = check_parity(model, dtype)
    summary = f"affine {quant[1]}-bit g{quant[0]}" if quant else "dense"
    assert dict(report.fused)[lm.TIED_HEAD].startswith("linear over the tied embeddings ("
                                                       + summary), str(report)
    assert "lm_head" not in dict(report.fused)
    assert stats[lm.TIED_HEAD]["fused"] >= STEPS - 1
    assert fused_calls(stats) >= STEPS
    # Unpatched: the embedding's class and lookups are its own again.
    assert type(emb) is emb_cls and "_mlx_foundry_head" not in emb.__dict__
    assert not lm.is_patched(model)
    ids = mx.array([[1, 5, 9]])
    want = emb(ids)
    mf.patch(model, backend=BACKEND)
    try:
        assert type(model.model.embed_tokens) is not emb_cls
        assert mx.array_equal(model.model.embed_tokens(ids), want).item()
    finally:
        mf.unpatch(model)


@pytest.mark.parametrize("compile_decode", [False, True])
def test_tied_embeddings_new_table_is_picked_up(compile_decode):
    """Loading new embeddings into a patched model with tied embeddings: the fused
    output projection (and the lookups) read the new table, in the compiled step too."""
    model = tiny_model("llama", tie_word_embeddings=True)
    mf.patch(model, backend=BACKEND, compile_decode=compile_decode)
    try:
        greedy(model, 4)
        emb = model.model.embed_tokens
        new = mx.random.normal(emb.weight.shape, key=mx.random.key(7))
        model.load_weights([("model.embed_tokens.weight", new)], strict=False)
        toks, lp = greedy(model, 8)
        stats = lm.patch_stats(model)
    finally:
        mf.unpatch(model)
    want_toks, want_lp = greedy(model, 8)
    assert toks == want_toks
    assert_close(lp, want_lp, mx.float32, k=64, msg="log-probabilities")
    if compile_decode:
        # The new table is seen before the next compiled step, which is traced again.
        assert stats["model"]["traces"] == 2, stats["model"]
    else:
        assert stats[lm.TIED_HEAD]["fused"] >= 8


def test_teacher_forced_choices_match_free_running_greedy():
    """lm_bench.forced_argmax (the bench's per-step token check) agrees with
    generate_step on the model's own greedy tokens, patched and unpatched."""
    from mlx_foundry.lm_bench import forced_argmax, greedy_decode

    model = tiny_model("llama", quant=(32, 4))
    toks, _, margins = greedy_decode(model, PROMPT, 16, margins=True)
    assert forced_argmax(model, PROMPT, toks) == toks
    assert len(margins) == 16 and all(m >= 0 for m in margins)
    mf.patch(model, backend=BACKEND)
    try:
        assert forced_argmax(model, PROMPT, toks) == toks
    finally:
        mf.unpatch(model)


def test_logit_errors_compares_with_float32_and_restores_dtype():
    from mlx_foundry.lm_bench import logit_errors

    model = tiny_model("llama", quant=(32, 4), dtype=mx.float16)
    err = logit_errors(model, PROMPT, 8, backend=BACKEND)
    assert err["steps"] == 8 and set(err) == {"mlx", "patched", "steps"}
    for e in (err["mlx"], err["patched"]):
        assert 0 < e["mean_abs_err"] <= e["max_abs_err"] < 1.0 and e["argmax_agrees"] <= 8
    # The reference backend computes in float32: far closer than MLX's fp16 ops.
    assert err["patched"]["mean_abs_err"] < err["mlx"]["mean_abs_err"]
    assert model.model.norm.weight.dtype == mx.float16 and not lm.is_patched(model)
