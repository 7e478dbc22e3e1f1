"""The Metal backend: a :class:`KernelSource` -> ``mx.fast.metal_kernel``."""

import mlx.core as mx

from . import kernel_object


def build(src):
    """Create the MLX kernel object (compiled by MLX on first launch)."""
    return kernel_object(mx.fast.metal_kernel, src)


def threadgroup_declaration(ctype, name, count):
    return f"threadgroup {ctype} {name}[{count}];"


def wrap_header(header):
    return header


def body_preamble(body):
    return ""


def launch_attributes(outside, constants):
    """Launch attributes taken from the constants: none on Metal, where MLX's dispatch
    sets the threadgroup size and the compiler has no occupancy bound to take."""
    return ()


def launch_attribute_lines(name, attrs):
    return ""
