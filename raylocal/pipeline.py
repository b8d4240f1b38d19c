"""The steps of one search, in order: layout, data, search, final training, export, report.

`run(settings)` is what `raylocal tune` and `raylocal.search(...)` both call.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from raylocal.budget import TimeBudget, first_rung_seconds, most_trials, training_speed
from raylocal.config import ConfigError, Hyperparameters
from raylocal.plan import Plan, check_destinations, plan_search, save_manifest
from raylocal.settings import Settings
from raylocal.storage import Storage, StorageError, one_line


def run(settings: Settings, log=print) -> dict[str, Any]:
    """One search, from settings to an exported model; returns the model card's summary."""
    from raylocal.cluster import connect, environment
    from raylocal.mnist import load_mnist

    started = time.time()
    plan = plan_search(settings)
    check_destinations(plan)
    # Before Ray starts: a missing or damaged data folder is one line, not one among Ray's. The
    # plan's settings: a resumed search reads the data it was started with.
    mnist = load_mnist(plan.settings.data_dir, verify=not plan.settings.unverified_data, log=log)
    # The legacy CLIReporter is the one that can be told which columns matter.
    with environment(RAY_AIR_NEW_OUTPUT=os.environ.get("RAY_AIR_NEW_OUTPUT", "0")):
        with connect(settings.address, quiet=settings.quiet, log=log):
            return run_search(plan, mnist, log=log, started=started)


def run_search(plan: Plan, mnist, log=print, started: float | None = None) -> dict[str, Any]:
    """Layout, data, search, final training, export, report: the steps of one command, in order."""
    from raylocal.final import run_final
    from raylocal.publish import export_best, summary_table
    from raylocal.resources import cluster_final_layout

    started = started or time.time()
    settings = plan.settings
    time_budget = (TimeBudget.for_command(plan.budget_minutes, started, plan.final.enabled, plan.search_share,
                                          plan.views) if plan.budget_minutes else None)
    data, trial_settings, results = run_trials(plan, mnist, time_budget, log)
    final = None
    if plan.final.enabled:
        final = run_final(results, data, trial_settings, plan.final, cluster_final_layout(settings), time_budget,
                          plan.folder.path, log=log, start_point=plan.experiment.kept_start_point())
    summary = export_best(results, data, trial_settings, plan, search_seconds=time.time() - started, final=final,
                          log=log)
    summary["search"]["trials_planned"] = plan.experiment.budget.trials
    summary["search"]["ended_by_time_budget"] = bool(time_budget) and len(results) < plan.experiment.budget.trials
    if plan.folder.remote:
        summary["export_uri"] = upload(plan.folder.child("best_model"), summary["export_dir"], "export", log)
    summary["report"] = publish_report(plan, log)
    log(summary_table(summary))
    return summary


def upload(destination: Storage, folder: str | Path, what: str, log=print) -> str:
    """A folder written and checked on this machine, copied whole to the search's storage."""
    try:
        destination.upload(folder)
    except OSError as error:
        raise StorageError(f"cannot upload the {what} to {destination.uri}: {one_line(error)}") from None
    log(f"{what}: uploaded to {destination.uri}")
    return destination.uri


def publish_report(plan: Plan, log=print) -> str:
    """The search's report in its folder; on object storage built here, then uploaded."""
    from raylocal.report import write_report

    if not plan.folder.remote:
        return str(write_report(plan.folder.local(), log=log))
    with tempfile.TemporaryDirectory(prefix="raylocal-report-") as folder:
        write_report(plan.folder, out_dir=folder, log=log)
        return upload(plan.folder.child("report"), folder, "report", log)


def run_trials(plan: Plan, mnist, time_budget: TimeBudget | None, log=print):
    """The data once, then the Tune search; (the data, the trials' settings, Tune's ResultGrid)."""
    from ray import tune

    from raylocal.data import build_search_data
    from raylocal.resources import cluster_layout
    from raylocal.trial import TrialSettings, run_trial
    from raylocal.tuner import describe_search, filled_rungs, make_tuner

    settings, experiment, budget = plan.settings, plan.experiment, plan.experiment.budget
    layout = cluster_layout(settings, log)
    if settings.quiet:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
    data = build_search_data(mnist, experiment.data, budget.max_epochs, settings.seed, log=log)
    trial_settings = TrialSettings(
        max_epochs=budget.max_epochs, first_epoch_reports=budget.first_epoch_reports,
        reports_per_epoch=budget.reports_per_epoch, layout=layout, storage_path=plan.folder.parent().path,
        storage_filesystem=plan.folder.ray_filesystem, experiment_name=plan.name, seed=settings.seed,
        fixed=asdict(experiment.fixed), report_logs=settings.verbose >= 3 and not settings.quiet,
    )
    trainable = tune.with_resources(tune.with_parameters(run_trial, data=data, settings=trial_settings),
                                    layout.trial_resources())
    search_seconds = time_budget.search_seconds() if time_budget else None
    if time_budget:
        log(time_budget.describe(search_seconds))
        if not plan.resume:
            warn_trials_cut(plan, search_seconds, layout, data.train_epochs[0].rows, data.val.rows, log)
    ranks_only = filled_rungs(plan, time_budget)
    tuner = make_tuner(plan, trainable, layout, trial_settings.max_failures, time_budget_s=search_seconds,
                       ranks_only=ranks_only, log=log)
    log(describe_search(plan, ranks_only))
    if not plan.resume:
        save_manifest(plan)
    return data, trial_settings, tuner.fit()


