"""Wall time of every decoded token, and what tracing costs the compiled step (diagnostics).

``patch(model, compile_decode=True)`` traces its step once per batch size and cache
capacity: the first compiled token, and the first after each growth of the cache
buffers (mlx-lm grows them 256 positions at a time), pays a trace. This tool decodes
``--tokens`` greedy tokens of the Llama-3-8B-shaped random 4-bit model after a
16-token prompt, pipelined as mlx-lm's ``generate_step`` does (``mx.async_eval`` of the
next token before waiting on this one), and records each token's wall time, for the
variants asked for::

    python tools/step_times.py --tokens 600 --variants unpatched ordinary compiled

Per variant it prints the median token, the mean over all tokens (traces included),
and the tokens that took over five medians (the traces) with their times.
"""

import argparse
import json
import pathlib
import statistics
import sys
import time

from decode_breakdown import PATCH_KWARGS, bench_model, under_patch


def decode_times(model, tokens):
    """Per-token wall times (s) of a pipelined greedy decode after a 16-token prompt."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(mx.array([[1] * 16]), cache=cache)
    y = mx.argmax(logits[:, -1, :], axis=-1)
    mx.eval(y)
    times = []
    t = time.perf_counter()
    for _ in range(tokens):
        nxt = mx.argmax(model(y[:, None], cache=cache)[:, -1, :], axis=-1)
        mx.async_eval(nxt)
        mx.eval(y)
        now = time.perf_counter()
        times.append(now - t)
        t, y = now, nxt
    mx.eval(y)
    return times


def summary(times):
    med = statistics.median(times)
    slow = [(i, round(s * 1e3, 2)) for i, s in enumerate(times) if s > 5 * med]
    return {"median_ms": med * 1e3, "mean_ms": statistics.fmean(times) * 1e3,
            "tokens": len(times), "slow_tokens_ms": slow}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=600)
    p.add_argument("--variants", nargs="*", default=list(PATCH_KWARGS),
                   choices=list(PATCH_KWARGS),
                   help="the patched model's ordinary step is 'ordinary' (called 'patched' "
                   "in docs/step_times_h200.json)")
    p.add_argument("--json", default=None)
    p.add_argument("--tiny", action="store_true", help="the bench's tiny Llama (a CPU check)")
    args = p.parse_args()

    model = bench_model(args.tiny)
    res = {}
    for name in args.variants:
        res[name] = summary(under_patch(model, PATCH_KWARGS[name],
                                        lambda m: decode_times(m, args.tokens)))
        print(name, json.dumps(res[name]), flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
