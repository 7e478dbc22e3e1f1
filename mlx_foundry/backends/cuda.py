"""The CUDA backend: Metal-dialect text -> ``mx.fast.cuda_kernel``.

The header gets the Metal-compat prelude (``metal_src/compat/``); the body gets
declarations of the Metal thread attributes it mentions, computed from CUDA's
built-ins.  Threadgroup arrays become ``__shared__`` arrays.
"""

import mlx.core as mx

from . import cuda_compat


def build(src):
    return mx.fast.cuda_kernel(
        name=src.name,
        input_names=list(src.input_names),
        output_names=list(src.output_names),
        source=src.body,
        header=src.header,
        ensure_row_contiguous=True,
    )


def threadgroup_declaration(ctype, name, count):
    return cuda_compat.shared_declaration(ctype, name, count)


def wrap_header(header):
    return cuda_compat.wrap_header(header)


def body_preamble(body):
    return cuda_compat.attribute_preamble(body)
