"""Declarative kernel arguments (the seed's ``#[derive(KernelArgs)]``).

An argument list is ordered by buffer index.  MLX writes the kernel signature
itself (inputs in order, then outputs), so the declarations here decide the
order of ``input_names``/``output_names``, how a Python value becomes an MLX
input, and the Metal type a stage function sees for the argument:

=============  ===========================  ==================================
declaration    Python value                 Metal type in a stage function
=============  ===========================  ==================================
``Tensor``     ``mx.array``                 ``const device T*``
``Output``     (allocated by MLX)           ``device T*``
``Params``     a ``@struct`` instance       ``const device Name*`` (a pointer)
``Scalar``     ``int`` / ``float``          ``uint``/``int``/``float`` (a value)
``Constant``   ``int``/``bool``/dtype       compile-time ``constexpr``/``using``
=============  ===========================  ==================================

Adapted from the seed: scalars arrive by value (MLX passes runtime scalars as
1-element arrays; the body reads element 0), and structs are passed as byte
buffers padded so MLX always places them in ``device`` memory.
"""

import numbers

import mlx.core as mx

from ._names import check_argument_name
from .structs import is_struct_type
from .types import ScalarType, dtype_name, metal_type_name

SCALAR_LANES = 4
"""A scalar argument reaches the kernel as an array of this many copies (it reads
element 0), made on the device: MLX's CUDA allocator puts arrays of at most 8 bytes, and
every array made on the host, in managed memory, and the small ones in a pool that the GPU
reads over the host link. Every thread reading a 4-byte ``eps`` from there cost a fused
GEMV ~20 us (ncu, H100: 1x4096->14336 4-bit 36 us with an ``eps`` input, 16 us without).
``mx.full`` of 16 bytes runs on the GPU and gets device memory.

A caller may pass such an array itself (shape ``(SCALAR_LANES,)``, the scalar's dtype,
equal values): a prepared launch hands it to the kernel as it is, and the reference
reads its first value. A compiled decode step makes its position this way once per
token."""

# Inputs under this many elements are placed in Metal's `constant` space by MLX.
_MIN_DEVICE_ELEMENTS = 8


class Arg:
    """Base of the argument declarations."""

    kind = "arg"
    is_input = True
    buffer = None
    stage_skip = False

    def _init(self, name, buffer, metal_type, stage_skip):
        self.name = check_argument_name(name, "argument name", who=type(self).__name__)
        if buffer is not None and (not isinstance(buffer, int) or buffer < 0):
            raise ValueError(
                f"[{type(self).__name__}] 'buffer' of {name!r} must be a non-negative "
                f"int but got {buffer!r}."
            )
        self.buffer = buffer
        self.metal_type_override = metal_type
        self.stage_skip = stage_skip

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r})"

    # The name of the MLX input that carries this argument.
    @property
    def input_name(self):
        return self.name


