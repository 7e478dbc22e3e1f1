"""ops.linear's repeat calls with a Weight (ops/_calls.py): the launch prepared by the
second call is taken again only while it is the launch the full path would make, through
a stand-in GPU backend (tests/fake_gpu.py) that runs the reference on the exact inputs."""

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


def _kept(w):
    """{key: what}: the launches (or states) kept for ``w``."""
    return {k: v[3] for k, v in calls._kept.get(w, {}).items()}  # (epoch, arrays, metas, what)


def _prepared(w):
    return [v for v in _kept(w).values() if v not in (calls.SEEN, calls.NEVER)]


def _hits():
    return mf.cache_info().hits


def _called(monkeypatch, seed, times=2, **weight_kw):
    """A stand-in GPU, a weight (``_weight(seed=seed, **weight_kw)``) and a row of ``x``,
    after ``times`` calls of linear (two: the launch is kept)."""
    fake_gpu(monkeypatch)
    w = _weight(seed=seed, **weight_kw)
    x = ck.seeded((1, 128), mx.float32, seed=seed + 1)
    for _ in range(times):
        ops.linear(x, w, backend="cuda")
    return w, x


def test_repeat_call_takes_the_prepared_launch(monkeypatch):
    """The first call only marks its key, the second prepares, the later ones run the
    prepared launch without a plan lookup."""
    record = fake_gpu(monkeypatch)
    w = _weight(seed=1)
    x = ck.seeded((1, 128), mx.float32, seed=2)
    y0 = ops.linear(x, w, backend="cuda")
    assert list(_kept(w).values()) == [calls.SEEN]
    y1 = ops.linear(x, w, backend="cuda")
    assert len(_prepared(w)) == 1
    hits = _hits()
    for seed in (3, 4):
        xs = ck.seeded((1, 128), mx.float32, seed=seed)
        assert_close(ops.linear(xs, w, backend="cuda"), ops.linear(xs, w, backend="reference"))
    assert _hits() == hits  # no plan lookup: the prepared launch ran
    assert record.calls["linear_affine_4_32"] == 4
    assert_close(y0, ops.linear(x, w, backend="reference"))
    assert mx.array_equal(y0, y1).item()


def _repeat(monkeypatch, w, make, calls_=4, **kw):
    """Call linear ``calls_`` times with ``make(i) -> (x, residual)``; from the third call
    on no plan lookup may happen. Returns [(got, want)]."""
    out = []
    for i in range(calls_):
        x, r = make(i)
        if i == 2:
            hits = _hits()
        got = ops.linear(x, w, residual=r, backend="cuda", **kw)
        if i >= 2:
            assert _hits() == hits, f"call {i} looked its plan up"
        out.append((got, ops.linear(x, w, residual=r, backend="reference", **kw)))
    return out


@pytest.mark.parametrize("opts", [{"activation": "silu"}, {"residual": True}, {"bias": True}])
def test_repeat_call_with_options(monkeypatch, opts):
    """Activation, residual (a varying input) and bias (a fixed one) on the repeat path."""
    fake_gpu(monkeypatch)
    w = _weight(seed=5, bias=opts.get("bias", False))

    def make(i):
        x = ck.seeded((1, 128), mx.float16, seed=6 + i)
        r = ck.seeded((1, 48), mx.float16, seed=16 + i) if opts.get("residual") else None
        return x, r
    for got, want in _repeat(monkeypatch, w, make, activation=opts.get("activation")):
        assert got.shape == want.shape == (1, 48) and got.dtype == mx.float16
        assert_close(got, want)
    assert len(_prepared(w)) == 1


def test_new_shapes_dtypes_and_options_prepare_their_own(monkeypatch):
    fake_gpu(monkeypatch)
    w = _weight(seed=9)
    cases = [((1, 128), mx.float32, None), ((1, 128), mx.float16, None),
             ((2, 128), mx.float16, None), ((1, 1, 128), mx.float16, None),
             ((1, 128), mx.float16, "relu")]
    for i, (shape, dtype, act) in enumerate(cases):
        make = lambda j: (ck.seeded(shape, dtype, seed=20 + 10 * i + j), None)  # noqa: E731
        for got, want in _repeat(monkeypatch, w, make, calls_=3, activation=act):
            assert got.shape == shape[:-1] + (48,) and got.dtype == dtype
            assert_close(got, want)
    assert len(_prepared(w)) == len(cases)


