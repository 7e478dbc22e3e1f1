"""The benchmark suite, as data.

Every :class:`Case` names an op at one shape and dtype, the bytes one call must
move (weights + activations read + outputs written: the traffic of an ideal fused
kernel), how to build one input set (distinct data for distinct ``i``), a
*baseline* made of MLX's own ops and a *candidate* made of ``mlx_foundry.ops``
on the chosen backend.  Candidates are resolved lazily: an op that does not
exist yet makes its case "skipped" with the reason, never a crash.

Shapes are those of a Llama-3-8B decode step (hidden 4096, intermediate 14336,
32 heads, 8 KV heads, head_dim 128, MLX affine group size 64).  On the reference
backend (CPU) :func:`suite` builds the same cases at tiny shapes, so the command
itself runs in CI.
"""

from dataclasses import dataclass, field
from typing import Callable, Optional

import mlx.core as mx

EPS = 1e-5
ROPE_BASE = 500000.0          # Llama-3
OFFSET = 37                   # decode position used by the RoPE cases

FULL = dict(hidden=4096, inter=14336, heads=32, kv_heads=8, head_dim=128,
            norm_rows=8192, norm_k=8192, group_size=64)
TINY = dict(hidden=256, inter=704, heads=4, kv_heads=2, head_dim=64,
            norm_rows=24, norm_k=320, group_size=64)


@dataclass
class Case:
    """One benchmark case.

    Attributes:
        name: unique id, used by ``--only`` (e.g. ``"linear_q4_4096x14336"``).
        op: the op's name as in the table (``"linear"``).
        shape: readable shape (``"1x4096->14336"``).
        dtype: activation dtype and weight format (``"fp16/q4"``).
        nbytes: bytes one call must move (weights + inputs read + outputs written).
        make: ``make(i) -> tuple`` of inputs (distinct data for distinct ``i``).
        baseline: ``baseline(*inputs)``, MLX's own ops.
        candidate: ``candidate(backend) -> callable(*inputs)``; raises
            ImportError/AttributeError when the op does not exist (case skipped).
        comparable: maps a baseline output to the candidate's layout (for the
            one-off agreement check; ``None`` = identity).
        runner: for cases that are not a timed op pair (end-to-end decode):
            ``runner(ctx) -> dict`` of results; ``make``/``baseline``/``candidate``
            are then unused.
    """

    name: str
    op: str
    shape: str
    dtype: str
    nbytes: int = 0
    make: Optional[Callable] = None
    baseline: Optional[Callable] = None
    candidate: Optional[Callable] = None
    comparable: Optional[Callable] = None
    runner: Optional[Callable] = None
    tags: tuple = field(default_factory=tuple)


# ------------------------------------------------------------------------------------
# Input builders
# ------------------------------------------------------------------------------------
def _key(i, j):
    return mx.random.key(1000 * (i + 1) + j)


def _act(i, j, shape, dtype=mx.float16):
    return mx.random.normal(shape, key=_key(i, j)).astype(dtype)


def _gamma(i, j, k, dtype):
    return (1.0 + 0.1 * mx.random.normal((k,), key=_key(i, j))).astype(dtype)


def _dname(dt):
    return {mx.float16: "fp16", mx.bfloat16: "bf16", mx.float32: "fp32"}.get(dt, str(dt))


def _dense_w(i, j, n, k, dtype=mx.float16):
    return (mx.random.normal((n, k), key=_key(i, j)) * (k ** -0.5)).astype(dtype)


def _qweight(i, j, n, k, bits, group_size, dtype=mx.float16):
    """MLX affine quantized weight ``(w_q, scales, biases)`` of a random ``[n, k]`` matrix."""
    return tuple(mx.quantize(_dense_w(i, j, n, k, dtype), group_size=group_size, bits=bits))


def weight_bytes(n, k, bits=None, group_size=64, itemsize=2):
    """Bytes of one ``[n, k]`` weight: packed words + scales + biases, or dense."""
    if bits is None:
        return n * k * itemsize
    return n * k * bits // 8 + 2 * n * (k // group_size) * itemsize


