"""Generate text with an mlx-lm model, unpatched and then patched by mlx_foundry.

Loads a local mlx-lm model directory (or a Hugging Face repo id mlx-lm can load),
streams greedy text twice — as mlx-lm runs it, then with the decode path fused by
``mlx_foundry.patch`` — and prints tokens/s for both and whether the tokens agree.

Run it::

    python examples/generate.py --model ~/models/Llama-3.2-1B-Instruct-4bit \\
        --prompt "Write a haiku about GPUs." --max-tokens 128
    python examples/generate.py --model ./qwen3-0.6b --backend reference   # any machine
"""

import argparse
import time

import mlx.core as mx


def stream(model, tokenizer, prompt, max_tokens, label):
    """Greedy-stream ``max_tokens`` tokens; returns (tokens, decode tokens/s)."""
    from mlx_lm import stream_generate

    print(f"\n--- {label} ---", flush=True)
    tokens, last = [], None
    for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
        print(r.text, end="", flush=True)
        tokens.append(r.token)
        last = r
    print(flush=True)
    tps = last.generation_tps if last is not None else float("nan")
    print(f"[{label}] prompt {last.prompt_tps:.1f} tok/s, decode {tps:.1f} tok/s, "
          f"peak memory {last.peak_memory:.2f} GB", flush=True)
    return tokens, tps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="mlx-lm model directory (or repo id)")
    p.add_argument("--prompt", default="Explain in three sentences why fused kernels make "
                   "decoding faster.")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--compile-decode", choices=["auto", "on", "off"], default="auto",
                   nargs="?", const="on",
                   help="the compiled decode step (patch(..., compile_decode=...)); auto "
                   "(the default): on for the CUDA backend; the bare flag: on")
    p.add_argument("--backend", default=None, choices=["metal", "cuda", "reference"],
                   help="backend of the fused ops (default: automatic)")
    p.add_argument("--no-chat-template", action="store_true",
                   help="send the prompt as raw text")
    args = p.parse_args(argv)

    from mlx_lm import load

    import mlx_foundry as mf

    t0 = time.perf_counter()
    model, tokenizer = load(args.model)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f} s on {mx.default_device()}")
    prompt = args.prompt
    if not args.no_chat_template and getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                               add_generation_prompt=True)

    stream(model, tokenizer, prompt, 4, "warm-up")
    ref_tokens, ref_tps = stream(model, tokenizer, prompt, args.max_tokens, "mlx-lm")

    compile_decode = {"auto": None, "on": True, "off": False}[args.compile_decode]
    report = mf.patch(model, backend=args.backend, compile_decode=compile_decode)
    print(f"\n{report}")
    try:
        stream(model, tokenizer, prompt, 4, "warm-up (compiles the fused kernels)")
        tokens, tps = stream(model, tokenizer, prompt, args.max_tokens, "mlx_foundry")
    finally:
        mf.unpatch(model)

    same = tokens == ref_tokens
    first = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), None)
    print(f"\ndecode: mlx-lm {ref_tps:.1f} tok/s, patched {tps:.1f} tok/s "
          f"({tps / ref_tps:.2f}x); tokens {'identical' if same else f'differ from {first}'}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
