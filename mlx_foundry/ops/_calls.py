"""Launches prepared for a :class:`~mlx_foundry.ops.Weight`: the ops' repeat calls.

An op called again with the same weight and the same shapes and dtypes of its other
arguments launches the same kernel with the same fixed inputs. Its second such call
prepares that launch (``Program.prepare``) after the full checks; later calls find it
here and only pass the varying arrays (``PreparedLaunch`` checks their shapes and
dtypes): a few microseconds of Python instead of the whole call's checks and plan
lookup (``tools/host_cost.py ops``). A first call only marks the key, so that a weight
made for one call (``linear(x, Weight(w, s, b))``) pays the bookkeeping (about 2 us)
but no prepare.

The launches are kept beside the weights (a ``WeakKeyDictionary``, which needs
``Weight``'s identity hashing: a ``Weight`` stays a plain object to copy and pickle, and
its entries go with it), with the weight's arrays they were prepared with and the
shapes and dtypes those had. An entry is used only while the weight holds those very
arrays with those shapes and dtypes (an in-place ``+=`` may promote a dtype on the same
array object), while :func:`~mlx_foundry.kernel.launch_epoch` has not moved
(``clear_cache``, a new tuning), and when the prepared launch passes the arrays to the
kernel as they are (a tiny array is padded into a copy once, which would miss an
in-place update: such a call is never kept). A weight given other arrays drops all its
entries, so that none holds the old arrays.
"""

import weakref

from ..kernel import launch_epoch

MAX_ENTRIES = 64
"""Entries per weight (one per shape and dtype of ``x`` and options; batch sizes up to
``PREFILL_ROWS`` times dtypes stay under it); past it the oldest entry goes."""

SEEN = "seen"
""":func:`lookup`'s answer for a key called once: prepare it on this call."""

NEVER = "never"
""":func:`lookup`'s answer for a key whose launch cannot be kept: take the full path."""

STATES = (SEEN, NEVER)
"""What :func:`lookup` answers besides a kept launch or ``None``."""

_kept = weakref.WeakKeyDictionary()  # Weight -> {key: (epoch, arrays, metas, what)}
_epoch = [launch_epoch()]            # the epoch _kept was last cleared for


def arrays_of(weight):
    """The arrays a launch of ``weight`` reads (the snapshot an entry is checked by)."""
    return (weight.weight, weight.scales, weight.biases, weight.bias)


def _same(a, b):
    return a[0] is b[0] and a[1] is b[1] and a[2] is b[2] and a[3] is b[3]


def _metas(arrays):
    return tuple(None if a is None else (a.shape, a.dtype) for a in arrays)


def lookup(weight, key):
    """The launch kept for ``key`` on ``weight``, :data:`SEEN`, :data:`NEVER` or ``None``
    (never called, or stale)."""
    epoch = launch_epoch()
    if _epoch[0] != epoch:
        _kept.clear()  # a cleared kernel cache or a new tuning: all of it is stale
        _epoch[0] = epoch
        return None
    entries = _kept.get(weight)
    entry = None if entries is None else entries.get(key)
    if entry is None or entry[0] != epoch:
        return None
    now = arrays_of(weight)
    if not _same(entry[1], now) or entry[2] != _metas(now):
        _kept.pop(weight, None)  # other arrays now: what the old ones were kept for goes
        return None
    return entry[3]


def keep(weight, key, arrays, epoch, what):
    """Keep ``what`` (a ``PreparedLaunch``, :data:`SEEN` or :data:`NEVER`) for ``key`` on
    ``weight``, made from ``arrays`` during a call that began at ``epoch``; nothing when
    the epoch moved since (the launch may be of dropped kernels or launch choices)."""
    if epoch != launch_epoch():
        return
    if what not in STATES and not what.passes_as_given(*arrays):
        what = NEVER  # prepared from other arrays (a concurrent change) or padded copies
    entries = _kept.get(weight)
    if entries is None:
        entries = _kept[weight] = {}
    elif not all(_same(e[1], arrays) for e in entries.values()):
        entries.clear()  # entries of arrays the weight no longer holds: let them go
    if len(entries) >= MAX_ENTRIES and key not in entries:
        del entries[next(iter(entries))]
    entries[key] = (epoch, arrays, _metas(arrays), what)
