"""Programs (anything mlx_foundry can launch) and standalone kernels.

:class:`Program` holds what a standalone :class:`Kernel` and a
:class:`~mlx_foundry.compound.CompoundKernel` share: argument binding and
validation, header assembly, body generation, the per-descriptor
specialization cache, backend dispatch and inspection of generated source.
"""

import contextlib
import threading
import weakref
from dataclasses import dataclass

import mlx.core as mx

from . import cache, sources
from ._names import METAL_ATTRIBUTES, check_identifier
from .args import SCALAR_LANES, Bound, Constant, Output, Params, Scalar, Tensor, order_args
from .backends import reference as reference_backend
from .backends import require_available, select_backend
from .dispatch import DispatchConfig
from .stage import Stage, Threadgroup, as_tuple
from .structs import is_struct_type

_programs = weakref.WeakSet()

DEFAULT_ATTRIBUTES = ("threadgroup_position_in_grid", "thread_position_in_threadgroup")


_epoch = 0


def launch_epoch():
    """A counter that grows whenever compiled kernels or chosen launches are dropped
    (:func:`~mlx_foundry.clear_cache`, ``ops.linear.forget_launches``): launches prepared
    and kept outside a program (the ops' cached calls) are stale once it has moved."""
    return _epoch


def drop_prepared():
    """Make every launch prepared before now stale (see :func:`launch_epoch`)."""
    global _epoch
    _epoch += 1


def recording():
    """Whether :func:`record_launches` is active in this thread."""
    return _recording.launches is not None


def _clear_specializations():
    drop_prepared()
    for p in list(_programs):
        p._specs.clear()
        p._plans.clear()


def _backend_module(name):
    if name == "metal":
        from .backends import metal as mod
    elif name == "cuda":
        from .backends import cuda as mod
    else:
        raise ValueError(f"[mlx_foundry] Backend {name!r} has no kernel source.")
    return mod


@dataclass(frozen=True)
class KernelSource:
    """What one backend compiles for one specialization.

    Attributes:
        name: the kernel name handed to MLX (readable name + content hash).
        header: the header text (prelude included for cuda).
        body: the body text (MLX writes the signature around it).
        input_names, output_names: in the order MLX binds them.
        backend: ``"metal"`` or ``"cuda"``.
    """

    name: str
    header: str
    body: str
    input_names: tuple
    output_names: tuple
    backend: str

    def __str__(self):
        return (f"// ===== {self.name} ({self.backend}) =====\n"
                f"// inputs: {', '.join(self.input_names)}\n"
                f"// outputs: {', '.join(self.output_names)}\n"
                f"// ----- header -----\n{self.header}\n// ----- body -----\n{self.body}\n")


def _compact(text):
    """Drop comments and blank lines: MLX hashes the whole source on every launch."""
    text = sources.strip_comments(text)
    return "\n".join(line.rstrip() for line in text.splitlines() if line.strip())


class _Launch:
    __slots__ = ("fn", "source")

    def __init__(self, fn, source):
        self.fn = fn
        self.source = source


_MAX_PLANS = 1024


class _Recording(threading.local):
    launches = None  # a list while record_launches() is active in this thread


_recording = _Recording()


@contextlib.contextmanager
def record_launches():
    """Record ``(program, args, kwargs)`` of every launch instead of running it.

    Outputs are zeros of the right shape and dtype, so an op (or a whole model
    step) can be walked on any machine to list the kernels it would launch::

        with record_launches() as launches:
            ops.norm_linear(x, g, 1e-5, w, backend="metal")
        program, args, kwargs = launches[0]
        print(program.source(*args, **kwargs))
    """
    previous = getattr(_recording, "launches", None)
    _recording.launches = []
    try:
        yield _recording.launches
    finally:
        _recording.launches = previous


def _key_part(v):
    """What a launch plan may depend on, for one argument value."""
    if isinstance(v, mx.array):
        return (v.shape, v.dtype)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return type(v)  # a runtime scalar (or a constant: then the value, see below)
    return v


