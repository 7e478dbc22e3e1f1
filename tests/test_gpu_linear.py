"""GPU: every fused linear op against its reference (plain MLX ops) over awkward shapes.

Run on a machine with Metal or CUDA: ``pytest -m gpu tests/test_gpu_linear.py``.
References run on the CPU stream: MLX's CUDA float32 matmul uses TF32 by default
(``MLX_ENABLE_TF32=1``), too coarse to be the oracle of a float32 kernel.
"""

import importlib

import mlx.core as mx
import pytest

from mlx_foundry.args import Bound
from mlx_foundry.ops import Weight, linear, norm_gate_up_swiglu, norm_linear, norm_qkv_rope
from mlx_foundry.ops.linear import linear_kernel
from mlx_foundry.policies.affine import AFFINE_BITS, affine_policy
from mlx_foundry.stages.gemv import xstage_units

from tolerances import assert_close

pytestmark = pytest.mark.gpu
lin = importlib.import_module("mlx_foundry.ops.linear")

DTYPES = [mx.float16, mx.bfloat16, mx.float32]
DTYPE_IDS = ["f16", "bf16", "f32"]
K_FOR_GROUP = {32: 4128, 64: 2880, 128: 1152}  # K must be a multiple of the group size


def _w(n, k, fmt, dtype, bias=False):
    w = (mx.random.normal((n, k)) / k ** 0.5).astype(dtype)
    b = mx.random.normal((n,)).astype(dtype) if bias else None
    if fmt == "dense":
        return Weight(w, bias=b)
    bits, gs = fmt
    wq, s, bi = mx.quantize(w, group_size=gs, bits=bits)
    return Weight(wq, s, bi, b, group_size=gs, bits=bits)


def _x(shape, dtype):
    return mx.random.normal(shape).astype(dtype)


def _ref(fn):
    """``fn("reference")`` evaluated on the CPU."""
    with mx.stream(mx.cpu):
        out = fn("reference")
        mx.eval(out)
    return out


@pytest.fixture
def fused_rows(monkeypatch):
    """Force the fused kernel for any number of rows."""
    monkeypatch.setattr(lin, "PREFILL_ROWS", 1 << 30)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bits", AFFINE_BITS)
