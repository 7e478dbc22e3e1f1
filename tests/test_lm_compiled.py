"""patch(model, compile_decode=True) (the default on the CUDA backend): the whole decode step
as one mx.compile'd function.

On the reference backend (the CPU): the compiled step traces the same blocks, so its
tokens and log-probabilities must match the ordinary patched path (and the unpatched
model, up to the attention's summation order), and every call it cannot take must go
the ordinary way.
"""

import mlx.core as mx
import pytest

pytest.importorskip("mlx_lm")

from mlx_lm.models import cache as lm_cache  # noqa: E402

import mlx_foundry as mf  # noqa: E402
from mlx_foundry import lm  # noqa: E402
from mlx_foundry.kv_cache import KVCache  # noqa: E402
from test_lm_patch import BACKEND, check_parity, greedy, tiny_model  # noqa: E402
from tolerances import assert_close  # noqa: E402


def _counts(model):
    return lm.patch_stats(model)["model"]


def _decode(model, prompt, steps):
    """Greedy tokens and logits, one token per call, with a fresh prompt cache."""
    cache = lm_cache.make_prompt_cache(model)
    logits = model(mx.array([prompt]), cache=cache)[:, -1]
    return _continue(model, cache, logits, steps)


def _continue(model, cache, logits, steps):
    """Greedy one-token calls on from ``logits`` over ``cache``: tokens, logits, cache."""
    toks, outs = [], []
    for _ in range(steps):
        y = mx.argmax(logits, axis=-1)
        toks.append(y.item())
        logits = model(y[:, None], cache=cache)[:, -1]
        outs.append(logits)
    return toks, mx.stack(outs), cache


@pytest.mark.parametrize("model_type, quant, head_dim", [
    ("llama", None, 16), ("llama", (32, 4), 16), ("mistral", (64, 8), 16), ("qwen2", (32, 4), 16),
    ("qwen3", (32, 4), 32), ("qwen3", None, 64)])
def test_compiled_decode_matches_the_ordinary_patched_path(model_type, quant, head_dim):
    model = tiny_model(model_type, dtype=mx.float32, quant=quant, head_dim=head_dim)
    mf.patch(model, backend=BACKEND, compile_decode=False)
    try:
        want_toks, want = greedy(model, 40)
    finally:
        mf.unpatch(model)
    report = mf.patch(model, backend=BACKEND, compile_decode=True)
    try:
        assert report.compiled_decode, str(report)
        toks, got = greedy(model, 40)
        counts = _counts(model)
    finally:
        mf.unpatch(model)
    assert toks == want_toks
    # The attention differs only in its summation over the (masked) capacity.
    assert_close(got, want, mx.float32, k=64, msg="log-probabilities")
    # generate_step computes one token ahead: 41 one-token calls for 40 tokens. The
    # first (a plain mlx-lm cache, switched to the joint cache by the block) prepares
    # the launches; every later one runs compiled.
    assert counts["compiled decode steps"] == 40 and counts["traces"] == 1
    assert counts["decode steps on the ordinary path"] == 0


def test_compiled_decode_with_tied_embeddings():
    """The compiled step traces the model's own __call__, so a tied output projection
    (the embedding's as_linear) is fused inside it too."""
    model = tiny_model("llama", quant=(32, 4), quant_embedding=True, tie_word_embeddings=True)
    want_toks, want = greedy(model, 24)
    report = mf.patch(model, backend=BACKEND, compile_decode=True)
    try:
        assert report.compiled_decode and lm.TIED_HEAD in dict(report.fused), str(report)
        toks, got = greedy(model, 24)
        counts = _counts(model)
        head = lm.patch_stats(model)[lm.TIED_HEAD]
    finally:
        mf.unpatch(model)
    assert toks == want_toks
    assert_close(got, want, mx.float32, k=64, msg="log-probabilities")
    assert counts["compiled decode steps"] == 24 and counts["traces"] == 1
    # Python runs the head's fused call for the first decoded token and once more when
    # the step is traced; the compiled calls replay the trace.
    assert head["fused"] >= 2 and head["original"] == 0


