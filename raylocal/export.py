"""Export stage: write a trained Localizer as torch.export, ONNX and plain weights.

model.pt2 and model.onnx hold what is scored on the test split: the network, or with `views` > 1
the network averaged over shifted copies of the canvas (`model.ShiftAveraged`); state_dict.pt holds
the network's weights, and config.json says how many views rebuild the same model from them.

Every artefact is checked against the eager model before the export directory
appears, and the directory appears in one rename, so a reader never sees half an
export.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

from raylocal.config import ModelConfig
from raylocal.engine import as_batch
from raylocal.latency import CARD_BOUND_S, export_latency
from raylocal.latency import table as latency_table
from raylocal.model import NUM_CLASSES, SHIFTS, Localizer, build_model, for_inference
from raylocal.synthesis import CANVAS

EXPORT_FILES = ("model.pt2", "model.onnx", "state_dict.pt", "config.json", "model_card.json")
ATOL = 1e-4
# Batch 2 for tracing: torch.export specialises sizes 0 and 1, so a batch-1 example
# would freeze the batch dimension. Checking 1 and 3 then proves it stayed dynamic.
TRACE_BATCH = 2
CHECK_BATCHES = (3, 1)
RESERVED_CARD_KEYS = ("files", "versions", "exported_at", "latency")


class ExportError(RuntimeError):
    """The export could not be written or read, or does not reproduce the eager model."""


def export_model(
    model: Localizer,
    export_dir: str | os.PathLike,
    card: dict,
    *,
    overwrite: bool = False,
    views: int = 1,
    log: Callable[[str], None] = print,
) -> Path:
    """Write EXPORT_FILES to export_dir, all checked against the eager model (`for_inference(model,
    views)`), and return its path. A non-empty export_dir is replaced only with overwrite=True.
    Raises ExportError, or whatever failed mid-export, leaving export_dir as it was.
    """
    export_dir = Path(export_dir).absolute()
    if not isinstance(model, Localizer):
        raise ExportError(f"export_model takes the network (a Localizer), got {type(model).__name__}; "
                          "the views are the views argument")
    clashes = sorted(set(card) & set(RESERVED_CARD_KEYS))
    if clashes:
        raise ExportError(f"card keys {clashes} are filled in by the export itself")
    if export_dir.exists() and not export_dir.is_dir():
        raise ExportError(f"{export_dir} exists and is not a directory")
    if _is_non_empty_dir(export_dir) and not overwrite:
        raise ExportError(f"{export_dir} already holds an export; pass overwrite=True")
    try:
        export_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{export_dir.name}.tmp-", dir=export_dir.parent))
    except OSError as error:
        raise ExportError(f"cannot write next to {export_dir}: {error}") from error
    try:
        # mkdtemp makes the directory 0700, which would hide the export from other
        # users (a serving container, say) once it is renamed into place.
        tmp.chmod(0o755)
        _write_export(model, tmp, card, views, log)
        _move_into_place(tmp, export_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"exported model to {export_dir}")
    return export_dir


def load_program(export_dir: str | os.PathLike) -> torch.nn.Module:
    return torch.export.load(Path(export_dir) / "model.pt2").module()


def load_export(export_dir: str | os.PathLike) -> torch.nn.Module:
    """`load_program` for a folder a user named: a missing or unreadable model.pt2 is an ExportError."""
    path = Path(export_dir) / "model.pt2"
    if not path.is_file():
        raise ExportError(f"{export_dir} is not an export: it has no model.pt2")
    try:
        return load_program(export_dir)
    except Exception as error:  # torch raises many kinds for a truncated or foreign file
        raise ExportError(f"{path}: cannot load: {type(error).__name__}: {error}") from error


def run_program(program: torch.nn.Module, canvases: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, boxes) for uint8 canvases [N,75,75], scaled exactly as in training."""
    with torch.inference_mode():
        return program(as_batch(canvases))


def load_state_dict_model(export_dir: str | os.PathLike) -> torch.nn.Module:
    """The exported model rebuilt from config.json and state_dict.pt: model.pt2's model in eager form."""
    export_dir = Path(export_dir)
    config = json.loads((export_dir / "config.json").read_text())
    model = build_model(ModelConfig.from_saved(config["model"]))
    model.load_state_dict(torch.load(export_dir / "state_dict.pt", weights_only=True))
    # Exports from before the views were one view.
    return for_inference(model, config.get("test_time", {}).get("views", 1)).eval()


