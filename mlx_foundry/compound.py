"""Compound kernels: prologue -> main -> epilogue stages fused into one body.

The Python form of the seed's ``#[derive(CompoundKernel)]``.  The assembler:

1. merges the stages' arguments (the same name must be the same declaration),
2. checks the value chain — every consumed value is produced earlier with the
   same type, nothing is produced twice except in place, the result exists —
   and fails with a clear Python error before any compiler runs,
3. writes a body that declares threadgroup memory, initialises policy values,
   calls each stage in order, and (unless ``manual_output``) stores the result::

       if (valid) out[index] = static_cast<T>(result);

The reference composes the stages' references over whole tensors.
"""

from .args import Output
from .kernel import Program, _merge_args, _policy_args
from .stage import Stage, Threadgroup
from .types import metal_type_name


class ChainError(ValueError):
    """The stages of a compound kernel do not fit together."""


class CompoundKernel(Program):
    """Fuse stages into one kernel.

    Args:
        name (str): readable kernel name.
        main (Stage): exactly one main stage.
        prologues (list of Stage): stages before the main stage.
        epilogues (list of Stage): stages after it.
        outputs (list of Output): the kernel's outputs.
        dispatch (callable): ``dispatch(bound) -> DispatchConfig``.
        manual_output (bool): a stage writes the outputs itself (no automatic
            store). Default: ``False``.
        result (str): the value stored to the single output. Default: ``"acc"``.
        index (str): the value giving the element index. Default: ``"index"``.
        valid (str, optional): a ``bool`` value guarding the store. Default: ``"valid"``
            if some stage produces it, else no guard.
        args (list of Arg): extra arguments, e.g. to fix the buffer order.
        threadgroup (tuple): extra threadgroup arrays (stages declare their own).

    Example:
        >>> k = CompoundKernel("norm_gemv_silu", prologues=[rms], main=gemv,
        ...                    epilogues=[scale, silu], outputs=[out], dispatch=...)
        >>> print(k.source(x, w, gamma, backend="metal"))
    """

    def __init__(self, name, *, main, outputs, dispatch, prologues=(), epilogues=(),
                 manual_output=False, result="acc", index="index", valid=None, args=(),
                 threadgroup=()):
        who = f"CompoundKernel {name}"
        if isinstance(main, (list, tuple)):
            raise ChainError(f"[{who}] needs exactly one main stage but got {len(main)}.")
        stages = list(prologues) + [main] + list(epilogues)
        for s in stages:
            if not isinstance(s, Stage):
                raise TypeError(f"[{who}] Stages must be Stage objects but got {s!r} "
                                "(a Kernel becomes one with .as_stage()).")
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ChainError(f"[{who}] Stage names must be unique but got {names}.")
        outputs = list(outputs)
        for o in outputs:
            if not isinstance(o, Output):
                raise TypeError(f"[{who}] 'outputs' must hold Output declarations.")
        groups = [list(args)] + [_policy_args(s.policies) + list(s.args) for s in stages]
        merged = _merge_args(groups + [outputs], who)
        tgs = {}
        for t in [Threadgroup.parse(t) for t in threadgroup] + [
                t for s in stages for t in s.threadgroup]:
            if t.name in tgs and tgs[t.name] != t:
                raise ChainError(f"[{who}] Two stages declare threadgroup array {t.name!r} "
                                 "differently.")
            tgs[t.name] = t
        structs = [s_ for s in stages for s_ in s.structs]
        super().__init__(name, args=merged, dispatch=dispatch, reference=self._reference,
                         structs=structs, threadgroup=tuple(tgs.values()), who=who)
        self.prologues = tuple(prologues)
        self.main = main
        self.epilogues = tuple(epilogues)
        self.stages = tuple(stages)
        self.manual_output = bool(manual_output)
        self.result, self.index = result, index
        self._check_chain(valid)

    def _check_chain(self, valid):
        who = self.who
        produced = {}
        policy_vars = {}
        # Every name the body declares or MLX passes in: a value may not shadow one.
        taken = {a.input_name: "an MLX input" for a in self.inputs}  # e.g. params_bytes
        taken.update({a.name: "an argument" for a in self.inputs + self.outputs
                      + self.constants})
        taken.update({t.name: "a threadgroup array" for t in self.threadgroup})
        for s in self.stages:
            for var, pol in s.policies.items():
                if var in policy_vars and policy_vars[var] is not pol:
                    raise ChainError(f"[{who}] Policy value {var!r} is bound to two policies.")
                policy_vars[var] = pol
            for k in list(s.policies) + list(s.produces):
                if k in taken:
                    raise ChainError(
                        f"[{who}] Stage {s.name!r} declares value {k!r}, which is already "
                        f"the name of {taken[k]} of this kernel.")
            for k, t in s.consumes.items():
                if k not in produced:
                    raise ChainError(
                        f"[{who}] Stage {s.name!r} consumes {k!r}, which no earlier stage "
                        f"produces (available: {', '.join(produced) or 'nothing'}).")
                if produced[k][1] != t:
                    raise ChainError(
                        f"[{who}] Stage {s.name!r} consumes {k!r} as {t} but stage "
                        f"{produced[k][0]!r} produces it as {produced[k][1]}.")
            for k, t in s.produces.items():
                if k in produced and k not in s.consumes:
                    raise ChainError(
                        f"[{who}] {k!r} is produced by both {produced[k][0]!r} and "
                        f"{s.name!r}; a later stage may only update it in place.")
                produced[k] = (s.name, t)
        writers = [s.name for s in self.stages if s.writes_output]
        if self.manual_output:
            if not writers:
                raise ChainError(f"[{who}] manual_output needs a stage with writes_output=True.")
            self.valid = None
            return
        if writers:
            raise ChainError(f"[{who}] Stage(s) {writers} write outputs; set manual_output=True.")
        if len(self.outputs) != 1:
            raise ChainError(f"[{who}] The automatic store writes one output; use "
                             "manual_output for several.")
        for what, k in (("result", self.result), ("index", self.index)):
            if k not in produced:
                raise ChainError(f"[{who}] The {what} value {k!r} is produced by no stage.")
        if valid is None and "valid" in produced:
            valid = "valid"
        if valid is not None:
            if valid not in produced:
                raise ChainError(f"[{who}] The valid value {valid!r} is produced by no stage.")
            if produced[valid][1] != "bool":
                raise ChainError(f"[{who}] The valid value {valid!r} must be bool.")
        self.valid = valid

    def _source_files(self):
        files = []
        for s in self.stages:
            files += [p.header for p in s.policies.values()]
            files += list(s.includes)
            if s.source:
                files.append(s.source)
        return files

    def _inline_sources(self):
        # One text shared by several stages (one snippet defining them all) is pasted
        # once, as a file given by path is.
        seen, out = set(), []
        for s in self.stages:
            if s.source_text and s.source_text not in seen:
                seen.add(s.source_text)
                out.append((f"stage {s.name} (inline)", s.source_text))
        return out

    def _call_lines(self, constants, tg_names, out_dtypes):
        lines = []
        declared = set()
        initialised = set()
        for s in self.stages:
            for var, pol in s.policies.items():
                if var not in initialised:
                    lines += pol.init_code(var)
                    initialised.add(var)
            lines += s.call_lines(constants, tg_names, declared)
        if not self.manual_output:
            out = self.outputs[0]
            store = (f"{out.name}[{self.index}] = static_cast<{metal_type_name(out_dtypes[0])}>"
                     f"({self.result});")
            lines.append(f"if ({self.valid}) {{ {store} }}" if self.valid else store)
        return lines

    def _reference(self, bound):
        values = {}
        for s in self.stages:
            if s.reference is None:
                raise NotImplementedError(f"[{self.who}] Stage {s.name!r} has no reference.")
            got = s.reference(bound, values)
            # A misspelt name would be dropped silently and the oracle skip the stage.
            # (A subset is fine: values such as a row's index exist only in the kernel.)
            allowed = set(s.produces) | ({o.name for o in self.outputs}
                                         if s.writes_output else set())
            if not isinstance(got, dict) or not set(got) <= allowed:
                what = sorted(got) if isinstance(got, dict) else type(got).__name__
                raise ValueError(f"[{self.who}] The reference of stage {s.name!r} must return "
                                 f"a dict of values it produces ({sorted(allowed)}) but "
                                 f"returned {what}.")
            values.update(got)
        if self.manual_output:
            return [values[o.name] for o in self.outputs]
        out = self.outputs[0]
        shape, dtype = out.resolve(bound)
        return [values[self.result].astype(dtype).reshape(shape)]