def test_compiled_decode_float16_against_unpatched():
    model = tiny_model("llama", dtype=mx.float16, quant=(32, 4), layers=3)
    check_parity(model, mx.float16, steps=48, patch_kwargs={"compile_decode": True})


def buffer_address(a):
    """Where an array's data lives (a NumPy view of it, no copy). On CUDA, MLX first moves
    a device buffer to unified memory (``Buffer::raw_ptr``); the array keeps that buffer,
    so the address still tells an in-place update from a copy."""
    import numpy as np

    return np.array(a, copy=False).__array_interface__["data"][0]


def in_place_writes(model, steps=8):
    """Per decoded token after the first: how many blocks' joint K/V buffers the step
    wrote in place (the buffer after the step is the one before it), each token
    finished and released before the next is built."""
    cache = lm_cache.make_prompt_cache(model)
    y = mx.argmax(model(mx.array([[1, 5, 9, 2]]), cache=cache)[:, -1], axis=-1)
    y = mx.argmax(model(y[:, None], cache=cache)[:, -1], axis=-1)  # makes the joint buffers
    mx.eval(y)
    kept = []
    for _ in range(steps):
        before = [buffer_address(c.__dict__["_kv"]) for c in cache]
        y = mx.argmax(model(y[:, None], cache=cache)[:, -1], axis=-1)
        # Also wait until the back-end lets go of the token's inputs: MLX's CUDA encoder
        # holds every buffer a kernel read until a worker thread releases it after the
        # kernels finish, and a buffer still held is copied, not updated in place, by
        # the next token's write (a pipelined decode copies so: docs/bench_journal.md, "KV-cache
        # writes copy their buffer in a pipelined decode"). mx.eval alone raced that
        # release on an H100 (session 32: one token of eight copied every block).
        mx.eval(y)
        mx.synchronize()
        kept.append(sum(b == buffer_address(c.__dict__["_kv"]) for b, c in zip(before, cache)))
    return kept, len(cache)


def test_the_compiled_step_writes_the_cache_in_place():
    """Each decoded token's keys and values go into every block's buffer in place: a
    copy would cost a whole buffer per block and token. (An attention over the buffer
    before the write makes MLX copy it: lm_compiled's docstring.)"""
    model = tiny_model("llama", layers=3)
    mf.patch(model, backend=BACKEND, compile_decode=True)
    try:
        kept, blocks = in_place_writes(model)
        counts = _counts(model)
    finally:
        mf.unpatch(model)
    assert counts["compiled decode steps"] == len(kept), counts
    assert kept == [blocks] * len(kept), f"blocks written in place per token: {kept}"
    # Every token after the first compiled one wrote its predecessor (in place, above).
    assert counts["compiled writes of a pending token"] == len(kept) - 1, counts


def test_cache_growth_and_long_contexts():
    """The cache buffer grows on the ordinary path (MLX traces the step again for the
    new capacity); past ONE_PASS_MAX_LEN of capacity the traced attention splits."""
    from mlx_foundry.ops.attention import ONE_PASS_MAX_LEN

    model = tiny_model("llama", layers=2, max_position_embeddings=4096)
    prompt = [(5 * i + 1) % 128 for i in range(ONE_PASS_MAX_LEN - 40)]
    mf.patch(model, backend=BACKEND, compile_decode=False)
    try:
        want_toks, want, _ = _decode(model, prompt, 300)
    finally:
        mf.unpatch(model)
    mf.patch(model, backend=BACKEND, compile_decode=True)
    try:
        toks, got, cache = _decode(model, prompt, 300)
        counts = _counts(model)
    finally:
        mf.unpatch(model)
    assert isinstance(cache[0], KVCache)
    assert cache[0].offset == len(prompt) + 300 and cache[0].keys.shape[2] > ONE_PASS_MAX_LEN
    assert toks == want_toks
    assert_close(got, want, mx.float32, k=64, msg="logits")
    # The first decoded token (ordinary, not counted: a plain mlx-lm cache) makes the
    # joint buffer of 984 + 256 positions; the token at position 1240 grows it (one
    # ordinary call); every other token runs compiled.
    assert counts["decode steps on the ordinary path"] == 1
    assert counts["compiled decode steps"] == 298


