"""How trials use CPUs and GPUs: the pure layout rule, then Ray's logical GPUs on this CPU machine.

A node started with `num_gpus=2` declares two GPUs that Ray schedules like real ones, so the
resources and GPU ids a trial is given are checked here without CUDA; the trials compute on
the CPU because `--device cpu` says so.
"""

from __future__ import annotations

import re

import pytest
import torch

from raylocal.config import ConfigError
from raylocal.resources import DRIVER_MEMORY, TRIALS_PER_GPU, Layout, choose_layout


def test_without_gpus_one_worker_trials_train_inline_one_per_cpu():
    layout = choose_layout(16, 0)
    assert (layout.backend, layout.device, layout.gpus_per_worker, layout.concurrent) == ("inline", "cpu", 0, 16)
    assert layout.trial_resources() == {"CPU": 1}


def test_with_gpus_one_worker_trials_share_each_gpu():
    layout = choose_layout(16, 1)
    assert (layout.backend, layout.device) == ("inline", "cuda")
    assert layout.gpus_per_worker == pytest.approx(1 / TRIALS_PER_GPU)
    assert layout.concurrent == min(16, TRIALS_PER_GPU)
    assert layout.trial_resources() == {"CPU": 1, "GPU": layout.gpus_per_worker}


@pytest.mark.parametrize(
    "cpus, gpus, flags, concurrent, reason",
    [
        (16, 1, {"trials_per_gpu": 4}, 4, "GPUs"),  # the GPUs bound it
        (4, 2, {"trials_per_gpu": 8}, 4, "CPUs"),  # the CPUs bound it
        (32, 2, {"trials_per_gpu": 3}, 6, "GPUs"),  # thirds: rounded down so three fit on a GPU
        (16, 4, {"cpus_per_worker": 2}, 8, "CPUs"),
        (8, 4, {"workers": 2}, 2, "GPUs"),  # DDP: whole GPUs per worker
        (8, 4, {"workers": 2, "device": "cpu"}, 2, "GPUs"),  # logical GPUs, computed on CPUs
        (8, 0, {"workers": 2}, 4, "CPUs"),
    ],
)
def test_concurrency_is_the_smaller_of_the_cpu_and_gpu_bounds(cpus, gpus, flags, concurrent, reason):
    layout = choose_layout(cpus, gpus, **flags)
    assert layout.concurrent == concurrent
    assert layout.reason.startswith(reason)
    assert layout.gpus_per_worker * layout.workers * layout.concurrent <= gpus + 1e-9
    assert layout.cpus_per_worker * layout.workers * layout.concurrent <= cpus


def test_ddp_layout_takes_whole_gpus_and_picks_the_collective_backend():
    layout = choose_layout(8, 4, workers=2)
    assert (layout.backend, layout.gpus_per_worker, layout.dist_backend) == ("ray-train", 1.0, "nccl")
    assert layout.trial_resources() == {"CPU": 0, "memory": DRIVER_MEMORY}
    assert layout.worker_resources() == {"CPU": 1, "GPU": 1.0}
    assert choose_layout(8, 4, workers=2, device="cpu").dist_backend == "gloo"


@pytest.mark.parametrize(
    "cpus, gpus, flags, message",
    [
        (8, 4, {"workers": 2, "gpus_per_worker": 0.5}, "DDP workers need whole GPUs"),
        (8, 4, {"workers": 2, "trials_per_gpu": 2}, "--trials-per-gpu shares GPUs between one-worker trials"),
        (8, 0, {"trials_per_gpu": 2}, "--trials-per-gpu needs GPUs"),
        (8, 1, {"trials_per_gpu": 2, "gpus_per_worker": 0.5}, "not both"),
        (8, 1, {"trials_per_gpu": 0}, "--trials-per-gpu must be >= 1"),
        (8, 0, {"gpus_per_worker": 1}, "a trial asks for 1 GPUs but the cluster has 0"),
        (2, 0, {"workers": 3}, "a trial asks for 3 CPUs but the cluster has 2"),
        (8, 0, {"device": "cuda"}, "--device cuda needs GPUs"),
        (8, 0, {"backend": "inline", "workers": 2}, "--backend inline trains one worker per trial"),
    ],
)
def test_impossible_layouts_are_refused_naming_the_flag(cpus, gpus, flags, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        choose_layout(cpus, gpus, **flags)


def test_layout_line_says_what_was_chosen_and_why():
    line = choose_layout(16, 1, trials_per_gpu=4).describe(16, 1)
    assert "each trial: 1 worker(s) x 1 CPU + 0.25 GPU, computing on cuda" in line
    assert "up to 4 trials at once (GPUs / 0.25 per trial; 4 trials share each GPU)" in line


def test_a_trial_meant_for_cuda_without_cuda_fails_instead_of_falling_back(monkeypatch):
    from raylocal.trial import trial_device

    layout = Layout("inline", 1, 1, 0.5, "cuda", 1, "test")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="PyTorch sees no CUDA device.*--device cpu"):
        trial_device(layout)
    assert trial_device(Layout("inline", 1, 1, 0.5, "cpu", 1, "test")) == torch.device("cpu")


