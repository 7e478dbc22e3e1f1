"""``python -m mlx_foundry bench`` and its pieces: timing, report, tuner (CPU)."""

import importlib
import json
import os
import sys
import threading

import mlx.core as mx
import numpy as np
import pytest

from mlx_foundry.__main__ import main as cli_main
from mlx_foundry.bench import cases, report, run_case, targets, timing, tuner
from mlx_foundry.bench import Context

from tuned import grid, looked_up


# ------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One quick run of the command on the reference backend (shared by the tests)."""
    out = tmp_path_factory.mktemp("bench_out")
    import io
    from contextlib import redirect_stderr, redirect_stdout

    so, se = io.StringIO(), io.StringIO()
    device = mx.default_device()
    mx.set_default_device(mx.cpu)        # tiny shapes, also on a GPU machine
    try:
        with redirect_stdout(so), redirect_stderr(se):
            rc = cli_main(["bench", "--quick", "--backend", "reference", "--out", str(out)])
    finally:
        mx.set_default_device(device)
    return rc, so.getvalue(), se.getvalue(), out


def test_bench_command_writes_results(bench_run):
    rc, stdout, stderr, out = bench_run
    assert rc == 0, stdout + stderr
    res = json.loads((out / "results.json").read_text())
    for key in ("device", "mlx_version", "date", "backend", "copy", "cases"):
        assert key in res
    assert res["backend"] == "reference"
    assert res["mlx_version"] == mx.__version__
    assert res["copy"]["gbps"] > 0
    expected = [c.name for c in cases.suite(tiny=True)]
    assert [c["name"] for c in res["cases"]] == expected
    for c in res["cases"]:
        assert c["status"] in ("ok", "skipped"), c
        if c["status"] == "skipped":
            assert c["reason"], c
        else:
            assert c["baseline_us"] > 0 and c["ours_us"] > 0 and c["speedup"] > 0, c
        if c["status"] == "ok" and c.get("bytes"):
            assert c["gbps"] > 0 and c["pct_copy"] > 0, c
    # Every target is judged (tiny CPU figures: met or not, but measured).
    assert [t["target"] for t in res["targets"]] == [t for t, _ in targets.TARGETS]
    assert all(t["met"] in (True, False) for t in res["targets"]), res["targets"]
    # The bench ran in a subprocess: the package's own constant, not a value set here.
    rows = importlib.import_module("mlx_foundry.ops.linear").PREFILL_ROWS
    assert res["prefill"]["agrees"] is None and res["prefill"]["prefill_rows"] == rows
    # The kernel cases rotate through their pool.
    measured = [c for c in res["cases"] if "baseline" in c]
    assert measured and all(c["baseline"]["sets_used"] >= 2 for c in measured)


def test_bench_command_prints_table_and_progress(bench_run):
    rc, stdout, stderr, out = bench_run
    header = next(line for line in stdout.splitlines() if line.startswith("op "))
    assert header.split()[:3] == ["op", "shape", "dtype/bits"]
    assert "smoke test" in stdout                    # tiny CPU numbers are labelled
    for col in report.COLUMNS:
        assert col in stdout
    assert "copy ceiling" in stdout
    assert "Targets (issue 5) in this run:" in stdout
    # No fused kernel runs on the reference backend: no advice on the threshold.
    assert ("Prefill threshold (ops.linear.PREFILL_ROWS): not judged on the reference "
            "backend") in stdout
    n = len(cases.suite(tiny=True))
    assert f"/{n + 1}]" in stderr          # progress: case i/n on stderr


def test_bench_command_chart_and_benchmarks_md(bench_run):
    _, _, _, out = bench_run
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not (out / "chart.png").exists()
    else:
        assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "BENCHMARKS.md").read_text()
    assert "## Reproduce" in md and "python -m mlx_foundry bench" in md
    assert mx.__version__ in md and "| op | shape |" in md
    assert "## Targets in this run" in md and "| target | this run | met |" in md
    assert md.count("| 4-bit linear >= 3x mx.quantized_matmul |") == 1
    assert "Prefill threshold (ops.linear.PREFILL_ROWS): not judged" in md


def test_bench_only_selects_cases_or_fails(capsys):
    # (exits before measuring anything)
    assert cli_main(["bench", "--quick", "--backend", "reference", "--only",
                     "no_such_case"]) == 2
    assert "selects no case" in capsys.readouterr().err


