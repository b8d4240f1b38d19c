"""A search's plan: `Settings` resolved into the experiment, its name and where everything goes.

A new search takes its experiment from `--experiment` (or the defaults); a resumed one takes its
settings and experiment from the manifest it left beside its trials, and refuses different ones.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, fields
from functools import cached_property
from datetime import datetime
from pathlib import Path
from typing import Any

from raylocal.config import ConfigError, DataSettings, Experiment, load_experiment
from raylocal.final import FinalSettings
from raylocal.results import MANIFEST, read_manifest, write_manifest
from raylocal.settings import Settings, option
from raylocal.storage import Storage, StorageError, check_writable, one_line, open_storage

SMOKE_DATA = DataSettings(train_digits=3000, test_digits=500, shard_size=1000)
DEFAULT_STORAGE = "raylocal_results"
# The settings that define a search; a resumed search takes them from its manifest.
SEARCH_FLAGS = (
    "trials", "max_epochs", "experiment", "workers_per_trial", "cpus_per_worker", "gpus_per_worker", "trials_per_gpu",
    "backend", "device",
    "export_dir", "data_dir", "unverified_data", "seed", "smoke_test", "optuna_storage", "mlflow_uri",
    "time_budget", "search_share", "final_epochs", "final_top_k", "final_seeds", "final_init", "final_lr_scale",
    "no_final", "views", "max_latency_ms",
)
# What a search did before a flag existed, where the flag's default now does otherwise: a manifest
# written then, resumed, keeps it.
BEFORE_THE_FLAG = {"final_init": "scratch", "final_lr_scale": 1.0, "search_share": 0.45, "views": 1}


@dataclass(frozen=True)
class Plan:
    settings: Settings
    experiment: Experiment
    name: str
    storage: str  # a local folder or a URI, as given (made absolute)
    export_dir: Path  # the local copy of the export
    resume: bool = False

    @cached_property
    def folder(self) -> Storage:
        """The search's folder: trials, checkpoints, final runs, manifest, report, export."""
        return open_storage(self.storage).child(self.name)

    @property
    def experiment_dir(self) -> str:
        return self.folder.uri

    @property
    def final(self) -> FinalSettings:
        return self.settings.final_settings()

    @property
    def budget_minutes(self) -> float | None:
        return self.settings.budget_minutes

    @property
    def search_share(self) -> float:
        return self.settings.search_share

    @property
    def views(self) -> int:
        return self.settings.views

    @property
    def max_latency_ms(self) -> float | None:
        return self.settings.max_latency_ms


def search_experiment(settings: Settings) -> Experiment:
    """The experiment file (or the defaults), shrunk for a smoke test, with --trials and --max-epochs."""
    experiment = load_experiment(settings.experiment) if settings.experiment else Experiment()
    if settings.smoke_test:
        kept = {key: getattr(experiment.data, key) for key in ("tight_boxes", "augment")}
        experiment = experiment.with_data(**asdict(SMOKE_DATA) | kept)
        experiment = experiment.with_budget(
            trials=2, max_epochs=1, first_epoch_reports=2, reports_per_epoch=2, grace_period=0.5
        )
    return experiment.with_budget(trials=settings.trials, max_epochs=settings.max_epochs)


def build_plan(settings: Settings, experiment: Experiment | None = None, resume: bool = False) -> Plan:
    experiment = experiment or search_experiment(settings)
    name = settings.name or f"{experiment.name}-{datetime.now():%Y%m%d-%H%M%S}"
    storage = open_storage(settings.storage or DEFAULT_STORAGE)
    # On object storage the export is also kept on this machine, where the command runs.
    export_dir = settings.export_dir or Path(storage.local() or DEFAULT_STORAGE) / name / "best_model"
    return Plan(settings, experiment, name, storage.uri, export_dir.absolute(), resume=resume)


def plan_search(settings: Settings) -> Plan:
    """The plan of a new search, or of the interrupted one `--resume` names."""
    return resumed(settings) if settings.resume else build_plan(settings)


def resume_folder(settings: Settings) -> Storage:
    """The folder `--resume PATH|URI`, or `--resume --name NAME [--storage PATH|URI]`, names."""
    if isinstance(settings.resume, str):
        return open_storage(settings.resume)
    if settings.name:
        return open_storage(settings.storage or DEFAULT_STORAGE).child(settings.name)
    raise ConfigError("--resume needs the search's --name (and --storage if not the default), or its folder")


def resumed(settings: Settings) -> Plan:
    """The plan of the search being resumed, with its own settings; different ones given now are an error."""
    folder = resume_folder(settings)
    try:
        manifest = read_manifest(folder)
    except OSError as error:
        raise StorageError(f"cannot read the search at {folder.uri}: {one_line(error)}") from None
    if not manifest:
        raise ConfigError(f"no raylocal search to resume at {folder.uri} (it has no {MANIFEST})")
    kept = kept_settings(settings, manifest["flags"])
    described = manifest["experiment"]
    if settings.experiment and load_experiment(settings.experiment).describe() | {"name": described.get("name")} \
            != described:
        raise ConfigError(f"{settings.experiment} is a different search space than the search being resumed")
    try:
        experiment = Experiment.from_description(described)
    except (KeyError, TypeError, ConfigError) as error:
        raise ConfigError(f"{folder.child(MANIFEST).uri} is damaged: {error!r}") from None
    merged = settings.with_changes(**kept, experiment=None, name=folder.name, storage=folder.parent().uri)
    return build_plan(merged, experiment, resume=True)


def kept_settings(settings: Settings, saved: dict[str, Any]) -> dict[str, Any]:
    """The search's own values of `SEARCH_FLAGS`: a setting newer than the manifest takes the value
    that means what the search ran with. A value given now that differs is refused."""
    defaults = {spec.name: spec.default for spec in fields(Settings)}
    kept = {key: saved.get(key, BEFORE_THE_FLAG.get(key, defaults[key])) for key in SEARCH_FLAGS}
    for key in SEARCH_FLAGS:
        given = getattr(settings, key)
        if key != "experiment" and given != defaults[key] and str(given) != str(kept[key]):
            raise ConfigError(f"{option(key)} {given} differs from the search being resumed "
                              f"({kept[key]}); a resumed search keeps its own settings")
    kept.pop("experiment")
    return kept


def save_manifest(plan: Plan) -> None:
    """The settings that define the search, beside its trials, for `--resume` and the report."""
    flags = {key: str(value) if isinstance(value, Path) else value for key in SEARCH_FLAGS
             if (value := getattr(plan.settings, key)) is not None}
    write_manifest(plan.folder, flags, plan.experiment.describe())


def check_destinations(plan: Plan) -> None:
    """Fail before the search, not after it, when its results could not be written; create nothing."""
    if plan.export_dir.exists() and any(plan.export_dir.iterdir()):
        raise ConfigError(f"export folder {plan.export_dir} already holds files; choose another --export-dir or --name")
    check_writable(plan.folder)
    local = [Path(plan.experiment_dir)] if not plan.folder.remote else []
    for folder in [*local, plan.export_dir.parent]:
        existing = next(parent for parent in (folder, *folder.parents) if parent.exists())
        try:
            if not existing.is_dir():
                raise NotADirectoryError(f"{existing} is not a folder")
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as error:
            raise ConfigError(f"cannot write to {folder}: {error}") from None
