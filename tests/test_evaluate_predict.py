"""The evaluate and predict commands, run in-process on a tiny export and the tiny MNIST fixture."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import tiny_digits
from PIL import Image
from torchvision.ops import box_iou

from raylocal import drawing, evaluate, predict, preprocess
from raylocal.config import DataSettings, ModelConfig
from raylocal.export import export_model, load_program
from raylocal.mnist import load_mnist
from raylocal.model import build_model
from raylocal.preprocess import INK, ink_box
from raylocal.synthesis import CANVAS, paste, split_plan, synthesize_shard

CARD = {"data": {"seed": 0}, "search": {"settings": {"data": {"shard_size": 100, "tight_boxes": False}}}}
BOX_KEYS = ("xmin", "ymin", "xmax", "ymax")
METRICS = ("accuracy", "mean_iou", "det_iou", "iou50", "iou60", "iou75", "det50")
TILE = CANVAS * drawing.SCALE
KEYS = {"image", "label", "confidence", "box", "box_pixels", "canvas_box", "preprocessing"}


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_model(ModelConfig(depth=2, width=4, head_width=16))
    return export_model(model, tmp_path_factory.mktemp("export") / "best_model", CARD, log=lambda line: None)


@pytest.fixture(scope="module")
def evaluated(export_dir, tiny_mnist_dir, tmp_path_factory) -> SimpleNamespace:
    outs = [tmp_path_factory.mktemp(f"eval{run}") for run in range(2)]
    for out in outs:
        flags = ["--data-dir", str(tiny_mnist_dir), "--unverified-data", "--out", str(out), "--batch-size", "64"]
        assert evaluate.cli([str(export_dir), *flags]) == 0
    return SimpleNamespace(out=outs[0], results=[json.loads((out / "metrics.json").read_text()) for out in outs])


@pytest.fixture(scope="module")
def recomputed(export_dir, tiny_mnist_dir) -> SimpleNamespace:
    """The test split built as the search's data workers build it (shards of 100, seed 0) and the program's outputs on it."""
    mnist = load_mnist(tiny_mnist_dir, verify=False, log=lambda line: None)
    plan = split_plan(len(mnist.train_images), len(mnist.test_images))
    shards = [
        synthesize_shard(mnist.test_images, mnist.test_labels, plan, seed=0, split="test", epoch=0,
                         shard=shard, shard_size=100)
        for shard in range(2)
    ]
    split = {key: np.concatenate([shard[key] for shard in shards]) for key in ("image", "box", "label")}
    with torch.no_grad():
        logits, boxes = load_program(export_dir)(torch.from_numpy(split["image"]).unsqueeze(1).float() / 255)
    return SimpleNamespace(split=split, logits=logits, boxes=boxes)


def test_metrics_are_ratios_equal_to_a_direct_recomputation(evaluated, recomputed):
    result = evaluated.results[0]
    metrics = {key.removeprefix("test_"): value for key, value in result["metrics"].items()}
    assert set(metrics) == set(METRICS)
    assert all(0.0 <= value <= 1.0 for value in metrics.values())
    labels, target = torch.from_numpy(recomputed.split["label"]), torch.from_numpy(recomputed.split["box"])
    correct = (recomputed.logits.argmax(dim=1) == labels).double()
    iou = box_iou(recomputed.boxes, target).diagonal().double()
    expected = {
        "accuracy": correct.mean(), "mean_iou": iou.mean(), "det_iou": (iou * correct).mean(),
        "iou50": (iou >= 0.5).double().mean(), "iou60": (iou >= 0.6).double().mean(),
        "iou75": (iou >= 0.75).double().mean(), "det50": ((iou >= 0.5).double() * correct).mean(),
    }
    assert metrics == pytest.approx({key: float(value) for key, value in expected.items()}, abs=1e-6)
    assert result["canvases"] == 200
    data = result["data"]
    assert (data["seed"], data["tight_boxes"], data["verified"]) == (0, False, False)


def test_evaluation_is_deterministic(evaluated):
    assert evaluated.results[0]["metrics"] == evaluated.results[1]["metrics"]


def test_evaluation_times_the_export_on_this_machine(evaluated):
    latency = evaluated.results[0]["latency"]
    assert list(latency["views"]) == ["1"] and len(latency["views"]["1"]) == 4
    assert all(value > 0 for value in latency["views"]["1"].values())


@pytest.mark.parametrize("module", ["evaluate", "predict"])
def test_help_answers_without_torch_or_ray(module):
    import subprocess
    import sys

    code = (f"import sys; sys.argv = ['x', '--help']; import raylocal.{module} as m\n"
            "try:\n    m.cli()\nexcept SystemExit:\n    pass\n"
            "print(sorted({'torch', 'ray', 'onnxruntime'} & set(sys.modules)))")
    process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert process.stdout.strip().splitlines()[-1] == "[]", process.stdout + process.stderr


@pytest.mark.parametrize("name", ["predictions.png", "worst.png"])
def test_grids_are_8_by_4_tiles(evaluated, name):
    with Image.open(evaluated.out / name) as image:
        assert image.mode == "RGB"
        assert image.size == (
            drawing.COLUMNS * (TILE + drawing.PAD) + drawing.PAD,
            drawing.ROWS * (TILE + drawing.CAPTION_HEIGHT + drawing.PAD) + drawing.PAD,
        )


def test_true_box_of_the_first_canvas_is_outlined_in_green(evaluated, recomputed):
    xmin, ymin, xmax, _ = np.round(recomputed.split["box"][0] * TILE).astype(int) + drawing.PAD
    with Image.open(evaluated.out / "predictions.png") as image:
        # The top edge, minus the corners, where the red predicted box may cross it.
        edge = np.asarray(image)[ymin, xmin + 3 : xmax - 3].astype(int)
    green = (edge[:, 1] > 200) & (edge[:, 0] < 80) & (edge[:, 2] < 80)
    assert green.mean() > 0.8, edge


def test_limit_and_seed_flags(export_dir, tiny_mnist_dir, tmp_path):
    flags = ["--data-dir", str(tiny_mnist_dir), "--unverified-data", "--out", str(tmp_path), "--limit", "10"]
    flags += ["--seed", "3"]
    assert evaluate.cli([str(export_dir), *flags]) == 0
    result = json.loads((tmp_path / "metrics.json").read_text())
    assert (result["canvases"], result["data"]["seed"]) == (10, 3)
    with Image.open(tmp_path / "predictions.png") as image:  # 10 tiles: a full row of 8, then 2
        assert image.size[1] == 2 * (TILE + drawing.CAPTION_HEIGHT + drawing.PAD) + drawing.PAD


@pytest.mark.parametrize("command, images", [(evaluate.cli, []), (predict.cli, ["digit.png"])])
def test_missing_export_exits_2_with_one_line(command, images, tmp_path, capsys):
    assert command([str(tmp_path / "nowhere"), *images]) == 2
    err = capsys.readouterr().err
    assert "no model.pt2" in err and "Traceback" not in err


def test_missing_data_exits_2(export_dir, tmp_path, capsys):
    assert evaluate.cli([str(export_dir), "--data-dir", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    assert "MNIST not found" in capsys.readouterr().err


def digit_image(width: int, height: int, invert: bool = False, tall: int = INK) -> Image.Image:
    canvas = np.zeros((height, width), dtype=np.uint8)
    canvas[height // 4 : height // 4 + tall, width // 3 : width // 3 + 6] = 255  # a bar, roughly a "1"
    return Image.fromarray(255 - canvas if invert else canvas)


@pytest.mark.parametrize(
    "size, invert, tall, note",
    [
        ((75, 75), False, INK, None),
        ((28, 28), False, INK, "28x28, padded to 75x75"),
        ((100, 60), False, INK, "100x60, ink 6x20 px (an MNIST digit's size): centred on a 75x75 canvas"),
        ((75, 75), True, INK, "inverted to white on black"),
        ((75, 75), False, 40, "75x75, ink 6x40 px: scaled by 0.5 to 20 px on its long side"),
    ],
)
def test_predict_prints_one_json_object_per_image(export_dir, tmp_path, capsys, size, invert, tall, note):
    path = tmp_path / "digit.png"
    digit_image(*size, invert=invert, tall=tall).save(path)
    assert predict.cli([str(export_dir), str(path)]) == 0
    captured = capsys.readouterr()
    [line] = captured.out.splitlines()
    result = json.loads(line)
    assert set(result) == KEYS and result["image"] == str(path)
    assert result["label"] in range(10) and 0.0 <= result["confidence"] <= 1.0
    box = result["box"]
    assert 0.0 <= box["xmin"] <= box["xmax"] <= 1.0 and 0.0 <= box["ymin"] <= box["ymax"] <= 1.0
    scale = [size[0], size[1], size[0], size[1]]
    assert result["box_pixels"] == pytest.approx([box[k] * s for k, s in zip(BOX_KEYS, scale)], abs=0.01)
    if note is None:
        assert result["preprocessing"] == [] and captured.err == ""
        assert result["canvas_box"] == result["box"]
    else:
        assert any(note in line for line in result["preprocessing"]) and note in captured.err


def scaled_digit(factor: int, size: tuple[int, int], at: tuple[int, int]) -> tuple[np.ndarray, Image.Image]:
    """A tiny test digit pasted on a canvas as training pastes it, and the same digit `factor` times
    larger at `at` on a black image of `size`: a close-up photo of it."""
    digits, _ = tiny_digits(np.random.default_rng(3), 1)
    digits[0][digits[0] < 128] = 0  # the fixture's faint noise would be ink once scaled up
    canvas = paste(digits, np.array([23]), np.array([23]))[0]
    photo = np.zeros(size[::-1], dtype=np.uint8)
    big = np.kron(digits[0], np.ones((factor, factor), dtype=np.uint8))
    photo[at[1] : at[1] + big.shape[0], at[0] : at[0] + big.shape[1]] = big
    return canvas, Image.fromarray(photo)


@pytest.mark.parametrize("factor, size, at", [(4, (400, 300), (150, 90)), (1, (640, 480), (20, 400))])
def test_a_close_up_digit_comes_out_at_the_training_size(factor, size, at):
    canvas, photo = scaled_digit(factor, size, at)
    trained = ink_box(canvas)
    prepared = preprocess.prepare_image(photo)
    x0, y0, x1, y1 = ink_box(prepared.canvas)
    # The tiny digits' bar is shorter than MNIST's ink: scaled to INK unless within the tolerance.
    long_side = trained[2] - trained[0]
    expected = long_side if abs(long_side - INK) <= preprocess.INK_TOLERANCE else INK
    assert abs(max(x1 - x0, y1 - y0) - expected) <= 1, prepared.notes
    assert abs((x0 + x1) / 2 - CANVAS / 2) <= 1 and abs((y0 + y1) / 2 - CANVAS / 2) <= 1
    # Mapped back, the ink's box on the canvas lands on the digit's in the photo.
    answer = preprocess.answer(prepared, np.zeros(10), np.array([x0, y0, x1, y1]) / CANVAS)
    photo_box = ink_box(np.asarray(photo))
    assert answer["box_pixels"] == pytest.approx(photo_box, abs=factor + 1)


def test_predict_agrees_with_the_program_on_the_prepared_close_up(export_dir, tmp_path, capsys):
    _, photo = scaled_digit(4, (400, 300), (150, 90))
    photo.save(tmp_path / "close-up.png")
    assert predict.cli([str(export_dir), str(tmp_path / "close-up.png")]) == 0
    result = json.loads(capsys.readouterr().out)
    canvas = preprocess.prepare_image(photo).canvas
    with torch.no_grad():
        logits, boxes = load_program(export_dir)(torch.from_numpy(canvas)[None, None].float() / 255)
    assert result["label"] == int(logits.argmax())
    assert list(result["canvas_box"].values()) == pytest.approx(boxes[0].tolist(), abs=1e-5)


def test_predict_matches_the_program_on_a_canvas(export_dir, tmp_path, capsys):
    digit = np.zeros((1, 28, 28), dtype=np.uint8)
    digit[0, 4:24, 6:22] = 200  # ink of an MNIST digit's size: the canvas goes to the model unchanged
    canvas = paste(digit, np.array([5]), np.array([30]))[0]
    Image.fromarray(canvas).save(tmp_path / "canvas.png")
    assert predict.cli([str(export_dir), str(tmp_path / "canvas.png")]) == 0
    result = json.loads(capsys.readouterr().out)
    with torch.no_grad():
        logits, boxes = load_program(export_dir)(torch.from_numpy(canvas)[None, None].float() / 255)
    assert result["label"] == int(logits.argmax())
    assert list(result["box"].values()) == pytest.approx(boxes[0].tolist(), abs=1e-5)


def test_annotate_writes_a_png_per_image(export_dir, tmp_path, capsys):
    paths = [tmp_path / "a.png", tmp_path / "b.jpg"]
    for path in paths:
        digit_image(75, 75).save(path)
    assert predict.cli([str(export_dir), *map(str, paths), "--annotate", str(tmp_path / "out")]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    for stem in ("a", "b"):
        with Image.open(tmp_path / "out" / f"{stem}.annotated.png") as image:
            assert image.format == "PNG" and image.size == (TILE, TILE + drawing.CAPTION_HEIGHT)


def test_unreadable_image_exits_2_naming_it_before_any_output(export_dir, tmp_path, capsys):
    good, bad = tmp_path / "good.png", tmp_path / "notes.png"
    digit_image(75, 75).save(good)
    bad.write_text("not an image")
    assert predict.cli([str(export_dir), str(good), str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert str(bad) in captured.err and "Traceback" not in captured.err


def test_limit_rebuilds_the_first_canvases_the_search_scored(recomputed, tiny_mnist_dir):
    mnist = load_mnist(tiny_mnist_dir, verify=False, log=lambda line: None)
    limited = evaluate.rebuild_test_split(mnist, 0, DataSettings(), limit=37)
    for key, column in limited.items():
        assert column.tobytes() == recomputed.split[key][:37].tobytes(), key


def test_predict_imports_neither_the_evaluate_entry_point_nor_a_font():
    import subprocess
    import sys

    code = ("import sys, raylocal.predict, raylocal.drawing as drawing; "
            "print('raylocal.evaluate' in sys.modules, drawing.font.cache_info().currsize)")
    process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert process.stdout.split() == ["False", "0"], process.stderr
