"""Search overhead: the same search run by plain Optuna in one process vs. `raylocal.tune`.

Same budget (trials, epochs, reports per epoch), same search space, same TPE sampler settings
and seed, the same pruning rule (Optuna's SuccessiveHalvingPruner is asynchronous successive
halving, the rule of Tune's ASHA, with the same grace period and reduction factor), the same
training function (`raylocal.engine.fit`) on the same canvases. Plain Optuna runs one trial
at a time with all cores as torch threads; raylocal runs as many one-core trials at once as
there are cores. Back to back in this run; printed: wall time, the best validation det IoU
each found, and how many trials raylocal really ran at once.

    python experiments/bench_search.py
    python experiments/bench_search.py --trials 6 --train-digits 6000   # quick
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import benchlib
import numpy as np
import torch

from raylocal.config import OBJECTIVE, Experiment, load_experiment
from raylocal.synthesis import split_plan, synthesize_split

TARGET = 1.10


def get_args_parser():
    parser = benchlib.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--max-epochs", type=int, default=2)
    parser.add_argument("--first-epoch-reports", type=int, default=8)
    parser.add_argument("--reports-per-epoch", type=int, default=2, help="in later epochs")
    parser.add_argument("--train-digits", type=int, default=16_000, help="MNIST training digits used (val: 1/12)")
    parser.add_argument("--test-digits", type=int, default=2_000)
    parser.add_argument("--out", default=None, help="where raylocal's search goes (default: a temporary folder)")
    return parser


def experiment_file(args, directory: Path) -> Path:
    path = directory / "bench_search.toml"
    path.write_text(
        f"[budget]\ntrials = {args.trials}\nmax_epochs = {args.max_epochs}\nfirst_epoch_reports = "
        f"{args.first_epoch_reports}\nreports_per_epoch = {args.reports_per_epoch}\n"
        f"[data]\ntrain_digits = {args.train_digits}\ntest_digits = {args.test_digits}\n"
    )
    return path


def split_columns(mnist, experiment: Experiment, split: str, epoch: int, seed: int) -> dict[str, np.ndarray]:
    images, labels = mnist.train_images[: experiment.data.train_digits], mnist.train_labels[: experiment.data.train_digits]
    plan = split_plan(len(images), experiment.data.test_digits or len(mnist.test_images))
    columns = synthesize_split(images, labels, plan, seed=seed, split=split, epoch=epoch)
    return {key: columns[key] for key in ("image", "box", "label")}


def plain_optuna(mnist, experiment: Experiment, seed: int) -> tuple[float, float, int]:
    """(wall seconds, best validation det IoU over every report, trials pruned) of `benchlib.plain_optuna`,
    its canvases' synthesis included."""
    import optuna

    started = time.perf_counter()
    torch.set_num_threads(os.cpu_count())
    train = [split_columns(mnist, experiment, "train", epoch, seed) for epoch in range(experiment.budget.max_epochs)]
    val = split_columns(mnist, experiment, "val", 0, seed)
    study, best = benchlib.plain_optuna(experiment, train, val, seed)
    pruned = sum(trial.state == optuna.trial.TrialState.PRUNED for trial in study.trials)
    return time.perf_counter() - started, best["value"], pruned


def trial_intervals(experiment_dir: Path) -> list[tuple[float, float]]:
    """(start, end) wall-clock seconds of every trial that reported (`raylocal.results`)."""
    from raylocal.results import read_search

    return [(trial.last["timestamp"] - trial.last["time_total_s"], trial.last["timestamp"])
            for trial in read_search(experiment_dir) if len(trial.history)]


def raylocal_search(args, experiment_path: Path, out: Path) -> tuple[float, dict]:
    from raylocal import tune

    argv = ["--experiment", str(experiment_path), "--storage", str(out), "--name", "bench_search",
            "--seed", str(args.seed), "--quiet", "--no-final", "--time-budget", "0", *benchlib.data_flags(args)]
    started = time.perf_counter()
    summary = tune.main(tune.get_args_parser().parse_args(argv))
    return time.perf_counter() - started, summary


def main(args) -> None:
    benchlib.print_setup("search overhead", trials=args.trials, max_epochs=args.max_epochs,
                         first_epoch_reports=args.first_epoch_reports, reports_per_epoch=args.reports_per_epoch,
                         train_digits=args.train_digits, seed=args.seed)
    mnist = benchlib.load_digits(args)
    with tempfile.TemporaryDirectory() as scratch:
        experiment_path = experiment_file(args, Path(scratch))
        experiment = load_experiment(experiment_path)
        optuna_wall, optuna_best, pruned = plain_optuna(mnist, experiment, args.seed)
        print(f"plain Optuna, 1 process, {os.cpu_count()} threads: {optuna_wall:7.1f}s, best val det IoU "
              f"{optuna_best:.4f}, {pruned}/{args.trials} trials pruned")
        out = Path(args.out) if args.out else Path(scratch) / "results"
        ray_wall, summary = raylocal_search(args, experiment_path, out)
        intervals = trial_intervals(out / "bench_search")
    trial_seconds = sum(end - start for start, end in intervals)
    span = max(end for _, end in intervals) - min(start for start, _ in intervals)
    search_wall = summary["search"]["wall_seconds_until_export"]
    ray_best = summary["validation"][OBJECTIVE]
    print(f"raylocal.tune, whole command: {ray_wall:7.1f}s (until export: {search_wall:.1f}s), best val det IoU "
          f"{ray_best:.4f}; trials ran {trial_seconds / span:.2f} at once on average")
    print(benchlib.ratio_line("wall ratio raylocal (whole command) / plain Optuna", ray_wall / optuna_wall, TARGET,
                              higher_is_better=False))
    print(f"wall ratio raylocal (data + search, without Ray start, test scoring and export) / plain Optuna: "
          f"{search_wall / optuna_wall:.3f}")
    print(f"best val det IoU raylocal - plain Optuna: {ray_best - optuna_best:+.4f} (target >= 0) -> "
          f"{'met' if ray_best >= optuna_best else 'NOT met'}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
