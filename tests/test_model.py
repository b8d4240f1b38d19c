from __future__ import annotations

import numpy as np
import pytest
import torch

from raylocal.config import ConfigError, ModelConfig
from raylocal.metrics import localization_loss
from raylocal.model import NUM_CLASSES, Localizer, block_widths, build_model
from raylocal.synthesis import CANVAS, DIGIT, synthesize


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    # Tiny convolutions run slower when two intra-op threads contend for a busy 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def canvases(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 1, CANVAS, CANVAS, generator=torch.Generator().manual_seed(seed))


def tiny_model(**overrides) -> Localizer:
    torch.manual_seed(0)
    return build_model(ModelConfig(**({"depth": 2, "width": 4, "head_width": 16, "dropout": 0.0} | overrides)))


def assert_well_formed(boxes: torch.Tensor) -> None:
    assert boxes.min() >= 0.0 and boxes.max() <= 1.0
    assert torch.all(boxes[:, 0] <= boxes[:, 2]) and torch.all(boxes[:, 1] <= boxes[:, 3])


@pytest.mark.parametrize("width", [1, 6])
@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
def test_output_shapes_for_every_depth(depth, width):
    logits, boxes = tiny_model(depth=depth, width=width).eval()(canvases(3))
    assert logits.shape == (3, NUM_CLASSES) and logits.dtype == torch.float32
    assert boxes.shape == (3, 4) and boxes.dtype == torch.float32
    assert_well_formed(boxes)


def test_boxes_are_clamped_to_the_canvas_when_the_head_saturates():
    model = tiny_model().eval()
    with torch.no_grad():
        model.box_head.weight.zero_()
        model.box_head.bias.copy_(torch.tensor([-50.0, 50.0, 50.0, 50.0]))
        _, boxes = model(canvases(3, seed=1))
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 0.5, 0.5, 1.0]]).repeat(3, 1))


def test_boxes_stay_well_formed_for_extreme_head_weights():
    model = tiny_model().eval()
    with torch.no_grad():
        model.box_head.weight.mul_(1e4)
        _, boxes = model(canvases(8, seed=1))
    assert_well_formed(boxes)


@pytest.mark.parametrize(
    ("depth", "width", "expected"),
    [
        (1, 16, [16]),
        (4, 8, [8, 16, 32, 64]),
        (5, 16, [16, 32, 64, 128, 128]),
        (5, 3, [3, 6, 12, 24, 24]),
    ],
)
def test_block_widths_double_then_cap_at_eight_times(depth, width, expected):
    assert block_widths(ModelConfig(depth=depth, width=width)) == expected


def test_conv_channels_follow_block_widths():
    model = tiny_model(depth=4, width=3)
    convs = [m for m in model.trunk.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == block_widths(model.config)
    assert convs[0].in_channels == 1


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_batch_of_one(mode):
    model = tiny_model(depth=5)
    model.train(mode == "train")
    logits, boxes = model(canvases(1))
    assert logits.shape == (1, NUM_CLASSES) and boxes.shape == (1, 4)


def test_eval_mode_is_deterministic_and_batch_independent():
    model = tiny_model(dropout=0.5).eval()
    images = canvases(4)
    with torch.no_grad():
        logits, boxes = model(images)
        single_logits, single_boxes = model(images[2:3])
    torch.testing.assert_close(single_logits, logits[2:3])
    torch.testing.assert_close(single_boxes, boxes[2:3])


@pytest.mark.parametrize(
    "overrides",
    [{"depth": 0}, {"depth": 6}, {"width": 0}, {"width": 257}, {"head_width": 3}, {"dropout": 1.0}, {"dropout": -0.1}],
    ids=lambda overrides: "-".join(f"{k}={v}" for k, v in overrides.items()),
)
def test_invalid_model_config_raises(overrides):
    name = next(iter(overrides))
    with pytest.raises(ConfigError, match=name):
        ModelConfig(**overrides)


def test_a_few_sgd_steps_on_a_fixed_batch_reduce_the_loss():
    rng = np.random.default_rng(0)
    digits = np.zeros((8, DIGIT, DIGIT), dtype=np.uint8)
    for digit, label in zip(digits, range(8)):
        digit[4 + label : 10 + 2 * label, 6:22] = 255
    images, boxes = synthesize(digits, rng)
    images = torch.from_numpy(images).float().div(255).unsqueeze(1)
    target_boxes, labels = torch.from_numpy(boxes), torch.arange(8)

    model = tiny_model(depth=3, width=4, head_width=32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(15):
        loss = localization_loss(*model(images), labels, target_boxes, 0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
