"""Where the suite's tests run (tests/conftest.py): the tests not marked ``gpu`` on the CPU
device, as in CI, on a GPU machine too; the GPU tests on the GPU. On a machine without a
GPU the first two checks hold trivially; on a GPU machine they are what keeps the CPU
tests' tolerances and token-parity checks meaningful."""

import os

import mlx.core as mx
import pytest

from mlx_foundry.backends import ENV_VAR, select_backend


def test_tests_not_marked_gpu_run_on_the_cpu():
    assert mx.default_device() == mx.cpu
    if not os.environ.get(ENV_VAR):
        assert select_backend() == "reference"


def _generation_streams():
    # importorskip returns the module itself (mlx_lm also exports a function "generate").
    gen = pytest.importorskip("mlx_lm.generate")
    streams = [gen.generation_stream]
    for fn in (gen.generate_step, gen.speculative_generate_step, gen.stream_generate):
        found = [d for d in fn.__defaults__ or ()
                 if isinstance(d, (mx.Stream, mx.ThreadLocalStream))]
        assert len(found) == 1, fn.__name__
        streams += found
    return streams


def test_mlx_lm_generation_runs_on_the_cpu_too():
    assert all(s.device == mx.cpu for s in _generation_streams())


@pytest.mark.gpu
def test_gpu_tests_run_on_the_gpu(gpu_backend):
    assert mx.default_device() == mx.gpu
    if not os.environ.get(ENV_VAR):
        assert select_backend() == gpu_backend
    # mlx-lm's stream is back on the GPU after the CPU tests moved it.
    assert all(s.device == mx.gpu for s in _generation_streams())


def test_mlx_lm_streams_are_moved_and_restored():
    """The fixture's move of mlx-lm's generation stream, on a stand-in for a GPU stream
    (this runs anywhere): every place that holds it gets the CPU stream, and undoing the
    test's monkeypatch puts the original back."""
    from conftest import _generation_on_cpu

    gen = pytest.importorskip("mlx_lm.generate")

    class FakeGPUStream:
        device = mx.gpu

    fns = (gen.generate_step, gen.speculative_generate_step, gen.stream_generate)
    fake = FakeGPUStream()
    with pytest.MonkeyPatch.context() as setup:
        # The module as it is on a GPU machine: its stream made on the GPU.
        setup.setattr(gen, "generation_stream", fake)
        for fn in fns:
            setup.setattr(fn, "__defaults__", tuple(
                fake if isinstance(d, (mx.Stream, mx.ThreadLocalStream)) else d
                for d in fn.__defaults__))
        with pytest.MonkeyPatch.context() as test:
            _generation_on_cpu(test)
            moved = [gen.generation_stream] + [d for fn in fns for d in fn.__defaults__
                                               if d is fake or isinstance(
                                                   d, mx.ThreadLocalStream)]
            assert len(moved) == 4 and all(s is not fake and s.device == mx.cpu
                                           for s in moved)
        assert gen.generation_stream is fake
        assert all(sum(d is fake for d in fn.__defaults__) == 1 for fn in fns)
