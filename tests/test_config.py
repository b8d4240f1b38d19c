from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from raylocal.config import (
    DEFAULT_SPACE,
    Budget,
    ConfigError,
    DataSettings,
    Dimension,
    Experiment,
    Hyperparameters,
    ModelConfig,
    load_experiment,
    parse_experiment,
)


def test_from_dict_casts_numpy_ints_and_int_floats():
    hyper = Hyperparameters.from_dict({"depth": np.int64(3), "batch_size": np.int32(64), "lr": 1, "dropout": 0})
    assert (hyper.depth, hyper.batch_size, hyper.lr, hyper.dropout) == (3, 64, 1.0, 0.0)
    assert type(hyper.depth) is int and type(hyper.batch_size) is int
    assert type(hyper.lr) is float and type(hyper.dropout) is float


def test_from_dict_keeps_defaults_for_missing_keys():
    assert Hyperparameters.from_dict({}) == Hyperparameters()
    assert Hyperparameters.from_dict({"width": 8}) == Hyperparameters(width=8)


def test_from_dict_rejects_unknown_keys_by_name():
    with pytest.raises(ConfigError, match="learning_rate"):
        Hyperparameters.from_dict({"lr": 0.1, "learning_rate": 0.1})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("lr", 0),
        ("lr", 1.5),
        ("batch_size", 0),
        ("box_loss", "l2"),
        ("weight_decay", 1),
        ("box_loss_weight", -1),
        ("depth", 6),
        ("dropout", 1),
    ],
)
def test_from_dict_rejects_out_of_range_values_by_name(key, value):
    with pytest.raises(ConfigError, match=key):
        Hyperparameters.from_dict({key: value})


def test_from_dict_rejects_uncastable_values_by_name():
    with pytest.raises(ConfigError, match="lr='fast' must be of type float"):
        Hyperparameters.from_dict({"lr": "fast"})


def test_from_dict_rejects_fractional_ints():
    with pytest.raises(ConfigError, match="depth"):
        Hyperparameters.from_dict({"depth": 2.5})


def test_hyperparameters_build_the_matching_model_config():
    hyper = Hyperparameters(depth=2, width=8, head_width=32, dropout=0.2)
    assert hyper.model_config() == ModelConfig(depth=2, width=8, head_width=32, dropout=0.2)


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        (("lr", "uniform", 0.1, 0.1), {}),
        (("lr", "loguniform", 0.01, 0.001), {}),
        (("lr", "uniform"), {}),
        (("lr", "loguniform", 0.0, 0.1), {}),
        (("box_loss_weight", "loguniform", -1.0, 1.0), {}),
        (("lr", "gauss", 0.0, 0.1), {}),
        (("width", "choice"), {"values": ()}),
        (("width", "choice"), {"values": (8, 0)}),
        (("box_loss", "choice"), {"values": ("l2",)}),
        (("depth", "int", 1, 6), {}),
        (("lr", "loguniform", 1e-4, 2.0), {}),
    ],
    ids=[
        "low-equals-high",
        "low-above-high",
        "missing-bounds",
        "log-low-zero",
        "log-low-negative",
        "unknown-type",
        "empty-choice",
        "choice-invalid-width",
        "choice-invalid-box-loss",
        "int-bound-out-of-range",
        "log-bound-out-of-range",
    ],
)
def test_invalid_dimension_names_its_space_entry(args, kwargs):
    with pytest.raises(ConfigError, match=re.escape(f"space.{args[0]}")):
        Dimension(*args, **kwargs)


@pytest.mark.parametrize(
    "args",
    [("width", "choice", None, None, (8, 0)), ("depth", "int", 1, 6), ("lr", "loguniform", 1e-4, 2.0)],
)
def test_dimension_bounds_and_choices_must_be_valid_hyperparameters(args):
    with pytest.raises(ConfigError, match=args[0]):
        Dimension(*args)


