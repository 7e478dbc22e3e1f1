"""Decode benchmark: greedy tokens and tokens/s of an mlx-lm model, unpatched vs patched.

The default model is Llama-3-8B-shaped (hidden 4096, 32 layers, intermediate
14336, 32 heads, 8 KV heads, vocab 128256) with random MLX affine 4-bit
weights, built directly in quantized form (no dense copy is ever
materialized), one layer at a time.

Both runs happen in the same process on the same device; the result holds the
ratio.  Tokens/s counts decode steps only (the prompt is excluded): the time
from the first generated token to the last, divided by the tokens in between.
"""

import json
import math
import os
import time

import mlx.core as mx
import mlx.nn as nn

LLAMA3_8B = dict(model_type="llama", hidden_size=4096, num_hidden_layers=32,
                 intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
                 max_position_embeddings=8192, tie_word_embeddings=False,
                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192})

__all__ = ["LLAMA3_8B", "FP16_TIE", "BF16_TIE", "tie_of", "decode_benchmark",
           "batch_decode_benchmark", "random_quantized_model", "greedy_decode", "forced_argmax", "logit_errors",
           "same_tokens_up_to_ties"]


def _random_affine(module, bits, group_size, std, dtype, key):
    """Fill a quantized module with random packed weights, scales and biases (in place).

    ``w = scale * q + bias`` with ``q`` uniform in ``[0, 2^bits)``; the bias
    centres ``q`` so weights have mean ~0 and standard deviation ~``std``.
    """
    out_dims = module.weight.shape[0]
    k = module.weight.shape[1] * 32 // bits
    groups = k // group_size
    k1, k2, k3 = mx.random.split(key, 3)
    levels = 2 ** bits
    q_std = math.sqrt((levels ** 2 - 1) / 12.0)
    s = (std / q_std) * (1.0 + 0.1 * mx.random.normal((out_dims, groups), key=k1))
    shape = module.weight.shape
    hi = mx.random.randint(0, 1 << 16, shape, dtype=mx.uint32, key=k2)
    lo = mx.random.randint(0, 1 << 16, shape, dtype=mx.uint32, key=k3)
    module.weight = (hi << 16) | lo
    module.scales = s.astype(dtype)
    module.biases = (-s * (levels - 1) / 2).astype(dtype)


def random_quantized_model(config=None, *, bits=4, group_size=64, dtype=mx.float16, seed=0,
                           logit_scale=4.0):
    """A random mlx-lm llama-family model in MLX affine quantized form.

    Args:
        config (dict, optional): mlx-lm ``ModelArgs`` fields. Default: :data:`LLAMA3_8B`.
        bits (int): weight bits. Default: ``4``.
        group_size (int): quantization group size. Default: ``64``.
        dtype (Dtype): activation / scale dtype. Default: ``mx.float16``.
        seed (int): random seed. Default: ``0``.
        logit_scale (float): standard deviation of the logits (a clear argmax
            keeps greedy decoding stable under rounding). Default: ``4.0``.

    Returns:
        nn.Module: the model, evaluated.
    """
    from mlx_lm.models import llama, qwen2, qwen3

    cfg = dict(LLAMA3_8B if config is None else config)
    mod = {"llama": llama, "mistral": llama, "qwen2": qwen2, "qwen3": qwen3}[cfg["model_type"]]
    model = mod.Model(mod.ModelArgs.from_dict(cfg))         # lazy: nothing materialized
    nn.quantize(model, group_size=group_size, bits=bits)  # lazy quantize graphs, dropped below
    key = mx.random.key(seed)
    hidden = cfg["hidden_size"]

    def fill(module, std):
        nonlocal key
        key, sub = mx.random.split(key)
        _random_affine(module, bits, group_size, std, dtype, sub)

    fill(model.model.embed_tokens, 1.0)
    mx.eval(model.model.embed_tokens.parameters())
    for layer in model.model.layers:
        for name, m in layer.named_modules():
            if isinstance(m, nn.QuantizedLinear):
                k_in = m.weight.shape[1] * 32 // bits
                fill(m, 1.0 / math.sqrt(k_in))
                if "bias" in m:
                    key, sub = mx.random.split(key)
                    m.bias = (0.1 * mx.random.normal(m.bias.shape, key=sub)).astype(dtype)
        layer.set_dtype(dtype)
        mx.eval(layer.parameters())
    if hasattr(model, "lm_head"):
        fill(model.lm_head, logit_scale / math.sqrt(hidden))
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def greedy_decode(model, prompt, steps, *, margins=False):
    """Greedy tokens through ``mlx_lm.generate.generate_step`` and decode tokens/s.

    Args:
        margins (bool): also return, per step, the log-probability gap between the
            chosen token and the runner-up (computed after the timed loop).

    Returns:
        (list of int, float[, list of float]): the tokens, tokens/s over the decode
        steps[, the margins].
    """
    from mlx_lm.generate import generate_step

    tokens, times, logps = [], [], []
    for tok, lp in generate_step(mx.array(prompt), model, max_tokens=steps):
        tokens.append(int(tok))
        times.append(time.perf_counter())
        if margins:
            logps.append(lp)
    tok_s = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")
    if not margins:
        return tokens, tok_s
    return tokens, tok_s, [float(_top2_gap(lp.astype(mx.float32).reshape(-1))) for lp in logps]


