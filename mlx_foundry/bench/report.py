"""Presenting benchmark results: progress line, table, results.json, chart.png, BENCHMARKS.md.

A *results* dict (what :func:`mlx_foundry.bench.run` returns and ``results.json``
holds)::

    {"device": str, "device_info": dict, "mlx_version": str, "date": ISO-8601 str,
     "backend": str, "quick": bool, "copy": {"gbps", "us", "bytes", ...},
     "command": str, "cases": [case, ...], "targets": [target, ...]}

and each case::

    {"name", "op", "shape", "dtype", "bytes", "status": "ok" | "skipped" | "error",
     "reason", "baseline_us", "ours_us", "speedup", "gbps", "baseline_gbps",
     "pct_copy", "read_us", "read_gbps", "baseline": Timing dict, "ours": Timing dict,
     "max_rel_err", ...}
"""

import json
import os
import sys
import time

from .prefill import format_advice
from .targets import markdown_targets

COLUMNS = ("op", "shape", "dtype/bits", "baseline us", "ours us", "speedup", "GB/s",
           "% of copy", "read us")
WIDTHS = (34, 30, 10, 12, 10, 8, 8, 9, 8)


# ------------------------------------------------------------------------------------
# Progress
# ------------------------------------------------------------------------------------
class Progress:
    """A single updating status line on stderr: ``[i/n] case  elapsed``.

    On a terminal the line is rewritten in place; elsewhere (CI logs) one line is
    printed per case.
    """

    def __init__(self, total, stream=None, enabled=True):
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._width = 0

    def update(self, i, name, what=""):
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        line = f"[{i}/{self.total}] {name} {what} ({elapsed:6.1f} s)".replace("  ", " ")
        if self.tty:
            pad = max(0, self._width - len(line))
            self.stream.write("\r" + line + " " * pad)
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def done(self):
        if self.enabled and self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()


# ------------------------------------------------------------------------------------
# Table
# ------------------------------------------------------------------------------------
def _num(v, fmt):
    return "-" if v is None else format(v, fmt)


def _big(v):
    return "-" if v is None else (f"{v:.0f}" if abs(v) >= 10 else f"{v:.2g}")


def case_row(c):
    speed = c.get("speedup")
    shape = c["shape"]
    if c.get("ours_tok_s") and c.get("baseline_tok_s"):
        # End-to-end rows: times are per token; tokens/s is what a user reads.
        shape = f"{shape}, {c['baseline_tok_s']:.0f} -> {c['ours_tok_s']:.0f} tok/s"
    return (c["op"], shape, c["dtype"], _num(c.get("baseline_us"), ".1f"),
            _num(c.get("ours_us"), ".1f"), "-" if speed is None else f"{speed:.2f}x",
            _big(c.get("gbps")), _big(c.get("pct_copy")), _num(c.get("read_us"), ".1f"))


def _note(c):
    """What the table's notes say of a case: its reason, and a failed plain read."""
    parts = [c.get("reason") or ""]
    if c.get("read_error"):
        parts.append(f"plain read failed: {c['read_error']}")
    return "; ".join(p for p in parts if p)


def format_table(results):
    """The fixed-width text table, then a note per skipped or failed case."""
    lines = []
    fmt = "  ".join(f"{{:<{w}}}" if j < 3 else f"{{:>{w}}}" for j, w in enumerate(WIDTHS))
    lines.append(fmt.format(*COLUMNS))
    lines.append("  ".join("-" * w for w in WIDTHS))
    for c in results["cases"]:
        lines.append(fmt.format(*(str(x)[:w] for x, w in zip(case_row(c), WIDTHS))).rstrip())
    copy = results.get("copy") or {}
    if copy.get("gbps"):
        lines.append(f"copy ceiling: {copy['gbps']:.0f} GB/s "
                     f"({copy['buffer_bytes'] / 2**20:.0f} MiB read + written)")
    notes = [c for c in results["cases"] if c.get("status") != "ok" or _note(c)]
    for c in notes:
        lines.append(f"{c['status']}: {c['name']}: {_note(c)}")
    return "\n".join(lines)


