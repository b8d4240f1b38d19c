"""Dataset stage (Ray Data adapter): synthesize every shard of every split in parallel.

For the search, the datasets are built once in the driver, before any trial starts, and
handed to the trials as object references: synthesizing inside trials would make Ray Data
compete with Tune's placement groups for the same cores and deadlock small machines.

For the final training phase, `train_stream` is a lazy dataset that Ray Train streams to its
workers while they train: each epoch's canvases are synthesized shortly before they are
read, so the object store holds a bounded window of shards whatever the number of epochs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray

from raylocal.config import DataSettings
from raylocal.mnist import Mnist
from raylocal.synthesis import SplitPlan, num_shards, split_plan, synthesize_shard

COLUMNS = ("image", "box", "label")


@dataclass(frozen=True)
class SplitRefs:
    """Object references to the column blocks of one split (and epoch), in shard order."""

    blocks: tuple[ray.ObjectRef, ...]
    rows: int

    def fetch(self, rank: int = 0, world_size: int = 1) -> dict[str, np.ndarray]:
        """This rank's rows, interleaved so every rank gets an equal share (DDP needs equal steps)."""
        parts = ray.get(list(self.blocks))
        columns = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
        per_rank = self.rows // world_size
        return {key: value[rank::world_size][:per_rank] for key, value in columns.items()}


@dataclass(frozen=True)
class SearchData:
    train_epochs: tuple[SplitRefs, ...]
    val: SplitRefs
    test: SplitRefs
    seed: int
    source: str
    sha256: dict[str, str]
    verified: bool
    # What the final phase needs to synthesize more epochs: the MNIST arrays in the object
    # store (wrapped in a list, see `synthesize_shards`), the split plan and the data settings.
    mnist_ref: tuple = ()
    plan: SplitPlan | None = None
    settings: DataSettings = field(default_factory=DataSettings)


def synthesize_shards(batch: dict[str, np.ndarray], arrays_ref: list, plan: SplitPlan, seed: int, shard_size: int,
                      tight_boxes: bool, augment: bool = False) -> dict[str, np.ndarray]:
    """Ray Data task: synthesizes the shards named in `batch`. The MNIST arrays come from the
    object store without a copy; the reference is wrapped in a list so it reaches the task as a
    reference, not resolved into the task's arguments."""
    arrays = ray.get(arrays_ref[0])
    outputs = []
    for task, split, epoch, shard in zip(batch["task"], batch["split"], batch["epoch"], batch["shard"]):
        images, labels = arrays["test" if split == "test" else "train"]
        part = synthesize_shard(
            images, labels, plan, seed=seed, split=str(split), epoch=int(epoch), shard=int(shard),
            shard_size=shard_size, tight_boxes=tight_boxes, augment=augment,
        )
        part["task"] = np.full(len(part["label"]), task, dtype=np.int64)
        part["shard"] = np.full(len(part["label"]), shard, dtype=np.int64)
        outputs.append(part)
    return {key: np.concatenate([part[key] for part in outputs]) for key in outputs[0]}


def synthesis_dataset(items: list[dict], arrays_ref: list, plan: SplitPlan, seed: int, settings: DataSettings,
                      **map_options) -> ray.data.Dataset:
    """A lazy dataset with one block per item (split, epoch, shard), synthesized by Ray Data tasks."""
    # Tasks, not an actor pool: tasks run in Ray's already started worker processes, while a
    # pool starts processes of its own for every dataset (docs/decisions.md#synthesis-in-tasks).
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        synthesize_shards,
        fn_kwargs={
            "arrays_ref": arrays_ref, "plan": plan, "seed": seed, "shard_size": settings.shard_size,
            "tight_boxes": settings.tight_boxes, "augment": settings.augment,
        },
        batch_size=1,
        **map_options,
    )


