"""Resume after the driver dies: a real search in a subprocess, SIGKILLed mid-way, then resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

EXPERIMENT = """
[fixed]
depth = 3
width = 16
head_width = 32
batch_size = 32
[space]
lr = { type = "loguniform", low = 1e-3, high = 1e-2 }
[budget]
trials = 3
max_epochs = 8
first_epoch_reports = 2
reports_per_epoch = 2
grace_period = 0.5
reduction_factor = 2
[data]
shard_size = 500
"""


def results_by_trial(experiment_dir: Path) -> dict[str, list[dict]]:
    """The result rows in every trial folder as they are written: for watching a search that is
    still running, whose Tune state (`raylocal.results`) is saved only now and then."""
    return {
        path.parent.name: [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for path in experiment_dir.glob("run_trial_*/result.json")
    }


def search(start_search, tmp_path: Path, address: str, *flags: str) -> subprocess.Popen:
    return start_search("--address", address, "--quiet", "--storage", str(tmp_path / "results"), "--name", "resumable",
                        *flags)


def wait_for_one_done_and_one_running(experiment_dir: Path, process: subprocess.Popen, timeout_s: float = 240):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        trials = results_by_trial(experiment_dir)
        done = [name for name, rows in trials.items() if rows and rows[-1].get("done")]
        running = [name for name, rows in trials.items() if len(rows) >= 2 and not rows[-1].get("done")]
        if done and running:
            return trials, done[0], running[0]
        if process.poll() is not None:
            pytest.fail(f"search ended before it could be interrupted:\n{process.stdout.read()}")
        time.sleep(0.2)
    pytest.fail("no moment with one trial finished and one running")


def test_a_killed_search_resumes_without_losing_or_redoing_work(ray_session, tmp_path, tiny_mnist_dir, start_search):
    (tmp_path / "space.toml").write_text(EXPERIMENT)
    experiment_dir = tmp_path / "results" / "resumable"
    first = search(start_search, tmp_path, ray_session.address, "--experiment", "space.toml",
                   "--data-dir", str(tiny_mnist_dir), "--unverified-data")
    before, finished, interrupted = wait_for_one_done_and_one_running(experiment_dir, first)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    # What Tune had saved when it died is what the resumed search starts from.
    before = results_by_trial(experiment_dir)

    second = search(start_search, tmp_path, ray_session.address, "--resume")
    output, _ = second.communicate(timeout=300)
    assert second.returncode == 0, output

    # A trial started just before the kill but not yet in Tune's saved state leaves an empty
    # folder; the resumed searcher starts that configuration again as a new trial.
    after = {name: rows for name, rows in results_by_trial(experiment_dir).items() if rows}
    # Tune's own saved state says which trials the search holds and how each ended; a folder
    # left by a trial started just before the kill is not one of them.
    from raylocal.results import read_search

    statuses = [trial.status for trial in read_search(experiment_dir)]
    assert statuses == ["TERMINATED"] * 3, statuses
    assert after[finished] == before[finished]
    resumed_rows = after[interrupted][len(before[interrupted]):]
    assert resumed_rows, "the interrupted trial did not continue"
    assert min(row["training_iteration"] for row in resumed_rows) > 1
    assert (experiment_dir / "best_model" / "model.pt2").is_file()


def test_resuming_a_search_that_does_not_exist_is_a_clear_error(tmp_path, capsys):
    from raylocal.tune import cli

    assert cli(["--resume", str(tmp_path / "nothing-here")]) == 2
    assert "no raylocal search to resume" in capsys.readouterr().err


def test_resuming_with_a_different_search_space_is_a_clear_error(tmp_path, capsys):
    from raylocal.tune import cli

    folder = tmp_path / "results" / "old"
    folder.mkdir(parents=True)
    (folder / "raylocal_search.json").write_text(json.dumps({"flags": {"trials": 3}, "experiment": {"name": "x"}}))
    (tmp_path / "space.toml").write_text(EXPERIMENT)
    assert cli(["--resume", str(folder), "--experiment", str(tmp_path / "space.toml")]) == 2
    assert "different search space" in capsys.readouterr().err
    assert cli(["--resume", str(folder), "--trials", "9"]) == 2
    assert "--trials 9 differs" in capsys.readouterr().err


def test_resuming_with_another_seed_is_refused(tmp_path, capsys):
    from raylocal.tune import cli

    folder = tmp_path / "results" / "old"
    folder.mkdir(parents=True)
    (folder / "raylocal_search.json").write_text(json.dumps({"flags": {"seed": 0}, "experiment": {"name": "x"}}))
    assert cli(["--resume", str(folder), "--seed", "5"]) == 2
    assert "--seed 5 differs from the search being resumed (0)" in capsys.readouterr().err
