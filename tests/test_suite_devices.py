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


def test_mlx_lm_generation_runs_on_the_cpu_too():
    # importorskip returns the module itself (mlx_lm also exports a function "generate").
    gen = pytest.importorskip("mlx_lm.generate")
    for fn in (gen.generate_step, gen.speculative_generate_step):
        streams = [d for d in fn.__defaults__ or ()
                   if isinstance(d, (mx.Stream, mx.ThreadLocalStream))]
        assert streams and all(s.device == mx.cpu for s in streams), fn.__name__


@pytest.mark.gpu
def test_gpu_tests_run_on_the_gpu(gpu_backend):
    assert mx.default_device() == mx.gpu
    if not os.environ.get(ENV_VAR):
        assert select_backend() == gpu_backend