def build_search_data(mnist: Mnist, settings: DataSettings, epochs: int, seed: int, log=print) -> SearchData:
    started = time.perf_counter()
    train_images, train_labels = mnist.train_images[: settings.train_digits], mnist.train_labels[: settings.train_digits]
    test_images, test_labels = mnist.test_images[: settings.test_digits], mnist.test_labels[: settings.test_digits]
    plan = split_plan(len(train_images), len(test_images))
    tasks = [("val", 0), ("test", 0)] + [("train", epoch) for epoch in range(epochs)]
    items = [
        {"task": task, "split": split, "epoch": epoch, "shard": shard}
        for task, (split, epoch) in enumerate(tasks)
        for shard in range(num_shards(plan, split, settings.shard_size))
    ]
    arrays_ref = [ray.put({"train": (train_images, train_labels), "test": (test_images, test_labels)})]
    dataset = synthesis_dataset(items, arrays_ref, plan, seed, settings)
    # Each shard goes back into the object store on its own; the driver never holds more
    # than one batch of canvases at a time.
    parts: dict[int, list] = {task: [] for task in range(len(tasks))}
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for task, shard in sorted(set(zip(batch["task"].tolist(), batch["shard"].tolist()))):
            rows = (batch["task"] == task) & (batch["shard"] == shard)
            part = {key: np.ascontiguousarray(batch[key][rows]) for key in COLUMNS}
            parts[task].append((shard, ray.put(part), int(rows.sum())))
    refs = [
        SplitRefs(tuple(ref for _, ref, _ in sorted(parts[t], key=lambda p: p[0])), sum(n for *_, n in parts[t]))
        for t in range(len(tasks))
    ]
    total = sum(ref.rows for ref in refs)
    log(f"data: synthesized {total:,} canvases ({len(items)} shards: val, test, {epochs} train epochs) "
        f"in {time.perf_counter() - started:.1f}s with Ray Data")
    return SearchData(
        train_epochs=tuple(refs[2:]), val=refs[0], test=refs[1], seed=seed,
        source=mnist.source, sha256=mnist.sha256, verified=mnist.verified,
        mnist_ref=tuple(arrays_ref), plan=plan, settings=settings,
    )


# The stream's synthesis tasks hold no CPU: the training workers hold every CPU of the cluster,
# and a task that waited for one would never run. Two at a time, since synthesis outpaces training
# many times over; the object-store limit below is what bounds how far ahead they run
# (docs/decisions.md#stream-memory).
STREAM_TASKS = 2
STREAM_STORE_BYTES = 256 * 1024**2


def train_stream(data: SearchData, epochs: range, paced: bool = True) -> ray.data.Dataset:
    """Freshly placed training canvases of `epochs`, epoch after epoch, as a lazy dataset for
    Ray Train (`TorchTrainer(datasets=...)`): nothing is synthesized until workers read it.
    `paced`: its scheduling loop waits instead of spinning (`paced_scheduling_callback`);
    False leaves the loop as Ray Data runs it (bench_stream.py measures both)."""
    shards = num_shards(data.plan, "train", data.settings.shard_size)
    items = [{"task": epoch, "split": "train", "epoch": epoch, "shard": shard}
             for epoch in epochs for shard in range(shards)]
    # No progress bars: the split coordinator's, forwarded to a console that is not a terminal, come
    # out as screens of cursor codes counting rows synthesized, not training, which the final run
    # reports once an epoch itself (docs/decisions.md#stream-progress-bars-off).
    with dataset_context(*([paced_scheduling_callback()] if paced else []), enable_progress_bars=False):
        return synthesis_dataset(
            items, list(data.mnist_ref), data.plan, data.seed, data.settings,
            num_cpus=0, compute=ray.data.TaskPoolStrategy(size=STREAM_TASKS),
        )  # no select_columns: it would run as tasks of its own that wait for a CPU (StreamReader drops the rest)


@contextlib.contextmanager
def dataset_context(*callbacks: type, **settings: Any) -> Iterator[None]:
    """Ray Data settings and execution callbacks for the datasets created inside: a dataset keeps a
    copy of the current context from its creation, and the executor that runs it (in Ray Train's
    split coordinator too) takes its callbacks and progress settings from that copy. The current
    context is put back after."""
    context = ray.data.DataContext.get_current()
    changes = settings | {"custom_execution_callback_classes": [*context.custom_execution_callback_classes, *callbacks]}
    saved = {key: getattr(context, key) for key in changes}
    for key, value in changes.items():
        setattr(context, key, value)
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(context, key, value)


