"""On a real GPU (marked `gpu`, skipped where CUDA is absent): fractional-GPU and DDP searches,
a CUDA-trained checkpoint through the export, bf16 training that stays finite, its convolutions
really computed in bf16, and serving's exported program on CUDA.

`experiments/gpu_check.sh` runs these with the GPU benchmarks; on machines without CUDA each
test says why it is skipped.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from raylocal.config import Hyperparameters
from raylocal.engine import fit
from raylocal.export import EXPORT_FILES, export_model, load_program, onnx_session
from raylocal.model import build_model
from raylocal.synthesis import split_plan, synthesize_shard
from raylocal.mnist import load_mnist
from raylocal.results import all_reports, read_search

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible to PyTorch here)"),
]
CUDA = torch.device("cuda")


def search(tmp_path: Path, mnist_dir: Path, *flags: str) -> tuple[str, list[dict]]:
    """A local smoke search in its own process and Ray instance (which sees the real GPUs):
    its output and every trial's result rows."""
    process = subprocess.run(
        [sys.executable, "-m", "raylocal.tune", "--smoke-test", "--quiet", "--data-dir", str(mnist_dir),
         "--unverified-data", "--storage", str(tmp_path / "results"), "--name", "gpu", *flags],
        cwd=tmp_path, capture_output=True, text=True, timeout=400,
    )
    assert process.returncode == 0, process.stdout[-4000:] + process.stderr[-4000:]
    rows = all_reports(read_search(tmp_path / "results" / "gpu")).to_dict("records")
    assert sorted(path.name for path in (tmp_path / "results" / "gpu" / "best_model").iterdir()) == sorted(EXPORT_FILES)
    return process.stdout, rows


def test_fractional_gpu_trials_train_on_cuda(tmp_path, tiny_mnist_dir):
    output, rows = search(tmp_path, tiny_mnist_dir, "--trials", "4", "--trials-per-gpu", "4")
    assert "+ 0.25 GPU, computing on cuda; backend: inline" in output, output
    assert rows and {row["worker_devices"] for row in rows} == {"cuda:0"}
    assert {row["worker_gpus"] for row in rows} <= {str(gpu) for gpu in range(torch.cuda.device_count())}
    assert len({row["trial_id"] for row in rows}) == 4


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="a 2-worker NCCL search needs at least 2 GPUs")
def test_two_worker_ddp_search_on_two_gpus(tmp_path, tiny_mnist_dir):
    output, rows = search(tmp_path, tiny_mnist_dir, "--workers-per-trial", "2")
    assert "+ 1 GPU, computing on cuda; backend: Ray Train TorchTrainer, DDP over nccl" in output, output
    for row in rows:
        assert len(set(row["worker_gpus"].split(","))) == 2, row


def cuda_fit(params: Hyperparameters, mnist_dir: Path, rows: int = 1024) -> tuple[list[dict], dict]:
    mnist = load_mnist(mnist_dir, verify=False, log=lambda _: None)
    plan = split_plan(len(mnist.train_images), len(mnist.test_images))
    data = synthesize_shard(mnist.train_images, mnist.train_labels, plan, seed=0, split="train", epoch=0, shard=0,
                            shard_size=rows)
    val = synthesize_shard(mnist.train_images, mnist.train_labels, plan, seed=0, split="val", epoch=0, shard=0,
                           shard_size=256)
    reports: list[tuple[dict, dict]] = []
    fit(params, max_epochs=2, first_epoch_reports=2, reports_per_epoch=1, train_data=lambda epoch: data, val_data=val,
        train_rows=rows, report=lambda metrics, state: reports.append((metrics, state)), device=CUDA)
    return [metrics for metrics, _ in reports], reports[-1][1]


@pytest.mark.skipif(torch.cuda.is_available() and not torch.cuda.is_bf16_supported(), reason="GPU without bf16")
def test_bf16_training_on_cuda_gives_finite_metrics_that_improve(tiny_mnist_dir):
    reports, state = cuda_fit(Hyperparameters(depth=3, width=8, lr=3e-3), tiny_mnist_dir)
    for metrics in reports:
        assert all(math.isfinite(value) for value in metrics.values() if isinstance(value, float)), metrics
    assert reports[-1]["train_loss"] < reports[0]["train_loss"]
    assert all(tensor.device.type == "cuda" for tensor in state["model"].values())
    assert "cuda_rng" in state


@pytest.mark.skipif(torch.cuda.is_available() and not torch.cuda.is_bf16_supported(), reason="GPU without bf16")
def test_the_training_loop_computes_its_convolutions_in_bf16_on_cuda(tiny_mnist_dir, monkeypatch):
    """Inside the loop's autocast region the activations are bf16: a hook on every convolution of
    the model `fit` builds records its output's dtype, in training and in validation."""
    import raylocal.engine

    seen: dict[bool, set[torch.dtype]] = {True: set(), False: set()}

    def hooked(config):
        model = build_model(config)
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.register_forward_hook(lambda module, _, output: seen[module.training].add(output.dtype))
        return model

    monkeypatch.setattr(raylocal.engine, "build_model", hooked)
    cuda_fit(Hyperparameters(depth=3, width=8, lr=3e-3), tiny_mnist_dir, rows=256)
    assert seen == {True: {torch.bfloat16}, False: {torch.bfloat16}}, seen


def test_cuda_checkpoint_exports_and_onnxruntime_on_cpu_matches(tmp_path, tiny_mnist_dir):
    params = Hyperparameters(depth=3, width=8)
    _, state = cuda_fit(params, tiny_mnist_dir, rows=512)
    # As the search's export does: the checkpoint file is read onto the CPU.
    saved = tmp_path / "checkpoint.pt"
    torch.save(state, saved)
    loaded = torch.load(saved, map_location="cpu", weights_only=True)
    model = build_model(params.model_config())
    model.load_state_dict(loaded["model"])
    export_dir = export_model(model.eval(), tmp_path / "export", {"trained_on": "cuda"}, log=lambda _: None)
    images = torch.rand(5, 1, 75, 75, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = [tensor.numpy() for tensor in model(images)]
        program = [tensor.numpy() for tensor in load_program(export_dir)(images)]
    session = onnx_session(export_dir)
    onnx = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    for expected, pt2, ort in zip(eager, program, onnx):
        np.testing.assert_allclose(pt2, expected, atol=1e-4)
        np.testing.assert_allclose(ort, expected, atol=1e-4)


def test_serving_on_cuda_runs_the_exported_program_and_matches_onnxruntime(tmp_path):
    """`raylocal serve --device cuda`'s runtime: model.pt2's program on the GPU, answering as onnxruntime does on CPUs."""
    from raylocal.serve import Predictor

    torch.manual_seed(0)
    export_dir = export_model(build_model(Hyperparameters(depth=3, width=8).model_config()).eval(),
                              tmp_path / "export", {}, log=lambda _: None)
    canvases = np.random.default_rng(0).integers(0, 256, (5, 75, 75), dtype=np.uint8)
    on_gpu = Predictor.of(export_dir, device="cuda")
    assert on_gpu.runtime == "pt2" and next(on_gpu.program.parameters()).device.type == "cuda"
    for served, reference in zip(on_gpu(canvases), Predictor.of(export_dir)(canvases)):
        np.testing.assert_allclose(served, reference, atol=1e-3)
