from __future__ import annotations

import numpy as np
import pytest
import torch

from raylocal.config import ConfigError, ModelConfig
from raylocal.metrics import localization_loss
from raylocal.model import NUM_CLASSES, SHIFTS, Localizer, ShiftAveraged, block_widths, build_model, for_inference
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


@pytest.mark.parametrize("box_head", ["softargmax", "flatten"])
@pytest.mark.parametrize("width", [1, 6])
@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
def test_output_shapes_for_every_depth(depth, width, box_head):
    logits, boxes = tiny_model(depth=depth, width=width, box_head=box_head).eval()(canvases(3))
    assert logits.shape == (3, NUM_CLASSES) and logits.dtype == torch.float32
    assert boxes.shape == (3, 4) and boxes.dtype == torch.float32
    assert_well_formed(boxes)


def test_boxes_are_clamped_to_the_canvas_when_the_head_saturates():
    model = tiny_model(box_head="flatten").eval()
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


class OneHot(torch.nn.Module):
    """A heatmap that puts all its weight on one cell, in place of the learned one."""

    def __init__(self, row: int, column: int) -> None:
        super().__init__()
        self.row, self.column = row, column

    def forward(self, early: torch.Tensor) -> torch.Tensor:
        heat = torch.zeros(early.shape[0], 1, *early.shape[2:])
        heat[:, :, self.row, self.column] = 100.0
        return heat


@pytest.mark.parametrize(("row", "column"), [(0, 0), (3, 11), (17, 17)])
def test_the_softargmax_centre_is_the_heatmap_cell_in_canvas_coordinates(row, column):
    # Depth 4: the heatmap is the second block's 18x18 output, cells of 4x4 canvas pixels.
    model = tiny_model(depth=4).eval()
    model.heatmap = OneHot(row, column)
    with torch.no_grad():
        model.box_head.weight.zero_()
        model.box_head.bias.zero_()  # no correction; size sigmoid(0) = half the canvas
        _, boxes = model(canvases(2))
    x, y = (4 * column + 2) / CANVAS, (4 * row + 2) / CANVAS
    expected = torch.tensor([x - 0.25, y - 0.25, x + 0.25, y + 0.25]).clamp(0, 1)
    torch.testing.assert_close(boxes, expected.repeat(2, 1))


def test_a_uniform_heatmap_puts_the_centre_at_the_middle_of_the_cells():
    model = tiny_model(depth=3).eval()
    with torch.no_grad():
        model.heatmap.weight.zero_()
        model.box_head.weight.zero_()
        model.box_head.bias.zero_()
        _, boxes = model(canvases(3))
    middle = (18 * 4 / 2) / CANVAS  # floor pooling leaves 72 of the 75 pixels in cells
    torch.testing.assert_close((boxes[:, :2] + boxes[:, 2:]) / 2, torch.full((3, 2), middle))


def test_the_flatten_head_has_no_heatmap_and_reads_the_whole_trunk():
    model = tiny_model(depth=4, box_head="flatten")
    assert not hasattr(model, "heatmap") and model.split == 4


def test_a_configuration_saved_before_box_head_reads_as_the_flatten_head():
    saved = {key: value for key, value in ModelConfig(depth=3).to_dict().items() if key != "box_head"}
    assert ModelConfig.from_saved(saved) == ModelConfig(depth=3, box_head="flatten")
    assert ModelConfig.from_saved(saved | {"box_head": "softargmax"}).box_head == "softargmax"


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
    [{"depth": 0}, {"depth": 6}, {"width": 0}, {"width": 257}, {"head_width": 3}, {"dropout": 1.0}, {"dropout": -0.1},
     {"box_head": "global_pool"}],
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


def test_a_checkpoint_from_before_box_head_loads_as_the_model_it_trained(tmp_path):
    from dataclasses import asdict

    from ray.train import Checkpoint

    from raylocal.publish import load_model
    from raylocal.config import Hyperparameters
    from raylocal.trial import CHECKPOINT_FILE

    params = Hyperparameters(depth=2, width=4, head_width=16, box_head="flatten")
    old = tiny_model(box_head="flatten")
    saved = {key: value for key, value in asdict(params).items() if key != "box_head"}
    torch.save({"model": old.state_dict(), "epoch": 1.0, "hyperparameters": saved}, tmp_path / CHECKPOINT_FILE)
    model, loaded, epoch = load_model(Checkpoint.from_directory(tmp_path))
    assert loaded == params and epoch == 1.0 and not hasattr(model, "heatmap")
    with torch.no_grad():
        torch.testing.assert_close(model(canvases(2)), old.eval()(canvases(2)))


