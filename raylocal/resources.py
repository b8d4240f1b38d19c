"""Layout stage: how trials use the cluster's CPUs and GPUs.

One decision, made once per command from the flags and the cluster's resources, and used by
everything that starts training (the search's trials today, a final training phase later):

- no GPUs, one worker per trial: the trial trains inline (inside the Tune trial process);
- GPUs, one worker per trial: the trial trains inline on a fraction (1/K) of a GPU, so K
  trials share each GPU. A trial of this small CNN keeps a small part of a GPU busy, and a
  `TorchTrainer` per trial would pay a controller and worker processes per trial;
- several workers per trial: a `TorchTrainer` with DDP, whole GPUs per worker where there
  are GPUs (NCCL refuses two ranks on one GPU: "Duplicate GPU detected").

`device` says where the arithmetic runs: `auto` is CUDA when the trial holds a GPU, `cpu`
computes on CPUs even so (for Ray's logical GPUs on machines without CUDA), `cuda` insists.
A trial meant for CUDA that finds none fails; it never falls back to the CPU silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from fractions import Fraction

from raylocal.config import ConfigError

BACKENDS = ("auto", "inline", "ray-train")
DEVICES = ("auto", "cuda", "cpu")
# Trials sharing one GPU: past this many, more trainers trained no faster between them
# (docs/decisions.md#trials-per-gpu).
TRIALS_PER_GPU = 8
# A trial that drives a TorchTrainer computes nothing itself: it holds no CPU (else the
# workers of a trial could never fit on a 2-core machine), only the memory it uses.
DRIVER_MEMORY = 512 * 1024**2


@dataclass(frozen=True)
class Layout:
    backend: str  # "inline" or "ray-train"
    workers: int
    cpus_per_worker: int
    gpus_per_worker: float
    device: str  # "cuda" or "cpu": where a worker computes
    concurrent: int
    reason: str

    @property
    def uses_gpus(self) -> bool:
        return self.gpus_per_worker > 0

    @property
    def dist_backend(self) -> str:
        return "nccl" if self.device == "cuda" else "gloo"

    def trial_resources(self) -> dict[str, float]:
        """What Tune reserves for one trial (its workers reserve their own under Ray Train)."""
        if self.backend == "inline":
            return {"CPU": self.cpus_per_worker} | ({"GPU": self.gpus_per_worker} if self.uses_gpus else {})
        return {"CPU": 0, "memory": DRIVER_MEMORY}

    def worker_resources(self) -> dict[str, float]:
        return {"CPU": self.cpus_per_worker} | ({"GPU": self.gpus_per_worker} if self.uses_gpus else {})

    def describe(self, cpus: int, gpus: float) -> str:
        each = f"{self.workers} worker(s) x {self.cpus_per_worker} CPU"
        if self.uses_gpus:
            each += f" + {self.gpus_per_worker:g} GPU"
        if self.backend == "inline":
            how = "inline (training runs inside the Tune trial, no extra processes)"
        else:
            how = f"Ray Train TorchTrainer, DDP over {self.dist_backend}"
        return (f"layout: {cpus} CPUs, {gpus:g} GPUs; each trial: {each}, computing on {self.device}; backend: {how}; "
                f"up to {self.concurrent} trials at once ({self.reason})")


def check_resource_flags(workers: int, cpus_per_worker: int, gpus_per_worker: float | None,
                         trials_per_gpu: int | None, backend: str, device: str) -> None:
    """The resource flags on their own, before any cluster is known (`Settings` checks them at the edge)."""
    for flag, value in (("--workers-per-trial", workers), ("--cpus-per-worker", cpus_per_worker)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if backend not in BACKENDS:
        raise ConfigError(f"--backend must be one of {BACKENDS}, got {backend!r}")
    if device not in DEVICES:
        raise ConfigError(f"--device must be one of {DEVICES}, got {device!r}")
    if trials_per_gpu is not None and trials_per_gpu < 1:
        raise ConfigError(f"--trials-per-gpu must be >= 1, got {trials_per_gpu}")
    if gpus_per_worker is not None and gpus_per_worker < 0:
        raise ConfigError(f"--gpus-per-worker must be >= 0, got {gpus_per_worker}")
    if gpus_per_worker is not None and trials_per_gpu is not None:
        raise ConfigError("give --trials-per-gpu or --gpus-per-worker, not both")
    if backend == "inline" and workers > 1:
        raise ConfigError("--backend inline trains one worker per trial; use ray-train for --workers-per-trial > 1")


def choose_layout(
    cpus: int,
    gpus: float,
    *,
    workers: int = 1,
    cpus_per_worker: int = 1,
    gpus_per_worker: float | None = None,
    trials_per_gpu: int | None = None,
    backend: str = "auto",
    device: str = "auto",
) -> Layout:
    """The layout for a cluster of `cpus` CPUs and `gpus` GPUs; flags left None take defaults."""
    check_resource_flags(workers, cpus_per_worker, gpus_per_worker, trials_per_gpu, backend, device)
    if trials_per_gpu is not None and gpus == 0:
        raise ConfigError("--trials-per-gpu needs GPUs, and the cluster has none")
    if backend == "auto":
        backend = "inline" if workers == 1 else "ray-train"
    shared = backend == "inline" and gpus > 0 and gpus_per_worker is None
    if gpus_per_worker is None:
        if gpus == 0:
            gpus_per_worker = 0.0
        elif backend == "inline":
            # Ray counts GPU fractions to 1e-4: round down so that K of them fit on one GPU.
            gpus_per_worker = math.floor(10_000 / (trials_per_gpu or TRIALS_PER_GPU)) / 10_000
        else:
            gpus_per_worker = 1.0
    if trials_per_gpu is not None and backend != "inline":
        raise ConfigError("--trials-per-gpu shares GPUs between one-worker trials; DDP workers take whole GPUs")
    if workers > 1 and gpus_per_worker not in (0, int(gpus_per_worker)):
        raise ConfigError(f"DDP workers need whole GPUs (NCCL refuses two ranks on one GPU), got --gpus-per-worker "
                          f"{gpus_per_worker:g}")
    if gpus_per_worker * workers > gpus:
        raise ConfigError(f"a trial asks for {gpus_per_worker * workers:g} GPUs but the cluster has {gpus:g}")
    if cpus_per_worker * workers > cpus:
        raise ConfigError(f"a trial asks for {cpus_per_worker * workers} CPUs but the cluster has {cpus}")
    if device == "cuda" and not gpus_per_worker:
        raise ConfigError("--device cuda needs GPUs for every worker, and this layout gives them none")
    by_cpus = cpus // (cpus_per_worker * workers)
    concurrent, reason = by_cpus, f"CPUs / {cpus_per_worker * workers} per trial"
    if gpus_per_worker:
        by_gpus = int(Fraction(str(gpus)) // (Fraction(str(gpus_per_worker)) * workers))
        if by_gpus < by_cpus:
            concurrent, reason = by_gpus, f"GPUs / {gpus_per_worker * workers:g} per trial"
        else:
            reason += f"; the GPUs would take {by_gpus}"
        if shared:
            reason += f"; {round(1 / gpus_per_worker)} trials share each GPU"
    return Layout(
        backend=backend, workers=workers, cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
        device="cuda" if device == "auto" and gpus_per_worker else ("cpu" if device == "auto" else device),
        concurrent=max(1, concurrent), reason=reason,
    )


def cluster_resources() -> tuple[int, float]:
    """CPUs and GPUs of the running Ray cluster."""
    import ray

    resources = ray.cluster_resources()
    return int(resources.get("CPU", 0)), resources.get("GPU", 0.0)


def cluster_layout(settings, log=print) -> Layout:
    """`choose_layout` for the running Ray cluster and a search's `Settings`; prints the layout line."""
    cpus, gpus = cluster_resources()
    layout = choose_layout(
        cpus, gpus, workers=settings.workers_per_trial, cpus_per_worker=settings.cpus_per_worker,
        gpus_per_worker=settings.gpus_per_worker, trials_per_gpu=settings.trials_per_gpu, backend=settings.backend,
        device=settings.device,
    )
    log(layout.describe(cpus, gpus))
    return layout


