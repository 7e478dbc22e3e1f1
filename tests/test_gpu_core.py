"""The core on a real GPU: each descriptor kind against its reference."""

import mlx.core as mx
import pytest

from tolerances import assert_close

import core_kernels as ck

pytestmark = pytest.mark.gpu

DTYPES = [mx.float16, mx.bfloat16, mx.float32]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 3, 7, 33, 255, 257, 4097, 100003])
def test_elementwise_struct_params(gpu_backend, dtype, n):
    k = ck.axpb_kernel()
    x = ck.seeded((n,), dtype, seed=n)
    p = ck.AxpbParams(n=n, a=-1.5, b=0.25)
    out = k(x, params=p, backend=gpu_backend)
    assert out.shape == (n,) and out.dtype == dtype
    assert_close(out, k(x, params=p, backend="reference"), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, cols", [(1, 1), (1, 31), (5, 33), (7, 130), (64, 4097), (3, 14336)])
def test_threadgroup_simd_reduction(gpu_backend, dtype, rows, cols):
    k = ck.row_sum_kernel()
    x = ck.seeded((rows, cols), dtype, seed=rows * cols)
    out = k(x, scale=0.5, backend=gpu_backend)
    assert_close(out, k(x, scale=0.5, backend="reference"), mx.float32, k=cols)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, cols", [(1, 1), (1, 100), (3, 129), (17, 257), (4, 4128)])
def test_three_stage_compound(gpu_backend, dtype, rows, cols):
    k = ck.center_scale_relu_kernel()
    x = ck.seeded((rows, cols), dtype, seed=cols)
    out = k(x, scale=1.25, backend=gpu_backend)
    assert out.dtype == dtype
    assert_close(out, k(x, scale=1.25, backend="reference"), dtype, k=cols)


def test_same_name_different_constants_in_one_evaluation(gpu_backend):
    k = ck.row_sum_kernel()
    xa, xb = ck.seeded((4, 64), mx.float32, 1), ck.seeded((4, 96), mx.float32, 2)
    ya, yb = k(xa, scale=1.0, backend=gpu_backend), k(xb, scale=1.0, backend=gpu_backend)
    mx.eval(ya, yb)
    assert k.source(xa, scale=1.0, backend=gpu_backend).name != \
        k.source(xb, scale=1.0, backend=gpu_backend).name
    assert_close(ya, xa.sum(axis=1), mx.float32, k=64)
    assert_close(yb, xb.sum(axis=1), mx.float32, k=96)


def test_noncontiguous_inputs_are_made_contiguous(gpu_backend):
    k = ck.row_sum_kernel()
    x = ck.seeded((40, 64), mx.float32).T  # a transposed view
    assert_close(k(x, scale=1.0, backend=gpu_backend), x.sum(axis=1), mx.float32, k=40)