def _ops():
    import mlx_foundry.ops as ops
    return ops


def _op(name):
    """``mlx_foundry.ops.<name>``; AttributeError (case skipped) if it does not exist."""
    ops = _ops()
    fn = getattr(ops, name, None)
    if fn is None:
        raise AttributeError(f"mlx_foundry.ops.{name} does not exist yet")
    return fn


def _weight(parts, bits, group_size):
    Weight = _op("Weight")
    if bits is None:
        return Weight(parts[0])
    w, s, b = parts
    return Weight(w, s, b, group_size=group_size, bits=bits)


def _qmm(x, w, s, b, bits, gs):
    return mx.quantized_matmul(x, w, s, b, transpose=True, group_size=gs, bits=bits)


def _silu(x):
    return x * mx.sigmoid(x)


# ------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------
def _linear_case(k, n, bits, gs, dt, *, residual=False, name=None, op="linear"):
    fmt = f"q{bits}" if bits else "dense"
    e = dt.size

    def make(i):
        x = _act(i, 0, (1, k), dt)
        w = _qweight(i, 1, n, k, bits, gs, dt) if bits else (_dense_w(i, 1, n, k, dt),)
        r = (_act(i, 2, (1, n), dt),) if residual else ()
        return (x,) + w + r

    if bits:
        def baseline(x, w, s, b, *r):
            y = _qmm(x, w, s, b, bits, gs)
            return y + r[0] if r else y
    else:
        def baseline(x, w, *r):
            y = x @ w.T
            return y + r[0] if r else y

    def candidate(backend):
        linear = _op("linear")
        if bits:
            def run(x, w, s, b, *r):
                return linear(x, w, s, b, group_size=gs, bits=bits,
                              residual=r[0] if r else None, backend=backend)
        else:
            def run(x, w, *r):
                return linear(x, w, residual=r[0] if r else None, backend=backend)
        return run

    nbytes = weight_bytes(n, k, bits, gs, e) + e * (k + n * (2 if residual else 1))
    return Case(name or f"linear_{fmt}_{k}x{n}", op, f"1x{k}->{n}",
                f"{_dname(dt)}/{fmt}" if bits else _dname(dt), nbytes, make, baseline,
                candidate)


def _prefill_case(k, n, bits, gs, dt, m):
    """The fused GEMV forced on ``m`` rows vs. MLX's own op on them
    (``mx.quantized_matmul``, or ``x @ w.T`` for dense weights: ``bits`` None).

    Measures where the prefill threshold (``ops.linear.PREFILL_ROWS``) belongs:
    the largest ``m`` at which the fused kernel still wins, per weight format.
    """
    fmt = f"q{bits}" if bits else "dense"

    def make(i):
        w = _qweight(i, 1, n, k, bits, gs, dt) if bits else (_dense_w(i, 1, n, k, dt),)
        return (_act(i, 0, (m, k), dt),) + w

    if bits:
        def baseline(x, w, s, b):
            return _qmm(x, w, s, b, bits, gs)
    else:
        def baseline(x, w):
            return x @ w.T

    def candidate(backend):
        import importlib

        mod = importlib.import_module("mlx_foundry.ops.linear")

        def run(x, w, *sb):
            saved, mod.PREFILL_ROWS = mod.PREFILL_ROWS, 1 << 30
            try:
                if bits:
                    return mod.linear(x, w, *sb, group_size=gs, bits=bits, backend=backend)
                return mod.linear(x, w, backend=backend)
            finally:
                mod.PREFILL_ROWS = saved
        return run

    nbytes = weight_bytes(n, k, bits, gs, dt.size) + dt.size * m * (k + n)
    return Case(f"prefill_{fmt}_m{m}_{k}x{n}", "linear (fused, M rows)", f"{m}x{k}->{n}",
                f"{_dname(dt)}/{fmt}" if bits else _dname(dt), nbytes, make, baseline,
                candidate, tags=("prefill",))


