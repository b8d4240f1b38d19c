"""Resume after the driver dies: a real search in a subprocess, SIGKILLed mid-way, then resumed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import experiment, results_by_trial, search


# Tune's driver writes results and its saved state (which trials it holds, their checkpoints) in
# a staging folder of its session, and copies them into the search's folder when it saves the
# state: every 10 s or more, and after every second Tune checkpoint of a trial (inline trials make
# those, DDP trials do not). The killed search saves every second, so that what the test watches
# in the search's folder is close to what Tune knew, and is what the resume finds.
SAVE_STATE_OFTEN = {"TUNE_GLOBAL_CHECKPOINT_S": "1"}


def trained_epochs(experiment_dir: Path, trial_folder: str, rows: list[dict], workers: int) -> float | None:
    """How far a trial has trained. Inline, its rows say: each report waits for the driver, and
    the copy in the search's folder trails it by a report or so. A DDP trial's Train run goes on
    while its rows wait for the copy (with Tune's default period, five reports were seen arrive at
    once), so its own Train run says (None before its first checkpoint)."""
    if workers == 1:
        return rows[-1]["epoch"]
    from ray.train import Result

    trial_id = trial_folder.split("_")[2]
    try:
        return Result.from_path(str(experiment_dir.parent / f"{experiment_dir.name}-train-runs"
                                    / f"{experiment_dir.name}-train-{trial_id}")).metrics["epoch"]
    except Exception:  # noqa: BLE001 - no checkpoint yet, or its snapshot is being written
        return None


def saved_statuses(experiment_dir: Path) -> dict[str, str]:
    """Each trial folder's status in Tune's saved state, which saves a running trial as PENDING.
    A trial started since the last save is not in it: the resumed searcher would start it again
    as a new trial; one whose end is not saved yet would be run again."""
    from raylocal.results import read_search

    try:
        return {Path(trial.path).name: trial.status for trial in read_search(experiment_dir)}
    except Exception:  # noqa: BLE001 - the state is being written, or not yet
        return {}


def wait_for_one_done_and_one_running(experiment_dir: Path, process: subprocess.Popen, max_epochs: int, workers: int,
                                      timeout_s: float = 240):
    """A moment with one trial done and one running, both so in Tune's saved state, the running
    one having reported (inline: twice) and having at least a whole epoch left to train: a trial
    that finished training just before the kill has nothing left to continue after the resume."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        trials = results_by_trial(experiment_dir)
        done = [name for name, rows in trials.items() if rows and rows[-1].get("done")]
        started = [name for name, rows in trials.items()
                   if len(rows) >= (2 if workers == 1 else 1) and not rows[-1].get("done")]
        running = [name for name in started
                   if (epochs := trained_epochs(experiment_dir, name, trials[name], workers)) is not None
                   and epochs <= max_epochs - 1]
        if done and running:
            saved = saved_statuses(experiment_dir)
            finished = [name for name in done if saved.get(name) == "TERMINATED"]
            unfinished = [name for name in running if saved.get(name) in ("PENDING", "RUNNING")]
            if finished and unfinished:
                return trials, finished[0], unfinished[0]
        if process.poll() is not None:
            pytest.fail(f"search ended before it could be interrupted:\n{process.stdout.read()}")
        time.sleep(0.2)
    pytest.fail("no moment with one trial finished and one running")


def lose_the_saved_checkpoint(experiment_dir: Path, trial_folder: str) -> bool:
    """What Tune does, now and then, to a search killed at the wrong moment, done every time: a
    newer checkpoint registered after the last save, and the one the saved state names deleted (it
    was not among the best). False where the state names none (a resume starts the trial again).
    Inline trials only; a DDP trial resumes from its Train run's checkpoint."""
    from raylocal.results import latest_checkpoints

    folder = experiment_dir / trial_folder
    name = latest_checkpoints(experiment_dir).get(str(folder))
    if name is None:
        return False
    named = folder / name
    newer = named.with_name(f"checkpoint_{int(name.split('_')[1]) + 1:06d}")
    if named.exists() and newer.exists():
        shutil.rmtree(named)
    elif named.exists():
        named.rename(newer)
    return True


