"""Best-trial stage: pick the best checkpoint of the search, score it on the test split, export it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from ray import train

from raylocal.config import OBJECTIVE, Hyperparameters
from raylocal.data import SearchData
from raylocal.engine import evaluate, to_tensors
from raylocal.export import export_model
from raylocal.metrics import summarize
from raylocal.model import build_model, for_inference
from raylocal.trial import TrialSettings, load_checkpoint_state

TASK = "localize one MNIST digit pasted at a random position on a black 75x75 canvas"


def best_checkpoint(result) -> tuple[Any, dict[str, Any]]:
    """(checkpoint, metrics of its epoch) with the highest objective in one trial.

    Inline trials report checkpoints to Tune; trials that ran a TorchTrainer report the
    path of Train's checkpoint as a metric (TuneReportCallback), so both are looked at.
    """
    if result.best_checkpoints:
        return max(result.best_checkpoints, key=lambda pair: pair[1][OBJECTIVE])
    frame = result.metrics_dataframe
    if frame is None or "checkpoint_path" not in frame:
        raise RuntimeError(f"trial {result.path} reported no checkpoint")
    row = frame.loc[frame[OBJECTIVE].idxmax()].to_dict()
    # Train records the path within the search's storage (no scheme on object storage): open it there.
    return train.Checkpoint(row["checkpoint_path"], filesystem=result.filesystem), row


def model_from_state(state: dict[str, Any], params: Hyperparameters):
    """(model in eval mode, hyperparameters, epoch) from a checkpoint state written by `engine.fit`."""
    model = build_model(params.model_config())
    model.load_state_dict(state["model"])
    return model.eval(), params, state["epoch"]


def load_model(checkpoint):
    state = load_checkpoint_state(checkpoint)
    return model_from_state(state, Hyperparameters.from_saved(state["hyperparameters"]))


def check_finished(results) -> list:
    """The trials' errors; raises when no trial reported the objective."""
    errors = [result.error for result in results if result.error]
    finished = [result for result in results if result.metrics and OBJECTIVE in result.metrics]
    if not finished:
        raise RuntimeError(f"no trial reported {OBJECTIVE}; first error: {errors[0] if errors else 'none'}")
    return errors


def export_best(results, data: SearchData, settings: TrialSettings, plan, *, search_seconds: float, final=None,
                log=print) -> dict[str, Any]:
    """Score on the test split and export: the final phase's model, or without one the best
    checkpoint of the search."""
    errors = check_finished(results)
    best = results.get_best_result(metric=OBJECTIVE, mode="max", scope="all", filter_nan_and_inf=True)
    checkpoint, epoch_metrics = best_checkpoint(best)
    search_validation = {key: float(value) for key, value in epoch_metrics.items() if key.startswith("val_")}
    options = exportables(best, checkpoint, search_validation, final)
    use_final = final_beats_search(final, search_validation, log)
    chosen, views, bound = options[1 if use_final else 0], plan.views, None
    if plan.max_latency_ms is not None:
        chosen, views, bound = within_latency(options, plan.views, plan.max_latency_ms, log)
        use_final = chosen.source == "final"
    model, params, epoch, validation, trial_id = (chosen.model, chosen.params, chosen.epoch, chosen.validation,
                                                  chosen.trial_id)
    test = score_test_split(model, params, data, views, log,
                            f"{'final model of trial' if use_final else 'best trial'} {trial_id} epoch {epoch:g}")
    summary = {
        "task": TASK,
        "experiment": plan.name,
        "model_from": chosen.source,
        "trial_id": trial_id,
        "epoch": epoch,
        "objective": f"{OBJECTIVE}: mean over validation canvases of IoU x [predicted digit is right]",
        "hyperparameters": params.__dict__.copy(),
        "validation": validation,
        "test": test,
        "test_views": views,
        "latency_bound": bound,
        "data": data_card(data),
        "search": search_card(results, errors, settings, plan, search_seconds) | {
            "best_trial": {"trial_id": best.metrics.get("trial_id"), "epoch": float(epoch_metrics.get("epoch", 0)),
                           "validation": search_validation},
        },
        "final": final.card() | {"exported": use_final} if final else None,
    }
    summary["export_dir"] = str(export_model(model, plan.export_dir, summary, views=views, log=log))
    return summary


@dataclass(frozen=True)
class Exportable:
    """A model the command could export, with what validation measured of it."""

    model: Any
    params: Hyperparameters
    epoch: float
    validation: dict[str, float]
    trial_id: str
    source: str  # "search": the search's best checkpoint; "final": a final run


def exportables(best, checkpoint, search_validation: dict[str, float], final) -> list[Exportable]:
    """The search's best checkpoint, then the final phase's winner and its other runs."""
    found = [Exportable(*load_model(checkpoint), search_validation, best.metrics.get("trial_id"), "search")]
    runs = [final.winner] + [run for run in final.runs if run is not final.winner] if final else []
    # A final run's hyperparameters with the global batch, not the per-worker one its state holds.
    return found + [Exportable(*model_from_state(run.state, run.params), run.validation, run.candidate.trial_id,
                               "final") for run in runs]


