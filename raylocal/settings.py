"""One settings object for a search: the command line is generated from it, `raylocal.search()` builds it.

`Settings` holds every flag of `raylocal tune`, with its default, help, metavar and group, and
checks every value once, when it is built; errors name the flag. Nothing here imports torch or
Ray, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import os
import typing
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from raylocal.budget import DEFAULT_BUDGET_MINUTES, SEARCH_SHARE, START_SECONDS, finish_seconds
from raylocal.config import SHIFTS, ConfigError
from raylocal.final import DEFAULT_FINAL_EPOCHS, FINAL_INITS, FINAL_LR_SCALE, MAX_FINAL_EPOCHS, FinalSettings
from raylocal.resources import BACKENDS, DEVICES, TRIALS_PER_GPU, check_resource_flags

GROUPS = {
    "search": "what is searched and for how long",
    "final training": "the winner trained on every worker after the search",
    "resources": "how trials and the final run use the cluster",
    "data": "where MNIST comes from",
    "output": "where results go and what the console shows",
    "tracking": "also log to these tools",
}


def flag(default: Any, group: str, help: str, metavar: str | None = None, **argparse_options: Any):
    """A settings field that is also a command-line flag."""
    return field(default=default, metadata={"group": group, "help": help, "metavar": metavar, **argparse_options})


@dataclass(frozen=True)
class Settings:
    """Every setting of one search, by the flag's name with underscores (`--max-epochs`: `max_epochs`)."""

    # search
    trials: int | None = flag(None, "search", "number of trials (default: the experiment's, 50)", "N")
    max_epochs: int | None = flag(None, "search", "epochs of the longest trial (default: the experiment's)", "E")
    experiment: Path | None = flag(None, "search", "TOML file with search space and budget (see experiments/)", "TOML")
    time_budget: float | None = flag(
        None, "search", f"bound on the whole command, search plus final training (default {DEFAULT_BUDGET_MINUTES:g}; "
        "0: none; --smoke-test: none)", "MINUTES")
    search_share: float = flag(SEARCH_SHARE, "search", "with a time budget, the search's share of the time left to "
                               f"train (default {SEARCH_SHARE:g}); the final phase gets the rest", "F")
    seed: int = flag(0, "search", "seed of the data's placement, the sampler and the training (default 0)", "S")
    smoke_test: bool = flag(False, "search", "tiny data, 2 trials, 1 epoch: checks the whole pipeline in a minute")
    resume: str | bool = flag(False, "search", "continue an interrupted search: the one named by --name (and "
                              "--storage), or the one at PATH", "PATH", nargs="?", const=True)
    # final training
    final_epochs: int | None = flag(None, "final training", "epochs of the final run (default: as many as the time "
                                    f"budget allows, at most {MAX_FINAL_EPOCHS}; {DEFAULT_FINAL_EPOCHS} without one)",
                                    "E")
    final_top_k: int = flag(1, "final training", "re-train the K best configurations, keep the best (default 1)", "K")
    final_seeds: int = flag(1, "final training", "seeds per re-trained configuration, compared by mean (default 1)",
                            "S")
    final_init: str = flag("checkpoint", "final training", "start from the winner's best search checkpoint "
                           "(default) or from scratch", "INIT", choices=FINAL_INITS)
    final_lr_scale: float = flag(FINAL_LR_SCALE, "final training", "least peak learning rate of a run from a "
                                 f"checkpoint, x the searched one (default {FINAL_LR_SCALE:g})", "F")
    no_final: bool = flag(False, "final training", "no final training: export the search's best checkpoint")
    # resources
    address: str | None = flag(None, "resources", "join a running Ray cluster (auto or HOST:PORT) instead of "
                               "starting one", "ADDRESS")
    workers_per_trial: int = flag(1, "resources", "Ray Train workers per trial (default 1; more: DDP)", "W")
    cpus_per_worker: int = flag(1, "resources", "CPUs each worker holds (default 1)", "C")
    trials_per_gpu: int | None = flag(None, "resources", f"one-worker trials sharing each GPU (default "
                                      f"{TRIALS_PER_GPU}; each holds 1/K of a GPU)", "K")
    gpus_per_worker: float | None = flag(None, "resources", "GPUs each worker holds (default: 1/K for one-worker "
                                         "trials, 1 for DDP workers, 0 without GPUs)", "G")
    backend: str = flag("auto", "resources", "auto: inline for one worker per trial, a TorchTrainer (DDP) for more",
                        "BACKEND", choices=BACKENDS)
    device: str = flag("auto", "resources", "where workers compute: auto is CUDA when they hold GPUs", "DEVICE",
                       choices=DEVICES)
    # data
    data_dir: Path | None = flag(None, "data", "folder with the MNIST IDX files (else $RAYLOCAL_DATA_DIR, the "
                                 "cache, a download)", "DIR")
    unverified_data: bool = flag(False, "data", "accept MNIST files whose SHA-256 differs from the official ones")
    # output
    name: str | None = flag(None, "output", "experiment name (default: <experiment>-<timestamp>)", "NAME")
    storage: str | None = flag(None, "output", "where trials and checkpoints go: a folder or URI "
                               "(default: ./raylocal_results)", "PATH")
    export_dir: Path | None = flag(None, "output", "where the model goes (default: <storage>/<name>/best_model)", "DIR")
    views: int = flag(len(SHIFTS), "output", f"the exported model averages its answer over V shifted copies of the "
                      f"canvas (1 to {len(SHIFTS)}, default {len(SHIFTS)})", "V")
    max_latency_ms: float | None = flag(None, "output", "export the most accurate option at most MS per canvas at "
                                        "batch 1 on this machine: the views, and among the final runs the "
                                        "configuration; if none is that fast, export nothing", "MS")
    verbose: int = flag(1, "output", "Tune's output: 0 silent, 1 status table (default), 2 + trial results, "
                        "3 + Ray's lines per report", "LEVEL", choices=(0, 1, 2, 3))
    quiet: bool = flag(False, "output", "only raylocal's own lines and the final table")
    debug: bool = flag(False, "output", "show tracebacks of errors")
    # tracking
    optuna_storage: str | None = flag(None, "tracking", "also keep the Optuna study here (e.g. sqlite:///optuna.db) "
                                      "for optuna-dashboard", "URL")
    mlflow_uri: str | None = flag(None, "tracking", "also log every trial to MLflow at this tracking URI "
                                  "(needs mlflow)", "URI")

    def __post_init__(self) -> None:
        for key in ("experiment", "data_dir", "export_dir"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, key, Path(value))
        for key in ("storage", "resume"):  # a folder given as a Path
            if isinstance(getattr(self, key), os.PathLike):
                object.__setattr__(self, key, os.fspath(getattr(self, key)))
        for spec in fields(self):
            check_type(spec.name, getattr(self, spec.name), spec.type)
        self.check()

    def check(self) -> None:
        """Every value on its own and with the others; the cluster's resources are checked when known."""
        for key in ("trials", "max_epochs"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"{option(key)} must be >= 1, got {value}")
        self.final_settings()
        check_resource_flags(self.workers_per_trial, self.cpus_per_worker, self.gpus_per_worker,
                             self.trials_per_gpu, self.backend, self.device)
        for key in ("backend", "device", "verbose"):
            choices = field_spec(key).metadata["choices"]
            if getattr(self, key) not in choices:
                raise ConfigError(f"{option(key)} must be one of {tuple(choices)}, got {getattr(self, key)!r}")
        if self.time_budget is not None and self.time_budget < 0:
            raise ConfigError(f"--time-budget must be >= 0 minutes, got {self.time_budget:g}")
        if not 0 < self.search_share < 1:
            raise ConfigError(f"--search-share must be between 0 and 1, got {self.search_share:g}")
        if self.max_latency_ms is not None and self.max_latency_ms <= 0:
            raise ConfigError(f"--max-latency-ms must be > 0, got {self.max_latency_ms:g}")
        if not 1 <= self.views <= len(SHIFTS):
            raise ConfigError(f"--views must be 1 to {len(SHIFTS)}, got {self.views}")
        check_room_to_train(self.budget_minutes, self.views)

    def final_settings(self) -> FinalSettings:
        """The final phase's settings (checked there); a smoke test trains one final epoch."""
        epochs = self.final_epochs if self.final_epochs is not None else (1 if self.smoke_test else None)
        return FinalSettings(epochs=epochs, top_k=self.final_top_k, seeds=self.final_seeds, enabled=not self.no_final,
                             init=self.final_init, lr_scale=self.final_lr_scale)

    @property
    def budget_minutes(self) -> float | None:
        """The time budget in force: the default unless given, none for a smoke test or 0."""
        if self.time_budget is None:
            return None if self.smoke_test else DEFAULT_BUDGET_MINUTES
        return self.time_budget or None

    def given(self) -> dict[str, Any]:
        """The settings that differ from their defaults."""
        return {spec.name: getattr(self, spec.name) for spec in fields(self)
                if getattr(self, spec.name) != spec.default}

    def with_changes(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        return cls(**{spec.name: getattr(args, spec.name) for spec in fields(cls)})


def option(key: str) -> str:
    return "--" + key.replace("_", "-")


def field_spec(key: str):
    return next(spec for spec in fields(Settings) if spec.name == key)


def kinds(hint: Any) -> tuple[type, ...]:
    """The types a field's annotation allows (`int | None`: int and NoneType)."""
    hint = eval(hint, vars(typing), {"Path": Path}) if isinstance(hint, str) else hint  # noqa: S307 - our own annotations
    return typing.get_args(hint) or (hint,)


def check_type(key: str, value: Any, hint: Any) -> None:
    """A Python caller's wrong type named by its flag, rather than a TypeError deep in the search."""
    allowed = kinds(hint)
    if isinstance(value, bool) and bool not in allowed:
        raise ConfigError(f"{option(key)}={value!r} must be of type {allowed[0].__name__}")
    if isinstance(value, allowed) or (float in allowed and isinstance(value, int)):
        return
    names = " or ".join("None" if kind is type(None) else kind.__name__ for kind in allowed)
    raise ConfigError(f"{option(key)}={value!r} must be of type {names}")


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


def add_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """One flag per `Settings` field, in its group, with its help and metavar."""
    groups = {name: parser.add_argument_group(name, about) for name, about in GROUPS.items()}
    for spec in fields(Settings):
        meta = dict(spec.metadata)
        group, help_text, metavar = meta.pop("group"), meta.pop("help"), meta.pop("metavar")
        allowed = [kind for kind in kinds(spec.type) if kind is not type(None)]
        if allowed == [bool]:
            groups[group].add_argument(option(spec.name), action="store_true", help=help_text)
            continue
        # A flag with choices shows them ({auto,inline,ray-train}) instead of a metavar.
        metavar = None if "choices" in meta else metavar
        groups[group].add_argument(option(spec.name), type=allowed[0], default=spec.default, metavar=metavar,
                                   help=help_text, **meta)
    return parser


def defaults() -> dict[str, Any]:
    return {spec.name: spec.default for spec in fields(Settings) if spec.default is not MISSING}
