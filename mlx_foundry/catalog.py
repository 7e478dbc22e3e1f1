"""The catalog: every kernel the package builds, at representative template values.

Each entry walks a public op (or the mlx-lm patch path) with ``backend="metal"``
under :func:`~mlx_foundry.kernel.record_launches`, so nothing runs: the entry
yields the program and arguments of the launch.  ``python -m mlx_foundry show``
prints them; ``python -m mlx_foundry check`` runs the full Metal source of each
through the Metal front-end check.  Shapes are model shapes (Llama-3-8B where it
matters: K=4096, head_dim 128, 32/8 heads); arrays are lazy zeros, never evaluated.
"""

from dataclasses import dataclass

import mlx.core as mx

from .kernel import record_launches

F16, BF16, F32 = mx.float16, mx.bfloat16, mx.float32
_DT = {F16: "f16", BF16: "bf16", F32: "f32"}
K, HEAD_DIM, N_HEADS, N_KV = 4096, 128, 32, 8


@dataclass(frozen=True)
class Entry:
    name: str
    description: str
    walk: object  # callable() that calls ops with backend="metal"

    def launches(self):
        with record_launches() as rec:
            self.walk()
        if not rec:
            raise RuntimeError(f"[catalog] {self.name} launched no kernel.")
        return list(rec)

    def build(self):
        """``(program, args, kwargs)`` of the entry's (first) launch."""
        return self.launches()[0]


def _z(shape, dtype):
    return mx.zeros(shape, dtype=dtype)


