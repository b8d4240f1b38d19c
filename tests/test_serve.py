"""`raylocal serve` as a user runs it: a process serving a tiny export on a free loopback port,
answering as `raylocal predict` does, refusing bad requests with a 4xx while it goes on serving,
and losing no request of a bounded load from 8 concurrent clients."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from argparse import Namespace
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raylocal import predict, serve
from raylocal.cluster import LOOPBACK_SWITCH, free_port
from raylocal.config import ModelConfig
from raylocal.export import export_model
from raylocal.model import build_model
from raylocal.preprocess import MAX_BYTES, MAX_SIDE
from raylocal.synthesis import CANVAS

STARTUP_S = 240
LOAD_CLIENTS, LOAD_REQUESTS = 8, 160


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def sample_images() -> dict[str, np.ndarray]:
    """A digit-sized bar on a canvas, the same dark on light, and a close-up photo of it 4x larger."""
    canvas = np.zeros((CANVAS, CANVAS), dtype=np.uint8)
    canvas[20:40, 30:36] = 255
    photo = np.zeros((300, 400), dtype=np.uint8)
    photo[60:140, 150:174] = 230
    photo += np.random.default_rng(0).integers(0, 20, photo.shape, dtype=np.uint8)
    return {"canvas": canvas, "inverted": 255 - canvas, "close-up": photo}


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_model(ModelConfig(depth=2, width=4, head_width=16))
    return export_model(model, tmp_path_factory.mktemp("export") / "best_model", {}, log=lambda line: None)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("images")
    paths = {}
    for name, pixels in sample_images().items():
        paths[name] = folder / f"{name}.png"
        paths[name].write_bytes(png_bytes(pixels))
    return paths


@pytest.fixture(scope="module")
def serve_url(export_dir, tmp_path_factory):
    """`python -m raylocal.serve EXPORT_DIR --port P` in a process group of its own, with a local Ray
    instance of its own; stopped with SIGTERM as a user's Ctrl+C would, its group killed if it lingers."""
    port = free_port()
    # Without the session's loopback switch: the command binds Ray to loopback itself, as for a user.
    env = {key: value for key, value in os.environ.items() if key != LOOPBACK_SWITCH}
    log = (tmp_path_factory.mktemp("serve") / "serve.log").open("w+")
    process = subprocess.Popen([sys.executable, "-m", "raylocal.serve", str(export_dir), "--port", str(port)],
                               env=env | {"RAY_USAGE_STATS_ENABLED": "0"}, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process, log)
        yield url
    finally:
        stop(process)
        log.close()


def wait_until_healthy(url: str, process: subprocess.Popen, log) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            pytest.fail(f"raylocal serve exited with {process.returncode}:\n{log.read()[-3000:]}")
        with contextlib.suppress(OSError):
            if get(url + "/healthz")[0] == 200:
                return
        time.sleep(1)
    log.seek(0)
    pytest.fail(f"raylocal serve did not answer /healthz within {STARTUP_S} s:\n{log.read()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    # Whatever of its group is left (Ray's processes, should its shutdown have failed).
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)


def get(url: str) -> tuple[int, dict]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, json.loads(response.read())


