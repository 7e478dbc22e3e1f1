"""GPU: the fused ops over interleaved weights (``ops.interleave``) against the same ops
over MLX's layout, and against the reference, over awkward shapes.

``PolicyAffineRows`` does ``PolicyAffine``'s arithmetic in the same order, so at the same
launch the two layouts give the same bits: that is the first oracle. The reference
(plain MLX ops on the CPU) is the second. Run: ``pytest -m gpu tests/test_gpu_interleave.py``.
"""

import importlib

import mlx.core as mx
import pytest

from mlx_foundry.ops import (Weight, interleave, linear, norm_gate_up_swiglu,
                             norm_qkv_rope)
from mlx_foundry.policies.affine import AFFINE_BITS

from tolerances import assert_close

pytestmark = pytest.mark.gpu
lin = importlib.import_module("mlx_foundry.ops.linear")

DTYPES = [mx.float16, mx.bfloat16, mx.float32]
DTYPE_IDS = ["f16", "bf16", "f32"]
# K a multiple of the group size; none a multiple of 512 (each row ends in a short record).
K_FOR_GROUP = {32: 4128, 64: 2880, 128: 1152}


def _pair(n, k, bits, gs, dtype, bias=False):
    """The same values as a Weight in MLX's layout and interleaved (2-byte scales: float16
    beside float32 activations)."""
    sdt = mx.float16 if dtype == mx.float32 else dtype
    w = (mx.random.normal((n, k)) / k ** 0.5).astype(sdt)
    b = mx.random.normal((n,)).astype(dtype) if bias else None
    wq, s, bi = mx.quantize(w, group_size=gs, bits=bits)
    plain = Weight(wq, s, bi, b, group_size=gs, bits=bits)
    rows = interleave(plain)
    mx.eval(rows.weight)
    return plain, rows


def _ref(fn):
    with mx.stream(mx.cpu):
        out = fn("reference")
        mx.eval(out)
    return out


def _same(got, want, msg=""):
    got, want = (got,) if isinstance(got, mx.array) else got, (
        (want,) if isinstance(want, mx.array) else want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, msg
        assert mx.array_equal(g, w).item(), f"{msg}: max diff {mx.abs(g - w).max().item()}"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bits", AFFINE_BITS)
def test_linear_every_format(gpu_backend, bits, group_size, dtype):
    """Every bit width and group size, 1 and 3 rows: the same bits as MLX's layout, and
    close to the reference."""
    k = K_FOR_GROUP[group_size]
    plain, rows = _pair(99, k, bits, group_size, dtype)
    for m in (1, 3):
        x = mx.random.normal((m, k)).astype(dtype)
        got = linear(x, rows, backend=gpu_backend)
        _same(got, linear(x, plain, backend=gpu_backend), f"m={m}")
        assert_close(got, _ref(lambda be: linear(x, rows, backend=be)), dtype, k=k,
                     msg=f"m={m}")


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("n,k", [(1, 64), (7, 960), (33, 4096), (4096, 14336),
                                 (14336, 4096), (5, 14400), (4097, 512)])
def test_linear_awkward_shapes(gpu_backend, n, k, dtype):
    """4-bit, group 64, the decode shapes and awkward ones (one output row, K under one
    record, K one group past a record, N one past a multiple of 4096), 1 to 7 rows of
    x, with a bias, SiLU and a residual."""
    plain, rows = _pair(n, k, 4, 64, dtype, bias=True)
    for m in (1, 2, 5, 7):
        x = mx.random.normal((m, k)).astype(dtype)
        r = mx.random.normal((m, n)).astype(dtype)
        got = linear(x, rows, activation="silu", residual=r, backend=gpu_backend)
        _same(got, linear(x, plain, activation="silu", residual=r, backend=gpu_backend),
              f"m={m}")
        if n * k <= 4096 * 4096:
            assert_close(got, _ref(lambda be: linear(x, rows, activation="silu", residual=r,
                                                     backend=be)), dtype, k=k, msg=f"m={m}")


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=["f16", "bf16"])
def test_gate_up(gpu_backend, dtype):
    """The fused gate/up pair: both interleaved, and one of each layout (8-bit gate)."""
    d, inter = 2880, 1031
    g_plain, g_rows = _pair(inter, d, 4, 64, dtype)
    u_plain, u_rows = _pair(inter, d, 4, 64, dtype)
    g8_plain, g8_rows = _pair(inter, d, 8, 32, dtype)
    gamma = mx.random.normal((d,)).astype(dtype)
    for m in (1, 4):
        x = mx.random.normal((m, d)).astype(dtype)
        got = norm_gate_up_swiglu(x, gamma, 1e-5, g_rows, u_rows, backend=gpu_backend)
        _same(got, norm_gate_up_swiglu(x, gamma, 1e-5, g_plain, u_plain, backend=gpu_backend),
              f"m={m}")
        mixed = norm_gate_up_swiglu(x, gamma, 1e-5, g8_rows, u_plain, backend=gpu_backend)
        _same(mixed, norm_gate_up_swiglu(x, gamma, 1e-5, g8_plain, u_plain,
                                         backend=gpu_backend), f"mixed m={m}")
        assert_close(mixed, _ref(lambda be: norm_gate_up_swiglu(x, gamma, 1e-5, g8_rows,
                                                                u_plain, backend=be)),
                     dtype, k=d, msg=f"mixed m={m}")


@pytest.mark.parametrize("joint_kv", [False, True])
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=["f16", "bf16"])
def test_qkv_rope(gpu_backend, dtype, joint_kv):
    """Q/K/V + RoPE with 32/8 heads of 128 over K = 4096 + 64 (a short last record)."""
    d, hd = 4160, 128
    ws = [_pair(h * hd, d, 4, 64, dtype) for h in (32, 8, 8)]
    gamma = mx.random.normal((d,)).astype(dtype)
    x = mx.random.normal((1, 1, d)).astype(dtype)

    def run(weights, be):
        return norm_qkv_rope(x, gamma, 1e-5, *weights, n_heads=32, n_kv_heads=8,
                             head_dim=hd, offset=17, rope_base=500000.0, joint_kv=joint_kv,
                             backend=be)

    got = run([w[1] for w in ws], gpu_backend)
    _same(got, run([w[0] for w in ws], gpu_backend))
    want = _ref(lambda be: run([w[1] for w in ws], be))
    for g, w in zip(got, want):
        assert_close(g, w, dtype, k=d)