def test_the_cache_stays_a_working_mlx_lm_cache():
    """After compiled steps the cache's state is mlx-lm's: keys/values views, offset,
    trimming and a second prompt continue on it."""
    model = tiny_model("llama", layers=2)
    mf.patch(model, backend=BACKEND, compile_decode=True)
    try:
        toks, _, cache = _decode(model, [3, 9, 27], 12)
        # The last token waits for the next compiled token to write it (lm_compiled):
        # counted in offset, not yet in the buffer (zeros there, as the buffer was made).
        for c in cache:
            pending = c.__dict__["_pending"]
            assert pending is not None and pending.shape[2] == 1 and c.offset == 15
            assert not mx.any(c.__dict__["_kv"][:, :, 14]).item()
        # Reading the cache writes it first.
        assert cache[0].offset == 15 and cache[0].keys.shape[2] >= 15
        assert cache[0].__dict__["_pending"] is None
        # The keys and values written by the compiled steps are the ordinary path's.
        mf.unpatch(model)
        mf.patch(model, backend=BACKEND, compile_decode=False)
        _, _, ordinary = _decode(model, [3, 9, 27], 12)
        for a, b in zip(cache, ordinary):
            assert a.offset == b.offset == 15
            assert_close(a.keys[..., :15, :], b.keys[..., :15, :], mx.float32)
            assert_close(a.values[..., :15, :], b.values[..., :15, :], mx.float32)
        lm_cache.trim_prompt_cache(cache, 4)
        assert cache[0].offset == 11
        mf.unpatch(model)
        mf.patch(model, backend=BACKEND, compile_decode=True)
        out = model(mx.array([[5]]), cache=cache)
        out = model(mx.argmax(out[:, -1], -1)[:, None], cache=cache)
        assert cache[0].offset == 13 and out.shape == (1, 1, 128)
    finally:
        mf.unpatch(model)


def test_a_second_prompt_after_compiled_steps_sees_the_pending_token():
    """A multi-token chunk after compiled steps (mlx-lm's own attention, through the
    cache's update_and_fetch) writes the pending token first: its logits and the compiled
    tokens after it match the ordinary patched path's over the same sequence."""
    model = tiny_model("llama", layers=2)

    def run(compiled):
        mf.patch(model, backend=BACKEND, compile_decode=compiled)
        try:
            toks, _, cache = _decode(model, [3, 9, 27], 6)
            chunk = model(mx.array([[5, 6, 7, 8, 9, 10]]), cache=cache)
            more, logits, cache = _continue(model, cache, chunk[:, -1], 5)
            counts = lm.patch_stats(model).get("model", {})
        finally:
            mf.unpatch(model)
        return toks, chunk, more, logits, cache, counts

    want = run(False)
    toks, chunk, more, logits, cache, counts = run(True)
    assert counts["compiled decode steps"] == 6 + 5 - 1, counts  # 6, then 5 after the chunk
    assert toks == want[0] and more == want[2]
    assert_close(chunk, want[1], mx.float32, k=64, msg="the chunk's logits")
    assert_close(logits, want[3], mx.float32, k=64, msg="the logits after it")
    assert cache[0].offset == want[4][0].offset == 3 + 6 + 6 + 5


def test_new_weights_are_picked_up():
    """A compiled step captured the weights: replacing them must not reuse it."""
    model = tiny_model("llama", layers=2)
    mf.patch(model, backend=BACKEND, compile_decode=True)
    try:
        cache = lm_cache.make_prompt_cache(model)
        model(mx.array([[1, 2, 3]]), cache=cache)
        for t in (4, 5, 6):
            mx.eval(model(mx.array([[t]]), cache=cache))
        assert _counts(model)["compiled decode steps"] == 2
        mlp = model.model.layers[1].mlp
        mlp.down_proj.weight = mlp.down_proj.weight * 2
        model.lm_head.weight = -model.lm_head.weight
        got = model(mx.array([[7]]), cache=cache)       # ordinary: prepares again
        got2 = model(mx.array([[8]]), cache=cache)      # compiled: traced again
        counts = _counts(model)
    finally:
        mf.unpatch(model)
    assert counts["traces"] == 2 and counts["compiled decode steps"] == 3
    ref_cache = lm_cache.make_prompt_cache(model)
    model(mx.array([[1, 2, 3]]), cache=ref_cache)
    for t in (4, 5, 6):
        model(mx.array([[t]]), cache=ref_cache)
    want = model(mx.array([[7]]), cache=ref_cache)
    want2 = model(mx.array([[8]]), cache=ref_cache)
    assert_close(got, want, mx.float32, k=64)
    assert_close(got2, want2, mx.float32, k=64)


