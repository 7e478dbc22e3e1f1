"""Stages: a Metal template function plus its declared contract.

A stage is called from a generated body with arguments in one fixed order
(the seed's stage signature convention, adapted to MLX)::

    function<template...>(
        policy values...,          // one per bound policy, by value
        stage args...,             // Tensor: const device T*, Output: device T*,
                                   // Params: const device S*, Scalar: by value
        consumed values...,        // by value
        produced values...,        // thread T& (declared by the assembler)
        thread attributes...,      // uint3 / uint, as MLX names them
        threadgroup pointers...)   // threadgroup T*

Stages exchange values only through the names they declare in ``consumes``
and ``produces``; a name in both is updated in place (``thread T&``).  The
compound assembler checks the chain before any compiler runs.
"""

import re
from dataclasses import dataclass

from ._names import METAL_ATTRIBUTES, check_argument_name, check_identifier
from .args import Constant, Output, Params, Scalar, Tensor

_TG = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_ ]*?)\s+([A-Za-z_][A-Za-z0-9_]*)\s*\[\s*([A-Za-z0-9_]+)\s*\]\s*$")
_CTYPE = re.compile(r"^[A-Za-z_][A-Za-z0-9_:<>, ]*$")


@dataclass(frozen=True)
class Threadgroup:
    """A threadgroup (shared) array the body declares and passes by pointer.

    Args:
        type (str): element type (``"float"``).
        name (str): the array's name.
        count (int or str): element count, or the name of an int constant.
    """

    type: str
    name: str
    count: object

    def __post_init__(self):
        check_identifier(self.name, "threadgroup array name", who="Threadgroup")
        if not _CTYPE.match(self.type):
            raise ValueError(f"[Threadgroup] Invalid element type {self.type!r}.")
        if isinstance(self.count, int):
            if self.count < 1:
                raise ValueError(f"[Threadgroup] '{self.name}' count must be positive.")
        elif isinstance(self.count, str):
            check_identifier(self.count, "threadgroup count constant", who="Threadgroup")
        else:
            raise TypeError(f"[Threadgroup] '{self.name}' count must be an int or a "
                            "constant's name.")

    @classmethod
    def parse(cls, text):
        """Parse the seed's form: ``"float shared[256]"``."""
        if isinstance(text, Threadgroup):
            return text
        m = _TG.match(text)
        if not m:
            raise ValueError(f"[Threadgroup] Cannot parse {text!r}; expected 'type name[count]'.")
        count = int(m.group(3)) if m.group(3).isdigit() else m.group(3)
        return cls(m.group(1).strip(), m.group(2), count)

    def resolved_count(self, constants):
        if isinstance(self.count, int):
            return self.count
        try:
            return int(constants[self.count])
        except KeyError:
            raise ValueError(f"[Threadgroup] '{self.name}' sizes by unknown constant "
                             f"{self.count!r}.") from None


def _check_values(values, what, who):
    out = {}
    for k, v in dict(values).items():
        # Values are declared in the body, where MLX searches for x_shape etc.
        check_argument_name(k, f"{what} value name", who=who)
        if not isinstance(v, str) or not _CTYPE.match(v):
            raise ValueError(f"[{who}] {what} value {k!r} needs a Metal type but got {v!r}.")
        out[k] = v.strip()
    return out


def as_tuple(value, what, who):
    """``value`` as a tuple; a lone string is an error, not a sequence of characters."""
    if isinstance(value, str) or not isinstance(value, (tuple, list)):
        raise TypeError(f"[{who}] {what!r} must be a tuple but got "
                        f"{type(value).__name__} {value!r} (write ({value!r},) for one).")
    return tuple(value)


