"""A stand-in for a GPU backend on machines without one.

``fake_gpu(monkeypatch)`` makes every specialization return a function with the
signature of the kernel objects ``mx.fast.cuda_kernel`` builds: it receives the
MLX input list exactly as a GPU launch would (padded tiny tensors, one-element
scalar arrays, struct bytes), maps it back to the program's arguments and runs
the reference. Tests of the launch plumbing (plans, prepared launches, the
mlx-lm patch) can then compare the GPU path with the reference on the CPU.
"""

import math

import mlx.core as mx

from mlx_foundry import kernel as kernel_module
from mlx_foundry.args import Bound, Params, Scalar, Tensor
from mlx_foundry.backends import reference as reference_backend


class FakeLaunches:
    """Counts launches per kernel name and keeps the last input list."""

    def __init__(self):
        self.calls = {}
        self.last_inputs = None

    def total(self):
        return sum(self.calls.values())


def _from_input(arg, value, like):
    if isinstance(arg, Scalar):
        return value[0]  # the kernel reads element 0 of SCALAR_LANES copies
    if isinstance(arg, Params):
        return like  # struct bytes: the reference reads the struct value
    if isinstance(arg, Tensor) and value.size != like.size:
        return value[: like.size].reshape(like.shape)  # padded tiny tensor
    if isinstance(arg, Tensor) and value.shape != like.shape:
        # A kernel reads row-contiguous memory: any shape of the same size is the same
        # input (PreparedLaunch.reshaped_inputs).
        return value.reshape(like.shape)
    return value


def fake_gpu(monkeypatch):
    """Route every non-reference specialization to the reference; returns FakeLaunches."""
    record = FakeLaunches()

    def specialize(self, key, backend, consts, bound, out_dtypes):
        program, example = self, dict(bound)

        def fn(*, inputs, output_shapes, output_dtypes, grid, threadgroup, stream=None):
            assert len(inputs) == len(program.inputs)
            record.calls[program.name] = record.calls.get(program.name, 0) + 1
            record.last_inputs = list(inputs)
            b = Bound({a.name: _from_input(a, v, example[a.name])
                       for a, v in zip(program.inputs, inputs)})
            outs = reference_backend.run(program, b, consts)
            # A kernel writes row-contiguous memory: the launch may declare any shape of
            # the same size (PreparedLaunch.reshaped).
            for o, shape, dtype in zip(outs, output_shapes, output_dtypes):
                assert o.size == math.prod(shape) and o.dtype == dtype
            return [mx.array(o).reshape(tuple(shape)) for o, shape in zip(outs, output_shapes)]

        return kernel_module._Launch(fn, None)

    monkeypatch.setattr(kernel_module.Program, "_specialize", specialize)
    return record
