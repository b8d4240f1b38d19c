"""Equal wall time, several seeds: raylocal's default command against what a user would otherwise do.

(a) raylocal: `python -m raylocal.tune --time-budget M --seed S`, the default command (search,
    then final training of the winner on every worker), in its own process, timed whole.
(b) plain Optuna: one process, the same trainer (`raylocal.engine.fit`) and search space, TPE
    (seeded, same start-up count) with successive halving at the search's rungs, all cores as
    torch threads; it stops starting trials when the time is up and stops the running one at
    its next report; it exports its best trial's best checkpoint.
(c) no search: one reasonable configuration, picked without a search (depth 4, width 16, lr 3e-3,
    box-loss weight 0.1: raylocal's defaults until a search found better ones), trained with all
    cores for as many epochs as fit in the time (planned from its speed on its first steps,
    re-planned after every epoch as raylocal's final phase is), one-cycle schedule over them.

Each method gets M minutes for everything it does (data, training, test scoring), per seed;
the seed moves the data placement, the sampler and the initialization. All three are scored
on the same 10k test canvases of that seed, as the default command scores its export: averaged
over `--views` shifted views (`raylocal.model.ShiftAveraged`). Printed: one line per run, then
mean and spread.

    python experiments/bench_baselines.py --minutes 6 --seeds 0 1 2     # 3 seeds x 3 methods x 6 min
    python experiments/bench_baselines.py --minutes 1 --seeds 0 --train-digits 3000 --test-digits 500 --views 1  # quick
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import benchlib
import numpy as np
import torch

from raylocal.config import Experiment, Hyperparameters
from raylocal.engine import evaluate, fit, to_tensors
from raylocal.final import fit_to_deadline
from raylocal.metrics import summarize
from raylocal.model import SHIFTS, for_inference
from raylocal.synthesis import split_plan, synthesize_split

METHODS = ("raylocal", "optuna", "single")
# What each in-process method keeps back for scoring the test split at the end, per view, with
# margin over one pass over the test canvases (docs/decisions.md#shift-averaged-views).
SCORING_SECONDS = 10
# (c)'s configuration: the one picked by hand, not raylocal's defaults since a search (b's) chose those.
SKEPTIC = Hyperparameters(lr=3e-3, box_loss_weight=0.1)
# (c)'s re-plan may grow its epochs to whatever fits (raylocal's final phase stops at 30).
UNCAPPED = 10_000


def get_args_parser():
    parser = benchlib.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=6.0, help="wall time of each run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--train-digits", type=int, help="MNIST training digits used (default: all)")
    parser.add_argument("--test-digits", type=int, help="MNIST test digits used (default: all)")
    parser.add_argument("--raylocal-flags", default="", metavar="FLAGS",
                        help="more flags for (a)'s raylocal.tune command, e.g. '--final-init scratch'")
    parser.add_argument("--out", type=Path, help="append one JSON line per run here (and keep raylocal's timed logs "
                        "beside it)")
    parser.add_argument("--views", type=int, choices=range(1, len(SHIFTS) + 1), default=len(SHIFTS),
                        help=f"views every method's model is scored with (and (a) exports) (default {len(SHIFTS)}, "
                        "the command's)")
    parser.add_argument("--storage", type=Path, help="keep (a)'s search folders and exported models here, e.g. for "
                        "bench_views.py (default: a temporary folder, removed at the end)")
    return parser


class Splits:
    """The canvases of one seed, built by the same function the search's Ray Data tasks call."""

    def __init__(self, mnist, args, seed: int) -> None:
        self.images = mnist.train_images[: args.train_digits]
        self.labels = mnist.train_labels[: args.train_digits]
        self.test_images = mnist.test_images[: args.test_digits]
        self.test_labels = mnist.test_labels[: args.test_digits]
        self.plan = split_plan(len(self.images), len(self.test_images))
        self.seed = seed

    def get(self, split: str, epoch: int = 0) -> dict[str, np.ndarray]:
        images, labels = (self.test_images, self.test_labels) if split == "test" else (self.images, self.labels)
        columns = synthesize_split(images, labels, self.plan, seed=self.seed, split=split, epoch=epoch)
        return {key: columns[key] for key in ("image", "box", "label")}