def test_linear_affine_every_format(gpu_backend, bits, group_size, dtype):
    k = K_FOR_GROUP[group_size]
    w = _w(99, k, (bits, group_size), dtype)
    for m in (1, 3):
        x = _x((m, k), dtype)
        got = linear(x, w.weight, w.scales, w.biases, group_size=group_size, bits=bits,
                     backend=gpu_backend)
        want = _ref(lambda be: linear(x, w.weight, w.scales, w.biases, group_size=group_size, bits=bits, backend=be))
        assert_close(got, want, dtype, k=k, msg=f"m={m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("k", [2880, 4128, 1000, 37, 8])
def test_linear_dense(gpu_backend, k, dtype):
    w = _w(131, k, "dense", dtype)
    for m in (1, 4):
        x = _x((m, k), dtype)
        assert_close(linear(x, w, backend=gpu_backend), _ref(lambda be: linear(x, w, backend=be)),
                     dtype, k=k, msg=f"m={m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,k", [(5003, 2080), (2049, 2048), (8200, 2050), (2051, 2048),
                                 (1031, 4124), (2047, 6150), (3, 8)])
def test_linear_dense_one_row_launch(gpu_backend, n, k, dtype, monkeypatch, tmp_path):
    """Dense weights with K >= 2048 and N within 4x of K at one row of x: the launch of two
    rows and 256 threads splitting K (N odd: a threadgroup's second row past the end; K
    not a multiple of the SIMD-group stride), with and without a bias; and a short row,
    which keeps the quantized weights' launch."""
    from mlx_foundry.bench import tuner

    monkeypatch.setenv(tuner.ENV_DIR, str(tmp_path))  # no tuned launch: the default runs
    monkeypatch.setattr(lin, "_TUNED", {})
    launch = lin.default_launch(n, k, dense=True)
    short = (lin.DEFAULT_ROWS, lin.DEFAULT_THREADS, lin.DEFAULT_SPLITK)
    assert (launch["ROWS"], launch["THREADS"], launch["SPLITK"]) == (
        (2, 256, 1) if k >= 2048 else short)
    for bias in (False, True):
        w = _w(n, k, "dense", dtype, bias=bias)
        x = _x((1, k), dtype)
        assert_close(linear(x, w, backend=gpu_backend), _ref(lambda be: linear(x, w, backend=be)),
                     dtype, k=k, msg=f"bias={bias}")


@pytest.mark.parametrize("fmt,dtype", [("dense", mx.float16), ((4, 64), mx.bfloat16),
                                       ((8, 32), mx.float16)])
def test_linear_vocabulary_sized_n(gpu_backend, fmt, dtype):
    w = _w(151936, 256, fmt, dtype)
    x = _x((1, 256), dtype)
    assert_close(linear(x, w, backend=gpu_backend), _ref(lambda be: linear(x, w, backend=be)), dtype,
                 k=256)


@pytest.mark.parametrize("n,k,fmt,dtype", [(32003, 1024, (4, 64), mx.float16),
                                            (151936, 896, (4, 64), mx.bfloat16),
                                            (32003, 1024, (8, 32), mx.float16),
                                            (1000, 96, "dense", mx.float16)])
def test_linear_over_embedding_tables(gpu_backend, n, k, fmt, dtype):
    """The output projection of a model with tied embeddings: Weight.from_module of an
    (quantized) embedding, one and three rows, against the reference and MLX's own
    as_linear."""
    import mlx.nn as nn

    mx.random.seed(3)
    emb = nn.Embedding(n, k) if fmt == "dense" else nn.QuantizedEmbedding(
        n, k, group_size=fmt[1], bits=fmt[0])
    emb.set_dtype(dtype)
    w = Weight.from_module(emb)
    for rows in (1, 3):
        x = _x((rows, k), dtype)
        got = linear(x, w, backend=gpu_backend)
        assert_close(got, _ref(lambda be: linear(x, w, backend=be)), dtype, k=k,
                     msg=f"rows={rows}")
        assert_close(got, emb.as_linear(x), dtype, k=k, msg=f"as_linear, rows={rows}")


@pytest.mark.parametrize("activation", [None, "silu", "gelu", "gelu_approx", "relu"])
@pytest.mark.parametrize("bias,residual", [(True, False), (False, True), (True, True)])
def test_linear_epilogues(gpu_backend, activation, bias, residual):
    dtype, k = mx.float16, 2880
    w = _w(77, k, (4, 64), dtype, bias=bias)
    x = _x((2, 1, k), dtype)
    r = _x((2, 1, 77), dtype) if residual else None
    got = linear(x, w, activation=activation, residual=r, backend=gpu_backend)
    want = _ref(lambda be: linear(x, w, activation=activation, residual=r, backend=be))
    assert got.shape == (2, 1, 77)
    assert_close(got, want, dtype, k=k)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("fmt,n,k", [((4, 64), 2001, 2880), ((8, 32), 2065, 4128),
                                     ((4, 32), 4128, 4128)])
def test_square_weights_default_launch(gpu_backend, fmt, n, k, dtype):
    """One row of x through ``n <= k < 2 n`` quantized weights (o_proj): the untuned launch
    is two rows per SIMD-group without split K (``SQUARE_ROWS``), x staged for half and
    bfloat16; N not a multiple of a threadgroup's rows; with a residual."""
    assert lin.default_launch(n, k)["ROWS"] == lin.SQUARE_ROWS
    assert lin.default_launch(n, k)["SPLITK"] == 0
    w = _w(n, k, fmt, dtype)
    x, r = _x((1, 1, k), dtype), _x((1, 1, n), dtype)
    got = linear(x, w, residual=r, backend=gpu_backend)
    assert_close(got, _ref(lambda be: linear(x, w, residual=r, backend=be)), dtype, k=k)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("rows,threads", [(1, 32), (2, 64), (8, 256), (3, 96), (4, 256)])
def test_linear_launch_parameters(gpu_backend, rows, threads, dtype):
    k = 2880
    w = _w(203, k, (4, 64), dtype)
    x = _x((2, k), dtype)
    kern = linear_kernel(w.signature())
    got = kern(x=x, **w.inputs("w"), ROWS=rows, THREADS=threads, backend=gpu_backend)
    assert_close(got, _ref(lambda be: linear(x, w, backend=be)), dtype, k=k)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("with_weight", [True, False])
@pytest.mark.parametrize("fmt,k", [((4, 64), 2880), ((8, 32), 4128), ((5, 32), 4128),
                                   ("dense", 4128), ("dense", 1000)])
def test_norm_linear(gpu_backend, fmt, k, with_weight, dtype):
    w = _w(150, k, fmt, dtype, bias=True)
    g = (1 + 0.1 * mx.random.normal((k,))).astype(dtype) if with_weight else None
    for m in (1, 2):
        x = _x((m, k), dtype) * 3
        r = _x((m, 150), dtype)
        got = norm_linear(x, g, 1e-5, w, activation="silu", residual=r, backend=gpu_backend)
        want = _ref(lambda be: norm_linear(x, g, 1e-5, w, activation="silu", residual=r, backend=be))
        assert_close(got, want, dtype, k=k, msg=f"m={m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("gate_fmt,up_fmt,k", [((4, 64), (4, 64), 2880), ((8, 32), "dense", 4128),
                                               ((4, 128), (8, 128), 1152), ((8, 32), (8, 32), 4128),
                                               ((3, 32), (6, 32), 4128), ("dense", "dense", 1000)])
