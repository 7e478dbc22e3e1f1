"""The reference backend: the descriptor's composition of plain MLX ops.

It runs on any device (the CPU in CI) and is the oracle of every GPU test.
"""

import mlx.core as mx

from ..args import SCALAR_LANES, Scalar


def run(program, bound, constants):
    """Evaluate ``program``'s reference on bound arguments; return a list of arrays."""
    if program.reference_fn is None:
        raise NotImplementedError(
            f"[{program.name}] has no reference; pass reference= to run it on the "
            "reference backend."
        )
    b = bound.with_constants(constants)
    for a in program.inputs:
        v = b.get(a.name)
        if isinstance(a, Scalar) and isinstance(v, mx.array) and v.shape == (SCALAR_LANES,):
            b[a.name] = v[:1]  # a scalar in its kernel-input form: the value is element 0
    out = program.reference_fn(b)
    if not isinstance(out, (list, tuple)):
        out = [out]
    out = list(out)
    if len(out) != len(program.outputs):
        raise ValueError(f"[{program.name}] reference returned {len(out)} arrays for "
                         f"{len(program.outputs)} outputs.")
    # The oracle must agree with the kernel's declared outputs, or a test compares a
    # kernel with something it never computes.
    for o, v in zip(program.outputs, out):
        shape, dtype = o.resolve(b)
        if not isinstance(v, mx.array) or tuple(v.shape) != tuple(shape) or v.dtype != dtype:
            got = (f"shape {tuple(v.shape)}, {v.dtype}" if isinstance(v, mx.array)
                   else type(v).__name__)
            raise ValueError(f"[{program.name}] reference returned {got} for output "
                             f"{o.name!r}, declared as shape {tuple(shape)}, {dtype}.")
    return out