def test_chart_without_matplotlib(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    results = {"device": "d", "backend": "reference", "mlx_version": "0", "date": "now",
               "cases": []}
    assert report.write_chart(results, str(tmp_path / "chart.png")) is None
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert not (tmp_path / "chart.png").exists()


def test_table_lists_skipped_with_reason():
    results = {"cases": [
        {"name": "a", "op": "linear", "shape": "1x4->8", "dtype": "fp16/q4", "status": "ok",
         "baseline_us": 30.0, "ours_us": 10.0, "speedup": 3.0, "gbps": 800.0,
         "pct_copy": 80.0},
        {"name": "b", "op": "rms_norm", "shape": "1x4", "dtype": "fp16",
         "status": "skipped", "reason": "op missing"}],
        "copy": {"gbps": 1000.0, "buffer_bytes": 1 << 28}}
    text = report.format_table(results)
    assert "3.00x" in text and "800" in text and "80" in text
    assert "skipped: b: op missing" in text


# ------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------
def test_case_with_wrong_candidate_is_an_error():
    ctx = Context("reference", tiny=True, repeats=1, pool_bytes=0)
    case = cases.Case("neg", "neg", "1x8", "fp32", 64,
                      make=lambda i: (mx.full((1, 8), float(i + 1)),),
                      baseline=lambda x: x * 2, candidate=lambda b: (lambda x: x * 3))
    res = run_case(case, ctx)
    assert res["status"] == "error" and "differs" in res["reason"]


def test_case_with_missing_candidate_is_skipped():
    ctx = Context("reference", tiny=True, repeats=1, pool_bytes=0)

    def candidate(backend):
        raise AttributeError("mlx_foundry.ops.nothing does not exist yet")

    case = cases.Case("x", "x", "1x8", "fp32", 64, make=lambda i: (mx.ones((1, 8)),),
                      baseline=lambda x: x + 1, candidate=candidate)
    res = run_case(case, ctx)
    assert res["status"] == "skipped" and "does not exist" in res["reason"]
    assert res["baseline_us"] > 0 and res["ours_us"] is None


def test_a_candidate_that_fails_while_running_is_an_error_not_skipped():
    """Only a missing op is 'skipped': an AttributeError raised by the op itself is a
    failure, and the run exits 1."""
    ctx = Context("reference", tiny=True, repeats=1, pool_bytes=0)

    def broken(x):
        raise AttributeError("'array' object has no attribute 'nope'")

    case = cases.Case("x", "x", "1x8", "fp32", 64, make=lambda i: (mx.ones((1, 8)),),
                      baseline=lambda x: x + 1, candidate=lambda backend: broken)
    res = run_case(case, ctx)
    assert res["status"] == "error" and "candidate failed: AttributeError" in res["reason"]


def test_tiny_runs_give_baseline_and_ours_the_same_calls():
    ctx = Context("reference", tiny=True, repeats=2, pool_bytes=0)
    case = cases.Case("x", "x", "1x8", "fp32", 64, make=lambda i: (mx.ones((1, 8)),),
                      baseline=lambda x: x + 1, candidate=lambda backend: (lambda x: x + 1))
    res = run_case(case, ctx)
    assert res["status"] == "ok"
    assert res["baseline"]["calls"] == res["ours"]["calls"] == 8


def test_a_crashing_decode_is_an_error(monkeypatch):
    from mlx_foundry import lm_bench
    from mlx_foundry.bench import e2e

    def crash(**kwargs):
        raise RuntimeError("patched decode crashed")

    monkeypatch.setattr(lm_bench, "decode_benchmark", crash)
    res = e2e.run_decode(Context("reference", tiny=True), tiny=True)
    assert res["status"] == "error" and "patched decode crashed" in res["reason"]


def test_bench_refuses_a_bad_out_or_an_absent_backend_before_running(tmp_path, capsys,
                                                                      monkeypatch):
    import mlx_foundry.bench as bench_pkg
    from mlx_foundry.backends import is_available

    def no_run(**kwargs):
        raise AssertionError("the suite ran")

    monkeypatch.setattr(bench_pkg, "run", no_run)
    afile = tmp_path / "afile"
    afile.write_text("")
    assert cli_main(["bench", "--quick", "--backend", "reference", "--out",
                     str(afile / "out")]) == 2
    assert "Cannot write results to --out" in capsys.readouterr().err
    missing = next(b for b in ("metal", "cuda") if not is_available(b))
    assert cli_main(["bench", "--quick", "--backend", missing]) == 2
    assert f"Backend '{missing}' is not available" in capsys.readouterr().err


def test_tuning_key_changes_with_the_code_generator(monkeypatch, tmp_path):
    """The tuner's source hash covers the body generator and the CUDA prelude, not only
    the .metal files: an edit there is an edited kernel."""
    import shutil

    from mlx_foundry.bench import tuner
    from mlx_foundry.stages import norm

    before = tuner.source_hash(norm.rms_norm)
    root = tmp_path / "pkg"
    real = tuner.Path(tuner.__file__).resolve().parent.parent
    for rel in tuner._GENERATOR_MODULES:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(real / rel, root / rel)
    (root / "metal_src/compat/metal_compat.cuh").write_text("// edited\n")
    monkeypatch.setattr(tuner, "__file__", str(root / "bench" / "tuner.py"))
    tuner._generator_fingerprint.cache_clear()
    try:
        assert tuner.source_hash(norm.rms_norm) != before
    finally:
        monkeypatch.undo()
        tuner._generator_fingerprint.cache_clear()
    assert tuner.source_hash(norm.rms_norm) == before


def test_e2e_without_decode_benchmark_is_skipped(monkeypatch):
    from mlx_foundry.bench import e2e

    monkeypatch.setitem(sys.modules, "mlx_foundry.lm_bench", None)
    res = e2e.run_decode(Context("reference", tiny=True), tiny=True)
    assert res["status"] == "skipped" and "decode_benchmark" in res["reason"]


def test_suite_bytes_match_weights():
    by = {c.name: c for c in cases.suite(tiny=False)}
    c = by["linear_q4_4096x14336"]
    # 4-bit words + fp16 scales and biases (group 64) + x + y.
    assert c.nbytes == 14336 * 4096 // 2 + 2 * 14336 * 64 * 2 + 2 * 4096 + 2 * 14336
    assert by["rms_norm_8192x8192"].nbytes == 2 * (2 * 8192 * 8192 + 8192)


# ------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------
def test_measure_rotates_the_pool_and_returns_positive_medians():
    pool = timing.make_pool(lambda i: (mx.full((64,), float(i)),), 256, 256 * 7,
                            min_sets=2, max_sets=100)
    assert len(pool) == 7
    seen = set()

    def fn(x):
        seen.add(id(x))
        return x * 2

    t = timing.measure(fn, pool, repeats=4, calls=5, warmup=1)
    assert t.median_s > 0 and len(t.timings_s) == 4 and all(s > 0 for s in t.timings_s)
    assert t.calls == 5 and t.pool_size == 7
    assert t.sets_used == 7 and len(seen) == 7      # 20 calls cycle through all 7 sets


def test_measure_splits_batches_by_output_budget():
    pool = timing.make_pool(lambda i: (mx.full((1024,), float(i)),), 4096, 0)
    t = timing.measure(lambda x: x + 1, pool, repeats=2, calls=6, out_budget=8192)
    assert t.median_s > 0 and t.calls == 6


def test_make_pool_clamps():
    assert len(timing.make_pool(lambda i: mx.zeros((4,)), 16, 1 << 30, max_sets=5)) == 5
    # However large a set is, a pool has MIN_POOL_SETS of them: with 8 sets of 112 MiB
    # an H100 served part of the reads from L2 (fp16 GEMV at 3.7 TB/s, over HBM's 3.35).
    assert timing.MIN_POOL_SETS == 32
    assert len(timing.make_pool(lambda i: mx.zeros((4,)), 16, 0)) == 32
    assert len(timing.make_pool(lambda i: mx.zeros((4,)), 112 << 20, 192 << 20)) == 32
    assert len(timing.make_pool(lambda i: mx.zeros((4,)), 16, 16 * 40)) == 40


def test_copy_ceiling_counts_read_and_write():
    c = timing.copy_ceiling(1 << 20, repeats=2, target_s=0.001)
    assert c["bytes"] == 2 * c["buffer_bytes"] == 2 << 20
    assert c["gbps"] > 0 and c["us"] > 0
    assert c["timing"]["pool_size"] == timing.COPY_BUFFERS == 8


@pytest.mark.parametrize("unroll", [(0,), (2, 17), (True,), (2.0,)])
def test_unroll_refinements_check_counts_as_the_stages_do(unroll):
    from mlx_foundry.bench import autotune

    with pytest.raises(ValueError, match="'UNROLL' must be an int in \\[1, 16\\]"):
        autotune.unroll_refinements(unroll)
    assert autotune.unroll_refinements((1, 4)) == [{"UNROLL": 1}, {"UNROLL": 4}]


def test_bound_refinements_are_cuda_only_and_checked():
    from mlx_foundry.bench import autotune

    assert autotune.bound_refinements("cuda", (0, 4, 5)) == [{"MINBLOCKS": 4}, {"MINBLOCKS": 5}]
    assert autotune.bound_refinements("cuda") == [{"MINBLOCKS": 4}]
    assert autotune.bound_refinements("metal") == autotune.bound_refinements("reference") == []
    for bad in ((-1,), (65,), (True,), (4.0,)):
        with pytest.raises(ValueError, match="'MINBLOCKS' must be an int in \\[0, 64\\]"):
            autotune.bound_refinements("cuda", bad)


def test_a_recorded_launch_leaves_its_bound_to_the_candidates(monkeypatch, tmp_path):
    """The untuned gate/up launch carries MINBLOCKS; the tuner's record of it must not, or
    every candidate would be timed under that bound (and the bounded default would pass
    MINBLOCKS twice)."""
    import importlib

    from mlx_foundry import ops
    from mlx_foundry.bench import autotune, tuner
    from mlx_foundry.ops.weights import Weight

    lin = importlib.import_module("mlx_foundry.ops.linear")
    monkeypatch.setenv(tuner.ENV_DIR, str(tmp_path))
    monkeypatch.setattr(lin, "_TUNED", {})

    def make(idx):
        def w(j):
            q = mx.quantize(mx.random.normal((512, 256), key=mx.random.key(10 * idx + j))
                            .astype(mx.float16), group_size=64, bits=4)
            return Weight(*q, group_size=64, bits=4)
        x = mx.random.normal((1, 256), key=mx.random.key(idx)).astype(mx.float16)
        return ops.norm_gate_up_swiglu, (x, mx.ones((256,), mx.float16), 1e-5, w(1), w(2)), {}

    assert lin.default_launch(512, 256, dual=True)["MINBLOCKS"] == 4
    sets, found = autotune._captured(make, "cuda")
    (kw,) = sets(0)
    launch = {"ROWS", "THREADS", "SPLITK", "MBLOCK", "UNROLL", "MINBLOCKS"}
    assert found and not set(kw) & launch, sorted(kw)


def test_default_pool_exceeds_gpu_caches():
    assert timing.default_pool_bytes("cuda") >= 2 * 60 * timing.MB
    assert timing.default_pool_bytes("cuda") > max(timing.LLC_BYTES.values())


# ------------------------------------------------------------------------------------
# Tuner
# ------------------------------------------------------------------------------------
CANDS = [{"ROWS_PER_SIMD": r, "SIMDS": s} for r in (1, 2, 4) for s in (4, 8)]


def _fake_run(best, calls=None):
    def run(p):
        if calls is not None:
            calls.append(dict(p))
        return 1e-4 if p == best else 2e-4 + 1e-5 * p["ROWS_PER_SIMD"]
    return run


def test_tuner_persists_and_reloads(tmp_path, monkeypatch):
    monkeypatch.setenv(tuner.ENV_DIR, str(tmp_path))
    best = {"ROWS_PER_SIMD": 2, "SIMDS": 8}
    kw = dict(source_hash="abc123", shape_class=tuner.shape_class(14336, 4096))
    assert tuner.lookup("gemv_q4", **kw) is None
    assert tuner.tune("gemv_q4", CANDS, _fake_run(best), repeats=2, **kw) == best
    path = tmp_path / "tuning.json"
    data = json.loads(path.read_text())
    (key, entry), = data["entries"].items()
    assert entry["params"] == best and len(entry["candidates"]) == len(CANDS)
    assert tuner.device_name() in key and mx.__version__ in key and "abc123" in key
    tuner._memo.clear()                                # as a fresh process would
    assert tuner.lookup("gemv_q4", **kw) == best
    calls = []
    assert tuner.tune("gemv_q4", CANDS, _fake_run(best, calls), **kw) == best
    assert calls == []                                 # a stored result is reused
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tuning.")]


def test_tuner_interleaves_rounds_and_drops_failing_candidates(tmp_path):
    """Each round times every candidate once, so a slow phase of the machine hits all of
    them; a candidate that fails in any call is recorded and left out."""
    calls = []
    clock = iter(range(1000))

    def run(p):
        calls.append(p["ROWS_PER_SIMD"])
        t = next(clock)
        if p["ROWS_PER_SIMD"] == 4 and len(calls) > 3:
            raise RuntimeError("launch failed")
        # The machine slows down over time (t grows); ROWS 2 is the fastest in every round.
        return (1.0 + t) * (0.5 if p["ROWS_PER_SIMD"] == 2 else 1.0)

    cands = [{"ROWS_PER_SIMD": r} for r in (1, 2, 4)]
    best = tuner.tune("k", cands, run, source_hash="h", shape_class="c", repeats=3,
                      warmup=1, path=str(tmp_path / "t.json"))
    assert best == {"ROWS_PER_SIMD": 2}
    # warm-up of each, then rounds of [1, 2, 4] until ROWS 4 fails, then [1, 2].
    assert calls == [1, 2, 4, 1, 2, 4, 1, 2, 1, 2]
    (e,) = json.load(open(tmp_path / "t.json"))["entries"].values()
    assert [f["params"] for f in e["failures"]] == [{"ROWS_PER_SIMD": 4}]
    assert len(e["candidates"]) == 2


@pytest.mark.parametrize("faster,chosen", [(0.98, "default"), (0.96, "other"),
                                            (1.10, "default")])
def test_tuner_keeps_the_default_unless_clearly_faster(tmp_path, faster, chosen):
    """A candidate replaces the default only when its median is at least ``margin``
    (3%) below the default's: a noise-sized win is not stored for good."""
    default, other = {"ROWS": 4, "SPLITK": 0}, {"ROWS": 8, "SPLITK": 1}
    times = {str(default): 10.0, str(other): 10.0 * faster}
    seen = []

    def run(p):
        seen.append(p)
        return times[str(p)]

    # The default is not among the candidates: it is added and timed too.
    got = tuner.tune("k", [other], run, source_hash="h", shape_class="c", repeats=2,
                     warmup=0, path=str(tmp_path / "t.json"), default=default)
    assert got == (default if chosen == "default" else other)
    assert default in seen and other in seen
    (e,) = json.load(open(tmp_path / "t.json"))["entries"].values()
    assert e["default"] == default and e["margin"] == tuner.DEFAULT_MARGIN
    assert e["params"] == got


@pytest.mark.parametrize("unrolled,chosen", [(0.90, "unrolled"), (0.99, "grid"),
                                              (1.20, "grid")])
def test_tuner_refines_the_fastest_candidate(tmp_path, unrolled, chosen):
    """The second pass merges each refinement into the first pass's fastest setting and
    times them again with the fastest and the default, in rounds of their own; the
    margin rule applies there."""
    default = {"ROWS": 4, "UNROLL": 1}
    fast = {"ROWS": 8, "UNROLL": 1}
    times = {str(default): 10.0, str(fast): 8.0, str({"ROWS": 2, "UNROLL": 1}): 12.0,
             str({"ROWS": 8, "UNROLL": 2}): 8.0 * unrolled,
             str({"ROWS": 8, "UNROLL": 4}): 20.0}
    seen = []

    def run(p):
        seen.append(p)
        return times[str(p)]

    cands = [fast, {"ROWS": 2, "UNROLL": 1}]
    got = tuner.tune("k", cands, run, source_hash="h", shape_class="c", repeats=2, warmup=0,
                     path=str(tmp_path / "t.json"), default=default,
                     refine=[{"UNROLL": 1}, {"UNROLL": 2}, {"UNROLL": 4}])
    assert got == ({"ROWS": 8, "UNROLL": 2} if chosen == "unrolled" else fast)
    # Only the fastest setting was unrolled (ROWS 2 and the default never were).
    assert {str(p) for p in seen} == set(times) - {str({"ROWS": 2, "UNROLL": 2})}
    (e,) = json.load(open(tmp_path / "t.json"))["entries"].values()
    assert [r["params"] for r in e["refined"]] == [fast, {"ROWS": 8, "UNROLL": 2},
                                                   {"ROWS": 8, "UNROLL": 4}, default]
    assert len(e["candidates"]) == 3 and e["params"] == got


def _timed(times, seen=None, fail=()):
    """A fake ``run``: the time of a setting from ``times``; settings in ``fail`` raise
    once they have been timed once (in the second pass)."""
    counts = {}

    def run(p):
        if seen is not None:
            seen.append(p)
        counts[str(p)] = counts.get(str(p), 0) + 1
        if str(p) in map(str, fail) and counts[str(p)] > 1:
            raise RuntimeError("launch failed")
        return times[str(p)]
    return run


def test_tuner_refines_the_default_when_the_first_pass_keeps_it(tmp_path):
    """The first pass's choice is refined, not its raw fastest: another setting 1% faster
    than the default does not replace it, so the default's unrolling is what is tried."""
    default, near = {"ROWS": 4, "UNROLL": 1}, {"ROWS": 8, "UNROLL": 1}
    times = {str(default): 10.0, str(near): 9.9, str({"ROWS": 4, "UNROLL": 2}): 8.0,
             str({"ROWS": 4, "UNROLL": 4}): 11.0}
    seen = []
    got = tuner.tune("k", [near], _timed(times, seen), source_hash="h", shape_class="c",
                     repeats=1, warmup=0, path=str(tmp_path / "t.json"), default=default,
                     refine=[{"UNROLL": 2}, {"UNROLL": 4}])
    assert got == {"ROWS": 4, "UNROLL": 2}
    assert {"ROWS": 8, "UNROLL": 2} not in seen
    (e,) = json.load(open(tmp_path / "t.json"))["entries"].values()
    assert e["failures"] == []


def test_tuner_keeps_a_refinement_clearly_faster_than_its_setting(tmp_path):
    default, fast = {"ROWS": 4, "UNROLL": 1}, {"ROWS": 8, "UNROLL": 1}
    times = {str(default): 10.0, str(fast): 9.0, str({"ROWS": 8, "UNROLL": 2}): 8.0}
    # fast is 10% under the default, its refinement 11% under fast: both clearly faster.
    got = tuner.tune("k", [fast], _timed(times), source_hash="h", shape_class="c",
                     repeats=1, warmup=0, path=str(tmp_path / "t.json"), default=default,
                     refine=[{"UNROLL": 2}])
    assert got == {"ROWS": 8, "UNROLL": 2}
    (e,) = json.load(open(tmp_path / "t.json"))["entries"].values()
    assert e["failures"] == [] and len(e["refined"]) == 3


@pytest.mark.parametrize("failing", ["refined setting", "default"])
def test_tuner_second_pass_failure_leaves_the_first_pass_choice(tmp_path, failing):
    """Without the refined setting's or the default's second-pass time there is no margin
    to compare a refinement with: the first pass decides."""
    default, fast = {"ROWS": 4, "UNROLL": 1}, {"ROWS": 8, "UNROLL": 1}
    times = {str(default): 10.0, str(fast): 8.0, str({"ROWS": 8, "UNROLL": 2}): 7.96}
    fail = [fast if failing == "refined setting" else default]
    got = tuner.tune("k", [fast], _timed(times, fail=fail), source_hash="h",
                     shape_class="c", repeats=1, warmup=0, path=str(tmp_path / "t.json"),
                     default=default, refine=[{"UNROLL": 2}])
    assert got == fast
    (e,) = json.load(open(tmp_path / "t.json"))["entries"].values()
    assert [f["params"] for f in e["failures"]] == fail


def test_tuner_lookup_leaves_a_kept_default_to_the_caller(tmp_path):
    """An entry whose choice is the default it was tuned against looks up as None, so a
    default changed later (same kernel source) applies; a real win is returned."""
    path = str(tmp_path / "t.json")
    kw = dict(source_hash="h", path=path)
    default, other = {"ROWS": 4}, {"ROWS": 8}
    times = {str(default): 10.0, str(other): 9.9}
    assert tuner.tune("k", [other], _timed(times), shape_class="a", default=default,
                      repeats=1, warmup=0, **kw) == default
    assert tuner.lookup("k", shape_class="a", **kw) is None
    times[str(other)] = 5.0
    assert tuner.tune("k", [other], _timed(times), shape_class="b", default=default,
                      repeats=1, warmup=0, **kw) == other
    assert tuner.lookup("k", shape_class="b", **kw) == other


def test_bench_records_the_tuned_launches_it_may_take(tmp_path, monkeypatch):
    """A run's record of the tuning file (results.json, the header, BENCHMARKS.md) lists
    the tuned launches stored for this device and MLX version; entries of another device
    or MLX version, choices that kept their default and malformed entries are left out."""
    from mlx_foundry import bench

    # The tuner keys on the default device's name: the CPU's here, on a GPU machine too
    # (tests/conftest.py), so one name holds throughout.
    monkeypatch.setenv(tuner.ENV_DIR, str(tmp_path))
    path = str(tmp_path / "tuning.json")
    assert tuner.stored_launches() == []
    default, win = {"ROWS": 4}, {"ROWS": 8}
    fast = {str(default): 10.0, str(win): 5.0}
    slow = {str(default): 10.0, str(win): 20.0}
    kw = dict(default=default, repeats=1, warmup=0)
    tuner.tune("cuda:linear_q4", [win], _timed(fast), source_hash="h1", shape_class="a",
               **kw)
    tuner.tune("cuda:linear_q8", [win], _timed(slow), source_hash="h2", shape_class="a",
               **kw)
    tuner.tune("cuda:linear_q4", [win], _timed(fast), source_hash="h1", shape_class="b",
               device="Another GPU", **kw)
    tuner.tune("cuda:linear_q4", [win], _timed(fast), source_hash="h1", shape_class="c",
               mlx_version="0.0.1", **kw)
    data = json.loads((tmp_path / "tuning.json").read_text())
    bad = tuner.make_key("cuda:linear_q4", source_hash="h1", shape_class="bad")
    data["entries"][bad] = {"params": None}
    (tmp_path / "tuning.json").write_text(json.dumps(data))
    tuner._memo.clear()
    want = [{"kernel": "cuda:linear_q4", "source_hash": "h1", "shape_class": "a",
             "params": win}]
    assert tuner.stored_launches() == want
    record = bench._tuning_record("cuda")
    # The reference backend takes no launches: its runs say so.
    res = bench.run(backend="reference", quick=True, only=["rms_norm"], progress=False)
    assert record == {"path": path, "stored": want}
    assert res["tuning"]["stored"] == [] and res["tuning"]["path"] == path
    assert "no launch parameters" in report.format_header(res)
    res["tuning"] = record
    header = report.format_header(res)
    assert "1 tuned launch(es)" in header and "cuda:linear_q4 a" in header, header
    assert "cuda:linear_q4" not in report.format_header(res, tuned_names=False)
    report.write_benchmarks_md(res, str(tmp_path / "B.md"))
    assert "`cuda:linear_q4` a: {'ROWS': 8}" in (tmp_path / "B.md").read_text()
    res["tuning"] = {"path": path, "stored": []}
    assert "untuned defaults (no tuned launch" in report.format_header(res)
    res.pop("tuning")  # a results file from before the record
    assert "launches" not in report.format_header(res)


@pytest.mark.parametrize("content", [
    json.dumps({"format": tuner.FORMAT, "entries": [1, 2]}),
    json.dumps({"format": tuner.FORMAT, "entries": {"x": {"params": 5}}}), "not json"])
def test_a_bad_tuning_file_does_not_cost_a_run(tmp_path, monkeypatch, content):
    """A malformed tuning file reads as no tuned launches: the bench's record neither
    raises nor lists anything."""
    from mlx_foundry import bench

    monkeypatch.setenv(tuner.ENV_DIR, str(tmp_path))
    (tmp_path / "tuning.json").write_text(content)
    tuner._memo.clear()
    assert tuner.stored_launches() == []
    assert bench._tuning_record("cuda")["stored"] == []


def test_a_tuning_file_of_the_old_format_is_not_reused(tmp_path, monkeypatch):
    """Format 1 choices were timed with independent calls (see tuner.FORMAT): a lookup
    misses them, and the next tune rewrites the file in the current format."""
    key = tuner.make_key("k", source_hash="s", shape_class="c")
    monkeypatch.setenv(tuner.ENV_DIR, str(tmp_path))
    path = tmp_path / "tuning.json"
    old = {"params": {"ROWS": 4}, "default": {"ROWS": 8}}
    path.write_text(json.dumps({"format": 1, "entries": {key: old}}))
    tuner._memo.clear()
    assert tuner.FORMAT == 2
    assert tuner.lookup("k", source_hash="s", shape_class="c") is None
    tuner.tune("k2", [{"ROWS": 2}], lambda p: 1e-4, source_hash="s", shape_class="c")
    data = json.loads(path.read_text())
    assert data["format"] == tuner.FORMAT and list(data["entries"]) == [
        tuner.make_key("k2", source_hash="s", shape_class="c")]
    path.write_text(json.dumps({"format": tuner.FORMAT, "entries": {key: old}}))
    tuner._memo.clear()  # the same size, and maybe the same mtime, as the file before
    assert tuner.lookup("k", source_hash="s", shape_class="c") == {"ROWS": 4}


def test_an_unreadable_tuning_record_is_reported(monkeypatch):
    from mlx_foundry import bench

    def broken(**kw):
        raise TypeError("boom")

    monkeypatch.setattr(tuner, "stored_launches", broken)
    record = bench._tuning_record("cuda")
    assert record["stored"] == [] and record["path"] and "TypeError: boom" in record["error"]
    res = {"device": "d", "backend": "cuda", "mlx_version": "v", "date": "t", "tuning": record}
    assert "could not be read (TypeError: boom)" in report.format_header(res)


def test_tuner_refinement_must_be_dicts(tmp_path):
    kw = dict(source_hash="h", shape_class="c", path=str(tmp_path / "t.json"))
    for bad in ("UNROLL", [2], {"UNROLL": 2}, ({"UNROLL": u} for u in (2, 4))):
        with pytest.raises(TypeError, match="'refine' must be a list of dicts .* but got"):
            tuner.tune("k", [{"ROWS": 1}], lambda p: 1.0, refine=bad, **kw)


def test_tuner_rejects_a_bad_default_or_margin(tmp_path):
    kw = dict(source_hash="h", shape_class="c", path=str(tmp_path / "t.json"))
    with pytest.raises(TypeError, match="'default'"):
        tuner.tune("k", [{"ROWS": 1}], lambda p: 1.0, default=[4], **kw)
    with pytest.raises(ValueError, match="'margin'"):
        tuner.tune("k", [{"ROWS": 1}], lambda p: 1.0, default={"ROWS": 1}, margin=1.5, **kw)


def test_tuner_keys_differ_and_stale_entries_are_not_reused(tmp_path):
    path = str(tmp_path / "t.json")
    base = dict(kernel_key="gemv_q4", source_hash="aaaa", shape_class="m1_n16384_k4096",
                device="NVIDIA H100", mlx_version_="0.32.4")
    k0 = tuner.make_key(**base)
    for field, other in (("source_hash", "bbbb"), ("device", "NVIDIA H200"),
                         ("mlx_version_", "0.33.0"), ("shape_class", "m1_n4096_k16384")):
        assert tuner.make_key(**dict(base, **{field: other})) != k0, field

    old = {"ROWS_PER_SIMD": 1, "SIMDS": 4}
    kw = dict(shape_class="m1_n16384_k4096", device="NVIDIA H100", mlx_version="0.32.4",
              path=path)
    tuner.tune("gemv_q4", CANDS, _fake_run(old), source_hash="aaaa", **kw)
    assert tuner.lookup("gemv_q4", source_hash="aaaa", **kw) == old
    # An edited kernel (new source hash), another device or MLX: no stale reuse.
    assert tuner.lookup("gemv_q4", source_hash="bbbb", **kw) is None
    assert tuner.lookup("gemv_q4", source_hash="aaaa",
                        **dict(kw, device="NVIDIA H200")) is None
    assert tuner.lookup("gemv_q4", source_hash="aaaa",
                        **dict(kw, mlx_version="0.33.0")) is None
    new, calls = {"ROWS_PER_SIMD": 4, "SIMDS": 8}, []
    assert tuner.tune("gemv_q4", CANDS, _fake_run(new, calls), source_hash="bbbb",
                      **kw) == new
    assert len(calls) >= len(CANDS)                    # tuned again
    assert tuner.lookup("gemv_q4", source_hash="aaaa", **kw) == old
    assert tuner.lookup("gemv_q4", source_hash="bbbb", **kw) == new


def test_tuner_skips_failing_candidates_and_raises_when_all_fail(tmp_path):
    path = str(tmp_path / "t.json")

    def run(p):
        if p["SIMDS"] == 8:
            raise RuntimeError("too many threads")
        return 1.0 / p["ROWS_PER_SIMD"]

    kw = dict(source_hash="h", shape_class="c", path=path)
    assert tuner.tune("k", CANDS, run, **kw) == {"ROWS_PER_SIMD": 4, "SIMDS": 4}
    with pytest.raises(tuner.TuningError):
        tuner.tune("k2", CANDS, lambda p: 1 / 0, **kw)
    with pytest.raises(ValueError, match="candidates"):
        tuner.tune("k3", [], run, **kw)


def test_tuner_concurrent_writers_keep_every_entry(tmp_path):
    path = str(tmp_path / "t.json")

    def work(i):
        tuner.tune(f"kernel{i}", CANDS[:2], lambda p: 1e-3 * p["SIMDS"], source_hash="h",
                   shape_class="c", repeats=1, warmup=0, path=path)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tuner._memo.clear()
    got = tuner.entries(path)
    assert len(got) == 16
    assert all(e["params"] == {"ROWS_PER_SIMD": 1, "SIMDS": 4} for e in got.values())


def test_shape_class_buckets():
    assert tuner.shape_class(14336, 4096) == "m1_n16384_k4096"
    assert tuner.shape_class(4096, 14336) == "m1_n4096_k16384"
    assert tuner.shape_class(9000, 4000, m=3) == "m4_n16384_k4096"
    assert tuner.shape_class(16384, 4096) == tuner.shape_class(14336, 4096)
    with pytest.raises(ValueError):
        tuner.shape_class(0, 4)


def test_source_hash_tracks_source():
    import mlx_foundry as mf

    assert tuner.source_hash("a") != tuner.source_hash("b")
    assert tuner.source_hash("a") == tuner.source_hash("a")

    def kernel(body):
        src = ("template <typename T>\nMETAL_FUNC void k(const device T* x, device T* y, "
               "uint3 gid) { uint i = gid.x; if (i < 4) y[i] = " + body + "; }\n")
        return mf.Kernel("tune_probe", source_text=src, function="k", template=("T",),
                         args=[mf.Tensor("x"), mf.Output("y", shape=lambda b: b.x.shape,
                                                         dtype="x"),
                               mf.Constant("T", "dtype", like="x")],
                         attributes=("thread_position_in_grid",),
                         dispatch=lambda b: mf.per_element(b.x.size),
                         reference=lambda b: b.x)

    h1 = tuner.source_hash(kernel("x[i]"))
    assert h1 == tuner.source_hash(kernel("x[i]"))
    assert h1 != tuner.source_hash(kernel("x[i] * T(2)"))
    with pytest.raises(TypeError):
        tuner.source_hash(42)


def test_timed_run_feeds_the_tuner(tmp_path):
    pool = timing.make_pool(lambda i: (mx.full((256,), float(i)),), 1024, 4096)
    built = []

    def build(p):
        built.append(p["UNROLL"])
        return lambda x: x * p["UNROLL"]

    run = tuner.timed_run(build, pool, repeats=2, calls=4)
    got = tuner.tune("scale", [{"UNROLL": 1}, {"UNROLL": 2}], run, source_hash="s",
                     shape_class=tuner.shape_class(256, 1), path=str(tmp_path / "t.json"))
    assert got in ({"UNROLL": 1}, {"UNROLL": 2}) and set(built) == {1, 2}
    entry, = tuner.entries(str(tmp_path / "t.json")).values()
    assert all(c["median_s"] > 0 for c in entry["candidates"])


def test_autotune_linear_stores_a_choice_the_op_can_look_up(tmp_path):
    pytest.importorskip("mlx_foundry.ops.linear")
    from mlx_foundry.bench import autotune
    from mlx_foundry.ops.linear import default_launch, linear_kernel

    path = str(tmp_path / "t.json")
    cands = [{"ROWS": 2, "THREADS": 64}, {"ROWS": 4, "THREADS": 128}]
    got = autotune.tune_linear("reference", shapes=[(256, 96)], bits=(4,), candidates=cands,
                               repeats=1, path=path, pool_bytes=0)
    (key, cls), params = next(iter(got.items()))
    # A candidate, one unrolled by the second pass, or the op's untuned launch (kept unless
    # a candidate is clearly faster).
    assert key.startswith("reference:") and cls == "m1_n128_k256"
    assert grid(params) in cands + [grid(default_launch(96, 256))]
    assert params.get("UNROLL", 1) in autotune.DEFAULT_UNROLLS
    with open(path) as f:
        (entry,) = json.load(f)["entries"].values()
    assert entry["params"] == params
    kern = linear_kernel(("affine", 4, 64))
    assert autotune.lookup_linear(kern, 96, 256, 1, "reference", path=path) == looked_up(entry)
    # Every candidate ran, the untuned default (which carries MBLOCK) included.
    assert entry["failures"] == []
    assert default_launch(96, 256) in [c["params"] for c in entry["candidates"]]
    # Candidates were written out with the constants they left to the stage defaults.
    assert all(c["params"]["MBLOCK"] == 1 and c["params"]["UNROLL"] == 1
               for c in entry["candidates"])
    # The second pass timed the unroll counts at the fastest candidate, and the default.
    refined = [c["params"] for c in entry["refined"]]
    assert {p.get("UNROLL", 1) for p in refined} == set(autotune.DEFAULT_UNROLLS)
    assert default_launch(96, 256) in refined
    assert autotune.lookup_linear(kern, 96, 256, 1, "cuda", path=path) is None


def test_depending_on_keeps_x_and_waits_for_the_output():
    from mlx_foundry.bench.autotune import depending_on

    x = mx.arange(6, dtype=mx.float16).reshape(1, 2, 3)
    out = mx.ones((4, 5), mx.float32)
    got = depending_on(x, out)
    assert got.dtype == mx.float16 and got.shape == x.shape
    assert np.array_equal(np.array(got), np.array(x))
    # The first of several outputs is the one waited for: 0 * inf makes the dependency
    # visible.
    inf = mx.full((2,), float("inf"))
    assert np.isnan(np.array(depending_on(x, (inf, out)))).all()
    assert not np.isnan(np.array(depending_on(x, (out, inf)))).any()


def test_tuner_times_each_call_after_the_one_before(tmp_path, monkeypatch):
    """The tuner's candidates are timed in a dependency chain (autotune.depending_on):
    from the second call of a candidate on, x waits for the previous call's output."""
    from mlx_foundry.bench import autotune

    waits, made, received = [], [], []
    real_depending_on, real_captured = autotune.depending_on, autotune._captured

    def spy(x, out):
        waits.append((x.shape, out.shape))
        made.append(real_depending_on(x, out))
        return made[-1]

    class Recorded:  # the tuned kernel, noting the x of each call
        def __init__(self, kern):
            self.kern = kern

        def __getattr__(self, name):
            return getattr(self.kern, name)

        def __call__(self, **kw):
            received.append(kw["x"])
            return self.kern(**kw)

    def captured(make, backend):
        sets, found = real_captured(make, backend)

        def sets_recorded(idx):
            out = sets(idx)
            found[:] = [k if isinstance(k, Recorded) else Recorded(k) for k in found]
            return out
        return sets_recorded, found

    monkeypatch.setattr(autotune, "depending_on", spy)
    monkeypatch.setattr(autotune, "_captured", captured)
    cands = [{"ROWS": 2, "THREADS": 64}, {"ROWS": 4, "THREADS": 128}]
    autotune.tune_linear("reference", shapes=[(256, 96)], bits=(4,), candidates=cands,
                         repeats=1, path=str(tmp_path / "t.json"), pool_bytes=0, unroll=(),
                         min_blocks=())
    assert waits and set(waits) == {((1, 256), (1, 96))}
    # Every x made to wait is the x the kernel was called with.
    ids = {id(x) for x in received}
    assert all(id(x) in ids for x in made)


def test_tuner_chains_the_fused_decode_kernels_too(tmp_path, monkeypatch):
    """tune_decode goes through the same timing: Q/K/V (x of rank 3, several outputs)
    waits for the first output of the call before."""
    from mlx_foundry.bench import autotune

    waits = []
    real = autotune.depending_on

    def spy(x, out):
        waits.append((x.ndim, isinstance(out, (list, tuple))))
        return real(x, out)

    monkeypatch.setattr(autotune, "depending_on", spy)
    autotune.tune_decode("reference", candidates=[{"ROWS": 2, "THREADS": 64}], repeats=1,
                         path=str(tmp_path / "t.json"), pool_bytes=0, unroll=(),
                         min_blocks=(), only=["norm_qkv_rope"])
    assert waits and set(waits) == {(3, True)}


def _decode_result(**kw):
    r = {"tokens_equal": True, "first_mismatch": None, "first_mismatch_margin": None,
         "first_mismatch_unpatched_gap": None, "forced_disagreements": [],
         "unpatched_tokens": list(range(64))}
    r.update(kw)
    return r


def _first(step, gap, margin=0.0, **kw):
    """A free-running first mismatch: the unpatched gap to the patched choice, top-2 gap."""
    return dict({"tokens_equal": False, "first_mismatch": step, "first_mismatch_margin": margin,
                 "first_mismatch_unpatched_gap": gap}, **kw)


def _forced(step, gap, margin=0.0, **kw):
    """A teacher-forced disagreement: the unpatched gap to the patched choice, top-2 gap."""
    return dict({"step": step, "unpatched_gap": gap, "unpatched_margin": margin}, **kw)


@pytest.mark.parametrize("kw,ok", [
    ({}, True),
    (dict(_first(46, 0.0), forced_disagreements=[_forced(50, 0.0078)]), True),
    (_first(46, 0.5, margin=0.5), False),
    ({"forced_disagreements": [_forced(3, 0.2, margin=0.2)]}, False),
    ({"forced_disagreements": [_forced(s, 0.0) for s in (1, 2, 3)]}, False),
    ({"forced_disagreements": [_forced(s, 0.5, float32_gap=-0.1) for s in (1, 2, 3)]}, True),
    # past the tie, float32 judges: it prefers the patched choice, or finds the two tied
    ({"forced_disagreements": [_forced(3, 0.2, float32_gap=-0.05)]}, True),
    ({"forced_disagreements": [_forced(3, 0.2, float32_gap=0.01)]}, True),
    ({"forced_disagreements": [_forced(3, 0.2, float32_gap=0.1)]}, False),
    (_first(46, 0.5, first_mismatch_float32_gap=-0.3), True),
    (_first(46, 0.5, first_mismatch_float32_gap=0.4), False),
    # a bf16 model's tie is wider; the result carries it
    ({"tie": 2.0 ** -3, "forced_disagreements": [_forced(3, 0.1)]}, True),
    ({"tie": 2.0 ** -3, "forced_disagreements": [_forced(3, 0.2)]}, False),
    # The unpatched top-2 are tied (margin 0) but the patched model chose a token far
    # down (gap to it 0.9, float32 agrees): an error, which the top-2 gap would pass.
    ({"forced_disagreements": [_forced(3, 0.9, margin=0.0, float32_gap=0.8)]}, False),
    (_first(46, 1.2, margin=0.0, first_mismatch_float32_gap=1.1), False),
    # a genuine tie between the unpatched choice and the patched one
    ({"forced_disagreements": [_forced(3, 0.01, margin=0.0)]}, True),
    (_first(46, 0.01, margin=0.0), True),
    # far down for the unpatched model, but float32 prefers the patched choice
    ({"forced_disagreements": [_forced(3, 0.9, margin=0.0, float32_gap=-0.2)]}, True),
    (_first(46, 0.9, margin=0.0, first_mismatch_float32_gap=-0.2), True),
    # an older result with only the top-2 gap: float32 alone judges, and has no say here
    ({"forced_disagreements": [{"step": 3, "unpatched_margin": 0.0}]}, False),
    ({"tokens_equal": False, "first_mismatch": 46, "first_mismatch_margin": 0.0}, False),
])
def test_same_tokens_up_to_ties(kw, ok):
    from mlx_foundry.lm_bench import same_tokens_up_to_ties

    got, why = same_tokens_up_to_ties(_decode_result(**kw))
    assert got is ok and why


def test_e2e_rounds_alternate_unpatched_and_patched(monkeypatch):
    """decode_benchmark times unpatched and patched in alternating rounds, each run after
    its own warm-up (host speed drifts over a run), and keeps the best of each."""
    pytest.importorskip("mlx_lm")
    from mlx_foundry import lm, lm_bench
    from mlx_foundry.bench.e2e import TINY_LLAMA

    model = lm_bench.random_quantized_model(TINY_LLAMA, dtype=mx.float32)
    calls, real = [], lm_bench.greedy_decode
    rates = iter([10.0, 30.0, 20.0, 5.0, 15.0, 40.0])  # timed runs: unp, pat, unp, pat, ...

    def spy(m, prompt, steps, **kw):
        out = real(m, prompt, steps, **kw)
        timed = steps == 6 and not kw
        calls.append(("patched" if lm.is_patched(m) else "unpatched",
                      "timed" if timed else "other"))
        return (out[0], next(rates)) if timed else out

    monkeypatch.setattr(lm_bench, "greedy_decode", spy)
    r = lm_bench.decode_benchmark(model, steps=6, warmup=2, repeats=3, backend="reference",
                                  results_dir="")
    timed = [who for who, kind in calls if kind == "timed"]
    assert timed == ["unpatched", "patched"] * 3
    assert [who for who, _ in calls[:4]] == ["unpatched", "unpatched", "patched", "patched"]
    assert r["unpatched_tok_s"] == 20.0 and r["patched_tok_s"] == 40.0
    assert not lm.is_patched(model)


def test_batch_decode_benchmark_alternates_and_compares_tokens(monkeypatch):
    """Several sequences decoded together: unpatched and patched alternate round by round
    (the best of each kept), the per-step greedy tokens of every sequence are compared,
    and the model is left unpatched."""
    pytest.importorskip("mlx_lm")
    from mlx_foundry import lm, lm_bench
    from mlx_foundry.bench.e2e import TINY_LLAMA

    model = lm_bench.random_quantized_model(TINY_LLAMA, dtype=mx.float32)
    calls, real = [], lm_bench._batch_greedy
    steps_s = iter([0.4, 0.1, 0.2, 0.3])  # seconds per step of the timed runs, in order

    def spy(m, prompts, steps, warmup, **kw):
        out = real(m, prompts, steps, warmup, **kw)
        calls.append(("patched" if lm.is_patched(m) else "unpatched", len(prompts),
                      bool(kw.get("margins"))))
        return out if kw.get("margins") else (out[0], next(steps_s))

    monkeypatch.setattr(lm_bench, "_batch_greedy", spy)
    r = lm_bench.batch_decode_benchmark(model, batch=3, steps=5, warmup=1, repeats=2,
                                        backend="reference")
    assert calls == [("unpatched", 3, False), ("patched", 3, False)] * 2 + [
        ("unpatched", 3, True)]
    # best rounds: unpatched 0.2 s per step, patched 0.1 s per step; 3 tokens per step
    assert r["unpatched_tok_s"] == pytest.approx(15.0) and r["patched_tok_s"] == pytest.approx(30.0)
    assert r["speedup"] == pytest.approx(2.0)
    # the prompt's token, one warm-up step, five timed steps; three sequences each
    assert len(r["unpatched_tokens"]) == 7 and all(len(t) == 3 for t in r["unpatched_tokens"])
    # The reference backend computes the patched ops in float32 like MLX: same tokens.
    assert r["tokens_equal"] and r["first_mismatch"] is None
    assert lm_bench.same_tokens_up_to_ties(r)[0]
    assert r["compiled_decode"] is False  # patch's default on the reference backend
    assert not lm.is_patched(model)


def test_batch_decode_benchmark_rejects_bad_batch():
    from mlx_foundry import lm_bench

    with pytest.raises(ValueError, match="'batch' must be a positive int"):
        lm_bench.batch_decode_benchmark(object(), batch=0)


def test_suite_has_a_batch_decode_row():
    from mlx_foundry.bench.cases import suite

    names = [c.name for c in suite(tiny=True)]
    assert "e2e_decode_llama3_8b_q4_batch4" in names


def test_the_long_prompt_decode_row_hands_its_prompt_to_the_benchmark(monkeypatch):
    """The long-prompt end-to-end row decodes after its prompt (not the 16-token default)
    and is not the row the end-to-end target reads."""
    from mlx_foundry import lm_bench
    from mlx_foundry.bench.cases import suite
    from mlx_foundry.bench.e2e import TINY_LLAMA, long_prompt

    (case,) = [c for c in suite(tiny=True) if c.name == "e2e_decode_llama3_8b_q4_prompt100"]
    assert case.op == "decode (e2e, 100-token prompt)"
    seen = {}

    def fake(**kw):
        seen.update(kw)
        return {"unpatched_tok_s": 100.0, "patched_tok_s": 250.0, "tokens_equal": True}
    monkeypatch.setattr(lm_bench, "decode_benchmark", fake)
    monkeypatch.setattr(lm_bench, "same_tokens_up_to_ties", lambda r: (True, "identical"))

    class Ctx:
        backend, quick = "reference", True
    out = case.runner(Ctx())
    vocab = TINY_LLAMA["vocab_size"]
    assert seen["prompt"] == long_prompt(100, vocab) and len(seen["prompt"]) == 100
    assert all(0 < t < vocab for t in seen["prompt"])  # inside the embedding table
    assert out["status"] == "ok" and out["speedup"] == 2.5


def test_decode_benchmark_refuses_prompt_ids_past_the_vocabulary():
    from mlx_foundry import lm_bench
    from mlx_foundry.bench.e2e import TINY_LLAMA

    with pytest.raises(ValueError, match=r"'prompt' ids must be in \[0, 256\).*e\.g\. 256"):
        lm_bench.decode_benchmark(config=TINY_LLAMA, prompt=[1, 256, 3], steps=2,
                                  dtype=mx.float32, backend="reference")


def test_batch_decode_benchmark_checks_every_sequence_at_its_first_difference(monkeypatch):
    """Each sequence's first differing step is judged by the unpatched model's
    log-probability gap between its own choice and the patched token there (not its
    top-2 gap): one sequence parting at a tie and another where the unpatched choice was
    clearly better is a failure, and so is a patched token far below two tied ones."""
    from mlx_foundry import lm, lm_bench

    ref = [[1, 2], [3, 4], [5, 6], [7, 8]]
    ours = [[1, 2], [9, 4], [5, 9], [7, 9]]  # sequence 0 from step 1, sequence 1 from step 2
    margins = [[0.5, 0.5], [0.001, 0.7], [0.9, 0.3], [0.2, 0.2]]  # top-2 gaps
    gaps_to = [[0.0, 0.0], [0.002, 0.0], [0.0, 0.3], [0.0, 0.4]]  # to the patched token
    seen_against = []

    def fake(m, prompts, steps, warmup, margins=False, against=None):
        if not margins:
            return (ours if fake.patched else ref), 0.1
        seen_against.append(against)
        return ref, 0.1, margins_, gaps_to

    margins_ = margins
    fake.patched = False

    class Model:
        class args:
            vocab_size = 100

    judged = []
    f32_gap = [1.0]  # float32: log p(unpatched choice) - log p(patched choice)

    def float32_logits(m, prompt, tokens):
        judged.append((prompt, tokens))
        lp = mx.zeros((len(tokens), 100))
        return lp.at[len(tokens) - 1, tokens[-1]].add(f32_gap[0])

    monkeypatch.setattr(lm_bench, "_batch_greedy", fake)
    monkeypatch.setattr(lm_bench, "_model_dtype", lambda m: mx.float16)
    monkeypatch.setattr(lm_bench, "_float32_forced_logits", float32_logits)
    def patch(m, **kw):  # as lm.patch: patches, returns the report
        fake.patched = True
        return lm.PatchReport()

    monkeypatch.setattr("mlx_foundry.lm.patch", patch)
    monkeypatch.setattr("mlx_foundry.lm.unpatch", lambda m: setattr(fake, "patched", False))
    run = lambda: lm_bench.batch_decode_benchmark(Model(), batch=2, steps=3, warmup=0,
                                                  repeats=1)
    r = run()
    assert seen_against == [ours]  # the unpatched rerun measures gaps to the patched tokens
    assert r["first_mismatch"] == 1 and r["sequences_differing"] == [0, 1]
    assert r["first_mismatch_unpatched_gap"] == 0.3  # sequence 1 at step 2 (0.002: seq. 0)
    assert r["first_mismatch_margin"] == 0.3  # reported only
    # only sequence 1 is past the tie: float32 is fed its unpatched tokens to step 2
    assert len(judged) == 1 and judged[0][1] == [2, 4, 6]
    assert r["first_mismatch_float32_gap"] == 1.0
    ok, why = lm_bench.same_tokens_up_to_ties(r)
    assert not ok and "0.3" in why
    f32_gap[0] = -0.25  # float32 prefers the patched token
    r = run()
    assert r["first_mismatch_float32_gap"] == -0.25 and lm_bench.same_tokens_up_to_ties(r)[0]
    gaps_to[2][1] = 0.01  # the unpatched model itself puts the two within a tie
    judged.clear()
    r = run()
    assert r["first_mismatch_unpatched_gap"] == 0.01 and lm_bench.same_tokens_up_to_ties(r)[0]
    assert not judged and r["first_mismatch_float32_gap"] is None
    # Top-2 tied where sequence 1 parts (margin 0), but the patched token is 0.9 below the
    # unpatched choice and float32 agrees: an error the top-2 gap alone would have passed.
    margins[2][1], gaps_to[2][1], f32_gap[0] = 0.0, 0.9, 0.8
    r = run()
    assert r["first_mismatch_margin"] == 0.001 and r["first_mismatch_unpatched_gap"] == 0.9
    assert not lm_bench.same_tokens_up_to_ties(r)[0]


def test_batch_candidates_are_valid_launches():
    from mlx_foundry.bench.autotune import batch_candidates
    from mlx_foundry.ops.linear import valid_launch

    for m, dual, want in ((2, False, {1, 2}), (4, True, {1, 2, 4}), (5, False, {1, 2, 3, 4, 5}),
                          (6, False, {1, 2, 3, 4, 6})):
        cands = batch_candidates(m, dual=dual)
        assert cands and all(valid_launch(c, dual=dual) for c in cands)
        assert {c["MBLOCK"] for c in cands} == want


def test_autotune_linear_tunes_rows_of_x(tmp_path):
    """Several rows of x: its own shape class, MBLOCK among the candidates, read back."""
    pytest.importorskip("mlx_foundry.ops.linear")
    import json

    from mlx_foundry.bench import autotune
    from mlx_foundry.ops.linear import default_launch, linear_kernel

    path = str(tmp_path / "t.json")
    cands = [{"ROWS": 2, "THREADS": 64, "SPLITK": 0, "MBLOCK": 2}]
    got = autotune.tune_linear("reference", shapes=[(256, 96)], bits=(4,), candidates=cands,
                               repeats=1, path=path, pool_bytes=0, rows_of_x=(4,))
    (key, cls), params = next(iter(got.items()))
    assert cls == "m4_n128_k256"
    assert grid(params) in [grid(c) for c in cands + [default_launch(96, 256, m=4)]]
    assert params["MBLOCK"] in (2, default_launch(96, 256, m=4)["MBLOCK"])
    assert params.get("UNROLL", 1) in autotune.DEFAULT_UNROLLS
    with open(path) as f:
        (entry,) = json.load(f)["entries"].values()
    assert entry["params"] == params and entry["failures"] == []
    kern = linear_kernel(("affine", 4, 64))
    assert autotune.lookup_linear(kern, 96, 256, 4, "reference", path=path) == looked_up(entry)
    with pytest.raises(ValueError, match="'rows_of_x'"):
        autotune.tune_linear("reference", rows_of_x=(0,), path=path)


def test_cli_tune_rows_reaches_the_tuner(monkeypatch, capsys):
    """``bench --tune --tune-rows 1 4`` tunes linear for one and four rows of x."""
    from mlx_foundry.bench import autotune

    seen = {}
    monkeypatch.setattr(autotune, "tune_linear",
                        lambda backend, rows_of_x=(1,): seen.setdefault("rows", rows_of_x) and {})
    monkeypatch.setattr(autotune, "tune_decode", lambda backend: {})
    assert cli_main(["bench", "--tune", "--tune-rows", "1", "4", "--backend", "reference"]) == 0
    assert seen["rows"] == (1, 4)
    seen.clear()
    assert cli_main(["bench", "--tune", "--backend", "reference"]) == 0
    assert seen["rows"] == (1,)


def test_decode_benchmark_bf16_is_judged_by_float32():
    """A bf16 model: the tie is bf16's, and where the patched choice differs past it the
    float32 run judges. On the CPU MLX's own bf16 quantized matmul sums in bf16, so the
    patched (float-accumulating) reference ops may part ways with it: float32 must find
    those choices at least as good."""
    from mlx_foundry import lm_bench
    from mlx_foundry.bench.e2e import TINY_LLAMA

    r = lm_bench.decode_benchmark(config=TINY_LLAMA, steps=12, warmup=1, dtype=mx.bfloat16,
                                  backend="reference", results_dir="")
    assert r["tie"] == lm_bench.BF16_TIE
    assert all("float32_gap" in d for d in r["forced_disagreements"])
    ok, why = lm_bench.same_tokens_up_to_ties(r)
    assert ok, why


@pytest.mark.parametrize("patch_kwargs, compiled", [(None, False),
                                                     ({"compile_decode": True}, True)])
def test_e2e_result_says_which_step_ran(patch_kwargs, compiled):
    pytest.importorskip("mlx_lm")
    from mlx_foundry.bench import e2e

    res = e2e.run_decode(Context("reference", tiny=True), tiny=True,
                         patch_kwargs=patch_kwargs)
    assert res["status"] == "ok", res
    assert res["compiled_step"] is compiled


def test_bench_rejects_unknown_dtype():
    from mlx_foundry import bench

    with pytest.raises(ValueError, match="'dtype' must be one of float16, bfloat16, float32"):
        bench.run(backend="reference", dtype="int8", only=["rms_norm"], progress=False)
    with pytest.raises(ValueError, match="'dtype'"):
        bench.run(backend="reference", dtype=mx.int8, only=["rms_norm"], progress=False)


def test_float32_judge_puts_mixed_dtype_parameters_back():
    """The float32 judge casts the model and must restore each parameter as it was (a
    float32 parameter in a bf16 model stays float32)."""
    from mlx_foundry import lm_bench
    from mlx_foundry.bench.e2e import TINY_LLAMA
    from mlx.utils import tree_flatten

    model = lm_bench.random_quantized_model(TINY_LLAMA, dtype=mx.bfloat16)
    model.model.norm.weight = model.model.norm.weight.astype(mx.float32)
    before = {k: v.dtype for k, v in tree_flatten(model.parameters())}
    lp = lm_bench._float32_forced_logits(model, [1, 2, 3], [4, 5])
    assert lp.shape == (2, TINY_LLAMA["vocab_size"]) and lp.dtype == mx.float32
    assert {k: v.dtype for k, v in tree_flatten(model.parameters())} == before
    assert before["model.norm.weight"] == mx.float32


def test_forced_logits_feed_every_compared_step_as_one_token():
    """The teacher-forced check compares one-token decode steps only (the patched model's
    fused path), the first included: the prompt but its last token is prefilled, the
    last token alone chooses the first token, as in mlx-lm's generate_step; the logits
    are those of that free-running greedy decode."""
    pytest.importorskip("mlx_lm")
    from mlx_foundry import lm_bench
    from mlx_foundry.bench.e2e import TINY_LLAMA

    model = lm_bench.random_quantized_model(TINY_LLAMA, dtype=mx.float32)
    shapes = []

    class Recorder:
        layers = model.layers

        def __call__(self, inputs, cache=None):
            shapes.append(tuple(inputs.shape))
            return model(inputs, cache=cache)

    prompt = [3, 1, 4, 1, 5, 9, 2]
    toks, _, margins = lm_bench.greedy_decode(model, prompt, 5, margins=True)
    logits = lm_bench._forced_logits(Recorder(), prompt, toks)
    assert shapes == [(1, 6)] + [(1, 1)] * 5
    assert mx.argmax(logits, axis=-1).tolist() == toks
    lp = lm_bench._log_softmax32(logits)
    top2 = mx.topk(lp, 2, axis=-1)
    assert mx.allclose(mx.max(top2, axis=-1) - mx.min(top2, axis=-1), mx.array(margins),
                       atol=1e-5).item()
    shapes.clear()
    lm_bench._forced_logits(Recorder(), prompt, toks, prefill_step_size=4)
    assert shapes == [(1, 4), (1, 2)] + [(1, 1)] * 5
    shapes.clear()
    lm_bench._forced_logits(Recorder(), [7], toks[:2])
    assert shapes == [(1, 1), (1, 1)]


def test_decode_benchmark_judges_a_far_down_patched_choice(monkeypatch):
    """decode_benchmark measures, on a real model, the unpatched model's gap between its
    own choice and the patched one: a patched choice made the unpatched model's least
    likely token (teacher-forced at step 2, free-running from step 3) is reported with
    that gap, float32 agrees, and the verdict is False."""
    pytest.importorskip("mlx_lm")
    from mlx_foundry import lm, lm_bench
    from mlx_foundry.bench.e2e import TINY_LLAMA

    model = lm_bench.random_quantized_model(TINY_LLAMA, dtype=mx.float32)
    prompt = [5, 17, 2, 99]
    real_forced, real_logits = lm_bench.forced_argmax, lm_bench._forced_logits
    worst = {}

    def forced(m, p, toks):
        out = real_forced(m, p, toks)
        worst[2] = mx.argmin(real_logits(m, p, toks)[2]).item()
        out[2] = worst[2]
        return out

    real_decode = lm_bench.greedy_decode

    def decode(m, p, steps, **kw):
        out = real_decode(m, p, steps, **kw)
        if lm.is_patched(m) and steps == 6:
            toks = list(out[0])
            worst[3] = mx.argmin(real_logits(m, p, toks)[3]).item()
            toks[3] = worst[3]
            out = (toks,) + tuple(out[1:])
        return out

    monkeypatch.setattr(lm_bench, "forced_argmax", forced)
    monkeypatch.setattr(lm_bench, "greedy_decode", decode)
    r = lm_bench.decode_benchmark(model, prompt=prompt, steps=6, warmup=0,
                                  backend="reference", results_dir="")
    ref = r["unpatched_tokens"]
    lp = lm_bench._log_softmax32(real_logits(model, prompt, ref))
    (d,) = r["forced_disagreements"]
    assert d["step"] == 2 and d["unpatched_token"] == ref[2] and d["patched_token"] == worst[2]
    want = (lp[2, ref[2]] - lp[2, worst[2]]).item()
    assert d["unpatched_gap"] == pytest.approx(want, rel=1e-5) and want > 1.0
    assert d["float32_gap"] == pytest.approx(want, rel=1e-3)   # a float32 model
    assert d["unpatched_margin"] < d["unpatched_gap"]
    assert r["first_mismatch"] == 3
    want = (lp[3, ref[3]] - lp[3, worst[3]]).item()
    assert r["first_mismatch_unpatched_gap"] == pytest.approx(want, rel=1e-5) and want > 1.0
    assert r["first_mismatch_float32_gap"] == pytest.approx(want, rel=1e-3)
    ok, why = lm_bench.same_tokens_up_to_ties(r)
    assert not ok and "clearly preferred" in why
    assert not lm.is_patched(model)


def test_end_to_end_rows_show_tokens_per_second(tmp_path):
    e2e = {"name": "e2e", "op": "decode (end-to-end)", "shape": "llama-3-8b",
           "dtype": "fp16/q4", "status": "ok", "baseline_us": 5000.0, "ours_us": 2500.0,
           "speedup": 2.0, "baseline_tok_s": 200.0, "ours_tok_s": 400.0}
    results = {"cases": [e2e], "copy": {}, "device": "d", "backend": "cuda",
               "mlx_version": "0", "date": "now", "command": "python -m mlx_foundry bench"}
    text = report.format_table(results)
    assert "llama-3-8b, 200 -> 400 tok/s" in text and "2.00x" in text
    md = report.write_benchmarks_md(results, str(tmp_path / "B.md"))
    body = open(md).read()
    assert "This run: `python -m mlx_foundry bench`" in body and "at least 32 sets" in body
