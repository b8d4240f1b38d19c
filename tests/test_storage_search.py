"""A whole search on object storage: a real S3 server (moto) on loopback, searches as users start them.

Each search runs in a process of its own with its own Ray instance: its workers then have the
variables a user sets for an S3-compatible store, as every node of a cluster would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import experiment
from s3server import s3_server

from raylocal.results import read_search

pytest.importorskip("moto", reason="the S3 tests need moto[server] (pip install -e '.[test]')")

BUCKET = "bars"


@pytest.fixture(scope="module")
def s3():
    with s3_server() as server:
        server.make_bucket(BUCKET)
        yield server


@pytest.fixture
def s3_env(s3, tmp_path):
    """A user's environment for the store, with a home (and so a cache) of the test's own."""
    home = tmp_path / "home"
    home.mkdir()
    return s3.environment() | {"HOME": str(home), "RAYLOCAL_CACHE": str(home / "cache")}


def run_command(module: str, *args: str, env: dict[str, str], cwd: Path, timeout: float = 300) -> str:
    done = subprocess.run([sys.executable, "-m", module, *args], env=os.environ | env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done.stdout


def no_local_uri_folders(*roots: Path) -> bool:
    """A URI taken for a local path leaves a folder named `s3:` behind."""
    return not any(path.name.endswith(":") for root in roots for path in root.rglob("*"))


@pytest.mark.slow  # a second whole smoke search, with the readers after it
def test_a_smoke_search_lives_in_the_bucket_and_its_readers_take_the_uri(s3, s3_env, tmp_path, tiny_mnist_dir,
                                                                          start_search):
    search = start_search("--smoke-test", "--data-dir", str(tiny_mnist_dir), "--unverified-data", "--quiet",
                          "--storage", f"s3://{BUCKET}/raylocal", "--name", "s3a", "--views", "1",
                          extra_env=s3_env)
    output, _ = search.communicate(timeout=600)
    assert search.returncode == 0, output[-4000:]
    keys = s3.keys(BUCKET, "raylocal/s3a/")
    names = {key.removeprefix("raylocal/s3a/") for key in keys}
    assert "raylocal_search.json" in names, names
    assert any(name.startswith("experiment_state") for name in names), names  # Tune's saved state
    assert any(name.startswith("run_trial_") and name.endswith("/result.json") for name in names)
    assert any(name.startswith("final/final-1-seed0/checkpoint_") for name in names)
    assert {"best_model/model.pt2", "best_model/model.onnx", "best_model/model_card.json",
            "report/report.md", "report/trials.csv"} <= names
    assert f"export: uploaded to s3://{BUCKET}/raylocal/s3a/best_model" in output
    # The local copy of the export, and no folder named after the URI anywhere.
    assert (tmp_path / "raylocal_results" / "s3a" / "best_model" / "model.pt2").is_file()
    assert no_local_uri_folders(tmp_path)
    card = json.loads(s3.client().get_object(Bucket=BUCKET, Key="raylocal/s3a/best_model/model_card.json")["Body"].read())
    assert card["search"]["storage"] == f"s3://{BUCKET}/raylocal/s3a"

    # The readers, from another folder, as on another machine that sees the bucket.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    report = run_command("raylocal.report", f"s3://{BUCKET}/raylocal/s3a", env=s3_env, cwd=elsewhere)
    assert "report.md" in report
    evaluation = run_command("raylocal.evaluate", f"s3://{BUCKET}/raylocal/s3a/best_model", "--data-dir",
                             str(tiny_mnist_dir), "--unverified-data", "--limit", "50", env=s3_env, cwd=elsewhere)
    assert "det_iou" in evaluation
    from PIL import Image

    Image.new("L", (75, 75)).save(elsewhere / "blank.png")
    prediction = run_command("raylocal.predict", f"s3://{BUCKET}/raylocal/s3a/best_model",
                             str(elsewhere / "blank.png"), env=s3_env, cwd=elsewhere)
    assert json.loads(prediction.splitlines()[0])["label"] in range(10)
    assert no_local_uri_folders(tmp_path)


def trial_statuses(s3, name: str) -> list[str]:
    """How each trial ended, from Tune's saved state in the bucket (read with the store's endpoint)."""
    from pyarrow import fs as pafs

    from raylocal.storage import Storage

    bucket = pafs.S3FileSystem(endpoint_override=s3.endpoint.removeprefix("http://"), scheme="http",
                               access_key="testing", secret_key="testing", region="us-east-1")
    folder = Storage(f"s3://{BUCKET}/raylocal/{name}", bucket, f"{BUCKET}/raylocal/{name}")
    return [trial.status for trial in read_search(folder)]


def trial_rows(s3, prefix: str) -> dict[str, list[dict]]:
    """Each trial's result rows as the bucket holds them now."""
    rows = {}
    for key in s3.keys(BUCKET, prefix):
        if key.endswith("/result.json") and "/run_trial_" in f"/{key}":
            body = s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()
            rows[key.split("/")[-2]] = [json.loads(line) for line in body.splitlines() if line.strip()]
    return rows


