"""A small virtual file system for ``.metal`` sources.

Files are addressed by paths relative to a source root (the package's own
``metal_src/`` first, then roots added with :func:`add_source_root`).  Kernel
headers are strings handed to MLX, so ``#include`` cannot be left to the Metal
compiler: declared includes are resolved here, in order, each file once.
"""

import functools
import re
import threading
import warnings
from importlib import resources
from pathlib import Path

import jinja2

_PACKAGE_ROOT = Path(str(resources.files("mlx_foundry") / "metal_src"))
_roots = [_PACKAGE_ROOT]
_lock = threading.Lock()
_warned = set()

_LOCAL_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[^\n]*\n?', re.M)
_SYSTEM_INCLUDE = re.compile(r"^[ \t]*#[ \t]*include[ \t]*<[^>]+>[^\n]*\n?", re.M)


class SourceNotFoundError(FileNotFoundError):
    """A source file was asked for and is in no source root."""


def add_source_root(path):
    """Add a directory searched (after the package's own) for ``.metal`` files."""
    p = Path(path).resolve()
    if not p.is_dir():
        raise ValueError(f"[sources] Source root {str(path)!r} is not a directory.")
    with _lock:
        if p not in _roots:
            _roots.append(p)
            _read.cache_clear()


def forget_files():
    """Drop the cached text of every source file (they are read again when next needed)."""
    with _lock:
        _read.cache_clear()


def source_roots():
    return tuple(_roots)


@functools.lru_cache(maxsize=None)
def _read(relpath):
    for root in _roots:
        f = root / relpath
        if f.is_file():
            return f.read_text()
    return None


def load(relpath, *, requested_by="mlx_foundry"):
    """The text of ``relpath`` (relative to a source root).

    Raises:
        SourceNotFoundError: naming the file and who asked for it.
    """
    if Path(relpath).is_absolute() or ".." in Path(relpath).parts:
        raise ValueError(
            f"[sources] {requested_by} asked for {relpath!r}: source paths are relative "
            "to a source root and may not contain '..'."
        )
    text = _read(relpath)
    if text is None:
        roots = ", ".join(str(r) for r in _roots)
        raise SourceNotFoundError(
            f"[sources] {requested_by} includes {relpath!r}, which is in no source "
            f"root ({roots})."
        )
    return text


def _strip_includes(relpath, text):
    """Remove include lines; return (text, local includes in order)."""
    local = _LOCAL_INCLUDE.findall(text)
    if local and relpath not in _warned:
        _warned.add(relpath)
        warnings.warn(
            f"[sources] {relpath} has local #include lines ({', '.join(local)}); "
            "mlx_foundry resolves them, but declare them in the descriptor's "
            "includes= instead.",
            stacklevel=4,
        )
    text = _LOCAL_INCLUDE.sub("", text)
    text = _SYSTEM_INCLUDE.sub("", text)
    return text, local


def resolve(paths, *, requested_by="mlx_foundry"):
    """Resolve ``paths`` into an ordered list of ``(relpath, text)``.

    Each file appears once, after the files it includes, in first-request order.
    Local ``#include "..."`` lines are followed, then stripped (with a warning);
    ``#include <...>`` lines are stripped (MLX provides the standard headers).
    """
    out = []
    done = set()
    active = []

    def visit(relpath, asker):
        if relpath in done:
            return
        if relpath in active:
            cycle = " -> ".join(active + [relpath])
            raise ValueError(f"[sources] Include cycle: {cycle}.")
        active.append(relpath)
        text, local = _strip_includes(relpath, load(relpath, requested_by=asker))
        for dep in local:
            visit(dep, relpath)
        active.pop()
        done.add(relpath)
        out.append((relpath, text))

    for p in paths:
        visit(p, requested_by)
    return out


_env = jinja2.Environment(
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
    trim_blocks=True,
    lstrip_blocks=True,
    autoescape=False,
)


@functools.lru_cache(maxsize=256)
def _template(text):
    return _env.from_string(text)


def render(text, **context):
    """Render Jinja2 template text; an undefined name is an error."""
    try:
        return _template(text).render(**context)
    except jinja2.UndefinedError as e:
        raise ValueError(f"[sources] Template needs a value that was not given: {e}.") from None


_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)


def strip_comments(text):
    """Remove C comments (MLX searches bodies by substring, comments included)."""
    return _COMMENT.sub("", text)
