"""Search report: `python -m raylocal.report EXPERIMENT_DIR`; tune.py calls write_report after each search.

Reads a search folder as Tune left it, finished, killed or still running, through the one
reader of search folders (`raylocal.results`, on Tune's own ExperimentAnalysis; no running
cluster needed), and writes trials.csv, four plots and report.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from itertools import accumulate
from pathlib import Path
from typing import Any

import optuna
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from raylocal.cli import run
from raylocal.config import OBJECTIVE
from raylocal.results import (COMPLETED, ERROR, RUNNING, STOPPED, TIME_BUDGET, Folder, SearchFolderError,
                              longest_run, read_manifest, read_search, search_folder)
from raylocal.storage import cache_folder, open_storage

BEST = f"best_{OBJECTIVE}"
LAST_METRICS = ("det_iou", "mean_iou", "accuracy", "iou50", "iou75")
COLORS = {COMPLETED: "tab:green", STOPPED: "tab:orange", TIME_BUDGET: "tab:purple", RUNNING: "tab:blue",
          ERROR: "tab:red"}
TOP_CURVES, TOP_TABLE = 5, 10
PLOTS = {
    "best_so_far.png": f"best {OBJECTIVE} found so far against trial number (creation order); "
                       "dots: each trial's best, coloured by how the trial ended",
    "params.png": f"each trial's best {OBJECTIVE} against each searched hyperparameter",
    "importance.png": f"fANOVA importance of each hyperparameter for the trials' best {OBJECTIVE} (Optuna)",
    "learning_curves.png": f"{OBJECTIVE}, val_accuracy and val_mean_iou per epoch of the {TOP_CURVES} best trials",
    "latency.png": f"each trial's best {OBJECTIVE} against its model's latency per canvas (batch 1, one view, "
                   "this machine's CPU; timed once per architecture), the Pareto front joined",
}
# What sets a model's speed: the rest of a trial's configuration changes only its weights.
ARCHITECTURE = ("depth", "width", "head_width", "box_head")


def finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def plain(row: dict[str, Any]) -> dict[str, Any]:
    """A pandas row as Python values (numpy scalars and NaN for missing cells become floats and None)."""
    return {key: (value.item() if hasattr(value, "item") else value) for key, value in row.items()
            if not (isinstance(value, float) and math.isnan(value))}


def load_trials(experiment_dir: Folder, card: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """(trials in creation order, each with its trials.csv record and report rows; parameter names)."""
    runs = read_search(experiment_dir)
    if not runs:
        raise SearchFolderError(f"{search_folder(experiment_dir).uri} holds a Tune search without trials")
    names = list(dict.fromkeys(name for trial in runs for name in trial.params))
    budget = card.get("search", {}).get("settings", {}).get("budget", {})
    # Without the card's budget (a search that never got to export) the longest trial stands
    # for a full one: right once any trial ran its course, while a search killed before that
    # shows its longest ASHA survivors as completed.
    max_epochs = budget.get("max_epochs") or longest_run(runs)
    trials = []
    for trial in runs:
        rows = [plain(row) for row in trial.history.to_dict("records")]
        last, best = plain(trial.last), plain(trial.best)
        record = {
            "trial": trial.number, "trial_id": trial.trial_id, **{name: trial.params.get(name) for name in names},
            "epochs": last.get("epoch"), "reports": last.get("training_iteration", 0),
            "stop_reason": trial.stop_reason(max_epochs), BEST: best.get(OBJECTIVE), "best_epoch": best.get("epoch"),
            **{f"val_{name}": last.get(f"val_{name}") for name in LAST_METRICS}, "wall_s": last.get("time_total_s"),
        }
        trials.append({"rows": rows, "best_row": best, "record": record})
    return trials, names


def log_scale(values: list[Any]) -> bool:
    return bool(values) and all(finite(v) for v in values) and min(values) > 0 and max(values) / min(values) > 20


def searched_space(experiment_dir: Folder) -> dict[str, optuna.distributions.BaseDistribution]:
    """The search's own space, from its manifest; {} for a folder without one (a plain Tune
    search), whose space is then guessed from the values seen."""
    from raylocal.config import Experiment, optuna_space

    described = read_manifest(experiment_dir).get("experiment")
    return optuna_space(Experiment.from_description(described).space) if described else {}


def model_card(experiment_dir: Folder) -> dict[str, Any]:
    """The exported model's card: in `--export-dir` when the search was given one, else in best_model/
    (on object storage, the uploaded copy)."""
    folder = search_folder(experiment_dir)
    given = read_manifest(folder).get("flags", {}).get("export_dir")
    for export in [folder.child("best_model")] + ([open_storage(given)] if given else []):
        if export.is_file("model_card.json"):
            return json.loads(export.read_text("model_card.json"))
    return {}


def scatter_by_reason(axes, points: list[tuple[Any, float, str]]) -> None:
    for reason, color in COLORS.items():
        chosen = [(x, y) for x, y, why in points if why == reason]
        if chosen:
            axes.scatter(*zip(*chosen), color=color, label=reason, alpha=0.8, zorder=3)
    axes.grid(alpha=0.3)


def plot_best_so_far(records: list[dict[str, Any]]) -> Figure:
    scored = [r for r in records if finite(r[BEST])]
    figure = Figure(figsize=(9, 4.5), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    axes.step([r["trial"] for r in scored], list(accumulate((r[BEST] for r in scored), max)), where="post",
              color="black", label="best so far")
    scatter_by_reason(axes, [(r["trial"], r[BEST], r["stop_reason"]) for r in scored])
    axes.set_xlim(0.5, len(records) + 0.5)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set(xlabel="trial (creation order)", ylabel=OBJECTIVE,
             title=f"Best {OBJECTIVE} so far ({len(scored)} of {len(records)} trials reported)")
    # Outside the axes: inside, it hides the dots of whatever corner it picks.
    figure.legend(*axes.get_legend_handles_labels(), loc="outside right upper")
    return figure


def plot_params(records: list[dict[str, Any]], names: list[str], space: dict[str, Any]) -> Figure:
    columns = math.ceil(math.sqrt(len(names)))
    rows = math.ceil(len(names) / columns)
    figure = Figure(figsize=(4.5 * columns, 3.6 * rows), dpi=100, layout="constrained")
    figure.suptitle(f"Each trial's best {OBJECTIVE} against its hyperparameters")
    for place, name in enumerate(names, 1):
        axes = figure.add_subplot(rows, columns, place)
        points = [r for r in records if finite(r[BEST]) and r[name] is not None]
        values = [r[name] for r in points]
        if any(isinstance(v, str | bool) for v in values):
            categories = sorted({str(v) for v in values})
            values = [categories.index(str(v)) for v in values]
            axes.set_xticks(range(len(categories)), categories)
        elif getattr(space.get(name), "log", None) or (name not in space and log_scale(values)):
            axes.set_xscale("log")
        elif all(isinstance(v, int) for v in values):
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        scatter_by_reason(axes, [(v, r[BEST], r["stop_reason"]) for v, r in zip(values, points)])
        axes.set(xlabel=name, ylabel=f"best {OBJECTIVE}")
    figure.legend(*figure.axes[0].get_legend_handles_labels(), loc="outside right upper")
    return figure


def distribution(values: list[Any]) -> optuna.distributions.BaseDistribution:
    """Optuna's view of a hyperparameter from the values seen: words and flags are categories,
    whole numbers integers, the rest floats; a log scale where the values span more than 20x."""
    if any(isinstance(v, str | bool) for v in values):
        return optuna.distributions.CategoricalDistribution(sorted(set(values), key=str))
    kind = optuna.distributions.IntDistribution if all(isinstance(v, int) for v in values) else \
        optuna.distributions.FloatDistribution
    return kind(min(values), max(values), log=log_scale(values))


def holds(known: optuna.distributions.BaseDistribution, values: list[Any]) -> bool:
    if isinstance(known, optuna.distributions.CategoricalDistribution):
        return all(value in known.choices for value in values)
    return all(finite(value) and known.low <= value <= known.high for value in values)


def importances(records: list[dict[str, Any]], names: list[str], space: dict[str, Any]) -> tuple[dict[str, float], str]:
    """(importance per hyperparameter, why none when empty). Every trial that reported counts
    with its best score, ASHA-stopped ones too: being stopped early is part of what a value does."""
    scored = [r for r in records if finite(r[BEST])]
    varying = [n for n in names if len({str(r[n]) for r in scored if r[n] is not None}) > 1]
    if len(scored) < 2 or not varying or len({r[BEST] for r in scored}) < 2:
        return {}, (f"needs at least 2 trials that reported {OBJECTIVE}, with different scores and "
                    f"hyperparameters; this search has {len(scored)} and varies {varying or 'none'}")
    distributions = {}
    for name in varying:
        values = [r[name] for r in scored if r[name] is not None]
        known = space.get(name)
        distributions[name] = known if known is not None and holds(known, values) else distribution(values)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # create_study announces itself at INFO
    try:
        study = optuna.create_study(direction="maximize")
        for r in scored:
            params = {n: r[n] for n in varying if r[n] is not None}
            study.add_trial(optuna.trial.create_trial(
                params=params, distributions={n: distributions[n] for n in params}, value=r[BEST]))
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        return dict(optuna.importance.get_param_importances(study, evaluator=evaluator)), ""
    finally:
        optuna.logging.set_verbosity(verbosity)


def plot_importance(values: dict[str, float], count: int) -> Figure:
    figure = Figure(figsize=(7, 1.2 + 0.5 * len(values)), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    ordered = sorted(values.items(), key=lambda item: item[1])
    bars = axes.barh([name for name, _ in ordered], [value for _, value in ordered], color="tab:blue")
    axes.bar_label(bars, fmt="%.2f", padding=3)
    axes.set_xlim(0, max(1.0, max(values.values()) * 1.15))
    axes.set(xlabel="importance (fANOVA, sums to 1)", title=f"What drives best {OBJECTIVE} ({count} trials)")
    return figure


def plot_curves(trials: list[dict[str, Any]]) -> Figure:
    metrics = (OBJECTIVE, "val_accuracy", "val_mean_iou")
    figure = Figure(figsize=(15, 4.5), dpi=100, layout="constrained")
    figure.suptitle(f"Validation metrics per epoch of the {len(trials)} best trials (by best {OBJECTIVE})")
    for place, metric in enumerate(metrics, 1):
        axes = figure.add_subplot(1, len(metrics), place)
        for trial in trials:
            rows = [row for row in trial["rows"] if finite(row.get(metric))]
            axes.plot([row["epoch"] for row in rows], [row[metric] for row in rows], marker="o", markersize=3,
                      label=f"#{trial['record']['trial']} {trial['record']['trial_id']} ({trial['record'][BEST]:.3f})")
        axes.set(xlabel="epoch", ylabel=metric, title=metric)
        axes.grid(alpha=0.3)
    figure.legend(*figure.axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize="small",
                  title=f"trial (best {OBJECTIVE})")
    return figure


def latencies(records: list[dict[str, Any]], experiment_dir: Folder) -> tuple[dict[int, float], str]:
    """ms per canvas of each trial's model (by trial number), each architecture timed once with random
    weights; and the CPU it was timed on."""
    from raylocal import latency
    from raylocal.config import Experiment, Hyperparameters, ModelConfig

    described = read_manifest(experiment_dir).get("experiment")
    fixed = Experiment.from_description(described).fixed if described else Hyperparameters()
    base = {name: getattr(fixed, name) for name in ARCHITECTURE}
    timed: dict[tuple, float] = {}
    by_trial = {}
    for record in records:
        config = {name: record[name] if record.get(name) is not None else base[name] for name in ARCHITECTURE}
        key = tuple(config.values())
        if key not in timed:
            timed[key] = latency.architecture_ms(ModelConfig(**config), bound_s=0.5)
        by_trial[record["trial"]] = timed[key]
    return by_trial, latency.device_name("cpu")


def plot_latency(records: list[dict[str, Any]], ms: dict[int, float], device: str) -> tuple[Figure, list[dict]]:
    """The figure, and the trials on the Pareto front (fastest first)."""
    from raylocal.latency import pareto_front

    scored = [r for r in records if finite(r[BEST])]
    points = [(ms[r["trial"]], r[BEST]) for r in scored]
    front = [scored[i] for i in pareto_front(points)]
    figure = Figure(figsize=(9, 4.5), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    scatter_by_reason(axes, [(x, y, r["stop_reason"]) for (x, y), r in zip(points, scored)])
    axes.step([ms[r["trial"]] for r in front], [r[BEST] for r in front], where="post", color="black",
              label="Pareto front", zorder=2)
    for record in front:
        axes.annotate(f"#{record['trial']}", (ms[record["trial"]], record[BEST]), textcoords="offset points",
                      xytext=(4, -10), fontsize=8)
    axes.set(xlabel=f"ms per canvas (batch 1, one view; {device})", ylabel=f"best {OBJECTIVE}",
             title=f"Accuracy against latency ({len(scored)} trials)")
    figure.legend(*axes.get_legend_handles_labels(), loc="outside right upper")
    return figure, front


def front_lines(front: list[dict], ms: dict[int, float]) -> list[str]:
    """report.md's line on the Pareto front."""
    if not front:
        return []
    points = ", ".join(f"#{r['trial']} ({ms[r['trial']]:.3g} ms, {r[BEST]:.4f})" for r in front)
    return ["", "## Accuracy against latency", "",
            (f"Pareto front (best {OBJECTIVE} for its latency per canvas, batch 1, one view, fastest first): "
             f"{points}. See [latency.png](latency.png).")]


def cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else "–" if value is None else str(value)


def markdown(trials, names, card, skipped: dict[str, str], experiment_dir: Folder, extra: list[str] = ()) -> str:
    records = [trial["record"] for trial in trials]
    counts = [f"{sum(r['stop_reason'] == reason for r in records)} {reason}" for reason in COLORS]
    lines = [f"# Search report: {search_folder(experiment_dir).name}", "",
             f"{len(records)} trials: {', '.join(counts)}. "
             f"Objective `{OBJECTIVE}`: validation mean IoU, counting 0 where the digit is misclassified.", ""]
    if finite(records[0][BEST]):
        record, row = records[0], trials[0]["best_row"]
        lines += ["## Best trial", "",
                  f"Trial #{record['trial']} `{record['trial_id']}` ({record['stop_reason']}): best {OBJECTIVE} "
                  f"**{row[OBJECTIVE]:.4f}** at epoch {row.get('epoch')}; there: "
                  + ", ".join(f"{m} {row.get(f'val_{m}', math.nan):.4f}" for m in LAST_METRICS) + ".", "",
                  "Hyperparameters: " + (", ".join(f"`{n}` = {cell(record[n])}" for n in names) or "none searched")
                  + "."]
        if card.get("test"):
            which = "final training of trial" if card.get("model_from") == "final" else "trial"
            views = card.get("test_views", 1)
            lines += ["", f"Test split (the export's model_card.json, {which} `{card.get('trial_id')}` epoch "
                      f"{card.get('epoch')}" + (f", {views} shifted views averaged" if views > 1 else "") + "): " + ", ".join(f"{k.removeprefix('test_')} {v:.4f}"
                                                        for k, v in card["test"].items()) + "."]
    else:
        lines += [f"No trial has reported {OBJECTIVE} yet."]
    if card.get("final"):
        lines += final_section(card["final"])
    lines += extra
    columns = ["trial", "trial_id", *names, "stop_reason", "reports", BEST, "best_epoch"]
    lines += ["", f"## Top {min(TOP_TABLE, len(records))} trials", "", "| " + " | ".join(columns) + " |",
              "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in records[:TOP_TABLE]]
    lines += ["", "## Files", "", "- [trials.csv](trials.csv): one row per trial, best first"]
    lines += [f"- [{name}]({name}): {what}" if name not in skipped else f"- {name} not drawn: {skipped[name]}"
              for name, what in PLOTS.items()]
    return "\n".join(lines) + "\n"


def final_section(final: dict[str, Any]) -> list[str]:
    """The final phase from the model card: its plan, its runs and the exported run's curve."""
    columns = ("epoch", OBJECTIVE, "val_mean_iou", "val_accuracy", "train_loss", "report_seconds")
    exported = ("Exported" if final.get("exported", True)
                else "Not exported (below the search's best checkpoint on validation)")
    # Cards written before re-planning after every epoch name the last plan differently.
    last_plan = final.get("epochs_replanned", final.get("epochs_after_first_epoch"))
    stopped = " (stopped by the time budget)" if final["stopped_by_time_budget"] else ""
    lines = ["", "## Final training", "", final["plan"] + ".", "",
             f"{exported}: trial `{final['trial_id']}`, seed {final['seed']}, {final['epochs_trained']:g} of "
             f"{last_plan} epochs (planned {final['epochs_planned']} before it started){stopped}, "
             f"{final['seconds']:g} s."]
    if len(final["runs"]) > 1:
        lines += ["", "| trial_id | search score | seed | final " + OBJECTIVE + " |", "|---|---|---|---|"]
        lines += [f"| {r['trial_id']} | {cell(r['search_score'])} | {r['seed']} | {cell(r[OBJECTIVE])} |"
                  for r in final["runs"]]
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in final["curve"]]
    return lines


