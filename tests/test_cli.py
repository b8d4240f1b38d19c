"""The command line's edge: flags become a validated plan before any Ray instance starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from raylocal.cluster import free_port
from raylocal.config import Experiment
from raylocal.plan import build_plan
from raylocal.settings import Settings
from raylocal.tune import cli, get_args_parser


def plan_for(*flags: str):
    return build_plan(Settings.from_args(get_args_parser().parse_args(list(flags))))


def test_defaults_are_the_default_experiment_stored_under_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = plan_for("--name", "run1")
    assert plan.experiment == Experiment()
    assert plan.storage == str(tmp_path / "raylocal_results")
    assert plan.export_dir == tmp_path / "raylocal_results" / "run1" / "best_model"


def test_smoke_test_shrinks_data_and_budget():
    budget = plan_for("--smoke-test").experiment.budget
    data = plan_for("--smoke-test").experiment.data
    assert (budget.trials, budget.max_epochs) == (2, 1)
    assert data.train_digits is not None and data.train_digits <= 5000


def test_flags_override_the_experiment_file():
    plan = plan_for("--experiment", str(Path(__file__).parents[1] / "experiments" / "default.toml"), "--trials", "7")
    assert plan.experiment.budget.trials == 7
    assert plan.experiment.name == "default"


def files_under(folder: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under `folder`: what a command wrote shows."""
    return {str(path.relative_to(folder)): path.read_bytes() if path.is_file() else None
            for path in folder.rglob("*")}


def bad_toml(tmp_path: Path, text: str) -> str:
    (tmp_path / "bad.toml").write_text(text)
    return str(tmp_path / "bad.toml")


def export_holding_files(tmp_path: Path) -> str:
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "model.pt2").write_text("an earlier export")
    return str(tmp_path / "export")


def read_only_folder(tmp_path: Path) -> str:
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked").chmod(0o500)
    return str(tmp_path / "locked" / "export")


def a_file(tmp_path: Path) -> str:
    (tmp_path / "file").write_text("not a folder")
    return str(tmp_path / "file" / "sub")


def resumable_search(tmp_path: Path) -> str:
    import json

    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "raylocal_search.json").write_text(json.dumps({"flags": {"trials": 3},
                                                                       "experiment": {"name": "x"}}))
    return str(tmp_path / "old")


def truncated_mnist(tmp_path) -> str:
    """The four IDX files, one of them cut short."""
    import numpy as np

    from helpers import tiny_digits
    from raylocal.mnist import write_idx_files

    folder = tmp_path / "mnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    write_idx_files(folder, *tiny_digits(rng, 20), *tiny_digits(rng, 10))
    first = sorted(folder.iterdir())[0]
    first.write_bytes(first.read_bytes()[:100])
    return str(folder)


# Every row of the README's table of mistakes that fails before Ray starts; each flag is a function
# of the test's folder where it needs files made there first.
MISTAKES = [
    (["--trials", "0"], "--trials must be >= 1, got 0"),
    (["--max-epochs", "0"], "--max-epochs must be >= 1, got 0"),
    (["--workers-per-trial", "0"], "--workers-per-trial must be >= 1, got 0"),
    (["--gpus-per-worker", "-1"], "--gpus-per-worker must be >= 0"),
    (["--final-top-k", "0"], "--final-top-k must be >= 1, got 0"),
    (["--time-budget", "-1"], "--time-budget must be >= 0 minutes, got -1"),
    (["--experiment", "/nonexistent/space.toml"], "experiment file /nonexistent/space.toml does not exist"),
    (["--experiment", lambda t: bad_toml(t, "[budget\n")], "is not valid TOML"),
    (["--experiment", lambda t: bad_toml(t, "[budget]\nepochs = 2\n")], "unknown key(s) ['budget.epochs']"),
    (["--experiment", lambda t: bad_toml(t, '[budget]\ntrials = "x"\n')], "budget.trials"),
    (["--experiment", lambda t: bad_toml(t, '[space]\nlr = { type = "loguniform", low = 1, high = 0.1 }\n')],
     "space.lr needs low < high"),
    (["--export-dir", export_holding_files], "already holds files; choose another --export-dir or --name"),
    (["--export-dir", read_only_folder], "cannot write to"),
    (["--export-dir", a_file], "cannot write to"),
    (["--storage", a_file], "cannot write to"),
    (["--resume", lambda t: str(t / "nothing-here")], "no raylocal search to resume at"),
    (["--resume", resumable_search, "--trials", "9"], "--trials 9 differs"),
    (["--time-budget", "2"], "--time-budget 2 min leaves no time to train"),
    (["--data-dir", lambda t: str(t / "no-mnist-here")], "MNIST not found; tried, in order: "),
    (["--data-dir", truncated_mnist, "--unverified-data"], "broken gzip"),
]


@pytest.mark.parametrize("flags, message", MISTAKES, ids=[" ".join(f for f in flags if isinstance(f, str)) + f" {i}"
                                                          for i, (flags, _) in enumerate(MISTAKES)])