def _params_array(v):
    return v.to_array()


class _Plan:
    """A ready launch: everything but the argument values."""

    __slots__ = ("fn", "getters", "out_shapes", "out_dtypes", "grid", "threadgroup")

    def __init__(self, fn, getters, out_shapes, out_dtypes, grid, threadgroup):
        self.fn = fn
        self.getters = getters
        self.out_shapes = out_shapes
        self.out_dtypes = out_dtypes
        self.grid = grid
        self.threadgroup = threadgroup

    def run(self, args, kwargs, stream):
        inputs = []
        for where, conv in self.getters:
            v = args[where] if where.__class__ is int else kwargs[where]
            inputs.append(v if conv is None else conv(v))
        return self.fn(inputs=inputs, output_shapes=self.out_shapes,
                       output_dtypes=self.out_dtypes, grid=self.grid,
                       threadgroup=self.threadgroup, stream=stream)


class Program:
    """Base of :class:`Kernel` and :class:`CompoundKernel`."""

    def __init__(self, name, *, args, dispatch, reference, structs=(), threadgroup=(),
                 who=None):
        self.name = check_identifier(name, "kernel name", who=who or type(self).__name__)
        self.who = who or f"{type(self).__name__} {name}"
        self.inputs, self.outputs, self.constants = order_args(args, self.who)
        if not self.outputs:
            raise ValueError(f"[{self.who}] needs at least one Output.")
        if not callable(dispatch):
            raise TypeError(f"[{self.who}] 'dispatch' must be callable(bound) -> DispatchConfig.")
        self.dispatch_fn = dispatch
        self.reference_fn = reference
        self.threadgroup = tuple(Threadgroup.parse(t)
                                 for t in as_tuple(threadgroup, "threadgroup", self.who))
        names = [t.name for t in self.threadgroup]
        if len(set(names)) != len(names):
            raise ValueError(f"[{self.who}] Duplicate threadgroup array names: {names}.")
        self._by_name = {a.name: a for a in self.inputs + self.outputs + self.constants}
        self._tensors = tuple(a for a in self.inputs if isinstance(a, Tensor))
        self._check_dtype_references()
        self._structs = self._collect_structs(structs)
        self._specs = {}
        self._plans = {}
        self._constant_names = frozenset(c.name for c in self.constants)
        self._spec_lock = threading.Lock()
        self._scalar_cache = {}
        _programs.add(self)

    # -- declarations --------------------------------------------------------------
    def _check_dtype_references(self):
        """Names that copy a dtype (``Output(dtype="x")``, ``Constant(like="x")``) must
        name a Tensor input: caught here, not as a KeyError at the first launch."""
        tensors = {a.name for a in self._tensors}
        refs = [(f"Output {o.name!r}", "dtype", o.dtype_rule) for o in self.outputs
                if isinstance(o.dtype_rule, str)]
        refs += [(f"Constant {c.name!r}", "like", c.like) for c in self.constants
                 if c.like is not None]
        for what, field, name in refs:
            if name not in tensors:
                valid = ", ".join(sorted(tensors)) or "none"
                raise ValueError(f"[{self.who}] {what} takes its dtype from {name!r} "
                                 f"('{field}'), which is not a Tensor input of this kernel. "
                                 f"Tensor inputs: {valid}.")

    def dispatch_config(self, full):
        """``dispatch(bound)``, checked to be a :class:`DispatchConfig`."""
        cfg = self.dispatch_fn(full)
        if not isinstance(cfg, DispatchConfig):
            raise TypeError(f"[{self.who}] 'dispatch' must return a DispatchConfig (e.g. "
                            f"DispatchConfig(groups, threads) or per_row(rows)) but "
                            f"returned {type(cfg).__name__}.")
        return cfg

    def _collect_structs(self, extra):
        found = {}
        extra = as_tuple(extra, "structs", self.who)
        for s in [a.struct_type for a in self.inputs if isinstance(a, Params)] + list(extra):
            if not is_struct_type(s):
                raise TypeError(f"[{self.who}] 'structs' must hold @struct classes but got {s!r}.")
            prev = found.get(s.metal_name)
            if prev is not None and prev.metal_struct_def != s.metal_struct_def:
                raise ValueError(f"[{self.who}] Two different structs are named "
                                 f"{s.metal_name!r} in Metal.")
            found[s.metal_name] = s
        return tuple(found.values())

    def _source_files(self):
        """Ordered ``.metal`` paths the header needs (overridden)."""
        return []

    def _inline_sources(self):
        return []

    def _call_lines(self, constants, tg_names, out_dtypes):
        raise NotImplementedError

    # -- binding ---------------------------------------------------------------------
    def bind(self, *args, **kwargs):
        """Bind call arguments by position (inputs in buffer order) and name.

        Returns:
            (Bound, dict): bound input values and the compile-time constants given.
        """
        if len(args) > len(self.inputs):
            raise TypeError(f"[{self.who}] takes {len(self.inputs)} positional inputs but "
                            f"{len(args)} were given.")
        bound = Bound()
        for a, v in zip(self.inputs, args):
            bound[a.name] = a.convert(v, self.who)
        given = {}
        for k, v in kwargs.items():
            a = self._by_name.get(k)
            if a is None:
                valid = ", ".join(a.name for a in self.inputs + self.constants)
                raise TypeError(f"[{self.who}] Unexpected argument {k!r}. Valid arguments "
                                f"are: {valid}.")
            if isinstance(a, Constant):
                given[k] = v
            elif a.is_input:
                if k in bound:
                    raise TypeError(f"[{self.who}] Argument {k!r} given twice.")
                bound[k] = a.convert(v, self.who)
            else:
                raise TypeError(f"[{self.who}] {k!r} is an output; it is not passed in.")
        missing = [a.name for a in self.inputs if a.name not in bound]
        if missing:
            raise TypeError(f"[{self.who}] Missing argument(s): {', '.join(missing)}.")
        return bound, given

    def _constants(self, bound, given):
        # A derived constant sees the arguments and the constants declared before it
        # (the GEMV's XSTAGE depends on its SPLITK).
        seen, consts = Bound(bound), {}
        for c in self.constants:
            seen[c.name] = consts[c.name] = c.resolve(seen, given.get(c.name))
        return consts

    def _kernel_inputs(self, bound):
        out = []
        for a in self.inputs:
            v = bound[a.name]
            conv = self._converter(a, v)
            out.append(v if conv is None else conv(v))
        return out

    def _converter(self, a, value):
        """How argument ``a`` becomes its MLX input (``None``: passed as it is)."""
        if isinstance(a, Tensor):
            return Tensor.to_kernel_input if Tensor.needs_padding(value) else None
        if isinstance(a, Params):
            return _params_array
        return self._scalar_converter(a)

    def _scalar_array(self, a, v):
        """The kernel input of a Python number (see :data:`SCALAR_LANES`), reused while
        the value repeats."""
        key = (a.name, v)
        arr = self._scalar_cache.get(key)
        if arr is None:
            if len(self._scalar_cache) > 4096:
                self._scalar_cache.clear()
            arr = mx.full((SCALAR_LANES,), v, dtype=a.type.dtype)
            self._scalar_cache[key] = arr
        return arr

    # -- launching ------------------------------------------------------------------
    #
    # The hot path.  A launch *plan* (compiled kernel, output shapes and dtypes,
    # grid, threadgroup, and how to turn each argument into an MLX input) is keyed
    # by what the rules may depend on: the backend, each array's shape and dtype,
    # each struct's value and each constant, and the argument layout of the call.
    # Runtime scalars are not in the key.  A hit therefore skips validation
    # (the same shapes and dtypes already passed it), rendering, hashing and the
    # rules; it builds one small tuple and looks it up.  Output and dispatch rules
    # must depend only on shapes, dtypes, struct values and constants.

    def __call__(self, *args, backend=None, stream=None, **kwargs):
        """Run on the selected backend; returns an array, or a tuple for several outputs."""
        if _recording.launches is not None:
            return self._record(args, kwargs)
        be = select_backend(backend, self.who)
        if be != "reference":
            consts = self._constant_names
            key = (be, tuple(map(_key_part, args)),
                   tuple([(k, v if k in consts else _key_part(v)) for k, v in kwargs.items()]))
            plan = self._plans.get(key)
            if plan is not None:
                cache.record_hit()
                outs = plan.run(args, kwargs, stream)
                return outs[0] if len(outs) == 1 else tuple(outs)
        bound, given = self.bind(*args, **kwargs)
        if be == "reference":
            outs = self.launch(bound, given, backend=be, stream=stream)
        else:
            plan = self._plan(be, bound, given, args, kwargs)
            if len(self._plans) > _MAX_PLANS:
                self._plans.clear()
            self._plans[key] = plan
            outs = plan.run(args, kwargs, stream)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def prepare(self, *args, vary=(), backend=None, **kwargs):
        """Bind, validate and plan one launch now; later calls pass only ``vary``.

        Every input not named in ``vary`` is converted to its MLX input once, so a
        call of the returned :class:`~mlx_foundry.prepared.PreparedLaunch` is a
        shape/dtype check of the varying inputs and the MLX kernel call: the
        decode loop of a model launches the same kernels with the same weights
        every step.

        Args:
            *args, **kwargs: example arguments, as for a call (constants included).
            vary (tuple of str): inputs given at each call, in this order; arrays
                must keep the example's shape and dtype, runtime scalars may change.
            backend (str, optional): as for a call.

        Returns:
            PreparedLaunch: ``launch(*values)`` returns what a call returns.

        Example:
            >>> step = kern.prepare(x=x, w=w, vary=("x",))
            >>> y = step(x_next)
        """
        from .prepared import PreparedLaunch

        if isinstance(vary, str):
            vary = (vary,)
        vary = tuple(vary)
        for name in vary:
            a = self._by_name.get(name)
            if a is None or not a.is_input or isinstance(a, Constant):
                raise ValueError(f"[{self.who}] 'vary' names {name!r}, which is not an input "
                                 f"of this kernel.")
        if len(set(vary)) != len(vary):
            raise ValueError(f"[{self.who}] 'vary' repeats a name: {vary}.")
        bound, given = self.bind(*args, **kwargs)
        be = select_backend(backend, self.who)
        if be == "reference":
            fixed = {k: v for k, v in bound.items() if k not in vary}
            fixed.update(given)
            full = bound.with_constants(self._constants(bound, given))
            shapes = tuple(o.resolve(full)[0] for o in self.outputs)
            return PreparedLaunch.reference(self, fixed, vary, bound, shapes)
        plan = self._plan(be, bound, given, (), dict(bound))
        return PreparedLaunch(self, plan, bound, vary, be)

    def _record(self, args, kwargs):
        bound, given = self.bind(*args, **kwargs)
        full = bound.with_constants(self._constants(bound, given))
        _recording.launches.append((self, args, kwargs))
        outs = [mx.zeros(*o.resolve(full)) for o in self.outputs]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def launch(self, bound, given=None, *, backend=None, stream=None):
        """Run with already-bound arguments; returns a list of arrays."""
        be = select_backend(backend, self.who)
        if be == "reference":
            return reference_backend.run(self, bound, self._constants(bound, given or {}))
        plan = self._plan(be, bound, given or {}, (), dict(bound))
        return plan.run((), dict(bound), stream)

    def _plan(self, backend, bound, given, args, kwargs):
        consts = self._constants(bound, given)
        full = bound.with_constants(consts)
        out_specs = [o.resolve(full) for o in self.outputs]
        out_dtypes = tuple(d for _, d in out_specs)
        key = (backend, tuple(consts.values()),
               tuple(bound[a.name].dtype for a in self._tensors), out_dtypes)
        launch = self._specs.get(key)
        if launch is None:
            launch = self._specialize(key, backend, consts, bound, out_dtypes)
        else:
            cache.record_hit()
        grid, threadgroup = self.dispatch_config(full).mlx_launch(backend)
        positions = {a.name: i for i, a in enumerate(self.inputs[:len(args)])}
        getters = [(positions.get(a.name, a.name), self._converter(a, bound[a.name]))
                   for a in self.inputs]
        return _Plan(launch.fn, getters, [s for s, _ in out_specs], list(out_dtypes), grid,
                     threadgroup)

    def _scalar_converter(self, a):
        exact = int if a.type.is_integer else float
        lo, hi = a.type.bounds or (-float("inf"), float("inf"))
        who = self.who
        lanes, dtype = (SCALAR_LANES,), a.type.dtype

        def convert(v):
            if isinstance(v, mx.array):
                if v.shape == lanes and v.dtype == dtype:
                    return v  # already the kernel input (e.g. made once per decode step)
                # Broadcast: MLX copies the non-contiguous view into a fresh device array.
                return mx.broadcast_to(a.convert(v, who).reshape(1).astype(a.type.dtype),
                                       (SCALAR_LANES,))
            # The plan skips binding: a value that is not a plain int (float) in range
            # goes through the argument's check, which raises or normalises it.
            if v.__class__ is not exact or not lo <= v <= hi:
                v = a.convert(v, who)
            return self._scalar_array(a, v)

        return convert

    def _specialize(self, key, backend, consts, bound, out_dtypes):
        with self._spec_lock:
            launch = self._specs.get(key)
            if launch is not None:  # another thread built it while this one waited
                cache.record_hit()
                return launch
            # Only here, on a miss: record_launches() walks GPU launches on any machine,
            # and a cache hit stays a lookup. Before MLX's "No ... back-end".
            require_available(backend, self.who)
            cache.record_miss()
            src = self.render(backend, consts, bound, out_dtypes)
            mod = _backend_module(backend)
            fn = cache.get_or_build(src.name, lambda: mod.build(src))
            launch = _Launch(fn, src)
            self._specs[key] = launch
            return launch

    def reference(self, *args, **kwargs):
        """Run the reference (plain MLX ops) on any device."""
        return self(*args, backend="reference", **kwargs)

    # -- source generation ----------------------------------------------------------
    def header_text(self, constants):
        """The backend-neutral header: structs, then resolved ``.metal`` files."""
        parts = [f"// mlx_foundry: {self.name}"]
        for s in self._structs:
            parts.append(s.metal_struct_def)
        for rel, text in sources.resolve(self._source_files(), requested_by=self.who):
            if rel.endswith(".j2"):
                text = sources.render(text, **constants)
            parts.append(f"// ---- {rel}\n{text.strip()}")
        for label, text in self._inline_sources():
            parts.append(f"// ---- {label}\n{text.strip()}")
        return _compact("\n\n".join(parts)) + "\n"

    def body_text(self, backend, constants, out_dtypes):
        mod = _backend_module(backend)
        lines = []
        for c in self.constants:
            if c.in_body:
                lines.append(c.declaration(constants[c.name]))
        tg_names = {}
        for t in self.threadgroup:
            lines.append(mod.threadgroup_declaration(t.type, t.name,
                                                     t.resolved_count(constants)))
            tg_names[t.name] = t.name
        for a in self.inputs:
            if isinstance(a, Params):
                sname = a.struct_type.metal_name
                lines.append(f"const device {sname}* {a.name} = "
                             f"reinterpret_cast<const device {sname}*>({a.input_name});")
            elif isinstance(a, Scalar):
                lines.append(f"const {a.type.metal} {a.name} = {a.input_name}[0];")
        lines += self._call_lines(constants, tg_names, out_dtypes)
        body = sources.strip_comments("\n".join(lines))
        if not any(attr in body for attr in METAL_ATTRIBUTES):
            # MLX 0.32 writes a malformed Metal signature for some kernels without
            # any thread attribute; always reference one.
            body += "\n(void)thread_position_in_grid;"
        return mod.body_preamble(body) + body

    def render(self, backend, constants, bound=None, out_dtypes=None):
        """Build the :class:`KernelSource` of one specialization."""
        mod = _backend_module(backend)
        if out_dtypes is None:
            full = bound.with_constants(constants)
            out_dtypes = tuple(o.resolve(full)[1] for o in self.outputs)
        header = mod.wrap_header(self.header_text(constants))
        body = self.body_text(backend, constants, out_dtypes)
        in_types = ()
        if bound is not None:
            in_types = tuple(str(bound[a.name].dtype) for a in self._tensors)
        input_names = tuple(a.input_name for a in self.inputs)
        output_names = tuple(a.name for a in self.outputs)
        key = [backend, header, body, input_names, output_names, in_types,
               tuple(str(d) for d in out_dtypes)]
        # Launch attributes name the kernel, so they join the source after its name is
        # hashed; the hash sees what they are (and nothing when there are none, so that
        # a kernel without any keeps its name).
        outside = {c.name: constants[c.name] for c in self.constants if not c.in_body}
        attrs = mod.launch_attributes(outside, constants) if outside else ()
        if attrs:
            key.append(attrs)
        name = f"{self.name}_{cache.content_hash(*key)}"
        if attrs:
            header += mod.launch_attribute_lines(name, attrs)
        return KernelSource(name, header, body, input_names, output_names, backend)

    def source(self, *args, backend="metal", **kwargs):
        """The generated :class:`KernelSource` for these example arguments."""
        bound, given = self.bind(*args, **kwargs)
        return self.render(backend, self._constants(bound, given), bound)

    def metal_source(self, *args, **kwargs):
        """The full Metal source MLX would compile (signature included).

        Captured by tracing a launch under ``mx.export_function`` with verbose
        output, which works on Linux without a Metal device.
        """
        from .inspection import metal_source_of

        return metal_source_of(self, *args, **kwargs)

    def signature(self, dtypes=None):
        """The seed's ``METAL_ARGS``: ``(name, index, metal type)`` per buffer."""
        dtypes = dict(dtypes or {})
        # Without a given dtype: the only one a Tensor allows, an Output's fixed dtype or
        # its Tensor's; float16 otherwise.
        for a in self._tensors:
            if a.name not in dtypes and a.dtypes and len(a.dtypes) == 1:
                dtypes[a.name] = a.dtypes[0]
        for o in self.outputs:
            rule = o.dtype_rule
            if o.name not in dtypes and isinstance(rule, mx.Dtype):
                dtypes[o.name] = rule
            elif o.name not in dtypes and isinstance(rule, str) and rule in dtypes:
                dtypes[o.name] = dtypes[rule]
        rows = []
        for i, a in enumerate(self.inputs + self.outputs):
            if isinstance(a, (Tensor, Output)):
                d = dtypes.get(a.name, mx.float16)
                rows.append((a.name, i, a.metal_type(d)))
            else:
                rows.append((a.name, i, a.metal_type()))
        return rows