def write_report(experiment_dir: Folder, out_dir: str | Path | None = None, log=print) -> Path:
    """Write trials.csv, the plots and report.md into out_dir (default EXPERIMENT_DIR/report, or for a
    search on object storage this machine's cache of it); return report.md."""
    experiment_dir = search_folder(experiment_dir)
    out = Path(out_dir) if out_dir else (experiment_dir.local() or cache_folder(experiment_dir)) / "report"
    card = model_card(experiment_dir)
    trials, names = load_trials(experiment_dir, card)
    space = searched_space(experiment_dir)
    trials.sort(key=lambda t: -t["record"][BEST] if finite(t["record"][BEST]) else math.inf)
    records = [trial["record"] for trial in trials]
    out.mkdir(parents=True, exist_ok=True)

    def wrote(name: str) -> None:
        log(f"report: wrote {out / name}")

    with (out / "trials.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    wrote("trials.csv")
    figures, skipped = {"best_so_far.png": plot_best_so_far(sorted(records, key=lambda r: r["trial"]))}, {}
    if names:
        figures["params.png"] = plot_params(records, names, space)
    else:
        skipped["params.png"] = "the search varied no hyperparameter"
    values, why = importances(records, names, space)
    if values:
        figures["importance.png"] = plot_importance(values, sum(finite(r[BEST]) for r in records))
    else:
        skipped["importance.png"] = why
    figures["learning_curves.png"] = plot_curves([t for t in trials if finite(t["record"][BEST])][:TOP_CURVES])
    extra = []
    if any(finite(r[BEST]) for r in records):
        ms, device = latencies(records, experiment_dir)
        figures["latency.png"], front = plot_latency(records, ms, device)
        extra = front_lines(front, ms)
    else:
        skipped["latency.png"] = f"no trial has reported {OBJECTIVE} yet"
    for name, figure in figures.items():
        figure.savefig(out / name)
        wrote(name)
    (out / "report.md").write_text(markdown(trials, names, card, skipped, experiment_dir, extra))
    wrote("report.md")
    return out / "report.md"


def get_args_parser(prog: str = "raylocal-report") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Summarize a Ray Tune search, finished or not: trials.csv, plots, report.md (no Ray needed).",
    )
    parser.add_argument("experiment_dir", metavar="EXPERIMENT_DIR",
                        help="the search's folder <storage>/<name>, holding its trials: a path or a URI (s3://...)")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="where the report goes (default: EXPERIMENT_DIR/report; for a URI, this machine's cache)")
    return parser


def main(args: argparse.Namespace) -> Path:
    return write_report(args.experiment_dir, args.out)


def cli(argv: list[str] | None = None, prog: str = "raylocal-report") -> int:
    from raylocal.storage import StorageError

    return run(get_args_parser(prog), main, (SearchFolderError, StorageError), argv)


if __name__ == "__main__":
    sys.exit(cli())