TINY_NOTE = ("reference backend at tiny shapes on a CPU: a smoke test of the command; "
             "these numbers mean nothing")


def format_header(results, *, tuned_names=True):
    return (f"mlx_foundry bench - device: {results['device']}, backend: {results['backend']}, "
            f"MLX {results['mlx_version']}, {results['date']}"
            + (" (quick)" if results.get("quick") else "")
            + (f"\n({TINY_NOTE})" if results.get("tiny_shapes") else "")
            + _tuning_line(results.get("tuning"), tuned_names))


def _tuning_state(tuning):
    """``(summary, stored)`` of a run's tuning record (see ``bench._tuning_record``);
    ``(None, [])`` for a results file from before the record existed."""
    if not tuning:
        return None, []
    if tuning.get("note"):
        return f"no launch parameters ({tuning['note']})", []
    if tuning.get("error"):
        return f"untuned defaults: the tuning file could not be read ({tuning['error']})", []
    stored = tuning.get("stored") or []
    if not stored:
        return "untuned defaults (no tuned launch stored for this device)", []
    return f"{len(stored)} tuned launch(es) stored for this device", stored


def _tuning_line(tuning, names=True):
    """The header's line on the launches a run could take from the tuning file."""
    summary, stored = _tuning_state(tuning)
    if summary is None:
        return ""
    if not stored or not names:
        return f"\nlaunches: {summary}"
    listed = ", ".join(f"{s['kernel']} {s['shape_class']}" for s in stored)
    return (f"\nlaunches: {summary} ({tuning.get('path')}), used where the kernel source "
            f"still matches: {listed}")


# ------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------
def write_json(results, path):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)
    return path


def _json_default(o):
    if hasattr(o, "as_dict"):
        return o.as_dict()
    return str(o)


def write_chart(results, path):
    """``chart.png``: speedup per case and % of the copy ceiling.

    Returns the path, or ``None`` (with a note on stderr) when matplotlib is missing.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.stderr.write("note: matplotlib is not installed; chart.png not written "
                         "(pip install 'mlx-kernel-foundry[bench]').\n")
        return None
    cases = [c for c in results["cases"] if c.get("status") == "ok" and c.get("speedup")]
    labels = [f"{c['op']} {c['shape']} {c['dtype']}" for c in cases]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 0.45 * max(4, len(cases)) + 1.5),
                                 sharey=True)
    ys = list(range(len(cases)))
    bars = a1.barh(ys, [c["speedup"] for c in cases], color="tab:blue")
    a1.bar_label(bars, fmt="%.2fx", fontsize=7, padding=2)
    a1.axvline(1.0, color="k", lw=0.8)
    a1.set_xlabel("speedup over MLX (x)")
    a1.set_yticks(ys, labels, fontsize=8)
    a1.invert_yaxis()
    # No bar where there is no figure (end-to-end rows), not a bar of 0%.
    pct = [c.get("pct_copy") for c in cases]
    bars = a2.barh(ys, [p or 0 for p in pct], color="tab:green")
    a2.bar_label(bars, labels=["-" if p is None else f"{p:.0f}%" for p in pct], fontsize=7,
                 padding=2)
    a2.axvline(100.0, color="k", lw=0.8)
    a2.set_xlabel("% of copy ceiling")
    if not cases:
        a1.text(0.5, 0.5, "no measured cases", ha="center", transform=a1.transAxes)
    fig.suptitle(format_header(results, tuned_names=False), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _tuning_md(tuning):
    """BENCHMARKS.md's line on the launches a run could take from the tuning file."""
    summary, stored = _tuning_state(tuning)
    if summary is None:
        return "not recorded"
    if not stored:
        return summary
    listed = "; ".join(f"`{s['kernel']}` {s['shape_class']}: {s['params']}" for s in stored)
    return (f"{summary} (`{tuning.get('path')}`), used where the kernel source still "
            f"matches: {listed}")