class Tensor(Arg):
    """An input array.

    Args:
        name (str): the argument's name (a C identifier).
        dtype (Dtype or tuple of Dtype, optional): accepted dtypes. Default: any.
        ndim (int or tuple of int, optional): accepted ranks. Default: any.
        buffer (int, optional): buffer index (all or none of a list's args set it).
        metal_type (str, optional): the pointer type the stage function takes,
            e.g. ``"const device uchar*"``; the body casts to it.
        stage_skip (bool): leave this argument out of the derived stage.
    """

    kind = "tensor"

    def __init__(self, name, dtype=None, *, ndim=None, buffer=None, metal_type=None,
                 stage_skip=False):
        self._init(name, buffer, metal_type, stage_skip)
        if dtype is not None:
            dtype = tuple(dtype) if isinstance(dtype, (tuple, list)) else (dtype,)
            if not dtype or not all(isinstance(d, mx.Dtype) for d in dtype):
                raise TypeError(f"[Tensor] 'dtype' of {name!r} must be an mlx.core.Dtype or "
                                f"a tuple of them but got {dtype!r}.")
        if ndim is not None:
            ndim = tuple(ndim) if isinstance(ndim, (tuple, list)) else (ndim,)
            if not ndim or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                   for n in ndim):
                raise TypeError(f"[Tensor] 'ndim' of {name!r} must be a non-negative int or "
                                f"a tuple of them but got {ndim!r}.")
        self.dtypes = dtype
        self.ndims = ndim

    def metal_type(self, dtype):
        return self.metal_type_override or f"const device {metal_type_name(dtype)}*"

    def convert(self, value, who):
        if not isinstance(value, mx.array):
            raise TypeError(
                f"[{who}] '{self.name}' must be an mlx.core.array but got "
                f"{type(value).__name__}."
            )
        if self.dtypes is not None and value.dtype not in self.dtypes:
            valid = ", ".join(dtype_name(d) for d in self.dtypes)
            raise ValueError(
                f"[{who}] '{self.name}' has dtype {dtype_name(value.dtype)}; "
                f"expected one of: {valid}."
            )
        if self.ndims is not None and value.ndim not in self.ndims:
            raise ValueError(
                f"[{who}] '{self.name}' must have ndim in {self.ndims} but has shape "
                f"{tuple(value.shape)}."
            )
        if value.size == 0:
            raise ValueError(f"[{who}] '{self.name}' is empty (shape {tuple(value.shape)}).")
        return value

    @staticmethod
    def needs_padding(value):
        """Whether MLX would place ``value`` in Metal's ``constant`` space (under 8 elements)."""
        return value.size < _MIN_DEVICE_ELEMENTS

    @staticmethod
    def to_kernel_input(value):
        """Flatten tiny arrays and pad them so MLX passes them in ``device`` memory."""
        if Tensor.needs_padding(value):
            flat = value.reshape(-1)
            pad = mx.zeros((_MIN_DEVICE_ELEMENTS - flat.size,), dtype=value.dtype)
            return mx.concatenate([flat, pad])
        return value


class Output(Arg):
    """An output array, its shape and dtype given by rules.

    Args:
        name (str): the argument's name.
        shape (callable): ``shape(bound) -> tuple`` from the bound arguments.
        dtype (Dtype, str or callable): a dtype, the name of a ``Tensor`` whose
            dtype it copies, or ``dtype(bound) -> Dtype``.
        stage_skip (bool): leave this output out of the derived stage
            (:meth:`Kernel.as_stage`), e.g. for an epilogue that produces values
            which the fused kernel stores.
    """

    kind = "output"
    is_input = False

    def __init__(self, name, *, shape, dtype, buffer=None, metal_type=None, stage_skip=False):
        self._init(name, buffer, metal_type, stage_skip)
        if not callable(shape):
            raise TypeError(f"[Output] 'shape' of {name!r} must be callable(bound) -> tuple.")
        if not (isinstance(dtype, (str, mx.Dtype)) or callable(dtype)):
            raise TypeError(f"[Output] 'dtype' of {name!r} must be a dtype, a Tensor's name "
                            f"or callable(bound) -> Dtype but got {dtype!r}.")
        self.shape_rule = shape
        self.dtype_rule = dtype

    def metal_type(self, dtype):
        return self.metal_type_override or f"device {metal_type_name(dtype)}*"

    def resolve(self, bound):
        rule = self.dtype_rule
        if isinstance(rule, str):
            dtype = bound[rule].dtype
        elif callable(rule):
            dtype = rule(bound)
        else:
            dtype = rule
        shape = self.shape_rule(bound)
        if (not isinstance(shape, (tuple, list)) or
                not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 0
                        for n in shape)):
            raise ValueError(f"[Output] The shape rule of {self.name!r} must return a tuple of "
                             f"non-negative ints but returned {shape!r}.")
        if not isinstance(dtype, mx.Dtype):
            raise TypeError(f"[Output] The dtype rule of {self.name!r} must give an "
                            f"mlx.core.Dtype but gave {dtype!r}.")
        return tuple(int(n) for n in shape), dtype