def _top2_gap(lp):
    """The gap between the two largest values over the last axis."""
    top2 = mx.topk(lp, 2, axis=-1)
    return mx.max(top2, axis=-1) - mx.min(top2, axis=-1)


PREFILL_STEP = 2048
"""``mlx_lm.generate.generate_step``'s default ``prefill_step_size``."""


def _forced_logits(model, prompt, tokens, *, prefill_step_size=PREFILL_STEP):
    """Float32 logits of the model fed ``prompt`` and then ``tokens`` through its KV cache
    (teacher forcing): row ``i`` is the step that chooses ``tokens[i]``.

    The prompt goes in as ``mlx_lm.generate.generate_step`` feeds it (which
    :func:`greedy_decode` runs): all but its last token in chunks of
    ``prefill_step_size`` (the cache evaluated after each), then the last token alone,
    whose logits choose the first token. So every row, the first included, comes from a
    one-token decode step, the path a patched model's fused decode takes, as in the
    free-running decode compared with; the whole prompt at once would give row 0 from
    the many-row prefill path (MLX's matmuls) instead.
    """
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    rest = mx.array(prompt)
    while rest.size > 1:
        n = min(prefill_step_size, rest.size - 1)
        model(rest[:n][None], cache=cache)
        mx.eval([c.state for c in cache])
        rest = rest[n:]
    out = []
    for step in [rest] + [mx.array([t]) for t in tokens[:-1]]:
        out.append(model(step[None], cache=cache)[0, -1].astype(mx.float32))
        mx.eval(out[-1])
    return mx.stack(out)


def _log_softmax32(logits):
    """Log-probabilities of ``logits`` over the last axis, in float32."""
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def forced_argmax(model, prompt, tokens):
    """The model's greedy choice at every step when fed ``tokens`` (teacher forcing).

    Every step, the one choosing the first token included (the prompt's last token),
    runs one token at a time through the model's KV cache, as in ``generate_step``, so
    a patched model takes its fused decode path; a free-running comparison stops being
    informative after the first differing token, this one compares every step.
    """
    return mx.argmax(_forced_logits(model, prompt, tokens), axis=-1).tolist()


FP16_TIE = 2.0 ** -6
"""Two tokens whose fp16 log-probabilities are this close are a tie (two units in the
last place at |logprob| in [8, 16)): any other summation order may break it the other
way, and a greedy run that breaks it differently goes on with other tokens."""