def wait_for_one_done_and_one_running(s3, prefix: str, process, max_epochs: int, timeout: float = 400):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()[-4000:]
        rows = trial_rows(s3, prefix)
        done = [name for name, got in rows.items() if got and got[-1]["epoch"] >= max_epochs]
        running = [name for name, got in rows.items() if got and 1 <= got[-1]["epoch"] < max_epochs - 1]
        if done and running:
            return rows, done[0], running[0]
        time.sleep(0.5)
    pytest.fail("no moment with one trial finished and one running")


@pytest.mark.slow
def test_a_search_killed_on_one_machine_resumes_from_the_bucket_on_another(s3, s3_env, tmp_path, tiny_mnist_dir,
                                                                            start_search):
    (tmp_path / "space.toml").write_text(experiment(trials=3, max_epochs=6, width=8))
    flags = ("--storage", f"s3://{BUCKET}/raylocal", "--name", "killed", "--quiet", "--time-budget", "0")
    first = start_search("--experiment", "space.toml", "--no-final", "--data-dir", str(tiny_mnist_dir),
                         "--unverified-data", *flags, extra_env=s3_env | {"TUNE_GLOBAL_CHECKPOINT_S": "1"})
    before, finished, interrupted = wait_for_one_done_and_one_running(s3, "raylocal/killed/", first, 6)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    before = trial_rows(s3, "raylocal/killed/")

    # Another working folder and home: nothing of the first process's disk is used.
    other = tmp_path / "other-machine"
    (other / "home").mkdir(parents=True)
    second = start_search("--resume", *flags, cwd=other,
                          extra_env=s3_env | {"HOME": str(other / "home"), "RAYLOCAL_CACHE": str(other / "cache")})
    output, _ = second.communicate(timeout=600)
    assert second.returncode == 0, output[-4000:]
    statuses = trial_statuses(s3, "killed")
    assert statuses == ["TERMINATED"] * 3, statuses
    after = trial_rows(s3, "raylocal/killed/")
    assert after[finished] == before[finished]  # a finished trial is not redone
    resumed = after[interrupted][len(before[interrupted]):]
    assert resumed and resumed[0]["epoch"] > before[interrupted][0]["epoch"]
    assert "raylocal/killed/best_model/model.pt2" in s3.keys(BUCKET, "raylocal/killed/")
    assert no_local_uri_folders(tmp_path)


@pytest.mark.slow
def test_a_storage_outage_mid_search_loses_no_finished_trial(s3, s3_env, tmp_path, tiny_mnist_dir, start_search):
    (tmp_path / "space.toml").write_text(experiment(trials=3, max_epochs=6, width=8))
    flags = ("--storage", f"s3://{BUCKET}/raylocal", "--name", "outage", "--quiet", "--time-budget", "0")
    search = start_search("--experiment", "space.toml", "--no-final", "--data-dir", str(tiny_mnist_dir),
                          "--unverified-data", *flags, extra_env=s3_env | {"TUNE_GLOBAL_CHECKPOINT_S": "1"})
    before, finished, _ = wait_for_one_done_and_one_running(s3, "raylocal/outage/", search, 6)
    with s3.frozen():
        time.sleep(20)
    output, _ = search.communicate(timeout=600)
    # Either it rode the outage out, or it failed saying so; a resume then finishes what is left.
    print(f"the search {'rode the outage out' if search.returncode == 0 else 'failed'}: {output[-1500:]}")
    if search.returncode != 0:
        again = start_search("--resume", *flags, extra_env=s3_env)
        resumed, _ = again.communicate(timeout=600)
        assert again.returncode == 0, resumed[-4000:]
    after = trial_rows(s3, "raylocal/outage/")
    assert after[finished] == before[finished]  # not redone, not lost
    statuses = trial_statuses(s3, "outage")
    assert statuses == ["TERMINATED"] * 3, statuses
