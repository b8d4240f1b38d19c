"""Train-loop stage: training steps, evaluation, and the epoch loop with reports and checkpoints.

Pure PyTorch. The same `fit` runs inside a Tune trial process or on every Ray Train
worker; the caller supplies the data of its rank and a `report` callback.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from raylocal.config import Hyperparameters
from raylocal.metrics import SUM_NAMES, batch_sums, localization_loss, score_batches, summarize
from raylocal.model import build_model

Arrays = dict[str, np.ndarray]
Report = Callable[[dict[str, Any], dict[str, Any] | None], None]
# Validation batches: a GPU scores faster in bigger ones; on CPUs a bigger batch buys nothing and
# costs memory (docs/decisions.md#batch-size).
EVAL_BATCH = {"cuda": 2048, "cpu": 512}


def to_tensors(arrays: Arrays, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Whole split on the device once per epoch: images stay uint8 until batched (4x less memory)."""
    pin = device.type == "cuda"

    def move(array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(array).copy())
        return (tensor.pin_memory() if pin else tensor).to(device, non_blocking=pin)

    return move(arrays["image"]), move(arrays["box"]), move(arrays["label"])


def as_batch(images: torch.Tensor) -> torch.Tensor:
    return images.unsqueeze(1).float().div_(255.0)


def autocast(device: torch.device):
    # bf16 autocast on GPUs that support it; a no-op context on CPU.
    enabled = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


