"""Configuration: frozen dataclasses, built and validated once at the edge.

An experiment file (TOML, see experiments/) fixes some hyperparameters, searches others,
and sets the budget. Every unknown key or out-of-range value is an error naming the key.
"""

from __future__ import annotations

import tomllib
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

OBJECTIVE = "val_det_iou"
BOX_LOSSES = ("smooth_l1", "giou")
# What `ShiftAveraged` looks at: the canvas as it is and moved one pixel right, left, down and up,
# as (dx, dy). Each move shows the trunk's stride-2 pools another alignment of the digit.
SHIFTS = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))
# How the model places a box (raylocal.model): the expected position of a learned heatmap, or a
# regression from the flattened trunk (what every search before the first ran with).
BOX_HEADS = ("softargmax", "flatten")
# Fields added after searches, checkpoints and model cards were first written, with the value
# those ran with: a saved configuration without the field is read with it (`from_saved`).
BEFORE_THE_FIELD = {"box_head": "flatten", "keep_start_point": False, "augment": False}


class ConfigError(ValueError):
    """A bad value or key in the command line or an experiment file."""


def from_saved(cls: type, values: dict[str, Any]):
    """Dataclass `cls` from a table written by an earlier run (a checkpoint, a model card, a
    search's description), which may predate some fields (`BEFORE_THE_FIELD`)."""
    names = {f.name for f in fields(cls)}
    return cls(**{key: value for key, value in BEFORE_THE_FIELD.items() if key in names} | values)


def coerce(where: str, value: Any, kind: type) -> Any:
    """`value` as `kind`, accepting what TOML and Tune hand back (ints for floats, numpy
    scalars) but never silently truncating 2.5 to 2 or reading "5" as a number."""
    if kind is bool or isinstance(value, bool) or isinstance(value, str) != (kind is str):
        if type(value) is kind:
            return value
        raise ConfigError(f"{where}={value!r} must be of type {kind.__name__}")
    try:
        cast = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}={value!r} must be of type {kind.__name__}") from None
    if kind is int and cast != value:
        raise ConfigError(f"{where}={value!r} must be a whole number")
    return cast


def field_type(cls: type, name: str) -> type:
    """The type a field is annotated with; `X | None` gives X."""
    hint = typing.get_type_hints(cls)[name]
    kinds = [kind for kind in typing.get_args(hint) if kind is not type(None)] or [hint]
    return kinds[0]


def checked(cls: type, where: str, values: dict[str, Any]):
    """Build dataclass `cls` from a table, naming `where.key` for unknown keys and wrong types."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {[f'{where}.{u}' for u in unknown]}; allowed: {sorted(known)}")
    return cls(**{name: coerce(f"{where}.{name}", value, field_type(cls, name)) for name, value in values.items()})


@dataclass(frozen=True)
class ModelConfig:
    depth: int = 4
    width: int = 16
    head_width: int = 128
    dropout: float = 0.1
    box_head: str = "softargmax"

    def __post_init__(self) -> None:
        # 75 px halves to 2 px after five pools; a sixth would leave nothing to pool.
        if not 1 <= self.depth <= 5:
            raise ConfigError(f"depth must be in [1, 5], got {self.depth}")
        if not 1 <= self.width <= 256:
            raise ConfigError(f"width must be in [1, 256], got {self.width}")
        if not 4 <= self.head_width <= 4096:
            raise ConfigError(f"head_width must be in [4, 4096], got {self.head_width}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.box_head not in BOX_HEADS:
            raise ConfigError(f"box_head must be one of {BOX_HEADS}, got {self.box_head!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_saved(cls, values: dict[str, Any]):
        return from_saved(cls, values)


@dataclass(frozen=True)
class Hyperparameters(ModelConfig):
    """Everything one trial needs to build and train its model: the model's own fields (one
    definition, in ModelConfig) and the training ones. Flat, as Tune's configs, the experiment
    files' [fixed] tables and the model card spell them."""

    # lr and box-loss weight: a search's best trial, ahead of the hand-picked 3e-3 and 0.1 at equal
    # epochs (docs/decisions.md#defaults-lr-and-box-loss-weight).
    lr: float = 8e-3
    weight_decay: float = 1e-4
    batch_size: int = 128
    box_loss_weight: float = 0.25
    box_loss: str = "smooth_l1"

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = {
            "lr": 0 < self.lr <= 1,
            "weight_decay": 0 <= self.weight_decay < 1,
            "batch_size": 1 <= self.batch_size <= 8192,
            "box_loss_weight": 0 <= self.box_loss_weight <= 1e4,
            "box_loss": self.box_loss in BOX_LOSSES,
        }
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(f"hyperparameter {key}={getattr(self, key)!r} is out of range")

    def model_config(self) -> ModelConfig:
        return ModelConfig(**{field.name: getattr(self, field.name) for field in fields(ModelConfig)})

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "hyperparameter") -> Hyperparameters:
        return checked(cls, where, values)


