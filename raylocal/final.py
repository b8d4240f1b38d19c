"""Final training stage: train the search's best configuration on the whole cluster.

The search compares configurations on short, early-stopped budgets; the model a user ships is
then trained with what is left of the wall time, by one Ray Train `TorchTrainer` with DDP over
every worker the cluster has (gloo on CPUs, NCCL on GPUs), its data streamed by Ray Data. By
default it starts from the winning trial's best search checkpoint, so the epochs the search
already gave the winner are not thrown away (`--final-init scratch`: a fresh initialization).

Time: `TimeBudget` splits a whole-command budget between the search and this phase; the number
of epochs is planned from the training speed the search measured for the winner, and the
workers re-plan it after every epoch from that epoch's time (fewer when they run slow).
"""

from __future__ import annotations

import math
import posixpath
import time
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from raylocal.budget import START_SECONDS, TimeBudget
from raylocal.config import OBJECTIVE, ConfigError, Hyperparameters
from raylocal.resources import Layout

if TYPE_CHECKING:
    import torch

# Without a time budget and without --final-epochs: twice the default search's longest trial.
DEFAULT_FINAL_EPOCHS = 10
# With a budget, at most this many epochs: a GPU's budget would allow far more (docs/decisions.md#max-final-epochs).
MAX_FINAL_EPOCHS = 30
# Each DDP worker's share of a one-worker trial's speed, with margin (docs/decisions.md#ddp-efficiency).
DDP_EFFICIENCY = 0.8
# Where a final run starts: the trial's best search checkpoint, or a fresh initialization.
FINAL_INITS = ("checkpoint", "scratch")
# A run continuing an annealed checkpoint peaks at least at this share of the searched rate: the full
# rate undid the search's epochs (docs/decisions.md#final-learning-rate); see `continued_lr`.
FINAL_LR_SCALE = 0.3


@dataclass(frozen=True)
class FinalSettings:
    epochs: int | None = None  # --final-epochs: exactly this many (at most this many with a budget)
    top_k: int = 1
    seeds: int = 1
    enabled: bool = True
    init: str = "checkpoint"  # --final-init: one of FINAL_INITS
    lr_scale: float = FINAL_LR_SCALE  # --final-lr-scale: least peak learning rate of a run from a checkpoint

    def __post_init__(self) -> None:
        for key in ("epochs", "top_k", "seeds"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"--final-{key.replace('_', '-')} must be >= 1, got {value}")
        if self.init not in FINAL_INITS:
            raise ConfigError(f"--final-init must be one of {FINAL_INITS}, got {self.init!r}")
        if not 0 < self.lr_scale <= 10:
            raise ConfigError(f"--final-lr-scale must be in (0, 10], got {self.lr_scale:g}")


@dataclass(frozen=True)
class Candidate:
    """A configuration the search found, with what the search measured of it."""

    trial_id: str
    config: dict[str, Any]  # the searched hyperparameters
    score: float  # best validation objective of the trial
    epoch: float  # the epoch of that report
    canvases_per_s: float  # median training speed of one worker in the search
    checkpoint: Any = None  # the trial's best search checkpoint (a ray.train.Checkpoint)
    compared_at: float | None = None  # the start point's last epoch, where it was ranked against it


@dataclass(frozen=True)
class FinalRun:
    candidate: Candidate
    seed: int
    params: Hyperparameters  # with the global batch size
    state: dict[str, Any]  # the last checkpoint state (model, optimizer, ...)
    curve: list[dict[str, float]]  # one row per epoch
    seconds: float
    placement: dict[str, str]  # nodes, process ids and devices of its workers
    init_epoch: float = 0.0  # epochs of the search checkpoint it started from (0: from scratch)
    checkpoint_lr: float | None = None  # the learning rate that checkpoint's schedule had reached

    @property
    def validation(self) -> dict[str, float]:
        return {key: value for key, value in self.curve[-1].items() if key.startswith("val_")}


