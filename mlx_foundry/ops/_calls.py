"""Prepared launches kept on a :class:`~mlx_foundry.ops.Weight`: the ops' repeat calls.

An op called again with the same weight and the same shapes and dtypes of its other
arguments launches the same kernel with the same fixed inputs. The first such call
checks everything, resolves the launch and prepares it (``Program.prepare``); later
calls find it here and only pass the varying arrays (``PreparedLaunch`` checks their
shapes and dtypes), which takes a few microseconds of Python instead of the whole
call's checks, binding and plan lookup (``tools/host_cost.py ops``).

An entry holds the weight's arrays it was prepared with and is used only while the
weight still holds those very arrays (identity, not ``id``: the entry keeps them alive,
so their ids cannot be reused) and while :func:`~mlx_foundry.kernel.launch_epoch` has
not moved (a cleared kernel cache or a new tuning).
"""

from ..kernel import launch_epoch

MAX_ENTRIES = 16
"""Entries per weight (one per shape of ``x`` and options): a model calls a weight with
one or two shapes; past this the weight's entries are dropped and built again."""


def _arrays(weight):
    return (weight.weight, weight.scales, weight.biases, weight.bias)


def lookup(weight, key):
    """The launch prepared for ``key`` on ``weight``, or ``None``."""
    entries = weight.__dict__.get("_calls")
    if entries is None:
        return None
    entry = entries.get(key)
    if entry is None or entry[0] != launch_epoch():
        return None
    held, step = entry[1], entry[2]
    now = _arrays(weight)
    if held[0] is not now[0] or held[1] is not now[1] or held[2] is not now[2] \
            or held[3] is not now[3]:
        return None
    return step


def store(weight, key, step):
    """Keep ``step`` for ``key`` on ``weight`` (see the module docstring)."""
    entries = weight.__dict__.setdefault("_calls", {})
    if len(entries) >= MAX_ENTRIES and key not in entries:
        entries.clear()
    entries[key] = (launch_epoch(), _arrays(weight), step)
