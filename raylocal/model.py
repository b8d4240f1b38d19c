"""Model stage: one convolutional trunk, two heads (digit logits, normalized box).

The box head (`box_head`): by default the box's centre is the expected position under a heatmap
the second block predicts (a spatial soft-argmax, as in keypoint regression), moved by a
correction from the dense head, which also predicts the size; `"flatten"` regresses all four
numbers from the flattened trunk, as every model before it did.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from raylocal.config import SHIFTS, ModelConfig
from raylocal.synthesis import CANVAS

NUM_CLASSES = 10
# The heatmap comes from this block's output: 18x18 cells of 4 px at the default depth; the first
# block's finer heatmap placed boxes no better (docs/decisions.md#box-head).
HEATMAP_BLOCK = 2


def block_widths(config: ModelConfig) -> list[int]:
    # Doubling per block, capped, keeps the cost of each block roughly equal.
    return [min(config.width * 2**i, config.width * 8) for i in range(config.depth)]


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    # Pool straight after the convolution: batch norm and ReLU then touch a quarter of the
    # values, and on a CPU they are memory-bound (docs/decisions.md#pool-before-batch-norm).
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.MaxPool2d(2),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class Localizer(nn.Module):
    """Returns (logits [N,10], boxes [N,4]) for float32 canvases [N,1,75,75] in [0,1].

    Boxes are normalized (xmin, ymin, xmax, ymax). The head predicts a centre (from the
    heatmap, or through a sigmoid) and a size through a sigmoid, so every box is well formed
    (xmin <= xmax), which GIoU needs; the corners are clamped to the canvas.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        widths = block_widths(config)
        blocks, channels = [], 1
        for width in widths:
            blocks.append(conv_block(channels, width))
            channels = width
        self.trunk = nn.Sequential(*blocks)
        side = CANVAS
        for _ in widths:
            side //= 2
        # Flatten, not global pooling: the box head needs to know where the ink is.
        self.neck = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * side * side, config.head_width),
            nn.ReLU(inplace=True),
            nn.Dropout(config.dropout),
        )
        # The classifier also sees the trunk's global max: what the digit is does not depend on
        # where it is, and without this the digit head learns every position separately, so ASHA's
        # first cut would rank trials by chance (docs/decisions.md#digit-head-global-max).
        self.classifier = nn.Linear(config.head_width + channels, NUM_CLASSES)
        self.box_head = nn.Linear(config.head_width, 4)
        self.split = min(HEATMAP_BLOCK, config.depth) if config.box_head == "softargmax" else config.depth
        if config.box_head == "softargmax":
            self.heatmap = nn.Conv2d(widths[self.split - 1], 1, 1)
            # The centre of each heatmap cell in normalized canvas coordinates (floor pooling
            # drops the canvas's last pixels, so the cells do not reach 1).
            cell = 2**self.split
            side = CANVAS // cell
            self.register_buffer("cell_centres", (torch.arange(side) * cell + cell / 2) / CANVAS, persistent=False)

    def centre(self, early: torch.Tensor) -> torch.Tensor:
        """[N,2] (x, y): the expected cell centre under the softmax of the heatmap over all cells."""
        heat = self.heatmap(early).flatten(1).softmax(dim=1).unflatten(1, early.shape[2:])
        x = (heat.sum(dim=1) * self.cell_centres).sum(dim=1)
        y = (heat.sum(dim=2) * self.cell_centres).sum(dim=1)
        return torch.stack([x, y], dim=1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        early = self.trunk[: self.split](images)
        trunk = self.trunk[self.split :](early)
        features = self.neck(trunk)
        head = self.box_head(features)
        if self.config.box_head == "softargmax":
            # The correction moves the centre on the logit scale, so that it stays on the canvas:
            # added straight to it, one large step could push a box off the canvas, where the
            # clamp below passes no gradient and the box head never recovers.
            centre = torch.sigmoid(torch.logit(self.centre(early)) + head[:, :2])
            size = torch.sigmoid(head[:, 2:])
        else:
            centre_size = torch.sigmoid(head)
            centre, size = centre_size[:, :2], centre_size[:, 2:]
        boxes = torch.cat([centre - size / 2, centre + size / 2], dim=1).clamp(0.0, 1.0)
        logits = self.classifier(torch.cat([features, trunk.amax(dim=(2, 3))], dim=1))
        return logits, boxes


class ShiftAveraged(nn.Module):
    """A Localizer's answer averaged over copies of the canvas moved by whole pixels (`shifts`,
    (dx, dy) each; what moves in is black): the digit's probabilities averaged, returned as their
    logarithm, so softmax and argmax read them as they read logits; each box moved back by its
    shift, then averaged. Same inputs and outputs as the Localizer, `len(shifts)` times the work.
    A box the network clamped at the canvas's edge in a view that moved it off comes back up to a
    pixel inside, which the average dilutes (1/5 pixel at most with 5 views)."""

    def __init__(self, model: Localizer, shifts: tuple[tuple[int, int], ...] = SHIFTS):
        super().__init__()
        self.model = model
        self.config = model.config
        self.shifts = tuple(shifts)
        self.margin = max(abs(step) for shift in self.shifts for step in shift)
        moves = torch.tensor([[dx, dy, dx, dy] for dx, dy in self.shifts], dtype=torch.float32) / CANVAS
        self.register_buffer("moves", moves, persistent=False)

    def moved(self, images: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
        m = self.margin
        height, width = images.shape[2:]
        return F.pad(images, (m, m, m, m))[:, :, m - dy : m - dy + height, m - dx : m - dx + width]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_probs, boxes = [], []
        # Made on the CPU with the wrapper; the network may have moved to a GPU since.
        moves = self.moves.to(images.device)
        # One view at a time: the memory of a single forward, for the same work.
        for (dx, dy), move in zip(self.shifts, moves):
            logits, box = self.model(self.moved(images, dx, dy))
            log_probs.append(logits.float().log_softmax(dim=1))
            boxes.append(box.float() - move)
        # log(mean of probabilities), without the -inf a probability rounded to 0 would give.
        log_mean = torch.stack(log_probs).logsumexp(dim=0) - math.log(len(self.shifts))
        return log_mean, torch.stack(boxes).mean(dim=0).clamp(0.0, 1.0)


def build_model(config: ModelConfig) -> Localizer:
    return Localizer(config)


def for_inference(model: Localizer, views: int) -> nn.Module:
    """What is scored on the test split and exported: the model itself (`views` 1), or
    `ShiftAveraged` over the first `views` of SHIFTS."""
    if views == 1:
        return model
    if not 1 < views <= len(SHIFTS):
        raise ValueError(f"views must be 1 to {len(SHIFTS)}, got {views}")
    return ShiftAveraged(model, SHIFTS[:views])
