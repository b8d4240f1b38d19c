"""Per-canvas latency of an export: model.pt2 (torch) and model.onnx (onnxruntime), batch 1 and 64.

Each figure is a warm-up, then the median of timed repeats, each repeat one call on a batch,
divided by the batch: milliseconds per canvas. A time bound per figure keeps a slow machine
(or a large model) from stalling an export. The figures hold on the machine that measured
them, so each set names its CPU or GPU.

torch and onnxruntime are imported where used: `fastest_meeting` serves command lines that
must answer without them.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from raylocal.config import ConfigError
from raylocal.synthesis import CANVAS


class LatencyError(ConfigError):
    """No model meets the latency bound the command was given."""


BATCHES = (1, 64)
WARMUP = 3
REPEATS = 20
# Per figure: warm-up and repeats stop at this many seconds, whichever comes first.
BOUND_S = 1.0
# At export time the command's finish is on the time budget's clock: shorter figures.
CARD_BOUND_S = 0.25


def cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo, else what platform knows) and its core count."""
    name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name or platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def device_name(device: str = "cpu") -> str:
    if device.startswith("cuda"):
        import torch

        return f"GPU {torch.cuda.get_device_name(device)}"
    return f"CPU {cpu_name()}"


def median_seconds(call: Callable[[], object], bound_s: float = BOUND_S, repeats: int = REPEATS,
                   sync: Callable[[], None] = lambda: None) -> float:
    """Median wall time of `call` over up to `repeats` timed calls after WARMUP untimed ones, all within about bound_s."""
    deadline = time.perf_counter() + bound_s
    for _ in range(WARMUP):
        call()
        sync()
        if time.perf_counter() > deadline:
            break
    times = []
    while len(times) < repeats and (not times or time.perf_counter() < deadline):
        started = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def canvases(batch: int) -> np.ndarray:
    """float32 [batch,1,75,75] in [0,1]: the exported model's input (its speed does not depend on the values)."""
    return np.random.default_rng(0).random((batch, 1, CANVAS, CANVAS), dtype=np.float32)


def torch_ms(program, batch: int, device: str = "cpu", bound_s: float = BOUND_S) -> float:
    """Milliseconds per canvas of a torch module or exported program at `batch`."""
    import torch

    inputs = torch.from_numpy(canvases(batch)).to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def call():
        with torch.inference_mode():
            program(inputs)

    return median_seconds(call, bound_s, sync=sync) * 1000 / batch


def onnx_ms(session, batch: int, bound_s: float = BOUND_S) -> float:
    """Milliseconds per canvas of an onnxruntime session at `batch`."""
    feed = {session.get_inputs()[0].name: canvases(batch)}
    return median_seconds(lambda: session.run(None, feed), bound_s) * 1000 / batch


def measure(pt2: Path, onnx: Path, device: str = "cpu", bound_s: float = BOUND_S) -> dict[str, float]:
    """{"model.pt2 batch 1": ms, ...} for both files at each of BATCHES."""
    import onnxruntime

    program = load_pt2(pt2, device)
    session = onnxruntime.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    figures = {}
    for batch in BATCHES:
        figures[f"model.pt2 batch {batch}"] = round(torch_ms(program, batch, device, bound_s), 4)
        figures[f"model.onnx batch {batch}"] = round(onnx_ms(session, batch, bound_s), 4)
    return figures


def load_pt2(path: Path, device: str = "cpu"):
    """model.pt2's program on `device`: traced on the CPU, its constants move with move_to_device_pass."""
    import torch
    from torch.export.passes import move_to_device_pass

    program = torch.export.load(str(path))
    return (move_to_device_pass(program, device) if device != "cpu" else program).module()


def export_latency(network, views: int, export_dir: Path | None = None, device: str = "cpu",
                   bound_s: float = BOUND_S) -> dict:
    """The model card's "latency": ms per canvas of model.pt2 and model.onnx at BATCHES, with one view
    and (if more) with `views`, measured on this machine. export_dir holds the export's own files
    for `views`; the other view counts are exported to a temporary folder first."""
    from raylocal.model import for_inference

    result = {"unit": "ms per canvas", "device": {"model.pt2": device_name(device), "model.onnx": device_name("cpu")},
              "how": f"median of up to {REPEATS} calls after {WARMUP} warm-up calls, about {bound_s:g} s per figure; "
                     "model.onnx on onnxruntime's CPU provider",
              "views": {}}
    for count in sorted({1, views}):
        if export_dir is not None and count == views:
            result["views"][str(count)] = measure(export_dir / "model.pt2", export_dir / "model.onnx", device, bound_s)
            continue
        with tempfile.TemporaryDirectory(prefix="raylocal-latency-") as tmp:
            pt2, onnx = write_programs(for_inference(network, count).eval(), Path(tmp))
            result["views"][str(count)] = measure(pt2, onnx, device, bound_s)
    return result


def write_programs(model, folder: Path) -> tuple[Path, Path]:
    """model.pt2 and model.onnx of an eager model, exported as `raylocal.export` exports them."""
    import torch

    from raylocal.export import TRACE_BATCH

    example = (torch.from_numpy(canvases(TRACE_BATCH)),)
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},)
    torch.export.save(torch.export.export(model, example, dynamic_shapes=dynamic_shapes), folder / "model.pt2")
    torch.onnx.export(model, example, folder / "model.onnx", dynamo=True, external_data=False,
                      input_names=["images"], output_names=["logits", "boxes"], dynamic_shapes=dynamic_shapes,
                      verbose=False, report=False)
    return folder / "model.pt2", folder / "model.onnx"


def architecture_ms(config, views: int = 1, batch: int = 1, bound_s: float = BOUND_S) -> float:
    """Milliseconds per canvas of a model built from `config` with random weights (weights do not change
    the time), on the CPU: what the search report plots. Eager, not exported: export costs seconds per
    architecture, and model.pt2's program runs the same kernels."""
    from raylocal.model import build_model, for_inference

    return torch_ms(for_inference(build_model(config), views).eval(), batch, "cpu", bound_s)


def table(latency: dict, title: str = "") -> str:
    """The card's "latency" as a small text table: one row per file and batch, one column per view count."""
    views = list(latency.get("views", {}))
    if not views:
        return ""
    rows = list(next(iter(latency["views"].values())))
    header = [f"{title}ms per canvas".strip(), *(f"{count} view{'s' if count != '1' else ''}" for count in views)]
    body = [[row, *(f"{latency['views'][count].get(row, float('nan')):.3f}" for count in views)] for row in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in [header, *body]]
    devices = latency.get("device", {})
    named = [f"{file} on {name}" for file, name in devices.items()] if isinstance(devices, dict) else [str(devices)]
    return "\n".join([f"  {line}" for line in lines] + [f"  ({'; '.join(named)})"])


def fastest_meeting(options: Sequence[tuple[str, float, float]], max_ms: float) -> tuple[str, float, float] | None:
    """Of (label, det_iou, latency_ms) options, the most accurate whose latency is at most max_ms (the
    faster one of equally accurate options); None when none meets the bound."""
    meeting = [option for option in options if option[2] <= max_ms]
    return max(meeting, key=lambda option: (option[1], -option[2])) if meeting else None


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (latency, accuracy) points no other point beats on both (faster or equal and
    more accurate, or as accurate and faster), in order of latency."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -float("inf")
    for index in order:
        if points[index][1] > best:
            front.append(index)
            best = points[index][1]
    return front
