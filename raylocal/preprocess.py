"""Image -> canvas: the one preprocessing of `raylocal predict` and `raylocal serve`.

The model only knows 75x75 canvases with a white MNIST-sized digit on black. An image is
brought to that form: a light background is inverted, the background level is taken off, and
the image is scaled so that the digit's ink is as large as an MNIST digit's (`INK` pixels on
its long side, in a `DIGIT`-pixel frame), then pasted in the middle of a black canvas. Every
step taken is noted, since each one can change the answer, and the box the model finds on
the canvas is mapped back to the image's pixels.

numpy and PIL only: serving replicas and `--help` need neither torch nor Ray for this.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from raylocal.synthesis import CANVAS, DIGIT

# The long side of an MNIST digit's ink (`synthesis.ink_extent`): MNIST scaled every digit to fit
# 20x20 before centring it in its 28x28 frame.
INK = 20
# Ink this close to INK is left at its scale, so that a canvas from the splits passes unchanged.
INK_TOLERANCE = 2
# Larger images are refused before they are decoded (a decompression bomb is small on disk).
MAX_SIDE = 4096
MAX_BYTES = 8 * 1024 * 1024
# Below this contrast between the background and the brightest pixel there is no ink to measure.
MIN_CONTRAST = 32


class ImageError(ValueError):
    """The bytes are not an image this preprocessing takes; the message is one line for the user."""


@dataclass(frozen=True)
class Prepared:
    """A canvas, what was done to make it, and how canvas pixels map back to the image's:
    image_xy = canvas_xy * `to_image_scale` + `to_image_offset`."""

    canvas: np.ndarray  # uint8 [75,75]
    notes: list[str] = field(default_factory=list)
    size: tuple[int, int] = (CANVAS, CANVAS)  # the image's (width, height)
    to_image_scale: float = 1.0
    to_image_offset: tuple[float, float] = (0.0, 0.0)


def read_image(source: str | os.PathLike | bytes) -> Image.Image:
    """A file or the bytes of one as a grayscale PIL image; ImageError when it is empty, too
    large (MAX_BYTES, MAX_SIDE) or not an image PIL reads."""
    if isinstance(source, bytes):
        data, name = source, "body"
    else:
        name = str(source)
        try:
            if Path(source).stat().st_size > MAX_BYTES:
                raise ImageError(f"{name}: larger than {MAX_BYTES // 2**20} MiB")
            data = Path(source).read_bytes()
        except OSError as error:
            raise ImageError(f"{name}: cannot read: {error.strerror or error}") from error
    if not data:
        raise ImageError(f"{name}: empty, not an image")
    if len(data) > MAX_BYTES:
        raise ImageError(f"{name}: larger than {MAX_BYTES // 2**20} MiB")
    try:
        with Image.open(io.BytesIO(data)) as opened:
            # The header alone gives the size: refused before any pixel is decoded.
            if max(opened.size) > MAX_SIDE:
                raise ImageError(f"{name}: {opened.width}x{opened.height} is larger than {MAX_SIDE}x{MAX_SIDE}")
            # Photos are often stored sideways with an EXIF rotation tag.
            return ImageOps.exif_transpose(opened).convert("L")
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image (PNG, JPEG or another format PIL reads)") from None
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ImageError(f"{name}: cannot read as an image: {str(error).splitlines()[0] if str(error) else error!r}") \
            from error


def prepare(source: str | os.PathLike | bytes) -> Prepared:
    return prepare_image(read_image(source))


def prepare_image(image: Image.Image) -> Prepared:
    """The image (grayscale) as a canvas; see the module's docstring."""
    notes = []
    pixels = np.asarray(image, dtype=np.uint8)
    mean = pixels.mean() / 255
    if mean > 0.5:
        pixels = 255 - pixels
        notes.append(f"mean brightness {mean:.2f} > 0.5 (dark digit on light background), inverted to white on black")
    background = int(np.median(pixels))
    if background > 0:
        # Pasted on black as it is, a grey background would be a bright rectangle around the digit.
        pixels = np.clip(pixels.astype(np.int16) - background, 0, 255).astype(np.uint8)
        notes.append(f"background level {background} subtracted")
    height, width = pixels.shape
    box = ink_box(pixels)
    if box is None:
        notes.append("no ink found: the image is not rescaled for a digit's size")
        return _fit_whole(pixels, notes)
    x0, y0, x1, y1 = box
    long_side = max(x1 - x0, y1 - y0)
    scale = 1.0 if abs(long_side - INK) <= INK_TOLERANCE else INK / long_side
    if scale == 1.0 and width <= CANVAS and height <= CANVAS:
        if (width, height) != (CANVAS, CANVAS):
            notes.append(f"{width}x{height}, padded to {CANVAS}x{CANVAS}")
        return _paste(pixels, 1.0, (0, 0), ((CANVAS - width) // 2, (CANVAS - height) // 2), notes)
    if scale == 1.0:
        notes.append(f"{width}x{height}, ink {x1 - x0}x{y1 - y0} px (an MNIST digit's size): centred on a "
                     f"{CANVAS}x{CANVAS} canvas")
    else:
        notes.append(f"{width}x{height}, ink {x1 - x0}x{y1 - y0} px: scaled by {scale:.3g} to {INK} px on its long "
                     f"side, an MNIST digit's size, and centred on a {CANVAS}x{CANVAS} canvas")
    # The MNIST frame around the ink, so that scaling sees the strokes' edges as training did.
    margin = int(np.ceil((DIGIT - INK) / 2 / scale))
    crop = (max(0, x0 - margin), max(0, y0 - margin), min(width, x1 + margin), min(height, y1 + margin))
    centre = ((x0 + x1) / 2 - crop[0]) * scale, ((y0 + y1) / 2 - crop[1]) * scale
    at = (round(CANVAS / 2 - centre[0]), round(CANVAS / 2 - centre[1]))
    return _paste(pixels[crop[1]:crop[3], crop[0]:crop[2]], scale, crop[:2], at, notes, (width, height))


def ink_box(pixels: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1), ends exclusive, of the pixels brighter than half the peak (the edges of
    antialiased strokes are not ink); None for an image without contrast."""
    peak = int(pixels.max())
    if peak < MIN_CONTRAST:
        return None
    ink = pixels > peak // 2
    cols, rows = np.flatnonzero(ink.any(axis=0)), np.flatnonzero(ink.any(axis=1))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _fit_whole(pixels: np.ndarray, notes: list[str]) -> Prepared:
    height, width = pixels.shape
    scale = min(1.0, CANVAS / max(width, height))
    if scale < 1:
        notes.append(f"{width}x{height}, resized to fit {CANVAS}x{CANVAS}")
    elif (width, height) != (CANVAS, CANVAS):
        notes.append(f"{width}x{height}, padded to {CANVAS}x{CANVAS}")
    size = (round(width * scale), round(height * scale))
    return _paste(pixels, scale, (0, 0), ((CANVAS - size[0]) // 2, (CANVAS - size[1]) // 2), notes)


def _paste(pixels: np.ndarray, scale: float, origin: tuple[int, int], at: tuple[int, int], notes: list[str],
           size: tuple[int, int] | None = None) -> Prepared:
    """`pixels` (whose top left is `origin` in the image) scaled by `scale` and pasted at `at` on a black canvas."""
    image = Image.fromarray(pixels)
    if scale != 1.0:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.LANCZOS)
    canvas = Image.new("L", (CANVAS, CANVAS))
    canvas.paste(image, at)  # PIL clips what falls outside the canvas
    size = size or (pixels.shape[1], pixels.shape[0])
    offset = (origin[0] - at[0] / scale, origin[1] - at[1] / scale)
    return Prepared(np.asarray(canvas, dtype=np.uint8), notes, size, 1 / scale, offset)


def canvas_from_values(values: np.ndarray) -> Prepared:
    """A canvas sent as numbers in [0, 1] (the exported model's input range), for serving's JSON batches."""
    return Prepared(np.round(values * 255).astype(np.uint8))


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def answer(prepared: Prepared, logits: np.ndarray, box: np.ndarray) -> dict:
    """One prediction as `raylocal predict` prints it and `raylocal serve` returns it.

    box: normalized to the image's width and height; box_pixels: in the image's pixels (for a
    canvas, the canvas's); canvas_box: the model's own box, normalized to the canvas it saw.
    """
    probabilities = softmax(np.asarray(logits, dtype=np.float64))
    label = int(probabilities.argmax())
    width, height = prepared.size
    corners = np.asarray(box, dtype=np.float64) * CANVAS * prepared.to_image_scale
    corners += np.tile(prepared.to_image_offset, 2)
    corners = np.clip(corners, 0, [width, height, width, height])
    names = ("xmin", "ymin", "xmax", "ymax")
    return {
        "label": label, "confidence": round(float(probabilities[label]), 6),
        "box": dict(zip(names, (round(v, 6) for v in (corners / [width, height, width, height]).tolist()))),
        "box_pixels": [round(v, 2) for v in corners.tolist()],
        "canvas_box": dict(zip(names, (round(float(v), 6) for v in box))),
        "preprocessing": prepared.notes,
    }
