"""The content-keyed kernel cache.

Two levels, as in Triton's runtime and candle's kernel cache:

* each descriptor keeps a dictionary from its *specialization key* (backend,
  input dtypes, compile-time constants) to a ready launch; a hit is one
  dictionary lookup: no template rendering, no hashing of source text;
* on a miss the full source is rendered and hashed, and the MLX kernel object
  is looked up here by that content hash, so two descriptors that produce the
  same text share one compiled kernel and two that differ in one byte never do.

The kernel name handed to MLX always carries the content hash, whatever MLX
version is installed (older MLX keyed its own cache by name only).
"""

import hashlib
import threading
from dataclasses import dataclass

_lock = threading.RLock()
_by_content = {}
_stats = {"hits": 0, "misses": 0, "compiles": 0}


@dataclass(frozen=True)
class CacheInfo:
    """Counters of the kernel cache.

    Attributes:
        hits: launches served by a descriptor's ready specialization.
        misses: specializations rendered (source text built and hashed).
        compiles: distinct sources handed to MLX (each is a JIT compile on first run).
        entries: distinct sources currently held.
    """

    hits: int
    misses: int
    compiles: int
    entries: int


def cache_info():
    """Return a :class:`CacheInfo` snapshot."""
    with _lock:
        return CacheInfo(_stats["hits"], _stats["misses"], _stats["compiles"], len(_by_content))


def clear_cache():
    """Forget every compiled kernel and reset the counters, and read ``.metal`` files
    again: after editing a source file in a REPL, call this and launch again.

    MLX keeps its own compiled libraries; this only drops mlx_foundry's handles,
    so a later launch re-renders and re-hashes (and MLX reuses its library when
    the text is unchanged; an edited file is new text, so a new kernel name).
    """
    from . import kernel as _kernel
    from . import sources as _sources

    _sources.forget_files()
    with _lock:
        _by_content.clear()
        for k in _stats:
            _stats[k] = 0
        _kernel._clear_specializations()


def content_hash(*parts):
    """A short, stable hash of everything that reaches the compiler."""
    h = hashlib.sha256()
    for p in parts:
        h.update(str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def record_hit():
    # Under the lock: `+=` on a dict entry is not atomic across threads (lost counts
    # under the thread test), and an uncontended lock costs well under a microsecond.
    with _lock:
        _stats["hits"] += 1


def record_miss():
    with _lock:
        _stats["misses"] += 1


def get_or_build(key, build):
    """The compiled object for content ``key``, built once with ``build()``."""
    with _lock:
        obj = _by_content.get(key)
        if obj is None:
            obj = build()
            _by_content[key] = obj
            _stats["compiles"] += 1
        return obj