def test_a_weight_made_for_one_call_prepares_nothing(monkeypatch):
    """linear(x, Weight(w, s, b)) once: the key is marked, nothing is prepared."""
    fake_gpu(monkeypatch)
    w = _weight(seed=27)
    ops.linear(ck.seeded((1, 128), mx.float16, seed=28), w, backend="cuda")
    assert _prepared(w) == [] and list(_kept(w).values()) == [calls.SEEN]


def test_a_weight_stays_a_plain_object(monkeypatch):
    """Copying and pickling a Weight work after its calls (nothing is kept on it)."""
    import copy
    import pickle

    w, x = _called(monkeypatch, 29, times=3, bias=True)
    assert len(_prepared(w)) == 1 and "_calls" not in w.__dict__
    c = copy.deepcopy(w)
    assert mx.array_equal(c.weight, w.weight).item() and c.bias is not w.bias
    assert_close(ops.linear(x, c, backend="cuda"), ops.linear(x, w, backend="reference"))
    p = pickle.loads(pickle.dumps(w))
    assert mx.array_equal(p.scales, w.scales).item()


def test_a_replaced_array_is_never_served_stale(monkeypatch):
    """A Weight whose arrays are replaced gets a launch of its new arrays, and what its
    old arrays were kept for goes (the kept entries hold them no more)."""
    fake_gpu(monkeypatch)
    w = _weight(seed=11)
    x = ck.seeded((1, 128), mx.float32, seed=12)
    for rows in (1, 2):  # two kept launches
        for _ in range(2):
            ops.linear(mx.zeros((rows, 128)), w, backend="cuda")
    assert len(_prepared(w)) == 2
    old = w.weight
    other = _weight(seed=13)
    w.weight, w.scales, w.biases = other.weight, other.scales, other.biases

    def held():
        arrays = [a for e in calls._kept[w].values() for a in e[1]]
        return arrays + [v for what in _prepared(w) for v in what._inputs]
    for _ in range(2):  # first a shape not called before: a new key, the old ones unread
        ops.linear(mx.zeros((3, 128)), w, backend="cuda")
    assert len(_prepared(w)) == 1 and not any(a is old for a in held())
    for _ in range(3):
        assert_close(ops.linear(x, w, backend="cuda"), ops.linear(x, other, backend="reference"))
    assert len(_prepared(w)) == 2 and not any(a is old for a in held())
    for bias in (mx.ones((48,)), None):  # a bias added, then removed
        w.bias = bias
        for _ in range(3):
            assert_close(ops.linear(x, w, backend="cuda"), ops.linear(x, w, backend="reference"))


def test_format_change_on_the_weight_is_checked_again(monkeypatch):
    w, x = _called(monkeypatch, 14)
    w.group_size = 100  # not a group size: the repeat path must not skip the checks
    with pytest.raises(ValueError, match="'group_size' must be one of"):
        ops.linear(x, w, backend="cuda")


def test_bad_inputs_after_a_prepared_call_are_named(monkeypatch):
    w, _ = _called(monkeypatch, 16)
    assert len(_prepared(w)) == 1
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
    w, x = _called(monkeypatch, 18)
    key = next(iter(_kept(w)))
    for drop in (mf.clear_cache, lin.forget_launches):
        assert calls.lookup(w, key) not in (None, calls.SEEN, calls.NEVER)
        drop()
        assert calls.lookup(w, key) is None and _kept(w) == {}
        for _ in range(2):
            assert_close(ops.linear(x, w, backend="cuda"), ops.linear(x, w, backend="reference"))
        assert len(_prepared(w)) == 1


def test_a_launch_dropped_during_the_call_is_not_kept(monkeypatch):
    """A tuning (forget_launches) that lands while a call resolves its launch: what the
    call prepared is not kept, so the next call prepares the new launch."""
    fake_gpu(monkeypatch)
    w = _weight(seed=32)
    x = ck.seeded((1, 128), mx.float32, seed=33)
    ops.linear(x, w, backend="cuda")  # marks the key
    real = lin._launch

    def racing(*a, **kw):
        out = real(*a, **kw)
        lin.forget_launches()  # another thread's tuning, mid-call
        return out
    monkeypatch.setattr(lin, "_launch", racing)
    assert_close(ops.linear(x, w, backend="cuda"), ops.linear(x, w, backend="reference"))
    assert _prepared(w) == []
    monkeypatch.setattr(lin, "_launch", real)
    for _ in range(2):
        ops.linear(x, w, backend="cuda")
    assert len(_prepared(w)) == 1


