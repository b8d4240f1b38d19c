"""The real pipeline at toy size: Ray Data synthesis, Tune + Optuna search, Ray Train DDP, export."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from raylocal.config import DataSettings
from raylocal.export import EXPORT_FILES, load_program, onnx_session
from raylocal.final import FINAL_LR_SCALE
from raylocal.mnist import load_mnist
from raylocal.synthesis import split_plan, synthesize_shard
from raylocal.tune import get_args_parser, main


def search_args(tmp_path, tiny_mnist_dir, *extra: str):
    return get_args_parser().parse_args(
        [
            "--smoke-test", "--data-dir", str(tiny_mnist_dir), "--unverified-data", "--verbose", "0",
            "--storage", str(tmp_path / "results"), "--name", "toy", "--export-dir", str(tmp_path / "export"),
            *extra,
        ]
    )


def test_search_data_matches_pure_synthesis_and_replaces_every_epoch(ray_session, tiny_mnist_dir):
    from raylocal.data import build_search_data

    mnist = load_mnist(tiny_mnist_dir, verify=False, log=lambda _: None)
    # Augmented: the pure shard below matches only if the setting reaches Ray Data's tasks.
    settings = DataSettings(shard_size=100, augment=True)
    data = build_search_data(mnist, settings, epochs=2, seed=3, log=lambda _: None)
    plan = split_plan(len(mnist.train_images), len(mnist.test_images))
    assert (data.train_epochs[0].rows, data.val.rows, data.test.rows) == (len(plan.train), len(plan.val), len(plan.test))

    epoch1 = data.train_epochs[1].fetch()
    shard2 = synthesize_shard(
        mnist.train_images, mnist.train_labels, plan, seed=3, split="train", epoch=1, shard=2, shard_size=100,
        augment=settings.augment,
    )
    np.testing.assert_array_equal(epoch1["image"][200:300], shard2["image"])
    np.testing.assert_array_equal(epoch1["box"][200:300], shard2["box"])
    assert not np.array_equal(data.train_epochs[0].fetch()["box"], epoch1["box"])
    again = build_search_data(mnist, settings, epochs=1, seed=3, log=lambda _: None)
    np.testing.assert_array_equal(again.val.fetch()["image"], data.val.fetch()["image"])

    halves = [data.val.fetch(rank, 2) for rank in (0, 1)]
    assert len(halves[0]["label"]) == len(halves[1]["label"]) == data.val.rows // 2


def ray_session_nodes() -> list[dict]:
    import ray

    return [node for node in ray.nodes() if node["Alive"]]


def check_export(export_dir):
    assert sorted(path.name for path in export_dir.iterdir()) == sorted(EXPORT_FILES)
    canvases = torch.rand(3, 1, 75, 75)
    logits, boxes = load_program(export_dir)(canvases)
    onnx_logits, onnx_boxes = onnx_session(export_dir).run(None, {"images": canvases.numpy()})
    assert logits.shape == (3, 10) and boxes.shape == (3, 4)
    np.testing.assert_allclose(onnx_logits, logits.detach().numpy(), atol=1e-4)
    np.testing.assert_allclose(onnx_boxes, boxes.detach().numpy(), atol=1e-4)
    card = json.loads((export_dir / "model_card.json").read_text())
    for metrics in (card["validation"], card["test"]):
        assert metrics and all(0.0 <= value <= 1.0 for key, value in metrics.items() if not key.endswith("loss"))
    return card


def test_smoke_search_exports_a_loadable_model(ray_session, tmp_path, tiny_mnist_dir):
    import optuna

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = main(search_args(tmp_path, tiny_mnist_dir, "--optuna-storage", storage, "--mlflow-uri", mlflow_uri))
    card = check_export(tmp_path / "export")
    assert card["search"]["backend"] == "inline"
    assert card["search"]["trials"] == 2 and card["search"]["errored_trials"] == 0
    assert card["trial_id"] == summary["trial_id"]
    assert card["data"]["verified"] is False
    assert set(card["hyperparameters"]) >= {"depth", "width", "lr", "box_loss_weight"}
    trial_dirs = [path for path in (tmp_path / "results" / "toy").iterdir() if path.name.startswith("run_trial")]
    assert len(trial_dirs) == 2
    cluster_nodes = {node["NodeID"] for node in ray_session_nodes()}
    assert all(r["worker_nodes"] in cluster_nodes for r in trial_results(tmp_path / "results" / "toy"))
    study = optuna.load_study(study_name="toy", storage=storage)
    assert len(study.trials) == 2 and all(trial.value is not None for trial in study.trials)
    assert (tmp_path / "results" / "toy" / "report" / "report.md").is_file()
    check_tensorboard_and_mlflow(trial_dirs, mlflow_uri)
    check_final_phase(card, cluster_nodes)
    check_test_score_is_the_artefact_s(tmp_path / "export", tiny_mnist_dir, card)


def check_test_score_is_the_artefact_s(export_dir, data_dir, card: dict) -> None:
    """The card's test figures are model.pt2's: by default the network averaged over 5 shifted views."""
    from raylocal import evaluate

    assert card["test_views"] == 5
    assert json.loads((export_dir / "config.json").read_text())["test_time"]["views"] == 5
    args = evaluate.get_args_parser().parse_args([str(export_dir), "--data-dir", str(data_dir), "--unverified-data"])
    scored = evaluate.main(args, log=lambda line: None)["metrics"]
    for name in ("det_iou", "mean_iou", "accuracy"):
        assert scored[f"test_{name}"] == pytest.approx(card["test"][f"test_{name}"], abs=1e-4)


def check_final_phase(card: dict, cluster_nodes: set[str]) -> None:
    """The exported model is the final phase's: the search's winner trained on, from its best search
    checkpoint, by a TorchTrainer over every worker of the cluster (2 nodes x 1 CPU), with the
    global batch kept."""
    final = card["final"]
    assert final["trial_id"] == card["search"]["best_trial"]["trial_id"]
    assert (final["init"], final["init_epoch"]) == ("checkpoint", card["search"]["best_trial"]["epoch"])
    # From a checkpoint the learning rate peaks where the trial's schedule stood, at least at
    # FINAL_LR_SCALE of the searched rate.
    searched = card["hyperparameters"]["lr"]
    assert 0 <= final["checkpoint_lr"] <= searched
    assert final["peak_lr"] == pytest.approx(max(FINAL_LR_SCALE * searched, final["checkpoint_lr"]))
    # The final model is exported unless it scores below the search's best checkpoint on validation.
    search_score = card["search"]["best_trial"]["validation"]["val_det_iou"]
    assert final["exported"] == (final["curve"][-1]["val_det_iou"] >= search_score)
    assert card["model_from"] == ("final" if final["exported"] else "search")
    assert (final["workers"], final["dist_backend"], final["epochs_planned"]) == (2, "gloo", 1)
    assert set(final["worker_nodes"].split(",")) == cluster_nodes
    assert final["batch_size_per_worker"] * 2 == final["global_batch_size"] == card["hyperparameters"]["batch_size"]
    assert [row["epoch"] for row in final["curve"]] == [1.0]
    exported = final["curve"][-1] if final["exported"] else card["search"]["best_trial"]["validation"]
    assert card["validation"]["val_det_iou"] == exported["val_det_iou"]


def check_tensorboard_and_mlflow(trial_dirs, mlflow_uri: str) -> None:
    import mlflow
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for trial_dir in trial_dirs:
        events = EventAccumulator(str(trial_dir)).Reload()
        assert "ray/tune/val_det_iou" in events.Tags()["scalars"]
    client = mlflow.tracking.MlflowClient(tracking_uri=mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("toy").experiment_id])
    assert len(runs) == 2 and all("val_det_iou" in run.data.metrics for run in runs)


def trial_results(experiment_dir) -> list[dict]:
    from raylocal.results import all_reports, read_search

    return all_reports(read_search(experiment_dir)).to_dict("records")


# Slow tier: a second whole search. In the fast one, the smoke search's final run is DDP over gloo
# across both nodes; this one's trials are.
@pytest.mark.slow
def test_two_workers_per_trial_run_ddp_over_gloo_across_both_nodes(ray_session, tmp_path, tiny_mnist_dir):
    # One trial: its Train run across both nodes is what this checks (test_resume runs several).
    main(search_args(tmp_path, tiny_mnist_dir, "--workers-per-trial", "2", "--no-final", "--trials", "1"))
    card = check_export(tmp_path / "export")
    assert card["model_from"] == "search" and card["final"] is None
    assert card["search"]["backend"] == "ray-train" and card["search"]["workers_per_trial"] == 2
    cluster_nodes = {node["NodeID"] for node in ray_session_nodes()}
    results = trial_results(tmp_path / "results" / "toy")
    # The trial's every report came from workers on both nodes.
    assert len({r["trial_id"] for r in results}) == 1
    assert all(set(r["worker_nodes"].split(",")) == cluster_nodes for r in results)
    assert len(cluster_nodes) == 2
    train_runs = list((tmp_path / "results" / "toy-train-runs").iterdir())
    assert len(train_runs) == 1
    assert any(path.name.startswith("checkpoint_") for path in train_runs[0].iterdir())


def test_more_gpus_than_the_cluster_has_is_one_clear_error(ray_session, tmp_path, tiny_mnist_dir, capsys):
    from raylocal.tune import cli

    flags = ["--smoke-test", "--data-dir", str(tiny_mnist_dir), "--unverified-data", "--storage", str(tmp_path)]
    assert cli([*flags, "--gpus-per-worker", "1"]) == 2
    err = capsys.readouterr().err
    assert "a trial asks for 1 GPUs but the cluster has 0" in err and "Traceback" not in err


def test_a_truncated_data_file_is_one_clear_error_and_leaves_no_results(ray_session, tmp_path, tiny_mnist_dir, capsys):
    import shutil

    from raylocal.tune import cli

    broken = tmp_path / "broken"
    shutil.copytree(tiny_mnist_dir, broken)
    labels = broken / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:40])
    assert cli(["--smoke-test", "--data-dir", str(broken), "--storage", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err
    assert "train-labels-idx1-ubyte" in err and "Traceback" not in err
    assert not (tmp_path / "results").exists()


def test_python_entry_point_runs_the_same_search_and_returns_its_result(ray_session, tmp_path, tiny_mnist_dir):
    from dataclasses import fields

    import raylocal
    from raylocal.config import Hyperparameters

    result = raylocal.search(smoke_test=True, data_dir=tiny_mnist_dir, unverified_data=True, verbose=0, quiet=True,
                             storage=tmp_path / "results", name="py", no_final=True)
    assert result.export_dir == tmp_path / "results" / "py" / "best_model"
    check_export(result.export_dir)
    assert result.experiment_dir == str(tmp_path / "results" / "py")
    assert set(result.best_config) == {field.name for field in fields(Hyperparameters)}
    assert 0 <= result.test["test_accuracy"] <= 1 and 0 <= result.validation["val_det_iou"] <= 1
    card = json.loads((result.export_dir / "model_card.json").read_text())
    assert card["trial_id"] == result.summary["trial_id"] and card["test"] == result.test
    # One row per trial, with its searched values and how it ended.
    assert len(result.trials) == 2 and {"trial_id", "lr", "stop_reason", "best_val_det_iou"} <= set(result.trials)
    assert result.summary["trial_id"] in set(result.trials["trial_id"])


@pytest.mark.slow  # a minute: the budget is 1.6 minutes
def test_a_time_budget_stops_the_search_and_skips_a_final_phase_that_cannot_fit(ray_session, tmp_path, tiny_mnist_dir,
                                                                               capsys):
    # Timing: a time budget is wall time and cannot be waited on as a state; 1.6 min is the least one view allows.
    # 1.6 minutes leave too little for a final run: the search takes all but the 40 s for scoring
    # one view and export, too little for 200 trials of the smoke data, and its best checkpoint is
    # exported. (With 5 views the 123 s kept would leave nothing to train: a ConfigError.)
    summary = main(search_args(tmp_path, tiny_mnist_dir, "--time-budget", "1.6", "--trials", "200", "--views", "1"))
    output = capsys.readouterr().out
    assert "time budget: 1.6 min for the whole command" in output and "(no room for a final phase)" in output
    assert "final: no time left for one epoch" in output
    card = check_export(tmp_path / "export")
    assert card["model_from"] == "search" and card["final"] is None
    assert 1 <= summary["search"]["trials"] < 200
    # Said before the search, and in the final table.
    assert "budget: at most about " in output and " of 200 trials fit in the search's " in output
    assert re.search(rf"^trials +{summary['search']['trials']} of 200 ran \(time budget\)$", output, re.M)


def test_a_latency_bound_none_meets_exports_nothing_in_one_line(ray_session, tmp_path, tiny_mnist_dir, capsys):
    from raylocal.tune import cli

    argv = ["--smoke-test", "--data-dir", str(tiny_mnist_dir), "--unverified-data", "--verbose", "0", "--quiet",
            "--storage", str(tmp_path / "results"), "--name", "toy", "--export-dir", str(tmp_path / "export"),
            "--no-final", "--max-latency-ms", "1e-6"]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--max-latency-ms 1e-06: no model is that fast" in err, err
    assert not (tmp_path / "export").exists()