def within_latency(options: list[Exportable], most_views: int, max_ms: float, log) -> tuple[Exportable, int, dict]:
    """The most accurate (model, views) whose eager latency per canvas at batch 1 on this machine's
    CPU is at most `max_ms`; at equal validation score, more views (they only ever helped:
    docs/decisions.md#shift-averaged-views)."""
    from raylocal.latency import LatencyError, architecture_ms, device_name, fastest_meeting

    timed: dict[tuple, float] = {}
    rows = []
    for index, option in enumerate(options):
        config = option.params.model_config()
        for views in range(1, most_views + 1):
            if (config, views) not in timed:
                timed[config, views] = architecture_ms(config, views, batch=1)
            rows.append(((index, views), (option.validation[OBJECTIVE], views), timed[config, views]))
    record = {"max_ms": max_ms, "device": device_name("cpu"), "batch": 1,
              "options": [{"source": options[index].source, "trial_id": options[index].trial_id, "views": views,
                           OBJECTIVE: score, "ms": round(ms, 4)} for (index, views), (score, _), ms in rows]}
    chosen = fastest_meeting(rows, max_ms)
    if chosen is None:
        (index, views), _, ms = min(rows, key=lambda row: row[2])
        raise LatencyError(f"--max-latency-ms {max_ms:g}: no model is that fast on this machine; the fastest, trial "
                           f"{options[index].trial_id} with {views} view(s), takes {ms:.3g} ms per canvas at batch 1; "
                           "nothing exported")
    (index, views), _, ms = chosen
    log(f"latency bound {max_ms:g} ms: exporting trial {options[index].trial_id} ({options[index].source}) with "
        f"{views} view(s), {ms:.3g} ms per canvas at batch 1 on {record['device']}")
    return options[index], views, record | {"chosen": {"trial_id": options[index].trial_id, "views": views,
                                                       "ms": round(ms, 4)}}


def final_beats_search(final, search_validation: dict[str, float], log) -> bool:
    """Whether the final phase's model is the one to export. Both are scored on the same validation
    split: a final run too short to catch up with the search's best checkpoint (a small time
    budget) does not replace it."""
    if final is None:
        return False
    if final.winner.validation[OBJECTIVE] >= search_validation[OBJECTIVE]:
        return True
    log(f"final: validation {OBJECTIVE} {final.winner.validation[OBJECTIVE]:.4f} is below the search's best "
        f"checkpoint ({search_validation[OBJECTIVE]:.4f}); exporting that checkpoint")
    return False


def score_test_split(model, params: Hyperparameters, data: SearchData, views: int, log, what: str) -> dict[str, float]:
    """The test split's metrics of `model` as exported, on the CPU."""
    started = time.perf_counter()
    device = torch.device("cpu")
    # Scored as exported: validation, which ranked the trials, saw the network alone.
    exported = for_inference(model, views)
    test = summarize(evaluate(exported, to_tensors(data.test.fetch(), device), params, device), "test")
    log(f"{what}: scored {data.test.rows:,} test canvases{views_note(views)} in {time.perf_counter() - started:.1f}s")
    return test


def data_card(data: SearchData) -> dict[str, Any]:
    """What the model card records of the data."""
    return {
        "source": data.source, "sha256": data.sha256, "verified": data.verified,
        "train_canvases_per_epoch": data.train_epochs[0].rows, "val_canvases": data.val.rows,
        "test_canvases": data.test.rows, "seed": data.seed,
    }


def search_card(results, errors: list, settings: TrialSettings, plan, search_seconds: float) -> dict[str, Any]:
    """What the model card records of the search."""
    return {
        "settings": plan.experiment.describe(), "trials": len(results), "errored_trials": len(errors),
        "backend": settings.layout.backend, "workers_per_trial": settings.layout.workers,
        "device": settings.layout.device, "gpus_per_worker": settings.layout.gpus_per_worker, "seed": settings.seed,
        "wall_seconds_until_export": round(search_seconds, 1), "storage": plan.experiment_dir,
    }


def views_note(views: int) -> str:
    return f", each as {views} shifted views averaged" if views > 1 else ""


def trials_line(search: dict[str, Any]) -> str:
    """How many of the trials asked for ran, and why not all of them."""
    ran, planned = search["trials"], search.get("trials_planned", search["trials"])
    return f"{ran} of {planned} ran" + (" (time budget)" if search.get("ended_by_time_budget") else "")


def summary_table(summary: dict[str, Any]) -> str:
    hyper = summary["hyperparameters"]
    how = "final training" if summary.get("model_from") == "final" else "search checkpoint"
    rows = [("trial", f"{summary['trial_id']} ({how}, epoch {summary['epoch']:g})")]
    rows += [(f"  {key}", f"{value:.4g}" if isinstance(value, float) else str(value)) for key, value in hyper.items()]
    views = summary.get("test_views", 1)
    rows.append(("metric", "validation | test" + (f" ({views} views)" if views > 1 else "")))
    for name in ("det_iou", "mean_iou", "accuracy", "iou50", "iou60", "iou75"):
        val, test = summary["validation"].get(f"val_{name}"), summary["test"][f"test_{name}"]
        rows.append((f"  {name}", f"{val:.4f} | {test:.4f}" if val is not None else f"   -   | {test:.4f}"))
    rows.append(("trials", trials_line(summary["search"])))
    rows.append(("export", summary["export_dir"]))
    if "report" in summary:
        rows.append(("report", summary["report"]))
    width = max(len(key) for key, _ in rows)
    return "\n".join(["", "Best trial", "=" * 40] + [f"{key:<{width}}  {value}" for key, value in rows])
