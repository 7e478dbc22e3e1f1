"""The bench's advice on ``ops.linear.PREFILL_ROWS``, read off one run
(``bench/prefill.py``)."""

import pytest

from mlx_foundry.bench import prefill


def _run(speedups, backend="cuda", **extra_cases):
    """A run with one ``linear (fused, M rows)`` case per row count, and other cases."""
    cases = [{"name": f"prefill_q4_m{m}_4096x14336", "op": prefill.OP,
              "shape": f"{m}x4096->14336", "status": "ok", "speedup": s}
             for m, s in speedups.items()]
    cases.append({"name": "linear_q4_14336x4096", "op": "linear", "shape": "1x14336->4096",
                  "status": "ok", "speedup": 0.5})  # not a row-count case: ignored
    for name, fields in extra_cases.items():
        next(c for c in cases if c["name"] == name).update(fields)
    return {"backend": backend, "cases": cases}


# The shape of session 30's H200 run (run 2): 5.34x at 6 rows, 0.68x at 8.
H200 = {2: 3.45, 3: 4.05, 4: 4.55, 5: 5.06, 6: 5.34, 8: 0.68, 16: 0.36}


def test_a_threshold_between_the_last_win_and_the_first_loss_agrees():
    for rows in (6, 7):
        got = prefill.evaluate(_run(H200), rows)
        assert (got["wins_up_to"], got["first_loss"], got["agrees"]) == (6, 8, True)
        assert f"PREFILL_ROWS = {rows} fits this device" in got["advice"]
    assert list(got["speedups"]) == [2, 3, 4, 5, 6, 8, 16]


def test_a_win_sent_to_mlx_is_named():
    got = prefill.evaluate(_run({**H200, 7: 5.1}), 6)
    assert (got["wins_up_to"], got["first_loss"], got["agrees"]) == (7, 8, False)
    assert ("7 rows go to MLX where the fused kernel won: this run asks 7 or more, under 8"
            in got["advice"])


def test_a_loss_kept_fused_is_named():
    got = prefill.evaluate(_run({2: 1.4, 3: 0.9, 4: 0.8}), 6)
    assert (got["wins_up_to"], got["first_loss"], got["agrees"]) == (2, 3, False)
    assert "3-6 rows stay fused where MLX won: this run asks under 3" in got["advice"]


def test_a_loss_at_the_fewest_rows():
    got = prefill.evaluate(_run({2: 0.9, 4: 1.5}), 6)
    assert (got["wins_up_to"], got["first_loss"], got["agrees"]) == (None, 2, False)
    assert "lost from 2 rows on" in got["advice"] and "asks under 2" in got["advice"]
    assert prefill.evaluate(_run({2: 0.9}), 1)["agrees"] is True


def test_wins_at_every_row_count_measured():
    got = prefill.evaluate(_run({2: 3.0, 16: 1.2}), 16)
    assert (got["wins_up_to"], got["first_loss"], got["agrees"]) == (16, None, True)
    low = prefill.evaluate(_run({2: 3.0, 16: 1.2}), 6)
    assert low["agrees"] is False
    assert low["advice"].endswith("7-16 rows go to MLX where the fused kernel won: this run "
                                  "asks 16 or more")


def test_a_case_that_did_not_run_is_left_out():
    run = _run(H200, prefill_q4_m8_4096x14336={"status": "error", "speedup": None})
    got = prefill.evaluate(run, 6)
    assert 8 not in got["speedups"]
    assert (got["wins_up_to"], got["first_loss"]) == (6, 16)


@pytest.mark.parametrize("run,why", [
    (_run(H200, backend="reference"),
     "not judged on the reference backend (no fused kernel ran)"),
    ({"backend": "cuda", "cases": []}, "not measured in this run"),
])
def test_nothing_to_judge(run, why):
    got = prefill.evaluate(run, 6)
    assert got["agrees"] is None and got["wins_up_to"] is None
    assert got["advice"] == why
    assert prefill.format_advice(got) == f"Prefill threshold (ops.linear.PREFILL_ROWS): {why}"
