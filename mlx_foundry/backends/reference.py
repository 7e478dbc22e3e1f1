"""The reference backend: the descriptor's composition of plain MLX ops.

It runs on any device (the CPU in CI) and is the oracle of every GPU test.
"""


def run(program, bound, constants):
    """Evaluate ``program``'s reference on bound arguments; return a list of arrays."""
    if program.reference_fn is None:
        raise NotImplementedError(
            f"[{program.name}] has no reference; pass reference= to run it on the "
            "reference backend."
        )
    out = program.reference_fn(bound.with_constants(constants))
    if not isinstance(out, (list, tuple)):
        out = [out]
    out = list(out)
    if len(out) != len(program.outputs):
        raise ValueError(f"[{program.name}] reference returned {len(out)} arrays for "
                         f"{len(program.outputs)} outputs.")
    return out