def _rms_norm_case(m, k, dt):
    def make(i):
        return (_act(i, 0, (m, k), dt), _gamma(i, 1, k, dt))

    def baseline(x, w):
        return mx.fast.rms_norm(x, w, EPS)

    def candidate(backend):
        rms_norm = _op("rms_norm")
        return lambda x, w: rms_norm(x, w, EPS, backend=backend)

    return Case(f"rms_norm_{m}x{k}", "rms_norm", f"{m}x{k}", _dname(dt),
                dt.size * (2 * m * k + k), make, baseline, candidate)


def _add_rms_norm_case(k, dt):
    def make(i):
        return (_act(i, 0, (1, k), dt), _act(i, 1, (1, k), dt), _gamma(i, 2, k, dt))

    def baseline(x, r, w):
        h = x + r
        return mx.fast.rms_norm(h, w, EPS), h

    def candidate(backend):
        add_rms_norm = _op("add_rms_norm")
        return lambda x, r, w: add_rms_norm(x, r, w, EPS, backend=backend)

    return Case(f"add_rms_norm_1x{k}", "add_rms_norm", f"1x{k}", _dname(dt),
                dt.size * 5 * k, make, baseline, candidate)


def _norm_linear_case(k, n, bits, gs, dt):
    def make(i):
        return (_act(i, 0, (1, k), dt), _gamma(i, 1, k, dt)) + _qweight(i, 2, n, k, bits, gs, dt)

    def baseline(x, g, w, s, b):
        return _qmm(mx.fast.rms_norm(x, g, EPS), w, s, b, bits, gs)

    def candidate(backend):
        norm_linear = _op("norm_linear")

        def run(x, g, w, s, b):
            return norm_linear(x, g, EPS, _weight((w, s, b), bits, gs), backend=backend)
        return run

    return Case(f"norm_linear_q{bits}_{k}x{n}", "norm_linear", f"1x{k}->{n}",
                f"{_dname(dt)}/q{bits}",
                weight_bytes(n, k, bits, gs, dt.size) + dt.size * (2 * k + n),
                make, baseline, candidate)


def _gate_up_case(k, n, bits, gs, dt):
    def make(i):
        return ((_act(i, 0, (1, k), dt), _gamma(i, 1, k, dt))
                + _qweight(i, 2, n, k, bits, gs, dt) + _qweight(i, 3, n, k, bits, gs, dt))

    def baseline(x, g, gw, gs_, gb, uw, us, ub):
        h = mx.fast.rms_norm(x, g, EPS)
        return _silu(_qmm(h, gw, gs_, gb, bits, gs)) * _qmm(h, uw, us, ub, bits, gs)

    def candidate(backend):
        fused = _op("norm_gate_up_swiglu")

        def run(x, g, gw, gs_, gb, uw, us, ub):
            return fused(x, g, EPS, _weight((gw, gs_, gb), bits, gs),
                         _weight((uw, us, ub), bits, gs), backend=backend)
        return run

    return Case(f"norm_gate_up_swiglu_q{bits}_{k}x{n}", "norm_gate_up_swiglu",
                f"1x{k}->2x{n}", f"{_dname(dt)}/q{bits}",
                2 * weight_bytes(n, k, bits, gs, dt.size) + dt.size * (2 * k + n),
                make, baseline, candidate)