BF16_TIE = 2.0 ** -3
""":data:`FP16_TIE` for bfloat16 models: two bf16 units in the last place at |logprob| in
[8, 16) (bf16 keeps 8 significant bits to fp16's 11)."""


def tie_of(dtype):
    """The log-probability gap below which a model of activation ``dtype`` has a tie."""
    return BF16_TIE if dtype == mx.bfloat16 else FP16_TIE


def _model_dtype(model):
    """The dtype of the model's first floating-point parameter (its activations')."""
    from mlx.utils import tree_flatten

    for _, v in tree_flatten(model.parameters()):
        if mx.issubdtype(v.dtype, mx.floating):
            return v.dtype
    return mx.float32


def _float32_forced_logits(model, prompt, tokens):
    """:func:`_forced_logits` of the model with float32 activations and scales (its own
    parameters are put back afterwards, whatever their dtypes)."""
    saved = model.parameters()
    model.set_dtype(mx.float32)
    try:
        return _forced_logits(model, prompt, tokens)
    finally:
        model.update(saved)


def _settled(gap, f32_gap, tie):
    """Whether a choice that differs from the unpatched one is no error.

    ``gap``: the unpatched model's log-probability of its own choice minus that of the
    patched choice, at that step (its own arithmetic); ``f32_gap``: the same with the
    model run in float32. Settled where the unpatched model itself puts the two within
    ``tie`` (its rounding could have chosen either), or float32 arithmetic prefers the
    patched choice or puts the two within ``tie``. A missing gap (``None``) settles
    nothing: a result of an older version, which kept only the unpatched top-2 gap, is
    judged by float32 alone.
    """
    return ((gap is not None and gap <= tie)
            or (f32_gap is not None and f32_gap <= tie))


