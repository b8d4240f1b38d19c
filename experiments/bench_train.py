"""Training throughput: raylocal's training loop inside a Ray Train worker vs. a plain PyTorch loop.

Same model, batch size, threads and in-memory canvases on both sides, run back to back in this
process. The plain loop is the textbook one (float batches, AdamW, the same loss); raylocal's
loop also steps the one-cycle schedule, accumulates metrics every step and evaluates the
validation split at the end, as in a search. Three measurements:

  plain      plain PyTorch loop in this process, in PyTorch's default memory format and in
             channels-last (which raylocal uses on CPUs); the faster one is the baseline
  engine     raylocal.engine.fit in this process (no Ray)
  ray-train  raylocal.engine.fit in a Ray Train (TorchTrainer) worker, data from the object store

    python experiments/bench_train.py                 # one epoch (55k canvases), depth 5 width 16
    python experiments/bench_train.py --rows 8192     # quick
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict

import benchlib
import numpy as np
import torch

from raylocal.config import Hyperparameters
from raylocal.engine import fit
from raylocal.metrics import localization_loss
from raylocal.model import build_model

TARGET = 0.95


def get_args_parser():
    parser = benchlib.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=55_000, help="training canvases (default: one epoch)")
    parser.add_argument("--val-rows", type=int, default=5_000, help="validation canvases raylocal's loop scores")
    parser.add_argument("--depth", type=int, default=5)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (and Ray CPUs)")
    return parser


def plain_loop(params: Hyperparameters, data: dict[str, np.ndarray], threads: int, seed: int, channels_last: bool) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = build_model(params.model_config())
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    images, boxes, labels = (torch.from_numpy(data[key]) for key in ("image", "box", "label"))
    model.train()
    started = time.perf_counter()
    count = 0
    for start in range(0, len(labels) - params.batch_size + 1, params.batch_size):
        batch = slice(start, start + params.batch_size)
        logits, pred_boxes = model(images[batch].unsqueeze(1).float() / 255)
        loss = localization_loss(logits, pred_boxes, labels[batch], boxes[batch], params.box_loss_weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        count += params.batch_size
    return count / (time.perf_counter() - started)


def engine_fit(params, data, val, threads: int, seed: int) -> dict:
    torch.set_num_threads(threads)
    reports = []
    fit(
        params, max_epochs=1, first_epoch_reports=1, reports_per_epoch=1, train_data=lambda epoch: data, val_data=val,
        train_rows=len(data["label"]), report=lambda metrics, state: reports.append(metrics),
        device=torch.device("cpu"), seed=seed,
    )
    return reports[-1]


def ray_train_fit(params, data, val, threads: int, seed: int) -> tuple[dict, float]:
    """The search's own Ray Train path (`raylocal.train.train_worker`) with one worker of `threads` CPUs."""
    import ray
    from ray import train
    from ray.train.torch import TorchConfig, TorchTrainer

    from raylocal.data import SearchData, SplitRefs
    from raylocal.train import TrialSettings, train_worker

    def refs(columns):
        return SplitRefs((ray.put(columns),), len(columns["label"]))

    search_data = SearchData(
        train_epochs=(refs(data),), val=refs(val), test=refs(val), seed=seed, source="benchmark", sha256={},
        verified=True,
    )
    settings = TrialSettings(
        max_epochs=1, first_epoch_reports=1, reports_per_epoch=1, workers=1, cpus_per_worker=threads, gpus_per_worker=0,
        backend="ray-train", storage_path="/tmp/raylocal-bench", experiment_name="bench_train", seed=seed, fixed={},
    )
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"params": asdict(params), "data": search_data, "settings": settings},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": threads}),
        run_config=train.RunConfig(name=f"bench-train-{os.getpid()}", storage_path=settings.storage_path),
    )
    started = time.perf_counter()
    result = trainer.fit()
    return result.metrics, time.perf_counter() - started


def main(args) -> None:
    params = Hyperparameters(depth=args.depth, width=args.width, batch_size=args.batch_size)
    benchlib.print_setup(
        "training throughput", rows=args.rows, val_rows=args.val_rows, depth=args.depth, width=args.width,
        batch_size=args.batch_size, threads=args.threads,
    )
    mnist = benchlib.load_digits(args)
    data = benchlib.train_split(mnist, args.rows, args.seed)
    val = {key: value[: args.val_rows] for key, value in benchlib.train_split(mnist, args.val_rows, args.seed + 1).items()}

    plain_by_format = {
        memory_format: plain_loop(params, data, args.threads, args.seed, memory_format == "channels-last")
        for memory_format in ("default", "channels-last")
    }
    for memory_format, rate in plain_by_format.items():
        print(f"plain PyTorch loop ({memory_format + ')':14} {rate:8.0f} canvases/s")
    plain = max(plain_by_format.values())
    started = time.perf_counter()
    engine = engine_fit(params, data, val, args.threads, args.seed)
    engine_wall = time.perf_counter() - started
    print(f"raylocal loop, no Ray            {engine['train_images_per_s']:8.0f} canvases/s "
          f"(wall {engine_wall:.1f}s incl. validation)")
    with benchlib.local_ray(args.threads):
        ray_metrics, ray_wall = ray_train_fit(params, data, val, args.threads, args.seed)
    print(f"raylocal loop in Ray Train       {ray_metrics['train_images_per_s']:8.0f} canvases/s "
          f"(wall {ray_wall:.1f}s incl. worker start-up and validation)")
    print(benchlib.ratio_line("ratio Ray Train loop / faster plain loop", ray_metrics["train_images_per_s"] / plain, TARGET))
    print(f"ratio raylocal loop without Ray / faster plain loop: {engine['train_images_per_s'] / plain:.3f}")
    print(f"ratio end to end (Ray Train wall incl. start-up and validation) / plain epoch: "
          f"{(args.rows / plain) / ray_wall:.3f}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
