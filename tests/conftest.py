"""Shared fixtures: a tiny MNIST in IDX files and one Ray instance for the whole session."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from raylocal.mnist import write_idx_files

TINY_TRAIN, TINY_TEST = 1200, 200
_SAVED_ENV: dict[str, str | None] = {}
_SAVED_TEMPDIR: list[str | None] = []
_SESSION_TEMP: list[str] = []
SESSION_FAILED = pytest.StashKey[bool]()
# Every process the tests start inherits this mark, so the session can find what it left behind.
SESSION_MARK = "RAYLOCAL_TEST_SESSION"


def pytest_configure(config):
    """Ray reads its loopback switch when first imported, and collecting the tests imports Ray:
    set it first, so that every Ray instance of the session is on loopback, as the product's are
    (`raylocal.cluster` checks). Put back at the end of the session."""
    import secrets

    from raylocal.cluster import LOOPBACK_SWITCH

    # Token authentication too, with a token of the session's own: Ray reads its mode when it
    # starts, so the session's processes and the clusters they start must agree from the first.
    session_env = {LOOPBACK_SWITCH: "0", SESSION_MARK: str(os.getpid()), "RAY_AUTH_MODE": "token",
                   "RAY_AUTH_TOKEN": secrets.token_hex(32), **session_temp_env()}
    for key, value in session_env.items():
        _SAVED_ENV[key] = os.environ.get(key)
        os.environ[key] = value
    _SAVED_TEMPDIR.append(tempfile.tempdir)
    tempfile.tempdir = None  # gettempdir() caches its answer: ask it again under the new TMPDIR


def session_temp_env() -> dict[str, str]:
    """A temporary folder of the session's own for every process the tests start (pytest's
    tmp_path folders too), removed when the session passes. A process killed mid-way cannot
    remove its temporary files: a search's trial killed while it reported left its 2.3 MB
    checkpoint in /tmp, and Ray's workers killed at shutdown their multiprocessing folders
    (16 pymp-* folders after one suite). Ray's own session folders stay where Ray puts them
    (RAY_TMPDIR, which Ray reads first, set to the folder it would have used): they hold its
    Unix sockets, whose paths may not pass 107 characters."""
    ray_temp = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    _SESSION_TEMP.append(tempfile.mkdtemp(prefix="raylocal-tests-"))
    return {"TMPDIR": _SESSION_TEMP[0], "RAY_TMPDIR": ray_temp}


def pytest_collection_modifyitems(session, config, items):
    """The tests that do without the session's Ray cluster first (those that start instances of
    their own among them), in their order, then those on it: an idle cluster's twenty or so
    processes still take CPU, and with it running two searches at once took 141 s instead of 98 s on 2 cores."""
    items.sort(key=lambda item: "ray_session" in getattr(item, "fixturenames", ()))


def marked_processes() -> list:
    """Processes other than this one that carry this session's mark, less multiprocessing's
    resource tracker of this process (it ends when this process does)."""
    import psutil

    found = []
    for process in psutil.process_iter(["pid"]):
        if process.pid == os.getpid():
            continue
        with contextlib.suppress(psutil.Error):
            own_tracker = process.ppid() == os.getpid() and "multiprocessing.resource_tracker" in " ".join(
                process.cmdline())
            if process.environ().get(SESSION_MARK) == str(os.getpid()) and not own_tracker:
                found.append(process)
    return found


def pytest_sessionfinish(session, exitstatus):
    """No process started by the tests may outlive them: wait a little for Ray's to exit, then
    fail the session naming (and killing) what is left."""
    deadline = time.monotonic() + 20
    while (left := marked_processes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    if left:
        names = []
        for process in left:
            with contextlib.suppress(Exception):
                names.append(f"{process.pid} {' '.join(process.cmdline())[:120]}")
                process.kill()
        print(f"\nERROR: the tests left {len(left)} process(es) running (now killed):\n  " + "\n  ".join(names),
              file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    session.config.stash[SESSION_FAILED] = session.exitstatus != 0


def pytest_unconfigure(config):
    for key, value in _SAVED_ENV.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    tempfile.tempdir = _SAVED_TEMPDIR[0] if _SAVED_TEMPDIR else None
    for folder in _SESSION_TEMP:
        # Kept when the session failed: the failed tests' tmp_path folders are in it.
        if config.stash.get(SESSION_FAILED, True):
            print(f"\nthe session's temporary folder is kept for a look: {folder}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)
REAL_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def tiny_digits(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Digit-like 28x28 images: a bright bar whose position encodes the label, so a model can learn it."""
    labels = rng.integers(0, 10, count).astype(np.uint8)
    images = rng.integers(0, 40, (count, 28, 28)).astype(np.uint8)
    for index, label in enumerate(labels):
        top = 2 + 2 * int(label)
        images[index, top : top + 4, 6:22] = 255
    return images, labels