class InkBox(torch.nn.Module):
    """Knows where the ink is, exactly: the box of the pixels above 0, and the column of the
    leftmost ink as its 'digit' (so the logits move with a shift, as a real network's may)."""

    config = None

    def forward(self, images):
        ink = images[:, 0] > 0
        columns, rows = ink.any(dim=1).float(), ink.any(dim=2).float()
        index = torch.arange(CANVAS, dtype=torch.float32)
        first = lambda seen: (seen * (CANVAS - index)).argmax(dim=1).float()
        last = lambda seen: (seen * (index + 1)).argmax(dim=1).float()
        boxes = torch.stack([first(columns), first(rows), last(columns) + 1, last(rows) + 1], dim=1) / CANVAS
        logits = torch.nn.functional.one_hot(first(columns).long() % NUM_CLASSES, NUM_CLASSES).float() * 5
        return logits, boxes


def one_digit(x: int, y: int) -> torch.Tensor:
    images = torch.zeros(1, 1, CANVAS, CANVAS)
    images[0, 0, y : y + DIGIT, x : x + DIGIT] = torch.rand(DIGIT, DIGIT, generator=torch.Generator().manual_seed(0)) + 0.1
    return images


@pytest.mark.parametrize("dx, dy", SHIFTS)
def test_a_view_moves_the_canvas_by_its_shift_and_fills_with_black(dx, dy):
    images = canvases(2)
    moved = ShiftAveraged(tiny_model()).moved(images, dx, dy)
    assert moved.shape == images.shape
    torch.testing.assert_close(moved, torch.roll(images, shifts=(dy, dx), dims=(2, 3)) * (moved != 0))
    assert int((moved == 0).sum()) == 2 * CANVAS * (abs(dx) + abs(dy))


@pytest.mark.parametrize("x, y", [(10, 20), (0, 0), (CANVAS - DIGIT, CANVAS - DIGIT)])
def test_each_view_s_box_is_moved_back_by_its_shift(x, y):
    images = one_digit(x, y)
    _, boxes = ShiftAveraged(InkBox())(images)
    # Where no ink is pushed off the canvas, every view finds the same box once moved back.
    expected = torch.tensor([[x, y, x + DIGIT, y + DIGIT]], dtype=torch.float32) / CANVAS
    if 0 < x < CANVAS - DIGIT:
        torch.testing.assert_close(boxes, expected)
    else:
        assert (boxes - expected).abs().max() < 1 / CANVAS


@pytest.mark.parametrize("shift", SHIFTS[1:])
def test_a_single_moved_view_gives_the_box_where_the_digit_is(shift):
    # One view alone: the moved-back box must be exact, which a symmetric set's average would hide.
    images = one_digit(20, 30)
    _, boxes = ShiftAveraged(InkBox(), (shift,))(images)
    torch.testing.assert_close(boxes, torch.tensor([[20, 30, 20 + DIGIT, 30 + DIGIT]], dtype=torch.float32) / CANVAS)


def test_the_digit_probabilities_are_the_mean_over_the_views():
    model = tiny_model().eval()
    images = canvases(3)
    averaged = ShiftAveraged(model)
    with torch.no_grad():
        logits, _ = averaged(images)
        views = [model(averaged.moved(images, dx, dy))[0].softmax(dim=1) for dx, dy in SHIFTS]
    torch.testing.assert_close(logits.softmax(dim=1), torch.stack(views).mean(dim=0))
    torch.testing.assert_close(logits.exp().sum(dim=1), torch.ones(3))


def test_one_view_is_the_network_itself_and_five_views_average():
    model = tiny_model()
    assert for_inference(model, 1) is model
    averaged = for_inference(model, 5)
    assert isinstance(averaged, ShiftAveraged) and averaged.shifts == SHIFTS and averaged.config == model.config
    for views in (0, len(SHIFTS) + 1):
        with pytest.raises(ValueError, match="views"):
            for_inference(model, views)


def test_certain_answers_give_finite_log_probabilities():
    model = tiny_model().eval()
    with torch.no_grad():
        model.classifier.bias.copy_(torch.arange(NUM_CLASSES) * 1000.0)
        logits, boxes = ShiftAveraged(model)(canvases(2))
    assert torch.isfinite(logits).all()
    assert logits.argmax(dim=1).tolist() == [NUM_CLASSES - 1] * 2
    assert_well_formed(boxes)