def _qkv_rope_case(d, heads, kv_heads, head_dim, bits, gs, dt, *, joint_kv=False):
    """The attention's input side; ``joint_kv``: keys and values in one output, the form
    the patched decode launches."""
    nq, nkv = heads * head_dim, kv_heads * head_dim

    def make(i):
        return ((_act(i, 0, (1, 1, d), dt), _gamma(i, 1, d, dt))
                + _qweight(i, 2, nq, d, bits, gs, dt) + _qweight(i, 3, nkv, d, bits, gs, dt)
                + _qweight(i, 4, nkv, d, bits, gs, dt))

    def baseline(x, g, qw, qs, qb, kw, ks, kb, vw, vs, vb):
        # mlx-lm's Attention: norm, projections, [B, L, H, D] -> [B, H, L, D], RoPE.
        B, L, _ = x.shape
        h = mx.fast.rms_norm(x, g, EPS)
        q = _qmm(h, qw, qs, qb, bits, gs).reshape(B, L, heads, -1).transpose(0, 2, 1, 3)
        k = _qmm(h, kw, ks, kb, bits, gs).reshape(B, L, kv_heads, -1).transpose(0, 2, 1, 3)
        v = _qmm(h, vw, vs, vb, bits, gs).reshape(B, L, kv_heads, -1).transpose(0, 2, 1, 3)
        q = mx.fast.rope(q, head_dim, traditional=False, base=ROPE_BASE, scale=1.0,
                         offset=OFFSET)
        k = mx.fast.rope(k, head_dim, traditional=False, base=ROPE_BASE, scale=1.0,
                         offset=OFFSET)
        return q, k, v

    def comparable(out):
        # ops.norm_qkv_rope returns each of q, k, v as [..., L, H * head_dim] (with
        # joint_kv, k and v side by side in the last axis).
        flat = tuple(t.transpose(0, 2, 1, 3).reshape(t.shape[0], t.shape[2], -1) for t in out)
        return (flat[0], mx.concatenate(flat[1:], axis=-1)) if joint_kv else flat

    def candidate(backend):
        fused = _op("norm_qkv_rope")

        def run(x, g, qw, qs, qb, kw, ks, kb, vw, vs, vb):
            return fused(x, g, EPS, _weight((qw, qs, qb), bits, gs),
                         _weight((kw, ks, kb), bits, gs), _weight((vw, vs, vb), bits, gs),
                         n_heads=heads, n_kv_heads=kv_heads, head_dim=head_dim,
                         offset=OFFSET, rope_base=ROPE_BASE, joint_kv=joint_kv,
                         backend=backend)
        return run

    e = dt.size
    nbytes = (weight_bytes(nq, d, bits, gs, e) + 2 * weight_bytes(nkv, d, bits, gs, e)
              + e * (2 * d + nq + 2 * nkv))
    return Case(f"norm_qkv_rope_q{bits}_{d}" + ("_joint_kv" if joint_kv else ""),
                "norm_qkv_rope" + (" (joint K/V)" if joint_kv else ""),
                f"1x{d}->{heads}/{kv_heads}x{head_dim}", f"{_dname(dt)}/q{bits}", nbytes,
                make, baseline, candidate, comparable=comparable)


def _qk_norm_rope_case(heads, kv_heads, head_dim, dt):
    """Qwen3's per-head q/k norms and RoPE on one token (keys and values joint, as the
    patched decode passes them). Baseline: mlx-lm's Qwen3 attention, norms then RoPE on
    q and k, v untouched."""
    def make(i):
        return (_act(i, 0, (1, heads, 1, head_dim), dt),
                _act(i, 1, (1, 2 * kv_heads, 1, head_dim), dt),
                _gamma(i, 2, head_dim, dt), _gamma(i, 3, head_dim, dt))

    def baseline(q, kv, qw, kw):
        k, v = kv[:, :kv_heads], kv[:, kv_heads:]
        rope = dict(traditional=False, base=ROPE_BASE, scale=1.0, offset=OFFSET)
        q = mx.fast.rope(mx.fast.rms_norm(q, qw, EPS), head_dim, **rope)
        k = mx.fast.rope(mx.fast.rms_norm(k, kw, EPS), head_dim, **rope)
        return q, mx.concatenate([k, v], axis=1)

    def candidate(backend):
        fused = _op("qk_norm_rope")
        return lambda q, kv, qw, kw: fused(q, kv, qw, kw, EPS, offset=OFFSET,
                                           rope_base=ROPE_BASE, backend=backend)

    nbytes = dt.size * head_dim * (2 * heads + 4 * kv_heads + 2)  # q, kv in and out; weights
    return Case(f"qk_norm_rope_{heads}x{head_dim}", "qk_norm_rope",
                f"{heads}/{kv_heads}x{head_dim}", _dname(dt), nbytes, make, baseline,
                candidate)


