"""Early-stopping stage of the search: ASHA over epochs that keeps its rungs across a resume, and,
as an option, promotes only from rungs that filled.

Resume: Ray 2.60 does not save a scheduler with the experiment (`Tuner.restore` unpickles the one
the search started with, its rungs empty). Each trial a resumed search adds back is replayed from
its saved results into the rungs, so stopping decisions go on as before the interruption.

Filled rungs (`budget.filled_rungs`, used only when a final phase trains the winner, so trials just
rank): plain asynchronous ASHA promotes a trial that reaches an empty rung, and with 2 trials at
once the first two ran all their rungs and held both cores for most of a short search. With
filled rungs a trial goes past a rung only as the top 1/rf of at least rf trials there; the first
ones to arrive stop, and later ones compete with their results. The search then compares many
more configurations, but all at the early rungs, where a high learning rate and a low box-loss
weight look best, and the final models were worse; so it is off by default
(docs/decisions.md#filled-rungs-off).

The start point (`budget.keep_start_point`, on by default): the search's first trial is the
configuration a user would train without a search, and the final phase continues the winner's
checkpoint. ASHA records its results like any other trial's (they set the rungs' cutoffs) but never
stops it, so it trains all its epochs, and the final phase can compare any challenger with it at
equal epochs (`raylocal.final.candidates`) instead of with a start point that a faster trial,
barely ahead at a rung, had cut (docs/decisions.md#start-point-and-equal-epoch-pick). It is kept
with `--no-final` too, where the export is the best checkpoint anywhere: that is then at least the
start point trained all its epochs. The price is one trial slot held for the whole search.

Built on Ray 2.60's ASHA bracket (Ray is pinned; `tests/test_stopping.py` checks the decisions).
"""

from __future__ import annotations

import json
import logging
import math
import posixpath

from ray.tune.result import EXPR_RESULT_FILE
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.schedulers.async_hyperband import _Bracket

from raylocal.config import Budget

logger = logging.getLogger(__name__)


class FilledRungBracket(_Bracket):
    """Ray's ASHA bracket, whose cutoff stops a trial that finds fewer than `min_others` results
    at its rung (its own result is recorded all the same); a trial scoring NaN stops."""

    def __init__(self, *args, min_others: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.min_others = min_others

    def cutoff(self, recorded):
        if sum(not math.isnan(value) for value in recorded.values()) < self.min_others:
            return math.inf
        return super().cutoff(recorded)

    def on_result(self, trial, cur_iter, cur_rew) -> str:
        action = super().on_result(trial, cur_iter, cur_rew)
        return TrialScheduler.STOP if cur_rew is not None and math.isnan(cur_rew) else action

    def debug_str(self) -> str:
        """Tune's status line: each rung's cutoff, or how many of the results it waits for."""
        def shown(recorded) -> str:
            cutoff = self.cutoff(recorded)
            return f"{len(recorded)}/{self.min_others + 1} trials" if cutoff == math.inf else f"{cutoff:.4f}"

        return "Bracket: " + " | ".join(f"epoch {milestone:g}: {shown(recorded)}" for milestone, recorded in self._rungs)


class ResumableASHA(ASHAScheduler):
    """ASHA whose rungs are rebuilt, when a search resumes, from the results its trials saved.
    `min_others` > 0: promote only from rungs that filled (`FilledRungBracket`). `keep`: the
    searched values of a configuration whose first trial ASHA never stops (a sampler may draw
    the same values again later: those trials are stopped like any other)."""

    def __init__(self, *, min_others: int = 0, keep: dict | None = None, time_attr: str, max_t: float,
                 grace_period: float, reduction_factor: int) -> None:
        super().__init__(time_attr=time_attr, max_t=max_t, grace_period=grace_period,
                         reduction_factor=reduction_factor)
        if min_others:
            self._brackets = [FilledRungBracket(grace_period, max_t, reduction_factor, 0, min_others=min_others)]
        self.keep = keep or None
        self.kept_trial: str | None = None

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        # getattr: a scheduler pickled by a search from before `keep` existed has neither attribute.
        if getattr(self, "kept_trial", None) is None and is_config(trial.config, getattr(self, "keep", None)):
            self.kept_trial = trial.trial_id
        if self._time_attr not in trial.run_metadata.last_result:
            return  # a new trial: nothing to replay
        bracket = self._trial_info[trial.trial_id]
        for result in saved_results(trial):
            if self._time_attr in result and result.get(self._metric) is not None:
                bracket.on_result(trial, result[self._time_attr], self._metric_op * result[self._metric])

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        """ASHA's decision, except that the kept trial goes on until its last epoch (its result
        recorded at the rung all the same); a NaN, which filled rungs stop, stops it too."""
        action = super().on_trial_result(tune_controller, trial, result)
        score = result.get(self._metric)
        kept = (action == TrialScheduler.STOP and trial.trial_id == getattr(self, "kept_trial", None)
                and result.get(self._time_attr, 0) < self._max_t and score is not None and not math.isnan(score))
        if kept:
            self._num_stopped -= 1
            logger.info("ASHA would stop the start point (trial %s) at epoch %g: it trains on (keep_start_point)",
                        trial.trial_id, result[self._time_attr])
            return TrialScheduler.CONTINUE
        return action


def is_config(config: dict, searched: dict | None) -> bool:
    """Whether a trial's config holds these searched values (None: no configuration is)."""
    return bool(searched) and all(config.get(key) == value for key, value in searched.items())


def saved_results(trial) -> list[dict]:
    """The results a trial wrote (Tune's result.json in its folder, local or remote); none if it has none."""
    storage = trial.storage
    path = posixpath.join(storage.trial_fs_path, EXPR_RESULT_FILE)
    try:
        with storage.storage_filesystem.open_input_stream(path) as stream:
            lines = stream.readall().decode().splitlines()
    except (FileNotFoundError, OSError):
        return []
    results = []
    for line in lines:
        try:
            results.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # blank, or the last line of a trial killed while writing it
    return results


def make_scheduler(budget: Budget, ranks_only: bool, keep: dict | None = None) -> ASHAScheduler:
    """ASHA counting in epochs (reports are denser in the first epoch than later). `ranks_only`:
    promote only from rungs that filled; `keep`: the configuration never stopped
    (`Experiment.kept_start_point()`; the module's docstring)."""
    return ResumableASHA(min_others=budget.reduction_factor - 1 if ranks_only else 0, keep=keep, time_attr="epoch",
                         max_t=budget.max_epochs, grace_period=budget.grace_period,
                         reduction_factor=budget.reduction_factor)
