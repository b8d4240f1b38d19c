"""Search stage and entry point: `python -m raylocal.tune --trials 50`.

Starts (or joins) one Ray instance, synthesizes the data once with Ray Data, runs a Ray
Tune search with Optuna's TPE sampler and ASHA early stopping, maximizing detection-style
mean IoU on the validation split, trains the winner again on every worker for the rest of
the time budget (`raylocal.final`), then scores that model on the test split and exports it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from raylocal.config import OBJECTIVE, ConfigError, DataSettings, Experiment, load_experiment, optuna_space
from raylocal.budget import DEFAULT_BUDGET_MINUTES, SEARCH_SHARE, START_SECONDS, TimeBudget, finish_seconds
from raylocal.final import DEFAULT_FINAL_EPOCHS, FINAL_INITS, FINAL_LR_SCALE, MAX_FINAL_EPOCHS, FinalSettings
from raylocal.results import MANIFEST, write_manifest
from raylocal.resources import BACKENDS, DEVICES, TRIALS_PER_GPU
from raylocal.model import SHIFTS

SMOKE_DATA = DataSettings(train_digits=3000, test_digits=500, shard_size=1000)
SHOWN_METRICS = {OBJECTIVE: "val det IoU", "val_mean_iou": "val IoU", "val_accuracy": "val acc", "epoch": "epoch"}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raylocal-tune",
        description="Search hyperparameters of a digit localizer (MNIST on 75x75 canvases) with Ray Tune + Optuna, "
        "then export the best model.",
    )
    parser.add_argument("--trials", type=int, help="number of trials (default: the experiment's, 50)")
    parser.add_argument("--max-epochs", type=int, help="epochs of the longest trial (default: the experiment's)")
    parser.add_argument("--experiment", type=Path, help="TOML file with search space and budget (see experiments/)")
    parser.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train workers per trial (>1: DDP)")
    parser.add_argument("--cpus-per-worker", type=int, default=1)
    parser.add_argument("--trials-per-gpu", type=int, metavar="K",
                        help=f"one-worker trials sharing each GPU (default {TRIALS_PER_GPU}; each takes 1/K of a GPU)")
    parser.add_argument("--gpus-per-worker", type=float,
                        help="GPUs each worker holds (default: 1/K for one-worker trials, 1 for DDP workers, 0 without GPUs)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="auto: train inside the Tune trial for one worker, a TorchTrainer (DDP) for more")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="where workers compute: auto = CUDA when they hold GPUs; cpu even then (Ray's logical GPUs)")
    parser.add_argument("--name", help="experiment name (default: <experiment>-<timestamp>)")
    parser.add_argument("--storage", help="where trials and checkpoints go: local path or URI (default: ./raylocal_results)")
    parser.add_argument("--export-dir", type=Path, help="where the best model goes (default: <storage>/<name>/best_model)")
    parser.add_argument("--data-dir", type=Path, help="folder with the MNIST IDX files (else $RAYLOCAL_DATA_DIR, cache, download)")
    parser.add_argument("--unverified-data", action="store_true",
                        help="accept MNIST files whose SHA-256 differs from the official ones (e.g. test fixtures)")
    parser.add_argument("--optuna-storage", metavar="URL",
                        help="also keep the Optuna study in this storage (e.g. sqlite:///optuna.db) for optuna-dashboard")
    parser.add_argument("--mlflow-uri", metavar="URI",
                        help="also log every trial to MLflow at this tracking URI (e.g. sqlite:///mlflow.db; needs mlflow)")
    parser.add_argument("--time-budget", type=float, metavar="MINUTES",
                        help=f"bound on the whole command, search plus final training (default {DEFAULT_BUDGET_MINUTES:g}; "
                        "0: none; --smoke-test: none)")
    parser.add_argument("--search-share", type=float, default=SEARCH_SHARE, metavar="F",
                        help="with a time budget and a final phase, the search's share of the time left to train "
                        f"(default {SEARCH_SHARE:g}); the final phase gets the rest")
    parser.add_argument("--final-epochs", type=int, metavar="E",
                        help="epochs of the final training (default: as many as the time budget allows, at most "
                        f"{MAX_FINAL_EPOCHS}; {DEFAULT_FINAL_EPOCHS} without a budget)")
    parser.add_argument("--final-top-k", type=int, default=1, metavar="K",
                        help="re-train the K best configurations of the search and keep the best (default 1)")
    parser.add_argument("--final-seeds", type=int, default=1, metavar="S",
                        help="seeds per re-trained configuration; configurations compare by their mean (default 1)")
    parser.add_argument("--final-init", choices=FINAL_INITS, default="checkpoint",
                        help="where final training starts: the winning trial's best search checkpoint (default), "
                        "or a fresh initialization")
    parser.add_argument("--final-lr-scale", type=float, default=FINAL_LR_SCALE, metavar="F",
                        help="a final run from a search checkpoint peaks at the learning rate the trial's schedule "
                        "had reached there, and at least at F x the searched one "
                        f"(default {FINAL_LR_SCALE:g}: for a trial whose schedule annealed)")
    parser.add_argument("--no-final", action="store_true",
                        help="no final training: export the search's best checkpoint")
    parser.add_argument("--views", type=int, choices=range(1, len(SHIFTS) + 1), default=len(SHIFTS), metavar="V",
                        help="the exported model (and its test score) averages the network's answer over V copies "
                        "of the canvas: as it is, then moved one pixel right, left, down, up (default "
                        f"{len(SHIFTS)}: fewer test errors; 1: the network alone, {len(SHIFTS)}x faster to run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--address", help="join a running Ray cluster (auto or HOST:PORT) instead of starting one")
    parser.add_argument("--smoke-test", action="store_true", help="tiny data, 2 trials, 1 epoch: checks the whole pipeline")
    parser.add_argument("--resume", nargs="?", const=True, metavar="PATH",
                        help="continue an interrupted search: the one named by --name (and --storage), or at PATH")
    parser.add_argument("--verbose", type=int, choices=(0, 1, 2, 3), default=1,
                        help="Tune output: 0 silent, 1 status table (default), 2 + trial results, "
                             "3 + everything (Ray's lines per report too)")
    parser.add_argument("--quiet", action="store_true",
                        help="only raylocal's own lines and the final table: no Tune table, trial logs or progress bars")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


# The flags that define a search; a resumed search takes them from its manifest.
SEARCH_FLAGS = (
    "trials", "max_epochs", "experiment", "workers_per_trial", "cpus_per_worker", "gpus_per_worker", "trials_per_gpu",
    "backend", "device",
    "export_dir", "data_dir", "unverified_data", "seed", "smoke_test", "optuna_storage", "mlflow_uri",
    "time_budget", "search_share", "final_epochs", "final_top_k", "final_seeds", "final_init", "final_lr_scale",
    "no_final", "views",
)
PATH_FLAGS = ("experiment", "export_dir", "data_dir")
# What a search did before a flag existed, where the flag's default now does otherwise: a manifest
# written then, resumed, keeps it (final runs started from scratch before --final-init, from a
# checkpoint at the full learning rate before --final-lr-scale, the search took 45% before
# --search-share, and the export was the network alone before --views).
BEFORE_THE_FLAG = {"final_init": "scratch", "final_lr_scale": 1.0, "search_share": 0.45, "views": 1}


@dataclass(frozen=True)
class Plan:
    experiment: Experiment
    name: str
    storage: str
    export_dir: Path
    final: FinalSettings = field(default_factory=FinalSettings)
    budget_minutes: float | None = None
    search_share: float = SEARCH_SHARE
    views: int = 1  # --views: of the exported model
    resume: bool = False

    @property
    def experiment_dir(self) -> str:
        return f"{self.storage}/{self.name}"


def write_manifest(args: argparse.Namespace, plan: Plan) -> None:
    flags = {key: str(value) if isinstance(value, Path) else value for key in SEARCH_FLAGS
             if (value := getattr(args, key)) is not None}
    write_manifest(plan.experiment_dir, flags, plan.experiment.describe())


def resumed(args: argparse.Namespace) -> tuple[argparse.Namespace, Experiment]:
    """The flags and experiment of the search being resumed; different ones given now are an error."""
    if isinstance(args.resume, str):
        folder = Path(args.resume).expanduser().absolute()
    elif args.name:
        folder = Path(args.storage or "raylocal_results").expanduser().absolute() / args.name
    else:
        raise ConfigError("--resume needs the search's --name (and --storage if not the default), or its folder")
    if not (folder / MANIFEST).is_file():
        raise ConfigError(f"no raylocal search to resume at {folder} (it has no {MANIFEST})")
    manifest = json.loads((folder / MANIFEST).read_text())
    saved = manifest["flags"]
    defaults = get_args_parser().parse_args([])
    # Flags newer than the manifest take the value that means what the search ran with.
    kept = {key: saved.get(key, BEFORE_THE_FLAG.get(key, getattr(defaults, key))) for key in SEARCH_FLAGS}
    for key in SEARCH_FLAGS:
        given = getattr(args, key)
        if key != "experiment" and given != getattr(defaults, key) and str(given) != str(kept[key]):
            raise ConfigError(f"--{key.replace('_', '-')} {given} differs from the search being resumed "
                              f"({kept[key]}); a resumed search keeps its own settings")
    described = manifest["experiment"]
    if args.experiment and load_experiment(args.experiment).describe() | {"name": described.get("name")} != described:
        raise ConfigError(f"{args.experiment} is a different search space than the search being resumed")
    try:
        experiment = Experiment.from_description(described)
    except (KeyError, TypeError, ConfigError) as error:
        raise ConfigError(f"{folder / MANIFEST} is damaged: {error!r}") from None
    merged = vars(args) | kept
    merged |= {key: Path(merged[key]) for key in PATH_FLAGS if merged[key] is not None}
    merged |= {"name": folder.name, "storage": str(folder.parent)}
    return argparse.Namespace(**merged), experiment


def check_room_to_train(minutes: float | None, views: int) -> None:
    """A budget must outlast what the command keeps at its end and a trial's start-up, or the search
    would stop before any trial reported and the command fail after minutes of work."""
    finish = finish_seconds(views)
    least = finish + START_SECONDS
    if minutes and minutes * 60 <= least:
        raise ConfigError(f"--time-budget {minutes:g} min leaves no time to train: the command keeps "
                          f"{finish:g} s at its end to score the test split with {views} view(s) and "
                          f"export, and a trial takes about {START_SECONDS} s to start; give more than "
                          f"{least / 60:.1f} min, or fewer --views")


def build_plan(args: argparse.Namespace) -> Plan:
    experiment = load_experiment(args.experiment) if args.experiment else Experiment()
    if args.smoke_test:
        experiment = experiment.with_data(**asdict(SMOKE_DATA) | {key: getattr(experiment.data, key)
                                                                   for key in ("tight_boxes", "augment")})
        experiment = experiment.with_budget(
            trials=2, max_epochs=1, first_epoch_reports=2, reports_per_epoch=2, grace_period=0.5
        )
    experiment = experiment.with_budget(trials=args.trials, max_epochs=args.max_epochs)
    for flag in ("workers_per_trial", "cpus_per_worker", "trials_per_gpu"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.gpus_per_worker is not None and args.gpus_per_worker < 0:
        raise ConfigError(f"--gpus-per-worker must be >= 0, got {args.gpus_per_worker}")
    name = args.name or f"{experiment.name}-{datetime.now():%Y%m%d-%H%M%S}"
    storage = args.storage or str(Path("raylocal_results").absolute())
    if "://" not in storage:
        storage = str(Path(storage).expanduser().absolute())
    export_dir = args.export_dir or Path(storage if "://" not in storage else "raylocal_results") / name / "best_model"
    if args.time_budget is not None and args.time_budget < 0:
        raise ConfigError(f"--time-budget must be >= 0 minutes, got {args.time_budget:g}")
    budget = DEFAULT_BUDGET_MINUTES if args.time_budget is None and not args.smoke_test else args.time_budget
    check_room_to_train(budget, args.views)
    if not 0 < args.search_share < 1:
        raise ConfigError(f"--search-share must be between 0 and 1, got {args.search_share:g}")
    final_epochs = args.final_epochs if args.final_epochs is not None else (1 if args.smoke_test else None)
    final = FinalSettings(epochs=final_epochs, top_k=args.final_top_k,
                          seeds=args.final_seeds, enabled=not args.no_final, init=args.final_init,
                          lr_scale=args.final_lr_scale)
    return Plan(experiment, name, storage, export_dir.absolute(), final=final, budget_minutes=budget or None,
                search_share=args.search_share, views=args.views)


def check_destinations(plan: Plan) -> None:
    """Fail before the search, not after it, when its results could not be written; create nothing."""
    if plan.export_dir.exists() and any(plan.export_dir.iterdir()):
        raise ConfigError(f"export folder {plan.export_dir} already holds files; choose another --export-dir or --name")
    local = [Path(plan.experiment_dir)] if "://" not in plan.storage else []
    for folder in [*local, plan.export_dir.parent]:
        existing = next(parent for parent in (folder, *folder.parents) if parent.exists())
        try:
            if not existing.is_dir():
                raise NotADirectoryError(f"{existing} is not a folder")
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as error:
            raise ConfigError(f"cannot write to {folder}: {error}") from None


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


def logger_callbacks(args: argparse.Namespace, plan: Plan) -> list:
    """Loggers beyond Tune's defaults (CSV, JSON and, with tensorboardX installed, TensorBoard)."""
    if not args.mlflow_uri:
        return []
    try:
        import mlflow  # noqa: F401
        from ray.air.integrations.mlflow import MLflowLoggerCallback
    except ImportError:
        raise ConfigError("--mlflow-uri needs MLflow: pip install 'raylocal[mlflow]'") from None
    return [MLflowLoggerCallback(tracking_uri=args.mlflow_uri, experiment_name=plan.name, save_artifact=False)]