class Stage:
    """A fusable piece of a kernel.

    Args:
        name (str): the stage's name (an identifier; used in messages and comments).
        function (str): the Metal template function it calls.
        source (str, optional): ``.metal`` file (relative to a source root)
            defining ``function``.
        source_text (str, optional): the same, inline (for REPL experiments).
        includes (tuple of str): further files it needs, in order.
        args (tuple of Arg): kernel arguments it reads or writes.
        policies (dict): value name -> :class:`Policy`; a policy value holds the
            policy's buffers and is passed first, by value.
        consumes (dict): value name -> Metal type, read by value.
        produces (dict): value name -> Metal type, written through ``thread T&``.
        template (tuple): template arguments: constant names, type expressions,
            or ``callable(constants) -> str``.
        attributes (tuple of str): Metal thread attributes it takes.
        threadgroup (tuple): :class:`Threadgroup` or ``"type name[count]"``.
        structs (tuple): struct classes its source uses beyond its ``Params``.
        reference (callable): ``reference(bound, values) -> dict`` of produced
            values (whole-tensor MLX ops); for an output-writing stage, a dict
            of output name -> array.
        writes_output (bool): the stage writes the kernel outputs itself.
    """

    def __init__(self, name, *, function, source=None, source_text=None, includes=(),
                 args=(), policies=None, consumes=None, produces=None, template=(),
                 attributes=(), threadgroup=(), structs=(), reference=None,
                 writes_output=False):
        who = f"Stage {name}"
        self.name = check_identifier(name, "stage name", who="Stage")
        self.function = check_identifier(function, "stage function", who=who)
        if source is not None and source_text is not None:
            raise ValueError(f"[{who}] Give 'source' or 'source_text', not both.")
        self.source = source
        self.source_text = source_text
        self.includes = as_tuple(includes, "includes", who)
        args = list(as_tuple(args, "args", who))
        if args and all(a.buffer is not None for a in args if not isinstance(a, Constant)):
            # Buffer order is the call order (the seed's stage convention).
            args.sort(key=lambda a: -1 if isinstance(a, Constant) else a.buffer)
        self.args = tuple(args)
        for a in self.args:
            if not isinstance(a, (Tensor, Output, Params, Scalar, Constant)):
                raise TypeError(f"[{who}] 'args' must hold argument declarations but got {a!r}.")
        self.policies = dict(policies or {})
        for var in self.policies:
            check_identifier(var, "policy value name", who=who)
        self.consumes = _check_values(consumes or {}, "consumed", who)
        self.produces = _check_values(produces or {}, "produced", who)
        for k in set(self.consumes) & set(self.produces):
            if self.consumes[k] != self.produces[k]:
                raise ValueError(f"[{who}] Value {k!r} is consumed as {self.consumes[k]} "
                                 f"but produced as {self.produces[k]}.")
        self.template = as_tuple(template, "template", who)
        for a in as_tuple(attributes, "attributes", who):
            if a not in METAL_ATTRIBUTES:
                raise ValueError(f"[{who}] Unknown thread attribute {a!r}. Valid attributes "
                                 f"are: {', '.join(sorted(METAL_ATTRIBUTES))}.")
        self.attributes = tuple(attributes)
        self.threadgroup = tuple(Threadgroup.parse(t)
                                 for t in as_tuple(threadgroup, "threadgroup", who))
        self.structs = as_tuple(structs, "structs", who)
        self.reference = reference
        self.writes_output = bool(writes_output)

    def __repr__(self):
        return f"Stage({self.name!r}, function={self.function!r})"

    # -- rendering -----------------------------------------------------------------
    def template_text(self, constants):
        parts = []
        for t in self.template:
            if callable(t):
                parts.append(str(t(constants)))
            elif isinstance(t, bool):
                parts.append("true" if t else "false")
            else:
                parts.append(str(t))
        return f"<{', '.join(parts)}>" if parts else ""

    def call_lines(self, constants, tg_names, declared):
        """Lines that declare this stage's new values and call its function.

        Args:
            constants (dict): resolved compile-time constants.
            tg_names (dict): threadgroup array name -> name in the body.
            declared (set): value names already declared (updated in place).
        """
        lines = []
        for k, t in self.produces.items():
            if k not in declared:
                lines.append(f"{t} {k};")
                declared.add(k)
        call = list(self.policies)
        for a in self.args:
            if isinstance(a, Constant):
                continue
            if a.metal_type_override and isinstance(a, (Tensor, Output)):
                call.append(f"reinterpret_cast<{a.metal_type_override}>({a.name})")
            else:
                call.append(a.name)
        call += [k for k in self.consumes if k not in self.produces]
        call += list(self.produces)
        call += list(self.attributes)
        call += [tg_names[t.name] for t in self.threadgroup]
        lines.append(f"{self.function}{self.template_text(constants)}({', '.join(call)});")
        return lines
