"""Ray Train stage: run one trial's training, inline in the Tune trial or as a DDP TorchTrainer.

Inline is for one CPU worker per trial: a TorchTrainer would start a controller and worker
processes (each importing torch) per trial, which buys nothing there. Several workers or
GPUs go through TorchTrainer with DDP (NCCL on GPUs, gloo on CPUs). Both paths call the
same `engine.fit`.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray import train, tune

from raylocal.config import Hyperparameters
from raylocal.data import SearchData
from raylocal.engine import fit

CHECKPOINT_FILE = "checkpoint.pt"
BACKENDS = ("inline", "ray-train")


@dataclass(frozen=True)
class TrialSettings:
    max_epochs: int
    first_epoch_reports: int
    reports_per_epoch: int
    workers: int
    cpus_per_worker: int
    gpus_per_worker: float
    backend: str
    storage_path: str
    experiment_name: str
    seed: int
    fixed: dict[str, Any]
    max_failures: int = 2

    @property
    def device_kind(self) -> str:
        return "cuda" if self.gpus_per_worker > 0 else "cpu"


def save_checkpoint_dir(state: dict[str, Any], directory: str) -> None:
    torch.save(state, Path(directory) / CHECKPOINT_FILE)


def load_checkpoint_state(checkpoint) -> dict[str, Any] | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def run_trial(config: dict[str, Any], data: SearchData, settings: TrialSettings) -> None:
    """The Tune function trainable: one hyperparameter configuration, trained to the end or until ASHA stops it."""
    # Fixed hyperparameters travel with the settings so that Tune's tables show only searched ones.
    params = Hyperparameters.from_dict(settings.fixed | config)
    if settings.backend == "inline":
        train_inline(params, data, settings)
    else:
        train_distributed(params, data, settings)


def gather_workers(world_size: int) -> list[tuple[str, int]]:
    """(Ray node, process id) of every worker of this trial, so results show where it really ran."""
    worker = (ray.get_runtime_context().get_node_id(), os.getpid())
    if world_size == 1:
        return [worker]
    workers: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(workers, worker)
    return workers


def fit_this_rank(
    params: Hyperparameters,
    data: SearchData,
    settings: TrialSettings,
    *,
    session,
    rank: int,
    world_size: int,
    device: torch.device,
    wrap=lambda model: model,
) -> None:
    """`engine.fit` on this rank's share of the data; `session` is `ray.tune` or `ray.train`,
    whose report/get_checkpoint/Checkpoint have the same shape but are different classes."""
    torch.set_num_threads(settings.cpus_per_worker)
    workers = gather_workers(world_size)
    placement = {
        "worker_nodes": ",".join(sorted({node for node, _ in workers})),
        "worker_pids": ",".join(str(pid) for _, pid in workers),
    }

    def report(metrics: dict[str, Any], state: dict[str, Any]) -> None:
        metrics = metrics | placement
        # Every rank must report; only rank 0 writes the (identical) DDP state.
        if rank != 0:
            session.report(metrics)
            return
        with tempfile.TemporaryDirectory() as directory:
            save_checkpoint_dir(state, directory)
            session.report(metrics, checkpoint=session.Checkpoint.from_directory(directory))

    fit(
        params,
        max_epochs=settings.max_epochs,
        first_epoch_reports=settings.first_epoch_reports,
        reports_per_epoch=settings.reports_per_epoch,
        train_data=lambda epoch: data.train_epochs[epoch].fetch(rank, world_size),
        val_data=data.val.fetch(rank, world_size),
        train_rows=data.train_epochs[0].rows // world_size,
        report=report,
        device=device,
        wrap=wrap,
        resume=load_checkpoint_state(session.get_checkpoint()),
        seed=settings.seed,
    )


def train_inline(params: Hyperparameters, data: SearchData, settings: TrialSettings) -> None:
    fit_this_rank(params, data, settings, session=tune, rank=0, world_size=1, device=torch.device(settings.device_kind))


def train_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker; DDP over the process group Ray Train set up."""
    import ray.train.torch

    context = train.get_context()
    fit_this_rank(
        Hyperparameters(**loop_config["params"]),
        loop_config["data"],
        loop_config["settings"],
        session=train,
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        device=ray.train.torch.get_device(),
        wrap=lambda model: ray.train.torch.prepare_model(model, move_to_device=False),
    )


def train_distributed(params: Hyperparameters, data: SearchData, settings: TrialSettings) -> None:
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    use_gpu = settings.gpus_per_worker > 0
    resources = {"CPU": settings.cpus_per_worker} | ({"GPU": settings.gpus_per_worker} if use_gpu else {})
    trial_id = tune.get_context().get_trial_id()
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"params": asdict(params), "data": data, "settings": settings},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=train.ScalingConfig(
            num_workers=settings.workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=train.RunConfig(
            # A stable name per trial lets a restarted trial find its Train run and resume it.
            name=f"{settings.experiment_name}-train-{trial_id}",
            storage_path=os.path.join(settings.storage_path, f"{settings.experiment_name}-train-runs"),
            callbacks=[TuneReportCallback()],
            failure_config=train.FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=train.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute="val_det_iou", checkpoint_score_order="max"
            ),
        ),
    )
    trainer.fit()
