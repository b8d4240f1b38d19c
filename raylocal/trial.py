"""Ray Train stage: run one trial's training, inline in the Tune trial or as a DDP TorchTrainer.

Inline is for one worker per trial, on CPUs or on a fraction of a GPU: a TorchTrainer would
start a controller and worker processes (each importing torch) per trial, which buys nothing
there. Several workers go through TorchTrainer with DDP (NCCL on GPUs, gloo on CPUs). Both
paths call the same `engine.fit`; `raylocal.resources` decides which one runs. The final
phase's runs (`raylocal.final`) use the same TorchTrainer (`make_trainer`) and worker (`train_worker`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray import train, tune

from raylocal.config import OBJECTIVE, Hyperparameters
from raylocal.data import SearchData
from raylocal.engine import fit
from raylocal.resources import Layout

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass(frozen=True)
class TrialSettings:
    max_epochs: int
    first_epoch_reports: int
    reports_per_epoch: int
    layout: Layout
    storage_path: str  # a folder, or a path in `storage_filesystem`
    experiment_name: str
    seed: int
    fixed: dict[str, Any]
    max_failures: int = 2
    report_logs: bool = False  # Ray's per-report log lines (`--verbose 3`); see `ray_report_logs`
    storage_filesystem: Any = None  # pyarrow's, for object storage (`raylocal.storage`); None: local


def save_checkpoint_dir(state: dict[str, Any], directory: str) -> None:
    torch.save(state, Path(directory) / CHECKPOINT_FILE)


def load_checkpoint_state(checkpoint) -> dict[str, Any] | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


# The loggers of Ray's per-report lines: "Checkpoint successfully created at: ..." in Tune trials
# and in Train workers. Train workers also log "Reporting training result N: TrainingReport(...)",
# every metric of every report on one line, through a logger named by its module's file, which
# Ray Train's LoggingConfig does not reach (it filters "ray.train.*" names only).
REPORT_LOGGERS = ("ray.train._internal.storage", "ray.train.v2._internal.execution.storage")


def report_logger_names() -> list[str]:
    names = list(REPORT_LOGGERS)
    with contextlib.suppress(ImportError):
        from ray.train.v2._internal.execution import context

        names.append(context.__file__)
    return names


@contextlib.contextmanager
def ray_report_logs(shown: bool) -> Iterator[None]:
    """Ray's per-report log lines, hidden unless `shown`, put back as they were afterwards: a
    default search and final run would print one or more per report between Tune's tables,
    repeating what the status table and raylocal's own progress lines say."""
    loggers = [logging.getLogger(name) for name in report_logger_names()]
    levels = [logger.level for logger in loggers]
    if not shown:
        for logger in loggers:
            logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def run_trial(config: dict[str, Any], data: SearchData, settings: TrialSettings) -> None:
    """The Tune function trainable: one hyperparameter configuration, trained to the end or until ASHA stops it."""
    # Fixed hyperparameters travel with the settings so that Tune's tables show only searched ones.
    params = Hyperparameters.from_dict(settings.fixed | config)
    if settings.layout.backend == "inline":
        train_inline(params, data, settings)
    else:
        train_distributed(params, data, settings)


def trial_device(layout: Layout, train_worker: bool = False) -> torch.device:
    """Where this worker computes. A worker meant for CUDA that finds none fails here, before
    training: falling back to the CPU would run a GPU search at a small fraction of its speed."""
    if layout.device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(
            "this trial holds GPUs but PyTorch sees no CUDA device "
            f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
            "pass --device cpu to compute on CPUs, or --gpus-per-worker 0 to take no GPUs"
        )
    if train_worker:
        # Ray Train shows every worker on a node all of that node's GPUs; this picks the worker's own.
        from ray.train.torch import get_device

        return get_device()
    # An inline trial sees only its own GPU (Ray sets CUDA_VISIBLE_DEVICES to it).
    return torch.device("cuda", 0)


