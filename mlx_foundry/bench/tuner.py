"""Launch-parameter tuner with results persisted on disk.

A kernel exposes its launch parameters (rows per SIMD-group, SIMD-groups per
threadgroup, unrolling, ...) as compile-time ``Constant``s.  :func:`tune` times
each candidate setting with a caller-supplied ``run(params) -> seconds``, keeps
the fastest and stores it; :func:`lookup` returns the stored choice.  Entries are
keyed by everything that would make them stale::

    device name | MLX version | kernel key | kernel source hash | shape class

so a kernel whose source changes (or a new MLX, or another GPU) never reuses an
old choice: the lookup misses and the caller falls back to its defaults (or
tunes again).

Storage: one JSON file, ``$MLX_FOUNDRY_CACHE_DIR/tuning.json`` or
``~/.cache/mlx_foundry/tuning.json``.  Writes are atomic (temporary file +
``os.replace``), serialized within the process by a lock and across processes
by an advisory ``fcntl`` lock where available; every write re-reads the file
and merges, so concurrent tuners do not drop each other's entries.

Wiring into an op (the hot path is one dictionary lookup, done once per
specialization, never per call)::

    from mlx_foundry.bench import tuner

    SRC_HASH = tuner.source_hash(gemv_kernel)          # once, at import
    def launch_params(n, k):
        cls = tuner.shape_class(n, k)
        return tuner.lookup("gemv_q4", source_hash=SRC_HASH, shape_class=cls) \\
            or {"ROWS_PER_SIMD": 4, "SIMDS": 8}        # the kernel's defaults

    # offline (a script on the target device), timed like every bench number:
    from mlx_foundry.bench import timing
    pool = timing.make_pool(make_inputs, set_bytes, timing.default_pool_bytes("cuda"))
    run = tuner.timed_run(lambda p: (lambda x, w, s, b: gemv(x, w, s, b, **p)), pool)
    tuner.tune("gemv_q4", [{"ROWS_PER_SIMD": r, "SIMDS": s} for r in (1, 2, 4, 8)
                           for s in (2, 4, 8)],
               run, source_hash=SRC_HASH, shape_class=tuner.shape_class(14336, 4096))

Candidates that fail to compile or run (too many threads, ...) are recorded as
failures and skipped.
"""

import contextlib
import datetime
import functools
import hashlib
import json
import math
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from .timing import device_name, mlx_version

ENV_DIR = "MLX_FOUNDRY_CACHE_DIR"
FILE_NAME = "tuning.json"
FORMAT = 2
"""The tuning file's format; a file of another format reads as empty (and is rewritten by
the next tune). 2: ``autotune`` times each call after the one before
(``autotune.depending_on``); the choices of format 1 came from independent calls, which
overlap on the GPU and favoured launches that are slower in a decode step."""

_lock = threading.RLock()
# path -> (mtime_ns, size, entries): avoid re-reading an unchanged file on lookup.
_memo = {}

__all__ = ["tune", "lookup", "stored_launches", "make_key", "shape_class", "source_hash",
           "cache_path", "entries", "timed_run", "TuningError"]


class TuningError(RuntimeError):
    """No candidate setting could be run."""


# ------------------------------------------------------------------------------------
# Keys
# ------------------------------------------------------------------------------------
def cache_path():
    """The tuning file: ``$MLX_FOUNDRY_CACHE_DIR/tuning.json`` or ``~/.cache/mlx_foundry/``."""
    d = os.environ.get(ENV_DIR) or os.path.join(os.path.expanduser("~"), ".cache",
                                                "mlx_foundry")
    return os.path.join(d, FILE_NAME)


def _bucket(v):
    v = int(v)
    if v < 1:
        raise ValueError(f"[tuner.shape_class] sizes must be positive but got {v}.")
    return 1 << math.ceil(math.log2(v))


def shape_class(n, k, m=1):
    """The bucket a shape is tuned for: each size rounded up to a power of two.

    Args:
        n (int): output size (rows of the weight).
        k (int): reduction size.
        m (int): input rows (batch x sequence). Default: ``1`` (decode).

    Returns:
        str: e.g. ``shape_class(14336, 4096) == "m1_n16384_k4096"``.
    """
    return f"m{_bucket(m)}_n{_bucket(n)}_k{_bucket(k)}"


