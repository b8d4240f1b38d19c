from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from raylocal import export
from raylocal.config import ModelConfig
from raylocal.export import (
    EXPORT_FILES,
    ExportError,
    export_model,
    load_program,
    load_state_dict_model,
    onnx_session,
)
from raylocal.latency import fastest_meeting, pareto_front
from raylocal.model import SHIFTS, Localizer, ShiftAveraged

CARD = {"trial": "abc123", "metrics": {"accuracy": 0.5, "mean_iou": 0.25}}


def tiny_model() -> Localizer:
    torch.manual_seed(0)
    return Localizer(ModelConfig(depth=2, width=4, head_width=16))


def canvases(batch: int) -> torch.Tensor:
    return torch.rand(batch, 1, 75, 75, generator=torch.Generator().manual_seed(batch))


def eager_outputs(model: Localizer, images: torch.Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        return [t.numpy() for t in model.eval()(images)]


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> SimpleNamespace:
    model = tiny_model()  # fresh modules are in training mode, which the export must keep
    parent = tmp_path_factory.mktemp("exports")
    lines: list[str] = []
    path = export_model(model, parent / "run1", CARD, log=lines.append)
    return SimpleNamespace(model=model, still_training=model.training, path=path, lines=lines)


def test_writes_every_file_and_no_temp_dirs(exported):
    assert sorted(p.name for p in exported.path.iterdir()) == sorted(EXPORT_FILES)
    assert leftovers(exported.path.parent) == []
    # A line per file, the latency table, and where the export went.
    assert len(exported.lines) == len(EXPORT_FILES) + 2
    assert exported.lines[-3].startswith("latency on this machine:")
    assert str(exported.path) in exported.lines[-1]


def test_keeps_caller_model_in_training_mode(exported):
    assert exported.still_training


@pytest.mark.parametrize("batch", [1, 5])
def test_program_matches_eager(exported, batch):
    images = canvases(batch)
    with torch.no_grad():
        actual = [t.numpy() for t in load_program(exported.path)(images)]
    for want, got in zip(eager_outputs(exported.model, images), actual):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_onnx_matches_eager(exported):
    images = canvases(2)
    logits, boxes = onnx_session(exported.path).run(["logits", "boxes"], {"images": images.numpy()})
    assert logits.shape == (2, 10) and boxes.shape == (2, 4)
    want_logits, want_boxes = eager_outputs(exported.model, images)
    np.testing.assert_allclose(logits, want_logits, atol=1e-4, rtol=0)
    np.testing.assert_allclose(boxes, want_boxes, atol=1e-4, rtol=0)


def test_state_dict_model_matches_eager(exported):
    rebuilt = load_state_dict_model(exported.path)
    assert rebuilt.config == exported.model.config
    images = canvases(3)
    for want, got in zip(eager_outputs(exported.model, images), eager_outputs(rebuilt, images)):
        np.testing.assert_array_equal(got, want)


def test_model_card(exported):
    card = json.loads((exported.path / "model_card.json").read_text())
    assert {k: card[k] for k in CARD} == CARD
    assert set(card["files"]) == set(EXPORT_FILES) - {"model_card.json"}
    for name, digest in card["files"].items():
        assert hashlib.sha256((exported.path / name).read_bytes()).hexdigest() == digest
    assert {"raylocal", "torch", "onnx", "onnxruntime", "numpy"} <= set(card["versions"])
    assert card["exported_at"].endswith("+00:00")
    check_latency(card["latency"], ["1"])


def check_latency(latency: dict, views: list[str]) -> None:
    """Figures for both files at batch 1 and 64 for each view count, on a named CPU."""
    assert latency["unit"] == "ms per canvas" and list(latency["views"]) == views
    assert all(name.startswith("CPU ") and "cores" in name for name in latency["device"].values())
    for figures in latency["views"].values():
        assert set(figures) == {f"model.{kind} batch {batch}" for kind in ("pt2", "onnx") for batch in (1, 64)}
        assert all(0 < value < 10_000 for value in figures.values())


def test_fastest_meeting_picks_the_most_accurate_option_within_the_bound():
    options = [("a", 0.90, 1.0), ("b", 0.95, 3.0), ("c", 0.95, 2.5), ("d", 0.97, 9.0)]
    assert fastest_meeting(options, 3.0) == ("c", 0.95, 2.5)
    assert fastest_meeting(options, 1.0) == ("a", 0.90, 1.0)
    assert fastest_meeting(options, 0.5) is None
    assert pareto_front([(1.0, 0.9), (3.0, 0.95), (2.5, 0.95), (9.0, 0.97), (5.0, 0.93)]) == [0, 2, 3]


@pytest.fixture(scope="module")
def exported_views(tmp_path_factory) -> SimpleNamespace:
    model = tiny_model()
    path = export_model(model, tmp_path_factory.mktemp("exports") / "views", CARD, views=len(SHIFTS), log=print)
    return SimpleNamespace(model=ShiftAveraged(tiny_model()), path=path)


def test_an_export_with_views_runs_the_shift_average_in_every_format(exported_views):
    path, images = exported_views.path, canvases(4)
    want_logits, want_boxes = eager_outputs(exported_views.model, images)
    with torch.no_grad():
        program = [t.numpy() for t in load_program(path)(images)]
    onnx_outputs = onnx_session(path).run(["logits", "boxes"], {"images": images.numpy()})
    rebuilt = load_state_dict_model(path)
    assert isinstance(rebuilt, ShiftAveraged) and rebuilt.shifts == SHIFTS
    for got_logits, got_boxes in (program, onnx_outputs, eager_outputs(rebuilt, images)):
        np.testing.assert_allclose(got_logits, want_logits, atol=1e-4, rtol=0)
        np.testing.assert_allclose(got_boxes, want_boxes, atol=1e-4, rtol=0)
    # The weights are the network's own, loadable without raylocal's wrapper.
    assert torch.load(path / "state_dict.pt").keys() == tiny_model().state_dict().keys()
    test_time = json.loads((path / "config.json").read_text())["test_time"]
    assert test_time["views"] == len(SHIFTS) and test_time["shifts_dx_dy"] == [list(s) for s in SHIFTS]
    card = json.loads((path / "model_card.json").read_text())
    check_latency(card["latency"], ["1", str(len(SHIFTS))])


def test_the_wrapper_is_refused_with_the_argument_to_use(tmp_path):
    with pytest.raises(ExportError, match="views argument"):
        export_model(ShiftAveraged(tiny_model()), tmp_path / "run", CARD, log=lambda _: None)
    assert list(tmp_path.iterdir()) == []


def test_existing_export_needs_overwrite(tmp_path):
    target = tmp_path / "run"
    export_model(tiny_model(), target, {"attempt": 1}, log=lambda _: None)
    with pytest.raises(ExportError, match=re.escape(str(target))):
        export_model(tiny_model(), target, {"attempt": 2}, log=lambda _: None)
    assert json.loads((target / "model_card.json").read_text())["attempt"] == 1

    export_model(tiny_model(), target, {"attempt": 3}, overwrite=True, log=lambda _: None)
    assert json.loads((target / "model_card.json").read_text())["attempt"] == 3
    assert sorted(p.name for p in target.iterdir()) == sorted(EXPORT_FILES)
    assert leftovers(tmp_path) == []


def test_failure_mid_export_leaves_nothing(tmp_path):
    # The card is written last, so this fails after every model file is on disk.
    with pytest.raises(TypeError):
        export_model(tiny_model(), tmp_path / "run", {"x": object()}, log=lambda _: None)
    assert list(tmp_path.iterdir()) == []


def test_output_mismatch_raises(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "ATOL", 0.0)
    with pytest.raises(ExportError, match="differs from eager"):
        export_model(tiny_model(), tmp_path / "run", CARD, log=lambda _: None)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_parent_raises(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ExportError, match="file"):
        export_model(tiny_model(), blocker / "run", CARD, log=lambda _: None)


def _export_in_process(export_dir: str, writer: int, results) -> None:
    torch.manual_seed(writer)
    try:
        export_model(tiny_model(), export_dir, {"writer": writer}, log=lambda _: None)
        results.put((writer, "ok"))
    except ExportError as error:
        results.put((writer, str(error)))


def test_two_exports_to_one_folder_at_once_never_interleave(tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    target = tmp_path / "shared_export"
    writers = [context.Process(target=_export_in_process, args=(str(target), n, results)) for n in (1, 2)]
    for process in writers:
        process.start()
    for process in writers:
        process.join(timeout=120)
    outcomes = dict(results.get(timeout=5) for _ in writers)
    winners = [writer for writer, outcome in outcomes.items() if outcome == "ok"]
    assert len(winners) == 1, outcomes
    loser = ({1, 2} - set(winners)).pop()
    # Which check stops the loser depends on timing: the rename or, if it started late, the first look.
    assert "another export wrote" in outcomes[loser] or "already holds an export" in outcomes[loser]
    card = json.loads((target / "model_card.json").read_text())
    assert card["writer"] == winners[0]
    for name, digest in card["files"].items():
        assert hashlib.sha256((target / name).read_bytes()).hexdigest() == digest
    assert leftovers(tmp_path) == []


def test_an_export_from_before_box_head_loads_as_the_flatten_model_it_holds(tmp_path):
    torch.manual_seed(0)
    old = Localizer(ModelConfig(depth=2, width=4, head_width=16, box_head="flatten"))
    path = export_model(old, tmp_path / "old", CARD, log=print)
    config = json.loads((path / "config.json").read_text())
    del config["model"]["box_head"]  # as exports before the field wrote it
    del config["test_time"]  # and before the views
    (path / "config.json").write_text(json.dumps(config))
    rebuilt = load_state_dict_model(path)
    assert isinstance(rebuilt, Localizer) and rebuilt.config.box_head == "flatten"
    images = canvases(2)
    for want, got in zip(eager_outputs(old, images), eager_outputs(rebuilt, images)):
        np.testing.assert_array_equal(got, want)