def search_algorithm(args: argparse.Namespace, plan: Plan):
    """Optuna's TPE over the experiment's space, starting from the experiment's start point
    (None when nothing is searched)."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    space = optuna_space(plan.experiment.space)
    if not space:
        return None
    storage = optuna.storages.RDBStorage(args.optuna_storage) if args.optuna_storage else None
    sampler = make_sampler(plan.experiment.budget.trials, args.seed)
    return OptunaSearch(space=space, metric=OBJECTIVE, mode="max", sampler=sampler, study_name=plan.name,
                        storage=storage, points_to_evaluate=[plan.experiment.start_point()])


def recover_replaced_checkpoints(experiment_dir: str, log=print) -> None:
    """Give a trial's newest checkpoint the name of the one Tune's saved state restores it from,
    where that one is gone. Tune keeps a trial's best checkpoints and its latest; registering a
    newer one deletes the previous latest unless it is among the best, and a driver killed before
    its next save (every 10 s or more) leaves a state naming the deleted folder: the trial's restore
    would fail on every retry ("does not exist on storage anymore"). The newer one holds the
    training since, and the trial continues from it. Local folders only."""
    from raylocal.results import SearchFolderError, latest_checkpoints

    if "://" in experiment_dir:
        return
    try:
        saved = latest_checkpoints(experiment_dir)
    except SearchFolderError:
        return  # nothing saved to repair; Tune's restore says what is missing
    for folder, name in saved.items():
        newer = sorted(path for path in folder.glob("checkpoint_*") if path.name > name)
        if (folder / name).exists() or not newer:
            continue
        newer[-1].rename(folder / name)
        log(f"resume: {folder.name}: its saved checkpoint {name} was deleted after Tune's last save; "
            f"continuing from {newer[-1].name}, the newer one that replaced it")


def make_tuner(args: argparse.Namespace, plan: Plan, trainable, layout, max_failures: int,
               time_budget_s: float | None = None, ranks_only: bool = False, log=print):
    """A new Tuner for the plan, or the interrupted one restored from its folder."""
    from ray import tune

    from raylocal.stopping import make_scheduler

    if plan.resume:
        recover_replaced_checkpoints(plan.experiment_dir, log)
        return tune.Tuner.restore(plan.experiment_dir, trainable, resume_unfinished=True, resume_errored=True)
    budget = plan.experiment.budget
    tune_config = tune.TuneConfig(
        metric=OBJECTIVE,
        mode="max",
        search_alg=search_algorithm(args, plan),
        scheduler=make_scheduler(budget, ranks_only, keep=plan.experiment.kept_start_point()),
        num_samples=budget.trials,
        max_concurrent_trials=layout.concurrent,
        time_budget_s=time_budget_s,
        # A fresh trial process costs ~4 s of torch import on a small machine; reuse them.
        # Not for TorchTrainer drivers: their fit() outlives Tune's 2 s reset window, and
        # the next trial on that actor would never start.
        reuse_actors=layout.backend == "inline",
    )
    run_config = tune.RunConfig(
        name=plan.name,
        storage_path=plan.storage,
        progress_reporter=progress_reporter(plan),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=OBJECTIVE,
                                                checkpoint_score_order="max"),
        failure_config=tune.FailureConfig(max_failures=max_failures),
        callbacks=logger_callbacks(args, plan),
        verbose=0 if args.quiet else args.verbose,
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


def run_search(args: argparse.Namespace, plan: Plan, log=print, started: float | None = None) -> dict[str, Any]:
    """Layout, data, search, final training, export, report: the steps of one command, in order."""
    from ray import tune

    from raylocal.publish import export_best, summary_table
    from raylocal.data import build_search_data
    from raylocal.final import run_final
    from raylocal.resources import cluster_final_layout, cluster_layout
    from raylocal.mnist import load_mnist
    from raylocal.report import write_report
    from raylocal.trial import TrialSettings, run_trial

    started = started or time.time()
    experiment, budget = plan.experiment, plan.experiment.budget
    time_budget = (TimeBudget.for_command(plan.budget_minutes, started, plan.final.enabled, plan.search_share,
                                          plan.views) if plan.budget_minutes else None)
    layout = cluster_layout(args, log)
    if args.quiet:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
    mnist = load_mnist(args.data_dir, verify=not args.unverified_data, log=log)
    data = build_search_data(mnist, experiment.data, budget.max_epochs, args.seed, log=log)
    settings = TrialSettings(
        max_epochs=budget.max_epochs, first_epoch_reports=budget.first_epoch_reports,
        reports_per_epoch=budget.reports_per_epoch, layout=layout, storage_path=plan.storage,
        experiment_name=plan.name, seed=args.seed, fixed=asdict(experiment.fixed),
        report_logs=args.verbose >= 3 and not args.quiet,
    )
    trainable = tune.with_resources(tune.with_parameters(run_trial, data=data, settings=settings),
                                    layout.trial_resources())
    search_seconds = time_budget.search_seconds() if time_budget else None
    if time_budget:
        log(time_budget.describe(search_seconds))
    ranks_only = filled_rungs(plan, time_budget)
    tuner = make_tuner(args, plan, trainable, layout, settings.max_failures, time_budget_s=search_seconds,
                       ranks_only=ranks_only, log=log)
    log(describe_search(plan, ranks_only))
    if not plan.resume:
        write_manifest(args, plan)
    results = tuner.fit()
    final = None
    if plan.final.enabled:
        final = run_final(results, data, settings, plan.final, cluster_final_layout(args), time_budget,
                          plan.experiment_dir, log=log, start_point=plan.experiment.kept_start_point())
    summary = export_best(results, data, settings, plan, search_seconds=time.time() - started, final=final, log=log)
    if "://" not in plan.storage:
        summary["report"] = str(write_report(Path(plan.storage) / plan.name, log=log))
    log(summary_table(summary))
    return summary


def main(args: argparse.Namespace) -> dict[str, Any]:
    from raylocal.cluster import connect, environment

    started = time.time()
    if args.resume:
        args, experiment = resumed(args)
        plan = build_plan(argparse.Namespace(**vars(args) | {"experiment": None}))
        plan = replace(plan, experiment=experiment, resume=True)
    else:
        plan = build_plan(args)
    check_destinations(plan)
    # The legacy CLIReporter is the one that can be told which columns matter.
    with environment(RAY_AIR_NEW_OUTPUT=os.environ.get("RAY_AIR_NEW_OUTPUT", "0")):
        with connect(args.address, quiet=args.quiet):
            return run_search(args, plan, started=started)


@dataclass(frozen=True)
class SearchResult:
    """What `search` hands back: the winner, its metrics, where the model and the search are."""

    best_config: dict[str, Any]  # every hyperparameter of the best trial, searched and fixed
    validation: dict[str, float]
    test: dict[str, float]
    export_dir: Path
    experiment_dir: str
    summary: dict[str, Any]  # all of the above and more, as in the export's model_card.json

    @classmethod
    def from_summary(cls, summary: dict[str, Any]) -> SearchResult:
        return cls(
            best_config=dict(summary["hyperparameters"]), validation=dict(summary["validation"]),
            test=dict(summary["test"]), export_dir=Path(summary["export_dir"]),
            experiment_dir=summary["search"]["storage"], summary=summary,
        )


def search(**settings: Any) -> SearchResult:
    """The Python entry point (notebooks, scripts): the command line's settings by their flag
    names with underscores, e.g. `search(trials=20, data_dir="mnist", workers_per_trial=2)`;
    flags without a value take True. Same checks, same search, same export as the command."""
    parser = get_args_parser()
    parser.exit_on_error = False
    known = sorted(vars(parser.parse_args([])))
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown}; allowed: {known}")
    argv = []
    for key, value in settings.items():
        if value is None or value is False:
            continue
        option = "--" + key.replace("_", "-")
        argv += [option] if value is True else [option, str(value)]
    try:
        args = parser.parse_args(argv)
    except argparse.ArgumentError as error:
        raise ConfigError(str(error)) from None
    return SearchResult.from_summary(main(args))


def cli(argv: list[str] | None = None) -> int:
    from raylocal.cli import run

    return run(get_args_parser(), main, user_errors(), argv)


def user_errors() -> tuple[type[Exception], ...]:
    from raylocal.export import ExportError
    from raylocal.mnist import IdxFormatError, MnistHashError, MnistNotFoundError

    return (ConfigError, ExportError, IdxFormatError, MnistHashError, MnistNotFoundError)


if __name__ == "__main__":
    sys.exit(cli())