def source_hash(obj):
    """A stable hash of a kernel's source, for tuning keys.

    Args:
        obj: a ``str`` (source text), a :class:`~mlx_foundry.KernelSource`
            (header + body), a :class:`~mlx_foundry.Program` (the text of its
            ``.metal`` files, inline sources and structs, *before* constants are
            substituted, so tuning one constant does not change the key), or a
            list/tuple of these.

    Returns:
        str: 16 hex digits.
    """
    h = hashlib.sha256()
    for part in _source_parts(obj):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _source_parts(obj):
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [p for o in obj for p in _source_parts(o)]
    if hasattr(obj, "header") and hasattr(obj, "body"):        # KernelSource
        return [obj.header, obj.body]
    if hasattr(obj, "_source_files") and hasattr(obj, "name"):  # Program
        from mlx_foundry import sources

        parts = [type(obj).__name__, obj.name, _generator_fingerprint()]
        parts += [s.metal_struct_def for s in getattr(obj, "_structs", ())]
        parts += [f"{rel}\n{text}" for rel, text in
                  sources.resolve(obj._source_files(), requested_by="tuner")]
        parts += [f"{label}\n{text}" for label, text in obj._inline_sources()]
        return parts
    raise TypeError(f"[tuner.source_hash] 'obj' must be a source str, KernelSource or "
                    f"Program but got {type(obj).__name__}.")


_GENERATOR_MODULES = ("args.py", "kernel.py", "stage.py", "compound.py", "structs.py",
                      "policies/base.py", "policies/affine.py", "policies/dense.py",
                      "backends/cuda.py", "backends/cuda_compat.py", "backends/metal.py",
                      "metal_src/compat/metal_compat.cuh")
"""What turns a descriptor into the text MLX compiles besides its ``.metal`` files: the
generated body and call, and the CUDA prelude. An edit to any of them is an edited
kernel for the tuner."""


@functools.lru_cache(maxsize=1)
def _generator_fingerprint():
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for rel in _GENERATOR_MODULES:
        h.update(rel.encode() + b"\0" + (root / rel).read_bytes() + b"\0")
    return h.hexdigest()[:16]


def make_key(kernel_key, *, source_hash, shape_class, device=None, mlx_version_=None):
    """The storage key: ``device|mlx-<version>|kernel_key|source_hash|shape_class``."""
    for name, v in (("kernel_key", kernel_key), ("source_hash", source_hash),
                    ("shape_class", shape_class)):
        if not isinstance(v, str) or not v or "|" in v:
            raise ValueError(f"[tuner] {name!r} must be a non-empty str without '|' "
                             f"but got {v!r}.")
    return f"{_key_prefix(device, mlx_version_)}{kernel_key}|{source_hash}|{shape_class}"


def _key_prefix(device=None, version=None):
    """``device|mlx-<version>|``: where the keys of one device and MLX version start."""
    dev = device if device is not None else device_name()
    ver = version if version is not None else mlx_version()
    return f"{dev.replace('|', '/')}|mlx-{ver}|"


def _choice(entry):
    """The parameters a stored entry puts in place of the caller's default: ``None`` when
    its tuning kept that default, or for a malformed entry."""
    params = entry.get("params") if isinstance(entry, dict) else None
    if not isinstance(params, dict) or params == entry.get("default"):
        return None
    return dict(params)


