"""Training throughput: raylocal's training loop inside a Ray Train worker vs. a plain PyTorch loop.

Same model, batch size, threads and in-memory canvases on both sides, run back to back in this
process. The plain loop is the textbook one (float batches, AdamW, the same loss; on a GPU the
canvases on the device, bf16 autocast and fused AdamW, as a careful user would write it);
raylocal's loop also steps the one-cycle schedule, accumulates metrics and evaluates the
validation split at the end, as in a search. Measurements:

  plain      plain PyTorch loop in this process, in PyTorch's default memory format and in
             channels-last (which raylocal uses); the faster one is the baseline
  engine     raylocal.engine.fit in this process (no Ray)
  ray-train  raylocal.engine.fit in a Ray Train (TorchTrainer) worker, data from the object store

raylocal's loop reports twice; the rate printed is the second report's, as the plain loop's rate
leaves out its first 20 steps on a GPU (cuDNN autotuning, lazy CUDA set-up).

On a GPU (`--device cuda`, the default where CUDA is present), also:

  compile     torch.compile's seconds to compile against the steps it saves (plain loop; on
              CPUs with --compile)
  eval batch  seconds to score the validation split at several evaluation batch sizes
  concurrent  K processes training at once on the one GPU (`--concurrent 1,4,8`), as K trials
              sharing a GPU do: the sum of their canvases/s, and one trial alone beside it

    python experiments/bench_train.py                 # one epoch (55k canvases), depth 5 width 16
    python experiments/bench_train.py --rows 8192     # quick
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict

import benchlib
import numpy as np
import torch

from raylocal.config import Hyperparameters
from raylocal.engine import autocast, evaluate, fit, to_tensors, train_steps
from raylocal.resources import choose_layout
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
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda where present")
    parser.add_argument("--concurrent", default="1,2,4,8,16",
                        help="GPU only: numbers of processes training at once on the GPU ('' to skip)")
    parser.add_argument("--eval-batches", default="512,2048,8192", help="GPU only: evaluation batch sizes to time")
    parser.add_argument("--no-compile", action="store_true", help="GPU only: skip the torch.compile measurement")
    parser.add_argument("--compile", action="store_true", help="on CPUs: time torch.compile too (on a GPU it always is)")
    return parser


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_loop(params: Hyperparameters, data: dict[str, np.ndarray], threads: int, seed: int, channels_last: bool,
               device: torch.device, compile_model: bool = False, warm: int | None = None) -> tuple[float, float]:
    """(canvases/s after the first `warm` steps, seconds those first steps took)."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    model = build_model(params.model_config()).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if compile_model else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay,
                                  fused=device.type == "cuda")
    images, boxes, labels = (torch.from_numpy(data[key]).to(device) for key in ("image", "box", "label"))
    model.train()
    # CPU steps cost the same from the first; GPU ones pay cuDNN's autotuning (and compilation) first.
    warm = (20 if device.type == "cuda" else 0) if warm is None else warm
    started = time.perf_counter()
    count = 0
    for step, start in enumerate(range(0, len(labels) - params.batch_size + 1, params.batch_size)):
        if step == warm:
            synchronize(device)
            warm_seconds, started, count = time.perf_counter() - started, time.perf_counter(), 0
        batch = slice(start, start + params.batch_size)
        with autocast(device):
            logits, pred_boxes = step_model(images[batch].unsqueeze(1).float() / 255)
            loss = localization_loss(logits.float(), pred_boxes.float(), labels[batch], boxes[batch], params.box_loss_weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        count += params.batch_size
    synchronize(device)
    return count / (time.perf_counter() - started), (warm_seconds if warm else 0.0)


def engine_fit(params, data, val, threads: int, seed: int, device: torch.device) -> dict:
    """The last of two reports: its rate is the steady one, as the plain loop's is after warm-up."""
    torch.set_num_threads(threads)
    reports = []
    fit(
        params, max_epochs=1, first_epoch_reports=2, reports_per_epoch=2, train_data=lambda epoch: data, val_data=val,
        train_rows=len(data["label"]), report=lambda metrics, state: reports.append(metrics), device=device, seed=seed,
    )
    return reports[-1]


def ray_train_fit(params, data, val, threads: int, seed: int, device: torch.device, storage: str) -> tuple[dict, float]:
    """The search's own Ray Train path (`raylocal.trial.train_worker`) with one worker of `threads` CPUs
    (and one GPU on CUDA), its run and checkpoints written under `storage`."""
    import ray
    from ray import train
    from ray.train.torch import TorchTrainer

    from raylocal.data import SearchData, SplitRefs
    from raylocal.ddp import torch_config
    from raylocal.trial import TrialSettings, train_worker

    def refs(columns):
        return SplitRefs((ray.put(columns),), len(columns["label"]))

    search_data = SearchData(
        train_epochs=(refs(data),), val=refs(val), test=refs(val), seed=seed, source="benchmark", sha256={},
        verified=True,
    )
    gpus = 1 if device.type == "cuda" else 0
    layout = choose_layout(threads, gpus, cpus_per_worker=threads, backend="ray-train", device=device.type)
    settings = TrialSettings(
        max_epochs=1, first_epoch_reports=2, reports_per_epoch=2, layout=layout,
        storage_path=storage, experiment_name="bench_train", seed=seed, fixed={},
    )
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"params": asdict(params), "data": search_data, "settings": settings},
        torch_config=torch_config(layout.dist_backend),
        scaling_config=train.ScalingConfig(num_workers=1, use_gpu=layout.uses_gpus,
                                           resources_per_worker=layout.worker_resources()),
        run_config=train.RunConfig(name=f"bench-train-{os.getpid()}", storage_path=settings.storage_path),
    )
    started = time.perf_counter()
    result = trainer.fit()
    return result.metrics, time.perf_counter() - started