def paced_scheduling_callback() -> type:
    """A Ray Data execution callback that keeps the scheduling loop from spinning. Held back by the
    stream's object-store budget, which is most of a final run (synthesis outpaces training many
    times over), Ray Data 2.60's loop steps again at once, over and over: a synthesis task whose
    output waits for room counts as running, and `ray.wait` on it returns at once.
    After a step that moved nothing (no input taken, no output made or handed on, no task
    finished) the callback waits as long as the loop waits for a task, unless a consumer is
    waiting for canvases: reads are served as soon as before, and room a read frees is used within
    that wait. It saves CPU, not training time: at the lowest priority the spin only filled the
    time the lock-stepped DDP workers left idle (docs/decisions.md#stream-coordinator). It
    reads the executor's operators through private attributes (raylocal pins Ray's version) and
    does nothing where they are missing."""
    from ray.data._internal.execution.execution_callback import ExecutionCallback
    from ray.data._internal.execution.streaming_executor_state import WAIT_FOR_TASK_COMPLETION_TIMEOUT_S

    class PacedScheduling(ExecutionCallback):
        def __init__(self) -> None:
            self.seen = None

        def on_execution_step(self, executor) -> None:
            topology = getattr(executor, "_topology", None)
            idling = getattr(executor, "_consumer_idling", None)
            if not topology or idling is None:
                return
            seen = tuple((m.num_inputs_received, m.num_task_outputs_generated, m.num_outputs_taken,
                          m.num_tasks_finished) for m in (op.metrics for op in topology))
            stalled, self.seen = seen == self.seen, seen
            if stalled and not idling():
                time.sleep(WAIT_FOR_TASK_COMPLETION_TIMEOUT_S)

    return PacedScheduling


def stream_options():
    """Ray Data's execution options for the stream: a fixed object-store budget, so the canvases
    waiting to be read never grow with the number of epochs."""
    from ray.data import ExecutionOptions, ExecutionResources

    return ExecutionOptions(resource_limits=ExecutionResources(object_store_memory=STREAM_STORE_BYTES))


def stream_config(yield_cpu: bool = True):
    """Ray Train's dataset settings for the stream: `stream_options`, and a split coordinator that
    yields the CPU to training. Ray Data 2.60's scheduling loop spins whenever the stream is held
    back by its budget, which is most of a final run; at normal priority that spin takes CPU from
    the workers (docs/decisions.md#stream-coordinator; the paced loop of `train_stream` now waits
    instead). Run at the lowest priority, the coordinator still serves every request, since the
    workers wait for it then, but never takes a core from them.
    `yield_cpu=False` leaves it as Ray starts it (bench_stream.py measures both)."""
    from ray.train import DataConfig

    if not yield_cpu:
        return DataConfig(execution_options=stream_options())

    class StreamConfig(DataConfig):
        def configure(self, *args, **kwargs):
            output = super().configure(*args, **kwargs)
            coordinators = {id(actor): actor for split in output for iterator in split.values()
                            if (actor := getattr(iterator, "_coord_actor", None)) is not None}
            ray.get([actor.__ray_call__.remote(lowest_priority) for actor in coordinators.values()])
            return output

    return StreamConfig(execution_options=stream_options())


def lowest_priority(_actor=None) -> None:
    """This process, every thread of it (Linux sets priorities per thread; threads started later
    inherit them), runs only when a CPU would otherwise idle (SCHED_IDLE), or at nice 19."""
    import os

    threads = [int(tid) for tid in os.listdir("/proc/self/task")] if os.path.isdir("/proc/self/task") else []
    if threads and hasattr(os, "SCHED_IDLE"):
        for tid in threads:
            try:
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            except OSError:
                pass  # a thread that ended meanwhile
    else:
        os.nice(19 - os.nice(0))


class StreamReader:
    """Hands out a worker's stream in fixed-size pieces (one epoch's rows per call)."""

    def __init__(self, iterator) -> None:
        self.blocks = iter(iterator.iter_batches(batch_size=None, batch_format="numpy"))
        self.pending: list[dict[str, np.ndarray]] = []
        self.pending_rows = 0

    def take(self, rows: int) -> dict[str, np.ndarray]:
        while self.pending_rows < rows:
            block = next(self.blocks, None)
            if block is None:
                raise RuntimeError(f"the training stream ended {rows - self.pending_rows} rows short")
            self.pending.append(block)
            self.pending_rows += len(block["label"])
        columns = {key: np.concatenate([block[key] for block in self.pending]) for key in COLUMNS}
        rest = {key: value[rows:] for key, value in columns.items()}
        self.pending, self.pending_rows = ([rest] if len(rest["label"]) else []), len(rest["label"])
        return {key: value[:rows] for key, value in columns.items()}