def gather_workers(world_size: int, device: torch.device) -> list[tuple[str, int, str, str]]:
    """(Ray node, process id, Ray GPU ids, device) of every worker of this trial, so results
    show where it really ran."""
    gpu_ids = "+".join(str(gpu) for gpu in ray.get_gpu_ids())
    worker = (ray.get_runtime_context().get_node_id(), os.getpid(), gpu_ids or "-", str(device))
    if world_size == 1:
        return [worker]
    workers: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(workers, worker)
    return workers


def placement_metrics(workers: list[tuple[str, int, str, str]]) -> dict[str, str]:
    """Where a run's workers ran, as the metrics every report carries."""
    return {
        "worker_nodes": ",".join(sorted({node for node, *_ in workers})),
        "worker_pids": ",".join(str(pid) for _, pid, *_ in workers),
        "worker_gpus": ",".join(gpus for *_, gpus, _ in workers),
        "worker_devices": ",".join(device for *_, device in workers),
    }


def checkpoint_reporter(session, rank: int, world_size: int, placement: dict[str, str], history: list[dict],
                        progress: Callable[[dict[str, Any], dict[str, Any]], None] | None):
    """`engine.fit`'s report callback: the metrics to `session` from every rank, with rank 0's
    checkpoint, which carries `history` too."""

    def report(metrics: dict[str, Any], state: dict[str, Any]) -> None:
        history.append({key: value for key, value in metrics.items() if isinstance(value, int | float)})
        metrics = metrics | placement
        # Every rank must report; only rank 0 writes the (identical) DDP state.
        if rank != 0:
            session.report(metrics)
            return
        with tempfile.TemporaryDirectory() as directory:
            save_checkpoint_dir(state | {"history": history, "world_size": world_size}, directory)
            session.report(metrics, checkpoint=session.Checkpoint.from_directory(directory))
        if progress is not None:
            progress(metrics, state)

    return report


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
    train_data=None,
    stop=lambda: False,
    replan=None,
    init=None,
    progress: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
) -> None:
    """`engine.fit` on this rank's share of the data; `session` is `ray.tune` or `ray.train`,
    whose report/get_checkpoint/Checkpoint have the same shape but are different classes.
    `train_data(epoch)` gives this rank's rows of an epoch (default: the search's epochs).
    `progress(metrics, state)` is called on rank 0 after each report."""
    torch.set_num_threads(settings.layout.cpus_per_worker)
    placement = placement_metrics(gather_workers(world_size, device))
    resume = load_checkpoint_state(session.get_checkpoint())
    # Every report's metrics travel in each checkpoint: Ray Train keeps the metrics of kept
    # checkpoints only, and a learning curve should survive a resume.
    history = list(resume.get("history", [])) if resume else []
    report = checkpoint_reporter(session, rank, world_size, placement, history, progress)
    with ray_report_logs(settings.report_logs):
        fit(
            params,
            max_epochs=settings.max_epochs,
            first_epoch_reports=settings.first_epoch_reports,
            reports_per_epoch=settings.reports_per_epoch,
            train_data=train_data or (lambda epoch: data.train_epochs[epoch].fetch(rank, world_size)),
            val_data=data.val.fetch(rank, world_size),
            train_rows=data.train_epochs[0].rows // world_size,
            report=report,
            device=device,
            wrap=wrap,
            resume=resume,
            seed=settings.seed,
            stop=stop,
            replan=replan,
            init=init,
        )


def train_inline(params: Hyperparameters, data: SearchData, settings: TrialSettings) -> None:
    fit_this_rank(params, data, settings, session=tune, rank=0, world_size=1, device=trial_device(settings.layout))


