"""Dtype policies: how a weight format is loaded (the seed's ``MetalPolicy``).

A policy names a Metal header, the Metal struct type that holds the policy's
buffers (``struct_name`` plus template arguments), the kernel arguments it owns,
and how each field of that struct is filled from kernel arguments — an argument
name, or ``"params.field"`` for a field of a parameter struct (a pointer
dereference, ``params->field``).  The generated body declares one value of the
struct per policy use, so several policies, or one policy twice, can appear in
one kernel without global ``#define`` switches.

Every policy has a reference: ``dequantize(bound)`` returns the dense weight
with plain MLX ops.
"""

from .._names import check_identifier
from ..args import Arg, Params


class Policy:
    """A weight-loading policy.

    Args:
        name (str): readable name (``"affine4_g64"``).
        header (str): the ``.metal`` file defining the struct.
        struct_name (str): the Metal struct (template) name, e.g. ``"PolicyAffine"``.
        template (tuple of str): template arguments of the struct (constant names
            or literal text).
        params (dict): struct field -> ``"arg"`` or ``"params.field"``.
        args (tuple of Arg): the arguments (buffers, constants) the policy owns.
        dequantize (callable): ``dequantize(bound) -> mx.array``, the dense weight.
    """

    half_pairs = 0
    """The pair order of the GEMV's packed-half path (``HALF_PAIRS`` of the Metal struct;
    0: the policy has no such path)."""

    def __init__(self, name, *, header, struct_name, params, args, template=(),
                 dequantize=None):
        self.name = name
        self.header = header
        self.struct_name = check_identifier(struct_name, "policy struct name", who="Policy")
        self.template = tuple(template)
        self.args = tuple(args)
        for a in self.args:
            if not isinstance(a, Arg):
                raise TypeError(f"[Policy {name}] 'args' must hold argument declarations.")
        arg_names = {a.name: a for a in self.args}
        self.params = {}
        for field, src in dict(params).items():
            check_identifier(field, "policy field", who=f"Policy {name}")
            base, _, sub = src.partition(".")
            if base not in arg_names:
                raise ValueError(f"[Policy {name}] Field {field!r} comes from {src!r} but "
                                 f"the policy has no argument {base!r}.")
            if sub and not isinstance(arg_names[base], Params):
                raise ValueError(f"[Policy {name}] {src!r}: only a Params argument has fields.")
            if sub:
                check_identifier(sub, "struct field", who=f"Policy {name}")
            self.params[field] = src
        self.dequantize = dequantize

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r})"

    def metal_type(self):
        if not self.template:
            return self.struct_name
        return f"{self.struct_name}<{', '.join(str(t) for t in self.template)}>"

    def init_code(self, var):
        """The seed's INIT_PARAMS_CODE, for a value named ``var``."""
        lines = [f"{self.metal_type()} {var};"]
        for field, src in self.params.items():
            base, _, sub = src.partition(".")
            expr = f"{base}->{sub}" if sub else base
            lines.append(f"{var}.{field} = {expr};")
        return lines