@dataclass(frozen=True)
class Dimension:
    """One searched hyperparameter: kind is int, uniform, loguniform or choice."""

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    values: tuple = ()

    def __post_init__(self) -> None:
        where = f"space.{self.name}"
        if self.kind not in ("int", "uniform", "loguniform", "choice"):
            raise ConfigError(f"{where}.type must be int, uniform, loguniform or choice, got {self.kind!r}")
        if self.kind == "choice":
            if not self.values:
                raise ConfigError(f"{where}.values must be a non-empty list")
            candidates = self.values
        else:
            for bound in (self.low, self.high):
                if isinstance(bound, bool) or not isinstance(bound, int | float):
                    raise ConfigError(f"{where} needs numeric low and high, got low={self.low!r} high={self.high!r}")
            if not self.low < self.high:
                raise ConfigError(f"{where} needs low < high, got low={self.low} high={self.high}")
            if self.kind == "loguniform" and self.low <= 0:
                raise ConfigError(f"{where}.low must be > 0 for a log scale, got {self.low}")
            candidates = (self.low, self.high)
        for value in candidates:
            try:
                Hyperparameters.from_dict({self.name: value})
            except ConfigError as error:
                raise ConfigError(f"{where}: {error}") from None


def optuna_space(space: tuple[Dimension, ...]) -> dict[str, Any]:
    """The one translation of a search space: Optuna distributions, for `OptunaSearch(space=...)`,
    the plain-Optuna benchmark (`study.ask`) and the report's importance analysis."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    def distribution(dim: Dimension):
        if dim.kind == "int":
            return IntDistribution(int(dim.low), int(dim.high))
        if dim.kind in ("uniform", "loguniform"):
            return FloatDistribution(float(dim.low), float(dim.high), log=dim.kind == "loguniform")
        return CategoricalDistribution(list(dim.values))

    return {dim.name: distribution(dim) for dim in space}


# The default search; experiments/default.toml spells out the same (a test keeps them equal).
DEFAULT_SPACE = (
    Dimension("depth", "int", 3, 5),
    Dimension("width", "choice", values=(8, 16)),
    Dimension("lr", "loguniform", 5e-4, 1e-2),
    Dimension("box_loss_weight", "loguniform", 0.01, 1.0),
)


@dataclass(frozen=True)
class Budget:
    """Trials and epochs, and when trials report. ASHA counts in epochs. A trial reports (and
    scores the validation split) `first_epoch_reports` times in its first epoch, where early
    stopping does most of its cutting, and `reports_per_epoch` times in each later epoch.
    `filled_rungs`: with a final phase, ASHA promotes a trial only as the top 1/rf of at least rf
    trials at its rung (`raylocal.stopping`); off by default, its final models were worse
    (docs/decisions.md#filled-rungs-off).
    `keep_start_point`: ASHA never stops the start point, and the final phase compares the other
    trials with it at equal epochs (`raylocal.stopping`, `raylocal.final.candidates`)."""

    trials: int = 50
    max_epochs: int = 5
    first_epoch_reports: int = 8
    reports_per_epoch: int = 2
    grace_period: float = 0.125
    reduction_factor: int = 4
    filled_rungs: bool = False
    keep_start_point: bool = True

    def __post_init__(self) -> None:
        for key in ("trials", "max_epochs", "first_epoch_reports", "reports_per_epoch"):
            if getattr(self, key) < 1:
                raise ConfigError(f"budget.{key} must be >= 1, got {getattr(self, key)}")
        if self.reduction_factor < 2:
            raise ConfigError(f"budget.reduction_factor must be >= 2, got {self.reduction_factor}")
        if not 0 < self.grace_period <= self.max_epochs:
            raise ConfigError(
                f"budget.grace_period must be more than 0 and at most max_epochs ({self.max_epochs}) epochs, "
                f"got {self.grace_period}"
            )


@dataclass(frozen=True)
class DataSettings:
    tight_boxes: bool = False
    # Training digits turned and scaled a little before they are pasted (`synthesis.distort`).
    augment: bool = False
    # Digits used from MNIST (None = all); the smoke test and quick runs take a prefix.
    train_digits: int | None = None
    test_digits: int | None = None
    shard_size: int = 5000

    def __post_init__(self) -> None:
        for key in ("train_digits", "test_digits"):
            value = getattr(self, key)
            if value is not None and value < 24:
                raise ConfigError(f"data.{key} must be >= 24, got {value}")
        if self.shard_size < 1:
            raise ConfigError(f"data.shard_size must be >= 1, got {self.shard_size}")


@dataclass(frozen=True)
class Experiment:
    name: str = "default"
    fixed: Hyperparameters = field(default_factory=Hyperparameters)
    space: tuple[Dimension, ...] = DEFAULT_SPACE
    budget: Budget = field(default_factory=Budget)
    data: DataSettings = field(default_factory=DataSettings)

    def with_budget(self, **changes: Any) -> Experiment:
        try:
            return replace(self, budget=replace(self.budget, **{k: v for k, v in changes.items() if v is not None}))
        except ConfigError as error:
            # Named as the flags that set them: budget.max_epochs is --max-epochs.
            message = str(error)
            for key in changes:
                message = message.replace(f"budget.{key}", f"--{key.replace('_', '-')}")
            raise ConfigError(message) from None

    def with_data(self, **changes: Any) -> Experiment:
        return replace(self, data=replace(self.data, **changes))

    @classmethod
    def from_description(cls, described: dict[str, Any]) -> Experiment:
        """Inverse of `describe` (which is what a search keeps beside its results)."""
        return cls(
            name=described["name"],
            fixed=Hyperparameters.from_saved(described["fixed"]),
            space=tuple(Dimension(**d | {"values": tuple(d["values"])}) for d in described["space"]),
            budget=from_saved(Budget, described["budget"]),
            data=from_saved(DataSettings, described["data"]),
        )

    def kept_start_point(self) -> dict[str, Any] | None:
        """The start point where the budget keeps it (`keep_start_point`): the configuration ASHA
        never stops and the final phase compares the other trials with; else None."""
        return (self.start_point() or None) if self.budget.keep_start_point else None

    def start_point(self) -> dict[str, Any]:
        """The configuration the search tries first: the one a user would train without a search
        (the defaults, or the experiment's), each moved into its searched range (a choice that
        lacks it takes its first value). A search then starts from a known good point, and its
        winner is at least that point at the search's fidelity."""
        point = {}
        for dim in self.space:
            value = getattr(self.fixed, dim.name)
            if dim.kind == "choice":
                point[dim.name] = value if value in dim.values else dim.values[0]
            else:
                point[dim.name] = type(value)(min(max(value, dim.low), dim.high))
        return point

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "fixed": asdict(self.fixed),
            "space": [asdict(d) for d in self.space],
            "budget": asdict(self.budget),
            "data": asdict(self.data),
        }


