"""The search report, on real Tune folders: scripted trials run by Ray Tune (each reports the
scores it is given, one fails), and the folders of real searches."""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image

from raylocal.config import OBJECTIVE
from raylocal.report import cli, importances, write_report
from raylocal.results import COMPLETED, ERROR, RUNNING, STOPPED, TIME_BUDGET, read_search, stop_reason

PNGS = ("best_so_far.png", "params.png", "importance.png", "learning_curves.png", "latency.png")
# lr -> (depth, box_loss, scores, how it ends): 4 reports per epoch. The first is best at report 7 of
# 8, so its best epoch (1.75) differs from its last (2.0). "stopped": a stopper stops it at its last
# score, the decision ASHA makes; "ends": it returns between reports without a decision, as a trial
# does that a search's time budget stops; "fails": it raises after a diverged report.
SCRIPTS = {
    1e-3: (4, "giou", [0.1, 0.3, 0.5, 0.6, 0.7, 0.75, 0.8, 0.78], "completes"),
    5e-2: (3, "smooth_l1", [0.05, 0.3], "stopped"),
    1e-4: (3, "smooth_l1", [0.1, 0.2, math.nan], "fails"),
    3e-3: (5, "giou", [0.1, 0.25, 0.4], "ends"),
}
MAX_EPOCHS = 2.0


def run_scripted_search(storage: Path, name: str = "search", lrs: tuple[float, ...] = tuple(SCRIPTS)) -> Path:
    from ray import tune

    scripts = dict(SCRIPTS)

    # Nested, so that Ray ships the function itself: the workers cannot import this test module.
    def scripted_trial(config: dict) -> None:
        """Reports its script's scores, as raylocal's trials report theirs."""
        *_, scores, ends = scripts[config["lr"]]
        for step, score in enumerate(scores, 1):
            tune.report({OBJECTIVE: score, "val_accuracy": min(1.0, score + 0.1), "val_mean_iou": score + 0.05,
                         "val_iou50": 0.9, "val_iou75": 0.4, "epoch": step / 4,
                         "script_stops": ends == "stopped" and step == len(scores)})
        if ends == "stopped":
            time.sleep(60)  # the stopper ends the trial first
        if ends == "fails":
            raise RuntimeError("boom")

    tuner = tune.Tuner(
        scripted_trial,
        param_space={
            "lr": tune.grid_search(list(lrs)),
            "depth": tune.sample_from(lambda spec: scripts[spec.config.lr][0]),
            "box_loss": tune.sample_from(lambda spec: scripts[spec.config.lr][1]),
        },
        tune_config=tune.TuneConfig(max_concurrent_trials=1),
        run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0,
                                  stop=lambda trial_id, result: bool(result["script_stops"])),
    )
    tuner.fit()
    return storage / name


@pytest.fixture(scope="module")
def experiment(ray_session, tmp_path_factory) -> Path:
    return run_scripted_search(tmp_path_factory.mktemp("results"))


@pytest.fixture(scope="module")
def report(experiment, tmp_path_factory) -> tuple[Path, list[str]]:
    lines: list[str] = []
    path = write_report(experiment, tmp_path_factory.mktemp("report"), log=lines.append)
    return path, lines


def read_rows(report_md: Path) -> list[dict[str, str]]:
    import csv

    with (report_md.parent / "trials.csv").open() as file:
        return list(csv.DictReader(file))


def test_trials_csv_has_one_row_per_trial_best_first_with_its_stop_reason(report):
    rows = read_rows(report[0])
    assert [float(row["lr"]) for row in rows] == [1e-3, 3e-3, 5e-2, 1e-4]
    assert [row["stop_reason"] for row in rows] == [COMPLETED, TIME_BUDGET, STOPPED, ERROR]
    assert [row["trial"] for row in rows] == ["1", "4", "2", "3"]
    assert [row["reports"] for row in rows] == ["8", "3", "2", "3"]
    first = rows[0]
    assert (first["depth"], first["box_loss"]) == ("4", "giou")
    assert float(first["best_val_det_iou"]) == 0.8 and float(first["best_epoch"]) == 1.75
    assert float(first["epochs"]) == MAX_EPOCHS and float(first["val_det_iou"]) == 0.78
    assert float(first["wall_s"]) > 0
    # A diverged last report (NaN) does not hide the trial's earlier best.
    assert float(rows[-1]["best_val_det_iou"]) == 0.2


def test_the_reader_gives_each_trial_its_parameters_history_and_status(experiment):
    trials = read_search(experiment)
    assert [trial.status for trial in trials] == ["TERMINATED", "TERMINATED", "ERROR", "TERMINATED"]
    assert [trial.params["depth"] for trial in trials] == [4, 3, 3, 5]
    assert list(trials[0].history[OBJECTIVE]) == SCRIPTS[1e-3][2]
    assert trials[0].best["epoch"] == 1.75 and trials[0].stop_reason(MAX_EPOCHS) == COMPLETED


@pytest.mark.parametrize(
    "status, epoch, decided, reason",
    [("TERMINATED", 2.0, True, COMPLETED), ("TERMINATED", 2.0, False, COMPLETED), ("TERMINATED", 0.5, True, STOPPED),
     ("TERMINATED", 0.5, False, TIME_BUDGET), ("ERROR", 1.0, False, ERROR), ("RUNNING", 1.0, False, RUNNING),
     ("PENDING", 0.0, False, RUNNING), ("PAUSED", 1.0, False, RUNNING)],
)
def test_how_a_trial_ended_comes_from_tunes_status_and_its_last_report(status, epoch, decided, reason):
    assert stop_reason(status, epoch, MAX_EPOCHS, decided) == reason


