"""Every experiment file in experiments/ loads, and default.toml is what the code runs by default."""

from __future__ import annotations

from pathlib import Path

import pytest

from raylocal.config import Experiment, load_experiment

EXPERIMENTS = Path(__file__).parents[1] / "experiments"


def test_default_toml_equals_the_built_in_default():
    loaded = load_experiment(EXPERIMENTS / "default.toml")
    assert loaded == Experiment()


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.toml")), ids=lambda p: p.name)
def test_every_experiment_file_is_valid(path):
    experiment = load_experiment(path)
    assert experiment.budget.trials >= 1