def _decode_attention_case(heads, kv_heads, head_dim, past_len, dt):
    """One token's attention over a joint K/V cache of ``past_len`` earlier positions
    (capacity rounded up to mlx-lm's 256-position steps). Baseline: what mlx-lm runs
    once the token is in the cache, MLX's attention over key and value views of the
    buffer; ours reads the buffer's earlier positions and the token from ``kv``."""
    cap = 256 * (past_len // 256 + 1)
    scale = head_dim ** -0.5

    def make(i):
        q = _act(i, 0, (1, heads, 1, head_dim), dt)
        kv = _act(i, 1, (1, 2 * kv_heads, 1, head_dim), dt)
        past = _act(i, 2, (1, 2 * kv_heads, cap, head_dim), dt)
        past[:, :, past_len:past_len + 1] = kv  # the buffer after the cache write
        return q, kv, past

    def baseline(q, kv, past):
        n = past_len + 1
        return mx.fast.scaled_dot_product_attention(
            q, past[:, :kv_heads, :n], past[:, kv_heads:, :n], scale=scale)

    def candidate(backend):
        attend = _op("decode_attention")
        return lambda q, kv, past: attend(q, kv, past, past_len=past_len, scale=scale,
                                          backend=backend)

    nbytes = dt.size * head_dim * (2 * heads + 2 * kv_heads * (past_len + 1))
    return Case(f"decode_attention_{heads}x{head_dim}_len{past_len + 1}", "decode_attention",
                f"{heads}/{kv_heads}x{head_dim}, {past_len + 1} pos", _dname(dt), nbytes,
                make, baseline, candidate)


def _mlp_block_case(d, inter, bits, gs, dt):
    def make(i):
        return ((_act(i, 0, (1, d), dt), _gamma(i, 1, d, dt))
                + _qweight(i, 2, inter, d, bits, gs, dt) + _qweight(i, 3, inter, d, bits, gs, dt)
                + _qweight(i, 4, d, inter, bits, gs, dt))

    def baseline(x, g, gw, gs_, gb, uw, us, ub, dw, ds, db):
        # Unfused MLX: norm -> gate, up -> SwiGLU -> down -> residual.
        h = mx.fast.rms_norm(x, g, EPS)
        a = _silu(_qmm(h, gw, gs_, gb, bits, gs)) * _qmm(h, uw, us, ub, bits, gs)
        return x + _qmm(a, dw, ds, db, bits, gs)

    def candidate(backend):
        fused = _op("norm_gate_up_swiglu")
        linear = _op("linear")

        def run(x, g, gw, gs_, gb, uw, us, ub, dw, ds, db):
            a = fused(x, g, EPS, _weight((gw, gs_, gb), bits, gs),
                      _weight((uw, us, ub), bits, gs), backend=backend)
            return linear(a, dw, ds, db, group_size=gs, bits=bits, residual=x,
                          backend=backend)
        return run

    # Weights, x (read twice: norm and residual), gamma, the output; the fused pair
    # also writes and reads the [1, inter] SwiGLU activation once.
    nbytes = 3 * weight_bytes(inter, d, bits, gs, dt.size) + dt.size * (4 * d + 2 * inter)
    return Case(f"mlp_block_q{bits}_{d}x{inter}", "decode MLP block",
                f"1x{d}->{inter}->{d}", f"{_dname(dt)}/q{bits}", nbytes, make, baseline,
                candidate)


def _e2e_case(tiny, dt, *, ordinary_step=False, batch=None, prompt_len=None):
    """The end-to-end decode as ``patch`` does it by default (on the CUDA backend the
    compiled step), or with ``ordinary_step`` its ordinary step (``compile_decode=False``:
    Python builds each token's graph); ``prompt_len``: after a prompt of that many tokens
    (a long context: every token's attention and cache write cover it) instead of 16."""
    def runner(ctx):
        from .e2e import run_decode
        return run_decode(ctx, tiny=tiny, dtype=dt, batch=batch, prompt_len=prompt_len,
                          patch_kwargs={"compile_decode": False} if ordinary_step else None)

    suffix = ("_ordinary_step" if ordinary_step else f"_batch{batch}" if batch else
              f"_prompt{prompt_len}" if prompt_len else "")
    op = ("decode (end-to-end, ordinary step)" if ordinary_step else
          f"decode (end-to-end, batch {batch})" if batch else
          f"decode (e2e, {prompt_len}-token prompt)" if prompt_len else
          "decode (end-to-end)")
    return Case("e2e_decode_llama3_8b_q4" + suffix, op,
                "tiny llama" if tiny else "llama-3-8b", f"{_dname(dt)}/q4", runner=runner,
                tags=("e2e",))


def suite(*, tiny=False, dtype=None):
    """All cases, at Llama-3-8B decode shapes.

    Args:
        tiny (bool): small shapes, for the reference backend on a CPU. Default: ``False``.
        dtype (Dtype, optional): activation / scale dtype. Default: ``mx.float16``
            (``mx.float32`` when ``tiny``: MLX's CPU fp16 quantized matmul is very slow).
    """
    D = TINY if tiny else FULL
    dt = dtype or (mx.float32 if tiny else mx.float16)
    h, i, gs = D["hidden"], D["inter"], D["group_size"]
    cases = []
    for k, n in ((h, i), (i, h)):
        for bits in (4, 8, None):
            cases.append(_linear_case(k, n, bits, gs, dt))
    cases += [
        _rms_norm_case(1, h, dt),
        _rms_norm_case(D["norm_rows"], D["norm_k"], dt),
        _add_rms_norm_case(h, dt),
        _linear_case(h, h, 4, gs, dt, residual=True, name=f"linear_residual_q4_{h}x{h}",
                     op="linear+residual"),
        _norm_linear_case(h, i, 4, gs, dt),
        _gate_up_case(h, i, 4, gs, dt),
        _qkv_rope_case(h, D["heads"], D["kv_heads"], D["head_dim"], 4, gs, dt),
        _qkv_rope_case(h, D["heads"], D["kv_heads"], D["head_dim"], 4, gs, dt,
                       joint_kv=True),
        _qk_norm_rope_case(D["heads"], D["kv_heads"], D["head_dim"], dt),
        _mlp_block_case(h, i, 4, gs, dt),
        _e2e_case(tiny, dt),
        _e2e_case(tiny, dt, ordinary_step=True),
        _e2e_case(tiny, dt, batch=4),
        _e2e_case(tiny, dt, prompt_len=100 if tiny else 1500),
    ]
    heads, kv_heads, head_dim = D["heads"], D["kv_heads"], D["head_dim"]
    cases += [_decode_attention_case(heads, kv_heads, head_dim, n, dt)
              for n in ((20, 300) if tiny else (150, 1000, 4095))]
    cases += [_prefill_case(h, i, 4, gs, dt, m) for m in (2, 3, 4, 5, 6, 7, 8, 16)]
    # The other formats at the threshold's edge: the one PREFILL_ROWS serves them all.
    cases += [_prefill_case(h, i, bits, gs, dt, m) for bits in (8, None) for m in (7, 8)]
    names = [c.name for c in cases]
    assert len(set(names)) == len(names), names
    return cases


def select(cases, only):
    """Cases whose name or op contains any of the strings in ``only`` (all if empty)."""
    if not only:
        return list(cases)
    return [c for c in cases if any(s in c.name or s in c.op for s in only)]
