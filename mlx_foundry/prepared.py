"""Prepared launches: a kernel call with everything but a few inputs fixed.

A decode loop launches the same kernels with the same weights every step, and
only the activations (and a position) change.  :meth:`Program.prepare
<mlx_foundry.kernel.Program.prepare>` binds, validates and plans such a launch
once and converts every fixed input to its MLX input; a call of the returned
:class:`PreparedLaunch` then checks the shape and dtype of the varying inputs
and calls MLX's kernel object directly.  :func:`prepare_op` does the same for a
whole op (``ops.linear``, ``ops.norm_qkv_rope``, ...) that launches one kernel:
it records the launch the op would make and prepares it.
"""

import copy
import math

import mlx.core as mx

from .args import Scalar, Tensor

__all__ = ["PreparedLaunch", "prepare_op"]


class PreparedLaunch:
    """One planned launch of a program; call it with the varying inputs.

    Built by :meth:`Program.prepare`. ``launch(*values, stream=None)`` takes the
    inputs named in :attr:`vary`, in that order, and returns what a call of the
    program returns (an array, or a tuple for several outputs).

    Attributes:
        program (Program): the program it launches.
        vary (tuple of str): the inputs given at each call.
    """

    __slots__ = ("program", "vary", "backend", "_fn", "_inputs", "_slots", "_out_shapes",
                 "_out_dtypes", "_grid", "_threadgroup", "_single", "_fixed", "_in_shapes")

    def __init__(self, program, plan, bound, vary, backend):
        self.program = program
        self.vary = vary
        self.backend = backend
        self._fn = plan.fn
        self._out_shapes = plan.out_shapes
        self._out_dtypes = plan.out_dtypes
        self._grid = plan.grid
        self._threadgroup = plan.threadgroup
        self._single = len(plan.out_shapes) == 1
        self._fixed = None
        self._in_shapes = None
        inputs, slots = [], {}
        for i, (a, (_, conv)) in enumerate(zip(program.inputs, plan.getters)):
            v = bound[a.name]
            if a.name in vary:
                inputs.append(None)
                slots[a.name] = (i, conv) + _expected(a, v)
            else:
                inputs.append(v if conv is None else conv(v))
        self._inputs = inputs
        self._slots = tuple(slots[n] for n in vary)

    @classmethod
    def reference(cls, program, fixed, vary, bound, out_shapes):
        """A prepared launch on the reference backend (plain MLX ops each call)."""
        self = cls.__new__(cls)
        self.program = program
        self.vary = vary
        self.backend = "reference"
        self._fn = None
        self._inputs = None
        self._out_shapes = out_shapes
        self._single = len(out_shapes) == 1
        self._fixed = fixed
        self._in_shapes = None
        self._slots = tuple((None, None) + _expected(program._by_name[n], bound[n])
                            for n in vary)
        return self

    def passes_as_given(self, *arrays):
        """Whether each of ``arrays`` (``None`` skipped) is a fixed input this launch
        passes to the kernel as it is, not a converted copy (a tiny array is padded into
        one when the launch is prepared). A kept launch is valid only as long as such
        arrays are (see ``ops/_calls.py``). ``False`` on the reference backend."""
        inputs = self._inputs
        if inputs is None:
            return False
        return all(any(a is v for v in inputs) for a in arrays if a is not None)

    def _bad_input(self, name, v, shape, dtype):
        """Raise the error for a varying input that does not match the prepared one."""
        who = self.program.who
        if not isinstance(v, mx.array):
            raise TypeError(f"[{who}] Prepared input {name!r} must be an mlx.core.array but "
                            f"got {type(v).__name__}.")
        raise ValueError(f"[{who}] Prepared input {name!r} must keep the shape {shape} and "
                         f"dtype {dtype} it was prepared with but got {tuple(v.shape)}, "
                         f"{v.dtype}.")

    def __call__(self, *values, stream=None):
        slots = self._slots
        if len(values) != len(slots):
            raise TypeError(f"[{self.program.who}] The prepared launch takes "
                            f"{len(slots)} input(s) ({', '.join(self.vary)}) but "
                            f"{len(values)} were given.")
        inputs = self._inputs
        if inputs is not None:
            inputs = inputs.copy()
        for name, (i, conv, shape, dtype), v in zip(self.vary, slots, values):
            if shape is not None and (v.__class__ is not mx.array or v.shape != shape
                                      or v.dtype != dtype):
                self._bad_input(name, v, shape, dtype)
            if inputs is not None:
                inputs[i] = v if conv is None else conv(v)
        if inputs is None:
            return self._call_reference(values, stream)
        outs = self._fn(inputs=inputs, output_shapes=self._out_shapes,
                        output_dtypes=self._out_dtypes, grid=self._grid,
                        threadgroup=self._threadgroup, stream=stream)
        return outs[0] if self._single else tuple(outs)

    def _call_reference(self, values, stream):
        given = dict(zip(self.vary, values))
        for name, shape in (self._in_shapes or {}).items():
            given[name] = given[name].reshape(shape)  # the shape it was prepared with
        outs = self.program(backend="reference", stream=stream, **self._fixed, **given)
        # The declared shapes (reshaped()) where they differ from the program's.
        outs = [o if tuple(o.shape) == tuple(s) else o.reshape(s)
                for o, s in zip([outs] if self._single else outs, self._out_shapes)]
        return outs[0] if self._single else tuple(outs)

    def reshaped(self, *shapes):
        """This launch with its outputs declared in other shapes of the same sizes.

        The outputs of a kernel are row-contiguous, so any shape with the same
        number of elements is the same memory: declaring it in the launch saves the
        ``reshape`` (one graph node per output per call) that would follow it.  A
        decode step uses it to get Q/K/V of one token as ``[B, heads, 1, head_dim]``.

        Args:
            *shapes (tuple of int): one shape per output, in order.

        Returns:
            PreparedLaunch: a new launch; this one is unchanged.

        Example:
            >>> qkv = step.reshaped((1, 32, 1, 128), (1, 8, 1, 128), (1, 8, 1, 128))
        """
        who = self.program.who
        current = self._out_shapes
        if len(shapes) != len(current):
            raise ValueError(f"[{who}] 'shapes' must give one shape per output "
                             f"({len(current)}) but got {len(shapes)}.")
        new = [_same_size(who, f"'shapes[{i}]'", shape, old, "the output shape")
               for i, (shape, old) in enumerate(zip(shapes, current))]
        other = copy.copy(self)
        other._out_shapes = new
        return other

    def reshaped_inputs(self, **shapes):
        """This launch taking varying inputs in other shapes of the same sizes.

        The kernels read their inputs as row-contiguous memory (MLX copies a
        non-contiguous input first), so an array of any shape with the same number
        of elements is the same input: accepting it as it comes saves the
        ``reshape`` (one graph node per call) that would precede the launch.  A
        decode step passes the attention output ``[B, heads, 1, head_dim]`` straight
        to the output projection prepared for ``[B, 1, heads * head_dim]``.

        Args:
            **shapes (tuple of int): input name (one of :attr:`vary`) -> the shape it
                will be given in.

        Returns:
            PreparedLaunch: a new launch; this one is unchanged.

        Example:
            >>> o_proj = step.reshaped_inputs(x=(1, 32, 1, 128))
        """
        who = self.program.who
        slots = list(self._slots)
        prepared = dict(self._in_shapes or {})
        for name, shape in shapes.items():
            if name not in self.vary:
                raise ValueError(f"[{who}] {name!r} is not a varying input of the prepared "
                                 f"launch ({', '.join(self.vary)}).")
            i = self.vary.index(name)
            old = slots[i][2]
            if old is None:
                raise ValueError(f"[{who}] {name!r} is a runtime scalar and has no shape.")
            shape = _same_size(who, f"The shape of {name!r}", shape, old, "its prepared shape")
            prepared.setdefault(name, old)
            slots[i] = slots[i][:2] + (shape,) + slots[i][3:]
        other = copy.copy(self)
        other._slots = tuple(slots)
        other._in_shapes = prepared
        return other

    def __repr__(self):
        return (f"PreparedLaunch({self.program.name}, backend={self.backend}, "
                f"vary={self.vary})")


