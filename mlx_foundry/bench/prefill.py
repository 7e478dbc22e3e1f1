"""Where the prefill threshold belongs on this device, read off one run's results.

``ops.linear`` sends inputs with more than ``PREFILL_ROWS`` rows of ``x`` to MLX's own
``quantized_matmul`` / ``matmul``. The bench's ``linear (fused, M rows)`` cases time the
fused GEMV forced on M rows against MLX's op, per weight format (4-bit over many row
counts, 8-bit and dense at the threshold's edge), so one run says up to how many rows the
fused kernel wins here: the threshold belongs between the last row count it won (every
smaller one measured won too) and the first it lost, for every format, since one
threshold serves them all. A speedup within the tuner's margin under 1 (0.97x-1x) is
even, not a loss: where both kernels read the same bytes at the memory's speed (dense
weights at 7 rows on an H100, session 33: 0.98x) a run moves them by that much. This
is advice printed after the targets, not a target, and it changes nothing: the
threshold is a module constant, set by hand
(``importlib.import_module("mlx_foundry.ops.linear").PREFILL_ROWS = n``).

On the reference backend no fused kernel runs, so there is nothing to judge.
"""

from .tuner import DEFAULT_MARGIN

__all__ = ["OP", "LOSS_BELOW", "evaluate", "format_advice"]

OP = "linear (fused, M rows)"
"""The bench op whose cases time the fused GEMV on several rows of ``x``."""

LOSS_BELOW = 1.0 - DEFAULT_MARGIN
"""A fused speedup under this is a loss; from it up to 1 the two ran even (the tuner's
margin: a candidate must beat the default by as much to replace it)."""


def _rows(case):
    """M of a case's shape ``"MxK->N"``."""
    return int(case["shape"].split("x", 1)[0])


def evaluate(results, prefill_rows):
    """What the run says of the threshold ``prefill_rows``, per weight format.

    Returns ``{"prefill_rows", "formats", "agrees", "advice"}``. ``formats`` maps each
    format the cases measured (their ``dtype`` column, e.g. ``"fp16/q4"``, in the
    suite's order) to ``{"speedups", "wins_up_to", "first_loss", "agrees", "advice"}``:
    ``speedups`` maps each measured M to the fused kernel's speedup; ``wins_up_to`` is
    the largest M such that the fused kernel won or ran even (speedup >=
    :data:`LOSS_BELOW`) at every measured row count up to it (``None`` when it lost at
    the smallest); ``first_loss`` the smallest M it lost at (``None``: none); ``agrees``
    whether ``prefill_rows`` lies in ``[wins_up_to, first_loss)``. The top-level
    ``agrees`` holds when it does for every format (one threshold serves them all),
    ``None`` when the run cannot tell (the reference backend, or no such case measured).
    """
    out = {"prefill_rows": prefill_rows, "formats": {}, "agrees": None}
    if results.get("backend") == "reference":
        out["advice"] = "not judged on the reference backend (no fused kernel ran)"
        return out
    series = {}
    for c in results.get("cases") or []:
        if (c.get("op") == OP and c.get("status") == "ok"
                and c.get("speedup") is not None):
            series.setdefault(c.get("dtype", "?"), {})[_rows(c)] = c["speedup"]
    if not series:
        out["advice"] = "not measured in this run"
        return out
    out["formats"] = {fmt: _judge(speedups, prefill_rows) for fmt, speedups in series.items()}
    out["agrees"] = all(f["agrees"] for f in out["formats"].values())
    out["advice"] = ". ".join(f"{fmt}: {f['advice']}" for fmt, f in out["formats"].items())
    return out


def _judge(speedups, prefill_rows):
    """One format's row counts (``{M: speedup}``) against the threshold."""
    out = {"speedups": dict(sorted(speedups.items())), "wins_up_to": None,
           "first_loss": None}
    for m, s in out["speedups"].items():
        if s < LOSS_BELOW:
            out["first_loss"] = m
            break
        out["wins_up_to"] = m
    wins, loss = out["wins_up_to"], out["first_loss"]
    low = wins if wins is not None else 1  # one row: the fused GEMV, always
    out["agrees"] = low <= prefill_rows and (loss is None or prefill_rows < loss)
    out["advice"] = _advice(prefill_rows, out["speedups"], wins, loss, low, out["agrees"])
    return out


def _advice(prefill_rows, speedups, wins, loss, low, agrees):
    measured = ", ".join(f"{m}: {s:.2f}x" for m, s in speedups.items())
    if wins is None:
        said = f"the fused kernel lost from {loss} rows on"
    elif loss is None:
        said = f"the fused kernel won at every row count measured, up to {wins}"
    else:
        said = f"the fused kernel won up to {wins} rows and lost at {loss}"
    even = [m for m, s in speedups.items()
            if LOSS_BELOW <= s < 1.0 and (loss is None or m < loss)]
    if even:
        said += f", even at {', '.join(map(str, even))} rows"
    if agrees:
        return f"{said} ({measured}): PREFILL_ROWS = {prefill_rows} fits this device"
    if prefill_rows < low:
        fits = f"{wins} or more" + (f", under {loss}" if loss is not None else "")
        hint = (f"{_span(prefill_rows + 1, wins)} go to MLX where the fused kernel won: "
                f"this run asks {fits}")
    else:
        hint = (f"{_span(loss, prefill_rows)} stay fused where MLX won: this run asks "
                f"under {loss}")
    return f"{said} ({measured}): PREFILL_ROWS = {prefill_rows}; {hint}"


def _span(first, last):
    return f"{first} rows" if first == last else f"{first}-{last} rows"


def format_advice(prefill):
    """One line: ``Prefill threshold: ...``."""
    return f"Prefill threshold (ops.linear.PREFILL_ROWS): {prefill['advice']}"
