"""Best-trial stage: pick the best checkpoint of the search, score it on the test split, export it."""

from __future__ import annotations

import time
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
    # Both are scored on the same validation split: a final run too short to catch up with the
    # search's best checkpoint (a small time budget) does not replace it.
    use_final = final is not None and final.winner.validation[OBJECTIVE] >= search_validation[OBJECTIVE]
    if final is not None and not use_final:
        log(f"final: validation {OBJECTIVE} {final.winner.validation[OBJECTIVE]:.4f} is below the search's best "
            f"checkpoint ({search_validation[OBJECTIVE]:.4f}); exporting that checkpoint")
    if not use_final:
        model, params, epoch = load_model(checkpoint)
        validation, trial_id, source = search_validation, best.metrics.get("trial_id"), "search"
    else:
        # The final run's hyperparameters with the global batch, not the per-worker one its state holds.
        model, params, epoch = model_from_state(final.winner.state, final.winner.params)
        validation, trial_id, source = final.winner.validation, final.winner.candidate.trial_id, "final"
    started = time.perf_counter()
    device = torch.device("cpu")
    # Scored as exported: validation, which ranked the trials, saw the network alone.
    exported = for_inference(model, plan.views)
    test = summarize(evaluate(exported, to_tensors(data.test.fetch(), device), params, device), "test")
    log(f"{'final model of trial' if use_final else 'best trial'} {trial_id} epoch {epoch:g}: scored {data.test.rows:,} "
        f"test canvases{views_note(plan.views)} in {time.perf_counter() - started:.1f}s")
    summary = {
        "task": TASK,
        "experiment": plan.name,
        "model_from": source,
        "trial_id": trial_id,
        "epoch": epoch,
        "objective": f"{OBJECTIVE}: mean over validation canvases of IoU x [predicted digit is right]",
        "hyperparameters": params.__dict__.copy(),
        "validation": validation,
        "test": test,
        "test_views": plan.views,
        "data": {
            "source": data.source, "sha256": data.sha256, "verified": data.verified,
            "train_canvases_per_epoch": data.train_epochs[0].rows, "val_canvases": data.val.rows,
            "test_canvases": data.test.rows, "seed": data.seed,
        },
        "search": {
            "settings": plan.experiment.describe(), "trials": len(results), "errored_trials": len(errors),
            "backend": settings.layout.backend, "workers_per_trial": settings.layout.workers,
            "device": settings.layout.device, "gpus_per_worker": settings.layout.gpus_per_worker, "seed": settings.seed,
            "wall_seconds_until_export": round(search_seconds, 1), "storage": f"{plan.storage}/{plan.name}",
            "best_trial": {"trial_id": best.metrics.get("trial_id"), "epoch": float(epoch_metrics.get("epoch", 0)),
                           "validation": search_validation},
        },
        "final": final.card() | {"exported": use_final} if final else None,
    }
    summary["export_dir"] = str(export_model(model, plan.export_dir, summary, views=plan.views, log=log))
    return summary


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
