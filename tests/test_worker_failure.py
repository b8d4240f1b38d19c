"""A Ray Train worker killed in the middle of a trial: the trial resumes from its last checkpoint."""

from __future__ import annotations

import os
import signal
import time

import pytest
from helpers import report_epochs, results_by_trial, search

pytestmark = pytest.mark.slow

EXPERIMENT = """
[fixed]
depth = 3
width = 16
head_width = 32
batch_size = 32
lr = 3e-3
[space]
[budget]
trials = 1
max_epochs = 6
first_epoch_reports = 2
reports_per_epoch = 2
[data]
shard_size = 500
"""


def test_killing_a_train_worker_restarts_the_trial_from_its_checkpoint(ray_session, tmp_path, tiny_mnist_dir,
                                                                     start_search):
    (tmp_path / "space.toml").write_text(EXPERIMENT)
    experiment_dir = tmp_path / "results" / "resumable"
    process = search(start_search, tmp_path, ray_session.address, "--experiment", "space.toml", "--workers-per-trial", "2",
                     "--no-final", "--data-dir", str(tiny_mnist_dir), "--unverified-data")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        rows = next(iter(results_by_trial(experiment_dir).values()), [])
        if len(rows) >= 3:
            break
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.2)
    else:
        pytest.fail("the trial never reported three times")
    victim = int(rows[-1]["worker_pids"].split(",")[1])
    os.kill(victim, signal.SIGKILL)
    killed_at = len(rows)

    output, _ = process.communicate(timeout=600)
    rows = next(iter(results_by_trial(experiment_dir).values()))
    restarted = [i for i, row in enumerate(rows) if str(victim) not in row["worker_pids"].split(",")]
    assert restarted and restarted[0] >= killed_at, "no report came from a new worker group"
    # Every report carries a checkpoint, registered once both workers reported: the new worker
    # group starts at the report right after the old group's last one, and no report comes twice.
    epochs = report_epochs(6)
    last_before = rows[restarted[0] - 1]["epoch"]
    assert rows[restarted[0]]["epoch"] == epochs[epochs.index(last_before) + 1], [row["epoch"] for row in rows]
    assert [row["epoch"] for row in rows] == epochs, [row["epoch"] for row in rows]
    assert process.returncode == 0, output
    assert (experiment_dir / "best_model" / "model.pt2").is_file()
