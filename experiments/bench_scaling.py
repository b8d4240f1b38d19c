"""Scaling: one fixed amount of search work on 1 and 2 Ray nodes of this machine, and with 1 or 2
Ray Train workers per trial.

The work is the same in every layout: `--trials` identical trials (fixed hyperparameters,
no early stopping), each `--epochs` epochs over the same canvases, run by `raylocal.tune`
joining a Ray cluster started here with `ray.cluster_utils.Cluster` (real separate raylets,
object stores and worker processes; one machine). Printed per layout: wall time of the
whole command, training samples per second of the search (all trained canvases over the
time from the first trial's start to the last one's end) and the per-trial training rate.
With GPUs, two layouts are added: one-worker trials sharing each GPU (raylocal's default on
GPUs) and, with 2 GPUs or more, 2-worker DDP trials holding one GPU per worker. `--gpus N`
declares N GPUs to Ray: on a machine without CUDA they are Ray's logical GPUs, scheduled but
not computed on (the search then runs with `--device cpu`, said in the output).

    python experiments/bench_scaling.py                 # minutes on 2 cores
    python experiments/bench_scaling.py --trials 2 --train-digits 4000   # quick
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import benchlib

from raylocal.results import all_reports, read_search
from raylocal.synthesis import split_plan


def get_args_parser():
    parser = benchlib.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-digits", type=int, default=12_000)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--layouts", default=None, help="which layouts, by number in the printed order (e.g. 1,4); the first is the base")
    parser.add_argument("--gpus", type=int, help="GPUs to declare to Ray (default: the CUDA devices present)")
    return parser


def layouts(cpus: int, gpus: int) -> list[tuple[str, list[dict], int]]:
    """(name, nodes, workers per trial)."""
    half = max(1, cpus // 2)
    found = [
        (f"1 node x {half} CPU, 1 worker/trial", [{"num_cpus": half}], 1),
        (f"2 nodes x {half} CPU, 1 worker/trial", [{"num_cpus": half}] * 2, 1),
        (f"1 node x {2 * half} CPU, 2 workers/trial (DDP)", [{"num_cpus": 2 * half}], 2),
        (f"2 nodes x {half} CPU, 2 workers/trial (DDP across nodes)", [{"num_cpus": half}] * 2, 2),
    ]
    if gpus:
        found.append((f"1 node x {cpus} CPU, {gpus} GPU, 1 worker/trial (trials share GPUs)",
                      [{"num_cpus": cpus, "num_gpus": gpus}], 1))
        if gpus >= 2:
            found.append((f"1 node x {cpus} CPU, {gpus} GPU, 2 workers/trial (DDP, 1 GPU each)",
                          [{"num_cpus": cpus, "num_gpus": gpus}], 2))
    return found


def run_layout(args, nodes: list[dict], workers: int, experiment: Path, out: Path, device: str) -> dict:
    from raylocal import tune

    with benchlib.local_cluster(nodes) as cluster:
        argv = ["--experiment", str(experiment), "--storage", str(out), "--name", "scaling", "--address",
                cluster.address, "--workers-per-trial", str(workers), "--seed", str(args.seed), "--quiet", "--device", device, "--no-final", "--time-budget", "0",
                *benchlib.data_flags(args)]
        started = time.perf_counter()
        summary = tune.main(tune.get_args_parser().parse_args(argv))
        wall = time.perf_counter() - started
    rows = all_reports(read_search(out / "scaling")).to_dict("records")
    ends = [row["timestamp"] for row in rows]
    starts = [row["timestamp"] - row["time_total_s"] for row in rows]
    trained = summary["data"]["train_canvases_per_epoch"] * args.epochs * args.trials
    rates = [row["train_images_per_s"] for row in rows]
    return {"wall": wall, "search_samples_per_s": trained / (max(ends) - min(starts)),
            "trial_samples_per_s": sum(rates) / len(rates), "nodes": len({node for row in rows for node in row["worker_nodes"].split(",")}),
            "gpus": sorted({gpu for row in rows for gpu in row["worker_gpus"].split(",")} - {"-"})}


def main(args) -> None:
    import torch

    cpus = os.cpu_count()
    gpus = torch.cuda.device_count() if args.gpus is None else args.gpus
    # Declared GPUs beyond the CUDA devices present are Ray's logical GPUs: scheduled, not computed on.
    device = "auto" if gpus <= torch.cuda.device_count() else "cpu"
    if device == "cpu":
        print(f"# {gpus} logical GPU(s) declared to Ray; trials compute on the CPU (--device cpu)")
    benchlib.print_setup("scaling", trials=args.trials, epochs=args.epochs, train_digits=args.train_digits,
                         depth=args.depth, width=args.width)
    train_rows = len(split_plan(args.train_digits, 1000).train)
    print(f"# work per layout: {args.trials} trials x {args.epochs} epoch(s) x {train_rows:,} canvases, "
          f"depth {args.depth} width {args.width}, no early stopping")
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        experiment = Path(scratch) / "scaling.toml"
        experiment.write_text(
            f"[fixed]\ndepth = {args.depth}\nwidth = {args.width}\n[space]\n"
            f"[budget]\ntrials = {args.trials}\nmax_epochs = {args.epochs}\nfirst_epoch_reports = 1\nreports_per_epoch = 1\n"
            f"grace_period = {args.epochs}\n[data]\ntrain_digits = {args.train_digits}\ntest_digits = 1000\n"
        )
        chosen = [int(number) for number in args.layouts.split(",")] if args.layouts else None
        for index, (name, nodes, workers) in enumerate(layouts(cpus, gpus)):
            if chosen and index + 1 not in chosen:
                continue
            result = run_layout(args, nodes, workers, experiment, Path(scratch) / f"layout{index}", device)
            results[name] = result
            print(f"{name:55} wall {result['wall']:6.1f}s  search {result['search_samples_per_s']:7.0f} samples/s  "
                  f"per trial {result['trial_samples_per_s']:7.0f} samples/s  (workers ran on {result['nodes']} "
                  f"node(s){', GPUs ' + '+'.join(result['gpus']) if result['gpus'] else ''})", flush=True)
    names = list(results)
    base = results[names[0]]
    for name in names[1:]:
        print(f"ratio {name} / {names[0]}: wall {results[name]['wall'] / base['wall']:.2f}x, "
              f"search samples/s {results[name]['search_samples_per_s'] / base['search_samples_per_s']:.2f}x")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
