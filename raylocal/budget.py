"""The time budget: how a bound on the whole command is split between the search and the final phase.

Pure arithmetic on wall-clock time; no torch, no Ray, so the command line can show its defaults.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

# Seconds a final run spends before its first step (Train controller, worker processes importing
# torch, the process group, the first shards) and the command after the last one (test scoring,
# export with its checks, report, Ray's shutdown); both sized on 2 cores on a slow day
# (docs/decisions.md#time-budget-fixed-costs).
START_SECONDS = 40
FINISH_SECONDS = 40
# What each view beyond the first (`model.ShiftAveraged`) adds to the finish: one more pass over
# the test canvases, as long as a slow day's single pass (docs/decisions.md#time-budget-fixed-costs).
VIEW_SECONDS = 17
# With views, the model card's latency also needs a one-view copy exported and timed.
ONE_VIEW_COPY_SECONDS = 15
# The search's share of the time a budget leaves to train (`--search-share`); the final phase
# gets the rest. On 2 cores the search's winner has always been the start point, so a smaller share
# buys epochs of it (docs/decisions.md#search-share).
SEARCH_SHARE = 0.2
# The default command on 2 CPU cores, search and final training, ends within 20 minutes.
DEFAULT_BUDGET_MINUTES = 19.0


def finish_seconds(views: int) -> float:
    """What a time budget keeps for the end of the command when the test split is scored with `views`."""
    return FINISH_SECONDS + (views - 1) * VIEW_SECONDS + (ONE_VIEW_COPY_SECONDS if views > 1 else 0)


@dataclass(frozen=True)
class TimeBudget:
    """A bound on the whole command, counted from `started` (time.time(), so that Ray Train's
    worker processes read the same clock)."""

    seconds: float
    started: float
    final: bool = True  # False: no final phase, the search may use all of it
    share: float = SEARCH_SHARE  # the search's share of the time left to train
    finish: float = FINISH_SECONDS  # kept at the end to score and export (`finish_seconds`)

    @property
    def deadline(self) -> float:
        """When training must have ended, leaving time to score and export."""
        return self.started + self.seconds - self.finish

    def search_seconds(self) -> float:
        """The search's share of the time that can still train: what is left before the deadline
        less the final run's start-up, so that fixed costs (Ray, the data, Train's start-up) are
        not taken from the final phase alone, which would starve it in small budgets. At least a
        second: Tune reads a time budget of 0 as none at all."""
        left = self.deadline - time.time()
        if self.search_takes_all(left):
            return max(1.0, left)
        return self.share * (left - START_SECONDS)

    def leaves_final_phase(self) -> bool:
        """Whether, from now, there is room for a final phase after the search's share."""
        return not self.search_takes_all(self.deadline - time.time())

    def search_takes_all(self, left: float) -> bool:
        """Without a final phase, or with no room for a final epoch after a search of any length."""
        return not self.final or left - START_SECONDS <= START_SECONDS

    @classmethod
    def for_command(cls, minutes: float, started: float, final: bool, share: float = SEARCH_SHARE,
                    views: int = 1) -> TimeBudget:
        return cls(minutes * 60, started, final, share, finish_seconds(views))

    def describe(self, search_seconds: float) -> str:
        minutes = self.seconds / 60
        takes_all = not self.leaves_final_phase()
        no_room = " (no room for a final phase)" if self.final else ""
        rest = (f"then {self.finish:g} s for scoring and export{no_room}" if takes_all
                else f"the final phase gets what is left less {self.finish:g} s for scoring and export")
        share = "" if takes_all else f" ({self.share:.0%} of the time left to train)"
        return (f"time budget: {minutes:g} min for the whole command: the search stops starting and running trials "
                f"{search_seconds / 60:.1f} min from now{share}, {rest}")


def first_rung_seconds(grace_epochs: float, first_epoch_reports: int, rows: int, val_rows: int,
                       canvases_per_s: float) -> float:
    """The least a trial costs: training to ASHA's first rung and scoring the validation split at
    each report until then (scoring a canvas costs about a third of training on it)."""
    reports = max(1, round(grace_epochs * first_epoch_reports))
    return (grace_epochs * rows + reports * val_rows / 3) / canvases_per_s


def most_trials(search_seconds: float, concurrent: int, least_trial_seconds: float, keeps_start_point: bool) -> int:
    """At most how many trials start before the search's time is up: every trial but a kept start
    point (which holds one slot throughout) stopped at its first rung."""
    slots = concurrent - 1 if keeps_start_point and concurrent > 1 else concurrent
    started = 1 if keeps_start_point and concurrent > 1 else 0
    return started + slots * math.ceil(search_seconds / max(least_trial_seconds, 1e-9))


def training_speed(params, threads: int, batches: int = 4) -> float:
    """Canvases per second one CPU worker trains `params`' model at, from a few steps on random
    canvases: what the search's trials will roughly run at on this machine."""
    import numpy as np
    import torch

    from raylocal.engine import make_optimizer, train_steps
    from raylocal.model import build_model
    from raylocal.synthesis import synthesize

    device, saved = torch.device("cpu"), torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = build_model(params)
        optimizer, scheduler = make_optimizer(model, params, 2 * batches + 2, 1)
        rows = batches * params.batch_size

        def canvases(count: int):
            rng = np.random.default_rng(0)
            images, boxes = synthesize(rng.integers(0, 256, (count, 28, 28), dtype=np.uint8), rng)
            return torch.from_numpy(images), torch.from_numpy(boxes), torch.from_numpy(rng.integers(0, 10, count))

        train_steps(model, optimizer, scheduler, canvases(params.batch_size), params, device)  # warm-up
        started = time.perf_counter()
        train_steps(model, optimizer, scheduler, canvases(rows), params, device)
        return rows / (time.perf_counter() - started)
    finally:
        torch.set_num_threads(saved)
