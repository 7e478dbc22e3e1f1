"""RMSNorm: standalone kernels (plain and add+norm) and the fusion prologue.

Standalone kernels run one threadgroup per row (rows on grid x), read each row
once with 16-byte loads when its length in bytes is a multiple of 16, keep it
in registers between the sum-of-squares pass and the scaling pass, reduce in
float with ``simd_sum`` and a 32-float threadgroup scratch, and round like
``mx.fast.rms_norm``: ``out = T(w * T(x * inv_rms))``.

Compile-time: ``T`` (dtype), ``K`` (row length, a model size), ``THREADS``.
Runtime: ``n_rows`` and ``eps`` (no recompile when they change).
"""

import functools

import mlx.core as mx

from ..args import Constant, Output, Scalar, Tensor
from ..dispatch import DispatchConfig
from ..kernel import Kernel
from ..stage import Stage
from ..types import FLOAT_DTYPES, f32, u32

NORM_SOURCE = "stages/norm.metal"
NORM_INCLUDES = ("utils/reduce.metal", "utils/row_io.metal")
NORM_ATTRIBUTES = ("threadgroup_position_in_grid", "thread_index_in_threadgroup")
NORM_SCRATCH = "float norm_scratch[32]"

# Chunks (16-byte vectors or single elements) each thread aims to hold.
_CHUNKS_PER_THREAD = 4
# More threads than this with the row kept in registers asks for more registers
# per threadgroup than an SM has: on CUDA the launch then fails and MLX 0.32.4
# does not report it (the output stays uninitialised; seen on an H200 at K=50000).
MAX_NORM_THREADS = 256


def chunk_elements(k, dtype):
    """Elements per load of a row of ``k`` elements: 16 bytes' worth, or 1."""
    size = dtype.size
    return 16 // size if (k * size) % 16 == 0 else 1


