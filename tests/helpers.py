"""What the tests share besides fixtures (those are in conftest.py): plain functions and classes,
imported as `from helpers import ...` (pytest puts this folder on sys.path)."""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path

import numpy as np

# Every process the tests start inherits this mark, so the session can find what it left behind.
SESSION_MARK = "RAYLOCAL_TEST_SESSION"
LOOPBACK_IPS = ("127.0.0.1", "::1")


def tiny_digits(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Digit-like 28x28 images: a bright bar whose position encodes the label, so a model can learn it."""
    labels = rng.integers(0, 10, count).astype(np.uint8)
    images = rng.integers(0, 40, (count, 28, 28)).astype(np.uint8)
    for index, label in enumerate(labels):
        top = 2 + 2 * int(label)
        images[index, top : top + 4, 6:22] = 255
    return images, labels


def results_by_trial(experiment_dir: Path) -> dict[str, list[dict]]:
    """The result rows in every trial folder as they are written: for watching a search that is
    still running, whose Tune state (`raylocal.results`) is saved only now and then."""
    return {
        path.parent.name: [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for path in experiment_dir.glob("run_trial_*/result.json")
    }


def search(start_search, tmp_path: Path, address: str, *flags: str, **kwargs) -> subprocess.Popen:
    """A quiet, unbounded search named `resumable` on the cluster at `address`, started by the
    `start_search` fixture (so it is killed when the test ends)."""
    return start_search("--address", address, "--quiet", "--storage", str(tmp_path / "results"), "--name", "resumable",
                        "--time-budget", "0", *flags, **kwargs)


class ProcessTreeWatch:
    """Polls a process and all its descendants in a thread while it runs (a context manager):
    `observe` is called with each live process of the tree every `every` seconds."""

    def __init__(self, pid: int, every: float):
        import threading

        self.pid, self.every = pid, every
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def observe(self, process) -> None:
        raise NotImplementedError

    def _watch(self) -> None:
        import psutil

        while not self._done.is_set():
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(self.pid)
                for process in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        self.observe(process)
            self._done.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join(timeout=30)


class Listeners(ProcessTreeWatch):
    """The TCP sockets a process and all its descendants listen on, polled while it runs (Ray's
    GCS, raylet, dashboard and workers, Train's workers with their rendezvous store and gloo
    pairs): a set of (ip, port, command line)."""

    def __init__(self, pid: int, every: float = 0.3):
        super().__init__(pid, every)
        self.seen: set[tuple[str, int, str]] = set()

    def observe(self, process) -> None:
        import psutil

        command = " ".join(process.cmdline())  # whole: venv paths can be long
        self.seen |= {(c.laddr.ip, c.laddr.port, command) for c in process.net_connections("tcp")
                      if c.status == psutil.CONN_LISTEN}

    def beyond_loopback(self) -> list[str]:
        """Listeners on anything but loopback, one line each (IPv4 loopback mapped into IPv6 counts)."""
        return sorted(f"{ip}:{port} {command[:120]}" for ip, port, command in self.seen
                      if ip.removeprefix("::ffff:") not in LOOPBACK_IPS)

    def of(self, command_part: str) -> list[tuple]:
        return sorted(listener for listener in self.seen if command_part in listener[2])


# No rung before the last epoch (the grace period is the whole budget), so every trial trains all
# its epochs: with ASHA rungs, two trials in lockstep could both pass every rung (the first at a
# rung is always kept), finish together, and the third be stopped at its first report, leaving no
# moment with one trial done and another running.
def experiment(trials: int = 3, max_epochs: int = 8, width: int = 16) -> str:
    """A tiny search space (lr only) whose trials each train all their epochs, one after another."""
    return f"""
[fixed]
depth = 3
width = {width}
head_width = {2 * width}
batch_size = 32
[space]
lr = {{ type = "loguniform", low = 1e-3, high = 1e-2 }}
[budget]
trials = {trials}
max_epochs = {max_epochs}
first_epoch_reports = 2
reports_per_epoch = 2
grace_period = {max_epochs}
reduction_factor = 2
[data]
shard_size = 500
"""


def report_epochs(max_epochs: int) -> list[float]:
    """The epoch of every report of a trial, in order (`experiment()`'s reporting schedule)."""
    from raylocal.engine import report_schedule

    return [epoch + (part + 1) / parts for epoch, part, parts in report_schedule(max_epochs, 2, 2)]
