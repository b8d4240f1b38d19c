"""Shifted views averaged (`raylocal.tune --views`) against the network alone, on the same models.

Each export folder (written by `raylocal.tune`, or by `bench_baselines.py --storage`) is rebuilt
from its state_dict.pt and config.json, and scored on the test split `raylocal.evaluate` rebuilds
from its card's seed, once per view count: the comparison is paired, the same weights on the same
canvases. Printed: a line per model and view count (with the time per 1,000 canvases on this
machine's threads), then the mean and spread over the models of each view count's gain over the
first one given.

    python experiments/bench_views.py runs/*/best_model --data-dir ../shared/data/mnist
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import benchlib
import torch

from raylocal.config import DataSettings
from raylocal.evaluate import rebuild_test_split, score
from raylocal.export import load_state_dict_model
from raylocal.metrics import summarize
from raylocal.model import SHIFTS, ShiftAveraged, for_inference

BATCH = 500


def get_args_parser():
    parser = benchlib.base_parser(__doc__.splitlines()[0])
    parser.add_argument("exports", type=Path, nargs="+", help="export folders (state_dict.pt, config.json, model_card.json)")
    parser.add_argument("--views", type=int, nargs="+", choices=range(1, len(SHIFTS) + 1), default=[1, len(SHIFTS)],
                        help="view counts to score; gains are against the first (default: 1 5)")
    parser.add_argument("--limit", type=int, help="score only the first N test canvases (default: all)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    return parser


def network_of(export_dir: Path) -> torch.nn.Module:
    model = load_state_dict_model(export_dir)
    return model.model if isinstance(model, ShiftAveraged) else model


def score_views(network, split, views: int) -> dict:
    model = for_inference(network, views).eval()
    # One batch untimed: the first forward of a model pays for its allocations.
    score(model, {key: value[:BATCH] for key, value in split.items()}, BATCH)
    started = time.perf_counter()
    sums, _ = score(model, split, BATCH)
    seconds = time.perf_counter() - started
    metrics = summarize(sums, "test")
    return {"views": views, "errors": round((1 - metrics["test_accuracy"]) * len(split["label"])),
            "det_iou": metrics["test_det_iou"], "mean_iou": metrics["test_mean_iou"],
            "accuracy": metrics["test_accuracy"], "ms_per_1k": 1000 * seconds * 1000 / len(split["label"])}


def main(args) -> None:
    import pandas as pd

    benchlib.print_setup("shifted views, paired on the same models", views=args.views, threads=args.threads,
                         limit=args.limit or "all", models=len(args.exports))
    torch.set_num_threads(args.threads)
    mnist = benchlib.load_digits(args)
    splits, rows = {}, []
    for export_dir in args.exports:
        card = json.loads((export_dir / "model_card.json").read_text())
        seed = card.get("data", {}).get("seed", 0)
        tight = card.get("search", {}).get("settings", {}).get("data", {}).get("tight_boxes", False)
        if (seed, tight) not in splits:
            splits[seed, tight] = rebuild_test_split(mnist, seed, DataSettings(tight_boxes=tight), args.limit)
        network = network_of(export_dir)
        for views in args.views:
            row = {"model": str(export_dir), "seed": seed} | score_views(network, splits[seed, tight], views)
            rows.append(row)
            print(f"{export_dir}  seed {seed}  views {views}: errors {row['errors']:4d}  det IoU {row['det_iou']:.4f}  "
                  f"mean IoU {row['mean_iou']:.4f}  accuracy {row['accuracy']:.4f}  {row['ms_per_1k']:.0f} ms/1k canvases",
                  flush=True)
    frame = pd.DataFrame(rows)
    base = frame[frame["views"] == args.views[0]].set_index("model")
    for views in args.views[1:]:
        gain = frame[frame["views"] == views].set_index("model")[["errors", "det_iou", "mean_iou", "accuracy"]]
        gain = gain - base[gain.columns]
        with pd.option_context("display.width", 200, "display.precision", 4):
            print(f"\n{views} views minus {args.views[0]}, over {len(gain)} model(s):")
            print(gain.agg(["mean", "std", "min", "max"]))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