def _same_size(who, what, shape, old, old_name):
    """``shape`` as a tuple, checked: non-negative ints, as many elements as ``old``."""
    shape = tuple(shape)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ValueError(f"[{who}] {what} must be a tuple of non-negative ints but got "
                         f"{shape!r}.")
    if math.prod(shape) != math.prod(old):
        raise ValueError(f"[{who}] {what} {shape} must have the {math.prod(old)} elements "
                         f"of {old_name} {tuple(old)}.")
    return shape


def _expected(arg, value):
    """(shape, dtype) a varying tensor must keep; (None, None) for a runtime scalar."""
    if isinstance(arg, Tensor):
        return tuple(value.shape), value.dtype
    if isinstance(arg, Scalar):
        return None, None
    raise ValueError(f"[{arg.name}] Only tensors and runtime scalars can vary in a prepared "
                     "launch.")


def prepare_op(op, *args, vary, backend=None, **kwargs):
    """Prepare the one kernel launch an op makes for these arguments.

    The op runs under :func:`~mlx_foundry.kernel.record_launches` (nothing is
    computed); its launch is prepared with the kernel inputs named in ``vary``
    left open.

    Args:
        op (callable): an op that launches one kernel, e.g. :func:`mlx_foundry.ops.linear`.
        *args, **kwargs: the op's arguments.
        vary (dict): kernel input name -> the op argument it must be. A varying
            input the op transformed (cast, reshaped) cannot vary: then ``None``.
        backend (str, optional): the backend; passed to the op too.

    Returns:
        PreparedLaunch or None: ``None`` when the op does not launch exactly one
        kernel for these arguments (e.g. it routes to MLX's own matmul) or
        transforms a varying input.

    Example:
        >>> step = prepare_op(ops.linear, x, w, residual=r, vary={"x": x, "residual": r})
        >>> y = step(x_next, r_next)
    """
    from .kernel import record_launches

    if not isinstance(vary, dict):
        raise TypeError(f"[prepare_op] 'vary' must be a dict of kernel input name -> the "
                        f"op argument it is, but got {type(vary).__name__}.")
    with record_launches() as launches:
        op(*args, backend=backend, **kwargs)
    if len(launches) != 1:
        return None
    program, a, kw = launches[0]
    if a:  # positional inputs, in the program's input order
        kw = dict(zip((i.name for i in program.inputs), a), **kw)
    names = [i.name for i in program.inputs]
    unknown = [n for n in vary if n not in names]
    if unknown:
        # A typo would otherwise read as "this op cannot be prepared" (None).
        raise ValueError(f"[prepare_op] 'vary' names {unknown}, not inputs of kernel "
                         f"{program.name!r} (its inputs: {', '.join(names)}).")
    for name, value in vary.items():
        got = kw.get(name)
        if isinstance(value, mx.array) or isinstance(got, mx.array):
            if got is not value:
                return None
        elif got != value:
            return None
    return program.prepare(vary=tuple(vary), backend=backend, **kw)
