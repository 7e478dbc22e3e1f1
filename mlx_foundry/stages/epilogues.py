"""Epilogue stages: per-element updates of a GEMV result, fused after the main stage.

Every epilogue updates ``acc`` (float) in place and may read ``row`` (output
column), ``index`` (flat output index) and ``valid`` (the lane holds an element),
per the shared value conventions. References work on whole tensors: ``acc`` is
the float32 ``[M, N]`` result.

===================  =====================================  =======================
factory              math                                   extra arguments
===================  =====================================  =======================
``scale_epilogue``   ``acc *= inv_rms`` (after RMSNorm)     consumes ``inv_rms``
``bias_epilogue``    ``acc += bias[row]``                   ``Tensor "bias"`` [N]
``activation_...``   ``acc = act(acc)``                     silu, gelu, gelu_approx, relu
``swiglu_epilogue``  ``acc = silu(acc) * acc2``             consumes ``acc2``
``residual_...``     ``acc += residual[index]``             ``Tensor "residual"``
===================  =====================================  =======================
"""

import functools

import mlx.core as mx

from ..args import Tensor
from ..stage import Stage
from ..types import FLOAT_DTYPES
from .activations import ACTIVATIONS, ACTIVATIONS_SOURCE

EPILOGUE_SOURCE = "stages/epilogues.metal"
EPILOGUE_INCLUDES = (ACTIVATIONS_SOURCE,)
ACTIVATION_NAMES = tuple(ACTIVATIONS)


def _stage(name, function, *, args=(), consumes=None, reference):
    consumes = dict(consumes or {})
    consumes["acc"] = "float"
    return Stage(name, function=function, source=EPILOGUE_SOURCE, includes=EPILOGUE_INCLUDES,
                 args=args, consumes=consumes, produces={"acc": "float"},
                 reference=reference)


@functools.lru_cache(maxsize=None)
def scale_epilogue():
    """``acc *= inv_rms`` (the RMSNorm prologue's value; ``y = W (x * gamma) * inv_rms``)."""
    return _stage("scale_inv_rms", "ep_scale", consumes={"inv_rms": "float"},
                  reference=lambda b, v: {"acc": v["acc"] * v["inv_rms"]})


@functools.lru_cache(maxsize=None)
def bias_epilogue(name="bias"):
    """``acc += bias[row]`` with a ``Tensor`` named ``name`` of shape ``[N]``."""
    arg = Tensor(name, FLOAT_DTYPES, ndim=1)
    return _stage(f"add_{name}", "ep_bias", args=(arg,),
                  consumes={"row": "uint", "valid": "bool"},
                  reference=lambda b, v: {"acc": v["acc"] + b[name].astype(mx.float32)})


@functools.lru_cache(maxsize=None)
def activation_epilogue(kind):
    """``acc = act(acc)`` for ``kind`` in silu, gelu, gelu_approx, relu (as ``mlx.nn``)."""
    if kind not in ACTIVATIONS:
        raise ValueError(f"[activation_epilogue] 'activation' must be one of "
                         f"{', '.join(ACTIVATION_NAMES)} but got {kind!r}.")
    fn = ACTIVATIONS[kind]
    return _stage(f"act_{kind}", f"ep_{kind}", reference=lambda b, v: {"acc": fn(v["acc"])})


@functools.lru_cache(maxsize=None)
def swiglu_epilogue():
    """``acc = silu(acc) * acc2`` (gate = ``acc``, up = ``acc2``; mlx-lm's MLP)."""
    silu = ACTIVATIONS["silu"]
    return _stage("swiglu", "ep_swiglu", consumes={"acc2": "float"},
                  reference=lambda b, v: {"acc": silu(v["acc"]) * v["acc2"]})


@functools.lru_cache(maxsize=None)
def residual_epilogue(name="residual"):
    """``acc += residual[index]``; ``residual`` has the output's shape."""
    arg = Tensor(name, FLOAT_DTYPES)

    def reference(b, v):
        acc = v["acc"]
        return {"acc": acc + b[name].astype(mx.float32).reshape(acc.shape)}

    return _stage(f"add_{name}", "ep_residual", args=(arg,),
                  consumes={"index": "uint", "valid": "bool"}, reference=reference)