def final_layout(cpus: int, gpus: float, *, cpus_per_worker: int = 1, device: str = "auto") -> Layout:
    """The final phase trains one model on the whole cluster: one DDP worker per whole GPU
    (with an even share of the CPUs, at most `cpus_per_worker`), or without GPUs one worker per
    `cpus_per_worker` CPUs. Always a TorchTrainer, so it also spans every node."""
    whole_gpus = int(gpus) if device != "cpu" else 0
    if whole_gpus:
        workers = whole_gpus
        cpus_per_worker = max(1, min(cpus_per_worker, cpus // workers))
    else:
        workers = max(1, cpus // cpus_per_worker)
    layout = choose_layout(cpus, gpus, workers=workers, cpus_per_worker=cpus_per_worker,
                           gpus_per_worker=1.0 if whole_gpus else 0.0, backend="ray-train", device=device)
    reason = f"one worker per GPU, {whole_gpus} GPUs" if whole_gpus else f"{cpus} CPUs / {cpus_per_worker} per worker"
    return replace(layout, concurrent=1, reason=reason)


def cluster_final_layout(settings) -> Layout:
    """`final_layout` for the running Ray cluster and a search's `Settings`."""
    cpus, gpus = cluster_resources()
    return final_layout(cpus, gpus, cpus_per_worker=settings.cpus_per_worker, device=settings.device)
