"""Model variants at equal training: validation metrics after the same epochs, over seeds.

Each run is one configuration (the defaults, changed by `--variant NAME:key=value,...`) trained
by raylocal's loop (`raylocal.engine.fit`, one-cycle over `--epochs`, a freshly placed epoch of
canvases each time) on one torch thread, in its own process; `--parallel` runs go at once (one
per core), so both sides of a comparison share the machine the same way. Printed: one line per
run and epoch, then mean and spread of the last epoch's figures per variant.

    python experiments/bench_model.py --epochs 2 --seeds 0 1 --variant base: --variant narrow:width=8
    python experiments/bench_model.py --epochs 1 --seeds 0 --train-digits 3000 --variant base:  # quick

`--init CHECKPOINT` starts every run from a search trial's checkpoint (its `checkpoint.pt`, or the
folder holding it) instead of a fresh initialization, on the epochs of canvases after the ones it
trained on, as raylocal's final phase does: e.g. the final run's learning rate, compared at equal
epochs (`--variant full:lr=0.003 --variant third:lr=0.001`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import benchlib
import numpy as np

FIGURES = ("val_det_iou", "val_mean_iou", "val_accuracy")


def get_args_parser():
    parser = benchlib.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", required=True,
                        help="NAME:key=value,... (hyperparameters over the defaults; 'NAME:' for the defaults)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--train-digits", type=int, help="MNIST training digits used (default: all)")
    parser.add_argument("--parallel", type=int, default=os.cpu_count(), help="runs at once, one thread each")
    parser.add_argument("--init", help="a trial checkpoint (checkpoint.pt or its folder) every run starts from")
    parser.add_argument("--run", help=argparse.SUPPRESS)  # a child process: one variant, one seed
    return parser


def parse_variant(text: str) -> tuple[str, dict]:
    from raylocal.config import ConfigError, Hyperparameters

    name, _, settings = text.partition(":")
    changes = {}
    for item in filter(None, settings.split(",")):
        key, _, value = item.partition("=")
        changes[key] = json.loads(value)
    try:
        Hyperparameters.from_dict(changes, where=f"--variant {name}")
    except ConfigError as error:
        raise SystemExit(f"error: {error}") from None
    return name, changes


def one_run(args, changes: dict, seed: int) -> None:
    """In a child process: train and print one JSON line per epoch."""
    import torch

    from raylocal.config import Hyperparameters
    from raylocal.engine import fit
    from raylocal.synthesis import split_plan, synthesize_split

    torch.set_num_threads(1)
    mnist = benchlib.load_digits(args, quiet=True)
    images, labels = mnist.train_images[: args.train_digits], mnist.train_labels[: args.train_digits]
    plan = split_plan(len(images), len(mnist.test_images))

    def split(name: str, epoch: int = 0) -> dict[str, np.ndarray]:
        columns = synthesize_split(images, labels, plan, seed=seed, split=name, epoch=epoch)
        return {key: columns[key] for key in ("image", "box", "label")}

    params = Hyperparameters.from_dict(asdict(Hyperparameters()) | changes)
    init, first = None, 0
    if args.init:
        path = args.init if args.init.endswith(".pt") else os.path.join(args.init, "checkpoint.pt")
        state = torch.load(path, map_location="cpu", weights_only=True)
        init, first = state["model"], math.ceil(state["epoch"])
    val, rows = split("val"), len(plan.train)
    started = time.perf_counter()

    def report(metrics, state) -> None:
        if metrics["epoch"] == int(metrics["epoch"]):
            row = {key: metrics[key] for key in ("epoch", *FIGURES)} | {"seconds": time.perf_counter() - started}
            print(json.dumps(row), flush=True)

    fit(params, max_epochs=args.epochs, first_epoch_reports=1, reports_per_epoch=1,
        train_data=lambda epoch: split("train", first + epoch), val_data=val, train_rows=rows,
        report=report, device=torch.device("cpu"), seed=seed, init=init)


def launch(args, name: str, text: str, seed: int) -> list[dict]:
    command = [sys.executable, __file__, "--run", text, "--epochs", str(args.epochs), "--seed", str(seed),
               "--variant", text, *benchlib.data_flags(args)]
    if args.train_digits:
        command += ["--train-digits", str(args.train_digits)]
    if args.init:
        command += ["--init", args.init]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{name} seed {seed} failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if not rows:
        raise RuntimeError(f"{name} seed {seed} reported no epoch:\n{done.stdout[-3000:]}")
    for row in rows:
        print(f"{name:>12} seed {seed} epoch {row['epoch']:.0f}: " +
              " ".join(f"{key} {row[key]:.4f}" for key in FIGURES) + f"  ({row['seconds']:.0f} s)", flush=True)
    return rows


def main(args) -> None:
    if args.run:
        one_run(args, parse_variant(args.run)[1], args.seed)
        return
    variants = [parse_variant(text) + (text,) for text in args.variant]
    benchlib.print_setup("model variants", epochs=args.epochs, seeds=args.seeds, train_digits=args.train_digits,
                         parallel=args.parallel, init=args.init or "fresh", variants=[text for *_, text in variants])
    jobs = [(name, text, seed) for seed in args.seeds for name, _, text in variants]
    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(lambda job: (job[0], launch(args, *job)[-1]), jobs))
    print(f"# after {args.epochs} epoch(s), mean ± sd over seeds {args.seeds} (min–max)")
    for name, _, _ in variants:
        last = [row for variant, row in results if variant == name]
        line = []
        for key in FIGURES:
            values = np.array([row[key] for row in last])
            line.append(f"{key} {values.mean():.4f} ± {values.std(ddof=1) if len(values) > 1 else 0:.4f} "
                        f"({values.min():.4f}–{values.max():.4f})")
        seconds = np.mean([row["seconds"] for row in last])
        print(f"{name:>12}: " + "; ".join(line) + f"; {seconds:.0f} s per run")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
