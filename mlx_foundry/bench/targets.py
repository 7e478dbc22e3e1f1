"""The targets of the project's benchmark issue, read off one run's results.

Each target names the cases it is judged on (by op and weight format, so the tiny
shapes of a CPU run map onto the same targets), the figure of this run, whether it
holds, and for a speedup target what it asks in microseconds beside the plain read of
the same bytes (:mod:`.read_probe`) timed in the same run: a target time under that
read asks for a kernel faster than one that only reads its bytes.

A run that lacks a case (``--only``, a skipped or failed case) reports the target as
not measured rather than as missed.
"""

__all__ = ["evaluate", "format_targets", "markdown_targets"]

VERDICT = {True: "met", False: "missed", None: "-"}
"""How a target's ``met`` reads (``None``: not measured in this run)."""


def _ok(c):
    return c.get("status") == "ok" and c.get("speedup") is not None


def _linear(fmt):
    """The single-row linear cases of one weight format (``"q4"``, ``"q8"``, dense)."""
    def pick(c):
        parts = c["dtype"].split("/")
        return c["op"] == "linear" and (parts[1:] == [fmt] if fmt else len(parts) == 1)
    return pick


def _op(name):
    return lambda c: c["op"] == name


def _times(speedup, ratio):
    """``"2.49x"``; three decimals near the ratio (0.998x must not read as 1.00x)."""
    return f"{speedup:.{3 if abs(speedup - ratio) < 0.01 else 2}f}x"


def _asks(cases, ratio):
    """``"; 3x asks 11.4 us (plain read 15.1 us)"`` per case, where the run has both."""
    parts = []
    for c in cases:
        if c.get("baseline_us") is None:
            continue
        text = f"{c['baseline_us'] / ratio:.1f} us"
        if c.get("read_us") is not None:
            text += f" (plain read {c['read_us']:.1f} us)"
        parts.append(text)
    return f"; {ratio:g}x asks {', '.join(parts)}" if parts else ""


def _speedup(title, pick, ratio, with_asks=True):
    def judge(cases):
        got = [c for c in cases if pick(c) and _ok(c)]
        if not got:
            return None
        figure = " / ".join(_times(c["speedup"], ratio) for c in got)
        met = all(c["speedup"] >= ratio for c in got)
        return figure + (_asks(got, ratio) if with_asks and not met else ""), met
    return title, judge


def _pct_copy(title, pick, pct, largest=False):
    def judge(cases):
        got = [c for c in cases if pick(c) and c.get("status") == "ok"
               and c.get("pct_copy") is not None]
        if largest and got:
            got = [max(got, key=lambda c: c.get("bytes") or 0)]
        if not got:
            return None
        return (" / ".join(f"{c['pct_copy']:.0f}%" for c in got),
                all(c["pct_copy"] >= pct for c in got))
    return title, judge


def _end_to_end(title, ratio):
    def judge(cases):
        got = [c for c in cases if c["op"] == "decode (end-to-end)" and _ok(c)]
        if not got:
            return None
        c = got[0]
        same = c.get("tokens_equal")
        figure = _times(c["speedup"], ratio) + ", " + (
            "identical greedy tokens" if same else c.get("tokens_check") or "tokens differ")
        return figure, bool(c["speedup"] >= ratio and same)
    return title, judge


TARGETS = (
    _speedup("4-bit linear >= 3x mx.quantized_matmul", _linear("q4"), 3.0),
    _pct_copy("4-bit linear >= 70% of the copy ceiling", _linear("q4"), 70.0),
    _speedup("8-bit linear no slower than MLX", _linear("q8"), 1.0, with_asks=False),
    _speedup("dense linear (the issue's fp16) no slower than MLX", _linear(None), 1.0,
             with_asks=False),
    _speedup("decode MLP block (4-bit) >= 3x MLX's unfused ops", _op("decode MLP block"),
             3.0),
    _pct_copy("rms_norm of the large matrix >= 90% of the copy ceiling", _op("rms_norm"),
              90.0, largest=True),
    _end_to_end("end-to-end 4-bit decode >= 2.5x unpatched, same greedy tokens", 2.5),
)
"""``(title, judge)`` pairs; ``judge(cases)`` returns ``(figure, met)`` or ``None``."""


def evaluate(results):
    """The targets against one run: a list of ``{"target", "figure", "met"}``.

    ``met`` is ``True``/``False``, or ``None`` with ``figure`` ``"not measured"`` when the
    run has none of the target's cases.
    """
    cases = results.get("cases") or []
    out = []
    for title, judge in TARGETS:
        got = judge(cases)
        if got is None:
            out.append({"target": title, "figure": "not measured", "met": None})
        else:
            out.append({"target": title, "figure": got[0], "met": got[1]})
    return out


def format_targets(targets):
    """One line per target: ``[met] title: figure``."""
    return "\n".join(f"[{VERDICT[t['met']]:>6}] {t['target']}: {t['figure']}"
                     for t in targets)


def markdown_targets(targets):
    """The targets as a Markdown table: target, this run's figure, verdict."""
    return "\n".join(["| target | this run | met |", "|---|---|---|"] + [
        f"| {t['target']} | {t['figure']} | {VERDICT[t['met']]} |" for t in targets])
