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
from helpers import experiment, report_epochs, results_by_trial, search


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


def saved_checkpoints(experiment_dir: Path) -> dict[str, str]:
    """Each unfinished trial folder's checkpoint as Tune's saved state names it."""
    from raylocal.results import latest_checkpoints

    try:
        return {Path(path).name: name for path, name in latest_checkpoints(experiment_dir).items()}
    except Exception:  # noqa: BLE001 - the state is being written, or not yet
        return {}


def checkpoint_epoch(folder: Path) -> float:
    """The epoch of the last report a checkpoint folder holds the training of."""
    from ray.train import Checkpoint

    from raylocal.trial import load_checkpoint_state

    return load_checkpoint_state(Checkpoint.from_directory(str(folder)))["epoch"]


def wait_for_one_done_and_one_running(experiment_dir: Path, process: subprocess.Popen, max_epochs: int, workers: int,
                                      timeout_s: float = 600):
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
            unfinished = [name for name in running if saved.get(name) in ("PENDING", "RUNNING")
                          and (workers > 1 or name in saved_checkpoints(experiment_dir))]
            if finished and unfinished:
                return trials, finished[0], unfinished[0]
        if process.poll() is not None:
            pytest.fail(f"search ended before it could be interrupted:\n{process.stdout.read()}")
        time.sleep(0.2)
    pytest.fail("no moment with one trial finished and one running")


def wait_for_train_workers_to_end(timeout_s: float = 180) -> None:
    """Until Ray has ended the killed search's Train workers: until then they may checkpoint again,
    and the resume continues from whichever checkpoint is last."""
    from ray.util.state import list_actors

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = list_actors(filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
        if not any("TrainWorker" in actor.class_name for actor in alive):
            return
        time.sleep(1)
    pytest.fail("the killed search's Train workers still run")


def lose_the_saved_checkpoint(experiment_dir: Path, trial_folder: str) -> float:
    """What Tune does, now and then, to a search killed at the wrong moment, done every time: a
    newer checkpoint registered after the last save, and the one the saved state names deleted (it
    was not among the best). Returns the epoch of the checkpoint the trial must continue from: the
    newest. Inline trials only; a DDP trial resumes from its Train run's checkpoint."""
    folder = experiment_dir / trial_folder
    name = saved_checkpoints(experiment_dir)[trial_folder]
    named = folder / name
    newer = named.with_name(f"checkpoint_{int(name.split('_')[1]) + 1:06d}")
    if named.exists() and newer.exists():
        shutil.rmtree(named)
    elif named.exists():
        named.rename(newer)
    # The resume continues from the newest one left (`raylocal.tuner.recover_replaced_checkpoints`).
    return checkpoint_epoch(max(folder.glob("checkpoint_*")))


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
    # Inline, the saved state names a checkpoint of the interrupted trial (the wait saw it), taken
    # away here every time; DDP, the trial continues from its Train run's latest checkpoint.
    if workers > 1:
        wait_for_train_workers_to_end()
    saved_epoch = (lose_the_saved_checkpoint(experiment_dir, interrupted) if workers == 1
                   else trained_epochs(experiment_dir, interrupted, [], workers))
    # What Tune had saved when it died is what the resumed search starts from.
    before = results_by_trial(experiment_dir)

    second = search(start_search, tmp_path, ray_session.address, "--resume")
    output, _ = second.communicate(timeout=600)
    assert second.returncode == 0, output
    if workers == 1:  # the deleted-checkpoint path was taken
        assert f"resume: {interrupted}: its saved checkpoint" in output, output

    # A trial started just before the kill but not yet in Tune's saved state leaves an empty
    # folder; the resumed searcher starts that configuration again as a new trial.
    after = {name: rows for name, rows in results_by_trial(experiment_dir).items() if rows}
    resumed_rows = after[interrupted][len(before[interrupted]):]
    assert resumed_rows, "the interrupted trial did not continue"
    if workers == 1:
        # Tune restores an inline trial from its own checkpoint, iteration count included; a DDP
        # trial's Tune process starts again and its Train run continues from Train's checkpoint.
        assert min(row["training_iteration"] for row in resumed_rows) > 1
    # The first resumed report is the one right after the checkpoint the trial continued from:
    # nothing lost, nothing trained twice; no report up to that checkpoint appears twice.
    epochs = report_epochs(max_epochs)
    assert saved_epoch in epochs, saved_epoch
    assert resumed_rows[0]["epoch"] == epochs[epochs.index(saved_epoch) + 1], (saved_epoch, before[interrupted],
                                                                               resumed_rows)
    up_to_checkpoint = [row["epoch"] for row in after[interrupted] if row["epoch"] <= saved_epoch]
    assert len(up_to_checkpoint) == len(set(up_to_checkpoint)), after[interrupted]
    # Tune's own saved state says which trials the search holds and how each ended; a folder
    # left by a trial started just before the kill is not one of them.
    from raylocal.results import read_search

    statuses = [trial.status for trial in read_search(experiment_dir)]
    assert statuses == ["TERMINATED"] * trials, statuses
    assert after[finished] == before[finished]
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
    deadline = time.monotonic() + 600
    # Ray Train's snapshot names the checkpoints it registered; it is written after the first.
    while not (run_dir / "checkpoint_manager_snapshot.json").is_file():
        if first.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the final run wrote no checkpoint before it ended:\n{first.stdout.read()}")
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    search_rows = results_by_trial(experiment_dir)
    from raylocal.final import saved_run

    # Its workers may checkpoint once more before Ray sees the driver gone: what the resume
    # continues from is the run's last checkpoint once they ended.
    wait_for_train_workers_to_end()
    killed = saved_run(str(run_dir))
    assert killed is not None and 1 <= killed.done < 5, f"the final run had {killed} when it was killed"

    second = search(start_search, tmp_path, ray_session.address, "--resume")
    output, _ = second.communicate(timeout=600)
    # The search is not run again; the final run continues after its last checkpoint: its
    # checkpoint's history (one row per epoch, carried from checkpoint to checkpoint) begins with
    # the killed run's rows as they were, then the epochs after them, each once.
    assert results_by_trial(experiment_dir) == search_rows
    history = saved_run(str(run_dir)).state["history"]
    assert history[:killed.done] == killed.state["history"], (killed.state["history"], history)
    assert [row["epoch"] for row in history] == [1.0, 2.0, 3.0, 4.0, 5.0], history
    assert second.returncode == 0, output
    card = json.loads((experiment_dir / "best_model" / "model_card.json").read_text())
    assert [row["epoch"] for row in card["final"]["curve"]] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert card["final"]["epochs_trained"] == 5.0


def test_a_resumed_search_under_a_time_budget_keeps_its_share_and_final_plan_and_counts_from_its_own_start(
        tmp_path, tiny_mnist_dir, monkeypatch):
    """The budget of a resumed command is the one the search was started with, its search share
    too, counted from when the resumed command started (its time before the kill is gone); a final
    run it started keeps the epochs it planned, whatever a plan from the time left would say."""
    import contextlib
    from types import SimpleNamespace

    import raylocal.cluster
    import raylocal.final
    import raylocal.pipeline
    from raylocal.budget import TimeBudget
    from raylocal.config import Experiment
    from raylocal.final import SavedRun, final_plan
    from raylocal.plan import plan_search
    from raylocal.settings import Settings
    from raylocal.tune import get_args_parser

    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "raylocal_search.json").write_text(json.dumps({
        "flags": {"seed": 0, "time_budget": 7.0, "search_share": 0.6, "data_dir": str(tiny_mnist_dir),
                  "unverified_data": True}, "experiment": Experiment().describe()}))
    settings = Settings.from_args(get_args_parser().parse_args(["--resume", str(folder)]))
    budgets = []

    class Stop(Exception):
        pass

    def run_trials(plan, mnist, time_budget, log):
        budgets.append(time_budget)
        raise Stop

    monkeypatch.setattr(raylocal.cluster, "connect", lambda *args, **kwargs: contextlib.nullcontext())
    monkeypatch.setattr(raylocal.pipeline, "run_trials", run_trials)
    monkeypatch.setattr(raylocal.pipeline, "check_destinations", lambda plan: None)
    before = time.time()
    with pytest.raises(Stop):
        raylocal.pipeline.run(settings, log=lambda line: None)
    (budget,) = budgets
    assert (budget.seconds, budget.share) == (7.0 * 60, 0.6), budget
    assert before <= budget.started <= time.time(), (before, budget.started)

    # The final phase's plan: the run's saved checkpoint wins over a plan from the time left.
    plan = plan_search(settings)
    saved = SavedRun(done=2, planned=9, workers=2, state={}, placement={})
    monkeypatch.setattr(raylocal.final, "saved_run", lambda run_dir, fs=None: saved)
    monkeypatch.setattr(raylocal.final, "plan_epochs", lambda *args: (3, "3 epochs fit in the time left"))

    data = SimpleNamespace(train_epochs=[SimpleNamespace(rows=100)], val=SimpleNamespace(rows=10))
    epochs, cap, why = final_plan(plan.final, [], data, SimpleNamespace(seed=0, storage_filesystem=None),
                                  SimpleNamespace(workers=2), TimeBudget.for_command(7.0, time.time(), True, 0.6),
                                  str(folder))
    assert (epochs, cap) == (9, 9) and "as planned when the final phase started" in why