@contextlib.contextmanager
def cudnn_autotune(device: torch.device):
    """cuDNN picks the fastest kernel per shape on its first use; every batch here has one shape.
    A context, so the process-wide flag is put back after training."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = saved or device.type == "cuda"
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def all_reduce(sums: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    return sums


def train_steps(model, optimizer, scheduler, data, params: Hyperparameters, device) -> torch.Tensor:
    images, boxes, labels = data
    model.train()
    steps = len(labels) // params.batch_size
    losses, outputs = [], []
    for start in range(0, steps * params.batch_size, params.batch_size):
        batch = slice(start, start + params.batch_size)
        with autocast(device):
            logits, pred_boxes = model(as_batch(images[batch]))
            loss = localization_loss(logits.float(), pred_boxes.float(), labels[batch], boxes[batch], params.box_loss_weight, params.box_loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        # Metrics once per call, not per step: per step, their small operations ran between every
        # two optimizer steps of a GPU loop bound by launches (docs/decisions.md#gpu-loop).
        losses.append(loss.detach())
        outputs.append((logits.detach(), pred_boxes.detach()))
    if not outputs:
        return torch.zeros(len(SUM_NAMES), dtype=torch.float64, device=device)
    logits, pred_boxes = (torch.cat(parts) for parts in zip(*outputs))
    rows = slice(0, steps * params.batch_size)
    sums = batch_sums(torch.stack(losses).double().mean(), logits, pred_boxes, labels[rows], boxes[rows])
    return sums


@torch.no_grad()
def evaluate(model: nn.Module, data, params: Hyperparameters, device, batch_size: int | None = None) -> torch.Tensor:
    """Loss and metric sums over `data`; evaluate the unwrapped module so no collective runs per batch."""
    model.eval()

    def forward(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(device):
            logits, boxes = model(as_batch(images))
        return logits.float(), boxes.float()

    def loss(logits, boxes, labels, target) -> torch.Tensor:
        return localization_loss(logits, boxes, labels, target, params.box_loss_weight, params.box_loss)

    sums, _ = score_batches(forward, *data, batch_size=batch_size or EVAL_BATCH.get(device.type, EVAL_BATCH["cpu"]),
                            loss=loss)
    return sums


def make_optimizer(model: nn.Module, params: Hyperparameters, steps_per_epoch: int, epochs: int):
    # Fused on CUDA: one kernel for all parameters instead of several per tensor.
    fused = next(model.parameters()).device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay, fused=fused)
    return optimizer, one_cycle(optimizer, params, steps_per_epoch * epochs)


def one_cycle(optimizer, params: Hyperparameters, total_steps: int, done_steps: int = 0):
    """One-cycle over the full budget, so trials that ASHA stops early were compared at the
    same point of the same schedule. The warm-up is short (5%): with a long one the digit
    head has barely started to learn at ASHA's first cut, and the cut is noise. OneCycleLR
    divides by (warm-up steps - 1), so tiny budgets get two warm-up steps. With `done_steps`,
    the schedule of `total_steps` continued after that many steps (a budget changed mid-run)."""
    if total_steps < 3:
        raise ValueError(f"the budget makes {total_steps} optimizer step(s); a schedule needs at least 3")
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=params.lr, total_steps=total_steps, pct_start=max(0.05, 2 / total_steps),
        last_epoch=done_steps - 1,
    )


def report_schedule(max_epochs: int, first_epoch_reports: int, reports_per_epoch: int) -> list[tuple[int, int, int]]:
    """(epoch, part, parts) of every report: the first epoch in `first_epoch_reports` parts, the
    later ones in `reports_per_epoch` parts. Dense early reports let early stopping act within
    the first epoch; sparse later ones keep validation from costing a quarter of the search."""
    return [
        (epoch, part, parts)
        for epoch in range(max_epochs)
        for parts in [first_epoch_reports if epoch == 0 else reports_per_epoch]
        for part in range(parts)
    ]


def fit(
    params: Hyperparameters,
    *,
    max_epochs: int,
    first_epoch_reports: int,
    reports_per_epoch: int,
    train_data: Callable[[int], Arrays],
    val_data: Arrays,
    train_rows: int,
    report: Report,
    device: torch.device,
    wrap: Callable[[nn.Module], nn.Module] = lambda model: model,
    resume: dict[str, Any] | None = None,
    seed: int = 0,
    stop: Callable[[], bool] = lambda: False,
    replan: Callable[[float], int] | None = None,
    init: dict[str, torch.Tensor] | None = None,
) -> None:
    """Train for `max_epochs`, reporting metrics (aggregated over all workers) and a checkpoint
    on the `report_schedule`, so that early stopping can act before a full epoch.

    `train_data(epoch)` returns this rank's `train_rows` rows of that epoch's freshly placed
    (and already shuffled) canvases; each report trains on the next contiguous part of them.
    `wrap` turns the model into its distributed form (DDP) after it is on the device.
    `resume` is a checkpoint state written by an earlier call; training continues after it.
    `stop()` is asked after every report; True ends training there (a time budget ran out).
    `replan(done, seconds)` is asked after every epoch that leaves epochs to train, with the epochs
    done and the seconds the last one took; the number of epochs it returns (at least `done`)
    replaces `max_epochs`, and the learning-rate schedule is stretched or shrunk to it from where
    it stands. Returning `done` ends training there.
    `init` is a model state dict to start from instead of a fresh initialization (a final run
    continuing a search trial's checkpoint); the optimizer and schedule still start anew.
    """
    torch.manual_seed(seed)
    model = place_model(params, device, init)
    steps = steps_per_epoch(train_rows, params.batch_size, max(first_epoch_reports, reports_per_epoch))
    plan = ReportPlan(max_epochs, first_epoch_reports, reports_per_epoch, steps)
    optimizer, scheduler = make_optimizer(model, params, plan.steps_per_epoch, max_epochs)
    index = restore(resume, model, optimizer, scheduler, device) if resume is not None else 0
    model = wrap(model)
    val = to_tensors(val_data, device)
    epoch_data = EpochCache(train_data, device)
    epoch_started = time.perf_counter()
    while index < len(plan.schedule):
        epoch, part, parts = plan.schedule[index]
        report_started = time.perf_counter()
        chunk = tuple(column[plan.rows(part, parts, params.batch_size)] for column in epoch_data.get(epoch))
        metrics = train_and_score(model, optimizer, scheduler, chunk, val, params, device)
        metrics |= {"epoch": epoch + (part + 1) / parts, "report_seconds": time.perf_counter() - report_started}
        if part == parts - 1:
            done, seconds, epoch_started = epoch + 1, time.perf_counter() - epoch_started, time.perf_counter()
            if replan is not None and done < plan.max_epochs:
                scheduler = plan.stretch(max(done, replan(done, seconds)), done, optimizer, scheduler, params)
        report(metrics, checkpoint_state(model, optimizer, scheduler, params, device, index + 1, metrics["epoch"],
                                         plan.max_epochs))
        index += 1
        if index < len(plan.schedule) and stop():
            return


def place_model(params: Hyperparameters, device: torch.device, init: dict[str, torch.Tensor] | None) -> nn.Module:
    """A fresh model, or one with `init`'s weights, on `device`."""
    model = build_model(params.model_config())
    if init is not None:
        model.load_state_dict(init)
    # Channels-last: on CPUs the faster layout for these convolutions, on GPUs the one cuDNN's
    # bf16 kernels want (docs/decisions.md#gpu-loop).
    return model.to(device, memory_format=torch.channels_last)


def steps_per_epoch(train_rows: int, batch_size: int, parts: int) -> int:
    """Optimizer steps in an epoch of `train_rows` rows, which must give each of an epoch's
    `parts` reports at least one."""
    steps = train_rows // batch_size
    if steps < parts:
        raise ValueError(f"{train_rows} training rows per worker make less than one batch of {batch_size} per report")
    return steps


class EpochCache:
    """This rank's rows of the current epoch, on the device: loaded once for all of its reports."""

    def __init__(self, train_data: Callable[[int], Arrays], device: torch.device) -> None:
        self.train_data, self.device = train_data, device
        self.epoch: int | None = None
        self.tensors: tuple[torch.Tensor, ...] = ()

    def get(self, epoch: int) -> tuple[torch.Tensor, ...]:
        if self.epoch != epoch:
            self.tensors, self.epoch = to_tensors(self.train_data(epoch), self.device), epoch
        return self.tensors


class ReportPlan:
    """The reports of a run (`report_schedule`) and the rows each trains on; `stretch` re-plans
    the number of epochs."""

    def __init__(self, max_epochs: int, first_epoch_reports: int, reports_per_epoch: int, steps_per_epoch: int) -> None:
        self.first_epoch_reports, self.reports_per_epoch = first_epoch_reports, reports_per_epoch
        self.steps_per_epoch = steps_per_epoch
        self.max_epochs = max_epochs
        self.schedule = report_schedule(max_epochs, first_epoch_reports, reports_per_epoch)

    def rows(self, part: int, parts: int, batch_size: int) -> slice:
        """The rows of an epoch's report `part` of `parts`: whole batches, contiguous."""
        return slice(part * self.steps_per_epoch // parts * batch_size,
                     (part + 1) * self.steps_per_epoch // parts * batch_size)

    def stretch(self, planned: int, done: int, optimizer, scheduler, params: Hyperparameters):
        """`planned` epochs instead of `max_epochs`, `done` of them trained; returns the learning-rate
        schedule to go on with: `scheduler` where the plan is unchanged or training ends here,
        else one over the new plan, continued from where it stands."""
        if planned == self.max_epochs:
            return scheduler
        self.max_epochs = planned
        self.schedule = report_schedule(planned, self.first_epoch_reports, self.reports_per_epoch)
        if planned <= done:
            return scheduler
        return one_cycle(optimizer, params, self.steps_per_epoch * planned, done_steps=self.steps_per_epoch * done)


def restore(resume: dict[str, Any], model, optimizer, scheduler, device: torch.device) -> int:
    """Load a checkpoint state written by `checkpoint_state`; returns the report to continue with."""
    model.load_state_dict(resume["model"])
    optimizer.load_state_dict(resume["optimizer"])
    scheduler.load_state_dict(resume["scheduler"])
    # Dropout draws from the global generator; restoring it makes a resumed run exact.
    torch.set_rng_state(resume["rng"])
    if device.type == "cuda" and "cuda_rng" in resume:
        torch.cuda.set_rng_state(resume["cuda_rng"], device)
    return resume["report"]


def train_and_score(model, optimizer, scheduler, chunk, val, params: Hyperparameters, device) -> dict[str, float]:
    """Train on `chunk`, then score `val`: the metrics of one report, summed over all workers."""
    started = time.perf_counter()
    with cudnn_autotune(device):
        train_sums = all_reduce(train_steps(model, optimizer, scheduler, chunk, params, device))
    trained = train_sums[0].item()  # waits for the GPU, so the time below is the real one
    train_seconds = time.perf_counter() - started
    val_sums = all_reduce(evaluate(unwrap(model), val, params, device))
    return summarize(train_sums, "train") | summarize(val_sums, "val") | {"train_images_per_s": trained / train_seconds}


def checkpoint_state(model, optimizer, scheduler, params: Hyperparameters, device, report: int, epoch: float,
                     max_epochs: int) -> dict:
    """Everything a resumed run needs to continue exactly after report number `report`."""
    return {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "report": report,
        "rng": torch.get_rng_state(),
        **({"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}),
        "epoch": epoch,
        "max_epochs": max_epochs,  # the plan a resumed run keeps (a re-plan may have changed it)
        "hyperparameters": asdict(params),
    }
