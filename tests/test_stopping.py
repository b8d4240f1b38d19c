"""The search's early stopping (`raylocal.stopping`), driven directly with Tune `Trial` objects:
plain ASHA promotes the first trials through empty rungs; with a final phase (`ranks_only`), a
trial goes past a rung only as the top 1/rf of at least rf trials there; a resumed search
rebuilds its rungs from the results its trials saved."""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import replace
from pathlib import Path

import pytest

from raylocal.config import OBJECTIVE, Budget

BUDGET = Budget(trials=8, max_epochs=2, first_epoch_reports=2, reports_per_epoch=2, grace_period=0.5,
                reduction_factor=2)


class Search:
    """A scheduler from `make_scheduler` and the trials added to it, each in its own folder."""

    def __init__(self, tmp_path: Path, ranks_only: bool, budget: Budget = BUDGET) -> None:
        from ray.train._internal.storage import StorageContext

        from raylocal.stopping import make_scheduler

        self.budget = budget
        self.scheduler = make_scheduler(budget, ranks_only=ranks_only)
        self.scheduler.set_search_properties(OBJECTIVE, "max")
        self.storage = StorageContext(storage_path=str(tmp_path), experiment_dir_name="stopping")
        self.count = 0

    def add(self, saved: list[dict] | None = None):
        """A new trial, or with `saved` results one that a resumed search adds back."""
        from ray.tune.experiment import Trial

        trial = Trial("run_trial", config={"index": self.count}, stub=True, storage=self.storage)
        trial.storage = copy.copy(self.storage)
        trial.storage.trial_dir_name = f"trial_{self.count}"
        self.count += 1
        if saved:
            folder = Path(trial.storage.trial_fs_path)
            folder.mkdir(parents=True)
            # The last line cut short, as a kill while Tune writes it leaves it.
            (folder / "result.json").write_text("".join(json.dumps(row) + "\n" for row in saved) + '{"epoch": 0.')
            trial.run_metadata.last_result = saved[-1]
        self.scheduler.on_trial_add(None, trial)
        return trial

    def arrive(self, scores: list[float]) -> list[str]:
        """What the scheduler says to new trials arriving in turn at the first rung with `scores`."""
        return [self.scheduler.on_trial_result(None, self.add(), {OBJECTIVE: score, "epoch": self.budget.grace_period})
                for score in scores]


def test_plain_asha_promotes_the_first_trials(tmp_path):
    from ray.tune.schedulers import TrialScheduler

    said = Search(tmp_path, ranks_only=False).arrive([0.5, 0.6, 0.4])
    assert said == [TrialScheduler.CONTINUE, TrialScheduler.CONTINUE, TrialScheduler.STOP]


def test_ranking_search_promotes_only_from_a_filled_rung(tmp_path):
    from ray.tune.schedulers import TrialScheduler

    # Reduction factor 2: a trial needs one other result at its rung, and to be in its top half.
    said = Search(tmp_path, ranks_only=True).arrive([0.5, 0.6, 0.4, 0.7, math.nan])
    assert said == [TrialScheduler.STOP, TrialScheduler.CONTINUE, TrialScheduler.STOP, TrialScheduler.CONTINUE,
                    TrialScheduler.STOP]


def test_ranking_search_waits_for_rf_trials(tmp_path):
    from ray.tune.schedulers import TrialScheduler

    search = Search(tmp_path, ranks_only=True, budget=Budget(max_epochs=5, grace_period=0.125, reduction_factor=4))
    # The first three, however good, find fewer than 3 others; the fourth is the best of four.
    assert search.arrive([0.9, 0.8, 0.7, 0.95, 0.1]) == [TrialScheduler.STOP] * 3 + [TrialScheduler.CONTINUE,
                                                                                     TrialScheduler.STOP]
    # Tune's status line says what each rung waits for, not an infinite cutoff.
    shown = search.scheduler.debug_string()
    assert "epoch 0.125: 0.9" in shown and "epoch 0.5: 0/4 trials" in shown, shown


@pytest.mark.parametrize("ranks_only", [False, True], ids=["plain", "ranks-only"])
def test_a_resumed_search_rebuilds_its_rungs_from_saved_results(tmp_path, ranks_only):
    from ray.tune.schedulers import TrialScheduler

    search = Search(tmp_path, ranks_only=ranks_only)
    # Before the interruption, one trial passed the rung (1/2 epoch) at 0.8 and went on.
    restored = search.add(saved=[{OBJECTIVE: 0.3, "epoch": 0.25}, {OBJECTIVE: 0.8, "epoch": 0.5},
                                 {OBJECTIVE: 0.85, "epoch": 0.75}])
    # Without its result at the rung, plain ASHA would promote 0.7 (an empty rung) and the
    # ranking search would stop 0.9 (no other result there).
    assert search.arrive([0.7, 0.9]) == [TrialScheduler.STOP, TrialScheduler.CONTINUE]
    # The restored trial itself goes on: its decision at that rung was made before the interruption.
    result = {OBJECTIVE: 0.86, "epoch": 0.9}
    assert search.scheduler.on_trial_result(None, restored, result) == TrialScheduler.CONTINUE


