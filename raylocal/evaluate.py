"""Evaluation entry point: `python -m raylocal.evaluate EXPORT_DIR`.

Scores an export on the test split and draws what it sees. Only model.pt2 is loaded, so
what is scored is the shipped artefact, not whatever the model code looks like today. The
split is rebuilt from the model card's seed: a digit's place depends only on (seed, split,
epoch, digit index), so the canvases are the search's, and `--limit N` scores its first N.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from raylocal.cli import UsageError, run
from raylocal.config import DataSettings
from raylocal.mnist import IdxFormatError, MnistHashError, MnistNotFoundError, load_mnist
from raylocal.synthesis import split_plan, synthesize_split

# torch and the export's modules are imported where used: `--help` answers without them.
Arrays = dict[str, np.ndarray]


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def get_args_parser(prog: str = "raylocal-evaluate") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Score an exported localizer (model.pt2) on the test split the search used; "
        "write metrics.json, predictions.png and worst.png.",
    )
    parser.add_argument("export_dir", metavar="EXPORT_DIR",
                        help="folder written by raylocal tune (holds model.pt2): a path or a URI (s3://...)")
    parser.add_argument("--data-dir", type=Path,
                        help="folder with the MNIST IDX files (else $RAYLOCAL_DATA_DIR, cache, download)")
    parser.add_argument("--unverified-data", action="store_true",
                        help="accept MNIST files whose SHA-256 differs from the official ones (e.g. test fixtures)")
    parser.add_argument("--out", type=Path, help="where the results go (default: EXPORT_DIR/evaluation)")
    parser.add_argument("--seed", type=int, help="placement seed (default: the model card's)")
    parser.add_argument("--limit", type=positive_int, help="score only the first N test digits (default: all)")
    parser.add_argument("--batch-size", type=positive_int, default=256)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def rebuild_test_split(mnist, seed: int, data: DataSettings, limit: int | None) -> Arrays:
    """The search's test canvases (or the first `limit` of them), built as the search built them."""
    plan = split_plan(len(mnist.train_images), len(mnist.test_images))
    split = synthesize_split(mnist.test_images, mnist.test_labels, plan, seed=seed, split="test", epoch=0, stop=limit,
                             tight_boxes=data.tight_boxes)
    return {key: split[key] for key in ("image", "box", "label")}


def score(program, split: Arrays, batch_size: int):
    """Metric sums (a tensor), and per canvas: predicted label, confidence, box and IoU (the loss slot
    stays 0: the loss depends on training hyperparameters, not on the artefact)."""
    import torch

    from raylocal.export import run_program
    from raylocal.metrics import score_batches

    columns = (torch.from_numpy(split[key]) for key in ("image", "box", "label"))
    sums, outputs = score_batches(lambda images: run_program(program, images), *columns, batch_size=batch_size,
                                  keep_outputs=True)
    return sums, {key: value.numpy() for key, value in outputs.items()}


def tiles_for(indices: np.ndarray, split: Arrays, outputs: Arrays) -> list:
    from raylocal.drawing import PRED_COLOR, TRUE_COLOR, draw_tile

    tiles = []
    for i in indices:
        wrong = outputs["label"][i] != split["label"][i]
        caption = [f"pred {outputs['label'][i]} ({outputs['confidence'][i]:.2f}) / true {split['label'][i]}",
                   f"IoU {outputs['iou'][i]:.2f}"]
        boxes = [(split["box"][i], TRUE_COLOR), (outputs["box"][i], PRED_COLOR)]
        tiles.append(draw_tile(split["image"][i], boxes, caption, PRED_COLOR if wrong else "white"))
    return tiles


def metrics_table(metrics: dict[str, float], reference: dict[str, float]) -> str:
    rows = [("metric", f"{'value':<6}" + (" | model card" if reference else ""))]
    for key, value in metrics.items():
        cell = f"{value:.4f}" + (f" | {reference[key]:.4f}" if key in reference else "")
        rows.append((key.removeprefix("test_"), cell))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {cell}".rstrip() for name, cell in rows)


