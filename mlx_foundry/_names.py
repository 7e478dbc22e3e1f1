"""Validation of names that reach generated kernel source.

Kernel, argument and value names become C identifiers in the text that MLX
compiles, and MLX finds ``x_shape``/``x_strides``/``x_ndim`` and the Metal
thread attributes by plain substring search of the body.  Every name that can
reach source text is checked here, once, when a descriptor is built.
"""

import keyword
import re

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Metal thread attributes MLX detects by substring (mlx/backend/common/metal_kernel.cpp).
METAL_ATTRIBUTES = {
    "dispatch_quadgroups_per_threadgroup": "uint",
    "dispatch_simdgroups_per_threadgroup": "uint",
    "dispatch_threads_per_threadgroup": "uint3",
    "grid_origin": "uint3",
    "grid_size": "uint3",
    "quadgroup_index_in_threadgroup": "uint",
    "quadgroups_per_threadgroup": "uint",
    "simdgroup_index_in_threadgroup": "uint",
    "simdgroups_per_threadgroup": "uint",
    "thread_execution_width": "uint",
    "thread_index_in_quadgroup": "uint",
    "thread_index_in_simdgroup": "uint",
    "thread_index_in_threadgroup": "uint",
    "thread_position_in_grid": "uint3",
    "thread_position_in_threadgroup": "uint3",
    "threadgroup_position_in_grid": "uint3",
    "threadgroups_per_grid": "uint3",
    "threads_per_grid": "uint3",
    "threads_per_simdgroup": "uint",
    "threads_per_threadgroup": "uint3",
}

# Words of C++/Metal/CUDA that must not be used as argument or value names.
_RESERVED = {
    "device", "constant", "thread", "threadgroup", "kernel", "half", "float", "int",
    "uint", "bool", "char", "uchar", "short", "ushort", "long", "ulong", "bfloat",
    "void", "auto", "template", "typename", "struct", "class", "const", "static",
    "return", "if", "else", "for", "while", "do", "switch", "case", "default",
    "break", "continue", "namespace", "using", "inline", "operator", "this",
    "true", "false", "metal", "fast", "precise", "sizeof", "new", "delete",
    "threadIdx", "blockIdx", "blockDim", "gridDim", "signed", "unsigned",
}


def check_identifier(value, what, *, who="mlx_foundry"):
    """Raise a ``ValueError`` unless ``value`` is a usable C identifier.

    Args:
        value: the candidate name.
        what (str): what the name is for, used in the message ("kernel name").
        who (str): the component that complains, shown in brackets.
    """
    if not isinstance(value, str):
        raise TypeError(f"[{who}] {what} must be a str but got {type(value).__name__}.")
    if not _IDENTIFIER.match(value):
        raise ValueError(
            f"[{who}] {what} must be a C identifier (letters, digits, '_', not "
            f"starting with a digit) but got {value!r}."
        )
    if value in _RESERVED or keyword.iskeyword(value):
        raise ValueError(f"[{who}] {what} {value!r} is a reserved word.")
    if value.startswith("__") or value.startswith("mf_"):
        raise ValueError(
            f"[{who}] {what} {value!r} may not start with '__' or 'mf_' (reserved "
            "for generated code)."
        )
    return value


def check_argument_name(value, what, *, who="mlx_foundry"):
    """Like :func:`check_identifier`, plus MLX's substring-detection traps.

    MLX decides which extra kernel parameters to add by searching the body for
    ``<input>_shape``, ``<input>_strides``, ``<input>_ndim`` and for the Metal
    attribute names, so an argument named after one of those changes the
    signature MLX writes.
    """
    check_identifier(value, what, who=who)
    for suffix in ("_shape", "_strides", "_ndim"):
        if value.endswith(suffix):
            raise ValueError(
                f"[{who}] {what} {value!r} may not end in {suffix!r}: MLX reads "
                "such names as shape information of another input."
            )
    for attr in METAL_ATTRIBUTES:
        if attr in value:
            raise ValueError(
                f"[{who}] {what} {value!r} contains the Metal attribute name "
                f"{attr!r}, which MLX detects by substring search."
            )
    return value
