"""The Metal backend: a :class:`KernelSource` -> ``mx.fast.metal_kernel``."""

import mlx.core as mx


def build(src):
    """Create the MLX kernel object (compiled by MLX on first launch)."""
    return mx.fast.metal_kernel(
        name=src.name,
        input_names=list(src.input_names),
        output_names=list(src.output_names),
        source=src.body,
        header=src.header,
        ensure_row_contiguous=True,
    )


def threadgroup_declaration(ctype, name, count):
    return f"threadgroup {ctype} {name}[{count}];"


def wrap_header(header):
    return header


def body_preamble(body):
    return ""
