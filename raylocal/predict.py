"""Prediction entry point: `python -m raylocal.predict EXPORT_DIR image.png [...]`.

Runs an export (model.pt2 only) on arbitrary images. The model only knows 75x75 canvases
with a white digit on black, so each image is brought to that form first and every step
taken is reported, on stderr and in the JSON, since each one can change the answer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from raylocal.cli import UsageError, run
from raylocal.drawing import PRED_COLOR, draw_tile
from raylocal.export import ExportError, load_export, run_program
from raylocal.synthesis import CANVAS


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raylocal-predict",
        description="Predict digit and box for images with an exported localizer; one JSON object per image on stdout.",
    )
    parser.add_argument("export_dir", type=Path, help="folder written by raylocal.tune (holds model.pt2)")
    parser.add_argument("images", type=Path, nargs="+", help="image files in any format PIL reads")
    parser.add_argument("--annotate", type=Path, metavar="OUT_DIR",
                        help="also write OUT_DIR/<stem>.annotated.png with the predicted box and label")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def prepare(path: Path) -> tuple[np.ndarray, list[str]]:
    """The image as a uint8 75x75 white-on-black canvas, and notes on what was done to it."""
    try:
        with Image.open(path) as opened:
            # Photos are often stored sideways with an EXIF rotation tag.
            image = ImageOps.exif_transpose(opened).convert("L")
    except (OSError, ValueError) as error:  # PIL's UnidentifiedImageError is an OSError
        raise UsageError(f"{path}: cannot read as an image: {error}") from error
    notes = []
    mean = np.asarray(image).mean() / 255
    # Inverted before padding, so that the padding is black like the rest of the background.
    if mean > 0.5:
        image = ImageOps.invert(image)
        notes.append(f"mean brightness {mean:.2f} > 0.5 (dark digit on light background), inverted to white on black")
    width, height = image.size
    if (width, height) != (CANVAS, CANVAS):
        if max(width, height) > CANVAS:
            # Only shrunk, never enlarged: a digit smaller than the canvas is what training saw.
            image = ImageOps.contain(image, (CANVAS, CANVAS), Image.Resampling.LANCZOS)
            notes.append(f"{width}x{height}, resized to {image.width}x{image.height} and padded to {CANVAS}x{CANVAS}")
        else:
            notes.append(f"{width}x{height}, padded to {CANVAS}x{CANVAS}")
        canvas = Image.new("L", (CANVAS, CANVAS))
        canvas.paste(image, ((CANVAS - image.width) // 2, (CANVAS - image.height) // 2))
        image = canvas
    return np.asarray(image, dtype=np.uint8), notes


def main(args: argparse.Namespace) -> list[dict]:
    program = load_export(args.export_dir)
    # Every image is read before any is scored, so a bad file fails the run before any output.
    prepared = [prepare(path) for path in args.images]
    for path, (_, notes) in zip(args.images, prepared):
        for note in notes:
            print(f"{path}: {note}", file=sys.stderr)
    canvases = np.stack([canvas for canvas, _ in prepared])
    logits, boxes = run_program(program, torch.from_numpy(canvases))
    confidences, labels = logits.softmax(dim=1).max(dim=1)
    if args.annotate:
        args.annotate.mkdir(parents=True, exist_ok=True)
    results = []
    for path, (canvas, notes), label, confidence, box in zip(args.images, prepared, labels.tolist(),
                                                             confidences.tolist(), boxes.tolist()):
        result = {
            "image": str(path), "label": label, "confidence": round(confidence, 6),
            "box": dict(zip(("xmin", "ymin", "xmax", "ymax"), (round(v, 6) for v in box))),
            "box_pixels": [round(v * CANVAS, 2) for v in box], "preprocessing": notes,
        }
        print(json.dumps(result), flush=True)
        results.append(result)
        if args.annotate:
            out = args.annotate / f"{path.stem}.annotated.png"
            draw_tile(canvas, [(box, PRED_COLOR)], [f"pred {label} ({confidence:.2f})"], "white").save(out)
            print(f"{path}: wrote {out}", file=sys.stderr)
    return results


def cli(argv: list[str] | None = None) -> int:
    return run(get_args_parser(), main, (UsageError, ExportError), argv)


if __name__ == "__main__":
    sys.exit(cli())
