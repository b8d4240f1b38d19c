"""Shared fixtures (a tiny MNIST in IDX files, one Ray instance for the whole session) and the
session's hooks: the slow tier, the `ray` mark, what the tests leave behind. Plain helpers: helpers.py."""

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
from helpers import SESSION_MARK, tiny_digits

from raylocal.mnist import write_idx_files

TINY_TRAIN, TINY_TEST = 1200, 200
_SAVED_ENV: dict[str, str | None] = {}
_SAVED_TEMPDIR: list[str | None] = []
_SESSION_TEMP: list[str] = []
SESSION_FAILED = pytest.StashKey[bool]()
# A test that uses one of these gets the `ray` mark (pytest_collection_modifyitems).
RAY_FIXTURES = frozenset({"ray_session", "start_search", "serve_url"})
SLOW_REASON = "slow tier: run with --runslow"


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="run the slow tier too (tests marked slow); without it they are skipped")


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


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: it must see the `ray` marks set here
def pytest_collection_modifyitems(session, config, items):
    """Marks `ray` every test that uses the session's cluster or starts a search, and skips the
    slow tier without --runslow. Then the tests that do without the session's Ray cluster first
    (those that start instances of their own among them), in their order, then those on it: an
    idle cluster's twenty or so processes still take CPU, and with it running two searches at
    once took 141 s instead of 98 s on 2 cores."""
    skip_slow = None if config.getoption("--runslow") else pytest.mark.skip(reason=SLOW_REASON)
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)
        if skip_slow and item.get_closest_marker("slow"):
            item.add_marker(skip_slow)
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


@pytest.fixture
def ray_start_head():
    """`ray start --head` as a user runs it, on loopback and on free ports, with a temp folder of
    its own (RAY_TMPDIR: its "current cluster" file is not the user's). Stopped by killing exactly
    the processes it started (they carry a mark in their environment): never `ray stop`, which
    would stop every Ray of this user. Yields (environment for the processes that join, address)."""
    import secrets
    import shutil
    import signal
    import tempfile

    import psutil

    from raylocal.cluster import LOOPBACK_SWITCH, free_port

    mark = secrets.token_hex(8)
    # Short: Ray's unix sockets live under it, and their paths are limited to ~100 characters.
    temp = tempfile.mkdtemp(prefix="rl", dir="/tmp")
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env |= {LOOPBACK_SWITCH: "0", "RAY_TMPDIR": temp, "RAYLOCAL_TEST_HEAD": mark, "RAY_USAGE_STATS_ENABLED": "0"}
    port = free_port()
    ray = os.path.join(os.path.dirname(sys.executable), "ray")

    def started() -> list:
        found = []
        for process in psutil.process_iter(["pid"]):
            with contextlib.suppress(psutil.Error):
                if process.environ().get("RAYLOCAL_TEST_HEAD") == mark:
                    found.append(process)
        return found

    try:
        subprocess.run([ray, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=true",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={free_port()}"],
                       env=env, check=True, capture_output=True, text=True, timeout=180)
        yield env, f"127.0.0.1:{port}"
    finally:
        for process in started():
            with contextlib.suppress(psutil.Error):
                process.send_signal(signal.SIGTERM)
        gone, alive = psutil.wait_procs(started(), timeout=5)
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.kill()
        shutil.rmtree(temp, ignore_errors=True)
