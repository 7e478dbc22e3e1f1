"""Patched decode on the GPU: a Llama-3-8B-shaped random 4-bit model.

64 greedy tokens must be identical patched (fused kernels on the GPU backend)
and unpatched (mlx-lm as is); tokens/s of both go to
``$MLX_FOUNDRY_RESULTS_DIR/lm_decode.json`` when that variable is set.
"""

import mlx.core as mx
import pytest

pytest.importorskip("mlx_lm")

from mlx_foundry import lm  # noqa: E402
from mlx_foundry.lm_bench import LLAMA3_8B, decode_benchmark  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _on_gpu(gpu_backend):
    prev = mx.default_device()
    mx.set_default_device(mx.gpu)
    yield
    mx.set_default_device(prev)


def test_llama3_8b_shape_4bit_greedy_tokens(gpu_backend):
    result = decode_benchmark(steps=64, backend=gpu_backend, warmup=4)
    print(f"\nunpatched {result['unpatched_tok_s']:.1f} tok/s, patched "
          f"{result['patched_tok_s']:.1f} tok/s ({result['speedup']:.2f}x) on "
          f"{result['device']}")
    assert result["fused_blocks"] == 32, result["report"]
    # The default patch on CUDA: decoded tokens run through the compiled step (each of
    # its steps runs every block's attention and MLP fused).
    assert ("decode step compiled" in result["report"]) is (gpu_backend == "cuda")
    assert result["fused_calls_first_block"].get("fused attention", 0) >= 64
    _assert_same_tokens_up_to_ties(result)


def _assert_same_tokens_up_to_ties(result):
    from mlx_foundry.lm_bench import same_tokens_up_to_ties

    ok, why = same_tokens_up_to_ties(result)
    print(why)
    assert ok, f"{why}: {result['unpatched_tokens']} vs {result['patched_tokens']}"


@pytest.mark.parametrize("model_type,bits,group_size,dtype", [
    ("llama", 4, 64, mx.float16), ("llama", 8, 32, mx.float16), ("qwen2", 4, 128, mx.float16),
    ("qwen3", 6, 64, mx.float16),
    # bf16 models (most mlx-lm checkpoints of bf16 models): the packed-half path for 4 and
    # 8 bits, the float path for 6; greedy tokens judged with bf16's tie and float32
    ("llama", 4, 64, mx.bfloat16), ("qwen3", 8, 64, mx.bfloat16), ("llama", 6, 64, mx.bfloat16),
], ids=lambda v: {mx.float16: "f16", mx.bfloat16: "bf16"}.get(v, str(v)))
@pytest.mark.parametrize("compile_decode", [None, False], ids=["default", "ordinary"])
def test_small_models_greedy_tokens(gpu_backend, model_type, bits, group_size, dtype,
                                    compile_decode):
    """Smaller shapes, other architectures, formats and dtypes (fast; no results file), on
    the default (the compiled step on CUDA) and on the ordinary step."""
    cfg = dict(LLAMA3_8B, model_type=model_type, hidden_size=1024, num_hidden_layers=4,
               intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4,
               vocab_size=32000, head_dim=64, rope_scaling=None)
    result = decode_benchmark(steps=32, backend=gpu_backend, config=cfg, bits=bits,
                              group_size=group_size, dtype=dtype, results_dir="", warmup=2,
                              patch_kwargs={"compile_decode": compile_decode})
    assert result["fused_blocks"] == 4, result["report"]
    assert ("decode step compiled" in result["report"]) is (gpu_backend == "cuda"
                                                            and compile_decode is None)
    _assert_same_tokens_up_to_ties(result)


@pytest.mark.parametrize("bits,group_size", [(4, 64), (8, 32)])
def test_tied_embeddings_greedy_tokens(gpu_backend, bits, group_size):
    """A model with tied embeddings (like Llama-3.2-1B or the small Qwen models): the
    logits come from the fused GEMV over the quantized embedding table."""
    cfg = dict(LLAMA3_8B, hidden_size=1024, num_hidden_layers=4, intermediate_size=2816,
               num_attention_heads=16, num_key_value_heads=4, vocab_size=32003, head_dim=64,
               rope_scaling=None, tie_word_embeddings=True)
    result = decode_benchmark(steps=32, backend=gpu_backend, config=cfg, bits=bits,
                              group_size=group_size, results_dir="", warmup=2)
    assert result["fused_blocks"] == 4, result["report"]
    assert lm.TIED_HEAD in result["report"], result["report"]
    _assert_same_tokens_up_to_ties(result)


