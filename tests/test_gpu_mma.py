"""GPU: the tensor-core GEMV (``ROWS`` a multiple of 16 with half x and 4/8-bit affine
weights) and its SIMD-group primitive, against references from plain MLX ops.

``simd_quad_mma`` is checked in both of its implementations on the same device: the
tensor-core one (CUDA) and the plain-arithmetic one that Metal compiles (selected on
CUDA by ``MLX_FOUNDRY_PORTABLE_MMA``, tests/data/portable_mma.metal).
"""

import importlib
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_foundry as mf
from mlx_foundry.ops import Weight, linear, norm_gate_up_swiglu, norm_linear, norm_qkv_rope
from mlx_foundry.ops.linear import linear_kernel

from tolerances import assert_close

pytestmark = pytest.mark.gpu
lin = importlib.import_module("mlx_foundry.ops.linear")
mf.add_source_root(Path(__file__).parent / "data")

QUAD_MMA_SRC = """
// y[r] = sum_k a[r, k] x[k] for the 16 rows of a, with one SIMD-group: lane (g, t) feeds
// rows g and g + 8 at k = 16 s + 2 t (+1) and 16 s + 2 t + 8 (+1) of each step s.
template <int STEPS>
METAL_FUNC void quad_mma_rows(const device half* a, const device half* x, device float* y,
                              uint lane) {
  constexpr int KC = 16 * STEPS;
  const int g = int(lane) / 4;
  const int t = int(lane) % 4;
  float4 acc = float4(0.0f);
  for (int s = 0; s < STEPS; ++s) {
    const int k0 = 16 * s + 2 * t;
    const half2 a0 = half2(a[g * KC + k0], a[g * KC + k0 + 1]);
    const half2 a1 = half2(a[(g + 8) * KC + k0], a[(g + 8) * KC + k0 + 1]);
    const half2 a2 = half2(a[g * KC + k0 + 8], a[g * KC + k0 + 9]);
    const half2 a3 = half2(a[(g + 8) * KC + k0 + 8], a[(g + 8) * KC + k0 + 9]);
    const half2 b0 = half2(x[k0], x[k0 + 1]);
    const half2 b1 = half2(x[k0 + 8], x[k0 + 9]);
    simd_quad_mma(acc, a0, a1, a2, a3, b0, b1);
  }
  const float2 r = simd_quad_rows(acc);
  // Both shuffles in every lane (SIMD-group functions need uniform control flow).
  const float lo = simd_shuffle(r.x, ushort(4 * (lane % 8u)));
  const float hi = simd_shuffle(r.y, ushort(4 * (lane % 8u)));
  y[lane] = (lane & 8u) ? hi : lo;
}
"""


