"""The training loop without Ray: reports, checkpoints, exact resume, and that it learns."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import tiny_digits

from raylocal.config import Hyperparameters
from raylocal.engine import fit
from raylocal.synthesis import split_plan, synthesize_shard

PARAMS = Hyperparameters(depth=3, width=4, head_width=16, lr=5e-3, batch_size=32, box_loss_weight=0.1)


@pytest.fixture(scope="module")
def splits():
    images, labels = tiny_digits(np.random.default_rng(0), 600)
    plan = split_plan(len(images), 0)

    def make(split: str, epoch: int):
        return synthesize_shard(images, labels, plan, seed=0, split=split, epoch=epoch, shard=0, shard_size=600)

    return make


def run(splits, max_epochs=2, first_epoch_reports=2, reports_per_epoch=2, resume=None):
    reports = []
    torch.set_num_threads(1)
    fit(
        PARAMS,
        max_epochs=max_epochs,
        first_epoch_reports=first_epoch_reports,
        reports_per_epoch=reports_per_epoch,
        train_data=lambda epoch: splits("train", epoch),
        val_data=splits("val", 0),
        train_rows=len(splits("train", 0)["label"]),
        # Deep copies: a state holds the live tensors, which go on training after the report.
        report=lambda metrics, state: reports.append((metrics, copy.deepcopy(state))),
        device=torch.device("cpu"),
        resume=resume,
    )
    return reports


def test_reports_every_part_of_every_epoch_with_a_checkpoint(splits):
    reports = run(splits)
    assert [metrics["epoch"] for metrics, _ in reports] == [0.5, 1.0, 1.5, 2.0]
    assert [state["report"] for _, state in reports] == [1, 2, 3, 4]
    for metrics, state in reports:
        assert 0.0 <= metrics["val_det_iou"] <= metrics["val_mean_iou"] <= 1.0
        assert set(state) >= {"model", "optimizer", "scheduler", "rng", "hyperparameters"}


def test_the_first_epoch_reports_more_often_than_later_ones(splits):
    reports = run(splits, max_epochs=3, first_epoch_reports=4, reports_per_epoch=1)
    assert [metrics["epoch"] for metrics, _ in reports] == [0.25, 0.5, 0.75, 1.0, 2.0, 3.0]
    # Together the parts of an epoch take every full batch once: the schedule runs to its end.
    steps_per_epoch = len(splits("train", 0)["label"]) // PARAMS.batch_size
    assert reports[-1][1]["scheduler"]["last_epoch"] == 3 * steps_per_epoch


def test_resuming_from_a_checkpoint_continues_exactly(splits):
    straight = run(splits)
    resumed = run(splits, resume=straight[1][1])
    assert [m["epoch"] for m, _ in resumed] == [1.5, 2.0]
    for (expected, _), (got, _) in zip(straight[2:], resumed):
        assert got["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-6)
        assert got["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-6)


def test_training_improves_the_validation_objective(splits):
    reports = run(splits, max_epochs=4, first_epoch_reports=1, reports_per_epoch=1)
    first, last = reports[0][0], reports[-1][0]
    assert last["val_loss"] < first["val_loss"]
    assert last["val_mean_iou"] > first["val_mean_iou"]


def test_too_few_rows_for_one_batch_per_report_is_a_clear_error(splits):
    with pytest.raises(ValueError, match="less than one batch"):
        run(splits, first_epoch_reports=100)


@pytest.mark.parametrize("steps_per_epoch, epochs", [(3, 1), (4, 1), (10, 2), (20, 1), (53, 40)])
def test_the_schedule_runs_to_its_end_for_any_budget(steps_per_epoch, epochs):
    from raylocal.engine import make_optimizer
    from raylocal.model import build_model

    model = build_model(PARAMS.model_config())
    optimizer, scheduler = make_optimizer(model, PARAMS, steps_per_epoch, epochs)
    lrs = []
    for _ in range(steps_per_epoch * epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert max(lrs) == pytest.approx(PARAMS.lr, rel=0.2) and lrs[-1] < PARAMS.lr / 100


def test_a_budget_of_fewer_than_three_steps_is_a_clear_error():
    from raylocal.engine import make_optimizer
    from raylocal.model import build_model

    with pytest.raises(ValueError, match="at least 3"):
        make_optimizer(build_model(PARAMS.model_config()), PARAMS, 2, 1)