def test_calls_it_does_not_take():
    model = tiny_model("llama", layers=2)
    mf.patch(model, backend=BACKEND, compile_decode=True)
    try:
        runner = model.__dict__["_mlx_foundry_decode"]
        cache = lm_cache.make_prompt_cache(model)
        model(mx.array([[1, 2, 3]]), cache=cache)          # prefill: not a decode call
        model(mx.array([[4]]), cache=cache)                # first token: plain mlx-lm cache
        assert runner.steps == 0
        model(mx.array([[5]]), cache=cache)
        assert runner.steps == 1
        model(mx.array([[5]]), cache=None)                 # no cache
        model(mx.array([[6]]), cache=cache, input_embeddings=None)
        assert runner.steps == 2
        emb = model.model.embed_tokens(mx.array([[6]]))
        model(mx.array([[6]]), cache=cache, input_embeddings=emb)
        model(mx.array([[1, 2]]), cache=cache)             # two tokens
        rotating = [lm_cache.RotatingKVCache(max_size=64) for _ in range(2)]
        model(mx.array([[1]]), cache=rotating)
        model(mx.array([[1]]), cache=rotating)
        assert runner.steps == 2
    finally:
        mf.unpatch(model)


@pytest.mark.parametrize("model_type, kwargs, why", [
    ("llama", dict(joint_kv=False), "needs joint_kv=True"),
    ("llama", dict(mlp=False), "not every block is fused as a whole"),
    # head_dim 16: qk_norm_rope does not take it, so qwen3 keeps the modules' q/k norms
    ("qwen3", {}, "not every block is fused as a whole"),
])
def test_reported_off_when_the_model_cannot_be_traced(model_type, kwargs, why):
    model = tiny_model(model_type, layers=1)
    report = mf.patch(model, backend=BACKEND, compile_decode=True, **kwargs)
    try:
        assert not report.compiled_decode
        assert any(p == "model" and why in r for p, r in report.skipped), str(report)
        assert "model" not in lm.patch_stats(model)
    finally:
        mf.unpatch(model)


@pytest.mark.parametrize("chosen, compiled", [("reference", False), ("cuda", True),
                                               ("metal", False)])
def test_compile_decode_default_follows_the_backend(monkeypatch, chosen, compiled):
    """compile_decode=None (the default): on where the backend chosen at patch time is
    CUDA (the report lists the compiled step among what was fused), off on the reference
    backend and on Metal (not measured there); an explicit value wins either way."""
    from mlx_foundry import backends

    seen = []

    def choose(backend=None, who="mlx_foundry"):
        seen.append(backend)
        return chosen

    monkeypatch.setattr(backends, "select_backend", choose)
    model = tiny_model("llama", layers=1)
    try:
        report = mf.patch(model)
        assert report.compiled_decode is compiled
        assert ("decode step compiled" in str(report)) is compiled
        assert not [r for p, r in report.skipped if p == "model"]
        assert seen == [None]
        assert mf.patch(model, compile_decode=not compiled).compiled_decode is (not compiled)
        assert seen == [None]  # not consulted when compile_decode is given
    finally:
        mf.unpatch(model)


@pytest.mark.parametrize("backend, compiled", [("reference", False), ("cuda", True)])
def test_compile_decode_default_takes_the_given_backend(backend, compiled):
    model = tiny_model("llama", layers=1)
    try:
        assert mf.patch(model, backend=backend).compiled_decode is compiled
    finally:
        mf.unpatch(model)