def test_filled_rungs_only_where_asked_for_and_a_final_phase_follows():
    import time

    from raylocal.budget import FINISH_SECONDS, START_SECONDS, TimeBudget
    from raylocal.plan import build_plan
    from raylocal.settings import Settings
    from raylocal.tune import get_args_parser
    from raylocal.tuner import filled_rungs

    def plan(*flags: str, filled: bool = True):
        built = build_plan(Settings.from_args(get_args_parser().parse_args(list(flags))))
        return replace(built, experiment=built.experiment.with_budget(filled_rungs=filled))

    roomy = TimeBudget(seconds=600, started=time.time())
    no_room = TimeBudget(seconds=2 * START_SECONDS + FINISH_SECONDS, started=time.time())
    assert filled_rungs(plan(), roomy) and filled_rungs(plan(), None)
    assert not filled_rungs(plan(filled=False), roomy)  # the default: plain ASHA
    assert not filled_rungs(plan("--no-final"), roomy)  # the trials' checkpoints are the model
    assert not filled_rungs(plan(), no_room)  # no final phase fits after the search


def test_the_start_point_is_never_stopped_unless_it_scores_nan(tmp_path, caplog):
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from raylocal.config import Experiment
    from raylocal.stopping import make_scheduler

    start = {"width": 16, "lr": 0.003}

    def scheduler_for(ranks_only=False):
        made = make_scheduler(BUDGET, ranks_only=ranks_only, keep=start)
        made.set_search_properties(OBJECTIVE, "max")
        return made

    def trial(scheduler, config):
        made = Trial("run_trial", config=config, stub=True)
        scheduler.on_trial_add(None, made)
        return made

    def at_rung(scheduler, made, score, epoch=BUDGET.grace_period):
        return scheduler.on_trial_result(None, made, {OBJECTIVE: score, "epoch": epoch})

    scheduler = scheduler_for()
    kept = trial(scheduler, dict(start))
    assert at_rung(scheduler, trial(scheduler, {"width": 8, "lr": 0.003}), 0.9) == TrialScheduler.CONTINUE
    assert at_rung(scheduler, trial(scheduler, {"width": 8, "lr": 0.001}), 0.5) == TrialScheduler.STOP
    with caplog.at_level(logging.INFO, logger="raylocal.stopping"):
        assert at_rung(scheduler, kept, 0.4) == TrialScheduler.CONTINUE  # below the cutoff (0.5) too, and kept
    assert [record.getMessage() for record in caplog.records] == [
        f"ASHA would stop the start point (trial {kept.trial_id}) at epoch 0.5: it trains on (keep_start_point)"]
    # Its result still sets the rung: the median of {0.9, 0.5, 0.4} lets a 0.6 through, which
    # {0.9, 0.5} alone (0.7) would stop.
    assert at_rung(scheduler, trial(scheduler, {"width": 8, "lr": 0.002}), 0.6) == TrialScheduler.CONTINUE
    # The same values drawn again later are a trial like any other.
    assert at_rung(scheduler, trial(scheduler, dict(start)), 0.3) == TrialScheduler.STOP
    assert scheduler._num_stopped == 2
    # At its last epoch it ends like every trial.
    assert at_rung(scheduler, kept, 0.4, epoch=BUDGET.max_epochs) == TrialScheduler.STOP

    # Filled rungs stop a NaN, the kept trial's too.
    filled = scheduler_for(ranks_only=True)
    assert at_rung(filled, trial(filled, dict(start)), math.nan) == TrialScheduler.STOP

    # A scheduler pickled by a search from before the key (no `keep`) keeps nothing, and such a
    # search's description says it ran without it.
    old = scheduler_for()
    del old.keep, old.kept_trial
    assert at_rung(old, trial(old, {"width": 8, "lr": 0.003}), 0.9) == TrialScheduler.CONTINUE
    assert at_rung(old, trial(old, dict(start)), 0.4) == TrialScheduler.STOP
    described = Experiment().describe()
    del described["budget"]["keep_start_point"]
    assert Experiment.from_description(described).kept_start_point() is None
    assert Experiment().kept_start_point() == Experiment().start_point()