def test_each_mistake_gives_one_line_exit_code_2_and_writes_nothing(flags, message, tmp_path, monkeypatch, capsys):
    if "read_only_folder" in repr(flags) and os.geteuid() == 0:
        pytest.skip("root writes into a read-only folder; the file-in-the-way rows stand for it")
    monkeypatch.chdir(tmp_path)  # the default storage is under the working directory
    argv = [flag(tmp_path) if callable(flag) else flag for flag in flags]
    before = files_under(tmp_path)
    assert cli(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.endswith("\n"), captured.err
    assert captured.err.startswith("raylocal-tune: error: ") and message in captured.err, captured.err
    assert captured.out == ""
    assert files_under(tmp_path) == before


def test_experiment_file_with_unknown_key_names_it(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text('[budget]\ntrials = 3\nepochs = 2\n')
    assert cli(["--experiment", str(path)]) == 2
    assert "budget.epochs" in capsys.readouterr().err


def test_an_address_where_nothing_listens_fails_fast_with_one_message(tmp_path, tiny_mnist_dir):
    # A fresh process, as a user starts it: this one may hold the session's Ray connection.
    address = f"127.0.0.1:{free_port()}"  # closed again at once: nothing listens there
    done = subprocess.run([sys.executable, "-m", "raylocal.tune", "--address", address, "--storage",
                           str(tmp_path / "results"), "--data-dir", str(tiny_mnist_dir), "--unverified-data"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert f"--address {address}: no Ray cluster answers there" in done.stderr and "Traceback" not in done.stderr


def test_an_address_other_than_the_connected_cluster_is_refused_not_ignored(ray_session, tmp_path, tiny_mnist_dir,
                                                                             capsys):
    # Python users may call raylocal with Ray already initialized; searching that cluster instead
    # of the one named would ignore the flag (and started a 19-minute search in a test).
    address = f"127.0.0.1:{free_port()}"
    assert cli(["--address", address, "--storage", str(tmp_path / "results"), "--data-dir", str(tiny_mnist_dir),
                "--unverified-data"]) == 2
    err = capsys.readouterr().err
    assert f"--address {address}: this process is already connected to the Ray cluster at" in err
    assert "Traceback" not in err and not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    "settings, message",
    [({"trials": "many"}, "--trials='many' must be of type int or None"),
     ({"device": "tpu"}, "--device must be one of ('auto', 'cuda', 'cpu'), got 'tpu'"),
     ({"no_final": 1}, "--no-final=1 must be of type bool"), ({"views": 6}, "--views must be 1 to 5, got 6")],
)
def test_python_entry_point_refuses_bad_settings_before_any_work(settings, message):
    import raylocal
    from raylocal.config import ConfigError

    with pytest.raises(ConfigError) as error:
        raylocal.search(**settings)
    assert message in str(error.value)
    with pytest.raises(TypeError, match="trails"):
        raylocal.search(trails=3)  # an explicit signature: Python names the unknown keyword


def test_search_takes_every_setting_by_name_with_its_default():
    """`raylocal.search`'s signature is written out for editors; it must match `Settings` exactly."""
    import dataclasses
    import inspect

    import raylocal

    parameters = inspect.signature(raylocal.search).parameters
    fields = dataclasses.fields(raylocal.Settings)
    assert list(parameters) == [field.name for field in fields]
    assert {name: p.default for name, p in parameters.items()} == {field.name: field.default for field in fields}
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters.values())


def test_help_and_version_need_neither_torch_nor_ray():
    code = ("import sys; from raylocal.tune import get_args_parser; get_args_parser().format_help(); "
            "from raylocal.cli import get_args_parser as top; top().format_help(); "
            "assert not {'torch', 'ray'} & set(sys.modules), sorted({'torch', 'ray'} & set(sys.modules))")
    subprocess.run([sys.executable, "-c", code], check=True)
    for argv in (["--help"], ["--version"], ["tune", "--help"]):
        done = subprocess.run([sys.executable, "-m", "raylocal", *argv], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and done.stdout.startswith(("usage: raylocal", "raylocal ")), done
    assert "search:" in done.stdout and "final training:" in done.stdout and "--time-budget MINUTES" in done.stdout


def test_debug_shows_the_traceback_instead_of_one_line(capsys):
    from raylocal.config import ConfigError

    assert cli(["--trials", "0"]) == 2
    with pytest.raises(ConfigError, match="--trials must be >= 1"):
        cli(["--trials", "0", "--debug"])


def test_the_status_table_survives_trials_stopped_before_their_first_report(ray_session, tmp_path, capsys):
    """A time budget stops running trials, some before their first report; the last status table
    (with done=True) once failed on them (None < None in its sort) and ended the whole command."""
    import copy
    import time

    from ray.train._internal.storage import StorageContext
    from ray.tune.experiment import Trial

    from raylocal.config import OBJECTIVE
    from raylocal.tuner import progress_reporter

    reporter = progress_reporter(plan_for("--smoke-test"))
    reporter.setup(metric=OBJECTIVE, mode="max", total_samples=3)
    reporter.set_start_time(time.time())
    config = {"depth": 4, "width": 8, "box_loss_weight": 0.1}
    storage = StorageContext(storage_path=str(tmp_path), experiment_dir_name="status")
    trials = [Trial("run_trial", config=config | {"lr": lr}, stub=True, storage=storage) for lr in (1e-3, 2e-3, 3e-3)]
    for index, trial in enumerate(trials):
        trial.storage = copy.copy(storage)
        trial.storage.trial_dir_name = f"trial_{index}"
        trial.set_status(Trial.TERMINATED)
    trials[1].run_metadata.last_result = {OBJECTIVE: 0.75, "epoch": 1.0, "config": trials[1].config}
    reporter.report(trials, done=True)
    assert "0.75" in capsys.readouterr().out