def train_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker of a trial or of a final run (`make_trainer`); DDP over the
    process group Ray Train set up. `loop_config` holds `params`, `data` and `settings`, and may
    add what a final run needs (`final_loop_options`)."""
    context = train.get_context()
    settings, data = loop_config["settings"], loop_config["data"]
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = trial_device(settings.layout, train_worker=True)
    fit_this_rank(
        Hyperparameters(**loop_config["params"]), data, settings, session=train, rank=rank, world_size=world_size,
        device=device, wrap=ddp_wrap(device, world_size),
        **final_loop_options(loop_config, settings, data, device, world_size),
    )


def final_loop_options(loop_config: dict[str, Any], settings: TrialSettings, data: SearchData, device: torch.device,
                       world_size: int) -> dict[str, Any]:
    """The `fit_this_rank` options a final run's `loop_config` asks for: `stream` (its epochs come
    from the "train" dataset shard), `deadline` and `cap` (re-plan the epochs after each one),
    `init` (weights to start from), `progress` (a line per epoch)."""
    options: dict[str, Any] = {}
    if loop_config.get("stream"):
        from raylocal.data import StreamReader

        stream = StreamReader(train.get_dataset_shard("train"))
        rows = data.train_epochs[0].rows // world_size
        options["train_data"] = lambda epoch: stream.take(rows)
    if loop_config.get("deadline"):
        from raylocal.final import fit_to_deadline

        options["replan"] = fit_to_deadline(loop_config["deadline"], loop_config["cap"], device, world_size)
    if loop_config.get("init") is not None:
        options["init"] = loop_config["init"]
    if loop_config.get("progress"):
        from raylocal.final import epoch_line

        # Ray Train's worker logging (on unless RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING=0) shows this
        # logger's lines once, on the console and in the run's log file; a print would show twice
        # (Ray Train tees prints into its logging).
        log = logging.getLogger("raylocal.final")
        options["progress"] = lambda metrics, state: log.info(
            epoch_line(settings.experiment_name, metrics, state["max_epochs"]))
    return options


def ddp_wrap(device: torch.device, world_size: int):
    """DDP for several workers; one worker has nothing to all-reduce, and DDP's hooks would
    still add kernels to every step."""
    from torch.nn.parallel import DistributedDataParallel

    if world_size == 1:
        return lambda model: model
    return lambda model: DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def make_trainer(layout: Layout, loop_config: dict[str, Any], *, name: str, storage_path: str, max_failures: int,
                 checkpoint_config, callbacks=(), datasets=None, dataset_config=None, storage_filesystem=None):
    """The TorchTrainer of every DDP run raylocal starts, a trial's or a final run's: `layout`'s
    workers, each running `train_worker(loop_config)`, in `raylocal.ddp`'s process group."""
    from ray.train.torch import TorchTrainer

    from raylocal.ddp import torch_config

    return TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
        torch_config=torch_config(layout.dist_backend),
        scaling_config=train.ScalingConfig(
            num_workers=layout.workers, use_gpu=layout.uses_gpus, resources_per_worker=layout.worker_resources()
        ),
        run_config=train.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            callbacks=list(callbacks) or None,
            failure_config=train.FailureConfig(max_failures=max_failures),
            checkpoint_config=checkpoint_config,
        ),
        datasets=datasets,
        dataset_config=dataset_config,
    )


def train_distributed(params: Hyperparameters, data: SearchData, settings: TrialSettings) -> None:
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    trainer = make_trainer(
        settings.layout,
        {"params": asdict(params), "data": data, "settings": settings},
        # A stable name per trial lets a restarted trial find its Train run and resume it.
        name=f"{settings.experiment_name}-train-{trial_id}",
        storage_path=posixpath.join(settings.storage_path, f"{settings.experiment_name}-train-runs"),
        storage_filesystem=settings.storage_filesystem,
        max_failures=settings.max_failures,
        checkpoint_config=train.CheckpointConfig(
            num_to_keep=2, checkpoint_score_attribute=OBJECTIVE, checkpoint_score_order="max"
        ),
        callbacks=[TuneReportCallback()],
    )
    trainer.fit()