@dataclass(frozen=True)
class FinalOutcome:
    winner: FinalRun
    runs: list[FinalRun]
    layout: Layout
    epochs: int
    plan: str
    stopped_early: bool = False

    def card(self) -> dict[str, Any]:
        """What the model card records of this phase."""
        return {
            "plan": self.plan,
            "workers": self.layout.workers, "cpus_per_worker": self.layout.cpus_per_worker,
            "gpus_per_worker": self.layout.gpus_per_worker, "device": self.layout.device,
            "dist_backend": self.layout.dist_backend, "global_batch_size": self.winner.params.batch_size,
            # What each worker's loop really used (its checkpoint's hyperparameters).
            "batch_size_per_worker": self.winner.state["hyperparameters"]["batch_size"],
            "peak_lr": self.winner.state["hyperparameters"]["lr"],
            "epochs_planned": self.epochs, "epochs_replanned": self.winner.state["max_epochs"],
            "epochs_trained": self.winner.curve[-1]["epoch"],
            "stopped_by_time_budget": self.stopped_early,
            "trial_id": self.winner.candidate.trial_id, "seed": self.winner.seed,
            # The start point's last epoch, where the candidates were ranked against it (None: by best score).
            "compared_at_epoch": self.winner.candidate.compared_at,
            # The search checkpoint's epochs the run continued from (0: from scratch).
            "init": "checkpoint" if self.winner.init_epoch else "scratch", "init_epoch": self.winner.init_epoch,
            "checkpoint_lr": self.winner.checkpoint_lr,
            "seconds": round(self.winner.seconds, 1),
            "worker_nodes": self.winner.placement.get("worker_nodes", ""),
            "curve": self.winner.curve,
            "runs": [{"trial_id": run.candidate.trial_id, "search_score": run.candidate.score, "seed": run.seed,
                      OBJECTIVE: run.validation.get(OBJECTIVE), "seconds": round(run.seconds, 1)}
                     for run in self.runs],
        }


def candidates(results, top_k: int, workers_per_trial: int = 1, checkpoints: bool = False,
               start_point: dict | None = None) -> list[Candidate]:
    """The `top_k` trials of a Tune ResultGrid, with their best checkpoints if asked; speeds per
    worker (a trial reports the sum over its workers). Ranked by their best validation objective,
    or, given the searched values of a start point that trained (`keep_start_point`), at equal
    epochs: first the trials that trained at least as far as the start point, by their best score
    up to its last epoch (a tie keeps the start point), then the others by their best score. A
    trial twice as fast no longer wins on the epochs its speed bought it in a time-boxed search."""
    from raylocal.publish import best_checkpoint
    from raylocal.stopping import is_config

    found = []
    for result in results:
        frame = result.metrics_dataframe
        if frame is None or OBJECTIVE not in frame or frame[OBJECTIVE].isna().all():
            continue
        best = frame.loc[frame[OBJECTIVE].idxmax()]
        speed = frame["train_images_per_s"].median() / workers_per_trial if "train_images_per_s" in frame else math.nan
        found.append((Candidate(trial_id=str(best.get("trial_id", result.path)), config=dict(result.config),
                                score=float(best[OBJECTIVE]), epoch=float(best["epoch"]),
                                canvases_per_s=float(speed)), result))
    starts = [result.metrics_dataframe for candidate, result in found if is_config(candidate.config, start_point)]
    # The kept trial is the one that trained furthest (a sampler may draw the same values again).
    reach = max((frame["epoch"].max() for frame in starts), default=None)

    def rank(candidate: Candidate, frame) -> tuple:
        if reach is None or frame["epoch"].max() < reach:
            return (1, -candidate.score, 0)
        upto = frame.loc[frame["epoch"] <= reach, OBJECTIVE].max()
        return (0, -upto if math.isfinite(upto) else math.inf, not is_config(candidate.config, start_point))

    ranked = sorted(((rank(candidate, result.metrics_dataframe), candidate, result) for candidate, result in found),
                    key=lambda row: row[0])
    chosen = [(replace(candidate, compared_at=None if key[0] else float(reach)), result)
              for key, candidate, result in ranked[:top_k]]
    # Only the chosen trials' checkpoints are looked up: another trial's missing one does not matter.
    return [replace(candidate, checkpoint=best_checkpoint(result)[0]) if checkpoints else candidate
            for candidate, result in chosen]


