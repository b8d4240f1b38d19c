"""Every experiment file in experiments/ loads, and default.toml is what the code runs by default."""

from __future__ import annotations

from pathlib import Path

import pytest

from raylocal.config import Experiment, load_experiment
from raylocal.synthesis import split_plan

EXPERIMENTS = Path(__file__).parents[1] / "experiments"
MNIST_TRAIN, MNIST_TEST = 60_000, 10_000


def test_default_toml_equals_the_built_in_default():
    loaded = load_experiment(EXPERIMENTS / "default.toml")
    assert loaded == Experiment()


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.toml")), ids=lambda p: p.name)
def test_every_experiment_file_can_run_on_its_data(path):
    """What the loader cannot know: whether the budget fits the data it trains on. Every report
    needs whole batches, and ASHA's first rung should fall on a report, not between two."""
    experiment = load_experiment(path)
    budget, data = experiment.budget, experiment.data
    train_rows = len(split_plan(data.train_digits or MNIST_TRAIN, data.test_digits or MNIST_TEST).train)
    batch_sizes = [experiment.fixed.batch_size] + [
        value for dim in experiment.space if dim.name == "batch_size" for value in (dim.values or (dim.high,))
    ]
    for batch_size in batch_sizes:
        assert train_rows // batch_size >= max(budget.first_epoch_reports, budget.reports_per_epoch), batch_size
    reports_per_epoch = budget.first_epoch_reports if budget.grace_period < 1 else budget.reports_per_epoch
    assert (budget.grace_period * reports_per_epoch).is_integer(), (budget.grace_period, reports_per_epoch)