def norm_threads(k, dtype):
    """Threads per threadgroup for one row of ``k`` elements of ``dtype``.

    About four chunks per thread, a multiple of 32, between 32 and 1024.
    """
    chunks = k // chunk_elements(k, dtype)
    want = -(-chunks // _CHUNKS_PER_THREAD)
    return max(32, min(MAX_NORM_THREADS, 32 * (-(-want // 32))))


def rms_norm_math(x, weight, eps):
    """``mx.fast.rms_norm``'s computation in plain MLX ops (float32 inside)."""
    xf = x.astype(mx.float32)
    y = (xf * mx.rsqrt(mx.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)
    if weight is not None:
        y = y * weight.astype(x.dtype)
    return y


def inv_rms_math(x, eps, k=None):
    """``rsqrt(mean(x^2) + eps)`` per row of ``k`` elements, shape ``[M, 1]``."""
    k = k or x.shape[-1]
    xf = x.reshape(-1, k).astype(mx.float32)
    return mx.rsqrt(mx.mean(xf * xf, axis=-1, keepdims=True) + eps)


def _rows(b):
    return b.x.size // b.x.shape[-1]


def _row_dispatch(b):
    return DispatchConfig((_rows(b),), (b.THREADS,))


def _common_args():
    return [
        Constant("T", "dtype", like="x"),
        Constant("K", value=lambda b: b.x.shape[-1]),
        Constant("THREADS", value=lambda b: norm_threads(b.x.shape[-1], b.x.dtype)),
    ]


def _row_kernel(name, with_weight, args, reference):
    """A standalone norm Kernel: function ``{name}_rows`` (``_nw``: without weight)."""
    suffix = "" if with_weight else "_nw"
    return Kernel(
        name + suffix, source=NORM_SOURCE, includes=NORM_INCLUDES,
        function=f"{name}_rows{suffix}", template=("T", "K", "THREADS"), args=args,
        attributes=NORM_ATTRIBUTES, threadgroup=(NORM_SCRATCH,), dispatch=_row_dispatch,
        reference=reference)


@functools.lru_cache(maxsize=None)
def make_rms_norm(with_weight=True):
    """The standalone RMSNorm :class:`Kernel` (cached per ``with_weight``).

    Call it as ``k(x, norm_weight, n_rows=M, eps=1e-5)`` (or without
    ``norm_weight`` when ``with_weight=False``); ``x`` is row-contiguous with
    ``M`` rows of ``K = x.shape[-1]`` elements.
    """
    args = [Tensor("x", FLOAT_DTYPES)]
    if with_weight:
        args.append(Tensor("norm_weight", FLOAT_DTYPES, ndim=1))
    args += [
        Output("out", shape=lambda b: b.x.shape, dtype="x"),
        Scalar("n_rows", u32),
        Scalar("eps", f32),
    ] + _common_args()

    def reference(b):
        return rms_norm_math(b.x, b.norm_weight if with_weight else None, b.eps)

    return _row_kernel("rms_norm", with_weight, args, reference)


@functools.lru_cache(maxsize=None)
def make_add_rms_norm(with_weight=True):
    """The standalone add+RMSNorm :class:`Kernel`: outputs ``(out, h)``.

    ``h = x + residual`` (rounded to the dtype) and ``out = rms_norm(h) * w``.
    Call it as ``k(x, residual, norm_weight, n_rows=M, eps=1e-5)``.
    """
    args = [Tensor("x", FLOAT_DTYPES), Tensor("residual", FLOAT_DTYPES)]
    if with_weight:
        args.append(Tensor("norm_weight", FLOAT_DTYPES, ndim=1))
    args += [
        Output("out", shape=lambda b: b.x.shape, dtype="x"),
        Output("h", shape=lambda b: b.x.shape, dtype="x"),
        Scalar("n_rows", u32),
        Scalar("eps", f32),
    ] + _common_args()

    def reference(b):
        h = b.x + b.residual
        return [rms_norm_math(h, b.norm_weight if with_weight else None, b.eps), h]

    return _row_kernel("add_rms_norm", with_weight, args, reference)


rms_norm = make_rms_norm(True)
add_rms_norm = make_add_rms_norm(True)


def rms_norm_prologue(with_weight=True, *, x=None, norm_weight=None, eps=None, T=None,
                      K=None, THREADS=None):
    """An RMSNorm prologue :class:`Stage`: ``inv_rms`` of each row of ``x`` for later stages.

    The fused GEMVs of :mod:`mlx_foundry.ops` do not use it: their main stage takes the
    sum of squares from its own loads of ``x`` (see :func:`~mlx_foundry.stages.gemv.gemv_stage`),
    because a whole-row pass before the first weight load stalls a one-wave GEMV. It
    suits compound kernels whose main stage reads only part of the row.

    Contract (the shared value conventions):

    * args: ``Tensor "x"`` (input rows of ``K`` elements; row
      ``m = threadgroup_position_in_grid.y``), ``Tensor "norm_weight"`` (only
      when ``with_weight``; passed through for the main stage, which multiplies
      ``x`` by it inside its dot product), ``Scalar "eps"`` (f32, runtime),
      ``Constant "T"`` (dtype like ``x``), ``Constant "K"`` (int, default
      ``x.shape[-1]``), ``Constant "THREADS"`` (threads per threadgroup, a
      multiple of 32; no default: the main stage's dispatch decides it).
    * produces ``inv_rms`` (float) = ``rsqrt(mean(x[m]^2) + eps)``, in every
      thread of the threadgroup, computed by the whole threadgroup (every
      thread must reach the call: it contains barriers).
    * threadgroup: ``float norm_scratch[32]``.
    * attributes: ``threadgroup_position_in_grid``, ``thread_index_in_threadgroup``.
    * reference: ``{"inv_rms": rsqrt(mean(x.astype(f32)^2, -1, keepdims) + eps)}``
      of shape ``[M, 1]`` (``x`` viewed as ``[M, K]``).

    The generated call is
    ``rms_norm_prologue_w<T, K, THREADS>(x, norm_weight, eps, inv_rms,
    threadgroup_position_in_grid, thread_index_in_threadgroup, norm_scratch);``
    (``rms_norm_prologue<...>(x, eps, ...)`` without weight).

    Args:
        with_weight (bool): declare ``norm_weight``. Default: ``True``.
        x, norm_weight, eps, T, K, THREADS (Arg, optional): declarations to use
            instead of new ones, so a compound kernel can share one declaration
            of each name with its other stages (the assembler merges arguments
            by identity).
    """
    x = x or Tensor("x", FLOAT_DTYPES)
    eps = eps or Scalar("eps", f32)
    T = T or Constant("T", "dtype", like="x")
    K = K or Constant("K", value=lambda b: b.x.shape[-1])
    THREADS = THREADS or Constant("THREADS")
    args = [x]
    if with_weight:
        args.append(norm_weight or Tensor("norm_weight", FLOAT_DTYPES, ndim=1))
    args += [eps, T, K, THREADS]

    def reference(bound, values):
        return {"inv_rms": inv_rms_math(bound.x, bound.eps, bound.K)}

    return Stage(
        "rms_norm_prologue", function="rms_norm_prologue_w" if with_weight else "rms_norm_prologue",
        source=NORM_SOURCE, includes=NORM_INCLUDES, args=args, produces={"inv_rms": "float"},
        template=("T", "K", "THREADS"), attributes=NORM_ATTRIBUTES,
        threadgroup=(NORM_SCRATCH,), reference=reference)
