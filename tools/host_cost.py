"""The Python cost of mlx_foundry's CUDA launches, measured without a GPU (diagnostics).

MLX builds a lazy graph in Python and encodes it in C++; on the decode paths the host
can be the limit (docs/bench_journal.md). This tool measures the Python part on any machine:
``mx.fast.cuda_kernel`` is replaced by a stand-in whose call returns lazy zeros of the
declared outputs, and the CUDA backend is marked available, so the ops and a patched
mlx-lm model take their CUDA code paths (argument checks, binding, launch-plan lookup,
prepared launches) up to the MLX kernel call, which is not measured. Nothing runs on a
GPU and no kernel is compiled::

    python tools/host_cost.py ops                 # us per call of each decode op
    python tools/host_cost.py decode --layers 32  # us per decoded token, 32 blocks
    python tools/host_cost.py ops --profile qkv   # cProfile of one op's calls

``decode`` builds a small random Llama (the Python cost of a block does not depend on
its dimensions) and times ``model(token, cache=cache)`` per token, unpatched and
patched, evaluating the cache between timings so that the lazy graph does not grow.
"""

import argparse
import cProfile
import pstats
import statistics
import sys
import time

import mlx.core as mx


def fake_cuda():
    """Route mlx_foundry's CUDA backend to a stand-in kernel object (see the module doc)."""
    from mlx_foundry import backends
    from mlx_foundry.backends import cuda

    def factory(**_):
        def call(*, inputs, output_shapes, output_dtypes, grid, threadgroup, template=None,
                 init_value=None, verbose=False, stream=None):
            return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]
        return call

    backends._probe()
    backends._available["cuda"] = True
    cuda.INSTALL_PRELUDE = False  # nothing is compiled: write no header into MLX
    mx.fast.cuda_kernel = factory


def _weight(n, k, key):
    from mlx_foundry.ops.weights import Weight

    w = mx.random.normal((n, k), key=mx.random.key(key)).astype(mx.float16)
    return Weight(*mx.quantize(w, group_size=64, bits=4), group_size=64, bits=4)


def op_calls(hidden=1024, inter=2048, head_dim=64):
    """``{name: callable}``: one call of each decode op (and MLX's own ops for scale)."""
    from mlx_foundry import ops

    heads, kv = hidden // head_dim, max(1, hidden // head_dim // 4)
    x = mx.random.normal((1, hidden), key=mx.random.key(0)).astype(mx.float16)
    r = mx.random.normal((1, hidden), key=mx.random.key(1)).astype(mx.float16)
    g = mx.ones((hidden,), mx.float16)
    wu, wg, wo, wd = (_weight(inter, hidden, 2), _weight(inter, hidden, 3),
                      _weight(hidden, hidden, 4), _weight(hidden, inter, 5))
    wq, wk, wv = (_weight(heads * head_dim, hidden, 6), _weight(kv * head_dim, hidden, 7),
                  _weight(kv * head_dim, hidden, 8))
    xi = mx.random.normal((1, inter), key=mx.random.key(9)).astype(mx.float16)
    return {
        "linear": lambda: ops.linear(x, wu, backend="cuda"),
        "o_proj+residual": lambda: ops.linear(x, wo, residual=r, backend="cuda"),
        "down+residual": lambda: ops.linear(xi, wd, residual=r, backend="cuda"),
        "gate_up": lambda: ops.norm_gate_up_swiglu(x, g, 1e-5, wg, wu, backend="cuda"),
        "qkv": lambda: ops.norm_qkv_rope(x[None], g, 1e-5, wq, wk, wv, n_heads=heads,
                                         n_kv_heads=kv, head_dim=head_dim, offset=7,
                                         rope_base=500000.0, backend="cuda"),
        "rms_norm": lambda: ops.rms_norm(x, g, 1e-5, backend="cuda"),
        "mlx quantized_matmul": lambda: mx.quantized_matmul(
            x, wu.weight, wu.scales, wu.biases, transpose=True, group_size=64, bits=4),
        "mlx rms_norm": lambda: mx.fast.rms_norm(x, g, 1e-5),
    }


def time_calls(fn, calls=2000, repeats=5):
    """Median microseconds per call of ``fn`` (graph building only; nothing evaluated)."""
    for _ in range(50):
        fn()
    per = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        per.append((time.perf_counter() - t) / calls * 1e6)
    return statistics.median(per)


def decode_model(layers=32, patched=True):
    """A small random 4-bit Llama with ``layers`` blocks, primed with a 16-token prompt:
    ``(model, cache, token)``; patched for the CUDA backend when ``patched``, on the ordinary
    step (``compile_decode=False``: the compiled step builds no graph in Python)."""
    import mlx_foundry
    from decode_breakdown import primed
    from mlx_foundry.lm_bench import random_quantized_model

    config = dict(model_type="llama", hidden_size=256, num_hidden_layers=layers,
                  intermediate_size=512, num_attention_heads=8, num_key_value_heads=2,
                  vocab_size=512, rms_norm_eps=1e-5, rope_theta=500000.0,
                  max_position_embeddings=4096, tie_word_embeddings=False)
    model = random_quantized_model(config=config)
    if patched:
        mlx_foundry.patch(model, backend="cuda", compile_decode=False)
    return (model, *primed(model))


def time_tokens(model, cache, token, tokens=100, warmup=5):
    """Median microseconds of Python per decoded token (``model(token, cache=cache)``)."""
    per = []
    for i in range(warmup + tokens):
        t = time.perf_counter()
        out = model(token, cache=cache)
        dt = time.perf_counter() - t
        mx.eval(out, [c.state for c in cache])  # untimed: keeps the lazy graph short
        if i >= warmup:
            per.append(dt * 1e6)
    return statistics.median(per)


def _profile(fn, calls, top=25):
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(top)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    o = sub.add_parser("ops", help="microseconds of Python per op call")
    o.add_argument("--calls", type=int, default=2000)
    o.add_argument("--profile", metavar="OP", help="cProfile the calls of this op")
    d = sub.add_parser("decode", help="microseconds of Python per decoded token")
    d.add_argument("--layers", type=int, default=32)
    d.add_argument("--tokens", type=int, default=100)
    d.add_argument("--profile", action="store_true", help="cProfile the patched tokens")
    args = p.parse_args(argv)
    fake_cuda()
    if args.what == "ops":
        calls = op_calls()
        if args.profile:
            if args.profile not in calls:
                p.error(f"--profile: one of {', '.join(calls)}")
            _profile(calls[args.profile], args.calls)
            return 0
        for name, fn in calls.items():
            print(f"{name:22s} {time_calls(fn, args.calls):8.2f} us per call")
        return 0
    for patched in (False, True):
        model, cache, token = decode_model(args.layers, patched)
        if args.profile and patched:
            _profile(lambda: model(token, cache=cache), args.tokens)
        us = time_tokens(model, cache, token, args.tokens)
        print(f"{'patched' if patched else 'unpatched':10s} {us:9.1f} us per token "
              f"({args.layers} blocks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