def test_the_samplers_history_survives_a_resume(tmp_path):
    """The searcher a resumed search restores (Tune saves it beside the trials and restores it into
    the search algorithm the search was built with) draws, after the resume, the configurations an
    uninterrupted search with the same seed draws: TPE's random start-up and its model of the
    results alike. In one process, with a score that is a function of the configuration: a real
    search's scores depend on timing, and so would its later draws."""
    from raylocal.config import OBJECTIVE
    from raylocal.plan import build_plan
    from raylocal.settings import Settings
    from raylocal.tune import get_args_parser
    from raylocal.tuner import search_algorithm, startup_trials

    trials, interrupted_at = 12, 6
    assert interrupted_at > startup_trials(trials)  # TPE models the results before the interruption
    plan = build_plan(Settings.from_args(get_args_parser().parse_args(["--trials", str(trials), "--seed", "3"])))

    def draw(searcher, numbers) -> list[dict]:
        configurations = []
        for number in numbers:
            config = searcher.suggest(str(number))
            searcher.on_trial_complete(str(number), {OBJECTIVE: config["lr"] * 10 + config["box_loss_weight"]})
            configurations.append(config)
        return configurations

    uninterrupted = draw(search_algorithm(plan), range(trials))
    first = search_algorithm(plan)
    before = draw(first, range(interrupted_at))
    first.save_to_dir(str(tmp_path), session_str="resumable")
    resumed = search_algorithm(plan)
    resumed.restore_from_dir(str(tmp_path))
    after = draw(resumed, range(interrupted_at, trials))
    assert before + after == uninterrupted, (before + after, uninterrupted)