def test_an_entry_of_an_older_epoch_is_never_taken(monkeypatch):
    """Another thread's tuning and lookup landing between keep()'s epoch check and its
    write leave an entry of the old epoch in a table already cleared for the new one:
    lookup checks every entry's epoch."""
    w, x = _called(monkeypatch, 46)
    key = next(iter(_kept(w)))
    entry = calls._kept[w][key]
    assert calls.lookup(w, key) is entry[3]
    lin.forget_launches()
    assert calls.lookup(w, key) is None  # clears the table for the new epoch
    calls._kept[w] = {key: entry}  # the late write of the old epoch's launch
    assert calls.lookup(w, key) is None


def test_a_padded_fixed_input_is_never_kept(monkeypatch):
    """A bias of under 8 elements is padded into a copy when a launch is prepared, which
    would miss an in-place update of the bias: such calls take the full path."""
    w, x = _called(monkeypatch, 34, times=3, n=4, bias=True)
    assert _prepared(w) == [] and list(_kept(w).values()) == [calls.NEVER]
    w.bias[0] = 100.0  # in place: the same array object
    assert_close(ops.linear(x, w, backend="cuda"), ops.linear(x, w, backend="reference"))


def test_recorded_and_reference_calls_are_not_kept(monkeypatch):
    fake_gpu(monkeypatch)
    w = _weight(seed=21)
    x = ck.seeded((1, 128), mx.float32, seed=22)
    ops.linear(x, w, backend="reference")
    assert _kept(w) == {}
    ops.linear(x, w, backend="cuda")
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
    for _ in range(3):
        ops.linear(x, w, backend="cuda")
    assert len(_prepared(w)) == 1
    n = record.calls["linear_affine_4_32"]
    monkeypatch.setattr(lin, "PREFILL_ROWS", 2)
    got = ops.linear(x, w, backend="cuda")
    assert record.calls["linear_affine_4_32"] == n  # MLX's op, not the kernel
    assert mx.array_equal(got, w.matmul(x)).item()
    monkeypatch.setattr(lin, "PREFILL_ROWS", 8)
    monkeypatch.setattr(lin, "MAX_FUSED_ROWS", 2)  # also read on every call
    got = ops.linear(x, w, backend="cuda")
    assert record.calls["linear_affine_4_32"] == n
    assert mx.array_equal(got, w.matmul(x)).item()


def test_entries_per_weight_are_bounded(monkeypatch):
    """Past MAX_ENTRIES the oldest entry goes; keys within the bound all stay kept."""
    fake_gpu(monkeypatch)
    monkeypatch.setattr(calls, "MAX_ENTRIES", 3)
    w = _weight(seed=25)
    shapes = [(rows, 128) for rows in (1, 2, 3)]
    for _ in range(3):  # three keys in turn: prepared once each, then taken
        for shape in shapes:
            ops.linear(mx.zeros(shape), w, backend="cuda")
    first = _prepared(w)
    assert len(first) == 3
    for shape in shapes:
        ops.linear(mx.zeros(shape), w, backend="cuda")
    assert _prepared(w) == first  # the same launches: none prepared again
    ops.linear(mx.zeros((4, 128)), w, backend="cuda")  # a fourth key: the oldest goes
    assert len(_kept(w)) == 3 and _prepared(w) == first[1:]


def test_an_in_place_dtype_promotion_is_not_served_stale(monkeypatch):
    """``bias += float32`` keeps the array object but makes it float32: the launch
    kept for a float16 bias (a kernel built for it) is not taken."""
    w, x = _called(monkeypatch, 36, bias=True)
    w.bias = w.bias.astype(mx.float16)
    for _ in range(2):
        ops.linear(x, w, backend="cuda")
    before = _prepared(w)
    assert len(before) == 1
    bias = w.bias
    bias += mx.ones((48,), mx.float32)
    assert w.bias is bias and w.bias.dtype == mx.float32
    key = next(iter(_kept(w)))
    assert calls.lookup(w, key) is None
    for _ in range(2):
        assert_close(ops.linear(x, w, backend="cuda"), ops.linear(x, w, backend="reference"))
    after = _prepared(w)
    assert len(after) == 1 and after[0] is not before[0]


