"""Drawing helpers: canvases with true and predicted boxes, captions, and contact sheets.

Used by `raylocal.evaluate` and `raylocal.predict`. The font is loaded on first use, not when
the module is imported.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import draw_bounding_boxes

from raylocal.synthesis import CANVAS

SCALE = 3  # upscaling of drawn canvases, so captions and 2 px box outlines stay readable
BOX_WIDTH = 2
CAPTION_HEIGHT = 36
PAD = 4
COLUMNS, ROWS = 8, 4
TRUE_COLOR, PRED_COLOR = "lime", "red"


@functools.cache
def font() -> ImageFont.ImageFont:
    return ImageFont.load_default(size=13)


def draw_tile(
    canvas: np.ndarray, boxes: Sequence[tuple[Sequence[float], str]], caption: Sequence[str], color: str
) -> Image.Image:
    """A uint8 canvas upscaled SCALE times with (normalized box, colour) outlines, in order, above a caption."""
    side = CANVAS * SCALE
    big = np.repeat(np.repeat(canvas, SCALE, axis=0), SCALE, axis=1)
    pixels = torch.tensor([list(box) for box, _ in boxes], dtype=torch.float32) * side
    drawn = draw_bounding_boxes(torch.from_numpy(np.stack([big] * 3)), pixels.round(),
                                colors=[c for _, c in boxes], width=BOX_WIDTH)
    tile = Image.new("RGB", (side, side + CAPTION_HEIGHT))
    tile.paste(Image.fromarray(drawn.permute(1, 2, 0).numpy()))
    ImageDraw.Draw(tile).multiline_text((4, side + 3), "\n".join(caption), fill=color, font=font())
    return tile


def grid(tiles: Sequence[Image.Image]) -> Image.Image:
    width, height = tiles[0].size
    columns, rows = min(COLUMNS, len(tiles)), -(-len(tiles) // COLUMNS)
    sheet = Image.new("RGB", (columns * (width + PAD) + PAD, rows * (height + PAD) + PAD), "dimgray")
    for index, tile in enumerate(tiles):
        sheet.paste(tile, (PAD + index % COLUMNS * (width + PAD), PAD + index // COLUMNS * (height + PAD)))
    return sheet
