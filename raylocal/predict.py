"""Prediction entry point: `python -m raylocal.predict EXPORT_DIR image.png [...]`.

Runs an export (model.pt2 only) on arbitrary images. The model only knows 75x75 canvases
with a white MNIST-sized digit on black, so each image is brought to that form first
(`raylocal.preprocess`, the same code `raylocal serve` runs) and every step taken is reported,
on stderr and in the JSON, since each one can change the answer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from raylocal.cli import UsageError, run


def get_args_parser(prog: str = "raylocal-predict") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Predict digit and box for images with an exported localizer; one JSON object per image on stdout.",
    )
    parser.add_argument("export_dir", metavar="EXPORT_DIR",
                        help="folder written by raylocal tune (holds model.pt2): a path or a URI (s3://...)")
    parser.add_argument("images", type=Path, nargs="+", help="image files in any format PIL reads")
    parser.add_argument("--annotate", type=Path, metavar="OUT_DIR",
                        help="also write OUT_DIR/<stem>.annotated.png with the predicted box and label")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(args: argparse.Namespace) -> list[dict]:
    import numpy as np
    import torch

    from raylocal.export import load_export, run_program
    from raylocal.preprocess import answer, prepare
    from raylocal.storage import fetch

    program = load_export(fetch(args.export_dir))  # a URI's files, downloaded into this machine's cache
    # Every image is read before any is scored, so a bad file fails the run before any output.
    prepared = [prepare(path) for path in args.images]
    for path, image in zip(args.images, prepared):
        for note in image.notes:
            print(f"{path}: {note}", file=sys.stderr)
    canvases = np.stack([image.canvas for image in prepared])
    logits, boxes = run_program(program, torch.from_numpy(canvases))
    if args.annotate:
        args.annotate.mkdir(parents=True, exist_ok=True)
    results = []
    for path, image, scores, box in zip(args.images, prepared, logits.numpy(), boxes.numpy()):
        result = {"image": str(path), **answer(image, scores, box)}
        print(json.dumps(result), flush=True)
        results.append(result)
        if args.annotate:
            annotate(image.canvas, result, args.annotate / f"{path.stem}.annotated.png")
            print(f"{path}: wrote {args.annotate / f'{path.stem}.annotated.png'}", file=sys.stderr)
    return results


def annotate(canvas, result: dict, out: Path) -> None:
    """The canvas the model saw, with its box and label."""
    from raylocal.drawing import PRED_COLOR, draw_tile

    box = list(result["canvas_box"].values())
    draw_tile(canvas, [(box, PRED_COLOR)], [f"pred {result['label']} ({result['confidence']:.2f})"], "white").save(out)


def user_errors() -> tuple[type[Exception], ...]:
    """What `main` raises for a user's mistake (one line, exit 2); imported only once needed (torch)."""
    from raylocal.export import ExportError
    from raylocal.preprocess import ImageError
    from raylocal.storage import StorageError

    return UsageError, ExportError, ImageError, StorageError


def cli(argv: list[str] | None = None, prog: str = "raylocal-predict") -> int:
    return run(get_args_parser(prog), main, user_errors, argv)


if __name__ == "__main__":
    sys.exit(cli())