def test_the_backend_is_chosen_on_every_call(monkeypatch):
    """With backend=None the environment picks it on every call: a launch kept for the
    GPU is not taken once MLX_FOUNDRY_BACKEND says reference."""
    record = fake_gpu(monkeypatch)
    w = _weight(seed=38)
    x = ck.seeded((1, 128), mx.float32, seed=39)
    monkeypatch.setenv("MLX_FOUNDRY_BACKEND", "cuda")
    for _ in range(3):
        ops.linear(x, w)
    n = record.calls["linear_affine_4_32"]
    assert len(_prepared(w)) == 1  # kept for the GPU (launch counts: earlier tests share plans)
    monkeypatch.setenv("MLX_FOUNDRY_BACKEND", "reference")
    assert_close(ops.linear(x, w), ops.linear(x, w, backend="reference"))
    assert record.calls["linear_affine_4_32"] == n


def test_a_residual_of_another_dtype_is_its_own_call(monkeypatch):
    w, x = _called(monkeypatch, 40, times=0)
    for dtype in (mx.float16, mx.float32):
        r = ck.seeded((1, 48), dtype, seed=41)
        for _ in range(3):
            assert_close(ops.linear(x, w, residual=r, backend="cuda"),
                         ops.linear(x, w, residual=r, backend="reference"))
    assert len(_prepared(w)) == 2


def test_an_array_replaced_during_a_call(monkeypatch):
    """A weight given new arrays while a call resolves its launch: that call computes
    with the arrays it began with, later calls with the new ones."""
    w, x = _called(monkeypatch, 42, times=1)
    other = _weight(seed=43)
    real = lin._launch

    def replacing(*a, **kw):
        w.weight, w.scales, w.biases = other.weight, other.scales, other.biases
        return real(*a, **kw)
    before = ops.linear(x, w, backend="reference")
    monkeypatch.setattr(lin, "_launch", replacing)
    assert_close(ops.linear(x, w, backend="cuda"), before)
    monkeypatch.setattr(lin, "_launch", real)
    for _ in range(3):
        assert_close(ops.linear(x, w, backend="cuda"), ops.linear(x, other, backend="reference"))
    assert len(_prepared(w)) == 1


def test_a_weight_subclass_takes_the_full_path(monkeypatch):
    class Tagged(ops.Weight):
        pass

    fake_gpu(monkeypatch)
    base = _weight(seed=44)
    w = Tagged(base.weight, base.scales, base.biases, group_size=32, bits=4)
    x = ck.seeded((1, 128), mx.float32, seed=45)
    for _ in range(3):
        assert_close(ops.linear(x, w, backend="cuda"), ops.linear(x, w, backend="reference"))
    assert _kept(w) == {}


def test_weights_hash_by_identity():
    """The kept launches are keyed by the Weight object (a WeakKeyDictionary): equal
    weights must stay distinct keys."""
    assert ops.Weight.__hash__ is object.__hash__ and ops.Weight.__eq__ is object.__eq__


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32])
@pytest.mark.parametrize("rows,k,n", [(1, 4096, 4096), (1, 576, 1000), (3, 4096, 14336)])
def test_repeat_calls_on_the_gpu(gpu_backend, dtype, rows, k, n):
    """On the GPU the calls after the second run the kept launch (no plan lookup); every
    call gives the very values of the same op called with the weight's arrays (the full
    path, the same kernel and launch), and the reference's within tolerance; a residual
    varies per call."""
    w = (mx.random.normal((n, k), key=mx.random.key(31)) / k ** 0.5).astype(dtype)
    wq, s, b = mx.quantize(w, group_size=64, bits=4)
    weight = ops.Weight(wq, s, b, group_size=64, bits=4)
    outs = []
    for seed in range(4):  # the first call marks the key, the second prepares
        x = mx.random.normal((rows, k), key=mx.random.key(40 + seed)).astype(dtype)
        r = mx.random.normal((rows, n), key=mx.random.key(50 + seed)).astype(dtype)
        if seed == 2:
            hits = _hits()
        got = ops.linear(x, weight, residual=r, backend=gpu_backend)
        if seed >= 2:
            assert _hits() == hits
        full = ops.linear(x, wq, s, b, group_size=64, bits=4, residual=r, backend=gpu_backend)
        hits = _hits()
        with mx.stream(mx.cpu):
            want = ops.linear(x, weight, residual=r, backend="reference")
            mx.eval(want)
        outs.append((got, full, want))
    assert len(_prepared(weight)) == 1
    for got, full, want in outs:
        assert mx.array_equal(got, full).item()
        assert_close(got, want, dtype, k=k)