def post(url: str, body: bytes, content_type: str = "image/png", timeout: float = 60) -> tuple[int, dict]:
    request = urllib.request.Request(url + "/predict", data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def predicted(export_dir: Path, paths: list[Path], capsys) -> dict[str, dict]:
    results = predict.main(Namespace(export_dir=export_dir, images=paths, annotate=None))
    capsys.readouterr()
    return {Path(result.pop("image")).stem: result for result in results}


def assert_same_answer(served: dict, expected: dict) -> None:
    """model.onnx (served on CPUs) and model.pt2 (predict) agree within the export's own check."""
    assert served["label"] == expected["label"]
    assert served["confidence"] == pytest.approx(expected["confidence"], abs=1e-3)
    assert served["preprocessing"] == expected["preprocessing"]
    for key in ("box", "canvas_box"):
        assert list(served[key].values()) == pytest.approx(list(expected[key].values()), abs=1e-3)
    assert served["box_pixels"] == pytest.approx(expected["box_pixels"], abs=0.5)


def test_served_answers_match_predict_on_the_same_images(serve_url, export_dir, images, capsys):
    expected = predicted(export_dir, list(images.values()), capsys)
    for name, path in images.items():
        status, answer = post(serve_url, path.read_bytes())
        assert status == 200, answer
        assert_same_answer(answer, expected[name])
    assert any("scaled by" in note for note in expected["close-up"]["preprocessing"])


def test_a_json_batch_of_canvases_answers_each(serve_url, export_dir, images, capsys):
    expected = predicted(export_dir, [images["canvas"]], capsys)["canvas"]
    canvas = sample_images()["canvas"] / 255
    status, answer = post(serve_url, json.dumps({"canvases": [canvas.tolist()] * 3}).encode(), "application/json")
    assert status == 200, answer
    assert len(answer["predictions"]) == 3
    for served in answer["predictions"]:
        assert_same_answer(served, expected)


def huge_png() -> bytes:
    return png_bytes(np.zeros((2, MAX_SIDE + 1), dtype=np.uint8))


BAD_REQUESTS = {
    "empty body": (b"", "image/png", 400, "empty body"),
    "not an image": (b"hello, not an image", "image/png", 415, "not an image"),
    "huge image": (huge_png(), "image/png", 413, f"larger than {MAX_SIDE}x{MAX_SIDE}"),
    "huge body": (b"\0" * (MAX_BYTES + 1), "image/png", 413, "larger than the limit of 8 MiB"),
    "not JSON": (b'{"canvases": [', "application/json", 400, "not valid JSON"),
    "no canvases": (b'{"images": []}', "application/json", 422, 'expected a JSON object {"canvases"'),
    "wrong shape": (json.dumps({"canvases": [[[0.5] * 75] * 74]}).encode(), "application/json", 422,
                    "got shape (74, 75)"),
    "ragged": (json.dumps({"canvases": [[[0.5] * 75] * 74 + [[0.5]]]}).encode(), "application/json", 422,
               "all the same shape"),
    "non-finite": (json.dumps({"canvases": [[[float("nan")] * 75] * 75]}).encode(), "application/json", 422,
                   "non-finite"),
    "out of range": (json.dumps({"canvases": [[[255.0] * 75] * 75]}).encode(), "application/json", 422,
                     "must lie in [0, 1]"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_a_bad_request_gets_a_4xx_with_one_line_and_the_server_goes_on(serve_url, images, case):
    body, content_type, status, reason = BAD_REQUESTS[case]
    got, answer = post(serve_url, body, content_type)
    assert (got, set(answer)) == (status, {"error"}), answer
    assert reason in answer["error"] and "\n" not in answer["error"]
    assert get(serve_url + "/healthz")[1]["status"] == "ok"
    assert post(serve_url, images["canvas"].read_bytes())[0] == 200


def test_a_bounded_load_from_8_clients_loses_no_request(serve_url, images):
    bodies = [path.read_bytes() for path in images.values()]
    want = {index: post(serve_url, body)[1] for index, body in enumerate(bodies)}

    def one(number: int) -> tuple[int, int, dict]:
        index = number % len(bodies)
        status, answer = post(serve_url, bodies[index], timeout=120)
        return index, status, answer

    with ThreadPoolExecutor(LOAD_CLIENTS) as clients:
        answers = list(clients.map(one, range(LOAD_REQUESTS), timeout=600))
    assert len(answers) == LOAD_REQUESTS
    assert [status for _, status, _ in answers] == [200] * LOAD_REQUESTS
    for index, _, answer in answers:
        # Batched with others or alone, a canvas gets the same answer.
        assert answer["label"] == want[index]["label"]
        assert answer["confidence"] == pytest.approx(want[index]["confidence"], abs=1e-5)


def test_the_exported_program_runtime_answers_as_onnxruntime(export_dir):
    """The GPU path's runtime (model.pt2's program, here on the CPU) against onnxruntime's on the same canvases;
    the tests in test_gpu.py run it on CUDA."""
    canvases = np.stack([sample_images()["canvas"], 255 - sample_images()["canvas"], np.zeros((CANVAS, CANVAS), np.uint8)])
    onnx = serve.Predictor.of(export_dir)
    program = serve.Predictor.of(export_dir, runtime="pt2")
    assert (onnx.runtime, program.runtime) == ("onnx", "pt2")
    for served, reference in zip(program(canvases), onnx(canvases)):
        np.testing.assert_allclose(served, reference, atol=1e-4)


def test_a_storage_uri_that_cannot_be_read_is_one_line_before_ray_starts(monkeypatch, capsys):
    # A store that does not answer (nothing listens on the port); never AWS's own addresses.
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    for key, value in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(key, value)
    assert serve.cli(["s3://bucket/best_model"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot read s3://bucket/best_model: NETWORK_CONNECTION" in err, err
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_a_folder_without_an_export_is_refused_before_ray_starts(tmp_path, capsys):
    assert serve.cli([str(tmp_path)]) == 2
    assert "is not an export: it has no model.onnx or model.pt2" in capsys.readouterr().err
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_help_imports_neither_torch_nor_ray():
    code = ("import sys; sys.argv = ['raylocal-serve', '--help']; import raylocal.serve as m\n"
            "try:\n    m.cli()\nexcept SystemExit:\n    pass\n"
            "print(sorted({'torch', 'ray', 'onnxruntime'} & set(sys.modules)))")
    process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                             check=False)
    assert "--max-batch-size" in process.stdout and "--host" in process.stdout
    assert process.stdout.strip().splitlines()[-1] == "[]", process.stdout + process.stderr


def test_serve_yaml_builds_the_same_application(export_dir):
    """serve.yaml names an app builder that takes its args (the export folder put where the test has one)."""
    import importlib

    import yaml
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((Path(__file__).parents[1] / "serve.yaml").read_text())
    assert ServeDeploySchema.model_validate(config).http_options.host == "127.0.0.1"
    [app] = config["applications"]
    module, _, name = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), name)
    application = builder(app["args"] | {"export_dir": str(export_dir), "device": "cpu"})
    assert type(application).__name__ == "Application"
    with pytest.raises(serve.UsageError, match="is not an export"):
        builder(app["args"] | {"device": "cpu"})
