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
it prints the median token time, tokens/s, one block's cache buffer, the median and
largest per-token peak, and how many tokens peaked at one block's buffer or more (a
token's own temporaries count there too). ``--tiny`` runs the bench's tiny Llama (a CPU
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


def block_buffer_bytes(cache):
    """Bytes of the first block's cache buffer(s): what one block's copy allocates."""
    c = cache[0]
    kv = c.__dict__.get("_kv")  # mlx_foundry's joint K/V buffer
    if kv is not None:
        return kv.nbytes
    return c.keys.nbytes + c.values.nbytes


def decode_peaks(model, prompt, tokens):
    """A greedy ``generate_step`` decode: per token, its time stamp (``perf_counter``, s)
    and its peak (bytes over the active memory at the previous token's yield); and the
    bytes of one block's cache buffer at the end."""
    import time

    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    peaks, stamps = [], []
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    for _ in generate_step(mx.array(prompt), model, max_tokens=tokens, prompt_cache=cache):
        stamps.append(time.perf_counter())
        peaks.append(mx.get_peak_memory() - base)
        mx.reset_peak_memory()
        base = mx.get_active_memory()
    return stamps, peaks, block_buffer_bytes(cache)


def summary(stamps, peaks, block_bytes):
    """Median token time, tokens/s and the peaks past the first :data:`SKIP` tokens.

    A peak of one block's buffer or more is what a copy would show, but a token's
    temporaries count too (unpatched mlx-lm's attention at long contexts): read the
    count of such tokens beside the median peak and ``block_mb``.
    """
    if len(stamps) != len(peaks):
        raise ValueError(f"[cache_copies.summary] 'stamps' and 'peaks' must have one entry "
                         f"per token but have {len(stamps)} and {len(peaks)}.")
    if len(stamps) < SKIP + 2:
        raise ValueError(f"[cache_copies.summary] 'stamps' must hold more than {SKIP + 1} "
                         f"tokens but holds {len(stamps)}.")
    t, p = stamps[SKIP:], peaks[SKIP:]
    gaps = [b - a for a, b in zip(t, t[1:])]
    return {"median_ms": round(statistics.median(gaps) * 1e3, 3),
            "tok_s": round((len(t) - 1) / (t[-1] - t[0]), 1),
            "block_mb": round(block_bytes / 1e6, 2),
            "peak_mb_median": round(statistics.median(p) / 1e6, 2),
            "peak_mb_max": round(max(p) / 1e6, 2),
            "tokens_with_peak_of_a_block": sum(x >= block_bytes for x in p),
            "tokens": len(p)}


def main(argv=None):
    from decode_breakdown import PATCH_KWARGS, bench_model, under_patch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", nargs="+", type=int, default=[16, 2000],
                   help="prompt lengths (16: the bench's prompt)")
    p.add_argument("--tokens", type=int, default=136)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--variants", nargs="*", default=list(PATCH_KWARGS),
                   choices=list(PATCH_KWARGS))
    p.add_argument("--json", default=None)
    p.add_argument("--tiny", action="store_true", help="the bench's tiny Llama (a CPU check)")
    args = p.parse_args(argv)
    if args.tokens < SKIP + 2:
        p.error(f"--tokens must be at least {SKIP + 2} (the first {SKIP} are dropped)")
    if any(n < 1 for n in args.prompts):
        p.error("--prompts must be positive lengths")

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
    return res


if __name__ == "__main__":
    main()
    sys.exit(0)