def test_valid_dimensions_construct():
    assert Dimension("depth", "int", 1, 5).high == 5
    assert Dimension("box_loss", "choice", values=("smooth_l1", "giou")).values == ("smooth_l1", "giou")
    assert {d.name for d in DEFAULT_SPACE} == {"depth", "width", "lr", "box_loss_weight"}


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ({"budgets": {}}, "budgets"),
        ({"budget": {"epochs": 3}}, "budget.epochs"),
        ({"data": {"tight": True}}, "data.tight"),
        ({"fixed": {"learning_rate": 0.1}}, "fixed.learning_rate"),
        ({"space": {"learning_rate": {"type": "uniform", "low": 0.1, "high": 0.2}}}, "space.learning_rate"),
        ({"space": {"lr": {"type": "uniform", "low": 0.1, "high": 0.2, "scale": "log"}}}, "space.lr.scale"),
        ({"space": {"lr": 0.1}}, "space.lr"),
        ({"budget": 5}, "budget"),
    ],
    ids=["top-level", "budget", "data", "fixed", "space", "space-entry", "space-not-table", "budget-not-table"],
)
def test_parse_experiment_rejects_unknown_or_malformed_keys_by_name(raw, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        parse_experiment(raw, "x")


def test_parse_experiment_rejects_a_name_both_fixed_and_searched():
    raw = {"fixed": {"lr": 0.01, "depth": 3}, "space": {"lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}}
    with pytest.raises(ConfigError, match=r"\['lr'\].*both"):
        parse_experiment(raw, "x")


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"trials": 0}, "budget.trials"),
        ({"max_epochs": 0}, "budget.max_epochs"),
        ({"grace_period": 0}, "budget.grace_period"),
        ({"first_epoch_reports": 0}, "budget.first_epoch_reports"),
        ({"reports_per_epoch": 0}, "budget.reports_per_epoch"),
        ({"max_epochs": 3, "grace_period": 1000}, "budget.grace_period"),
        ({"reduction_factor": 1}, "budget.reduction_factor"),
    ],
)
def test_budget_rejects_out_of_range_values_by_name(kwargs, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        Budget(**kwargs)


def test_budget_allows_grace_period_equal_to_max_epochs():
    assert Budget(max_epochs=3, grace_period=3, trials=1, reduction_factor=2).grace_period == 3


def test_budget_errors_in_an_experiment_file_name_the_key():
    with pytest.raises(ConfigError, match="budget.trials"):
        parse_experiment({"budget": {"trials": 0}}, "x")


def test_budget_with_a_string_value_raises_config_error():
    with pytest.raises(ConfigError, match="budget.trials"):
        parse_experiment({"budget": {"trials": "5"}}, "x")


def test_with_budget_reports_errors_as_command_line_flags():
    experiment = Experiment(budget=Budget(max_epochs=4, grace_period=1))
    assert experiment.with_budget(max_epochs=None, trials=3).budget.trials == 3
    with pytest.raises(ConfigError, match="--grace-period"):
        experiment.with_budget(grace_period=1000)


@pytest.mark.parametrize(
    ("kwargs", "named"), [({"train_digits": 23}, "data.train_digits"), ({"shard_size": 0}, "data.shard_size")]
)
def test_data_settings_reject_out_of_range_values_by_name(kwargs, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        DataSettings(**kwargs)


def test_load_experiment_missing_file_names_the_path(tmp_path: Path):
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_experiment(path)


def test_load_experiment_invalid_toml_names_the_path(tmp_path: Path):
    path = tmp_path / "broken.toml"
    path.write_text("[budget\ntrials = 3\n")
    with pytest.raises(ConfigError, match=re.escape(str(path)) + ".*not valid TOML"):
        load_experiment(path)


def test_load_experiment_prefixes_content_errors_with_the_path(tmp_path: Path):
    path = tmp_path / "typo.toml"
    path.write_text("[budget]\nepochs = 3\n")
    with pytest.raises(ConfigError, match=re.escape(str(path)) + ".*budget.epochs"):
        load_experiment(path)


EXPERIMENT_TOML = """
description = "round trip"

[fixed]
head_width = 64
box_loss = "giou"
box_loss_weight = 2
batch_size = 32

[space]
depth = {type = "int", low = 2, high = 5}
width = {type = "choice", values = [8, 16]}
lr = {type = "loguniform", low = 1e-4, high = 1e-2}
dropout = {type = "uniform", low = 0.0, high = 0.5}

[budget]
trials = 12
max_epochs = 9
first_epoch_reports = 4
grace_period = 0.25
reduction_factor = 2

[data]
tight_boxes = true
train_digits = 1200
shard_size = 300
"""


def test_load_experiment_round_trip(tmp_path: Path):
    path = tmp_path / "small_search.toml"
    path.write_text(EXPERIMENT_TOML)
    experiment = load_experiment(path)
    assert experiment.name == "small_search"
    assert experiment.fixed == Hyperparameters(head_width=64, box_loss="giou", box_loss_weight=2.0, batch_size=32)
    assert type(experiment.fixed.box_loss_weight) is float
    assert experiment.space == (
        Dimension("depth", "int", 2, 5),
        Dimension("width", "choice", values=(8, 16)),
        Dimension("lr", "loguniform", 1e-4, 1e-2),
        Dimension("dropout", "uniform", 0.0, 0.5),
    )
    budget = experiment.budget
    assert (budget.trials, budget.max_epochs, budget.first_epoch_reports, budget.grace_period, budget.reduction_factor) == (
        12, 9, 4, 0.25, 2
    )
    assert experiment.data == DataSettings(tight_boxes=True, train_digits=1200, test_digits=None, shard_size=300)
    assert experiment.describe()["fixed"]["box_loss"] == "giou"


def test_a_file_without_space_searches_the_default_space_less_what_it_fixes():
    experiment = parse_experiment({"fixed": {"depth": 3}}, "x")
    assert experiment.fixed.depth == 3
    assert [d.name for d in experiment.space] == [d.name for d in DEFAULT_SPACE if d.name != "depth"]


def test_an_empty_space_table_means_no_search():
    assert parse_experiment({"space": {}}, "x").space == ()


def test_one_translation_of_the_space_into_optuna_distributions():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from raylocal.config import optuna_space

    space = optuna_space((
        Dimension("depth", "int", 3, 5), Dimension("lr", "loguniform", 5e-4, 1e-2),
        Dimension("dropout", "uniform", 0.0, 0.5), Dimension("width", "choice", values=(8, 16)),
    ))
    assert space["depth"] == IntDistribution(3, 5)
    assert space["lr"] == FloatDistribution(5e-4, 1e-2, log=True)
    assert space["dropout"] == FloatDistribution(0.0, 0.5)
    assert space["width"] == CategoricalDistribution([8, 16])


def test_budget_errors_name_the_flag_and_keep_other_underscores():
    with pytest.raises(ConfigError) as error:
        Experiment().with_budget(trials=3, grace_period=9.0)
    assert str(error.value).startswith("--grace-period must be more than 0 and at most max_epochs (5)")


def test_types_come_from_the_annotations_also_for_optional_fields():
    from raylocal.config import DataSettings, checked

    assert checked(DataSettings, "data", {"train_digits": 100}).train_digits == 100
    for bad in (2.5, "100", True):
        with pytest.raises(ConfigError, match="data.train_digits"):
            checked(DataSettings, "data", {"train_digits": bad})


def test_the_start_point_is_the_unsearched_default_moved_into_each_range():
    assert Experiment().start_point() == {"depth": 4, "width": 16, "lr": 8e-3, "box_loss_weight": 0.25}
    experiment = parse_experiment({
        "fixed": {"depth": 2},
        "space": {"lr": {"type": "loguniform", "low": 1e-2, "high": 1e-1},  # default 8e-3 lies below
                  "width": {"type": "choice", "values": [4, 8]},  # default 16 is not a choice
                  "dropout": {"type": "uniform", "low": 0.0, "high": 0.05},  # default 0.1 lies above
                  "batch_size": {"type": "int", "low": 32, "high": 256}},
    }, "x")
    point = experiment.start_point()
    assert point == {"lr": 1e-2, "width": 4, "dropout": 0.05, "batch_size": 128}
    assert type(point["batch_size"]) is int
    Hyperparameters.from_dict(point)  # a valid configuration


def test_a_search_described_before_box_head_resumes_with_the_flatten_head():
    described = Experiment().describe()
    del described["fixed"]["box_head"]
    assert Experiment.from_description(described).fixed == Hyperparameters(box_head="flatten")
    assert Experiment.from_description(Experiment().describe()) == Experiment()


def test_a_search_described_before_augment_resumes_without_it():
    described = Experiment().describe()
    del described["data"]["augment"]
    assert Experiment.from_description(described).data == replace(Experiment().data, augment=False)
    augmented = Experiment().with_data(augment=True)
    assert Experiment.from_description(augmented.describe()).data.augment is True


def test_a_box_head_can_be_fixed_or_searched_by_name():
    experiment = parse_experiment({"space": {"box_head": {"type": "choice", "values": ["softargmax", "flatten"]}}}, "x")
    assert experiment.start_point() == {"box_head": "softargmax"}
    with pytest.raises(ConfigError, match="box_head"):
        parse_experiment({"fixed": {"box_head": "pooled"}}, "x")
