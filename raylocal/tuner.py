"""The search: a Ray Tune Tuner with Optuna's TPE sampler, ASHA, the loggers and the console table.

`make_tuner` builds a new Tuner for a plan, or restores the interrupted one from its folder.
"""

from __future__ import annotations

from raylocal.budget import TimeBudget
from raylocal.config import OBJECTIVE, ConfigError, optuna_space
from raylocal.plan import Plan
from raylocal.storage import Storage

SHOWN_METRICS = {OBJECTIVE: "val det IoU", "val_mean_iou": "val IoU", "val_accuracy": "val acc", "epoch": "epoch"}


def startup_trials(trials: int) -> int:
    """How many of the first trials TPE draws at random: a quarter of them, 2 to 10."""
    return max(2, min(10, trials // 4))


def make_sampler(trials: int, seed: int, startup: int | None = None):
    """TPE, informed by the first `startup_trials` drawn at random; the constant liar keeps
    concurrent trials from all being sampled at the same promising point."""
    import optuna

    return optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=startup or startup_trials(trials), multivariate=True, constant_liar=True
    )


def logger_callbacks(plan: Plan) -> list:
    """Loggers beyond Tune's defaults (CSV, JSON and, with tensorboardX installed, TensorBoard)."""
    if not plan.settings.mlflow_uri:
        return []
    try:
        import mlflow  # noqa: F401
        from ray.air.integrations.mlflow import MLflowLoggerCallback
    except ImportError:
        raise ConfigError("--mlflow-uri needs MLflow: pip install 'raylocal[mlflow]'") from None
    return [MLflowLoggerCallback(tracking_uri=plan.settings.mlflow_uri, experiment_name=plan.name, save_artifact=False)]


def search_algorithm(plan: Plan):
    """Optuna's TPE over the experiment's space, starting from the experiment's start point
    (None when nothing is searched)."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    space = optuna_space(plan.experiment.space)
    if not space:
        return None
    storage = optuna.storages.RDBStorage(plan.settings.optuna_storage) if plan.settings.optuna_storage else None
    sampler = make_sampler(plan.experiment.budget.trials, plan.settings.seed)
    return OptunaSearch(space=space, metric=OBJECTIVE, mode="max", sampler=sampler, study_name=plan.name,
                        storage=storage, points_to_evaluate=[plan.experiment.start_point()])


def recover_replaced_checkpoints(folder: Storage, log=print) -> None:
    """Give a trial's newest checkpoint the name of the one Tune's saved state restores it from,
    where that one is gone. Tune keeps a trial's best checkpoints and its latest; registering a
    newer one deletes the previous latest unless it is among the best, and a driver killed before
    its next save leaves a state naming the deleted folder: the trial's restore would fail on
    every retry ("does not exist on storage anymore"). The newer one holds the training since."""
    from raylocal.results import SearchFolderError, latest_checkpoints

    try:
        saved = latest_checkpoints(folder)
    except SearchFolderError:
        return  # nothing saved to repair; Tune's restore says what is missing
    for path, name in saved.items():
        trial = Storage(path, folder.fs, path)
        checkpoints = trial.folders("checkpoint_")
        newer = [other for other in checkpoints if other > name]
        if name in checkpoints or not newer:
            continue
        trial.move(newer[-1], name)
        log(f"resume: {trial.name}: its saved checkpoint {name} was deleted after Tune's last save; "
            f"continuing from {newer[-1]}, the newer one that replaced it")


def make_tuner(plan: Plan, trainable, layout, max_failures: int,
               time_budget_s: float | None = None, ranks_only: bool = False, log=print):
    """A new Tuner for the plan, or the interrupted one restored from its folder."""
    from ray import tune

    from raylocal.stopping import make_scheduler

    if plan.resume:
        recover_replaced_checkpoints(plan.folder, log)
        return tune.Tuner.restore(plan.folder.path, trainable, resume_unfinished=True, resume_errored=True,
                                  storage_filesystem=plan.folder.ray_filesystem)
    budget = plan.experiment.budget
    tune_config = tune.TuneConfig(
        metric=OBJECTIVE,
        mode="max",
        search_alg=search_algorithm(plan),
        scheduler=make_scheduler(budget, ranks_only, keep=plan.experiment.kept_start_point()),
        num_samples=budget.trials,
        max_concurrent_trials=layout.concurrent,
        time_budget_s=time_budget_s,
        # A fresh trial process imports torch again; reuse them (docs/decisions.md#inline-trials).
        # Not for TorchTrainer drivers: their fit() outlives Tune's 2 s reset window, and
        # the next trial on that actor would never start.
        reuse_actors=layout.backend == "inline",
    )
    run_config = tune.RunConfig(
        name=plan.name,
        storage_path=plan.folder.parent().path,
        storage_filesystem=plan.folder.ray_filesystem,
        progress_reporter=progress_reporter(plan),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=OBJECTIVE,
                                                checkpoint_score_order="max"),
        failure_config=tune.FailureConfig(max_failures=max_failures),
        callbacks=logger_callbacks(plan),
        verbose=0 if plan.settings.quiet else plan.settings.verbose,
    )
    return tune.Tuner(trainable, tune_config=tune_config, run_config=run_config)


def progress_reporter(plan: Plan):
    """Tune's status table with the searched hyperparameters and the metrics that matter. Not
    sorted by the metric: Ray 2.60's sort fails (None < None) once two finished trials never
    reported, which a time budget causes by stopping trials before their first report."""
    from ray import tune

    return tune.CLIReporter(metric_columns=SHOWN_METRICS, parameter_columns=[dim.name for dim in plan.experiment.space],
                            max_report_frequency=30, sort_by_metric=False)


def filled_rungs(plan: Plan, time_budget: TimeBudget | None) -> bool:
    """Whether ASHA promotes only from filled rungs: where the experiment asks for it and trials
    just rank configurations, since a final phase will train the winner."""
    room = time_budget is None or time_budget.leaves_final_phase()
    return plan.experiment.budget.filled_rungs and plan.final.enabled and room


def describe_search(plan: Plan, ranks_only: bool) -> str:
    budget = plan.experiment.budget
    return (f"search: {budget.trials} trials, up to {budget.max_epochs} epochs each, reporting "
            f"{budget.first_epoch_reports}x in the first epoch and {budget.reports_per_epoch}x per later epoch; "
            f"ASHA stops the worst after {budget.grace_period:g} epoch(s), reduction factor "
            f"{budget.reduction_factor}"
            + (f", promoting only from rungs {budget.reduction_factor} trials reached (filled_rungs; the final "
               "phase trains the winner)" if ranks_only else "")
            + ("; the start point is never stopped (keep_start_point)" if budget.keep_start_point else "")
            + f"; results in {plan.storage}/{plan.name}")
