"""What the time budget does to `--trials`: said before the search, and in the final table."""

from __future__ import annotations

import pytest

from raylocal.budget import first_rung_seconds, most_trials
from raylocal.plan import build_plan
from raylocal.publish import trials_line
from raylocal.resources import choose_layout
from raylocal.settings import Settings


def test_most_trials_counts_a_kept_start_point_once_and_fills_the_other_slots():
    # 2 slots, 100 s: the start point holds one slot, the other starts a trial every 10 s at best.
    assert most_trials(100, 2, 10, keeps_start_point=True) == 1 + 10
    assert most_trials(100, 2, 10, keeps_start_point=False) == 20
    assert most_trials(100, 1, 10, keeps_start_point=True) == 10  # one slot: the start point is one of them
    assert most_trials(5, 4, 10, keeps_start_point=False) == 4  # a trial that starts counts


def test_a_trial_costs_at_least_its_training_to_the_first_rung_and_its_validation():
    # An eighth of 8,000 canvases and one scoring of 3,000 (a third of a training step each), at 1,000/s.
    assert first_rung_seconds(0.125, 8, 8000, 3000, 1000.0) == pytest.approx((1000 + 1000) / 1000)
    assert first_rung_seconds(1, 2, 8000, 3000, 1000.0) == pytest.approx((8000 + 2 * 1000) / 1000)


def test_the_budget_line_says_how_many_trials_fit_and_how_to_run_all():
    from raylocal.pipeline import warn_trials_cut

    plan = build_plan(Settings(name="x", storage="/tmp/unused"))
    layout = choose_layout(2, 0)
    lines = []
    warn_trials_cut(plan, 60.0, layout, rows=55_000, val_rows=5_000, log=lines.append)
    assert len(lines) == 1 and lines[0].startswith("budget: at most about ")
    fits = int(lines[0].split("about ")[1].split(" of ")[0])
    assert 1 <= fits < 50 and "of 50 trials fit in the search's 1.0 min" in lines[0]
    assert "2 at a time" in lines[0] and "give --time-budget 0 (no bound) or a larger one" in lines[0]
    # A search with time for every trial says nothing.
    lines.clear()
    warn_trials_cut(build_plan(Settings(name="x", storage="/tmp/unused", trials=2)), 3600.0, layout, rows=1000,
                    val_rows=100, log=lines.append)
    assert lines == []


def test_the_final_table_says_how_many_trials_ran_and_why_not_all():
    assert trials_line({"trials": 2, "trials_planned": 50, "ended_by_time_budget": True}) == "2 of 50 ran (time budget)"
    assert trials_line({"trials": 50, "trials_planned": 50, "ended_by_time_budget": False}) == "50 of 50 ran"
    assert trials_line({"trials": 3}) == "3 of 3 ran"  # a model card from before the count


def test_a_latency_bound_exports_the_most_accurate_option_that_meets_it_or_nothing():
    from raylocal.config import OBJECTIVE, Hyperparameters
    from raylocal.latency import LatencyError
    from raylocal.model import build_model
    from raylocal.publish import Exportable, within_latency

    def option(score: float, depth: int, width: int, source: str) -> Exportable:
        params = Hyperparameters(depth=depth, width=width)
        return Exportable(build_model(params.model_config()).eval(), params, 1.0, {OBJECTIVE: score}, source, source)

    options = [option(0.80, 2, 4, "search"), option(0.90, 3, 8, "final")]
    chosen, views, record = within_latency(options, 3, 1e6, log=lambda line: None)
    # Everything meets a loose bound: the better model, with the most views.
    assert (chosen.source, views) == ("final", 3) and record["chosen"] == {"trial_id": "final", "views": 3,
                                                                          "ms": record["chosen"]["ms"]}
    assert len(record["options"]) == 6 and all(row["ms"] > 0 for row in record["options"])
    with pytest.raises(LatencyError, match=r"--max-latency-ms 1e-06: no model is that fast .* nothing exported"):
        within_latency(options, 3, 1e-6, log=lambda line: None)
