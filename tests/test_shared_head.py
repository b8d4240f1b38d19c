"""Two searches at once on one instance a user started with `ray start --head`, both joining it
with `--address auto`: both finish and export, and they really ran side by side."""

from __future__ import annotations

import subprocess
import sys

import pytest

from raylocal.results import all_reports, read_search

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_two_searches_share_one_ray_start_head_instance_at_once(ray_start_head, tmp_path, tiny_mnist_dir):  # noqa: F811
    env, address = ray_start_head
    runs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "raylocal.tune", "--address", "auto", "--smoke-test", "--trials", "1", "--no-final",
             "--quiet", "--data-dir", str(tiny_mnist_dir), "--unverified-data", "--storage", str(tmp_path / "results"),
             "--name", name],
            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        for name in ("first", "second")
    }
    try:
        outputs = {name: process.communicate(timeout=500)[0] for name, process in runs.items()}
    finally:
        for process in runs.values():
            if process.poll() is None:
                process.kill()
    spans = {}
    for name, process in runs.items():
        assert process.returncode == 0, outputs[name][-3000:]
        assert f"ray: joined cluster at {address}" in outputs[name], outputs[name][-3000:]
        assert "started a local instance" not in outputs[name]
        assert (tmp_path / "results" / name / "best_model" / "model.onnx").is_file()
        reports = all_reports(read_search(tmp_path / "results" / name))
        # A trial trained from its first report's time less the time it had trained by then.
        spans[name] = ((reports["timestamp"] - reports["time_total_s"]).min(), reports["timestamp"].max())
    # Side by side: each search's trial trained while the other's did.
    (first_start, first_end), (second_start, second_end) = spans["first"], spans["second"]
    assert first_start <= second_end and second_start <= first_end, spans