@pytest.fixture
def gpu_node(ray_session):
    """A third node of the session cluster that declares 2 (logical) GPUs and 4 CPUs."""
    import ray

    node = ray_session.add_node(num_cpus=4, num_gpus=2, object_store_memory=256 * 1024**2)
    ray_session.wait_for_nodes()
    try:
        yield node
    finally:
        ray_session.remove_node(node)
        ray_session.wait_for_nodes()
        assert ray.cluster_resources().get("GPU", 0) == 0


# Slow tier, as the DDP case below: a search on a node added for it. The layouts themselves are
# checked above, without Ray, in the fast tier.
@pytest.mark.slow
def test_logical_gpus_give_each_trial_a_fraction_and_one_gpu_id(gpu_node, tmp_path, tiny_mnist_dir, capsys):
    from raylocal.results import read_search
    from raylocal.tune import get_args_parser, main

    args = get_args_parser().parse_args([
        "--smoke-test", "--trials", "4", "--trials-per-gpu", "2", "--device", "cpu", "--data-dir", str(tiny_mnist_dir),
        "--unverified-data", "--verbose", "0", "--storage", str(tmp_path), "--name", "logical", "--no-final",
    ])
    main(args)
    output = capsys.readouterr().out
    # 6 CPUs (1 + 1 + 4) and 2 GPUs at 0.5 GPU a trial: the GPUs bound it at 4.
    assert "6 CPUs, 2 GPUs; each trial: 1 worker(s) x 1 CPU + 0.5 GPU, computing on cpu" in output, output
    assert "up to 4 trials at once (GPUs / 0.5 per trial" in output
    from ray.tune import ExperimentAnalysis

    resources = [trial.placement_group_factory.required_resources
                 for trial in ExperimentAnalysis(str(tmp_path / "logical")).trials]
    assert resources == [{"CPU": 1, "GPU": 0.5}] * 4
    trials = read_search(tmp_path / "logical")
    assert len(trials) == 4
    for trial in trials:
        last = trial.last
        assert last["worker_gpus"] in {"0", "1"}, last  # one GPU id each, a fraction of it
        assert last["worker_devices"] == "cpu"
        assert last["worker_nodes"] == gpu_node.node_id  # the only node with GPUs


@pytest.mark.slow
def test_logical_gpus_give_each_ddp_worker_a_whole_gpu_of_its_own(gpu_node, tmp_path, tiny_mnist_dir, capsys):
    from raylocal.results import read_search
    from raylocal.tune import get_args_parser, main

    args = get_args_parser().parse_args([
        "--smoke-test", "--trials", "1", "--workers-per-trial", "2", "--cpus-per-worker", "2", "--device", "cpu",
        "--data-dir", str(tiny_mnist_dir), "--unverified-data", "--verbose", "0", "--storage", str(tmp_path),
        "--name", "logical-ddp", "--no-final",
    ])
    main(args)
    output = capsys.readouterr().out
    assert "each trial: 2 worker(s) x 2 CPU + 1 GPU, computing on cpu; backend: Ray Train TorchTrainer, DDP over gloo" in output
    assert "up to 1 trials at once" in output
    (trial,) = read_search(tmp_path / "logical-ddp")
    assert sorted(trial.last["worker_gpus"].split(",")) == ["0", "1"], trial.last
    assert trial.last["worker_devices"] == "cpu,cpu"