def plan_epochs(settings: FinalSettings, chosen: list[Candidate], layout: Layout, rows: int, val_rows: int,
                budget: TimeBudget | None) -> tuple[int, str]:
    """How many epochs each final run trains, and the line that says why."""
    runs = len(chosen) * settings.seeds
    if budget is None:
        epochs = settings.epochs or DEFAULT_FINAL_EPOCHS
        return epochs, f"{epochs} epochs per run ({'--final-epochs' if settings.epochs else 'default'}, no time budget)"
    seconds = budget.deadline - time.time()
    # The slowest candidate sets the pace; validation costs about a third of a training step per canvas.
    speed = min(c.canvases_per_s for c in chosen) * layout.workers * (DDP_EFFICIENCY if layout.workers > 1 else 1)
    if not math.isfinite(speed) or speed <= 0:
        raise RuntimeError("the search measured no training speed to plan the final phase with")
    epoch_seconds = (rows + val_rows / 3) / speed
    fits = math.floor((seconds / runs - START_SECONDS) / epoch_seconds)
    cap = epoch_cap(settings, budget)
    epochs = max(0, min(cap, fits))
    why = (f"{seconds / 60:.1f} min left for {runs} run(s); about {epoch_seconds:.0f} s per epoch at "
           f"{speed:,.0f} canvases/s (the search's speed x {layout.workers} worker(s))")
    return epochs, f"{epochs} epochs per run ({why}; at most {cap})"


def epoch_cap(settings: FinalSettings, budget: TimeBudget | None) -> int:
    """The most epochs a final run may be re-planned to (its stream holds that many)."""
    return settings.epochs or (MAX_FINAL_EPOCHS if budget else DEFAULT_FINAL_EPOCHS)


def run_final(results, data, search_settings, settings: FinalSettings, layout: Layout, budget: TimeBudget | None,
              storage: str, log=print, start_point: dict | None = None) -> FinalOutcome | None:
    """Train the top configurations (on from their search checkpoints, or from scratch); None when
    no epoch fits in the time left. `start_point`: see `candidates`."""
    chosen = candidates(results, settings.top_k, search_settings.layout.workers,
                        checkpoints=settings.init == "checkpoint", start_point=start_point)
    if not chosen:
        raise RuntimeError(f"no trial reported {OBJECTIVE}; nothing to train"
                           + (" (the time budget ended the search first: give more --time-budget)" if budget else ""))
    epochs, cap, why = final_plan(settings, chosen, data, search_settings, layout, budget, storage)
    if epochs == 0:
        log(f"final: no time left for one epoch ({why}); exporting the search's best checkpoint")
        return None
    plan = plan_line(settings, chosen, layout, why, budget)
    log(plan)
    runs = train_runs(chosen, settings, epochs, cap, data, search_settings, layout, budget, storage, log)
    winner = pick_winner(runs)
    stopped = winner.curve[-1]["epoch"] < winner.state["max_epochs"]
    if stopped:
        log(f"final: the time budget ended training after {winner.curve[-1]['epoch']:g} of "
            f"{winner.state['max_epochs']} epochs")
    return FinalOutcome(winner=winner, runs=runs, layout=layout, epochs=epochs, plan=plan, stopped_early=stopped)


def final_plan(settings: FinalSettings, chosen: list[Candidate], data, search_settings, layout: Layout,
               budget: TimeBudget | None, storage: str) -> tuple[int, int, str]:
    """(epochs per run, the most a re-plan may reach, why): planned now, or as planned when a
    resumed command's final phase started."""
    epochs, why = plan_epochs(settings, chosen, layout, data.train_epochs[0].rows, data.val.rows, budget)
    saved = saved_run(posixpath.join(storage, "final", run_name(0, search_settings.seed)),
                      search_settings.storage_filesystem)
    if not saved:
        return epochs, epoch_cap(settings, budget), why
    # A resumed command keeps the plan its runs were started with: their schedules depend on it.
    if saved.workers != layout.workers:
        raise ConfigError(f"the final phase was started with {saved.workers} workers and this cluster gives "
                          f"{layout.workers}; resume it on a cluster of the same size")
    return saved.planned, saved.planned, f"{saved.planned} epochs per run, as planned when the final phase started"