def same_tokens_up_to_ties(result, tie=None):
    """Whether a :func:`decode_benchmark` (or :func:`batch_decode_benchmark`) result chose
    the unpatched tokens everywhere except at ties.

    Judged are every teacher-forced disagreement (``forced_disagreements``) and the
    first free-running mismatch (if any). Each must be a tie of the unpatched model
    between its own choice and the patched one: its log-probability of the unpatched
    choice minus that of the patched choice (``unpatched_gap``,
    ``first_mismatch_unpatched_gap``) at most ``tie``. Not a tie of its two best tokens
    (``unpatched_margin``, ``first_mismatch_margin``, reported only): where those are
    tied, a patched choice further down is still an error. Else the model run in
    float32 judges: it must prefer the patched choice or put the two within ``tie``
    (``float32_gap``: its log-probability of the unpatched choice minus the patched
    one's). And disagreements must be rare: at most one per 32 steps, not counting
    those where float32 prefers the patched choice.

    Args:
        tie (float, optional): Default: the result's ``tie``, else :data:`FP16_TIE`.

    Returns:
        (bool, str): the verdict and a one-line explanation.
    """
    tie = result.get("tie", FP16_TIE) if tie is None else tie
    forced = result.get("forced_disagreements") or []
    steps = len(result.get("unpatched_tokens") or []) or 1
    clear = [d for d in forced
             if not _settled(d.get("unpatched_gap"), d.get("float32_gap"), tie)]
    if clear:
        return False, (f"fed the unpatched tokens, the patched model chose another token "
                       f"where the unpatched model clearly preferred its own: {clear[:4]}")
    # Rare, but for the steps where float32 prefers the patched choice: the unpatched
    # decode's own rounding chose there.
    own = [d for d in forced if not (d.get("float32_gap") is not None and d["float32_gap"] < 0)]
    if len(own) > max(1, steps // 32):
        return False, f"{len(own)} teacher-forced disagreements in {steps} steps"
    if not result.get("tokens_equal"):
        gap = result.get("first_mismatch_unpatched_gap")
        g = result.get("first_mismatch_float32_gap")
        if not _settled(gap, g, tie):
            return False, (f"greedy tokens differ from step {result.get('first_mismatch')} "
                           f"where the unpatched model preferred its choice to the patched "
                           f"one by {gap} (top-2 gap {result.get('first_mismatch_margin')})"
                           + ("" if g is None else f" and float32 by {g:.3g}"))
        how = (f"a tie (unpatched gap to the patched choice {gap:.3g})"
               if gap is not None and gap <= tie else
               f"where float32 finds the patched choice as good (gap {g:.3g})")
        return True, (f"greedy tokens differ from step {result['first_mismatch']}, {how}; "
                      f"teacher-forced, the choices differ only at ties or where float32 "
                      f"agrees ({len(forced)} of {steps} steps)")
    return True, "identical greedy tokens"


def logit_errors(model, prompt, steps, *, backend=None):
    """How far MLX's fp16 decode and the patched fp16 decode are from float32.

    The unpatched greedy tokens are fed (one token per step, through the KV cache)
    to the model unpatched, patched, and with float32 activations (the model is
    restored to its dtype afterwards); every step's logits are compared with the
    float32 ones.

    Returns:
        dict: ``{"mlx": {...}, "patched": {...}}`` with ``max_abs_err``,
        ``mean_abs_err`` and ``argmax_agrees`` (steps whose argmax is float32's).
    """
    from .lm import patch, unpatch

    tokens, _ = greedy_decode(model, prompt, steps)
    mlx16 = _forced_logits(model, prompt, tokens)
    patch(model, backend=backend)
    try:
        ours16 = _forced_logits(model, prompt, tokens)
    finally:
        unpatch(model)
    ref = _float32_forced_logits(model, prompt, tokens)
    out = {}
    for name, lg in (("mlx", mlx16), ("patched", ours16)):
        d = mx.abs(lg - ref)
        out[name] = {"max_abs_err": float(d.max()), "mean_abs_err": float(d.mean()),
                     "argmax_agrees": int((mx.argmax(lg, -1) == mx.argmax(ref, -1)).sum())}
    out["steps"] = len(tokens)
    return out


def _device_label():
    """The GPU's name when the default device is a GPU, else the device (a label only)."""
    device = str(mx.default_device())
    try:
        if mx.default_device() == mx.gpu:
            return str(mx.device_info().get("device_name", device))
    except Exception:  # noqa: BLE001 - older MLX or no device info
        pass
    return device


def decode_benchmark(model=None, *, steps=64, prompt=None, backend=None, warmup=4,
                     repeats=1, results_dir=None, config=None, bits=4, group_size=64,
                     dtype=mx.float16, patch_kwargs=None):
    """Greedy-decode unpatched and patched; compare tokens and tokens/s.

    Args:
        model (nn.Module, optional): an mlx-lm model. Default: a random
            Llama-3-8B-shaped model (:func:`random_quantized_model`).
        steps (int): tokens to generate. Default: ``64``.
        prompt (list of int, optional): prompt tokens, each in ``[0, vocab_size)``.
            Default: 16 fixed ids.
        backend (str, optional): backend of the fused ops. Default: automatic.
        warmup (int): tokens generated before timing each variant (kernels
            compile on first use). Default: ``4``.
        repeats (int): timed rounds, each one run unpatched then one patched; the best
            of each variant is reported. Default: ``1``.
        results_dir (str, optional): write ``lm_decode.json`` there (``""``: write
            nothing). Default: ``$MLX_FOUNDRY_RESULTS_DIR`` if set and the model is
            the default Llama-3-8B-shaped one.
        config, bits, group_size, dtype: for the random model.
        patch_kwargs (dict, optional): further arguments of :func:`mlx_foundry.patch`
            (``decode_attention=True``, ...).

    Greedy decoding amplifies rounding at ties: where the unpatched model's two best
    tokens are within fp16 resolution, any other summation order may pick the other
    one, and the runs part ways. So besides the free-running comparison the result
    holds a per-step check: the patched model fed the unpatched tokens, its choice at
    every step. Where it differs, the unpatched model (fed the same tokens) tells how
    much it preferred its own choice to the patched one: its log-probability gap between
    the two (float32 log-softmax of its logits). Where that gap is past a tie (bf16
    rounds each op's output to 8 significant bits, the unpatched decode included) the
    model run in float32 is the judge: its gap between the two choices. Every compared
    step, the first included, is a one-token decode step (:func:`_forced_logits`).

    Returns:
        dict: ``tokens_equal``, ``tie`` (:func:`tie_of` the model's dtype),
        ``first_mismatch`` (the first step where the free-running tokens differ),
        ``first_mismatch_unpatched_gap`` (there, the unpatched model's log-probability
        of its choice minus that of the patched choice: the judge),
        ``first_mismatch_margin`` (there, the unpatched top-2 gap: reported only),
        ``first_mismatch_float32_gap`` (float32's gap between the two choices, where
        the unpatched gap is past ``tie``), ``forced_disagreements``
        (``[{"step", "unpatched_token", "patched_token", "unpatched_gap",
        "unpatched_margin", "float32_gap"}]``: the teacher-forced steps where the
        choices differ, with the same gaps), ``smallest_unpatched_margin`` (the
        smallest unpatched top-2 gap over all steps), ``unpatched_tok_s``,
        ``patched_tok_s``, ``speedup``, ``device``, ``report``, ``compiled_decode``
        (whether the patched model ran the compiled decode step), ... All gaps are
        log-probability differences; :func:`same_tokens_up_to_ties` gives the verdict.
    """
    from .lm import patch, patch_stats, unpatch

    t0 = time.perf_counter()
    random_model = model is None
    if model is None:
        model = random_quantized_model(config, bits=bits, group_size=group_size, dtype=dtype)
    build_s = time.perf_counter() - t0
    vocab = model.args.vocab_size
    if prompt is None:
        prompt = [128000, 791, 6864, 315, 9822, 374, 12366, 13, 578, 6864, 315, 9635, 374,
                  220, 16, 11]
        prompt = [t % vocab for t in prompt]
    else:
        # An id past the vocabulary would read past the embedding table (MLX's gather does
        # not check), and both decodes would run on whatever memory lies there.
        bad = [t for t in prompt if not 0 <= int(t) < vocab]
        if bad:
            raise ValueError(f"[decode_benchmark] 'prompt' ids must be in [0, {vocab}) (the "
                             f"model's vocabulary) but {len(bad)} are not, e.g. {bad[0]}.")

    def run():
        if warmup:
            greedy_decode(model, prompt, warmup)
        return greedy_decode(model, prompt, steps)

    # Unpatched and patched alternate, round by round (the host's speed drifts over a
    # run; measured on the H100 leases: the unpatched decode alone moved between 5.5 and
    # 10 ms per token within minutes). Each round patches anew and warms up first, so
    # the timed tokens never include preparing launches or tracing.
    ref_tps = tps = 0.0
    for r in range(max(1, repeats)):
        ref_tokens, t = run()
        ref_tps = max(ref_tps, t)
        report = patch(model, backend=backend, **(patch_kwargs or {}))
        try:
            tokens, t = run()
            tps = max(tps, t)
            if r == max(1, repeats) - 1:
                stats = {k: dict(v) for k, v in patch_stats(model).items()}
                forced = forced_argmax(model, prompt, ref_tokens)
        finally:
            unpatch(model)
    # The unpatched model fed its own greedy tokens, in the same one-token steps as its
    # free-running decode: its log-probabilities (float32) at every step. From them its
    # top-2 gaps (reported) and, wherever a patched choice differs, the gap between its
    # own choice and the patched one (the judge: a tie of its two best tokens says
    # nothing about a patched choice further down).
    ref_lp = _log_softmax32(_forced_logits(model, prompt, ref_tokens))
    ref_margins = _top2_gap(ref_lp).tolist()

    def unpatched_gap(i, other):
        return float(ref_lp[i, ref_tokens[i]] - ref_lp[i, other])

    # Steps where the patched model, fed the unpatched tokens, chooses another token.
    disagree = [(i, a) for i, (a, b) in enumerate(zip(forced, ref_tokens)) if a != b]
    mismatch = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), None)
    if mismatch is None and len(tokens) != len(ref_tokens):
        mismatch = min(len(tokens), len(ref_tokens))
    mismatch_margin = (None if mismatch is None or mismatch >= len(ref_margins)
                       else ref_margins[mismatch])
    # Up to the first mismatch both runs chose the same tokens: the unpatched forced pass
    # saw the patched run's context there too.
    first_unpatched_gap = (None if mismatch is None or mismatch >= min(len(tokens),
                                                                       len(ref_tokens))
                           else unpatched_gap(mismatch, tokens[mismatch]))
    # Float32 arithmetic judges every teacher-forced disagreement: its gap between the
    # unpatched and the patched choice (the unpatched decode rounds too, bf16 most of
    # all); the first mismatch where the unpatched model's gap is past a tie.
    tie = tie_of(_model_dtype(model))
    # The teacher-forced choices and the free-running first mismatch are judged apart:
    # at one step they may be different tokens.
    judge_first = first_unpatched_gap is not None and first_unpatched_gap > tie
    f32_gap, first_gap = {}, None
    if disagree or judge_first:
        lp = _float32_forced_logits(model, prompt, ref_tokens)
        f32_gap = {i: float(lp[i, ref_tokens[i]] - lp[i, a]) for i, a in disagree}
        if judge_first:
            first_gap = float(lp[mismatch, ref_tokens[mismatch]] - lp[mismatch, tokens[mismatch]])
    device = _device_label()
    first = next(iter(stats.values()), {})
    result = {
        "device": device,
        "backend": backend or "auto",
        "model": {k: model.args.__dict__.get(k) for k in (
            "model_type", "hidden_size", "num_hidden_layers", "intermediate_size",
            "num_attention_heads", "num_key_value_heads", "vocab_size")},
        "bits": bits if random_model else None,
        "group_size": group_size if random_model else None,
        "steps": steps,
        "prompt_tokens": len(prompt),
        "tokens_equal": mismatch is None,
        "tie": tie,
        "first_mismatch": mismatch,
        "first_mismatch_margin": mismatch_margin,
        "first_mismatch_unpatched_gap": first_unpatched_gap,
        "first_mismatch_float32_gap": first_gap,
        "forced_disagreements": [
            dict({"step": i, "unpatched_token": ref_tokens[i], "patched_token": a,
                  "unpatched_gap": unpatched_gap(i, a), "unpatched_margin": ref_margins[i]},
                 **({"float32_gap": f32_gap[i]} if i in f32_gap else {}))
            for i, a in disagree],
        "smallest_unpatched_margin": min(ref_margins) if ref_margins else None,
        "unpatched_tokens": ref_tokens,
        "patched_tokens": tokens,
        "unpatched_tok_s": ref_tps,
        "patched_tok_s": tps,
        "speedup": tps / ref_tps if ref_tps else None,
        "fused_blocks": len(report.patched_blocks),
        "fused_calls_first_block": first,
        "report": str(report),
        "compiled_decode": report.compiled_decode,
        "build_s": build_s,
    }
    if results_dir is None and random_model and config is None:
        # Only the reference model's numbers go to the shared results file.
        results_dir = os.environ.get("MLX_FOUNDRY_RESULTS_DIR")
    if results_dir:
        os.makedirs(results_dir, exist_ok=True)
        with open(os.path.join(results_dir, "lm_decode.json"), "w") as f:
            json.dump(result, f, indent=2)
    return result


