"""What every benchmark script here shares: its setup line, the data, one local Ray instance, and
the plain-Optuna search that raylocal is measured against."""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict

import numpy as np

from raylocal import cluster
from raylocal.config import OBJECTIVE, Experiment
from raylocal.mnist import Mnist, load_mnist
from raylocal.synthesis import split_plan, synthesize_split


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data-dir", help="MNIST IDX files (else $RAYLOCAL_DATA_DIR, cache, download)")
    parser.add_argument("--unverified-data", action="store_true", help="accept MNIST files with other hashes (test fixtures)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def data_flags(args: argparse.Namespace) -> list[str]:
    """The data flags of this benchmark, for the `raylocal.tune` command it runs."""
    return (["--data-dir", args.data_dir] if args.data_dir else []) + (["--unverified-data"] if args.unverified_data else [])


def print_setup(name: str, **settings) -> None:
    import torch

    versions = f"torch {torch.__version__}"
    # The version from the package's metadata: importing Ray before `local_ray` starts it would
    # lose the loopback switch (raylocal.cluster refuses such a start).
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        versions += f", ray {importlib.metadata.version('ray')}"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(f"# {name}: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), {device}, {versions}")
    print("# settings: " + ", ".join(f"{key}={value}" for key, value in settings.items()))


def load_digits(args: argparse.Namespace, quiet: bool = False) -> Mnist:
    log = (lambda line: None) if quiet else (lambda line: print(f"# {line}"))
    return load_mnist(args.data_dir, verify=not args.unverified_data, log=log)


def train_split(mnist: Mnist, rows: int, seed: int) -> dict[str, np.ndarray]:
    """The first `rows` canvases of training epoch 0, as the search would train on them."""
    plan = split_plan(len(mnist.train_images), len(mnist.test_images))
    columns = synthesize_split(mnist.train_images, mnist.train_labels, plan, seed=seed, split="train", epoch=0, stop=rows)
    return {key: columns[key] for key in ("image", "box", "label")}


def local_cluster(nodes: list[dict]):
    """A Ray cluster of `nodes` (keyword arguments of `ray.cluster_utils.Cluster.add_node`) on this
    machine, started as `raylocal.tune` starts its own instance (`raylocal.cluster`)."""
    return cluster.local_cluster(nodes)


@contextlib.contextmanager
def local_ray(num_cpus: int, gpus: int = 0):
    """One local Ray instance with `num_cpus` CPUs (and `gpus` GPUs), started as `raylocal.tune` starts its own."""
    started = time.perf_counter()
    with cluster.local_instance(quiet=True, log=lambda line: None, num_cpus=num_cpus, num_gpus=gpus,
                                configure_logging=False) as context:
        print(f"# ray.init with {num_cpus} CPUs took {time.perf_counter() - started:.1f}s")
        yield context


def ratio_line(name: str, value: float, target: float, higher_is_better: bool = True) -> str:
    met = value >= target if higher_is_better else value <= target
    sign = ">=" if higher_is_better else "<="
    return f"{name}: {value:.3f} (target {sign} {target}) -> {'met' if met else 'NOT met'}"


def plain_optuna(experiment: Experiment, train: list[dict[str, np.ndarray]], val: dict[str, np.ndarray], seed: int,
                 stop: Callable[[], bool] = lambda: False, keep_model: bool = False):
    """What a user would write without raylocal: one process, one trial at a time, the same trainer
    (`raylocal.engine.fit`) on `train` (one entry per epoch) and `val`, the search's own space,
    TPE sampler settings and seed, and successive halving at the search's rungs (Optuna's
    SuccessiveHalvingPruner is asynchronous successive halving, the rule of Tune's ASHA, with the same
    grace period and reduction factor). No trial starts once `stop()`, and the running one ends at
    its next report. Returns the study and the best report of all: `value`, and with `keep_model`
    its `state` (model weights), `params` and `epoch`."""
    import optuna
    import torch

    from raylocal.config import Hyperparameters, optuna_space
    from raylocal.engine import fit

    budget = experiment.budget
    # Optuna's pruner counts whole steps: a step here is 1/unit epoch, which every report lands on.
    unit = math.lcm(budget.first_epoch_reports, budget.reports_per_epoch)
    best: dict = {"value": -1.0}

    def objective(trial) -> float:
        params = Hyperparameters.from_dict(asdict(experiment.fixed) | trial.params)
        values = []

        def report(metrics, state):
            values.append(metrics[OBJECTIVE])
            if metrics[OBJECTIVE] > best["value"]:
                best["value"] = metrics[OBJECTIVE]
                if keep_model:
                    best.update(state={k: v.clone() for k, v in state["model"].items()}, params=params,
                                epoch=metrics["epoch"])
            trial.report(metrics[OBJECTIVE], step=round(metrics["epoch"] * unit))
            if trial.should_prune():
                raise optuna.TrialPruned()

        fit(params, max_epochs=budget.max_epochs, first_epoch_reports=budget.first_epoch_reports,
            reports_per_epoch=budget.reports_per_epoch, train_data=lambda epoch: train[epoch], val_data=val,
            train_rows=len(train[0]["label"]), report=report, device=torch.device("cpu"), seed=seed, stop=stop)
        return max(values)

    study = halving_study(experiment, seed, unit)
    # Ask and tell, with the search's own space: the same distributions OptunaSearch samples from.
    space = optuna_space(experiment.space)
    while not stop() and len(study.trials) < budget.trials:
        trial = study.ask(space)
        try:
            study.tell(trial, objective(trial))
        except optuna.TrialPruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    return study, best


def halving_study(experiment: Experiment, seed: int, unit: int):
    """An Optuna study with the search's sampler and its rungs as successive halving, counting
    steps of 1/`unit` epoch."""
    import optuna

    from raylocal.tuner import make_sampler

    budget = experiment.budget
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(
        direction="maximize", sampler=make_sampler(budget.trials, seed),
        pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, round(budget.grace_period * unit)),
                                                      reduction_factor=budget.reduction_factor),
    )