def plan_line(settings: FinalSettings, chosen: list[Candidate], layout: Layout, why: str,
              budget: TimeBudget | None) -> str:
    """The line that says what the final phase trains, how and for how long."""
    start = "continued from its best search checkpoint" if settings.init == "checkpoint" else "trained from scratch"
    ranked = (f"ranked against the start point at its epoch {chosen[0].compared_at:g}"
              if chosen[0].compared_at is not None else "ranked by best validation det IoU")
    return (f"final: {len(chosen)} configuration(s) ({ranked}) x {settings.seeds} seed(s), each {start} by a "
            f"TorchTrainer with {layout.workers} worker(s) ({layout.dist_backend}, {layout.reason}); {why}"
            + ("; re-planned after every epoch from its measured time" if budget else ""))


def train_runs(chosen: list[Candidate], settings: FinalSettings, epochs: int, cap: int, data, search_settings,
               layout: Layout, budget: TimeBudget | None, storage: str, log) -> list[FinalRun]:
    """Every chosen configuration with every seed, one after the other."""
    jobs = [(rank, candidate, seed) for rank, candidate in enumerate(chosen)
            for seed in range(search_settings.seed, search_settings.seed + settings.seeds)]
    runs = []
    for index, (rank, candidate, seed) in enumerate(jobs):
        # Each run gets its share of the time still left, so that one slow run cannot eat the next ones'.
        deadline = time.time() + (budget.deadline - time.time()) / (len(jobs) - index) if budget else None
        runs.append(train_final(candidate, seed, epochs, data, search_settings, layout, deadline, storage,
                                name=run_name(rank, seed), cap=cap, log=log, lr_scale=settings.lr_scale))
    return runs


def run_name(rank: int, seed: int) -> str:
    return f"final-{rank + 1}-seed{seed}"


def pick_winner(runs: list[FinalRun]) -> FinalRun:
    """The configuration with the best mean validation objective over its seeds, and of its
    runs the best one."""
    by_config: dict[str, list[FinalRun]] = {}
    for run in runs:
        by_config.setdefault(run.candidate.trial_id, []).append(run)
    best = max(by_config.values(), key=lambda group: sum(r.validation[OBJECTIVE] for r in group) / len(group))
    return max(best, key=lambda run: run.validation[OBJECTIVE])


def train_final(candidate: Candidate, seed: int, epochs: int, data, search_settings, layout: Layout,
                deadline: float | None, storage: str, *, name: str, cap: int | None = None, log=print,
                yield_cpu: bool = True, paced: bool = True, lr_scale: float = FINAL_LR_SCALE) -> FinalRun:
    """One final run: a TorchTrainer over `layout`'s workers, or the saved result of a run that
    already finished (a resumed command). With a deadline, the workers re-plan the number of
    epochs after every one, up to `cap`. `yield_cpu`: see `data.stream_config`; `paced`: see
    `data.train_stream`. A candidate with a checkpoint (`candidates(checkpoints=True)`) is trained
    on from it, its learning rate peaking at `continued_lr`; one without from scratch, at the
    searched rate."""
    from raylocal.trial import TrialSettings

    params = Hyperparameters.from_dict(search_settings.fixed | candidate.config)
    per_worker, init_epoch, warm = worker_start(candidate, params, layout, lr_scale)
    settings = TrialSettings(max_epochs=epochs, first_epoch_reports=1, reports_per_epoch=1, layout=layout,
                             storage_path=storage, experiment_name=name, seed=seed, fixed={},
                             report_logs=search_settings.report_logs,
                             storage_filesystem=search_settings.storage_filesystem)
    run_dir = posixpath.join(storage, "final", name)
    saved = saved_run(run_dir, settings.storage_filesystem)
    started = time.perf_counter()
    cap = max(epochs, cap or epochs)
    # The epochs the checkpoint trained on come first in the stream's numbering, so the run goes
    # on with placements the trial has not seen; each further seed of a configuration streams
    # epochs of its own (it starts from the same weights, and would otherwise differ in dropout alone).
    offset = math.ceil(init_epoch) + (seed - search_settings.seed) * cap
    log(f"final: {name}: trial {candidate.trial_id} (search score {candidate.score:.4f}), seed {seed}, "
        f"{epochs} epochs" + start_note(params, per_worker, init_epoch, warm, lr_scale)
        + (f", resuming after epoch {saved.done}" if saved else ""))
    if saved and saved.done >= saved.planned:
        state, placement = saved.state, saved.placement
    else:
        loop_config = {"params": asdict(per_worker), "data": data, "settings": settings, "deadline": deadline,
                       "cap": cap, "stream": True, "progress": True,
                       # Weights to start from, unless Ray Train resumes the run from a checkpoint of its own.
                       "init": warm["model"] if warm and not saved else None}
        state, placement = fit_final(loop_config, run_dir, range(offset, offset + cap), name=name,
                                     max_failures=search_settings.max_failures, yield_cpu=yield_cpu, paced=paced)
    curve = state["history"]
    log(f"final: {name}: {curve[-1]['epoch']:g} epochs, {time.perf_counter() - started:.0f} s in this command; "
        + validation_figures(curve[-1]))
    return FinalRun(candidate=candidate, seed=seed, params=params, state=state, curve=curve,
                    seconds=time.perf_counter() - started, placement=placement, init_epoch=init_epoch,
                    checkpoint_lr=checkpoint_lr(warm) if warm else None)


