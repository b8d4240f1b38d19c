"""The search report, on experiment folders laid out the way Ray Tune writes them (no Ray)."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest
from PIL import Image

from raylocal.report import cli, importances, write_report

MAX_REPORTS = 8
PNGS = ("best_so_far.png", "params.png", "importance.png", "learning_curves.png")


def fake_trial(root: Path, index: int, trial_id: str, params: dict, scores: list[float], *, done: bool,
               error: bool = False) -> None:
    """One trial folder: params.json, result.json (a JSON object per report) and progress.csv."""
    tag = ",".join(f"{key}={value}" for key, value in params.items())
    folder = root / f"run_trial_{trial_id}_{index}_{tag}_2026-11-25_21-37-06"
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps(params, indent=2))
    rows = [
        {"train_loss": 1 / step, "val_accuracy": min(1.0, score + 0.1), "val_mean_iou": score + 0.05,
         "val_det_iou": score, "val_iou50": 0.9, "val_iou60": 0.7, "val_iou75": 0.4, "val_det50": 0.8,
         "epoch": step / 4, "done": done and step == len(scores), "training_iteration": step,
         "trial_id": trial_id, "time_total_s": 1.5 * step, "config": params}
        for step, score in enumerate(scores, 1)
    ]
    (folder / "result.json").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with (folder / "progress.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=[key for key in rows[0] if key != "config"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    if error:
        (folder / "error.txt").write_text("Failure # 1 (occurred at 2026-11-25_21-40-00)\nRuntimeError: boom\n")


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("results") / "search"
    root.mkdir()
    # Best at report 7 of 8, so the best epoch (1.75) differs from the last (2.0).
    fake_trial(root, 1, "aaaa0001", {"lr": 1e-3, "depth": 4, "box_loss": "giou"},
               [0.1, 0.3, 0.5, 0.6, 0.7, 0.75, 0.8, 0.78], done=True)
    fake_trial(root, 2, "bbbb0002", {"lr": 5e-2, "depth": 3, "box_loss": "smooth_l1"}, [0.05, 0.3], done=True)
    fake_trial(root, 3, "cccc0003", {"lr": 3e-3, "depth": 5, "box_loss": "giou"},
               [0.2, 0.4, 0.5, 0.55, 0.6], done=False)
    fake_trial(root, 4, "dddd0004", {"lr": 1e-4, "depth": 3, "box_loss": "smooth_l1"}, [0.1, 0.2, math.nan],
               done=False, error=True)
    return root


@pytest.fixture(scope="module")
def report(experiment, tmp_path_factory) -> tuple[Path, list[str]]:
    lines: list[str] = []
    path = write_report(experiment, tmp_path_factory.mktemp("report"), log=lines.append)
    return path, lines


def read_rows(report_md: Path) -> list[dict[str, str]]:
    with (report_md.parent / "trials.csv").open() as file:
        return list(csv.DictReader(file))


def test_trials_csv_has_one_row_per_trial_best_first_with_its_stop_reason(report):
    rows = read_rows(report[0])
    assert [row["trial_id"] for row in rows] == ["aaaa0001", "cccc0003", "bbbb0002", "dddd0004"]
    assert [row["stop_reason"] for row in rows] == ["completed", "running/interrupted", "stopped early (ASHA)", "error"]
    assert [row["trial"] for row in rows] == ["1", "3", "2", "4"]
    assert [row["reports"] for row in rows] == ["8", "5", "2", "3"]
    first = rows[0]
    assert (first["lr"], first["depth"], first["box_loss"]) == ("0.001", "4", "giou")
    assert float(first["best_val_det_iou"]) == 0.8 and float(first["best_epoch"]) == 1.75
    assert float(first["epochs"]) == 2.0 and float(first["val_det_iou"]) == 0.78
    assert float(first["wall_s"]) == 1.5 * MAX_REPORTS
    # A diverged last report (NaN) does not hide the trial's earlier best.
    assert float(rows[-1]["best_val_det_iou"]) == 0.2


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
    assert "4 trials: 1 completed, 1 stopped early (ASHA), 1 running/interrupted, 1 error" in text
    assert "`aaaa0001`" in text and "**0.8000** at epoch 1.75" in text
    links = re.findall(r"\]\(([^)]+)\)", text)
    assert set(links) == {"trials.csv", *PNGS}
    assert all((path.parent / link).is_file() for link in links)
    assert "not drawn" not in text


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
    from raylocal.tune import MANIFEST

    space = (Dimension("lr", "loguniform", 1e-4, 1e-2), Dimension("depth", "int", 3, 5))
    (tmp_path / MANIFEST).write_text(json.dumps({"flags": {}, "experiment": Experiment(space=space).describe()}))
    found = searched_space(tmp_path)
    assert found["lr"].log and (found["lr"].low, found["lr"].high) == (1e-4, 1e-2)
    assert (found["depth"].low, found["depth"].high) == (3, 5)
    assert searched_space(tmp_path / "elsewhere") == {}


def test_one_trial_gives_a_report_without_importance(tmp_path):
    fake_trial(tmp_path, 1, "eeee0005", {"lr": 1e-3, "depth": 4}, [0.2, 0.4], done=True)
    path = write_report(tmp_path, log=lambda line: None)
    assert path == tmp_path / "report" / "report.md"
    assert not (path.parent / "importance.png").exists()
    assert "importance.png not drawn: needs at least 2 trials" in path.read_text()
    assert read_rows(path)[0]["stop_reason"] == "completed"


def test_cli_writes_into_the_experiment_by_default(tmp_path, capsys):
    fake_trial(tmp_path, 1, "ffff0006", {"lr": 1e-3}, [0.5], done=True)
    fake_trial(tmp_path, 2, "ffff0007", {"lr": 1e-2}, [0.6], done=True)
    assert cli([str(tmp_path)]) == 0
    assert (tmp_path / "report" / "importance.png").is_file()
    assert capsys.readouterr().out.count("report: wrote") == len(PNGS) + 2


def test_cli_on_a_folder_without_trials_exits_2_with_one_message(tmp_path, capsys):
    assert cli([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no Tune trial folders" in err
