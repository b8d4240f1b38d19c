from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou

from raylocal.metrics import SUM_NAMES, batch_sums, elementwise_iou, localization_loss, summarize
from raylocal.synthesis import CANVAS

BOX_LOSSES = ["smooth_l1", "giou"]


def random_boxes(count: int, generator: torch.Generator) -> torch.Tensor:
    corners = torch.rand(count, 2, 2, generator=generator)
    low, high = corners.min(dim=1).values, corners.max(dim=1).values + 0.05
    return torch.cat([low, high.clamp(max=1.0)], dim=1)


def random_batch(count: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(count, 10, generator=generator)
    labels = torch.randint(0, 10, (count,), generator=generator)
    return logits, random_boxes(count, generator), labels, random_boxes(count, generator)


@pytest.mark.parametrize(
    ("pred", "target", "expected"),
    [
        ([0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.5], 1.0),
        ([0.0, 0.0, 0.25, 0.25], [0.5, 0.5, 0.75, 0.75], 0.0),
        ([0.0, 0.0, 0.5, 0.5], [0.5, 0.0, 1.0, 0.5], 0.0),
        ([0.0, 0.0, 0.5, 0.5], [0.25, 0.0, 0.75, 0.5], 1 / 3),
        ([0.25, 0.25, 0.75, 0.75], [0.0, 0.0, 1.0, 1.0], 0.25),
        ([0.0, 0.0, 1.0, 1.0], [0.25, 0.25, 0.75, 0.75], 0.25),
    ],
    ids=["identical", "disjoint", "touching", "half-overlap", "pred-inside-target", "target-inside-pred"],
)
def test_elementwise_iou_hand_computed(pred, target, expected):
    iou = elementwise_iou(torch.tensor([pred]), torch.tensor([target]))
    assert iou.shape == (1,)
    assert iou.item() == pytest.approx(expected, abs=1e-6)


def test_elementwise_iou_pairs_rows_not_all_combinations():
    pred = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]])
    iou = elementwise_iou(pred, pred.flip(0))
    torch.testing.assert_close(iou, torch.zeros(2))
    torch.testing.assert_close(elementwise_iou(pred, pred), torch.ones(2))


def four_samples_one_misclassified() -> tuple[torch.Tensor, ...]:
    labels = torch.tensor([0, 1, 2, 3])
    predicted = torch.tensor([0, 1, 7, 3])
    logits = F.one_hot(predicted, 10).float() * 5.0
    target = torch.tensor([[0.0, 0.0, 0.5, 0.5]]).repeat(4, 1)
    boxes = torch.tensor(
        [
            [0.0, 0.0, 0.5, 0.5],  # IoU 1
            [0.25, 0.0, 0.75, 0.5],  # IoU 1/3
            [0.0, 0.0, 0.35, 0.5],  # IoU 0.7, but the digit is misclassified
            [0.0, 0.0, 0.5, 0.275],  # IoU 0.55
        ]
    )
    return logits, boxes, labels, target


def test_summarize_counts_misclassified_samples_as_zero_detection_iou():
    logits, boxes, labels, target = four_samples_one_misclassified()
    summary = summarize(batch_sums(torch.tensor(2.0), logits, boxes, labels, target), "val")
    ious = [1.0, 1 / 3, 0.7, 0.55]
    assert summary == pytest.approx(
        {
            "val_loss": 2.0,
            "val_accuracy": 0.75,
            "val_mean_iou": sum(ious) / 4,
            "val_det_iou": (ious[0] + ious[1] + ious[3]) / 4,
            "val_iou50": 3 / 4,
            "val_iou60": 2 / 4,
            "val_iou75": 1 / 4,
            "val_det50": 2 / 4,
        },
        abs=1e-6,
    )


def test_batch_sums_is_a_float64_vector_of_sum_names():
    logits, boxes, labels, target = four_samples_one_misclassified()
    sums = batch_sums(torch.tensor(2.0), logits, boxes, labels, target)
    assert sums.dtype == torch.float64 and sums.shape == (len(SUM_NAMES),)
    assert dict(zip(SUM_NAMES, sums.tolist()))["count"] == 4
    assert dict(zip(SUM_NAMES, sums.tolist()))["loss"] == pytest.approx(8.0)


@pytest.mark.parametrize("kind", BOX_LOSSES)
def test_batch_sums_of_halves_add_up_to_the_whole_batch(kind):
    logits, boxes, labels, target = random_batch(10)

    def sums(part: slice) -> torch.Tensor:
        loss = localization_loss(logits[part], boxes[part], labels[part], target[part], 0.5, kind)
        return batch_sums(loss, logits[part], boxes[part], labels[part], target[part])

    halves = sums(slice(0, 3)) + sums(slice(3, None))
    torch.testing.assert_close(halves, sums(slice(None)))
    assert summarize(halves, "train") == pytest.approx(summarize(sums(slice(None)), "train"))


def test_summarize_of_no_samples_is_zero_not_nan():
    summary = summarize(torch.zeros(len(SUM_NAMES), dtype=torch.float64), "test")
    assert len(summary) == len(SUM_NAMES) - 1
    assert all(key.startswith("test_") and value == 0.0 for key, value in summary.items())


def reference_box_loss(boxes: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "smooth_l1":
        return F.smooth_l1_loss(boxes * CANVAS, target * CANVAS, beta=1.0)
    return (1 - generalized_box_iou(boxes, target).diagonal()).mean()


@pytest.mark.parametrize("weight", [0.0, 0.1, 3.0])
@pytest.mark.parametrize("kind", BOX_LOSSES)
def test_localization_loss_is_cross_entropy_plus_weighted_box_loss(kind, weight):
    logits, boxes, labels, target = random_batch(6, seed=1)
    expected = F.cross_entropy(logits, labels) + weight * reference_box_loss(boxes, target, kind)
    torch.testing.assert_close(localization_loss(logits, boxes, labels, target, weight, kind), expected)


def test_localization_loss_defaults_to_smooth_l1():
    logits, boxes, labels, target = random_batch(6, seed=2)
    torch.testing.assert_close(
        localization_loss(logits, boxes, labels, target, 1.0),
        localization_loss(logits, boxes, labels, target, 1.0, "smooth_l1"),
    )


def test_smooth_l1_box_loss_is_measured_in_pixels():
    logits, _, labels, target = random_batch(4, seed=3)
    off_by_three_pixels = target + 3 / CANVAS
    loss = localization_loss(logits, off_by_three_pixels, labels, target, 1.0, "smooth_l1")
    assert (loss - F.cross_entropy(logits, labels)).item() == pytest.approx(2.5, abs=1e-4)


@pytest.mark.parametrize("kind", BOX_LOSSES)
def test_perfect_boxes_add_no_box_loss(kind):
    logits, _, labels, target = random_batch(6, seed=4)
    loss = localization_loss(logits, target.clone(), labels, target, 10.0, kind)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, labels).item(), abs=1e-4)


def test_unknown_box_loss_raises():
    logits, boxes, labels, target = random_batch(2)
    with pytest.raises(ValueError, match="'l2'"):
        localization_loss(logits, boxes, labels, target, 1.0, "l2")


@pytest.mark.parametrize("kind", BOX_LOSSES)
def test_gradients_reach_boxes_and_logits(kind):
    logits, boxes, labels, target = random_batch(6, seed=5)
    logits.requires_grad_(True)
    boxes.requires_grad_(True)
    localization_loss(logits, boxes, labels, target, 0.5, kind).backward()
    for tensor in (logits, boxes):
        assert torch.isfinite(tensor.grad).all()
        assert tensor.grad.abs().sum() > 0
