"""Shared fixtures: the GPU backend (skips cleanly without one), where tests run, and
seeding."""

import functools
import importlib

import mlx.core as mx
import pytest

from mlx_foundry.backends import gpu_backend as _gpu_backend


def pytest_addoption(parser):
    parser.addoption(
        "--shard", default=None, metavar="K/N",
        help="run only the K-th of N interleaved parts (K from 1) of the tests selected: "
             "the GPU suite, longer than one device call, runs whole in N calls")


def _shard_of(spec):
    """``(k, n)`` of a ``--shard`` value ``"K/N"`` (1 <= K <= N), or a ``UsageError``."""
    try:
        k, n = (int(v) for v in spec.split("/"))
    except ValueError:
        k = n = 0
    if not 1 <= k <= n:
        raise pytest.UsageError(f"--shard must be K/N with 1 <= K <= N, got {spec!r}")
    return k, n


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """``--shard K/N``: keep every N-th test from the K-th, after ``-m`` and ``-k`` have
    chosen theirs (``trylast``). Interleaved, so that each part gets some of every
    heavy parametrized test; the same on every xdist worker, which collect alike."""
    spec = config.getoption("--shard")
    if spec is None:
        return
    k, n = _shard_of(spec)
    keep, drop = [], []
    for i, item in enumerate(items):
        (keep if i % n == k - 1 else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture
def gpu_backend():
    """``"cuda"`` or ``"metal"``; skips the test when this machine has neither."""
    backend = _gpu_backend()
    if backend is None:
        pytest.skip("no GPU backend (metal or cuda)")
    return backend


@pytest.fixture(autouse=True)
def _devices(request, monkeypatch):
    """Pin where each kind of test runs, so that a GPU machine runs what CI runs.

    Tests not marked ``gpu`` check the reference backend and the assembly; they were
    written for (and CI runs them on) a machine whose default device is the CPU. On a
    GPU machine the default device is the GPU, and backend selection would pick the
    fused kernels and MLX's GPU ops instead, against tolerances and token-parity checks
    that assume the CPU. So they run with the CPU as the default device; the GPU tests
    cover the kernels. (Subprocesses a test starts, such as ``bench`` runs, choose their
    own device: see ``test_ab_trees.py``.)

    In GPU tests the reference oracle is evaluated on the CPU stream: it must not share
    a failure mode with the code under test, and on MLX's CUDA backend float32 matmuls
    use TF32 by default, which is less precise than the float32 tolerances assume.
    """
    if request.node.get_closest_marker("gpu") is None:
        previous = mx.default_device()
        if previous != mx.cpu:
            # Before the switch: a first import of mlx_lm.generate here must make its
            # stream on the machine's own default device, which the GPU tests use.
            _generation_on_cpu(monkeypatch)
            mx.set_default_device(mx.cpu)
        try:
            yield
        finally:
            mx.set_default_device(previous)
        return
    from mlx_foundry.backends import reference

    original = reference.run

    def run_on_cpu(*args, **kwargs):
        with mx.stream(mx.cpu):
            out = original(*args, **kwargs)
            mx.eval(out)
        return out

    monkeypatch.setattr(reference, "run", run_on_cpu)
    yield


@functools.cache
def _cpu_generation_stream():
    return mx.new_thread_local_stream(mx.cpu)


def _generation_on_cpu(monkeypatch):
    """Point mlx-lm's generation at a CPU stream for this test (monkeypatch undoes it).

    ``mlx_lm.generate`` makes its ``generation_stream`` on the default device when it is
    imported (the GPU, on a GPU machine): the module global (``BatchGenerator`` reads
    it) and the default ``stream`` argument of ``generate_step``,
    ``speculative_generate_step`` and ``stream_generate``. Setting the default device
    later moves none of them.
    """
    try:
        # (``import mlx_lm.generate as gen`` would give the function mlx_lm exports.)
        gen = importlib.import_module("mlx_lm.generate")
    except ImportError:
        return
    gpu_stream = gen.generation_stream
    if gpu_stream.device == mx.cpu:
        return
    cpu = _cpu_generation_stream()
    monkeypatch.setattr(gen, "generation_stream", cpu)
    for name in ("generate_step", "speculative_generate_step", "stream_generate"):
        fn = getattr(gen, name, None)
        defaults = getattr(fn, "__defaults__", None) or ()
        if any(d is gpu_stream for d in defaults):
            monkeypatch.setattr(fn, "__defaults__", tuple(
                cpu if d is gpu_stream else d for d in defaults))


@pytest.fixture(autouse=True)
def _seed():
    mx.random.seed(0)
    yield
