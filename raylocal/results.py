"""Search-folder reader: what a search left on disk, finished, interrupted or still running.

The one reader of a search folder (the report, the benchmarks and the tests use it), built on
Ray Tune's own `ExperimentAnalysis`, which needs no running cluster: Tune's saved state says
which trials the search holds, their parameters and how each ended; each trial's reports come
as a pandas DataFrame.
"""

from __future__ import annotations

import json
import math
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from raylocal.config import OBJECTIVE
from raylocal.storage import Storage, open_storage

COMPLETED, STOPPED, RUNNING, ERROR = "completed", "stopped early (ASHA)", "running/interrupted", "error"
TIME_BUDGET = "ended by the time budget"
# raylocal's own file in a search folder: the settings and the experiment the search ran with.
MANIFEST = "raylocal_search.json"


class SearchFolderError(RuntimeError):
    """The folder holds no Tune search."""


Folder = str | Path | Storage  # a search folder: local, or a URI on object storage


def search_folder(folder: Folder) -> Storage:
    return folder if isinstance(folder, Storage) else open_storage(folder)


def read_manifest(experiment_dir: Folder) -> dict[str, Any]:
    """The settings and experiment raylocal keeps beside its trials; {} for a plain Tune folder."""
    folder = search_folder(experiment_dir)
    return json.loads(folder.read_text(MANIFEST)) if folder.is_file(MANIFEST) else {}


def write_manifest(experiment_dir: Folder, flags: dict[str, Any], experiment: dict[str, Any]) -> None:
    search_folder(experiment_dir).write_text(MANIFEST, json.dumps({"flags": flags, "experiment": experiment}, indent=2))


@dataclass(frozen=True)
class TrialRun:
    number: int  # creation order, from 1
    trial_id: str
    params: dict[str, Any]  # the searched hyperparameters
    status: str  # Tune's: TERMINATED, ERROR, RUNNING, PENDING, PAUSED
    history: pd.DataFrame  # one row per report
    path: str

    @property
    def last(self) -> dict[str, Any]:
        return self.history.iloc[-1].to_dict() if len(self.history) else {}

    @property
    def best(self) -> dict[str, Any]:
        """The report with the highest objective ({} before the first)."""
        if OBJECTIVE not in self.history or self.history[OBJECTIVE].isna().all():
            return {}
        return self.history.loc[self.history[OBJECTIVE].idxmax()].to_dict()

    def stop_reason(self, max_epochs: float) -> str:
        return stop_reason(self.status, self.last.get("epoch", 0.0), max_epochs, self.last.get("done") in (True, 1))


def stop_reason(status: str, last_epoch: float, max_epochs: float, decided: bool) -> str:
    """How a trial ended: Tune's status, and for a terminated one whether it ran its course.
    `decided`: its last report carries `done`, which Tune writes on the report a scheduler (ASHA)
    or stopper chose to stop at; a search's time budget stops running trials between reports,
    so their last report has none."""
    if status == "TERMINATED":
        return COMPLETED if last_epoch >= max_epochs else STOPPED if decided else TIME_BUDGET
    return ERROR if status == "ERROR" else RUNNING


def read_search(experiment_dir: Folder) -> list[TrialRun]:
    """Every trial of the search in `experiment_dir`, in creation order."""
    analysis = saved_state(experiment_dir)
    frames = analysis.trial_dataframes
    # Tune's saved state does not keep creation order; each trial's tag starts with its index.
    trials = sorted(analysis.trials, key=lambda trial: int(trial.experiment_tag.split("_")[0]))
    return [
        TrialRun(number=number, trial_id=trial.trial_id, params=dict(trial.config), status=trial.status,
                 history=frames.get(trial.trial_id, pd.DataFrame()), path=trial.path)
        for number, trial in enumerate(trials, 1)
    ]


def latest_checkpoints(experiment_dir: Folder) -> dict[str, str]:
    """Each unfinished trial's folder (its path in the search's filesystem) and the name of its
    latest checkpoint as Tune's saved state has it: what a resume restores the trial from (trials
    without a Tune checkpoint left out)."""
    return {trial.path: posixpath.basename(trial.checkpoint.path) for trial in saved_state(experiment_dir).trials
            if trial.status != "TERMINATED" and trial.checkpoint is not None}


def saved_state(experiment_dir: Folder):
    """Tune's `ExperimentAnalysis` of the folder: its newest saved state, as a resume reads it;
    on object storage too (it reads the state and the trials' results, not their checkpoints)."""
    from ray.tune import ExperimentAnalysis

    folder = search_folder(experiment_dir)
    try:
        return ExperimentAnalysis(folder.path, storage_filesystem=folder.fs)
    except (ValueError, FileNotFoundError) as error:
        raise SearchFolderError(f"{folder.uri} holds no Tune search: {str(error).splitlines()[0]}") from None


def all_reports(trials: list[TrialRun]) -> pd.DataFrame:
    """Every report of every trial, one table (the trial's id in `trial_id`)."""
    frames = [trial.history.assign(trial_id=trial.trial_id) for trial in trials if len(trial.history)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def longest_run(trials: list[TrialRun]) -> float:
    """The most epochs any trial reached: stands for a full run when the budget is not known."""
    epochs = [trial.last.get("epoch", 0.0) for trial in trials]
    return max((e for e in epochs if isinstance(e, int | float) and math.isfinite(e)), default=0.0)