def trained_model(state: dict, params: Hyperparameters):
    from raylocal.model import build_model

    model = build_model(params.model_config())
    model.load_state_dict(state)
    return model.eval()


def test_metrics(state: dict, params: Hyperparameters, splits: Splits, views: int) -> dict[str, float]:
    device = torch.device("cpu")
    model = for_inference(trained_model(state, params), views)
    return summarize(evaluate(model, to_tensors(splits.get("test"), device), params, device), "test")


def keep_model(state: dict, row: dict, splits: Splits, folder: Path, views: int) -> None:
    """An in-process method's model exported as (a)'s is, its card with the seed and test size it was scored on."""
    from raylocal.export import export_model

    card = {"method": row["method"], "data": {"seed": row["seed"], "test_canvases": len(splits.test_labels)},
            "hyperparameters": row["hyperparameters"], "test": {k: v for k, v in row.items() if k.startswith("test_")}}
    model = trained_model(state, Hyperparameters.from_dict(row["hyperparameters"]))
    export_model(model, folder, card, views=views, log=lambda line: None)


def run_raylocal(args, seed: int, folder: Path) -> dict:
    command = [sys.executable, "-m", "raylocal.tune", "--time-budget", f"{args.minutes:g}", "--seed", str(seed),
               "--name", f"baseline-{seed}", "--storage", str(folder), "--views", str(args.views), "--quiet",
               *benchlib.data_flags(args),
               *shlex.split(args.raylocal_flags)]
    experiment = None
    if args.train_digits or args.test_digits:
        experiment = folder / "data.toml"
        experiment.write_text("[data]\n" + "".join(f"{key} = {value}\n" for key, value in
                                                     (("train_digits", args.train_digits), ("test_digits", args.test_digits))
                                                     if value))
        command += ["--experiment", str(experiment)]
    started = time.time()
    lines = []
    # Each line with the seconds since the start: where a run's minutes went (search, final, finish).
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
        for line in process.stdout:
            lines.append(f"{time.time() - started:7.1f}s {line}")
    if args.out:
        args.out.with_name(f"{args.out.stem}-raylocal-seed{seed}.log").write_text("".join(lines))
    if process.returncode:
        raise RuntimeError("raylocal.tune failed:\n" + "".join(lines[-60:]))
    card = json.loads((folder / f"baseline-{seed}" / "best_model" / "model_card.json").read_text())
    final = card.get("final") or {}
    return card["test"] | {"trials": card["search"]["trials"], "final_epochs": final.get("epochs_trained", 0),
                           "hyperparameters": card["hyperparameters"]}


def run_optuna(args, seed: int, splits: Splits, deadline: float) -> dict:
    experiment = Experiment()
    train = [splits.get("train", epoch) for epoch in range(experiment.budget.max_epochs)]

    def stop() -> bool:
        return time.time() > deadline - SCORING_SECONDS * args.views

    study, best = benchlib.plain_optuna(experiment, train, splits.get("val"), seed, stop=stop, keep_model=True)
    if "state" not in best:
        raise SystemExit(f"optuna seed {seed}: no trial reported within {args.minutes:g} min less the "
                         f"{SCORING_SECONDS * args.views} s kept to score {args.views} view(s): "
                         "give more --minutes or fewer --views")
    return test_metrics(best["state"], best["params"], splits, args.views) | {
        "trials": len(study.trials), "final_epochs": best["epoch"], "hyperparameters": asdict(best["params"]),
        "state": best["state"]}


