"""Launches prepared for a :class:`~mlx_foundry.ops.Weight`: the ops' repeat calls.

An op called again with the same weight and the same shapes and dtypes of its other
arguments launches the same kernel with the same fixed inputs. Its second such call
prepares that launch (``Program.prepare``) after the full checks; later calls find it
here and only pass the varying arrays (``PreparedLaunch`` checks their shapes and
dtypes): a few microseconds of Python instead of the whole call's checks and plan
lookup (``tools/host_cost.py ops``). A first call only marks the key, so that a weight
made for one call (``linear(x, Weight(w, s, b))``) pays nothing for it.

The launches are kept beside the weights (a ``WeakKeyDictionary``: a ``Weight`` stays
a plain object to copy and pickle, and its entries go with it), with the weight's
arrays they were prepared with. An entry is used only while the weight still holds
those very arrays (identity: the entry keeps them alive, so their ids cannot be reused)
and the prepared launch passes them to the kernel as they are (a tiny array is padded
into a copy once, which would miss an in-place update: such a call is never kept).
When the weight holds other arrays its entries are dropped; when
:func:`~mlx_foundry.kernel.launch_epoch` moves (``clear_cache``, a new tuning) every
entry is.
"""

import weakref

from ..kernel import launch_epoch

MAX_ENTRIES = 16
"""Entries per weight (one per shape of ``x`` and options): a model calls a weight with
one or two shapes; past this the weight's entries are dropped and built again."""

SEEN = "seen"
""":func:`lookup`'s answer for a key called once: prepare it on this call."""

NEVER = "never"
""":func:`lookup`'s answer for a key whose launch cannot be kept: take the full path."""

_kept = weakref.WeakKeyDictionary()  # Weight -> {key: (arrays, PreparedLaunch or state)}
_epoch = [launch_epoch()]            # the epoch of everything in _kept


def arrays_of(weight):
    """The arrays a launch of ``weight`` reads (the snapshot an entry is checked by)."""
    return (weight.weight, weight.scales, weight.biases, weight.bias)


def lookup(weight, key):
    """The launch kept for ``key`` on ``weight``, :data:`SEEN`, :data:`NEVER` or ``None``
    (never called, or stale)."""
    if _epoch[0] != launch_epoch():
        _kept.clear()  # a cleared kernel cache or a new tuning: all of it is stale
        _epoch[0] = launch_epoch()
        return None
    entries = _kept.get(weight)
    entry = None if entries is None else entries.get(key)
    if entry is None:
        return None
    held, now = entry[0], arrays_of(weight)
    if (held[0] is not now[0] or held[1] is not now[1] or held[2] is not now[2]
            or held[3] is not now[3]):
        _kept.pop(weight, None)  # other arrays now: what the old ones were kept for goes
        return None
    return entry[1]


def keep(weight, key, arrays, epoch, what):
    """Keep ``what`` (a ``PreparedLaunch``, :data:`SEEN` or :data:`NEVER`) for ``key`` on
    ``weight``, made from ``arrays`` during a call that began at ``epoch``; nothing when
    the epoch moved since (the launch may be of dropped kernels or launch choices)."""
    if epoch != launch_epoch() or _epoch[0] != epoch:
        return
    if what not in (SEEN, NEVER) and not what.passes_as_given(*arrays):
        what = NEVER  # prepared from other arrays (a concurrent change) or padded copies
    entries = _kept.get(weight)
    if entries is None:
        entries = _kept[weight] = {}
    if len(entries) >= MAX_ENTRIES and key not in entries:
        entries.clear()
    entries[key] = (arrays, what)