def _quad_kernel(portable):
    includes = (("portable_mma.metal",) if portable else ()) + ("utils/simd_mma.metal",)
    return mf.Kernel(
        "quad_mma_portable" if portable else "quad_mma",
        source_text=QUAD_MMA_SRC, function="quad_mma_rows", includes=includes,
        template=("STEPS",),
        args=[mf.Tensor("a", (mx.float16,), ndim=2), mf.Tensor("x", (mx.float16,), ndim=1),
              mf.Output("y", shape=lambda b: (32,), dtype=mx.float32),
              mf.Constant("STEPS", value=lambda b: b.a.shape[1] // 16)],
        attributes=("thread_index_in_simdgroup",),
        dispatch=lambda b: mf.DispatchConfig((1,), (32,)),
        reference=lambda b: mx.concatenate(
            [b.a.astype(mx.float32) @ b.x.astype(mx.float32)] * 2))


@pytest.mark.parametrize("portable", [False, True], ids=["tensor", "portable"])
@pytest.mark.parametrize("steps", [1, 7])
def test_simd_quad_mma_rows(gpu_backend, portable, steps):
    """Both implementations give the 16 row sums (products exact, float sums)."""
    a = mx.random.normal((16, 16 * steps), key=mx.random.key(steps)).astype(mx.float16)
    x = mx.random.normal((16 * steps,), key=mx.random.key(100 + steps)).astype(mx.float16)
    y = _quad_kernel(portable)(a, x, backend=gpu_backend)
    want = np.tile(np.array(a, dtype=np.float64) @ np.array(x, dtype=np.float64), 2)
    np.testing.assert_allclose(np.array(y), want, rtol=1e-5, atol=1e-5 * 16 * steps)


def _w(n, k, bits, gs, scale=1.0, key=0):
    w = mx.random.normal((n, k), key=mx.random.key(key)) / k ** 0.5 * scale
    return Weight(*mx.quantize(w.astype(mx.float16), group_size=gs, bits=bits), group_size=gs,
                  bits=bits)


def _ref(fn):
    with mx.stream(mx.cpu):
        out = fn("reference")
        mx.eval(out)
    return out


LAUNCHES = [(16, 128, 0), (16, 128, 1), (32, 128, 0), (32, 256, 1), (16, 32, 1), (32, 64, 0)]
# K per group size: chunk counts not a multiple of 4 (dead quads in the last step) where
# the group allows it, a single group, and more than one step per lane.
K_FOR_GROUP = {32: (2880, 4128, 96), 64: (2880, 1152, 192), 128: (2944, 1152, 128)}


@pytest.mark.parametrize("rows,threads,split", LAUNCHES,
                         ids=[f"r{r}t{t}s{s}" for r, t, s in LAUNCHES])
@pytest.mark.parametrize("bits,gs", [(4, 32), (4, 64), (4, 128), (8, 32), (8, 64)])
def test_tensor_gemv_launches_and_formats(gpu_backend, rows, threads, split, bits, gs):
    """Every launch of the tensor-core form over awkward shapes: N not a multiple of 16
    (one row too), K whose 32-element chunks are not a multiple of 4, one and three rows
    of x."""
    for n, k in zip((203, 1, 40, 7), K_FOR_GROUP[gs] + (K_FOR_GROUP[gs][0],)):
        w = _w(n, k, bits, gs, key=n)
        kern = linear_kernel(w.signature())
        for m in (1, 3):
            x = mx.random.normal((m, k), key=mx.random.key(m)).astype(mx.float16)
            got = kern(x=x, **w.inputs("w"), ROWS=rows, THREADS=threads, SPLITK=split,
                       backend=gpu_backend)
            assert_close(got, _ref(lambda be: linear(x, w, backend=be)), mx.float16, k=k,
                         msg=f"n={n} k={k} m={m}")


@pytest.mark.parametrize("bits", [4, 8])
def test_tensor_gemv_large_scales(gpu_backend, bits):
    """Scales of 63 and more take the two-operation dequantization (the one-FMA form
    needs -1024 * scale finite in half); mixed with small scales in one SIMD-group's step.
    Compared relative to the weights' scale (the f16 tolerance is for unit scale)."""
    k, n = 2048, 48
    big = mx.where(mx.arange(n)[:, None] % 5 == 0, 4e3, 1.0)  # every fifth row huge
    wf = mx.random.normal((n, k), key=mx.random.key(4)) * big
    w = Weight(*mx.quantize(wf.astype(mx.float16), group_size=64, bits=bits), group_size=64,
               bits=bits)
    assert float(mx.abs(w.scales.astype(mx.float32)).max()) >= 63.0
    x = (mx.random.normal((1, k), key=mx.random.key(5)) / k ** 0.5).astype(mx.float16)
    for rows, split in ((16, 1), (32, 0)):
        kern = linear_kernel(w.signature())
        got = kern(x=x, **w.inputs("w"), ROWS=rows, THREADS=128, SPLITK=split,
                   backend=gpu_backend)
        want = _ref(lambda be: linear(x, w, backend=be))
        assert bool(mx.isfinite(got).all())
        s = big[:, 0].reshape(1, n)  # the spread of each output
        assert_close(got.astype(mx.float32) / s, want.astype(mx.float32) / s, mx.float16,
                     k=k, msg=f"rows={rows}")


@pytest.mark.parametrize("rows,split", [(16, 1), (32, 0), (32, 1)])
def test_tensor_gemv_fused_ops(gpu_backend, monkeypatch, tmp_path, rows, split):
    """The norm, dual (gate/up) and Q/K/V stages on the tensor-core form, with and without
    a norm weight, RoPE in both layouts and projection biases."""
    from mlx_foundry.bench import tuner

    monkeypatch.setenv(tuner.ENV_DIR, str(tmp_path))
    monkeypatch.setattr(lin, "TENSOR_LAUNCH", {"ROWS": rows, "THREADS": 128, "SPLITK": split})
    monkeypatch.setattr(lin, "_TUNED", {})
    dt, k = mx.float16, 2880
    g = (1 + 0.1 * mx.random.normal((k,), key=mx.random.key(1))).astype(dt)
    x = mx.random.normal((2, k), key=mx.random.key(2)).astype(dt)
    w, r = _w(150, k, 4, 64), mx.random.normal((2, 150), key=mx.random.key(3)).astype(dt)
    for nw in (g, None):
        got = norm_linear(x, nw, 1e-5, w, residual=r, backend=gpu_backend)
        want = _ref(lambda be: norm_linear(x, nw, 1e-5, w, residual=r, backend=be))
        assert_close(got, want, dt, k=k, msg=f"norm_linear weight={nw is not None}")
    gate, up = _w(150, k, 4, 64, key=5), _w(150, k, 8, 32, key=6)
    got = norm_gate_up_swiglu(x[:1], g, 1e-6, gate, up, backend=gpu_backend)
    want = _ref(lambda be: norm_gate_up_swiglu(x[:1], g, 1e-6, gate, up, backend=be))
    assert_close(got, want, dt, k=k, msg="gate_up")
    h, kvh, d = 4, 2, 64
    q, kk, v = _w(h * d, k, 4, 64, key=7), _w(kvh * d, k, 4, 64, key=8), _w(kvh * d, k, 8, 64)
    for trad in (False, True):
        kw = dict(n_heads=h, n_kv_heads=kvh, head_dim=d, offset=29, rope_traditional=trad)
        xq = x.reshape(1, 2, k)
        got = norm_qkv_rope(xq, g, 1e-5, q, kk, v, **kw, backend=gpu_backend)
        want = _ref(lambda be: norm_qkv_rope(xq, g, 1e-5, q, kk, v, **kw, backend=be))
        for name, a, b in zip("qkv", got, want):
            assert_close(a, b, dt, k=k, msg=f"qkv {name} trad={trad}")


def test_tensor_gemv_is_the_default_for_half_and_4_or_8_bits():
    """Half x with 4/8-bit weights launches 16-row blocks; bf16 x does not."""
    from mlx_foundry.kernel import record_launches

    w = _w(64, 256, 4, 64)
    for dt, tensor in ((mx.float16, True), (mx.bfloat16, False)):
        lin.forget_launches()
        with record_launches() as rec:
            linear(mx.ones((1, 256), dt), w, backend="cuda")
        assert (rec[0][2]["ROWS"] % 16 == 0) == tensor, dt