def _policy_args(policies):
    args = []
    for pol in policies.values():
        args += list(pol.args)
    return args


def _merge_args(groups, who):
    """Merge argument lists by name; the same name must be the same declaration."""
    merged = {}
    for group in groups:
        for a in group:
            prev = merged.get(a.name)
            if prev is None:
                merged[a.name] = a
            elif prev is not a:
                raise ValueError(f"[{who}] Two different declarations of argument {a.name!r}.")
    return list(merged.values())


class Kernel(Program):
    """A standalone kernel (the seed's ``#[derive(Kernel)]``).

    MLX writes the signature; mlx_foundry writes the header (structs, includes,
    ``source``) and a body that calls ``function`` with the stage convention of
    :mod:`mlx_foundry.stage`.

    Args:
        name (str): readable kernel name (an identifier).
        source (str): ``.metal`` file relative to a source root (or ``source_text``).
        function (str): the template function the body calls.
        args (list of Arg): arguments; ``buffer=`` indices optional.
        dispatch (callable): ``dispatch(bound) -> DispatchConfig``.
        includes (tuple of str): further headers, in order.
        structs (tuple): extra struct classes to inject.
        policies (dict): value name -> Policy.
        template (tuple): template arguments of the call.
        threadgroup (tuple): ``"float shared[256]"`` or :class:`Threadgroup`.
        attributes (tuple of str): thread attributes passed to the function.
        reference (callable): ``reference(bound) -> array or list``.
        stage_function (str, optional): a template function usable in fusion;
            :meth:`as_stage` returns it as a :class:`Stage`.

    Example:
        >>> k = Kernel("scale", source_text=SRC, function="scale_kernel",
        ...            args=[Tensor("x"), Output("y", shape=lambda b: b.x.shape, dtype="x")],
        ...            attributes=("thread_position_in_grid",),
        ...            dispatch=lambda b: per_element(b.x.size),
        ...            reference=lambda b: b.x * 2)
        >>> y = k(mx.ones((100,)))
    """

    def __init__(self, name, *, function, args, dispatch, source=None, source_text=None,
                 includes=(), structs=(), policies=None, template=(), threadgroup=(),
                 attributes=DEFAULT_ATTRIBUTES, reference=None, stage_function=None,
                 stage_consumes=None, stage_produces=None, stage_reference=None):
        policies = dict(policies or {})
        all_args = _merge_args([_policy_args(policies), args], f"Kernel {name}")
        super().__init__(name, args=all_args, dispatch=dispatch, reference=reference,
                         structs=structs, threadgroup=threadgroup)
        self._stage = Stage(name, function=function, source=source, source_text=source_text,
                            includes=includes, args=args, policies=policies,
                            template=template, attributes=attributes,
                            threadgroup=threadgroup, structs=structs, writes_output=True)
        self._policies = policies
        self.function = function
        self.stage_function = stage_function
        self._stage_contract = (stage_consumes, stage_produces, stage_reference)

    def _source_files(self):
        files = [p.header for p in self._policies.values()] + list(self._stage.includes)
        if self._stage.source:
            files.append(self._stage.source)
        return files

    def _inline_sources(self):
        if self._stage.source_text:
            return [(f"{self.name} (inline)", self._stage.source_text)]
        return []

    def _call_lines(self, constants, tg_names, out_dtypes):
        lines = []
        for var, pol in self._policies.items():
            lines += pol.init_code(var)
        lines += self._stage.call_lines(constants, tg_names, set())
        return lines

    def as_stage(self):
        """The kernel as a fusable :class:`Stage` (needs ``stage_function``).

        Arguments declared with ``stage_skip=True`` are left out (another stage,
        typically a policy, provides them).
        """
        if not self.stage_function:
            raise ValueError(f"[{self.who}] has no stage_function; it cannot be fused.")
        consumes, produces, ref = self._stage_contract
        s = self._stage
        return Stage(self.name, function=self.stage_function, source=s.source,
                     source_text=s.source_text, includes=s.includes,
                     args=[a for a in s.args if not a.stage_skip], policies=s.policies,
                     consumes=consumes, produces=produces, template=s.template,
                     attributes=s.attributes, threadgroup=s.threadgroup, structs=s.structs,
                     reference=ref, writes_output=not produces)
