"""Two searches started together on one machine: each starts its own local Ray, listens on
loopback alone (its DDP rendezvous too) and exports its own model.

Both train through Ray Train (two DDP workers a trial), the case where a second Ray instance
on the machine used to hang the trial: Train's placement-group cleaner looked its cluster up
with no address and found two.
"""

from __future__ import annotations

import csv
import re

import pytest
from helpers import Listeners
from train_sockets import TrainWorkerSockets

from raylocal.export import EXPORT_FILES
from raylocal.results import all_reports, read_search

pytestmark = pytest.mark.slow


def test_two_local_train_searches_at_once_both_finish_and_export(tmp_path, tiny_mnist_dir, start_search):
    runs = {
        # Not --quiet: worker logs must reach the output for the "multiple instances" check to mean anything.
        # One trial each: a Train run per instance is what used to hang; a second only repeated it.
        name: start_search("--smoke-test", "--trials", "1", "--verbose", "0", "--data-dir", str(tiny_mnist_dir),
                           "--unverified-data", "--storage", str(tmp_path / "results"), "--name", name,
                           "--workers-per-trial", "2", "--no-final")
        for name in ("first", "second")
    }
    with (Listeners(runs["first"].pid) as first, Listeners(runs["second"].pid) as second,
          TrainWorkerSockets(runs["first"].pid) as first_train, TrainWorkerSockets(runs["second"].pid) as second_train):
        outputs = {name: process.communicate(timeout=400)[0] for name, process in runs.items()}
    # Every socket either search listened on, its DDP trials' rendezvous store and gloo included,
    # was on loopback: a local search is not reachable from the network.
    for listeners in (first, second):
        assert listeners.of("RayTrainWorker") and listeners.of("gcs_server"), sorted(listeners.seen)
        assert not listeners.beyond_loopback(), listeners.beyond_loopback()
    # Not missed between two polls: each trial's rendezvous store (rank 0) and gloo's listener(s),
    # each connected to by the other worker, were seen, on loopback.
    for train in (first_train, second_train):
        between = train.between_workers()
        assert len(between) >= 2, (between, train.listening, train.connected)
        assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1") for ip, _ in between), between
    for name, process in runs.items():
        assert process.returncode == 0, outputs[name]
        assert "Found multiple active Ray instances" not in outputs[name]
        # Ray's lines per report of a Train worker (hidden below --verbose 3).
        assert "Reporting training result" not in outputs[name] and "Checkpoint successfully" not in outputs[name]
        assert "backend: Ray Train TorchTrainer" in outputs[name]
        export_dir = tmp_path / "results" / name / "best_model"
        assert sorted(path.name for path in export_dir.iterdir()) == sorted(EXPORT_FILES)
        with open(tmp_path / "results" / name / "report" / "trials.csv") as table:
            trials = list(csv.DictReader(table))
        assert len(trials) == 1 and all(int(trial["reports"]) >= 1 for trial in trials), trials
    # At once: each search's trial trained while the other's did (from its reports' times).
    spans = []
    for name in runs:
        reports = all_reports(read_search(tmp_path / "results" / name))
        spans.append(((reports["timestamp"] - reports["time_total_s"]).min(), reports["timestamp"].max()))
    (first_start, first_end), (second_start, second_end) = spans
    assert first_start <= second_end and second_start <= first_end, spans
    dashboards = {re.search(r"ray: dashboard at (\S+)", output).group(1) for output in outputs.values()}
    assert len(dashboards) == 2, "the two searches shared one Ray instance"
    assert all(url.startswith("http://127.0.0.1:") for url in dashboards), dashboards
    instances = {re.search(r"started a local instance at (\S+)", output).group(1) for output in outputs.values()}
    assert len(instances) == 2 and all(address.startswith("127.0.0.1:") for address in instances), instances