def test_norm_gate_up_swiglu(gpu_backend, gate_fmt, up_fmt, k, dtype):
    gate, up = _w(150, k, gate_fmt, dtype), _w(150, k, up_fmt, dtype)
    g = (1 + 0.1 * mx.random.normal((k,))).astype(dtype)
    for shape in ((1, 1, k), (3, k)):
        x = _x(shape, dtype)
        got = norm_gate_up_swiglu(x, g, 1e-6, gate, up, backend=gpu_backend)
        want = _ref(lambda be: norm_gate_up_swiglu(x, g, 1e-6, gate, up, backend=be))
        assert_close(got, want, dtype, k=k, msg=f"shape={shape}")


QKV_SHAPES = [  # (n_heads, n_kv_heads, head_dim, K, formats q/k/v)
    (8, 2, 64, 2880, ((4, 64), (4, 64), (4, 64))),
    (4, 1, 128, 4128, ((4, 32), (8, 32), "dense")),
    (3, 1, 6, 1152, ("dense", (3, 128), (6, 64))),
    (2, 2, 10, 96, ("dense", "dense", "dense")),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("shape", QKV_SHAPES, ids=lambda s: f"h{s[0]}kv{s[1]}d{s[2]}k{s[3]}")
def test_norm_qkv_rope(gpu_backend, shape, traditional, dtype):
    h, kvh, d, k, fmts = shape
    q, kk, v = _w(h * d, k, fmts[0], dtype), _w(kvh * d, k, fmts[1], dtype), _w(kvh * d, k,
                                                                              fmts[2], dtype)
    g = (1 + 0.1 * mx.random.normal((k,))).astype(dtype)
    freqs = 10000.0 ** (mx.arange(0, d, 2) / d) * 2.0
    for xshape, offset, fr, nw in (((1, 1, k), 17, None, g), ((2, 3, k), 0, freqs, g),
                                   ((5, k), 1000, None, None)):
        x = _x(xshape, dtype)
        kw = dict(n_heads=h, n_kv_heads=kvh, head_dim=d, offset=offset, rope_base=500000.0,
                  rope_scale=0.25 if fr is None else 1.0, rope_traditional=traditional,
                  rope_freqs=fr)
        got = norm_qkv_rope(x, nw, 1e-5, q, kk, v, **kw, backend=gpu_backend)
        want = _ref(lambda be: norm_qkv_rope(x, nw, 1e-5, q, kk, v, **kw, backend=be))
        for name, a, b in zip("qkv", got, want):
            assert a.shape == b.shape
            # |RoPE angle| reaches offset * inv_freq: float32 sin/cos of large angles differ
            # by ~|theta| * 2^-24 between implementations.
            assert_close(a, b, dtype, k=k, msg=f"{name} shape={xshape} offset={offset}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("variant", ["weight", "plain", "bias", "plain_bias"])
@pytest.mark.parametrize("shape", QKV_SHAPES, ids=lambda s: f"h{s[0]}kv{s[1]}d{s[2]}k{s[3]}")
def test_norm_qkv_rope_joint_kv(gpu_backend, shape, variant, dtype):
    """Keys and values in one output (the joint-buffer KV cache's input): the halves of
    each row are bitwise the kernel's separate k and v, and match the reference."""
    h, kvh, d, k, fmts = shape
    bias = "bias" in variant
    q, kk, v = (_w(h * d, k, fmts[0], dtype, bias=bias), _w(kvh * d, k, fmts[1], dtype, bias=bias),
                _w(kvh * d, k, fmts[2], dtype, bias=bias))
    g = None if variant.startswith("plain") else (1 + 0.1 * mx.random.normal((k,))).astype(dtype)
    for xshape, offset in (((1, 1, k), 300), ((3, 1, k), 5), ((2, 3, k), 0), ((5, k), 77)):
        x = _x(xshape, dtype)
        kw = dict(n_heads=h, n_kv_heads=kvh, head_dim=d, offset=offset, rope_base=500000.0)
        gq, gkv = norm_qkv_rope(x, g, 1e-5, q, kk, v, **kw, joint_kv=True, backend=gpu_backend)
        sq, sk, sv = norm_qkv_rope(x, g, 1e-5, q, kk, v, **kw, backend=gpu_backend)
        assert gkv.shape == tuple(xshape[:-1]) + (2 * kvh * d,)
        assert mx.array_equal(gq, sq).item()
        assert mx.array_equal(gkv, mx.concatenate([sk, sv], axis=-1)).item()
        wq, wkv = _ref(lambda be: norm_qkv_rope(x, g, 1e-5, q, kk, v, **kw, joint_kv=True,
                                                backend=be))
        assert_close(gq, wq, dtype, k=k, msg=f"q shape={xshape}")
        assert_close(gkv, wkv, dtype, k=k, msg=f"kv shape={xshape}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("joint_kv", [False, True])
@pytest.mark.parametrize("shape", QKV_SHAPES + [(16, 8, 128, 1024, ((4, 64),) * 3)],
                         ids=lambda s: f"h{s[0]}kv{s[1]}d{s[2]}k{s[3]}")
def test_norm_qkv_without_rope(gpu_backend, shape, joint_kv, dtype):
    """rope=False (Qwen3's projections, before its per-head norms): the GPU kernel
    against the reference, which is the plain projections."""
    h, kvh, d, k, fmts = shape
    q, kk, v = (_w(h * d, k, fmts[0], dtype, bias=True), _w(kvh * d, k, fmts[1], dtype),
                _w(kvh * d, k, fmts[2], dtype))
    g = (1 + 0.1 * mx.random.normal((k,))).astype(dtype)
    for xshape in ((1, 1, k), (3, 1, k), (2, 3, k)):
        x = _x(xshape, dtype)
        kw = dict(n_heads=h, n_kv_heads=kvh, head_dim=d, offset=0, rope=False,
                  joint_kv=joint_kv)
        got = norm_qkv_rope(x, g, 1e-5, q, kk, v, **kw, backend=gpu_backend)
        want = _ref(lambda be: norm_qkv_rope(x, g, 1e-5, q, kk, v, **kw, backend=be))
        for a, b in zip(got, want):
            assert a.shape == b.shape
            assert_close(a, b, dtype, k=k, msg=f"shape={xshape}")


@pytest.fixture
def split_k(monkeypatch, tmp_path):
    """Every fused GEMV of the ops with split K (the SIMD-groups of a threadgroup share
    its rows); an empty tuning file, so no stored choice overrides it."""
    from mlx_foundry.bench import tuner

    monkeypatch.setenv(tuner.ENV_DIR, str(tmp_path))
    monkeypatch.setattr(lin, "DEFAULT_SPLITK", 1)
    monkeypatch.setattr(lin, "_TUNED", {})


@pytest.fixture(params=[2, 3], ids=["unroll2", "unroll3"])
def unrolled(request, monkeypatch, tmp_path):
    """Every fused GEMV of the ops with its loop over K unrolled (``UNROLL``; 3 leaves a
    remainder on some lanes' trip counts here); an empty tuning file, so no stored choice
    overrides it."""
    from mlx_foundry.bench import tuner

    monkeypatch.setenv(tuner.ENV_DIR, str(tmp_path))
    monkeypatch.setattr(lin, "DEFAULT_UNROLL", request.param)
    monkeypatch.setattr(lin, "_TUNED", {})
    return request.param


@pytest.fixture
def bounded(monkeypatch, tmp_path):
    """Every fused GEMV of the ops under a register bound (``MINBLOCKS``: five
    threadgroups per SM, as many as fit for wider ones); an empty tuning file, so no
    stored choice overrides it. The bound changes registers and spills, never results."""
    from mlx_foundry.bench import tuner

    monkeypatch.setenv(tuner.ENV_DIR, str(tmp_path))
    monkeypatch.setattr(lin, "_TUNED", {})
    default = lin.default_launch

    def launch(*args, **kwargs):
        params = default(*args, **kwargs)
        return dict(params, MINBLOCKS=min(5, 2048 // params["THREADS"]))

    monkeypatch.setattr(lin, "default_launch", launch)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_register_bound_every_op(gpu_backend, bounded, dtype):
    """MINBLOCKS over the awkward shapes of every GEMV op (the CUDA compiler spills where
    the bound asks for fewer registers than a kernel holds; Metal ignores it)."""
    _check_every_gemv_op(gpu_backend, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_split_k_every_op(gpu_backend, split_k, dtype):
    """Split K over awkward shapes: N below one threadgroup, K not a multiple of the
    SIMD-group stride, one and several rows, dual (mixed formats) and Q/K/V."""
    _check_every_gemv_op(gpu_backend, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_unroll_every_op(gpu_backend, unrolled, dtype):
    """The loop over K unrolled, over the same shapes: the float and packed-half paths,
    with and without split K (the default launch chooses it per shape), several rows of
    x, dual and Q/K/V."""
    assert lin.default_launch(203, 2880)["UNROLL"] == unrolled
    _check_every_gemv_op(gpu_backend, dtype)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("split", [False, True], ids=["rows", "splitk"])
def test_staged_x_at_the_largest_row(gpu_backend, monkeypatch, tmp_path, split, dtype):
    """One row of x at K = 14336 (Llama-3-8B's down projection), staged in threadgroup
    memory in half without split K (30 KB, near the budget; in bfloat16 it is over the
    budget, and with split K each SIMD-group reads its slice: the lanes load x
    themselves):
    plain, normed and dual GEMVs with and without split K, N = 83 leaving SIMD-groups of
    the last threadgroup past the last row."""
    from mlx_foundry.bench import tuner

    monkeypatch.setenv(tuner.ENV_DIR, str(tmp_path))
    monkeypatch.setattr(lin, "_TUNED", {})
    if not split:
        monkeypatch.setattr(lin, "SPLIT_MIN_K", 1 << 30)
    k, n = 14336, 83
    assert lin.default_launch(n, k)["SPLITK"] == int(split)
    units = xstage_units(Bound(x=mx.zeros((1, k), dtype), SPLITK=int(split)),
                         [affine_policy(4, 64)])
    assert (units > 1) == (dtype == mx.float16 and not split)
    w, up = _w(n, k, (4, 64), dtype), _w(n, k, (4, 64), dtype)
    g = (1 + 0.1 * mx.random.normal((k,))).astype(dtype)
    x, r = _x((1, k), dtype), _x((1, n), dtype)
    cases = {
        "linear+residual": lambda be: linear(x, w, residual=r, backend=be),
        "norm_linear": lambda be: norm_linear(x, g, 1e-5, w, backend=be),
        "rms_linear": lambda be: norm_linear(x, None, 1e-5, w, backend=be),
        "gate_up": lambda be: norm_gate_up_swiglu(x, g, 1e-5, w, up, backend=be),
    }
    for name, fn in cases.items():
        assert_close(fn(gpu_backend), _ref(fn), dtype, k=k, msg=name)


def _check_every_gemv_op(gpu_backend, dtype):
    """Every fused GEMV op against its reference at awkward shapes, with the default
    launch of the test's fixture."""
    for fmt, n, k in (((4, 64), 203, 2880), ((8, 32), 64, 4128), ("dense", 99, 1000),
                      ((3, 128), 7, 1152), ((4, 32), 1, 4128)):
        w = _w(n, k, fmt, dtype, bias=True)
        for m in (1, 3):
            x = _x((m, k), dtype)
            got = linear(x, w, activation="silu", backend=gpu_backend)
            want = _ref(lambda be: linear(x, w, activation="silu", backend=be))
            assert_close(got, want, dtype, k=k, msg=f"linear {fmt} n={n} k={k} m={m}")
    w = _w(150, 2880, (4, 64), dtype)
    g = (1 + 0.1 * mx.random.normal((2880,))).astype(dtype)
    x, r = _x((2, 2880), dtype), _x((2, 150), dtype)
    got = norm_linear(x, g, 1e-5, w, residual=r, backend=gpu_backend)
    assert_close(got, _ref(lambda be: norm_linear(x, g, 1e-5, w, residual=r, backend=be)),
                 dtype, k=2880, msg="norm_linear")
    for gf, uf, k in (((4, 64), (4, 64), 2880), ((8, 32), "dense", 4128)):
        gate, up = _w(150, k, gf, dtype), _w(150, k, uf, dtype)
        gk = (1 + 0.1 * mx.random.normal((k,))).astype(dtype)
        x = _x((1, 1, k), dtype)
        got = norm_gate_up_swiglu(x, gk, 1e-6, gate, up, backend=gpu_backend)
        want = _ref(lambda be: norm_gate_up_swiglu(x, gk, 1e-6, gate, up, backend=be))
        assert_close(got, want, dtype, k=k, msg=f"gate_up {gf}/{uf}")
    for h, kvh, d, k, fmts in QKV_SHAPES[:2]:
        q, kk, v = (_w(h * d, k, fmts[0], dtype), _w(kvh * d, k, fmts[1], dtype),
                    _w(kvh * d, k, fmts[2], dtype))
        for trad in (False, True):
            x = _x((1, 2, k), dtype)
            kw = dict(n_heads=h, n_kv_heads=kvh, head_dim=d, offset=33, rope_traditional=trad)
            got = norm_qkv_rope(x, None, 1e-5, q, kk, v, **kw, backend=gpu_backend)
            want = _ref(lambda be: norm_qkv_rope(x, None, 1e-5, q, kk, v, **kw, backend=be))
            for name, a, b in zip("qkv", got, want):
                assert_close(a, b, dtype, k=k, msg=f"qkv {name} d={d} trad={trad}")
            _, kv = norm_qkv_rope(x, None, 1e-5, q, kk, v, **kw, joint_kv=True,
                                  backend=gpu_backend)
            assert mx.array_equal(kv, mx.concatenate(got[1:], axis=-1)).item()


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("rows,threads", [(1, 32), (8, 256), (3, 96), (16, 64)])
def test_split_k_launch_parameters(gpu_backend, rows, threads, dtype):
    k = 2880
    w = _w(203, k, (4, 64), dtype)
    x = _x((2, k), dtype)
    kern = linear_kernel(w.signature())
    got = kern(x=x, **w.inputs("w"), ROWS=rows, THREADS=threads, SPLITK=1, backend=gpu_backend)
    assert_close(got, _ref(lambda be: linear(x, w, backend=be)), dtype, k=k)


@pytest.mark.parametrize("split", [0, 1])
@pytest.mark.parametrize("fmt", [(4, 64), "dense"], ids=["q4g64", "dense"])
def test_row_blocks_past_grid_y(gpu_backend, fmt, split):
    """70001 one-row blocks: grid (3, 32768, 3), the last z step mostly past the rows."""
    dtype, k, n = mx.float16, 128, 70001
    w = _w(n, k, fmt, dtype)
    x = _x((3, k), dtype)
    kern = linear_kernel(w.signature())
    got = kern(x=x, **w.inputs("w"), ROWS=1, THREADS=32 * (1 + split), SPLITK=split,
               backend=gpu_backend)
    assert got.shape == (3, n)
    assert_close(got, _ref(lambda be: linear(x, w, backend=be)), dtype, k=k)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("with_weight", [True, False])
def test_norm_qkv_rope_biases(gpu_backend, with_weight, dtype):
    """Qwen2-style projection biases (only q and k here: v's is zero-filled)."""
    k, h, kvh, d = 2880, 4, 2, 64
    q, kk = _w(h * d, k, (4, 64), dtype, bias=True), _w(kvh * d, k, (8, 64), dtype, bias=True)
    v = _w(kvh * d, k, (4, 32), dtype)
    g = (1 + 0.1 * mx.random.normal((k,))).astype(dtype) if with_weight else None
    x = _x((2, 1, k), dtype)
    kw = dict(n_heads=h, n_kv_heads=kvh, head_dim=d, offset=7, rope_traditional=False)
    got = norm_qkv_rope(x, g, 1e-5, q, kk, v, **kw, backend=gpu_backend)
    want = _ref(lambda be: norm_qkv_rope(x, g, 1e-5, q, kk, v, **kw, backend=be))
    for a, b in zip(got, want):
        assert_close(a, b, dtype, k=k)


def test_norm_qkv_rope_offset_array(gpu_backend):
    dtype, k = mx.float16, 256
    q, kv = _w(128, k, (4, 64), dtype), _w(64, k, (4, 64), dtype)
    x = _x((1, 1, k), dtype)
    kw = dict(n_heads=4, n_kv_heads=2, head_dim=32)
    got = norm_qkv_rope(x, None, 1e-5, q, kv, kv, **kw, offset=mx.array(41), backend=gpu_backend)
    want = _ref(lambda be: norm_qkv_rope(x, None, 1e-5, q, kv, kv, **kw, offset=41, backend=be))
    for a, b in zip(got, want):
        assert_close(a, b, dtype, k=k)


@pytest.mark.parametrize("bits", [4, 8])
def test_half_path_large_activations(gpu_backend, bits):
    """Half activations with 4/8-bit weights take the packed-half path (half products and
    partial sums, flushed to float every 4 products per half lane). Activations of scale
    30 with one outlier of 3000 (and 20000 times a gamma of 2 ahead of the RMSNorm scale)
    must stay finite and accurate. The half partial sums err relative to the activation
    scale, and the f16 tolerance is defined for unit-scale activations, so the plain
    linear is compared divided by that scale; the norm-fused one is normalised already."""
    dtype, k, scale = mx.float16, 4096, 30.0
    w = _w(99, k, (bits, 64), dtype)
    x = _x((1, k), dtype) * scale
    x = mx.where(mx.arange(k) == 7, mx.array(3000.0, dtype), x)
    got = linear(x, w, backend=gpu_backend)
    assert bool(mx.isfinite(got).all())
    want = _ref(lambda be: linear(x, w, backend=be))
    assert_close(got.astype(mx.float32) / scale, want.astype(mx.float32) / scale, dtype, k=k)
    xr = mx.where(mx.arange(k) == 11, mx.array(20000.0, dtype), _x((1, k), dtype) * 50)
    g = (1 + 0.1 * mx.random.normal((k,))).astype(dtype)
    g = mx.where(mx.arange(k) == 11, mx.array(2.0, dtype), g)
    got = norm_linear(xr, g, 1e-5, w, backend=gpu_backend)
    assert bool(mx.isfinite(got).all())
    assert_close(got, _ref(lambda be: norm_linear(xr, g, 1e-5, w, backend=be)), dtype, k=k)


def _f32(w):
    """``w`` with float32 scales and biases (exact: they are bf16 or f16 values)."""
    f = (lambda a: None if a is None else a.astype(mx.float32))
    return Weight(w.weight, f(w.scales), f(w.biases), f(w.bias), group_size=w.group_size,
                  bits=w.bits)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("scale", [1e-30, 1e6], ids=["tiny", "huge"])
def test_bf16_path_outside_half_range(gpu_backend, fused_rows, bits, scale):
    """bfloat16 activations with 4/8-bit weights take the packed-half path, converted to
    half per 32-element chunk with a power-of-two scale. Rows far outside half's range
    (1e-30 and 1e6 times unit normals; in row 1 an outlier 300 times that, in row 2 the
    first 1024 elements zero, so whole chunks are zero) and a norm weight spread over
    2^-6 .. 2^6 (so that sum(x^2) and sum((x * gamma)^2) differ by far more than the
    tolerance) must match the float32 reference of the same bf16 inputs.

    The oracle is float32 (MLX's CPU bf16 quantized matmul sums in bf16 and errs by
    several percent). Each row is compared relative to its own largest reference output:
    the kernel's error is relative to the row's scale (half products, bf16 output), and
    one global maximum would hide an error in a small row. Bound: the half rounding of x *
    gamma (2^-11 relative), half partial sums of 4 products and the bf16 output (2^-9):
    2e-2 of the row's largest output leaves ~4x margin at K = 4096 and still fails an
    RMSNorm taken over x * gamma or a chunk scaled back by the wrong power of two."""
    dtype, k, m = mx.bfloat16, 4096, 3
    w = _w(99, k, (bits, 64), dtype)
    col, row = mx.arange(k)[None, :], mx.arange(m)[:, None]
    x = _x((m, k), mx.float32)
    x = mx.where((row == 1) & (col == 7), 300.0, x)
    x = mx.where((row == 2) & (col < 1024), 0.0, x)
    x = (x * scale).astype(dtype)
    g = mx.power(2.0, mx.random.uniform(-6, 6, (k,))).astype(dtype)
    gate, up = _w(99, k, (bits, 64), dtype), _w(99, k, (4, 64), dtype)
    x32, g32 = x.astype(mx.float32), g.astype(mx.float32)
    ops = {
        "linear": lambda be, x, g, w, gate, up: linear(x, w, backend=be),
        "norm_linear": lambda be, x, g, w, gate, up: norm_linear(x, g, 1e-5, w, backend=be),
        "norm_linear_plain": lambda be, x, g, w, gate, up: norm_linear(x, None, 1e-5, w,
                                                                       backend=be),
        "gate_up": lambda be, x, g, w, gate, up: norm_gate_up_swiglu(x, g, 1e-5, gate, up,
                                                                     backend=be),
    }
    if scale < 1:
        # silu(gate) * up of normalised 1e-30 rows (~3e-28 each, RMSNorm's eps dominates)
        # is ~1e-55: zero in float32 for the reference too, nothing to compare.
        del ops["gate_up"]
    for name, op in ops.items():
        got = op(gpu_backend, x, g, w, gate, up)
        assert got.dtype == dtype, name
        got = got.astype(mx.float32)
        want = _ref(lambda be: op(be, x32, g32, _f32(w), _f32(gate), _f32(up)))
        assert bool(mx.isfinite(got).all()), name
        top = mx.abs(want).max(axis=-1, keepdims=True)
        assert bool((top > 0).all()), name
        err = (mx.abs(got - want) / top).max(axis=-1)
        assert bool((err <= 2e-2).all()), f"{name}: error / row maximum {err.tolist()}"


MBLOCK_CASES = [  # (format, K): the packed-half path (4/8-bit, f16) and the float path
    ((4, 64), 2880), ((8, 32), 4128), ((5, 32), 4128), ("dense", 1000)]


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("m", [2, 5, 7])
@pytest.mark.parametrize("fmt,k", MBLOCK_CASES, ids=lambda v: str(v))
def test_rows_of_x_per_simdgroup(gpu_backend, fused_rows, fmt, k, m, dtype):
    """MBLOCK rows of x share each SIMD-group's weight loads: every op, the default launch
    and explicit ones (with and without split K, M not a multiple of MBLOCK)."""
    n = 77
    w = _w(n, k, fmt, dtype, bias=True)
    x = _x((m, k), dtype)
    r = _x((m, n), dtype)
    g = (1 + 0.1 * mx.random.normal((k,))).astype(dtype)
    gate, up = _w(n, k, fmt, dtype), _w(n, k, fmt, dtype)
    ops = {
        "linear": lambda be, **kw: linear(x, w, activation="silu", residual=r, backend=be),
        "norm_linear": lambda be, **kw: norm_linear(x, g, 1e-5, w, residual=r, backend=be),
        "norm_linear_plain": lambda be, **kw: norm_linear(x, None, 1e-5, w, backend=be),
        "gate_up": lambda be, **kw: norm_gate_up_swiglu(x, g, 1e-5, gate, up, backend=be),
    }
    from mlx_foundry.kernel import record_launches

    for name, op in ops.items():
        want = _ref(op)
        assert_close(op(gpu_backend), want, dtype, k=k, msg=f"{name} default launch")
        with record_launches() as rec:
            op("metal")
        program, args, kwargs = rec[0]
        # (3, 0, m): ROWS not dividing 32, lanes past ROWS * MBLOCK idle
        launches = [(4, 0, 2), (2, 1, m), (8, 0, 4), (3, 0, m), (4, 0, m)]
        if name != "gate_up":  # the 3-row default of tall weights (dual: too many sums)
            launches.append((8, 1, min(m, 3)))
        for rows, split, mblock in launches:
            # The dual GEMV's split-K partial sums cap MBLOCK (2 x ROWS x MBLOCK + MBLOCK
            # <= 32: 6 at ROWS 2, so M = 7 takes 6): the largest block it takes.
            while not lin.valid_launch({"ROWS": rows, "SPLITK": split, "MBLOCK": mblock},
                                       dual=name == "gate_up"):
                mblock -= 1
            got = program(*args, **dict(kwargs, ROWS=rows, THREADS=128, SPLITK=split,
                                        MBLOCK=mblock), backend=gpu_backend)
            assert_close(got, want, dtype, k=k,
                         msg=f"{name} ROWS={rows} SPLITK={split} MBLOCK={mblock}")


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=["f16", "bf16"])
def test_many_rows_fused(gpu_backend, fused_rows, dtype):
    k = 2880
    w = _w(96, k, (4, 64), dtype, bias=True)
    x = _x((40, k), dtype)
    assert_close(linear(x, w, activation="gelu", backend=gpu_backend),
                 _ref(lambda be: linear(x, w, activation="gelu", backend=be)), dtype, k=k)
    gate, up = _w(96, k, (4, 64), dtype), _w(96, k, (4, 64), dtype)
    assert_close(norm_gate_up_swiglu(x, None, 1e-5, gate, up, backend=gpu_backend),
                 _ref(lambda be: norm_gate_up_swiglu(x, None, 1e-5, gate, up, backend=be)), dtype, k=k)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_many_rows_route_to_mlx(gpu_backend, dtype):
    k = 2880
    m = lin.PREFILL_ROWS + 24
    w = _w(96, k, (4, 64), dtype, bias=True)
    x = _x((m, k), dtype)
    r = _x((m, 96), dtype)
    # MLX's own float32 GEMM uses TF32 on CUDA by default: compare float32 at half tolerance.
    tol = mx.float16 if dtype == mx.float32 else dtype
    assert_close(linear(x, w, activation="relu", residual=r, backend=gpu_backend),
                 _ref(lambda be: linear(x, w, activation="relu", residual=r, backend=be)), tol,
                 k=k)
    g = mx.ones((k,), dtype)
    assert_close(norm_linear(x, g, 1e-5, w, backend=gpu_backend),
                 _ref(lambda be: norm_linear(x, g, 1e-5, w, backend=be)), tol, k=k)