# ------------------------------------------------------------------------------------
# Storage
# ------------------------------------------------------------------------------------
@contextlib.contextmanager
def _file_lock(path):
    """Advisory inter-process lock on ``path + '.lock'`` (no-op without fcntl)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".lock", "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _read(path):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return {}
    memo = _memo.get(path)
    if memo and memo[0] == (st.st_mtime_ns, st.st_size):
        return memo[1]
    try:
        with open(path) as f:
            data = json.load(f)
        entries = data.get("entries", {}) if data.get("format") == FORMAT else {}
        if not isinstance(entries, dict):
            entries = {}
    except (OSError, ValueError, AttributeError):
        entries = {}      # a corrupt file is treated as empty and rewritten on next tune
    _memo[path] = ((st.st_mtime_ns, st.st_size), entries)
    return entries


def _write_entry(path, key, entry):
    with _lock, _file_lock(path):
        _memo.pop(path, None)
        entries = dict(_read(path))
        entries[key] = entry
        d = os.path.dirname(path) or "."
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tuning.", suffix=".json", dir=d)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"format": FORMAT, "entries": entries}, f, indent=1, sort_keys=True)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _memo.pop(path, None)


def entries(path=None):
    """All stored entries (key -> entry dict) of the tuning file."""
    with _lock:
        return dict(_read(path or cache_path()))


def stored_launches(*, device=None, mlx_version=None, path=None):
    """The stored choices that replace a default on this device and MLX version.

    What a run here may pick up from the tuning file: an entry applies only where its
    kernel's source hash still matches, which only the op that looks it up knows, so
    this lists every candidate entry (for the record of a benchmark run). Malformed
    entries are left out, as :func:`lookup` would not use them either.

    Args:
        device (str, optional): the device name. Default: this process's device.
        mlx_version (str, optional): the MLX version. Default: the installed one.
        path (str, optional): the tuning file. Default: :func:`cache_path`.

    Returns:
        list of dict: ``{"kernel", "source_hash", "shape_class", "params"}``, sorted.
    """
    prefix = _key_prefix(device, mlx_version)
    out = []
    for key, e in entries(path).items():
        parts = key[len(prefix):].split("|") if key.startswith(prefix) else ()
        params = _choice(e) if len(parts) == 3 else None
        if params is not None:
            out.append({"kernel": parts[0], "source_hash": parts[1], "shape_class": parts[2],
                        "params": params})
    return sorted(out, key=lambda d: (d["kernel"], d["shape_class"], d["source_hash"]))


def lookup(kernel_key, *, source_hash, shape_class, device=None, mlx_version=None,
           path=None):
    """The stored launch parameters for this kernel, source, shape class and device.

    Returns:
        dict or None: the chosen parameters, or ``None`` when nothing was tuned
        under exactly this key (e.g. the kernel source changed since) or when the
        tuner kept the caller's untuned ``default``: the caller's default applies then,
        also after it changed without a change of the kernel source.
    """
    key = make_key(kernel_key, source_hash=source_hash, shape_class=shape_class,
                   device=device, mlx_version_=mlx_version)
    with _lock:
        e = _read(path or cache_path()).get(key)
    return _choice(e)


DEFAULT_MARGIN = 0.03
"""How much faster than the default setting a candidate must time to replace it."""


def tune(kernel_key, candidates, run, *, source_hash, shape_class, repeats=5, warmup=1,
         device=None, mlx_version=None, path=None, force=False, default=None,
         margin=DEFAULT_MARGIN, refine=None):
    """Time every candidate setting, keep the fastest, persist it, return it.

    Args:
        kernel_key (str): names the kernel (and variant), e.g. ``"gemv_affine_q4"``.
        candidates (list of dict): settings, e.g. ``[{"ROWS_PER_SIMD": 2, "SIMDS": 8}]``.
        run (callable): ``run(params) -> seconds`` for one timing of one setting (use
            :func:`mlx_foundry.bench.timing.measure` for an honest number).
        source_hash (str): :func:`source_hash` of the kernel.
        shape_class (str): :func:`shape_class` of the shape being tuned.
        repeats (int): timings per candidate, taken in interleaved rounds (each
            candidate once per round); the median decides. Default: ``5``.
        warmup (int): untimed calls per candidate first (compiles). Default: ``1``.
        device, mlx_version (str, optional): override the key's device / MLX version.
        path (str, optional): the tuning file. Default: :func:`cache_path`.
        force (bool): tune even if a result is stored. Default: ``False``.
        default (dict, optional): the kernel's untuned setting (added to the candidates
            when missing). It is kept unless the fastest candidate's median is at least
            ``margin`` below its own: timings of short kernels carry host noise (on CUDA
            MLX's per-launch encoding can take as long as the kernel), and a setting
            chosen by noise is stored for good.
        margin (float): see ``default``. Default: :data:`DEFAULT_MARGIN`.
        refine (list of dict, optional): a second pass over settings that multiply the
            search (e.g. ``[{"UNROLL": 2}, {"UNROLL": 4}]``): each is merged into the
            first pass's choice (the default unless another is clearly faster), and
            those settings, that choice itself and ``default`` are timed again in
            rounds of their own; the choice is made among them (a refined setting must
            beat the one it refines by ``margin``, as any setting must beat
            ``default``). The grid of
            the first pass does not grow by a factor per refined constant, at the cost
            of missing a setting that wins only with a refinement. When the refined
            setting or the default fails in the second pass, the first pass decides.

    Returns:
        dict: the chosen setting (a copy of one of ``candidates`` or ``default``, or of
        the refinement of one of them).

    Raises:
        TuningError: when every candidate raised.
    """
    if not candidates or not all(isinstance(c, dict) for c in candidates):
        raise ValueError("[tuner.tune] 'candidates' must be a non-empty list of dicts.")
    if not callable(run):
        raise TypeError("[tuner.tune] 'run' must be callable(params) -> seconds.")
    if default is not None:
        if not isinstance(default, dict):
            raise TypeError("[tuner.tune] 'default' must be a dict of launch parameters.")
        if default not in candidates:
            candidates = [default] + list(candidates)
    if not 0 <= margin < 1:
        raise ValueError(f"[tuner.tune] 'margin' must be in [0, 1) but got {margin!r}.")
    if refine is not None:
        if not isinstance(refine, (list, tuple)) or not all(isinstance(r, dict)
                                                            for r in refine):
            raise TypeError(f"[tuner.tune] 'refine' must be a list of dicts of launch "
                            f"parameters but got {refine!r}.")
    path = path or cache_path()
    key = make_key(kernel_key, source_hash=source_hash, shape_class=shape_class,
                   device=device, mlx_version_=mlx_version)
    if not force:
        with _lock:
            e = _read(path).get(key)
        if e:
            return dict(e["params"])
    failures = []
    results = _time_rounds(candidates, run, repeats, warmup, failures)
    if not results:
        raise TuningError(f"[tuner.tune] every candidate of {kernel_key!r} failed: "
                          f"{failures[:3]}")
    best = _choose(results, None, default, margin)
    refined = []
    if refine:
        first = best["params"]
        second = [first] + [dict(first, **r) for r in refine]
        if default is not None:
            second.append(default)
        second = [c for i, c in enumerate(second) if c not in second[:i]]
        refined = _time_rounds(second, run, repeats, warmup, failures)
        timed = [r["params"] for r in refined]
        if first in timed and (default is None or default in timed):
            best = _choose(refined, first, default, margin)
    _write_entry(path, key, {
        "params": best["params"], "median_s": best["median_s"],
        "default": default, "margin": margin if default is not None else None,
        "candidates": results, "refined": refined, "failures": failures,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "kernel_key": kernel_key, "source_hash": source_hash, "shape_class": shape_class,
        "unix_time": time.time(),
    })
    return dict(best["params"])


def _choose(results, unrefined, default, margin):
    """The fastest of ``results``, unless it is not ``margin`` faster than the setting
    it refines (``unrefined``) or than ``default``: then that one (timings of short
    kernels carry host noise, and a choice is stored for good)."""
    best = min(results, key=lambda r: r["median_s"])
    for keep in (unrefined, default):
        base = next((r for r in results if keep is not None and r["params"] == keep), None)
        if base is not None and best["median_s"] > (1 - margin) * base["median_s"]:
            best = base
    return best


def _time_rounds(candidates, run, repeats, warmup, failures):
    """``[{"params", "median_s"}, ...]`` of the candidates that ran (the others go to
    ``failures``), each timed ``repeats`` times in interleaved rounds after ``warmup``
    untimed calls."""
    times = {}  # index into candidates -> timings

    def attempt(i, timed):
        try:
            t = float(run(dict(candidates[i])))
        except Exception as exc:  # noqa: BLE001 - a setting that does not compile/run
            failures.append({"params": candidates[i],
                             "error": f"{type(exc).__name__}: {exc}"[:200]})
            times.pop(i, None)
            return
        if timed:
            times[i].append(t)

    for i in range(len(candidates)):
        times[i] = []
        for _ in range(max(0, warmup)):
            if i in times:
                attempt(i, False)
    # Interleaved rounds (every candidate once per round): a drift of the machine
    # (clocks, a neighbour's load) then moves all candidates alike instead of
    # favouring the ones timed in a quiet moment.
    for _ in range(max(1, repeats)):
        for i in list(times):
            attempt(i, True)
    return [{"params": candidates[i], "median_s": statistics.median(t)}
            for i, t in times.items()]


def timed_run(build, pool, **measure_kw):
    """A ``run(params) -> seconds`` for :func:`tune`, measured like every bench number.

    Args:
        build (callable): ``build(params) -> fn`` where ``fn(*inputs)`` runs the kernel
            with these launch parameters (e.g. passes them as Constants).
        pool (list of tuple): input sets from :func:`mlx_foundry.bench.timing.make_pool`
            (larger than the last-level cache).
        **measure_kw: passed to :func:`mlx_foundry.bench.timing.measure`
            (default ``repeats=3``).

    Returns:
        callable: ``run(params)`` -> median seconds per call.
    """
    from .timing import measure

    measure_kw.setdefault("repeats", 3)

    def run(params):
        return measure(build(params), pool, **measure_kw).median_s
    return run