def _weight(n, k, fmt, dtype=F16, bias=False):
    from .ops import Weight

    b = _z((n,), dtype) if bias else None
    if fmt == "dense":
        return Weight(_z((n, k), dtype), bias=b)
    bits, gs = fmt
    return Weight(_z((n, k * bits // 32), mx.uint32), _z((n, k // gs), dtype),
                  _z((n, k // gs), dtype), bias=b, group_size=gs, bits=bits)


def _fmt_name(fmt):
    return "dense" if fmt == "dense" else f"q{fmt[0]}g{fmt[1]}"


def _entries():
    from . import ops

    out = []

    def add(name, description, walk):
        out.append(Entry(name, description, walk))

    for dt in (F16, BF16, F32):
        for with_w in (True, False):
            add(f"rms_norm_{_DT[dt]}{'' if with_w else '_noweight'}",
                f"RMSNorm 1x{K} {_DT[dt]}" + ("" if with_w else " without weight"),
                lambda dt=dt, w=with_w: ops.rms_norm(_z((1, K), dt), _z((K,), dt) if w else None,
                                                     1e-5, backend="metal"))
        add(f"add_rms_norm_{_DT[dt]}", f"add + RMSNorm 1x{K} {_DT[dt]}",
            lambda dt=dt: ops.add_rms_norm(_z((1, K), dt), _z((1, K), dt), _z((K,), dt), 1e-5,
                                           backend="metal"))
        add(f"softmax_{_DT[dt]}", f"row softmax 4x1000 {_DT[dt]}",
            lambda dt=dt: ops.softmax(_z((4, 1000), dt), backend="metal"))
    add("rms_norm_f16_k100", "RMSNorm 3x100 f16 (element-wise path)",
        lambda: ops.rms_norm(_z((3, 100), F16), _z((100,), F16), 1e-5, backend="metal"))
    add("softmax_f16_long", "row softmax 2x20000 f16 (1024 threads)",
        lambda: ops.softmax(_z((2, 20000), F16), backend="metal"))
    for trad in (False, True):
        for freqs in (False, True):
            for dt in (F16, BF16, F32):
                add(f"rope_{'trad' if trad else 'half'}{'_freqs' if freqs else ''}_{_DT[dt]}",
                    f"RoPE [1,32,1,128] {_DT[dt]}, traditional={trad}, custom freqs={freqs}",
                    lambda trad=trad, freqs=freqs, dt=dt: ops.rope(
                        _z((1, N_HEADS, 1, HEAD_DIM), dt), HEAD_DIM, traditional=trad,
                        base=None if freqs else 500000.0, scale=1.0, offset=7,
                        freqs=_z((HEAD_DIM // 2,), F32) + 1 if freqs else None,
                        backend="metal"))

    formats = ["dense"] + [(b, g) for b in (2, 3, 4, 5, 6, 8) for g in (32, 64, 128)]
    for fmt in formats:
        for dt in ((F16, BF16, F32) if fmt in ("dense", (4, 64)) else (F16,)):
            add(f"linear_{_fmt_name(fmt)}_{_DT[dt]}",
                f"GEMV 1x{K} -> 1024, weights {_fmt_name(fmt)}, activations {_DT[dt]}",
                lambda fmt=fmt, dt=dt: ops.linear(_z((1, K), dt), _weight(1024, K, fmt, dt),
                                                  backend="metal"))
    for act in ("silu", "gelu", "gelu_approx", "relu"):
        add(f"linear_q4g64_bias_{act}_residual", f"GEMV q4g64 + bias + {act} + residual",
            lambda act=act: ops.linear(_z((1, K), F16), _weight(1024, K, (4, 64), bias=True),
                                       activation=act, residual=_z((1, 1024), F16),
                                       backend="metal"))
    for fmt in ("dense", (4, 64), (8, 64)):
        add(f"norm_linear_{_fmt_name(fmt)}_silu", f"RMSNorm + GEMV {_fmt_name(fmt)} + SiLU",
            lambda fmt=fmt: ops.norm_linear(_z((1, K), F16), _z((K,), F16), 1e-5,
                                            _weight(1024, K, fmt), activation="silu",
                                            backend="metal"))
    add("norm_linear_q4g64_plain_residual", "RMSNorm (no weight) + GEMV q4g64 + residual",
        lambda: ops.norm_linear(_z((1, K), BF16), None, 1e-5, _weight(1024, K, (4, 64), BF16),
                                residual=_z((1, 1024), BF16), backend="metal"))
    for g, u in (((4, 64), (4, 64)), ((8, 64), (4, 32)), ("dense", "dense"), ((3, 128), (6, 64))):
        add(f"norm_gate_up_swiglu_{_fmt_name(g)}_{_fmt_name(u)}",
            f"RMSNorm + gate {_fmt_name(g)} / up {_fmt_name(u)} + SwiGLU",
            lambda g=g, u=u: ops.norm_gate_up_swiglu(_z((1, K), F16), _z((K,), F16), 1e-5,
                                                     _weight(1024, K, g), _weight(1024, K, u),
                                                     backend="metal"))
    qkv_cases = [("q4g64", (4, 64), (4, 64), False, False, F16, True, False),
                 ("q4g64_trad", (4, 64), (4, 64), True, False, F16, True, False),
                 ("q8g64_q4g64_mixed", (8, 64), (4, 64), False, False, F16, True, False),
                 ("dense_bf16", "dense", "dense", False, False, BF16, True, False),
                 ("q4g64_bf16", (4, 64), (4, 64), False, False, BF16, True, False),
                 ("q4g64_bias", (4, 64), (4, 64), False, True, F16, True, False),
                 ("q4g64_joint_kv", (4, 64), (4, 64), False, False, F16, True, True),
                 ("q4g64_plain_bias_joint_kv", (4, 64), (4, 64), False, True, F16, False, True)]
    for label, qf, kvf, trad, bias, dt, gamma, joint in qkv_cases:
        add(f"norm_qkv_rope_{label}", f"RMSNorm{'' if gamma else ' (no weight)'} + Q/K/V "
            f"({_fmt_name(qf)}, {_fmt_name(kvf)}) + RoPE, 32/8 heads x 128, "
            f"traditional={trad}, bias={bias}{', K/V in one output' if joint else ''}",
            lambda qf=qf, kvf=kvf, trad=trad, bias=bias, dt=dt, gamma=gamma, joint=joint:
            ops.norm_qkv_rope(
                _z((1, 1, K), dt), _z((K,), dt) if gamma else None, 1e-5,
                _weight(N_HEADS * HEAD_DIM, K, qf, dt, bias),
                _weight(N_KV * HEAD_DIM, K, kvf, dt, bias),
                _weight(N_KV * HEAD_DIM, K, kvf, dt, bias),
                n_heads=N_HEADS, n_kv_heads=N_KV, head_dim=HEAD_DIM, offset=5,
                rope_base=500000.0, rope_traditional=trad, joint_kv=joint, backend="metal"))

    def attention(dt, cap, past_len, pending):
        """The Llama-3-8B decode attention over a joint K/V cache of ``cap`` positions."""
        one = (1, 2 * N_KV, 1, HEAD_DIM)
        return lambda: ops.decode_attention(
            _z((1, N_HEADS, 1, HEAD_DIM), dt), _z(one, dt), _z((1, 2 * N_KV, cap, HEAD_DIM), dt),
            past_len=past_len, pending=_z(one, dt) if pending else None,
            scale=HEAD_DIM ** -0.5, backend="metal")

    for dt in (F16, BF16, F32):
        add(f"decode_attention_{_DT[dt]}", f"decode attention 32/8 heads x 128 over a joint "
            f"K/V cache (20 of 256 positions) {_DT[dt]}", attention(dt, 256, 20, False))
    add("decode_attention_f16_d80", "decode attention 12/4 heads x 80 (lanes past head_dim)",
        lambda: ops.decode_attention(_z((2, 12, 1, 80), F16), _z((2, 8, 1, 80), F16),
                                     _z((2, 8, 7, 80), F16), past_len=7, scale=0.1,
                                     backend="metal"))
    add("decode_attention_long_f16", "decode attention 32/8 heads x 128 over 3000 positions "
        "(split kernel + combine)", attention(F16, 3072, 2999, False))
    add("decode_attention_pending_f16", "decode attention 32/8 heads x 128 with a token "
        "pending its cache write (20 of 256 positions + 1)", attention(F16, 256, 20, True))
    add("decode_attention_long_pending_bf16", "decode attention 32/8 heads x 128 over 3000 "
        "positions with a pending token (split kernel + combine)",
        attention(BF16, 3072, 2999, True))
    add("qk_norm_rope_f16", "Qwen3's per-head q/k norms + RoPE, 32/8 heads x 128, one token",
        lambda: ops.qk_norm_rope(_z((1, N_HEADS, 1, HEAD_DIM), F16),
                                 _z((1, 2 * N_KV, 1, HEAD_DIM), F16), _z((HEAD_DIM,), F16),
                                 _z((HEAD_DIM,), F16), 1e-6, offset=5, rope_base=1e6,
                                 backend="metal"))
    add("qk_norm_rope_trad_bf16", "per-head q/k norms + traditional RoPE, 8/2 heads x 64, "
        "3 rows", lambda: ops.qk_norm_rope(_z((2, 8, 3, 64), BF16), _z((2, 4, 3, 64), BF16),
                                           _z((64,), BF16), _z((64,), BF16), 1e-5, offset=0,
                                           rope_traditional=True, backend="metal"))
    add("decode_attention_combine_f16", "decode attention's merge of 13 split states, "
        "32 heads x 128 (the second launch of decode_attention_long_f16)",
        lambda: _attention_combine()(_z((N_HEADS, 13, HEAD_DIM + 2), F32), splits=13, T=F16,
                                     backend="metal"))
    # Split K (the default only for tall weights, K >= 2N; else a tuner option): the
    # threadgroup-memory exchange and barrier of the GEMV stages, on the packed-half and
    # the float paths, at K = 4096.
    for name in ("linear_q4g64_f16", "linear_dense_bf16", "norm_gate_up_swiglu_q4g64_q4g64",
                 "norm_qkv_rope_q4g64"):
        base = next(e for e in out if e.name == name)
        add(f"{name}_splitk", f"{base.description}, split K", _with_split_k(base.walk))
    # The loop over K unrolled (UNROLL, a tuner option): the packed-half path (one and two
    # weight policies, and the Q/K/V stage) and the float path.
    for name, unroll in (("linear_q4g64_f16", 4), ("norm_gate_up_swiglu_q4g64_q4g64", 2),
                         ("norm_qkv_rope_q4g64", 2), ("linear_dense_bf16", 2)):
        base = next(e for e in out if e.name == name)
        add(f"{name}_unroll{unroll}", f"{base.description}, K loop unrolled by {unroll}",
            _with_launch(base.walk, UNROLL=unroll))
    # Several rows of x per SIMD-group (MBLOCK): the packed-half path with a norm and the
    # dual GEMV, and the float path with split K.
    add("norm_gate_up_swiglu_q4g64_q4g64_rows4", "RMSNorm + gate/up q4g64 + SwiGLU, 4 rows of x, split K",
        lambda: ops.norm_gate_up_swiglu(_z((4, K), F16), _z((K,), F16), 1e-5,
                                        _weight(1024, K, (4, 64)), _weight(1024, K, (4, 64)),
                                        backend="metal"))
    add("norm_gate_up_swiglu_q4g64_q8g64_bf16_rows3", "RMSNorm + gate q4g64 / up q8g64 + "
        "SwiGLU, bf16 (packed-half path, converted per chunk), 3 rows of x",
        lambda: ops.norm_gate_up_swiglu(_z((3, K), BF16), _z((K,), BF16), 1e-5,
                                        _weight(1024, K, (4, 64), BF16),
                                        _weight(1024, K, (8, 64), BF16), backend="metal"))
    add("linear_dense_f16_wide", "GEMV 1x2048 -> 5120 dense fp16 (the dense one-row launch "
        "for N within 4x of K: two rows, 256 threads, split K)",
        lambda: ops.linear(_z((1, 2048), F16), _weight(5120, 2048, "dense", F16),
                           backend="metal"))
    add("linear_q4g64_f16_k14336_residual", "GEMV 1x14336 -> 1024 q4g64 f16 + residual: x "
        "staged in 30 KB of threadgroup memory (near the budget), no split K",
        _with_launch(lambda: ops.linear(_z((1, 14336), F16), _weight(1024, 14336, (4, 64)),
                                        residual=_z((1, 1024), F16), backend="metal"),
                     ROWS=4, SPLITK=0))
    add("linear_dense_bf16_rows3_splitk", "GEMV 3x4096 -> 1024 dense bf16, split K",
        lambda: ops.linear(_z((3, K), BF16), _weight(1024, K, "dense", BF16), backend="metal"))
    add("norm_linear_q4g64_rows5_mblock4", "RMSNorm + GEMV 5x4096 -> 1024 q4g64, MBLOCK 4, "
        "no split", _with_launch(lambda: ops.norm_linear(
            _z((5, K), F16), _z((K,), F16), 1e-5, _weight(1024, K, (4, 64)),
            backend="metal"), ROWS=4, SPLITK=0, MBLOCK=4))
    add("read_probe", "the bench's plain read: a streaming read of 33 MB (a decode GEMV's "
        "bytes), 16-byte loads, one sum per SIMD-group", _read_probe)
    return out


def _read_probe():
    from .bench.cases import weight_bytes
    from .bench.read_probe import probe_words, read_probe

    nbytes = weight_bytes(14336, 4096, bits=4)  # the 4-bit GEMV 4096 -> 14336
    read_probe(_z((probe_words(nbytes),), mx.uint32), backend="metal")


def _attention_combine():
    from .stages.attention import decode_attention_combine

    return decode_attention_combine


def _with_launch(walk, **launch):
    """``walk`` with every GEMV launch made with these launch constants."""

    def run():
        with record_launches() as inner:
            walk()
        for program, args, kwargs in inner:
            program(*args, **dict(kwargs, **launch), backend="metal")

    return run


def _with_split_k(walk):
    """``walk`` with every GEMV launch made with ``SPLITK=1``."""
    return _with_launch(walk, SPLITK=1)


_cache = []


def entries():
    """All catalog entries, in a stable order."""
    if not _cache:
        _cache.extend(_entries())
    return list(_cache)


def get(name):
    for e in entries():
        if e.name == name:
            return e
    raise KeyError(f"[catalog] No kernel named {name!r}; see `python -m mlx_foundry show --list`.")
