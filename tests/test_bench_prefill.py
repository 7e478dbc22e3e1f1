"""The bench's advice on ``ops.linear.PREFILL_ROWS``, read off one run
(``bench/prefill.py``)."""

import pytest

from mlx_foundry.bench import prefill


def _run(speedups, backend="cuda", fmt="fp16/q4", more=None, **extra_cases):
    """A run with one ``linear (fused, M rows)`` case per row count of format ``fmt``
    (and of the formats in ``more``: ``{fmt: speedups}``), and other cases."""
    cases = [{"name": f"prefill_{f.split('/')[-1]}_m{m}_4096x14336", "op": prefill.OP,
              "shape": f"{m}x4096->14336", "dtype": f, "status": "ok", "speedup": s}
             for f, series in {fmt: speedups, **(more or {})}.items()
             for m, s in series.items()]
    cases.append({"name": "linear_q4_14336x4096", "op": "linear", "shape": "1x14336->4096",
                  "status": "ok", "speedup": 0.5})  # not a row-count case: ignored
    for name, fields in extra_cases.items():
        next(c for c in cases if c["name"] == name).update(fields)
    return {"backend": backend, "cases": cases}


# The shape of session 30's H200 run (run 2): 5.34x at 6 rows, 0.68x at 8.
H200 = {2: 3.45, 3: 4.05, 4: 4.55, 5: 5.06, 6: 5.34, 8: 0.68, 16: 0.36}


def _q4(run, rows):
    """The whole judgement and the 4-bit format's."""
    got = prefill.evaluate(run, rows)
    return got, got["formats"]["fp16/q4"]


def test_a_threshold_between_the_last_win_and_the_first_loss_agrees():
    for rows in (6, 7):
        got, q4 = _q4(_run(H200), rows)
        assert (q4["wins_up_to"], q4["first_loss"], q4["agrees"]) == (6, 8, True)
        assert got["agrees"] is True
        assert got["advice"].startswith("fp16/q4: the fused kernel won up to 6 rows")
        assert f"PREFILL_ROWS = {rows} fits this device" in got["advice"]
    assert list(q4["speedups"]) == [2, 3, 4, 5, 6, 8, 16]


def test_a_win_sent_to_mlx_is_named():
    got, q4 = _q4(_run({**H200, 7: 5.1}), 6)
    assert (q4["wins_up_to"], q4["first_loss"], q4["agrees"]) == (7, 8, False)
    assert got["agrees"] is False
    assert ("7 rows go to MLX where the fused kernel won: this run asks 7 or more, under 8"
            in got["advice"])


def test_a_loss_kept_fused_is_named():
    got, q4 = _q4(_run({2: 1.4, 3: 0.9, 4: 0.8}), 6)
    assert (q4["wins_up_to"], q4["first_loss"], q4["agrees"]) == (2, 3, False)
    assert "3-6 rows stay fused where MLX won: this run asks under 3" in got["advice"]


def test_a_loss_at_the_fewest_rows():
    got, q4 = _q4(_run({2: 0.9, 4: 1.5}), 6)
    assert (q4["wins_up_to"], q4["first_loss"], q4["agrees"]) == (None, 2, False)
    assert "lost from 2 rows on" in got["advice"] and "asks under 2" in got["advice"]
    assert prefill.evaluate(_run({2: 0.9}), 1)["agrees"] is True


def test_wins_at_every_row_count_measured():
    got, q4 = _q4(_run({2: 3.0, 16: 1.2}), 16)
    assert (q4["wins_up_to"], q4["first_loss"], q4["agrees"]) == (16, None, True)
    low = prefill.evaluate(_run({2: 3.0, 16: 1.2}), 6)
    assert low["agrees"] is False
    assert low["advice"].endswith("7-16 rows go to MLX where the fused kernel won: this run "
                                  "asks 16 or more")


def test_a_case_that_did_not_run_is_left_out():
    run = _run(H200, prefill_q4_m8_4096x14336={"status": "error", "speedup": None})
    _, q4 = _q4(run, 6)
    assert 8 not in q4["speedups"]
    assert (q4["wins_up_to"], q4["first_loss"]) == (6, 16)


@pytest.mark.parametrize("run,why", [
    (_run(H200, backend="reference"),
     "not judged on the reference backend (no fused kernel ran)"),
    ({"backend": "cuda", "cases": []}, "not measured in this run"),
])
def test_nothing_to_judge(run, why):
    got = prefill.evaluate(run, 6)
    assert got["agrees"] is None and got["formats"] == {}
    assert got["advice"] == why
    assert prefill.format_advice(got) == f"Prefill threshold (ops.linear.PREFILL_ROWS): {why}"


def test_every_format_must_fit_the_one_threshold():
    """8-bit and dense at the edge beside 4-bit: the threshold fits only if it fits all,
    and the advice names each format in the run's order."""
    more = {"fp16/q8": {7: 3.9, 8: 0.7}, "fp16": {7: 0.95, 8: 0.9}}
    got = prefill.evaluate(_run({**H200, 7: 5.1}, more=more), 7)
    assert list(got["formats"]) == ["fp16/q4", "fp16/q8", "fp16"]
    assert [f["agrees"] for f in got["formats"].values()] == [True, True, False]
    assert got["agrees"] is False
    parts = got["advice"].split(". ")
    assert [p.split(":", 1)[0] for p in parts] == ["fp16/q4", "fp16/q8", "fp16"]
    assert parts[2] == ("fp16: the fused kernel lost from 7 rows on (7: 0.95x, 8: 0.90x): "
                        "PREFILL_ROWS = 7; 7 rows stay fused where MLX won: this run asks "
                        "under 7")
    fine = prefill.evaluate(_run(H200, more={"fp16": {7: 1.02, 8: 0.9}}), 7)
    assert fine["agrees"] is True


def test_a_speedup_within_the_tuners_margin_is_even_not_a_loss():
    """Dense weights at 7 rows on an H100 (session 33) ran 0.98x: both kernels read the
    same bytes, and a run moves them by that much. Within 3% under 1 is even; past it, a
    loss."""
    even = prefill.evaluate(_run(H200, more={"fp16": {7: 0.98, 8: 0.94}}), 7)
    dense = even["formats"]["fp16"]
    assert (dense["wins_up_to"], dense["first_loss"], dense["agrees"]) == (7, 8, True)
    assert dense["advice"] == ("the fused kernel won up to 7 rows and lost at 8, even at 7 "
                               "rows (7: 0.98x, 8: 0.94x): PREFILL_ROWS = 7 fits this "
                               "device")
    lost = prefill.evaluate(_run(H200, more={"fp16": {7: 0.96, 8: 0.94}}), 7)
    assert lost["formats"]["fp16"]["first_loss"] == 7 and lost["agrees"] is False
    assert prefill.LOSS_BELOW == 0.97