def test_decode_attention_greedy_tokens(gpu_backend):
    """patch(decode_attention=True): the attention of every decoded token runs through
    ops.decode_attention over the joint cache; same tokens as unpatched."""
    cfg = dict(LLAMA3_8B, hidden_size=1024, num_hidden_layers=4, intermediate_size=2816,
               num_attention_heads=16, num_key_value_heads=4, vocab_size=32000, head_dim=64,
               rope_scaling=None)
    ordinary = {"decode_attention": True, "compile_decode": False}  # the ordinary step's
    result = decode_benchmark(steps=48, backend=gpu_backend, config=cfg, results_dir="",
                              warmup=2, patch_kwargs=ordinary)
    assert result["fused_blocks"] == 4, result["report"]
    _assert_same_tokens_up_to_ties(result)
    # The decoded tokens took the decode attention launch in every block.
    from mlx_foundry.lm_bench import random_quantized_model
    from mlx_lm.models.cache import make_prompt_cache

    model = random_quantized_model(config=cfg, bits=4, group_size=64)
    lm.patch(model, backend=gpu_backend, **ordinary)
    try:
        cache = make_prompt_cache(model)
        mx.eval(model(mx.array([[1] * 16]), cache=cache))
        for t in (3, 4, 5):
            mx.eval(model(mx.array([[t]]), cache=cache))
        for block in model.model.layers:
            slots = [s.attend for s in block.__dict__[lm._PLAN_ATTR].steps.values()]
            launches = [s[1] for s in slots if s]
            assert launches and all(p.backend == gpu_backend for p in launches)
    finally:
        lm.unpatch(model)


@pytest.mark.parametrize("model_type,bits,group_size", [("llama", 4, 64), ("qwen2", 8, 32),
                                                        ("qwen3", 4, 64)])
def test_compile_decode_greedy_tokens(gpu_backend, model_type, bits, group_size):
    """patch(compile_decode=True): every decoded token after the first runs through the
    compiled step (put_along_axis cache write, decode_attention with the length on the
    device). Same tokens as unpatched up to ties over 128 steps; over 300 steps (a
    growth of the cache buffer) the same tokens and log-probabilities as the ordinary
    path with the same attention kernel (decode_attention=True), within one fp16 unit
    in the last place."""
    from mlx_foundry.lm_bench import random_quantized_model
    from mlx_lm.generate import generate_step

    cfg = dict(LLAMA3_8B, model_type=model_type, hidden_size=1024, num_hidden_layers=4,
               intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4,
               vocab_size=32000, head_dim=64, rope_scaling=None)
    result = decode_benchmark(steps=128, backend=gpu_backend, config=cfg, bits=bits,
                              group_size=group_size, results_dir="", warmup=2,
                              patch_kwargs={"compile_decode": True})
    assert result["fused_blocks"] == 4, result["report"]
    assert "decode step compiled" in result["report"], result["report"]
    _assert_same_tokens_up_to_ties(result)

    model = random_quantized_model(config=cfg, bits=bits, group_size=group_size)
    prompt = mx.array([(13 * i + 5) % 32000 for i in range(16)])
    runs = []
    # decode_attention=True in both: the tokens the compiled step leaves to the ordinary
    # path (the first decoded token, the growth of the buffer) attend with the same
    # kernel as the compiled ones, not MLX's attention.
    for kw in ({"decode_attention": True, "compile_decode": False},
               {"decode_attention": True, "compile_decode": True}):
        lm.patch(model, backend=gpu_backend, **kw)
        try:
            toks, lps = zip(*generate_step(prompt, model, max_tokens=300))
            runs.append(([int(t) for t in toks], mx.stack(lps)))
            stats = lm.patch_stats(model)
        finally:
            lm.unpatch(model)
    assert stats["model"]["compiled decode steps"] >= 298
    assert runs[1][0] == runs[0][0]
    assert mx.allclose(runs[1][1], runs[0][1], rtol=0, atol=2 ** -7).item()


