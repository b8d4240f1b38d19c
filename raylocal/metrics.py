"""Evaluation stage: losses and localization metrics.

IoU is counted the way detection counts it: a box whose digit is misclassified scores 0.
Plain mean IoU alone rewards a model that ignores the class, so it is only reported beside.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torchvision.ops import box_area, generalized_box_iou_loss

from raylocal.config import BOX_LOSSES
from raylocal.synthesis import CANVAS

# Sums accumulated over batches (and workers); every metric is a ratio of two of them.
SUM_NAMES = ("count", "loss", "correct", "iou", "det_iou", "iou50", "iou60", "iou75", "det50")
READABLE = {"correct": "accuracy", "iou": "mean_iou"}


def elementwise_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # torchvision ships only the pairwise matrix (`box_iou`); its diagonal would cost N^2
    # memory for the tens of thousands of boxes of one report's training steps.
    top_left = torch.maximum(pred[:, :2], target[:, :2])
    bottom_right = torch.minimum(pred[:, 2:], target[:, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=1)
    return inter / (box_area(pred) + box_area(target) - inter)


def box_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "smooth_l1":
        # In pixels, so that beta=1 separates sub-pixel from gross errors.
        return F.smooth_l1_loss(pred * CANVAS, target * CANVAS, beta=1.0)
    if kind == "giou":
        return generalized_box_iou_loss(pred, target, reduction="mean")
    raise ValueError(f"box_loss must be one of {BOX_LOSSES}, got {kind!r}")


def localization_loss(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    target_boxes: torch.Tensor,
    box_loss_weight: float,
    box_loss_kind: str = "smooth_l1",
) -> torch.Tensor:
    return F.cross_entropy(logits, labels) + box_loss_weight * box_loss(boxes, target_boxes, box_loss_kind)


@torch.no_grad()
def batch_sums(loss: torch.Tensor, logits: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, target_boxes: torch.Tensor) -> torch.Tensor:
    """The SUM_NAMES of one batch as a float64 vector, ready to be added across batches and workers."""
    correct = (logits.argmax(dim=1) == labels).double()
    iou = elementwise_iou(boxes.float(), target_boxes.float()).double()
    count = float(len(labels))
    return torch.stack(
        [
            torch.tensor(count, dtype=torch.float64, device=logits.device),
            loss.double() * count,
            correct.sum(),
            iou.sum(),
            (iou * correct).sum(),
            (iou >= 0.5).double().sum(),
            (iou >= 0.6).double().sum(),
            (iou >= 0.75).double().sum(),
            ((iou >= 0.5).double() * correct).sum(),
        ]
    )


@torch.no_grad()
def score_batches(
    forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    images: torch.Tensor,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int,
    loss: Callable[..., torch.Tensor] | None = None,
    keep_outputs: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The one scoring loop, for a model in training (`engine.evaluate`) and for an exported
    program (`raylocal.evaluate`): metric sums over uint8 `images` in batches, where `forward`
    maps a batch of images to float (logits, boxes) and `loss(logits, boxes, labels, target)`,
    if given, fills the loss slot. With `keep_outputs`, also per canvas: predicted label,
    confidence, box and IoU."""
    sums = torch.zeros(len(SUM_NAMES), dtype=torch.float64, device=images.device)
    parts = []
    for start in range(0, len(labels), batch_size):
        rows = slice(start, start + batch_size)
        logits, pred_boxes = forward(images[rows])
        value = loss(logits, pred_boxes, labels[rows], boxes[rows]) if loss else torch.zeros((), device=images.device)
        sums += batch_sums(value, logits, pred_boxes, labels[rows], boxes[rows])
        if keep_outputs:
            confidence, predicted = logits.softmax(dim=1).max(dim=1)
            parts.append((predicted, confidence, pred_boxes, elementwise_iou(pred_boxes, boxes[rows])))
    outputs = {key: torch.cat(column) for key, column in zip(("label", "confidence", "box", "iou"), zip(*parts))}
    return sums, outputs


def summarize(sums: torch.Tensor, prefix: str) -> dict[str, float]:
    values = dict(zip(SUM_NAMES, sums.tolist()))
    count = max(values.pop("count"), 1.0)
    return {f"{prefix}_{READABLE.get(key, key)}": value / count for key, value in values.items()}