def test_a_bad_backend_variable_leaves_the_model_unpatched(monkeypatch):
    """The default resolves the backend before the model changes."""
    from mlx_foundry.backends import ENV_VAR

    model = tiny_model("llama", layers=1)
    cls = type(model)
    monkeypatch.setenv(ENV_VAR, "vulkan")
    with pytest.raises(ValueError, match="vulkan"):
        mf.patch(model)
    assert type(model) is cls and not lm.is_patched(model)


def test_patch_stats_count_the_compiled_steps_as_the_ordinary_path_does():
    """Per block and for the output head, the counters of a compiled decode equal those of
    the same decode on the ordinary step (a trace is not a decoded token)."""
    model = tiny_model("llama", layers=2)
    stats = []
    for compiled in (False, True):
        mf.patch(model, backend=BACKEND, compile_decode=compiled)
        try:
            _decode(model, [3, 9, 27], 12)
            stats.append(lm.patch_stats(model))
        finally:
            mf.unpatch(model)
    ordinary, traced = stats
    assert traced["model"]["compiled decode steps"] == 11, traced["model"]
    for path, counts in ordinary.items():
        assert traced[path] == counts, path
    assert ordinary["lm_head"]["fused"] == 13, ordinary["lm_head"]


def test_unpatch_restores_the_model_class():
    model = tiny_model("qwen2", layers=1)
    cls = type(model)
    report = mf.patch(model, backend=BACKEND, compile_decode=True)
    assert report.compiled_decode and type(model) is not cls
    assert "decode step compiled" in str(report)
    assert mf.unpatch(model) == 1
    assert type(model) is cls and "_mlx_foundry_decode" not in model.__dict__
    assert not lm.is_patched(model)


def test_a_dropped_model_is_freed():
    """A dropped patched model is freed: nothing of its compiled step keeps it (or its
    weights) alive."""
    import gc
    import weakref

    model = tiny_model("llama", layers=1)
    mf.patch(model, backend=BACKEND, compile_decode=True)
    cache = lm_cache.make_prompt_cache(model)
    model(mx.array([[1, 2]]), cache=cache)
    for t in (3, 4, 5):
        mx.eval(model(mx.array([[t]]), cache=cache))
    assert lm.patch_stats(model)["model"]["compiled decode steps"] == 2
    ref = weakref.ref(model)
    del model, cache
    gc.collect()
    assert ref() is None


def test_a_block_that_cannot_be_traced_falls_back(monkeypatch):
    """A block whose launches are missing while the step is traced makes that token take
    the ordinary path (same logits), and the runner traces again on a later token."""
    from mlx_foundry import lm_compiled

    model = tiny_model("llama", layers=2)
    mf.patch(model, backend=BACKEND, compile_decode=False)
    want = [model(mx.array([[t]]), cache=c) for c in [lm_cache.make_prompt_cache(model)]
            for t in (1, 2, 3)][-1]
    mf.unpatch(model)
    mf.patch(model, backend=BACKEND, compile_decode=True)
    real = lm.traced_block
    calls = []

    def fail_once(block, plan, x, cache):
        calls.append(plan.path)
        if len(calls) == 1:
            raise lm_compiled._NotTraceable(plan.path)
        return real(block, plan, x, cache)

    monkeypatch.setattr(lm, "traced_block", fail_once)
    try:
        cache = lm_cache.make_prompt_cache(model)
        model(mx.array([[1]]), cache=cache)               # ordinary: prepares the launches
        got = model(mx.array([[2]]), cache=cache)         # tracing fails: ordinary path
        runner = model.__dict__["_mlx_foundry_decode"]
        assert runner.steps == 0 and runner._fn is None
        assert cache[0].offset == 2 and cache[0].__dict__["_kv"] is not None
        got = model(mx.array([[3]]), cache=cache)         # traced again: compiled
        assert runner.steps == 1 and runner.traces == 2
    finally:
        mf.unpatch(model)
    assert_close(got, want, mx.float32, k=64)