# Slow tier: each case runs a search twice, once killed; the flag checks below stay in the fast tier.
@pytest.mark.slow
@pytest.mark.parametrize("workers", [
    pytest.param(1, id="inline"),
    # Trials of two DDP workers, one at a time on the session's two one-CPU nodes: each trial's Train
    # run is found again by its stable name and continues from its own checkpoint.
    pytest.param(2, id="ddp"),
])
def test_a_killed_search_resumes_without_losing_or_redoing_work(ray_session, tmp_path, tiny_mnist_dir, start_search,
                                                                 workers):
    max_epochs = 8 if workers == 1 else 4
    # Inline, a third trial is the one a kill may catch just started, before Tune saved it. DDP
    # trials run one at a time here, so two give the moment with one done and one running; a
    # third only added a whole DDP trial to the slowest test of the suite (120 s with three).
    trials = 3 if workers == 1 else 2
    (tmp_path / "space.toml").write_text(experiment(trials=trials, max_epochs=max_epochs))
    experiment_dir = tmp_path / "results" / "resumable"
    first = search(start_search, tmp_path, ray_session.address, "--experiment", "space.toml", "--no-final",
                   "--data-dir", str(tiny_mnist_dir), "--unverified-data", "--workers-per-trial", str(workers),
                   extra_env=SAVE_STATE_OFTEN)
    before, finished, interrupted = wait_for_one_done_and_one_running(experiment_dir, first, max_epochs, workers)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    lost = workers == 1 and lose_the_saved_checkpoint(experiment_dir, interrupted)
    # What Tune had saved when it died is what the resumed search starts from.
    before = results_by_trial(experiment_dir)

    second = search(start_search, tmp_path, ray_session.address, "--resume")
    output, _ = second.communicate(timeout=300)
    assert second.returncode == 0, output
    if lost:
        assert f"resume: {interrupted}: its saved checkpoint" in output, output

    # A trial started just before the kill but not yet in Tune's saved state leaves an empty
    # folder; the resumed searcher starts that configuration again as a new trial.
    after = {name: rows for name, rows in results_by_trial(experiment_dir).items() if rows}
    # Tune's own saved state says which trials the search holds and how each ended; a folder
    # left by a trial started just before the kill is not one of them.
    from raylocal.results import read_search

    statuses = [trial.status for trial in read_search(experiment_dir)]
    assert statuses == ["TERMINATED"] * trials, statuses
    assert after[finished] == before[finished]
    resumed_rows = after[interrupted][len(before[interrupted]):]
    assert resumed_rows, "the interrupted trial did not continue"
    if workers == 1:
        # Tune restores an inline trial from its own checkpoint, iteration count included; a DDP
        # trial's Tune process starts again and its Train run continues from Train's checkpoint.
        assert min(row["training_iteration"] for row in resumed_rows) > 1
    # Epochs continue from the checkpoint: the first resumed report follows one already saved.
    saved_epochs = {row["epoch"] for row in before[interrupted]}
    assert resumed_rows[0]["epoch"] > min(saved_epochs), (before[interrupted], resumed_rows)
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
    (tmp_path / "space.toml").write_text(experiment())
    assert cli(["--resume", str(folder), "--experiment", str(tmp_path / "space.toml")]) == 2
    assert "different search space" in capsys.readouterr().err
    assert cli(["--resume", str(folder), "--trials", "9"]) == 2
    assert "--trials 9 differs" in capsys.readouterr().err


def test_a_search_from_before_final_init_resumes_its_final_runs_as_they_started(tmp_path):
    from raylocal.config import Experiment
    from raylocal.plan import resumed
    from raylocal.settings import Settings
    from raylocal.tune import get_args_parser

    def resume(folder):
        return resumed(Settings.from_args(get_args_parser().parse_args(["--resume", str(folder)]))).settings

    folder = tmp_path / "old"
    folder.mkdir()
    # Final runs started from scratch before the flag existed, and from a checkpoint at the full
    # learning rate before --final-lr-scale; a manifest that names them keeps them.
    for flags, expected in [({"seed": 0}, ("scratch", 1.0)),
                            ({"seed": 0, "final_init": "checkpoint"}, ("checkpoint", 1.0)),
                            ({"seed": 0, "final_init": "checkpoint", "final_lr_scale": 0.3}, ("checkpoint", 0.3))]:
        (folder / "raylocal_search.json").write_text(json.dumps({"flags": flags, "experiment": Experiment().describe()}))
        args = resume(folder)
        assert (args.final_init, args.final_lr_scale) == expected
        # The search took 45% of the time left to train before --search-share, and exported the
        # network alone before --views.
        assert (args.search_share, args.views) == (0.45, 1)
    (folder / "raylocal_search.json").write_text(json.dumps({"flags": {"seed": 0, "views": 5},
                                                             "experiment": Experiment().describe()}))
    assert resume(folder).views == 5


def test_resuming_with_another_seed_is_refused(tmp_path, capsys):
    from raylocal.tune import cli

    folder = tmp_path / "results" / "old"
    folder.mkdir(parents=True)
    (folder / "raylocal_search.json").write_text(json.dumps({"flags": {"seed": 0}, "experiment": {"name": "x"}}))
    assert cli(["--resume", str(folder), "--seed", "5"]) == 2
    assert "--seed 5 differs from the search being resumed (0)" in capsys.readouterr().err
    # A flag newer than the search is compared with what the search ran with, not with nothing.
    assert cli(["--resume", str(folder), "--views", "3"]) == 2
    assert "--views 3 differs from the search being resumed (1)" in capsys.readouterr().err


@pytest.mark.slow
def test_a_search_killed_in_its_final_phase_resumes_the_final_run(ray_session, tmp_path, tiny_mnist_dir, start_search):
    (tmp_path / "space.toml").write_text(experiment(trials=1, max_epochs=1))
    experiment_dir = tmp_path / "results" / "resumable"
    run_dir = experiment_dir / "final" / "final-1-seed0"
    first = search(start_search, tmp_path, ray_session.address, "--experiment", "space.toml", "--final-epochs", "5",
                   "--data-dir", str(tiny_mnist_dir), "--unverified-data")
    deadline = time.monotonic() + 240
    # Ray Train's snapshot names the checkpoints it registered; it is written after the first.
    while not (run_dir / "checkpoint_manager_snapshot.json").is_file():
        if first.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the final run wrote no checkpoint before it ended:\n{first.stdout.read()}")
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    search_rows = results_by_trial(experiment_dir)
    from raylocal.final import finished_epochs

    saved = finished_epochs(str(run_dir))
    assert 1 <= saved < 5, f"the final run had {saved} epochs when it was killed"

    second = search(start_search, tmp_path, ray_session.address, "--resume")
    output, _ = second.communicate(timeout=300)
    assert second.returncode == 0, output
    # The search is not run again; the final run continues after its last checkpoint.
    assert results_by_trial(experiment_dir) == search_rows
    # Its workers may checkpoint once more before Ray sees the driver gone: read where it resumed.
    import re

    resumed_after = int(re.search(r"resuming after epoch (\d+)", output).group(1))
    assert saved <= resumed_after < 5, output
    card = json.loads((experiment_dir / "best_model" / "model_card.json").read_text())
    assert [row["epoch"] for row in card["final"]["curve"]] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert card["final"]["epochs_trained"] == 5.0