def test_every_plot_is_written_and_opens_at_a_readable_size(report):
    path, lines = report
    for name in PNGS:
        with Image.open(path.parent / name) as image:
            assert image.format == "PNG"
            assert image.width >= 600 and image.height >= 250, (name, image.size)
    assert len(lines) == len(PNGS) + 2 and all(line.startswith("report: wrote ") for line in lines)


def test_report_md_counts_trials_names_the_best_and_links_files_that_exist(report):
    path = report[0]
    text = path.read_text()
    assert ("4 trials: 1 completed, 1 stopped early (ASHA), 1 ended by the time budget, 0 running/interrupted, "
            "1 error") in text
    assert "**0.8000** at epoch 1.75" in text
    links = re.findall(r"\]\(([^)]+)\)", text)
    assert set(links) == {"trials.csv", *PNGS}
    assert all((path.parent / link).is_file() for link in links)
    assert "not drawn" not in text
    assert "## Accuracy against latency" in text and "Pareto front (best" in text


def test_latency_is_timed_once_per_architecture_and_the_front_is_the_undominated_trials(monkeypatch, tmp_path):
    from raylocal import latency, report

    timed = []

    def fake_ms(config, bound_s):
        timed.append(config)
        return {2: 1.0, 3: 2.0, 4: 4.0}[config.depth]

    monkeypatch.setattr(latency, "architecture_ms", fake_ms)
    scores = {1: (2, 0.80), 2: (3, 0.85), 3: (3, 0.90), 4: (4, 0.88), 5: (2, math.nan)}
    records = [{"trial": trial, "depth": depth, f"best_{OBJECTIVE}": score, "stop_reason": COMPLETED}
               for trial, (depth, score) in scores.items()]
    ms, device = report.latencies(records, tmp_path)
    assert sorted(config.depth for config in timed) == [2, 3, 4] and device.startswith("CPU ")
    assert ms == {1: 1.0, 2: 2.0, 3: 2.0, 4: 4.0, 5: 1.0}
    _, front = report.plot_latency(records, ms, device)
    assert [record["trial"] for record in front] == [1, 3]


def test_importance_covers_the_varied_hyperparameters():
    records = [{"best_val_det_iou": score, "lr": lr, "depth": depth, "box_loss": loss}
               for score, lr, depth, loss in [(0.8, 1e-3, 4, "giou"), (0.3, 5e-2, 3, "smooth_l1"),
                                              (0.6, 3e-3, 5, "giou"), (0.2, 1e-4, 3, "smooth_l1")]]
    values, why = importances(records, ["lr", "depth", "box_loss"], {})
    assert why == "" and set(values) == {"lr", "depth", "box_loss"}
    assert sum(values.values()) == pytest.approx(1.0)


def test_the_report_reads_the_searched_space_from_the_manifest(tmp_path):
    """A real search keeps its space beside its trials; the report uses it instead of guessing
    (here lr spans less than 20x, which the guess would draw on a linear scale)."""
    from raylocal.config import Dimension, Experiment
    from raylocal.report import searched_space
    from raylocal.results import MANIFEST

    space = (Dimension("lr", "loguniform", 1e-4, 1e-2), Dimension("depth", "int", 3, 5))
    (tmp_path / MANIFEST).write_text(json.dumps({"flags": {}, "experiment": Experiment(space=space).describe()}))
    found = searched_space(tmp_path)
    assert found["lr"].log and (found["lr"].low, found["lr"].high) == (1e-4, 1e-2)
    assert (found["depth"].low, found["depth"].high) == (3, 5)
    assert searched_space(tmp_path / "elsewhere") == {}


def test_one_trial_gives_a_report_without_importance(ray_session, tmp_path):
    path = write_report(run_scripted_search(tmp_path, lrs=(5e-2,)), log=lambda line: None)
    assert path == tmp_path / "search" / "report" / "report.md"
    assert not (path.parent / "importance.png").exists()
    assert "importance.png not drawn: needs at least 2 trials" in path.read_text()
    # With no budget known, the longest trial stands for a full one.
    assert read_rows(path)[0]["stop_reason"] == COMPLETED


def test_cli_writes_into_the_experiment_by_default(experiment, tmp_path, capsys):
    copy = shutil.copytree(experiment, tmp_path / experiment.name)
    assert cli([str(copy)]) == 0
    assert (copy / "report" / "importance.png").is_file()
    assert capsys.readouterr().out.count("report: wrote") == len(PNGS) + 2


def test_cli_on_a_folder_without_trials_exits_2_with_one_message(tmp_path, capsys):
    assert cli([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no Tune search" in err


def test_test_metrics_come_from_the_export_dir_the_search_was_given(experiment, tmp_path):
    """The cluster recipe exports elsewhere (--export-dir); the report finds the card through the manifest."""
    from raylocal.config import Dimension, Experiment
    from raylocal.results import MANIFEST

    search = shutil.copytree(experiment, tmp_path / experiment.name)
    export_dir = tmp_path / "shipped"
    export_dir.mkdir()
    (export_dir / "model_card.json").write_text(json.dumps(
        {"trial_id": "abcd0001", "epoch": 1.75, "test": {"test_accuracy": 0.9876, "test_det_iou": 0.8765}}))
    space = (Dimension("lr", "loguniform", 1e-4, 5e-2), Dimension("depth", "int", 3, 5))
    (search / MANIFEST).write_text(json.dumps(
        {"flags": {"export_dir": str(export_dir)}, "experiment": Experiment(space=space).describe()}))
    text = write_report(search, log=lambda line: None).read_text()
    assert (search / "report" / "importance.png").is_file()
    assert "Test split (the export's model_card.json, trial `abcd0001` epoch 1.75)" in text
    assert "accuracy 0.9876" in text and "det_iou 0.8765" in text