def run_single(args, seed: int, splits: Splits, deadline: float) -> dict:
    params = SKEPTIC
    val = splits.get("val")
    first = splits.get("train", 0)
    rows = len(first["label"])
    # Speed on 30 steps (after 5 to warm up), with the same threads the run will use.
    probe = {key: value[: 35 * params.batch_size] for key, value in first.items()}
    times = []
    fit(replace(params, lr=1e-4), max_epochs=1, first_epoch_reports=7, reports_per_epoch=1,
        train_data=lambda epoch: probe, val_data={key: value[:1] for key, value in val.items()},
        train_rows=len(probe["label"]), report=lambda metrics, state: times.append(time.perf_counter()),
        device=torch.device("cpu"), seed=seed)
    step_seconds = (times[-1] - times[0]) / 30
    # 5% for the report's bookkeeping; validation costs about a third of a training step per canvas.
    epoch_seconds = (rows // params.batch_size) * step_seconds * 1.05 + len(val["label"]) / params.batch_size * step_seconds / 3
    scoring = SCORING_SECONDS * args.views
    epochs = max(1, math.floor((deadline - scoring - time.time()) / epoch_seconds))
    last: dict = {}
    # Re-planned after every epoch, as raylocal's final phase is: a plan from the probe's steps alone
    # overran its deadline, which is not equal wall time (docs/decisions.md#final-replanning). No cap.
    replan = fit_to_deadline(deadline - scoring, UNCAPPED, torch.device("cpu"), 1)
    fit(params, max_epochs=epochs, first_epoch_reports=1, reports_per_epoch=1,
        train_data=lambda epoch: first if epoch == 0 else splits.get("train", epoch), val_data=val, train_rows=rows,
        report=lambda metrics, state: last.update(state=state["model"], epoch=metrics["epoch"]),
        device=torch.device("cpu"), seed=seed, replan=replan)
    return test_metrics(last["state"], params, splits, args.views) | {"trials": 1, "final_epochs": last["epoch"],
                                                          "hyperparameters": asdict(params), "state": last["state"]}


def main(args) -> None:
    benchlib.print_setup("baselines at equal wall time", minutes=args.minutes, seeds=args.seeds, methods=args.methods,
                         train_digits=args.train_digits or "all", test_digits=args.test_digits or "all",
                         raylocal_flags=args.raylocal_flags or "none", views=args.views)
    mnist = benchlib.load_digits(args)
    torch.set_num_threads(os.cpu_count())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        storage = args.storage.absolute() if args.storage else Path(tmp)
        for seed in args.seeds:
            splits = Splits(mnist, args, seed)
            for method in args.methods:
                started = time.time()
                deadline = started + args.minutes * 60
                if method == "raylocal":
                    result = run_raylocal(args, seed, storage)
                elif method == "optuna":
                    result = run_optuna(args, seed, splits, deadline)
                else:
                    result = run_single(args, seed, splits, deadline)
                wall_s = round(time.time() - started, 1)
                state = result.pop("state", None)
                row = {"method": method, "seed": seed, "wall_s": wall_s, "views": args.views} | result
                if args.storage and state is not None:
                    keep_model(state, row, splits, storage / f"{method}-{seed}" / "best_model", args.views)
                rows.append(row)
                print(f"{method:<9} seed {seed}: wall {row['wall_s']:6.1f}s  test det IoU {row['test_det_iou']:.4f}  "
                      f"mean IoU {row['test_mean_iou']:.4f}  accuracy {row['test_accuracy']:.4f}  "
                      f"trials {row['trials']}  epochs of the exported model {row['final_epochs']:g}", flush=True)
                if args.out:
                    with args.out.open("a") as out:
                        out.write(json.dumps(row) + "\n")
    summarize_rows(rows)


def summarize_rows(rows: list[dict]) -> None:
    import pandas as pd

    frame = pd.DataFrame(rows)
    table = frame.groupby("method", sort=False)[["test_det_iou", "test_mean_iou", "test_accuracy", "wall_s"]].agg(
        ["mean", "std", "min", "max"])
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.precision", 4):
        print(table)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