def worker_start(candidate: Candidate, params: Hyperparameters, layout: Layout,
                 lr_scale: float) -> tuple[Hyperparameters, float, dict[str, Any] | None]:
    """(each worker's hyperparameters, the epochs of the checkpoint the run continues, that
    checkpoint's state): the global batch the search tuned the learning rate for, split over the
    workers, and a continued run's peak rate."""
    from raylocal.trial import load_checkpoint_state

    if params.batch_size < layout.workers:
        raise ConfigError(f"batch_size {params.batch_size} cannot be split over {layout.workers} workers")
    per_worker = replace(params, batch_size=params.batch_size // layout.workers)
    # The best checkpoint is the best report's: the candidate's epoch.
    init_epoch = candidate.epoch if candidate.checkpoint is not None else 0.0
    warm = load_checkpoint_state(candidate.checkpoint) if init_epoch else None
    if warm:
        per_worker = replace(per_worker, lr=continued_lr(params.lr, lr_scale, warm))
    return per_worker, init_epoch, warm


def start_note(params: Hyperparameters, per_worker: Hyperparameters, init_epoch: float, warm: dict[str, Any] | None,
               lr_scale: float) -> str:
    """Where a final run starts, for its first line."""
    if not warm:
        return " from scratch"
    return (f" from its search checkpoint at epoch {init_epoch:g}, peak learning rate {per_worker.lr:.3g} "
            f"({per_worker.lr / params.lr:.2f} x the searched; its schedule stood at {checkpoint_lr(warm):.3g} there, "
            f"the least is {lr_scale:g} x)")


def fit_final(loop_config: dict[str, Any], run_dir: str, epochs: range, *, name: str, max_failures: int,
              yield_cpu: bool, paced: bool) -> tuple[dict[str, Any], dict[str, str]]:
    """A final run's TorchTrainer, its workers streaming the stream's `epochs` (less those a
    resumed run has done); (its last checkpoint's state, where its workers ran)."""
    from ray import train

    from raylocal.data import stream_config, train_stream
    from raylocal.trial import load_checkpoint_state, make_trainer

    fs = loop_config["settings"].storage_filesystem
    trainer = make_trainer(
        loop_config["settings"].layout, loop_config,
        # A stable name: `--resume` finds the run and Ray Train continues from its last checkpoint.
        name=name, storage_path=posixpath.dirname(run_dir), storage_filesystem=fs, max_failures=max_failures,
        checkpoint_config=train.CheckpointConfig(num_to_keep=1),
        # A function: Ray Train calls it each time it starts the workers, so workers restarted
        # after a failure stream the epochs after their checkpoint, not the first ones again.
        datasets={"train": lambda: train_stream(loop_config["data"], epochs[finished_epochs(run_dir, fs):],
                                                paced=paced)},
        dataset_config=stream_config(yield_cpu),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    placement = {key: value for key, value in (result.metrics or {}).items() if key.startswith("worker_")}
    return load_checkpoint_state(result.checkpoint), placement


def checkpoint_lr(state: dict[str, Any]) -> float:
    """The learning rate a trial's one-cycle schedule had reached at its checkpoint."""
    return float(state["scheduler"]["_last_lr"][0])


def continued_lr(searched: float, scale: float, state: dict[str, Any]) -> float:
    """The peak learning rate of a final run continuing a search checkpoint: the rate the trial's
    schedule had reached there, or `scale` x the searched rate where that is higher. A trial that
    trained its whole budget had annealed its rate to about 0, and the least applies (climbing
    back to the full rate undid the search's epochs); one that a time budget ended early in its
    schedule was still training near the searched rate, and goes on near it."""
    return max(scale * searched, checkpoint_lr(state))


@dataclass(frozen=True)
class SavedRun:
    done: int  # epochs with a checkpoint
    planned: int
    workers: int
    state: dict[str, Any]
    placement: dict[str, str]


def saved_run(run_dir: str, fs=None) -> SavedRun | None:
    """The last checkpoint of a final run started earlier, or None for a new run; `fs`: pyarrow's
    filesystem of `run_dir` where it is on object storage."""
    from pyarrow import fs as pafs
    from ray.train import Result

    from raylocal.trial import load_checkpoint_state

    if (fs or pafs.LocalFileSystem()).get_file_info(run_dir).type != pafs.FileType.Directory:
        return None
    try:
        result = Result.from_path(run_dir, storage_filesystem=fs)
    except Exception:  # noqa: BLE001 - a run killed before its first checkpoint leaves no readable state
        return None
    if result.checkpoint is None:
        return None
    state = load_checkpoint_state(result.checkpoint)
    placement = {key: value for key, value in (result.metrics or {}).items() if key.startswith("worker_")}
    return SavedRun(done=int(state["epoch"]), planned=int(state["max_epochs"]), workers=int(state["world_size"]),
                    state=state, placement=placement)


def finished_epochs(run_dir: str, fs=None) -> int:
    """Epochs a final run already has a checkpoint of (0 for a new run): a resumed run's
    stream starts after them."""
    saved = saved_run(run_dir, fs)
    return saved.done if saved else 0


def epoch_line(name: str, metrics: dict[str, Any], planned: int) -> str:
    """A final run's progress after each epoch, logged by its rank 0 (the driver shows workers'
    output unless --quiet): the run's only sign of life for minutes at a time."""
    return (f"final: {name}: epoch {metrics['epoch']:g} of {planned}: {validation_figures(metrics)}; "
            f"{metrics['report_seconds']:.0f} s this epoch")


def validation_figures(metrics: dict[str, Any]) -> str:
    return (f"validation det IoU {metrics[OBJECTIVE]:.4f}, mean IoU {metrics['val_mean_iou']:.4f}, "
            f"accuracy {metrics['val_accuracy']:.4f}")


def agree(value: float, device: torch.device, world_size: int) -> float:
    """The largest of every rank's `value`: what all ranks then act on alike."""
    import torch

    if world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return tensor.item()


def fit_to_deadline(deadline: float, cap: int, device: torch.device, world_size: int):
    """An `engine.fit` re-plan, asked after every epoch: the epochs done and as many more as fit
    before the deadline at the last epoch's pace (the slowest rank's), at most `cap`. The plan made
    before the run rests on the search's speed, which DDP can miss widely; the first epoch also
    holds the workers' warm-up, so the second one corrects the first's pessimism
    (docs/decisions.md#final-replanning)."""

    def replan(done: int, seconds: float) -> int:
        seconds = agree(seconds, device, world_size)
        return max(1, min(cap, done + max(0, math.floor((deadline - time.time()) / seconds))))

    return replan