def eval_seconds(params, val, device: torch.device, batch_size: int) -> float:
    model = build_model(params.model_config()).to(device, memory_format=torch.channels_last)
    tensors = to_tensors(val, device)
    evaluate(model, tensors, params, device, batch_size)  # cuDNN autotuning, allocator warm-up
    synchronize(device)
    started = time.perf_counter()
    for _ in range(3):
        evaluate(model, tensors, params, device, batch_size)
    synchronize(device)
    return (time.perf_counter() - started) / 3


def concurrent_worker(rank: int, args, rows: int, passes: int, barrier, results) -> None:
    """One of K processes training at once on the GPU: raylocal's `train_steps` over `passes`
    passes of its own `rows` canvases, timed from a common start."""
    torch.set_num_threads(1)
    device = torch.device("cuda")
    params = Hyperparameters(depth=args.depth, width=args.width, batch_size=args.batch_size)
    mnist = benchlib.load_digits(args, quiet=True)
    data = to_tensors(benchlib.train_split(mnist, rows, args.seed + rank), device)
    model = build_model(params.model_config()).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.lr, fused=True)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    torch.backends.cudnn.benchmark = True
    train_steps(model, optimizer, scheduler, data, params, device)  # warm-up pass
    synchronize(device)
    barrier.wait()
    started = time.perf_counter()
    for _ in range(passes):
        sums = train_steps(model, optimizer, scheduler, data, params, device)
    count = sums[0].item() * passes
    results.put((count, started, time.perf_counter()))


