"""``python -m mlx_foundry bench``: fused ops against MLX, measured one way.

Runs the suite of :mod:`.cases` with the method of :mod:`.timing` (baseline and
candidate in the same process; weights rotated through a pool larger than the
last-level cache; many calls per timing; medians), times beside each case a plain
read of its bytes (:mod:`.read_probe`), shows progress on stderr,
prints the table and, with ``--out DIR``, writes ``results.json``, ``chart.png``
and ``BENCHMARKS.md`` there.

On the reference backend on a CPU every case runs at tiny shapes, so the command
itself is exercised in CI; the numbers then mean nothing.

Launch-parameter tuning lives in :mod:`.tuner`.

Examples:
    >>> from mlx_foundry.bench import run
    >>> results = run(backend="reference", quick=True, only=["rms_norm"], progress=False)
    >>> sorted(c["name"] for c in results["cases"])[:1]
    ['add_rms_norm_1x256']
"""

import datetime
import importlib
import os
import statistics
import sys

import mlx.core as mx

from . import cases as _cases
from . import prefill, report, targets, timing, tuner
from .timing import Timing

__all__ = ["main", "run", "run_case", "Context"]


CALLS_PER_TIMING = 200  # GPU: calls evaluated by one mx.eval in every timing


class Context:
    """Settings of one bench run (shared by every case)."""

    def __init__(self, backend, *, quick=False, tiny=None, repeats=None, pool_bytes=None):
        self.backend = backend
        self.quick = quick
        self.tiny = (backend == "reference" and mx.default_device() == mx.cpu
                     if tiny is None else tiny)
        if repeats is None:
            repeats = 3 if self.tiny else (6 if quick else 12)
        self.repeats = repeats
        self.pool_bytes = (timing.default_pool_bytes("reference" if self.tiny else backend,
                                                     quick) if pool_bytes is None
                           else pool_bytes)
        if self.tiny:
            # A fixed count for baseline and ours alike, as on a GPU.
            self.measure_kw = dict(calls=8)
            self.copy_kw = dict(target_s=0.002, min_calls=2)
            self.copy_bytes = 4 << 20
        else:
            # The same number of calls per timing for baseline and ours, about one
            # decode token's graph (the patched 8B-shaped decode evaluates ~330 nodes per
            # token, the unpatched ~800). With a count derived from each op's own speed,
            # the faster op got more calls per mx.eval than its baseline, and on CUDA the
            # count changes the result (H200: our 4-bit GEMV 12.0 us per call at 200
            # calls per eval, 21.4 us at 1000; MLX's quantized_matmul 35.0 and 35.1 us).
            # tools/calls_sweep.py times a case at several counts: on an H200 (session
            # 27) the 4-bit ratio went 2.15x-2.93x from 25 to 400 calls; 200, the count
            # chosen before that sweep, gave the highest (docs/bench_journal.md, session 27).
            self.measure_kw = dict(calls=CALLS_PER_TIMING)
            self.copy_kw = dict(target_s=0.01 if quick else 0.025, min_calls=16)
            self.copy_bytes = 256 << 20
        self._plain_reads = {}

    def plain_read(self, nbytes):
        """:func:`.timing.plain_read` of ``nbytes`` on this run's backend, measured once
        per size (a failure too: it is raised again for the next case of that size)."""
        read = self._plain_reads.get(nbytes)
        if read is None:
            try:
                read = timing.plain_read(nbytes, backend=self.backend,
                                         pool_bytes=self.pool_bytes, repeats=self.repeats,
                                         **self.measure_kw)
            except Exception as e:  # noqa: BLE001
                read = e
            self._plain_reads[nbytes] = read
        if isinstance(read, Exception):
            raise read
        return read


def _flat(out):
    return timing.arrays(out if isinstance(out, (tuple, list)) else (out,))


