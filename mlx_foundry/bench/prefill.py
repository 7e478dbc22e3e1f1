"""Where the prefill threshold belongs on this device, read off one run's results.

``ops.linear`` sends inputs with more than ``PREFILL_ROWS`` rows of ``x`` to MLX's own
``quantized_matmul`` / ``matmul``. The bench's ``linear (fused, M rows)`` cases time the
fused GEMV forced on M rows against ``mx.quantized_matmul``, so one run says up to how
many rows the fused kernel wins here: the threshold belongs between the last row count
it won (every smaller one measured won too) and the first it lost. This is advice
printed after the targets, not a target, and it changes nothing: the threshold is a
module constant, set by hand (``importlib.import_module("mlx_foundry.ops.linear")
.PREFILL_ROWS = n``).

On the reference backend no fused kernel runs, so there is nothing to judge.
"""

__all__ = ["OP", "evaluate", "format_advice"]

OP = "linear (fused, M rows)"
"""The bench op whose cases time the fused GEMV on several rows of ``x``."""


def _rows(case):
    """M of a case's shape ``"MxK->N"``."""
    return int(case["shape"].split("x", 1)[0])


def evaluate(results, prefill_rows):
    """What the run says of the threshold ``prefill_rows``.

    Returns ``{"prefill_rows", "speedups", "wins_up_to", "first_loss", "agrees",
    "advice"}``: ``speedups`` maps each measured M to the fused kernel's speedup;
    ``wins_up_to`` is the largest M such that the fused kernel won (speedup >= 1) at
    every measured row count up to it (``None`` when it lost at the smallest);
    ``first_loss`` the smallest M it lost at (``None``: none); ``agrees`` whether
    ``prefill_rows`` lies in ``[wins_up_to, first_loss)``, ``None`` when the run cannot
    tell (the reference backend, or no such case measured).
    """
    out = {"prefill_rows": prefill_rows, "speedups": {}, "wins_up_to": None,
           "first_loss": None, "agrees": None}
    if results.get("backend") == "reference":
        out["advice"] = "not judged on the reference backend (no fused kernel ran)"
        return out
    speedups = {_rows(c): c["speedup"] for c in results.get("cases") or []
                if c.get("op") == OP and c.get("status") == "ok"
                and c.get("speedup") is not None}
    out["speedups"] = dict(sorted(speedups.items()))
    if not speedups:
        out["advice"] = "not measured in this run"
        return out
    for m, s in out["speedups"].items():
        if s < 1.0:
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
