"""ops.linear's repeat calls with a Weight (ops/_calls.py): the launch prepared by the first
call is taken again only while it is the launch the full path would make, through a
stand-in GPU backend (tests/fake_gpu.py) that runs the reference on the exact inputs."""

import importlib

import mlx.core as mx
import pytest

import core_kernels as ck
import mlx_foundry as mf
from fake_gpu import fake_gpu
from mlx_foundry import ops
from mlx_foundry.kernel import record_launches
from tolerances import assert_close

lin = importlib.import_module("mlx_foundry.ops.linear")
calls = importlib.import_module("mlx_foundry.ops._calls")


def _weight(n=48, k=128, bits=4, group_size=32, seed=0, bias=False):
    w = mx.random.normal((n, k), key=mx.random.key(seed)) * 0.1
    b = mx.random.normal((n,), key=mx.random.key(seed + 100)) if bias else None
    return ops.Weight(*mx.quantize(w, group_size=group_size, bits=bits), bias=b,
                      group_size=group_size, bits=bits)


def _entries(w):
    return len(w.__dict__.get("_calls", {}))


def _hits():
    return mf.cache_info().hits


def test_repeat_call_takes_the_prepared_launch(monkeypatch):
    record = fake_gpu(monkeypatch)
    w = _weight(seed=1)
    x = ck.seeded((1, 128), mx.float32, seed=2)
    y0 = ops.linear(x, w, backend="cuda")
    assert _entries(w) == 1
    hits = _hits()
    for seed in (3, 4):
        xs = ck.seeded((1, 128), mx.float32, seed=seed)
        assert_close(ops.linear(xs, w, backend="cuda"), ops.linear(xs, w, backend="reference"))
    assert _hits() == hits  # no plan lookup: the prepared launch ran
    assert record.calls["linear_affine_4_32"] == 3
    assert_close(y0, ops.linear(x, w, backend="reference"))


@pytest.mark.parametrize("opts", [{"activation": "silu"}, {"residual": True}, {"bias": True}])
def test_repeat_call_with_options(monkeypatch, opts):
    """Activation, residual (a varying input) and bias (a fixed one) on the repeat path."""
    fake_gpu(monkeypatch)
    w = _weight(seed=5, bias=opts.get("bias", False))
    act = opts.get("activation")
    for seed in (6, 7, 8):
        x = ck.seeded((1, 128), mx.float16, seed=seed)
        r = ck.seeded((1, 48), mx.float16, seed=seed + 10) if opts.get("residual") else None
        got = ops.linear(x, w, activation=act, residual=r, backend="cuda")
        want = ops.linear(x, w, activation=act, residual=r, backend="reference")
        assert got.shape == want.shape == (1, 48) and got.dtype == mx.float16
        assert_close(got, want)
    assert _entries(w) == 1


def test_new_shapes_dtypes_and_options_prepare_their_own(monkeypatch):
    fake_gpu(monkeypatch)
    w = _weight(seed=9)
    cases = [((1, 128), mx.float32, None), ((1, 128), mx.float16, None),
             ((2, 128), mx.float16, None), ((1, 1, 128), mx.float16, None),
             ((1, 128), mx.float16, "relu")]
    for i, (shape, dtype, act) in enumerate(cases):
        x = ck.seeded(shape, dtype, seed=20 + i)
        got = ops.linear(x, w, activation=act, backend="cuda")
        assert got.shape == shape[:-1] + (48,) and got.dtype == dtype
        assert_close(got, ops.linear(x, w, activation=act, backend="reference"))
    assert _entries(w) == len(cases)


def test_a_replaced_array_is_never_served_stale(monkeypatch):
    """A Weight whose arrays are replaced gets a launch of its new arrays."""
    fake_gpu(monkeypatch)
    w = _weight(seed=11)
    x = ck.seeded((1, 128), mx.float32, seed=12)
    ops.linear(x, w, backend="cuda")
    other = _weight(seed=13)
    w.weight, w.scales, w.biases = other.weight, other.scales, other.biases
    assert_close(ops.linear(x, w, backend="cuda"), ops.linear(x, other, backend="reference"))
    w.bias = mx.ones((48,))
    assert_close(ops.linear(x, w, backend="cuda"), ops.linear(x, w, backend="reference"))


def test_format_change_on_the_weight_is_checked_again(monkeypatch):
    fake_gpu(monkeypatch)
    w = _weight(seed=14)
    x = ck.seeded((1, 128), mx.float32, seed=15)
    ops.linear(x, w, backend="cuda")
    w.group_size = 100  # not a group size: the repeat path must not skip the checks
    with pytest.raises(ValueError, match="'group_size' must be one of"):
        ops.linear(x, w, backend="cuda")