def max_rel_err(ours, base):
    """``max|a - b| / max|b|`` over matching outputs, or ``None`` if shapes differ."""
    a, b = _flat(ours), _flat(base)
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return None
    err = 0.0
    for x, y in zip(a, b):
        x, y = x.astype(mx.float32), y.astype(mx.float32)
        scale = max(float(mx.max(mx.abs(y)).item()), 1e-6)
        err = max(err, float(mx.max(mx.abs(x - y)).item()) / scale)
    return err


MISMATCH_TOL = 3e-2   # fp16 activations; a wrong kernel is off by O(1)
MISMATCH_TOL_CPU_BF16 = 1e-1
"""bf16 on the reference backend: MLX's CPU ``quantized_matmul`` sums in bf16 (0.03-0.1 of
the largest output at K = 256-4096, where ours is within 0.006 of a float64 product). On
CUDA MLX's bf16 baseline agrees within 0.01 (H100), so :data:`MISMATCH_TOL` holds there."""


def _interleaved(fns, pool, ctx):
    """Time each fn in ``fns`` in alternating rounds (ABAB), pooling the timings."""
    rounds = 2 if ctx.repeats >= 4 else 1
    per = [max(1, ctx.repeats // rounds)] * rounds
    per[-1] += ctx.repeats - sum(per)
    got = [[] for _ in fns]
    for r in range(rounds):
        for j, fn in enumerate(fns):
            got[j].append(timing.measure(fn, pool, repeats=per[r], **ctx.measure_kw))
    out = []
    for ts in got:
        samples = [s for t in ts for s in t.timings_s]
        out.append(Timing(median_s=statistics.median(samples), timings_s=samples,
                          host_s=statistics.median(t.host_s for t in ts),
                          calls=ts[0].calls, pool_size=ts[0].pool_size,
                          sets_used=max(t.sets_used for t in ts)))
    return out


def _check_candidate(case, cand, pool, ctx, res):
    """Compare the candidate's output with the baseline's on the first input set; a
    mismatch marks ``res`` as an error (the case is still timed)."""
    base_out, ours_out = case.baseline(*pool[0]), cand(*pool[0])
    mx.eval(_flat(base_out), _flat(ours_out))
    if case.comparable is not None:
        base_out = case.comparable(base_out)
    err = max_rel_err(ours_out, base_out)
    res["max_rel_err"] = err
    if err is None:
        res["reason"] = "outputs not compared (layouts differ)"
    elif not err <= (MISMATCH_TOL_CPU_BF16 if ctx.tiny and case.dtype.startswith("bf16")
                     else MISMATCH_TOL):
        res.update(status="error", reason=f"output differs from the baseline: "
                                          f"max relative error {err:.3g}")


def run_case(case, ctx, copy_gbps=None):
    """Measure one case; never raises (failures become ``status: "error"``)."""
    res = {"name": case.name, "op": case.op, "shape": case.shape, "dtype": case.dtype,
           "bytes": case.nbytes, "status": "ok", "reason": "", "baseline_us": None,
           "ours_us": None, "speedup": None, "gbps": None, "baseline_gbps": None,
           "pct_copy": None}
    if case.runner is not None:
        try:
            res.update(case.runner(ctx))
        except Exception as e:  # noqa: BLE001
            res.update(status="error", reason=f"{type(e).__name__}: {e}"[:400])
        return res
    try:
        pool = timing.make_pool(case.make, case.nbytes, ctx.pool_bytes)
        res["pool_sets"] = len(pool)
        res["pool_bytes"] = len(pool) * case.nbytes
    except Exception as e:  # noqa: BLE001
        res.update(status="error", reason=f"building inputs: {type(e).__name__}: {e}"[:400])
        return res

    fns = [case.baseline]
    try:
        cand = case.candidate(ctx.backend)
    except (ImportError, AttributeError) as e:  # the op is missing, not failing
        cand = None
        res.update(status="skipped", reason=f"candidate unavailable: {e}"[:400])
    if cand is not None:
        try:
            _check_candidate(case, cand, pool, ctx, res)
            fns.append(cand)
        except Exception as e:  # noqa: BLE001
            res.update(status="error",
                       reason=f"candidate failed: {type(e).__name__}: {e}"[:400])

    try:
        timings = _interleaved(fns, pool, ctx)
    except Exception as e:  # noqa: BLE001
        res.update(status="error", reason=f"timing failed: {type(e).__name__}: {e}"[:400])
        return res
    base = timings[0]
    res["baseline_us"] = base.us
    res["baseline_gbps"] = case.nbytes / base.median_s / 1e9
    res["baseline"] = base.as_dict()
    if len(timings) > 1:
        ours = timings[1]
        res["ours_us"] = ours.us
        res["ours"] = ours.as_dict()
        res["speedup"] = base.median_s / ours.median_s
        res["gbps"] = case.nbytes / ours.median_s / 1e9
        if copy_gbps:
            res["pct_copy"] = 100.0 * res["gbps"] / copy_gbps
        _add_plain_read(case, ctx, res)
    return res


def _add_plain_read(case, ctx, res):
    """``read_us``: a plain read of the case's bytes, timed as the case was (its failure
    is noted, never fatal: the case's own figures stand)."""
    try:
        read = ctx.plain_read(case.nbytes)
    except Exception as e:  # noqa: BLE001
        res["read_error"] = f"{type(e).__name__}: {e}"[:400]
        return
    res["read_us"] = read["us"]
    res["read_gbps"] = read["gbps"]


def select_backend(name=None):
    """Explicit, else ``$MLX_FOUNDRY_BACKEND``, else the GPU backend if any, else reference."""
    from mlx_foundry.backends import ENV_VAR, check_backend, gpu_backend

    if name:
        return check_backend(name, "bench")
    env = os.environ.get(ENV_VAR)
    if env:
        return check_backend(env, f"bench: {ENV_VAR}")
    return gpu_backend() or "reference"


DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
"""Activation / scale dtypes the suite runs in (``--dtype``)."""


def _suite_dtype(dtype):
    """``dtype`` (a name of :data:`DTYPES` or an MLX dtype) as an MLX dtype, or ``None``."""
    if dtype is None:
        return None
    dt = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if dt not in DTYPES.values():
        raise ValueError(f"[bench] 'dtype' must be one of {', '.join(DTYPES)} but got "
                         f"{dtype!r}.")
    return dt


def run(*, backend=None, quick=False, only=None, repeats=None, pool_bytes=None,
        progress=True, tiny=None, dtype=None):
    """Run the suite and return the results dict (see :mod:`.report`).

    Args:
        backend (str, optional): ``"metal"``, ``"cuda"`` or ``"reference"``.
            Default: the GPU backend if any, else ``"reference"``.
        quick (bool): fewer timings. Default: ``False``.
        only (list of str, optional): cases whose name or op contains one of these.
        repeats (int, optional): timings per case (default 12, quick 6, tiny 3).
        pool_bytes (int, optional): bytes of the rotated input pool.
        progress (bool): show the progress line on stderr. Default: ``True``.
        tiny (bool, optional): tiny shapes. Default: on the reference backend on CPU.
        dtype (str or Dtype, optional): the activations' and scales' dtype,
            ``"float16"``, ``"bfloat16"`` or ``"float32"`` (most mlx-lm checkpoints of
            bf16 models keep bf16 scales). Default: float16 (float32 at tiny shapes).
    """
    dt = _suite_dtype(dtype)
    backend = select_backend(backend)
    ctx = Context(backend, quick=quick, tiny=tiny, repeats=repeats, pool_bytes=pool_bytes)
    all_cases = _cases.suite(tiny=ctx.tiny, dtype=dt)
    selected = _cases.select(all_cases, only)
    if not selected:
        raise ValueError(f"[bench] 'only' ({' '.join(only)}) selects no case. Cases: "
                         f"{', '.join(c.name for c in all_cases)}.")
    # Read before the cases run, as the ops read the file when they first launch.
    tuning = _tuning_record(backend)
    prog = report.Progress(len(selected) + 1, enabled=progress)
    prog.update(0, "copy ceiling")
    try:
        copy = timing.copy_ceiling(ctx.copy_bytes, repeats=ctx.repeats, **ctx.copy_kw)
    except Exception as e:  # noqa: BLE001
        copy = {"gbps": None, "error": f"{type(e).__name__}: {e}"}
    results_cases = []
    for i, case in enumerate(selected, 1):
        prog.update(i, case.name)
        results_cases.append(run_case(case, ctx, copy.get("gbps")))
    prog.done()
    argv = ["python -m mlx_foundry bench", f"--backend {backend}"]
    if quick:
        argv.append("--quick")
    if dt is not None:
        argv.append(f"--dtype {next(k for k, v in DTYPES.items() if v == dt)}")
    if only:
        argv.append("--only " + " ".join(only))
    results = {"device": timing.device_name(), "device_info": timing.device_info(),
               "mlx_version": timing.mlx_version(),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                   timespec="seconds"),
               "backend": backend, "quick": bool(quick), "tiny_shapes": bool(ctx.tiny),
               "repeats": ctx.repeats, "calls_per_timing": ctx.measure_kw.get("calls"),
               "pool_bytes": ctx.pool_bytes, "copy": copy,
               "tuning": tuning,
               "command": " ".join(argv), "cases": results_cases}
    results["targets"] = targets.evaluate(results)
    # The module's constant, read now: a user or test may have set it for this run.
    rows = importlib.import_module("mlx_foundry.ops.linear").PREFILL_ROWS
    results["prefill"] = prefill.evaluate(results, rows)
    return results


def _tuning_record(backend):
    """The tuning file and its stored launches for this device and MLX version: the
    launches the run may take instead of the untuned defaults (none on the reference
    backend, which has no launch parameters)."""
    path = tuner.cache_path()
    if backend == "reference":
        return {"path": path, "stored": [], "note": "the reference backend has no launches"}
    try:
        return {"path": path, "stored": tuner.stored_launches(path=path)}
    except Exception as e:  # noqa: BLE001 - a bad tuning file must not cost the run
        return {"path": path, "stored": [], "error": f"{type(e).__name__}: {e}"}


def main(args):
    """Entry point of ``python -m mlx_foundry bench`` (``args``: argparse Namespace).

    Returns 0 when every selected case was measured or skipped with a reason, 1 when
    any case failed (a kernel error, or outputs that differ from MLX), 2 when
    ``--only`` selects nothing, the backend is not available here or ``--out`` cannot
    be created.
    """
    only = getattr(args, "only", None) or None
    backend = getattr(args, "backend", None)
    quick = bool(getattr(args, "quick", False))
    out = getattr(args, "out", None)
    dtype = getattr(args, "dtype", None)
    from mlx_foundry.backends import BackendUnavailableError, require_available

    try:
        require_available(select_backend(backend), "bench")
        if out:
            # Before the run, not after it: a bad path would lose every result.
            os.makedirs(out, exist_ok=True)
    except (ValueError, BackendUnavailableError) as e:
        print(e, file=sys.stderr)
        return 2
    except OSError as e:
        print(f"[bench] Cannot write results to --out {out!r}: {e.strerror or e}.",
              file=sys.stderr)
        return 2
    try:
        results = run(backend=backend, quick=quick, only=only, dtype=dtype)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    print(report.format_header(results))
    print(report.format_table(results))
    print("\nTargets (issue 5) in this run:\n" + targets.format_targets(results["targets"]))
    print(prefill.format_advice(results["prefill"]))
    if out:
        os.makedirs(out, exist_ok=True)
        written = [report.write_json(results, os.path.join(out, "results.json"))]
        chart = report.write_chart(results, os.path.join(out, "chart.png"))
        if chart:
            written.append(chart)
        written.append(report.write_benchmarks_md(results, os.path.join(out, "BENCHMARKS.md")))
        print("wrote " + ", ".join(written))
    return 1 if any(c["status"] == "error" for c in results["cases"]) else 0