class Params(Arg):
    """A parameter struct (made with :func:`mlx_foundry.struct`), passed as bytes."""

    kind = "params"

    def __init__(self, name, struct_type, *, buffer=None, stage_skip=False):
        self._init(name, buffer, None, stage_skip)
        if not is_struct_type(struct_type):
            raise TypeError(
                f"[Params] {name!r} needs a class made with @mlx_foundry.struct but "
                f"got {struct_type!r}."
            )
        self.struct_type = struct_type

    @property
    def input_name(self):
        return self.name + "_bytes"

    def metal_type(self, dtype=None):
        return f"const device {self.struct_type.metal_name}*"

    def convert(self, value, who):
        if not isinstance(value, self.struct_type):
            raise TypeError(
                f"[{who}] '{self.name}' must be a {self.struct_type.__name__} but got "
                f"{type(value).__name__}."
            )
        return value


class Scalar(Arg):
    """A runtime scalar (changes per call without recompiling)."""

    kind = "scalar"

    def __init__(self, name, type, *, buffer=None, stage_skip=False):
        self._init(name, buffer, None, stage_skip)
        if not isinstance(type, ScalarType):
            raise TypeError(f"[Scalar] {name!r} needs a scalar type (u32, i32, f32, ...).")
        self.type = type

    @property
    def input_name(self):
        return self.name + "_value"

    def metal_type(self, dtype=None):
        return self.type.metal

    def convert(self, value, who):
        if isinstance(value, mx.array):
            if value.shape == (SCALAR_LANES,) and value.dtype == self.type.dtype:
                return value  # the kernel input form (see SCALAR_LANES)
            if value.size != 1:
                raise ValueError(f"[{who}] '{self.name}' must hold one value but has "
                                 f"shape {tuple(value.shape)}.")
            return value
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"[{who}] '{self.name}' must be a number but got "
                            f"{type(value).__name__}.")
        if self.type.is_integer:
            # The body reads an integer: a float would be truncated there while the
            # reference used it whole.
            if not isinstance(value, numbers.Integral):
                raise TypeError(f"[{who}] '{self.name}' is {self.type.name} and must be an "
                                f"int but got {value!r}.")
            value = int(value)
            lo, hi = self.type.bounds
            if lo == 0 and value < 0:
                raise ValueError(f"[{who}] '{self.name}' must be a non-negative int but got "
                                 f"{value!r}.")
            if not lo <= value <= hi:
                raise ValueError(f"[{who}] '{self.name}' ({self.type.name}) must be in "
                                 f"[{lo}, {hi}] but got {value}.")
            return value
        return float(value)