def onnx_session(export_dir: str | os.PathLike) -> onnxruntime.InferenceSession:
    path = Path(export_dir) / "model.onnx"
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _write_export(model: Localizer, out: Path, card: dict, views: int, log: Callable[[str], None]) -> None:
    # Rebuilding from config + weights, instead of deep-copying, leaves the caller's
    # model (device, train mode) alone and proves config.json + state_dict.pt suffice.
    network = build_model(model.config)
    network.load_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
    eager = for_inference(network, views).eval()
    example = (_canvases(TRACE_BATCH, seed=0),)
    # Positional, so a rename of forward()'s argument cannot break the export.
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},)

    program = torch.export.export(eager, example, dynamic_shapes=dynamic_shapes)
    torch.export.save(program, out / "model.pt2")
    _check("model.pt2", eager, load_program(out))
    _wrote(out / "model.pt2", log)

    # Exporting the module again, not `program`, keeps the ONNX batch axis named
    # "batch" instead of an opaque symbol such as "s34". external_data=False keeps
    # the weights inside the .onnx file.
    torch.onnx.export(
        eager, example, out / "model.onnx", dynamo=True, external_data=False,
        input_names=["images"], output_names=["logits", "boxes"],
        dynamic_shapes=dynamic_shapes, verbose=False, report=False,
    )
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    session = onnx_session(out)
    _check("model.onnx", eager, lambda x: session.run(None, {"images": x.numpy()}))
    _wrote(out / "model.onnx", log)

    torch.save(network.state_dict(), out / "state_dict.pt")
    _wrote(out / "state_dict.pt", log)

    _write_json(out / "config.json", {
        "model": network.config.to_dict(),
        "test_time": _test_time(views),
        "input": {"shape": ["N", 1, CANVAS, CANVAS], "dtype": "float32", "range": [0, 1]},
        "outputs": {
            "logits": ["N", NUM_CLASSES],
            "boxes": ["N", 4],
            "box_format": f"xyxy normalized to [0,1] of the {CANVAS}x{CANVAS} canvas",
        },
    })
    _wrote(out / "config.json", log)

    # On the CPU, where model.pt2 was traced and model.onnx runs: `raylocal evaluate` adds a GPU's figures.
    latency = export_latency(network, views, out, bound_s=CARD_BOUND_S)
    log("latency on this machine:\n" + latency_table(latency))
    _write_json(out / "model_card.json", {
        **card,
        "latency": latency,
        "files": {p.name: _sha256(p) for p in sorted(out.iterdir())},
        "versions": _versions(),
        "exported_at": datetime.now(timezone.utc).isoformat(),
    })
    _wrote(out / "model_card.json", log)

    # Catches stray files, notably an external .onnx.data that would make
    # model.onnx useless on its own.
    found = sorted(p.name for p in out.iterdir())
    if found != sorted(EXPORT_FILES):
        raise ExportError(f"export wrote {found}, expected {sorted(EXPORT_FILES)}")


def _test_time(views: int) -> dict:
    """How model.pt2 and model.onnx use the network (raylocal.model.ShiftAveraged)."""
    if views == 1:
        return {"views": 1, "logits": "the network's", "boxes": "the network's"}
    return {
        "views": views,
        "shifts_dx_dy": [list(shift) for shift in SHIFTS[:views]],
        "logits": "log of the mean over the views of softmax(the network's logits): softmax and argmax read as for logits",
        "boxes": "mean over the views of the network's box, each moved back by its view's shift, clamped to [0,1]",
    }


def _check(label: str, eager: torch.nn.Module, run: Callable[[torch.Tensor], Sequence]) -> None:
    for batch in CHECK_BATCHES:
        images = _canvases(batch, seed=batch)
        with torch.no_grad():
            expected = [t.numpy() for t in eager(images)]
            actual = [np.asarray(t) for t in run(images)]
        for name, want, got in zip(("logits", "boxes"), expected, actual, strict=True):
            if got.shape != want.shape:
                raise ExportError(f"{label}: {name} has shape {got.shape}, eager {want.shape}")
            diff = float(np.abs(got - want).max())
            if not diff < ATOL:
                raise ExportError(f"{label}: {name} differs from eager by {diff:.3g} at batch {batch}")


def _canvases(batch: int, seed: int) -> torch.Tensor:
    # A private generator keeps the export from disturbing the caller's RNG stream.
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 1, CANVAS, CANVAS, generator=generator)


def _move_into_place(tmp: Path, export_dir: Path, overwrite: bool) -> None:
    taken = f"another export wrote {export_dir} first; this one was not kept"
    if not _is_non_empty_dir(export_dir):
        # rename(2) replaces an empty directory, and refuses a non-empty one that
        # appeared since that check, so a concurrent export is never clobbered.
        try:
            os.rename(tmp, export_dir)
        except OSError as error:
            if _is_non_empty_dir(export_dir):
                raise ExportError(taken) from error
            raise
        return
    if not overwrite:
        # Empty when this export started, filled by a concurrent one since.
        raise ExportError(taken)
    # tmp's name is unique, so the same suffix gives a free name for the old export.
    old = tmp.with_name(tmp.name.replace(".tmp-", ".old-"))
    os.rename(export_dir, old)
    try:
        os.rename(tmp, export_dir)
    except OSError:
        os.rename(old, export_dir)
        raise
    # The new export is already in place; a leftover old copy is not worth failing for.
    shutil.rmtree(old, ignore_errors=True)


def _is_non_empty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _versions() -> dict[str, str]:
    # Version metadata, not imports: importing ray just to read its version is slow
    # and starts nothing useful.
    versions = {
        "raylocal": _dist_version("raylocal") or "unknown",
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }
    for dist in ("torchvision", "ray"):
        if version := _dist_version(dist):
            versions[dist] = version
    return versions


def _dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _wrote(path: Path, log: Callable[[str], None]) -> None:
    log(f"wrote {path.name} ({path.stat().st_size / 1024:.1f} KiB)")
