"""Does the KV-cache write update its buffer in place in a pipelined decode? (diagnostics)

MLX writes an array in place (a slice update, ``put_along_axis``) only when nothing else
holds its buffer; the kernels of a token still running on the GPU hold every buffer they
read until they finish. ``mlx_lm.generate_step`` builds and encodes token t+1 while
token t runs, so each block whose cache write is encoded before token t finished copies
its whole cache buffer instead. This tool decodes greedily through ``generate_step``
(the bench's decode) and records, per token, the peak memory over the active memory at
the previous token's yield: a copied buffer shows there as its size::

    python tools/cache_copies.py --prompts 16 2000 --tokens 136 --rounds 2 --json out.json

Per variant (unpatched, the patched ordinary step, the compiled step) and prompt length
it prints the median token time, tokens/s, the median and largest per-token peak, and
how many tokens had a peak over 0.5 MB. ``--tiny`` runs the bench's tiny Llama (a CPU
check of the tool; the CPU backend holds buffers the same way).
"""

import argparse
import json
import pathlib
import statistics
import sys

BENCH_PROMPT = [128000, 791, 6864, 315, 9822, 374, 12366, 13, 578, 6864, 315, 9635, 374,
                220, 16, 11]
SKIP = 8  # tokens dropped at the start (the compiled step traces on its first token)


def decode_peaks(model, prompt, tokens):
    """Per-token wall times (s) and peaks (bytes over the active memory at the previous
    token's yield) of a greedy ``generate_step`` decode."""
    import time

    import mlx.core as mx
    from mlx_lm.generate import generate_step

    peaks, times = [], []
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    for _ in generate_step(mx.array(prompt), model, max_tokens=tokens):
        times.append(time.perf_counter())
        peaks.append(mx.get_peak_memory() - base)
        mx.reset_peak_memory()
        base = mx.get_active_memory()
    return times, peaks


def summary(times, peaks):
    if len(times) < SKIP + 2:
        raise ValueError(f"[cache_copies] need more than {SKIP + 1} tokens, got {len(times)}.")
    t, p = times[SKIP:], [b / 1e6 for b in peaks[SKIP:]]
    gaps = [b - a for a, b in zip(t, t[1:])]
    return {"median_ms": round(statistics.median(gaps) * 1e3, 3),
            "tok_s": round((len(t) - 1) / (t[-1] - t[0]), 1),
            "peak_mb_median": round(statistics.median(p), 2),
            "peak_mb_max": round(max(p), 2),
            "tokens_with_peak_over_0.5mb": sum(x > 0.5 for x in p), "tokens": len(p)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", nargs="+", type=int, default=[16, 2000],
                   help="prompt lengths (16: the bench's prompt)")
    p.add_argument("--tokens", type=int, default=136)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--variants", nargs="*", default=["unpatched", "ordinary", "compiled"],
                   choices=["unpatched", "ordinary", "compiled"])
    p.add_argument("--json", default=None)
    p.add_argument("--tiny", action="store_true", help="the bench's tiny Llama (a CPU check)")
    args = p.parse_args()
    from decode_breakdown import PATCH_KWARGS, bench_model, under_patch

    model = bench_model(args.tiny)
    vocab = model.args.vocab_size
    res = {}
    for n in args.prompts:
        prompt = ([t % vocab for t in BENCH_PROMPT] if n == len(BENCH_PROMPT)
                  else [1 + (i * 37) % (vocab - 1) for i in range(n)])
        for r in range(args.rounds):
            for name in args.variants:
                def run(m):
                    decode_peaks(m, prompt, SKIP)  # warm-up: compiles, traces
                    return summary(*decode_peaks(m, prompt, args.tokens))
                key = f"prompt {n} {name} round {r}"
                res[key] = under_patch(model, PATCH_KWARGS[name], run)
                print(key, json.dumps(res[key]), flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