class Constant(Arg):
    """A compile-time constant (a model dimension, a dtype, a flag).

    Each distinct value is a distinct kernel source and a fresh compile.

    Args:
        name (str): the constant's name in the generated body.
        kind (str): ``"int"``, ``"bool"`` or ``"dtype"``.
        like (str, optional): for ``"dtype"``, the ``Tensor`` whose dtype it takes.
        value (callable or value, optional): a fixed value or ``value(bound)``, where
            ``bound`` holds the arguments and the constants declared before this one;
            otherwise the caller passes it by keyword.
        in_body (bool, optional): declare it at the top of the generated body. ``False``
            for a constant that only a backend reads when it builds the kernel (a launch
            attribute such as the GEMVs' ``MINBLOCKS``) or only the dispatch and output
            rules read (the bench read probe's grid): it still selects the
            specialization (so it keys the launch, which a runtime scalar does not), and
            adds no line to the source. Default: ``True``.
    """

    kind = "constant"
    is_input = False

    def __init__(self, name, kind="int", *, like=None, value=None, in_body=True):
        # A constant is a name in the body too: MLX's substring traps apply.
        self.name = check_argument_name(name, "constant name", who="Constant")
        if kind not in ("int", "bool", "dtype"):
            raise ValueError(f"[Constant] 'kind' must be one of int, bool, dtype but got {kind!r}.")
        if like is not None and (kind != "dtype" or value is not None):
            raise ValueError(f"[Constant] {name!r}: 'like' is for a dtype constant without "
                             f"a 'value' (kind={kind!r}).")
        self.const_kind = kind
        self.like = like
        self.value = value
        self.in_body = bool(in_body)
        self.buffer = None
        self.stage_skip = False
        self.metal_type_override = None

    def resolve(self, bound, given):
        if self.like is not None:
            if given is not None:
                raise ValueError(f"[Constant] '{self.name}' takes the dtype of {self.like!r}; "
                                 f"it cannot be passed ({given!r}).")
            return bound[self.like].dtype
        if given is not None:
            v = given
        elif callable(self.value):
            v = self.value(bound)
        elif self.value is not None:
            v = self.value
        else:
            raise ValueError(f"[Constant] Missing compile-time constant '{self.name}'.")
        if self.const_kind == "int":
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"[Constant] '{self.name}' must be an int but got {v!r}.")
            v = int(v)
            if not -2**31 <= v < 2**31:  # `constexpr int` in the body
                raise ValueError(f"[Constant] '{self.name}' must fit in int32 but got {v}.")
        if self.const_kind == "dtype" and not isinstance(v, mx.Dtype):
            raise TypeError(f"[Constant] '{self.name}' must be an mlx.core.Dtype but got "
                            f"{v!r}.")
        if self.const_kind == "bool" and not isinstance(v, bool):
            raise TypeError(f"[Constant] '{self.name}' must be a bool but got {v!r}.")
        return v

    def declaration(self, value):
        """The line that defines the constant at the top of a generated body."""
        if self.const_kind == "dtype":
            return f"using {self.name} = {metal_type_name(value)};"
        if self.const_kind == "bool":
            return f"constexpr bool {self.name} = {'true' if value else 'false'};"
        return f"constexpr int {self.name} = {int(value)};"


def order_args(args, who):
    """Validate and order a list of declarations by buffer index.

    Either every non-constant argument has a ``buffer`` index or none has;
    indices must be unique and run 0..n-1.  Returns
    ``(inputs, outputs, constants)`` as tuples, inputs and outputs in buffer order.
    """
    args = list(args)
    names = set()
    for a in args:
        if not isinstance(a, Arg):
            raise TypeError(f"[{who}] Arguments must be Tensor, Output, Params, Scalar or "
                            f"Constant declarations but got {a!r}.")
        if a.name in names:
            raise ValueError(f"[{who}] Duplicate argument name {a.name!r}.")
        names.add(a.name)
    buffered = [a for a in args if not isinstance(a, Constant)]
    with_index = [a for a in buffered if a.buffer is not None]
    if with_index and len(with_index) != len(buffered):
        missing = [a.name for a in buffered if a.buffer is None]
        raise ValueError(f"[{who}] Buffer index missing for: {', '.join(missing)} "
                         "(give every argument a buffer index or none).")
    if with_index:
        seen = {}
        for a in buffered:
            if a.buffer in seen:
                raise ValueError(f"[{who}] Buffer index {a.buffer} used by both "
                                 f"{seen[a.buffer]!r} and {a.name!r}.")
            seen[a.buffer] = a.name
        expected = set(range(len(buffered)))
        if set(seen) != expected:
            gaps = sorted(expected - set(seen))
            raise ValueError(f"[{who}] Buffer indices must run 0..{len(buffered) - 1}; "
                             f"missing {gaps}.")
        buffered.sort(key=lambda a: a.buffer)
    inputs = tuple(a for a in buffered if a.is_input)
    outputs = tuple(a for a in buffered if not a.is_input)
    constants = tuple(a for a in args if isinstance(a, Constant))
    input_names = {a.input_name for a in inputs} | {a.name for a in outputs}
    if len(input_names) != len(inputs) + len(outputs):
        raise ValueError(f"[{who}] Argument names collide after MLX naming.")
    return inputs, outputs, constants


class Bound(dict):
    """Bound argument values: ``bound["x"]`` or ``bound.x``."""

    __slots__ = ()

    def with_constants(self, constants):
        """A copy that also holds the resolved compile-time constants."""
        b = Bound(self)
        b.update(constants)
        return b

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None