def concurrent_rates(args, processes: int, rows: int = 16_384, passes: int = 4) -> tuple[float, float]:
    """(sum of canvases/s over `processes` trainers on one GPU, canvases/s of one of them)."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    barrier, results = context.Barrier(processes), context.Queue()
    workers = [context.Process(target=concurrent_worker, args=(rank, args, rows, passes, barrier, results))
               for rank in range(processes)]
    for worker in workers:
        worker.start()
    timings = [results.get(timeout=600) for _ in workers]
    for worker in workers:
        worker.join()
    total = sum(count for count, _, _ in timings)
    window = max(end for *_, end in timings) - min(start for _, start, _ in timings)
    return total / window, sum(count / (end - start) for count, start, end in timings) / processes


def compile_gain(args, params, data, device: torch.device) -> None:
    """torch.compile's first 20 steps (compilation included) and its speed after them, against eager."""
    eager, eager_warm = plain_loop(params, data, args.threads, args.seed, True, device, warm=20)
    compiled, compile_warm = plain_loop(params, data, args.threads, args.seed, True, device, compile_model=True, warm=20)
    saved_per_canvas = 1 / eager - 1 / compiled
    pays_after = (compile_warm - eager_warm) / saved_per_canvas if saved_per_canvas > 0 else float("inf")
    print(f"torch.compile: first 20 steps {compile_warm:.1f}s (eager {eager_warm:.1f}s), then {compiled:.0f} "
          f"canvases/s (eager {eager:.0f}); pays for itself after {pays_after:,.0f} canvases per trial")


def gpu_extras(args, params, data, val, device: torch.device) -> None:
    if not args.no_compile:
        compile_gain(args, params, data, device)
    for batch in (int(size) for size in args.eval_batches.split(",") if size):
        print(f"evaluation batch {batch:5d}: {eval_seconds(params, val, device, batch) * 1000:7.1f} ms "
              f"for {len(val['label']):,} validation canvases")
    for processes in (int(count) for count in args.concurrent.split(",") if count):
        total, each = concurrent_rates(args, processes)
        print(f"concurrent trainers on one GPU: {processes:2d} -> {total:9.0f} canvases/s in all, "
              f"{each:8.0f} each", flush=True)


def main(args) -> None:
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    params = Hyperparameters(depth=args.depth, width=args.width, batch_size=args.batch_size)
    benchlib.print_setup(
        "training throughput", rows=args.rows, val_rows=args.val_rows, depth=args.depth, width=args.width,
        batch_size=args.batch_size, threads=args.threads, device=device.type,
    )
    mnist = benchlib.load_digits(args)
    data = benchlib.train_split(mnist, args.rows, args.seed)
    val = {key: value[: args.val_rows] for key, value in benchlib.train_split(mnist, args.val_rows, args.seed + 1).items()}

    plain_by_format = {
        memory_format: plain_loop(params, data, args.threads, args.seed, memory_format == "channels-last", device)[0]
        for memory_format in ("default", "channels-last")
    }
    for memory_format, rate in plain_by_format.items():
        print(f"plain PyTorch loop ({memory_format + ')':14} {rate:8.0f} canvases/s")
    plain = max(plain_by_format.values())
    started = time.perf_counter()
    engine = engine_fit(params, data, val, args.threads, args.seed, device)
    engine_wall = time.perf_counter() - started
    print(f"raylocal loop, no Ray            {engine['train_images_per_s']:8.0f} canvases/s "
          f"(wall {engine_wall:.1f}s incl. validation)")
    with benchlib.local_ray(args.threads, gpus=1 if device.type == "cuda" else 0), \
            tempfile.TemporaryDirectory(prefix="raylocal-bench-") as storage:
        ray_metrics, ray_wall = ray_train_fit(params, data, val, args.threads, args.seed, device, storage)
    print(f"raylocal loop in Ray Train       {ray_metrics['train_images_per_s']:8.0f} canvases/s "
          f"(wall {ray_wall:.1f}s incl. worker start-up and validation)")
    print(benchlib.ratio_line("ratio Ray Train loop / faster plain loop", ray_metrics["train_images_per_s"] / plain, TARGET))
    print(f"ratio raylocal loop without Ray / faster plain loop: {engine['train_images_per_s'] / plain:.3f}")
    print(f"ratio end to end (Ray Train wall incl. start-up and validation) / plain epoch: "
          f"{(args.rows / plain) / ray_wall:.3f}")
    if device.type == "cuda":
        gpu_extras(args, params, data, val, device)
    elif args.compile:
        compile_gain(args, params, data, device)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