def read_card(export_dir: Path, log) -> dict:
    path = export_dir / "model_card.json"
    if not path.exists():
        log(f"WARNING: no {path}: default seed; the split may differ from the search's")
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UsageError(f"{path}: unreadable: {error}") from error


def latency_here(export_dir: Path, card: dict, log) -> dict:
    """model.pt2 and model.onnx timed on this machine (model.pt2 on its GPU if it has one), printed
    beside the model card's figures from the exporting machine."""
    import torch

    from raylocal import latency

    config = json.loads((export_dir / "config.json").read_text()) if (export_dir / "config.json").is_file() else {}
    views = config.get("test_time", {}).get("views", 1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    measured = {"unit": "ms per canvas",
                "device": {"model.pt2": latency.device_name(device), "model.onnx": latency.device_name("cpu")},
                "views": {str(views): latency.measure(export_dir / "model.pt2", export_dir / "model.onnx", device)}}
    log("latency on this machine:\n" + latency.table(measured))
    if card.get("latency"):
        log("latency in the model card (the exporting machine):\n" + latency.table(card["latency"]))
    return measured


def main(args: argparse.Namespace, log=print) -> dict:
    from raylocal.drawing import COLUMNS, ROWS, grid
    from raylocal.export import load_export
    from raylocal.metrics import summarize

    from raylocal.storage import fetch

    export_dir = fetch(args.export_dir)  # a URI's files, downloaded into this machine's cache
    program = load_export(export_dir)
    card = read_card(export_dir, log)
    searched = card.get("search", {}).get("settings", {}).get("data", {})
    data = DataSettings(**{key: searched[key] for key in ("tight_boxes",) if key in searched})
    seed = args.seed if args.seed is not None else card.get("data", {}).get("seed", 0)
    mnist = load_mnist(args.data_dir, verify=not args.unverified_data, log=log)
    split = rebuild_test_split(mnist, seed, data, args.limit)
    count = len(split["label"])
    log(f"data: {count:,} test canvases, seed {seed}, "
        f"{'tight ink' if data.tight_boxes else '28x28 frame'} boxes")
    started = time.perf_counter()
    sums, outputs = score(program, split, args.batch_size)
    metrics = {key: value for key, value in summarize(sums, "test").items() if key != "test_loss"}
    # The card's test metrics are comparable only when they cover the same canvases.
    same_split = count == card.get("data", {}).get("test_canvases") and args.seed is None
    log(f"scored {count:,} canvases with {export_dir / 'model.pt2'} in {time.perf_counter() - started:.1f}s\n"
        + metrics_table(metrics, card.get("test", {}) if same_split else {}))

    out = args.out or export_dir / "evaluation"
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "export_dir": args.export_dir if "://" in args.export_dir else str(export_dir), "canvases": count,
        "metrics": metrics,
        "data": {"source": mnist.source, "verified": mnist.verified, "seed": seed,
                 "tight_boxes": data.tight_boxes},
        "latency": latency_here(export_dir, card, log),
    }
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    shown = COLUMNS * ROWS
    # Lowest det-IoU first; among the many misclassified (all 0), the worst boxes first.
    worst = np.lexsort((outputs["iou"], outputs["iou"] * (outputs["label"] == split["label"])))[:shown]
    grid(tiles_for(np.arange(min(shown, count)), split, outputs)).save(out / "predictions.png")
    grid(tiles_for(worst, split, outputs)).save(out / "worst.png")
    log(f"wrote metrics.json, predictions.png (first {min(shown, count)}) and worst.png "
        f"(lowest det IoU; green: true box, red: predicted) to {out}")
    return result


def user_errors() -> tuple[type[Exception], ...]:
    """What `main` raises for a user's mistake (one line, exit 2); imported only once needed (torch)."""
    from raylocal.export import ExportError
    from raylocal.storage import StorageError

    return UsageError, ExportError, StorageError, IdxFormatError, MnistHashError, MnistNotFoundError


def cli(argv: list[str] | None = None, prog: str = "raylocal-evaluate") -> int:
    return run(get_args_parser(prog), main, user_errors, argv)


if __name__ == "__main__":
    sys.exit(cli())