def _batch_greedy(model, prompts, steps, warmup, *, margins=False, against=None):
    """Greedy-decode the rows of ``prompts`` together through one KV cache.

    Each step's graph is built while the device runs the previous one (as
    ``mlx_lm.generate.generate_step`` does). Returns the chosen tokens
    ``[1 + warmup + steps][B]`` (the prompt's, then one per decode step), seconds per
    step over the last ``steps`` steps, and with ``margins`` the top-2
    log-probability gap of the logits that chose each of those tokens (computed in the
    same loop, so that run is not timed meaningfully). With ``margins`` and ``against``
    (tokens ``[1 + warmup + steps][B]`` of another run, e.g. the patched one) also, per
    step and sequence, this run's log-probability of its own choice minus that of
    ``against``'s token at that step (float32 log-softmax).
    """
    from mlx_lm.models.cache import make_prompt_cache

    def choose(logits):
        y = mx.argmax(logits, axis=-1)
        toks.append(y)
        if margins:
            lp = _log_softmax32(logits)
            gaps.append(_top2_gap(lp))
            if against is not None:
                other = mx.array(against[len(toks) - 1])[:, None]
                to.append((mx.take_along_axis(lp, y[:, None], axis=-1)
                           - mx.take_along_axis(lp, other, axis=-1))[:, 0])
        return y

    cache = make_prompt_cache(model)
    toks, gaps, to = [], [], []
    y = choose(model(mx.array(prompts), cache=cache)[:, -1])
    t0 = None
    for i in range(warmup + steps):
        if i == warmup:
            mx.eval(y)
            t0 = time.perf_counter()
        y = choose(model(y[:, None], cache=cache)[:, -1])
        mx.async_eval(y, *gaps[-1:], *to[-1:])
    mx.eval(y)
    per_step = (time.perf_counter() - t0) / steps
    tokens = [t.tolist() for t in toks]
    if not margins:
        return tokens, per_step
    if against is None:
        return tokens, per_step, [g.tolist() for g in gaps]
    return tokens, per_step, [g.tolist() for g in gaps], [g.tolist() for g in to]