def warn_trials_cut(plan: Plan, search_seconds: float, layout, rows: int, val_rows: int, log=print) -> None:
    """Say before the search when its time cannot start every trial, and how to run them all.
    Measured on CPU workers only: a GPU trial's speed cannot be told from the driver."""
    budget = plan.experiment.budget
    if layout.device != "cpu":
        return
    params = Hyperparameters.from_dict(asdict(plan.experiment.fixed) | plan.experiment.start_point())
    speed = training_speed(params, layout.cpus_per_worker) * layout.workers
    least = first_rung_seconds(budget.grace_period, budget.first_epoch_reports, rows, val_rows, speed)
    fits = most_trials(search_seconds, layout.concurrent, least, plan.experiment.kept_start_point() is not None)
    if fits < budget.trials:
        log(f"budget: at most about {fits} of {budget.trials} trials fit in the search's {search_seconds / 60:.1f} min "
            f"on this hardware ({layout.concurrent} at a time, each at least {least:.0f} s to ASHA's first rung at "
            f"{speed:,.0f} canvases/s); to run all of them, give --time-budget 0 (no bound) or a larger one")


@dataclass(frozen=True)
class SearchResult:
    """What `search` hands back: the winner, its metrics, where the model and the search are."""

    best_config: dict[str, Any]  # every hyperparameter of the best trial, searched and fixed
    validation: dict[str, float]
    test: dict[str, float]
    export_dir: Path
    experiment_dir: str
    trials: Any  # a pandas DataFrame, one row per trial (as in the report's trials.csv)
    summary: dict[str, Any]  # all of the above and more, as in the export's model_card.json

    @classmethod
    def from_summary(cls, summary: dict[str, Any]) -> SearchResult:
        experiment_dir = summary["search"]["storage"]
        return cls(
            best_config=dict(summary["hyperparameters"]), validation=dict(summary["validation"]),
            test=dict(summary["test"]), export_dir=Path(summary["export_dir"]), experiment_dir=experiment_dir,
            trials=trials_table(experiment_dir, summary), summary=summary,
        )


def trials_table(experiment_dir: str, card: dict[str, Any]):
    """One row per trial: its searched values, how it ended, its best score; empty for object storage."""
    import pandas as pd

    from raylocal.report import load_trials

    if "://" in experiment_dir:
        return pd.DataFrame()
    trials, _ = load_trials(Path(experiment_dir), card)
    return pd.DataFrame([trial["record"] for trial in trials])


def search_settings(**values: Any) -> Settings:
    """`Settings` from keyword values, unknown names refused with the allowed ones."""
    known = [spec.name for spec in fields(Settings)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown}; allowed: {sorted(known)}")
    return Settings(**values)


def search(
    *,
    trials: int | None = None,
    max_epochs: int | None = None,
    experiment: str | Path | None = None,
    time_budget: float | None = None,
    search_share: float = Settings.search_share,
    seed: int = 0,
    smoke_test: bool = False,
    resume: str | bool = False,
    final_epochs: int | None = None,
    final_top_k: int = 1,
    final_seeds: int = 1,
    final_init: str = "checkpoint",
    final_lr_scale: float = Settings.final_lr_scale,
    no_final: bool = False,
    address: str | None = None,
    workers_per_trial: int = 1,
    cpus_per_worker: int = 1,
    trials_per_gpu: int | None = None,
    gpus_per_worker: float | None = None,
    backend: str = "auto",
    device: str = "auto",
    data_dir: str | Path | None = None,
    unverified_data: bool = False,
    name: str | None = None,
    storage: str | None = None,
    export_dir: str | Path | None = None,
    views: int = Settings.views,
    max_latency_ms: float | None = None,
    verbose: int = 1,
    quiet: bool = False,
    debug: bool = False,
    optuna_storage: str | None = None,
    mlflow_uri: str | None = None,
) -> SearchResult:
    """Search, train the winner and export it, as `raylocal tune` does; every argument is the flag of
    the same name (`raylocal tune --help` says what each does). Bad settings raise
    `raylocal.config.ConfigError` before any work starts.

    >>> result = raylocal.search(trials=20, data_dir="mnist/")
    >>> result.test["test_det_iou"], result.export_dir, result.trials.head()
    """
    settings = search_settings(**{key: value for key, value in locals().items()})
    return SearchResult.from_summary(run(settings))