def small_llama():
    """A 4-block Llama-3-shaped random 4-bit model (hidden 1024, GQA 16/4, head_dim 64)."""
    from mlx_foundry.lm_bench import random_quantized_model

    cfg = dict(LLAMA3_8B, hidden_size=1024, num_hidden_layers=4, intermediate_size=2816,
               num_attention_heads=16, num_key_value_heads=4, vocab_size=32000, head_dim=64,
               rope_scaling=None)
    return random_quantized_model(config=cfg, bits=4, group_size=64)


def test_compile_decode_runs_compiled(gpu_backend):
    from mlx_lm.models.cache import make_prompt_cache

    model = small_llama()
    lm.patch(model, backend=gpu_backend, compile_decode=True)
    try:
        cache = make_prompt_cache(model)
        y = mx.argmax(model(mx.array([[1] * 16]), cache=cache)[:, -1], -1)
        for _ in range(6):
            y = mx.argmax(model(y[:, None], cache=cache)[:, -1], -1)
        mx.eval(y)
        counts = lm.patch_stats(model)["model"]
    finally:
        lm.unpatch(model)
    assert counts["compiled decode steps"] == 5 and counts["traces"] == 1


def test_compiled_step_writes_the_cache_in_place(gpu_backend):
    """As on the CPU (tests/test_lm_compiled.py): every block's buffer is updated in
    place, one token after another (each evaluated before the next)."""
    from test_lm_compiled import in_place_writes

    model = small_llama()
    lm.patch(model, backend=gpu_backend, compile_decode=True)
    try:
        kept, blocks = in_place_writes(model)
        counts = lm.patch_stats(model)["model"]
    finally:
        lm.unpatch(model)
    assert counts["compiled decode steps"] == len(kept), counts
    assert kept == [blocks] * len(kept), f"blocks written in place per token: {kept}"


def test_fused_logits_at_least_as_close_to_float32_as_mlx(gpu_backend):
    """The fused fp16 decode rounds less often than MLX's unfused ops: its logits must
    be at least as close to a float32 decode of the same model (within 10%)."""
    from mlx_foundry.lm_bench import logit_errors, random_quantized_model

    cfg = dict(LLAMA3_8B, hidden_size=1024, num_hidden_layers=4, intermediate_size=2816,
               num_attention_heads=16, num_key_value_heads=4, vocab_size=32000)
    model = random_quantized_model(cfg)
    err = logit_errors(model, [1, 2, 3, 5, 8, 13, 21, 34], 32, backend=gpu_backend)
    print(f"\n{err}")
    assert err["patched"]["mean_abs_err"] <= 1.1 * err["mlx"]["mean_abs_err"], err
    assert err["patched"]["max_abs_err"] <= 1.5 * err["mlx"]["max_abs_err"], err


@pytest.mark.parametrize("patch_kwargs", [{"compile_decode": False}, {}],
                         ids=["ordinary", "compile_decode"])
def test_batch_decode_matches(gpu_backend, patch_kwargs):
    """Three sequences decoded together, patched against unpatched: the same greedy
    choices and logits within 5% of their range; with compile_decode every decoded
    token after the first runs through one trace for batch 3."""
    from mlx_lm.models import cache as lm_cache

    from mlx_foundry.lm_bench import random_quantized_model

    cfg = dict(LLAMA3_8B, hidden_size=1024, num_hidden_layers=2, intermediate_size=2816,
               num_attention_heads=16, num_key_value_heads=4, vocab_size=32000)
    model = random_quantized_model(cfg)
    prompt = mx.array([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 18]])

    def run():
        cache = lm_cache.make_prompt_cache(model)
        logits = model(prompt, cache=cache)[:, -1]
        outs = [logits]
        for _ in range(8):
            tok = mx.argmax(outs[-1], axis=-1)[:, None]
            outs.append(model(tok, cache=cache)[:, -1])
        return mx.stack(outs).astype(mx.float32)

    ref = run()
    lm.patch(model, backend=gpu_backend, **patch_kwargs)
    try:
        out = run()
        stats = lm.patch_stats(model)
    finally:
        lm.unpatch(model)
    if not patch_kwargs and gpu_backend == "cuda":  # the default: compiled on CUDA
        assert stats["model"]["compiled decode steps"] == 7, stats["model"]
        assert stats["model"]["traces"] == 1, stats["model"]
    else:
        # decode steps (the 18-row prompt: original)
        assert stats["model.layers.0"]["fused attention"] == 8
    assert mx.array_equal(mx.argmax(out, -1), mx.argmax(ref, -1)).item()
    err = mx.abs(out - ref).max().item()
    assert err < 0.05 * mx.abs(ref).max().item(), err


