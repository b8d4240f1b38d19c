"""The benchmark scripts of experiments/ run end to end at toy size and print their figures.

They measure, they do not assert speed: here only that each runs and prints every figure
it promises (a script that broke would otherwise be found only when someone needs numbers).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

# Each script starts Ray instances of its own (by hand: no Ray fixture marks it), and together they
# outlast the fast tier: they check scripts someone runs for figures, not the product.
pytestmark = [pytest.mark.ray, pytest.mark.slow]

EXPERIMENTS = Path(__file__).parents[1] / "experiments"
NUMBER = r"[0-9][0-9,]*\.?[0-9]*"

CASES = {
    "bench_synthesis.py": (["--cpus", "1", "--repeats", "1", "--shard-size", "500"],
                           [rf"pure function, 1 core +{NUMBER} canvases", rf"Ray Data / \(pure per core x 1 cores\): {NUMBER}"]),
    "bench_train.py": (["--rows", "512", "--val-rows", "200", "--depth", "2", "--width", "4", "--threads", "1"],
                       [rf"plain PyTorch loop \(default\) +{NUMBER}", rf"raylocal loop in Ray Train +{NUMBER}",
                        rf"ratio Ray Train loop / faster plain loop: {NUMBER}"]),
    # Three layouts in one run, with two of Ray's logical GPUs (computed on the CPU): the base, DDP
    # with one worker on each of two nodes, and DDP with a GPU id of its own per worker; one trial
    # each (a second only repeated the first). Each layout starts a cluster of its own: two runs,
    # one for the CPU layouts and one for the GPU ones, took 54 s and 45 s.
    "bench_scaling.py": (["--trials", "1", "--train-digits", "1200", "--depth", "2", "--width", "4", "--gpus", "2",
                          "--layouts", "1,4,6"],
                         [r"2 logical GPU\(s\) declared to Ray; trials compute on the CPU",
                          rf"1 node x 1 CPU, 1 worker/trial +wall +{NUMBER}s", r"DDP across nodes\) .*workers ran on 2 node",
                          rf"ratio 2 nodes x 1 CPU, 2 workers/trial \(DDP across nodes\) / 1 node x 1 CPU, 1 worker/trial: wall {NUMBER}x",
                          r"2 workers/trial \(DDP, 1 GPU each\) .*GPUs 0\+1\)"]),
    # The two in-process baselines, 15 s each (method (a) is the default command, which the
    # pipeline tests run; its toy version could not fit a search into 15 s), keeping their models
    # for bench_views.py, which runs next on them (`check_views_on_the_kept_models`). One view:
    # 5 would keep 50 s of the 15 to score the test split.
    "bench_baselines.py": (["--minutes", "0.25", "--seeds", "0", "--methods", "optuna", "single", "--storage", "kept",
                            "--views", "1"],
                           [rf"optuna    seed 0: wall +{NUMBER}s +test det IoU {NUMBER}",
                            rf"single    seed 0: wall +{NUMBER}s +test det IoU {NUMBER}", r"test_det_iou"]),
    "bench_model.py": (["--epochs", "1", "--seeds", "0", "--train-digits", "1200", "--variant", "base:",
                        "--variant", "narrow:width=4,depth=2"],
                       [rf"base seed 0 epoch 1: val_det_iou {NUMBER}", rf"narrow seed 0 epoch 1: val_det_iou {NUMBER}",
                        rf"narrow: val_det_iou {NUMBER} ± {NUMBER}"]),
    "bench_stream.py": (["--epochs", "3", "--train-digits", "1200", "--depth", "2", "--width", "4", "--every", "0.2"],
                        [rf"object store before the run: +{NUMBER} MiB", rf"peak in quarter 4 of the run: +{NUMBER} MiB",
                         rf"all 3 epochs synthesized up front would hold {NUMBER} MiB", r"trained 3 epochs",
                         rf"split coordinator: {NUMBER} CPU seconds over the run \({NUMBER}% of a core; lowest "
                         r"priority, paced loop\)"]),
    # Serve batched, with batches of one, and GET /healthz alone, on a random-weight toy export.
    "bench_serve.py": (["--depth", "2", "--width", "4", "--views", "1", "--canvases", "40", "--requests", "48"],
                       [rf"onnxruntime, 1 process, batch 64: {NUMBER} canvases/s",
                        rf"PNG decode \+ preprocessing, 1 thread: {NUMBER} ms per image",
                        (rf"Serve, batch up to 64 \(5 ms wait\), 8 clients: {NUMBER} canvases/s, p50 {NUMBER} ms, "
                         rf"p99 {NUMBER} ms, 0 of 48 requests failed"),
                        r"Serve, no batching \(batch 1\), 8 clients: .* 0 of 48 requests failed",
                        r"Serve, GET /healthz \(no decoding, no model\), 8 clients: .* 0 of 48 requests failed",
                        rf"ratio Serve \(batched\) / onnxruntime batch 64: {NUMBER}"]),
    "bench_search.py": (["--trials", "2", "--max-epochs", "1", "--first-epoch-reports", "2", "--train-digits", "1200",
                         "--test-digits", "200"],
                        [rf"plain Optuna, 1 process, \d+ threads: +{NUMBER}s", rf"trials ran {NUMBER} at once",
                         rf"wall ratio raylocal \(whole command\) / plain Optuna: {NUMBER}"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_benchmark_runs_and_prints_its_figures(case, tiny_mnist_dir, tmp_path):
    flags, expected = CASES[case]
    run_and_check(case.split()[0], [*flags], expected, tiny_mnist_dir, tmp_path)
    if case == "bench_baselines.py":
        check_views_on_the_kept_models(tiny_mnist_dir, tmp_path)


def check_views_on_the_kept_models(tiny_mnist_dir, tmp_path):
    """bench_views.py on the two models bench_baselines.py kept, as exports with their seed in the card."""
    exports = sorted(str(path) for path in (tmp_path / "kept").glob("*-0/best_model"))
    assert len(exports) == 2, exports
    run_and_check("bench_views.py", [*exports, "--limit", "60", "--views", "1", "3", "5"],
                  [rf"single-0/best_model +seed 0 +views 5: errors +\d+ +det IoU {NUMBER} .* {NUMBER} ms/1k canvases",
                   r"3 views minus 1, over 2 model", r"5 views minus 1, over 2 model"], tiny_mnist_dir, tmp_path)


def run_and_check(script: str, flags: list[str], expected: list[str], data_dir, cwd) -> None:
    process = subprocess.run(
        [sys.executable, str(EXPERIMENTS / script), "--data-dir", str(data_dir), "--unverified-data", *flags],
        cwd=cwd, capture_output=True, text=True, timeout=400,
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    for pattern in expected:
        assert re.search(pattern, process.stdout), f"{pattern!r} not in:\n{process.stdout}"