def write_benchmarks_md(results, path):
    """Render BENCHMARKS.md: the table, device, MLX version, date and how to reproduce."""
    copy = results.get("copy") or {}
    rows = ["| " + " | ".join(COLUMNS) + " |",
            "|" + "|".join(["---"] * 3 + ["---:"] * (len(COLUMNS) - 3)) + "|"]
    for c in results["cases"]:
        rows.append("| " + " | ".join(case_row(c)) + " |")
    notes = [f"- {c['name']}: {c['status']}: {_note(c)}"
             for c in results["cases"] if c.get("status") != "ok" or _note(c)]
    goals = ""
    if results.get("targets"):
        goals = ("\n## Targets in this run\n\n" + markdown_targets(results["targets"])
                 + "\n\nA missed speedup target says what it asks per case, beside the "
                 "plain read of the same bytes (`mlx_foundry/bench/targets.py`).\n")
    if results.get("prefill"):
        goals += ("\n" + format_advice(results["prefill"])
                  + " (`mlx_foundry/bench/prefill.py`).\n")
    pool_mb = f"{results.get('pool_bytes', 0) / 2**20:.0f}"
    repeats = results.get("repeats", "?")
    calls = results.get("calls_per_timing")
    calls_text = (f"{calls} calls per timing, the same for baseline and ours: about one decode "
                  "token's graph" if calls else "as many calls as fill a few milliseconds")
    text = f"""# Benchmarks

Fused mlx_foundry ops against MLX's own ops, measured by `python -m mlx_foundry bench`.

- Device: **{results['device']}** (backend `{results['backend']}`)
- MLX: {results['mlx_version']}
- Date: {results['date']}{' (quick run)' if results.get('quick') else ''}
- Copy ceiling: {_big(copy.get('gbps'))} GB/s (plain copy measured in the same run)
- Launches: {_tuning_md(results.get('tuning'))}
{(chr(10) + "> " + TINY_NOTE + "." + chr(10)) if results.get("tiny_shapes") else ""}
{chr(10).join(rows)}

"baseline" is MLX (`mx.quantized_matmul`, `x @ w.T`, `mx.fast.rms_norm`, or the unfused
sequence of MLX ops that the fused op replaces); "ours" is the `mlx_foundry.ops` op.
Times are per call in microseconds; GB/s counts the bytes one call must move (weights +
activations read + outputs written) over our time; "% of copy" relates that to the copy
ceiling. "read us" is the time of a plain streaming read of as many bytes
(`mlx_foundry/bench/read_probe.py`), timed in the same run exactly as the case was: what
a kernel that only reads costs at that size, launch ramp-up and tail included. It is a
yardstick, not a bound (a well-fed GEMV can match it), and it carries the run's noise.
For the end-to-end decode the times are per token (speedup = tokens/s ratio).
{(chr(10) + "Notes:" + chr(10) + chr(10).join(notes) + chr(10)) if notes else ""}
{goals}
## Method

Baseline and ours run in the same process, on the same device, in the same run, in
alternating rounds. Each case rotates through a pool of distinct weight sets of about
{pool_mb} MB in all (larger than the last-level cache: H100 L2 is 50 MB, H200 60 MB, Apple
SLC up to 96 MB), and of at least 32 sets however large one is (with fewer, calls that
overlapped on the GPU found each other's weights in L2), warms up first (the first call
pays the JIT compile), and times many independent calls per timing (graphs built first,
then one `mx.eval`; the device time divided by the number of calls; {calls_text}). The
reported time is the median of {repeats} timings.
Every candidate's output is checked once against the baseline. See
`mlx_foundry/bench/timing.py`.

## Reproduce

This run: `{results.get('command', 'python -m mlx_foundry bench')}`.

```bash
pip install -e '.[bench]'            # plus mlx[cuda13] on NVIDIA
python -m mlx_foundry bench --out bench_out          # full run (a few minutes)
python -m mlx_foundry bench --quick                  # short run
python -m mlx_foundry bench --only linear rms_norm   # a subset
```

`bench_out/` then holds `results.json` (every number, with per-timing samples),
`chart.png` and this file (`BENCHMARKS.md`): a record of one run. The repository's
BENCHMARKS.md is kept by hand from such runs (the latest, the targets' status), and
docs/bench_journal.md holds their history.
"""
    with open(path, "w") as f:
        f.write(text)
    return path
