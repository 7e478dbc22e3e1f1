"""End-to-end decode: an mlx-lm Llama-3-8B-shaped 4-bit model, patched vs unpatched.

Calls :func:`mlx_foundry.lm_bench.decode_benchmark` (both variants in the same
process), once as :func:`mlx_foundry.patch` patches by default (on the CUDA backend: the
compiled decode step) and once with ``compile_decode=False`` (the ordinary step); each
result says which step the patched model ran (``compiled_step``).  On the reference
backend the model is a tiny llama, so the command runs on a CPU in seconds.  A missing
or failing ``decode_benchmark`` turns into a skipped case with its reason, never an
exception.
"""

import inspect

TINY_LLAMA = dict(model_type="llama", hidden_size=128, num_hidden_layers=2,
                  intermediate_size=320, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=256, rms_norm_eps=1e-5, rope_theta=500000.0,
                  max_position_embeddings=512, tie_word_embeddings=False)


def _accepted(fn, kwargs):
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def long_prompt(n, vocab):
    """``n`` fixed token ids in ``[1, vocab)``: a long prompt for the decode benchmark."""
    return [(7 * i + 3) % (vocab - 1) + 1 for i in range(n)]


def run_decode(ctx, *, tiny, dtype=None, patch_kwargs=None, batch=None, prompt_len=None):
    """Run the decode benchmark (with ``batch``: :func:`batch_decode_benchmark`, that many
    sequences decoded together; with ``prompt_len``: after a prompt of that many tokens,
    :func:`long_prompt`); returns a case-result fragment (see report.py).

    Keys: ``status`` (``"ok"``/``"skipped"``/``"error"``), ``reason``,
    ``baseline_us``/``ours_us`` (per token), ``speedup``, ``baseline_tok_s``,
    ``ours_tok_s``, ``tokens_equal``.
    """
    try:
        from mlx_foundry.lm_bench import batch_decode_benchmark, decode_benchmark
    except (ImportError, AttributeError) as e:
        return {"status": "skipped", "reason": f"mlx_foundry.lm_bench.decode_benchmark "
                                               f"unavailable: {e}"}
    kwargs = {"backend": ctx.backend, "steps": 8 if tiny else (32 if ctx.quick else 128),
              "warmup": 2 if tiny else 4, "repeats": 1 if (tiny or ctx.quick) else 3}
    bench_fn = decode_benchmark
    if batch:
        kwargs["batch"] = batch
        bench_fn = batch_decode_benchmark
    if tiny:
        kwargs["config"] = TINY_LLAMA
    if prompt_len:
        from mlx_foundry.lm_bench import LLAMA3_8B

        vocab = (TINY_LLAMA if tiny else LLAMA3_8B)["vocab_size"]
        kwargs["prompt"] = long_prompt(prompt_len, vocab)
    if dtype is not None:
        kwargs["dtype"] = dtype
    if patch_kwargs:
        kwargs["patch_kwargs"] = patch_kwargs
    call = _accepted(bench_fn, kwargs)
    if tiny and "config" not in call:
        return {"status": "skipped",
                "reason": "decode_benchmark takes no 'config': the 8B model is not run on CPU"}
    try:
        r = bench_fn(**call)
    except ImportError as e:  # mlx-lm absent: the `lm` extra is optional
        return {"status": "skipped", "reason": f"decode_benchmark needs mlx-lm: {e}"[:400]}
    except Exception as e:  # noqa: BLE001 - a failure of the run, never a crash
        return {"status": "error", "reason": f"decode_benchmark failed: "
                                             f"{type(e).__name__}: {e}"[:400]}
    base, ours = _tok_s(r, ("unpatched_tok_s", "baseline_tok_s")), _tok_s(
        r, ("patched_tok_s", "ours_tok_s"))
    if not base or not ours:
        return {"status": "skipped",
                "reason": f"decode_benchmark returned no tokens/s (keys: {sorted(r)})"}
    out = {"status": "ok", "baseline_us": 1e6 / base, "ours_us": 1e6 / ours,
           "speedup": ours / base, "baseline_tok_s": base, "ours_tok_s": ours,
           "tokens_equal": r.get("tokens_equal"),
           "forced_disagreements": r.get("forced_disagreements"),
           "smallest_unpatched_margin": r.get("smallest_unpatched_margin"),
           "compiled_step": r.get("compiled_decode")}
    from mlx_foundry.lm_bench import same_tokens_up_to_ties

    ok, why = same_tokens_up_to_ties(r)
    out["tokens_check"] = why
    if not ok:
        out["status"] = "error"
        out["reason"] = f"patched greedy tokens differ from unpatched: {why}"
    elif not r.get("tokens_equal"):
        out["reason"] = why
    return out


def _tok_s(r, keys):
    for k in keys:
        v = r.get(k) if isinstance(r, dict) else None
        if isinstance(v, (int, float)) and v == v and v > 0:
            return float(v)
    return None