def test_bad_inputs_after_a_prepared_call_are_named(monkeypatch):
    fake_gpu(monkeypatch)
    w = _weight(seed=16)
    ops.linear(ck.seeded((1, 128), mx.float32, seed=17), w, backend="cuda")
    with pytest.raises(ValueError, match="The last dimension of 'x' must equal"):
        ops.linear(mx.zeros((1, 64)), w, backend="cuda")
    with pytest.raises(ValueError, match="'x' must have a floating dtype"):
        ops.linear(mx.zeros((1, 128), mx.int32), w, backend="cuda")
    with pytest.raises(TypeError, match="'x' must be an mlx.core.array"):
        ops.linear([0.0] * 128, w, backend="cuda")
    with pytest.raises(ValueError, match="'residual' must have shape"):
        ops.linear(mx.zeros((1, 128)), w, residual=mx.zeros((1, 47)), backend="cuda")
    with pytest.raises(ValueError, match="'activation' must be None or one of"):
        ops.linear(mx.zeros((1, 128)), w, activation="swish", backend="cuda")
    with pytest.raises(ValueError, match="Unknown backend"):
        ops.linear(mx.zeros((1, 128)), w, backend="vulkan")


def test_cleared_caches_and_new_launches_prepare_again(monkeypatch):
    """clear_cache() (an edited source) and forget_launches() (a new tuning) make the
    kept launches stale."""
    fake_gpu(monkeypatch)
    w = _weight(seed=18)
    x = ck.seeded((1, 128), mx.float32, seed=19)
    ops.linear(x, w, backend="cuda")
    (_, first), = [(k, v[2]) for k, v in w._calls.items()]
    for drop in (mf.clear_cache, lin.forget_launches):
        before = calls.lookup(w, next(iter(w._calls)))
        assert before is not None
        drop()
        assert calls.lookup(w, next(iter(w._calls))) is None
        assert_close(ops.linear(x, w, backend="cuda"), ops.linear(x, w, backend="reference"))
        assert calls.lookup(w, next(iter(w._calls))) is not None


def test_recorded_and_reference_calls_are_not_kept(monkeypatch):
    fake_gpu(monkeypatch)
    w = _weight(seed=21)
    x = ck.seeded((1, 128), mx.float32, seed=22)
    ops.linear(x, w, backend="reference")
    assert _entries(w) == 0
    ops.linear(x, w, backend="cuda")
    with record_launches() as launches:
        ops.linear(x, w, backend="cuda")  # kept, but a recording must see the launch
    assert len(launches) == 1 and launches[0][0].name == "linear_affine_4_32"


def test_prefill_threshold_is_read_on_every_call(monkeypatch):
    """Rows past PREFILL_ROWS go to MLX's quantized_matmul even after a fused call of
    the same shape (the bench's prefill case raises the threshold and puts it back)."""
    record = fake_gpu(monkeypatch)
    w = _weight(seed=23)
    x = ck.seeded((4, 128), mx.float32, seed=24)
    monkeypatch.setattr(lin, "PREFILL_ROWS", 8)
    ops.linear(x, w, backend="cuda")
    n = record.calls["linear_affine_4_32"]
    monkeypatch.setattr(lin, "PREFILL_ROWS", 2)
    got = ops.linear(x, w, backend="cuda")
    assert record.calls["linear_affine_4_32"] == n  # MLX's op, not the kernel
    assert mx.array_equal(got, w.matmul(x)).item()


def test_entries_per_weight_are_bounded(monkeypatch):
    fake_gpu(monkeypatch)
    w = _weight(seed=25)
    for rows in range(1, lin.PREFILL_ROWS + 1):
        for dtype in (mx.float16, mx.float32, mx.bfloat16):
            ops.linear(mx.zeros((rows, 128), dtype), w, backend="cuda")
            assert 1 <= _entries(w) <= calls.MAX_ENTRIES


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32])
@pytest.mark.parametrize("rows,k,n", [(1, 4096, 4096), (1, 576, 1000), (3, 4096, 14336)])
def test_repeat_calls_on_the_gpu(gpu_backend, dtype, rows, k, n):
    """On the GPU every repeat call runs the kept launch (no plan lookup) and gives the
    very values of the same op called with the weight's arrays (the full path, the same
    kernel and launch), and the reference's within tolerance; a residual varies per call."""
    w = (mx.random.normal((n, k), key=mx.random.key(31)) / k ** 0.5).astype(dtype)
    wq, s, b = mx.quantize(w, group_size=64, bits=4)
    weight = ops.Weight(wq, s, b, group_size=64, bits=4)
    outs = []
    for seed in range(3):
        x = mx.random.normal((rows, k), key=mx.random.key(40 + seed)).astype(dtype)
        r = mx.random.normal((rows, n), key=mx.random.key(50 + seed)).astype(dtype)
        if seed == 1:
            hits = _hits()
        got = ops.linear(x, weight, residual=r, backend=gpu_backend)
        if seed >= 1:
            assert _hits() == hits
        full = ops.linear(x, wq, s, b, group_size=64, bits=4, residual=r, backend=gpu_backend)
        hits = _hits()
        with mx.stream(mx.cpu):
            want = ops.linear(x, weight, residual=r, backend="reference")
            mx.eval(want)
        outs.append((got, full, want))
    assert _entries(weight) == 1
    for got, full, want in outs:
        assert mx.array_equal(got, full).item()
        assert_close(got, want, dtype, k=k)