@pytest.fixture(scope="session")
def tiny_mnist_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny_mnist")
    rng = np.random.default_rng(7)
    write_idx_files(directory, *tiny_digits(rng, TINY_TRAIN), *tiny_digits(rng, TINY_TEST))
    return directory


@pytest.fixture
def start_search(tmp_path):
    """Starts `python -m raylocal.tune FLAGS...` in a process group of its own, and kills that
    group when the test ends, however it ends (a failed assertion, a timeout, Ctrl-C)."""
    started: list[subprocess.Popen] = []

    from raylocal.cluster import LOOPBACK_SWITCH

    # Without the session's loopback switch: a search binds itself to loopback, as for a user.
    env = {key: value for key, value in os.environ.items() if key != LOOPBACK_SWITCH}

    def start(*flags: str, cwd: Path | None = None, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        process = subprocess.Popen(
            [sys.executable, "-m", "raylocal.tune", *flags], cwd=cwd or tmp_path, env=env | (extra_env or {}),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=60)
            if process.stdout:
                process.stdout.close()


LOOPBACK_IPS = ("127.0.0.1", "::1")


class Listeners:
    """The TCP sockets a process and all its descendants listen on, polled in a thread while
    it runs (Ray's GCS, raylet, dashboard and workers, Train's workers with their rendezvous
    store and gloo pairs): a set of (ip, port, command line)."""

    def __init__(self, pid: int, every: float = 0.3):
        import threading

        self.pid, self.every, self.seen = pid, every, set()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        import psutil

        while not self._done.is_set():
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(self.pid)
                for process in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        command = " ".join(process.cmdline())  # whole: venv paths can be long
                        self.seen |= {(c.laddr.ip, c.laddr.port, command) for c in process.net_connections("tcp")
                                      if c.status == psutil.CONN_LISTEN}
            self._done.wait(self.every)

    def __enter__(self) -> Listeners:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join(timeout=30)

    def beyond_loopback(self) -> list[str]:
        """Listeners on anything but loopback, one line each (IPv4 loopback mapped into IPv6 counts)."""
        return sorted(f"{ip}:{port} {command[:120]}" for ip, port, command in self.seen
                      if ip.removeprefix("::ffff:") not in LOOPBACK_IPS)

    def of(self, command_part: str) -> list[tuple]:
        return sorted(listener for listener in self.seen if command_part in listener[2])


@pytest.fixture(scope="session")
def ray_session():
    """The one Ray cluster of the test session (Ray Train refuses to pick among several instances):
    two real nodes on this machine, a head and a worker with one CPU each, so that every
    integration test also runs multi-node. Started by `raylocal.cluster`, as the product starts Ray."""
    pytest.importorskip("ray")
    from raylocal.cluster import environment, local_cluster

    # Ray's usage-stats poller outlives pytest's captured streams and logs into closed files;
    # the legacy reporter is the one the product uses.
    with environment(RAY_USAGE_STATS_ENABLED="0", RAY_AIR_NEW_OUTPUT="0"):
        # The dashboard is on because Ray Train cleans up placement groups through its state API.
        with local_cluster([{"num_cpus": 1}, {"num_cpus": 1}], connect_driver=True) as cluster:
            yield cluster