@pytest.mark.parametrize("draft_kind", ["self", "other"])
def test_speculative_decoding_matches(gpu_backend, draft_kind):
    """mlx-lm's speculative decoding with a patched main model on the GPU: every verify
    step (the last token and 3 drafts: 4 rows of x at an offset, causal mask) runs the
    fused kernels for several rows of x, rejected drafts trim the cache, and the tokens
    are the unpatched ones up to ties. The main model as its own draft (patched too: its
    one-row drafts checked by its four-row verify steps) has nearly every draft accepted;
    a one-block model of another seed has most rejected. Then one verify chunk
    teacher-forced: its 4 rows' choices MLX's, their logits within 5% of MLX's largest."""
    from mlx_lm.generate import speculative_generate_step
    from mlx_lm.models.cache import make_prompt_cache

    from mlx_foundry.lm_bench import FP16_TIE, random_quantized_model

    cfg = dict(LLAMA3_8B, hidden_size=1024, num_hidden_layers=2, intermediate_size=2816,
               num_attention_heads=16, num_key_value_heads=4, vocab_size=32000)
    model = random_quantized_model(cfg)
    draft = (model if draft_kind == "self"
             else random_quantized_model(dict(cfg, num_hidden_layers=1), seed=1))
    # Six tokens: the prompt, too, runs fused (at most PREFILL_ROWS rows).
    prompt = mx.array([(13 * i + 5) % 32000 for i in range(6)])
    max_tokens = 24

    def run():
        gen = speculative_generate_step(prompt, model, draft, num_draft_tokens=3,
                                        max_tokens=max_tokens)
        return [(int(tok), bool(from_draft)) for tok, _, from_draft in gen]

    def verify_chunk():
        cache = make_prompt_cache(model)
        mx.eval(model(prompt[None], cache=cache))
        return model(mx.array([[7, 1000, 2000, 3000]]), cache=cache)[0].astype(mx.float32)

    ref, ref_logits = run(), verify_chunk()
    lm.patch(model, backend=gpu_backend)
    try:
        got, logits = run(), verify_chunk()
        stats = lm.patch_stats(model)["model.layers.0"]
    finally:
        lm.unpatch(model)
    got_toks, ref_toks = [t for t, _ in got], [t for t, _ in ref]
    assert len(got) == len(ref) == max_tokens
    first = next((i for i, (a, b) in enumerate(zip(got_toks, ref_toks)) if a != b), None)
    if first is not None:
        # Greedy choices may part at a tie (one fp16 step between the top two logits):
        # the unpatched model, fed the same tokens, must see one there.
        fed = mx.array([prompt.tolist() + ref_toks[:first]])
        last = model(fed)[0, -1].astype(mx.float32)
        gap = abs(last[ref_toks[first]] - last[got_toks[first]]).item()
        assert gap <= FP16_TIE, (first, gap, got, ref)
    elif draft_kind == "other":
        # The unpatched draft saw the same tokens, so it proposed the same drafts: the
        # same ones must have been accepted.
        assert got == ref, (got, ref)
    # Judged on each run: the patched one-row drafts and four-row verify steps agree
    # (a tie may flip one choice), and the other draft's proposals are mostly rejected.
    for run in (ref, got):
        accepted = sum(f for _, f in run)
        if draft_kind == "self":
            assert accepted >= max_tokens * 3 // 4 - 1, run
        else:
            assert accepted < max_tokens // 2, run
    # Every call of the main model went through the fused path (the 6-token prompt and
    # each verify step: one per token of the main model's own), none through the original.
    assert not [key for key in stats if key.startswith("original")], stats
    assert stats["fused attention"] >= sum(not f for _, f in got), stats
    assert mx.array_equal(mx.argmax(logits, -1), mx.argmax(ref_logits, -1)).item()
    err = mx.abs(logits - ref_logits).max().item()
    assert err < 0.05 * mx.abs(ref_logits).max().item(), err