def _table(raw: dict, key: str) -> dict:
    table = raw.get(key, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{key} must be a table ([{key}])")
    return table


def _dimension(name: str, spec: Any) -> Dimension:
    if not isinstance(spec, dict):
        raise ConfigError(f'space.{name} must be a table like {{type = "loguniform", low = 1e-4, high = 1e-2}}')
    extra = sorted(set(spec) - {"type", "low", "high", "values"})
    if extra:
        raise ConfigError(f"unknown key(s) {[f'space.{name}.{e}' for e in extra]}; allowed: high, low, type, values")
    values = spec.get("values", ())
    if not isinstance(values, list | tuple):
        raise ConfigError(f"space.{name}.values must be a list")
    return Dimension(name, spec.get("type", ""), spec.get("low"), spec.get("high"), tuple(values))


def parse_experiment(raw: dict, name: str) -> Experiment:
    top = {"fixed", "space", "budget", "data", "description"}
    unknown = sorted(set(raw) - top)
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {unknown}; allowed: {sorted(top)}")
    fixed_table = _table(raw, "fixed")
    fixed = Hyperparameters.from_dict(fixed_table, where="fixed")
    if "space" in raw:
        hyper_names = {f.name for f in fields(Hyperparameters)}
        unknown = sorted(set(_table(raw, "space")) - hyper_names)
        if unknown:
            raise ConfigError(f"unknown key(s) {[f'space.{u}' for u in unknown]}; allowed: {sorted(hyper_names)}")
        space = tuple(_dimension(dim_name, spec) for dim_name, spec in raw["space"].items())
        overlap = sorted({d.name for d in space} & set(fixed_table))
        if overlap:
            raise ConfigError(f"{overlap} appear in both [fixed] and [space]")
    else:
        # No [space] table: the default search, less what the file fixes.
        space = tuple(d for d in DEFAULT_SPACE if d.name not in fixed_table)
    budget = checked(Budget, "budget", _table(raw, "budget"))
    data = checked(DataSettings, "data", _table(raw, "data"))
    return Experiment(name=name, fixed=fixed, space=space, budget=budget, data=data)


def load_experiment(path: str | Path) -> Experiment:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"experiment file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"experiment file {path} cannot be read: {error}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"experiment file {path} is not valid TOML: {error}") from None
    try:
        return parse_experiment(raw, path.stem)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