def batch_decode_benchmark(model=None, *, batch=4, steps=48, warmup=4, repeats=3,
                           prompt_len=16, backend=None, config=None, bits=4, group_size=64,
                           dtype=mx.float16, patch_kwargs=None):
    """Decode ``batch`` sequences together, unpatched and patched; tokens/s and tokens.

    The rows of ``x`` in every decode step are the sequences of the batch: the patched
    model runs them through its fused GEMVs, which read each block of weights once for
    several rows (``MBLOCK``). Unpatched and patched alternate, round by round, each
    patched round patching anew; the best round of each is reported. Greedy choices are
    compared step by step: at the first step where a sequence differs, the unpatched
    model must have put its own choice and the patched one within a tie (its
    log-probability gap between the two at most :func:`tie_of` the model's dtype), or
    float32 arithmetic must find the patched choice as good, for every sequence (they
    decode independently).

    Args:
        model (nn.Module, optional): an mlx-lm model. Default: the random
            Llama-3-8B-shaped model of :func:`random_quantized_model`.
        batch (int): sequences decoded together. Default: ``4``.
        steps (int): timed decode steps (each gives ``batch`` tokens). Default: ``48``.
        warmup (int): decode steps before timing (kernels compile on first use).
        repeats (int): alternating rounds. Default: ``3``.
        prompt_len (int): tokens of every prompt (the prompts differ). Default: ``16``.
        backend, config, bits, group_size, dtype, patch_kwargs: as :func:`decode_benchmark`.

    Returns:
        dict: ``batch``, ``unpatched_tok_s`` and ``patched_tok_s`` (tokens of all
        sequences per second), ``speedup``, ``unpatched_step_ms``, ``patched_step_ms``,
        ``tokens_equal``, ``first_mismatch`` (the first step where a sequence
        differs), ``first_mismatch_unpatched_gap`` (the largest, over every differing
        sequence's first differing step, of the unpatched model's log-probability of its
        choice minus that of the patched choice: the judge), ``first_mismatch_margin``
        (the largest unpatched top-2 gap there: reported only),
        ``first_mismatch_float32_gap`` (the largest float32 gap over the sequences whose
        unpatched gap is past ``tie``), ``tie``, ``sequences_differing``,
        ``unpatched_tokens``, ``patched_tokens`` (``[step][sequence]``),
        ``forced_disagreements`` (empty: no teacher-forced pass), ``device``.
    """
    from .lm import patch, unpatch

    for name, v in (("batch", batch), ("steps", steps)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"[batch_decode_benchmark] '{name}' must be a positive int but "
                             f"got {v!r}.")
    if model is None:
        model = random_quantized_model(config, bits=bits, group_size=group_size, dtype=dtype)
    vocab = model.args.vocab_size
    prompts = [[(97 * b + 31 * i + 1) % vocab for i in range(prompt_len)]
               for b in range(batch)]
    ref_step = ours_step = float("inf")
    for _ in range(max(1, repeats)):
        ref_tokens, t = _batch_greedy(model, prompts, steps, warmup)
        ref_step = min(ref_step, t)
        compiled = patch(model, backend=backend, **(patch_kwargs or {})).compiled_decode
        try:
            tokens, t = _batch_greedy(model, prompts, steps, warmup)
            ours_step = min(ours_step, t)
        finally:
            unpatch(model)
    # The unpatched run once more (its tokens are ref_tokens), now also giving at every
    # step and sequence its top-2 gap (reported) and its log-probability gap between its
    # own choice and the patched run's token (the judge). Computed in the same loop: no
    # further pass. At a sequence's first differing step both runs had fed it the same
    # tokens (and each sequence decodes independently of the others), so that gap is the
    # unpatched model's preference at the patched run's context.
    _, _, margins, gaps_to = _batch_greedy(model, prompts, steps, warmup, margins=True,
                                           against=tokens)
    # Each sequence's first differing step, and the unpatched gap there: the verdict
    # takes the largest, so every sequence must part ways at a tie.
    firsts = []
    for j in range(batch):
        i = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a[j] != b[j]),
                 None)
        if i is not None:
            firsts.append((gaps_to[i][j], i, j, margins[i][j]))
    mismatch = min(f[1] for f in firsts) if firsts else None
    gap = max(f[0] for f in firsts) if firsts else None
    margin = max(f[3] for f in firsts) if firsts else None
    # Past a tie, float32 arithmetic judges (as in decode_benchmark), on the sequence
    # alone: its gap between the unpatched and the patched choice at that step.
    tie = tie_of(_model_dtype(model))
    f32_gaps = []
    for g, i, j, _ in firsts:
        if g > tie:
            lp = _float32_forced_logits(model, prompts[j], [t[j] for t in ref_tokens[:i + 1]])
            f32_gaps.append(float(lp[i, ref_tokens[i][j]] - lp[i, tokens[i][j]]))
    device = _device_label()
    return {
        "device": device,
        "backend": backend or "auto",
        "batch": batch,
        "steps": steps,
        "prompt_tokens": prompt_len,
        "unpatched_step_ms": ref_step * 1e3,
        "patched_step_ms": ours_step * 1e3,
        "unpatched_tok_s": batch / ref_step,
        "patched_tok_s": batch / ours_step,
        "speedup": ref_step / ours_step,
        "tokens_equal": mismatch is None,
        "tie": tie,
        "first_mismatch": mismatch,
        "first_mismatch_unpatched_gap": gap,
        "first_mismatch_margin": margin,
        "first_mismatch_float32_gap": max(f32_gaps) if f32_gaps else None,
        "sequences_differing": sorted(f[2] for f in firsts),
        "forced_disagreements": [],
        "unpatched_tokens": ref_tokens,
        "patched_tokens": tokens,
        "compiled_decode": compiled,
    }
