"""Nothing from disk is unpickled beyond tensors (checkpoints and exported weights load weights-only),
and a local search is reachable from this machine alone, with the token."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from raylocal.config import ModelConfig
from raylocal.export import export_model, load_state_dict_model
from raylocal.model import build_model
from raylocal.trial import CHECKPOINT_FILE, load_checkpoint_state


class Payload:
    """Stands for any class a hostile pickle could name."""


def test_a_checkpoint_holding_objects_is_refused(tmp_path):
    from ray.train import Checkpoint

    torch.save({"model": {}, "epoch": 1, "extra": Payload()}, tmp_path / CHECKPOINT_FILE)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint_state(Checkpoint.from_directory(tmp_path))


def test_a_checkpoint_of_tensors_loads(tmp_path):
    from ray.train import Checkpoint

    torch.save({"model": {"w": torch.ones(2)}, "epoch": 1.5}, tmp_path / CHECKPOINT_FILE)
    state = load_checkpoint_state(Checkpoint.from_directory(tmp_path))
    assert state["epoch"] == 1.5 and torch.equal(state["model"]["w"], torch.ones(2))


def test_exported_weights_holding_objects_are_refused(tmp_path):
    export_dir = export_model(build_model(ModelConfig(depth=2, width=4, head_width=16)), tmp_path / "e", {}, log=print)
    torch.save({"weights": Payload()}, export_dir / "state_dict.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_state_dict_model(export_dir)


def test_the_dashboards_job_api_refuses_requests_without_the_token(ray_session):
    """The test session's cluster is token-protected like the product's local instance; its
    token is the session's own (RAY_AUTH_TOKEN), not one written into ~/.ray."""
    import urllib.error
    import urllib.request

    url = f"http://{ray_session.head_node.address_info['webui_url']}/api/jobs/"
    assert url.startswith("http://127.0.0.1:")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=10)
    assert refused.value.code == 401
    with pytest.raises(urllib.error.HTTPError) as wrong:
        urllib.request.urlopen(urllib.request.Request(url, headers={"Authorization": "Bearer wrong"}), timeout=10)
    assert wrong.value.code == 403
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {os.environ['RAY_AUTH_TOKEN']}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


@pytest.fixture
def as_a_user(tmp_path, monkeypatch):
    """The environment of a user who never heard of Ray's token: no RAY_AUTH_* variable (the test
    session sets its own), and a home of the test's own, where Ray writes the token it makes.
    Requested before `start_search`, which takes the environment when it is set up."""
    for key in [key for key in os.environ if key.startswith("RAY_AUTH")]:
        monkeypatch.delenv(key)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


# Slow tier: a whole local search with its final run. In the fast one, test_cluster checks that a local
# instance's address is on loopback, and the test above that the dashboard wants the token.
@pytest.mark.slow
def test_a_local_search_listens_on_loopback_alone_and_its_dashboard_wants_the_token(as_a_user, tmp_path,
                                                                                      tiny_mnist_dir, start_search):
    """A default local search (inline trials, then a final run over two DDP workers), started as a
    user would, with no token setting: every socket of its process tree is on loopback, its DDP
    rendezvous store and gloo's included, and Ray turned token authentication on by itself: its
    dashboard's job API refuses a request without the token and answers one with the token Ray
    wrote into the user's home (here the test's own)."""
    import re
    import signal
    import threading
    import urllib.error
    import urllib.request

    from helpers import Listeners
    from train_sockets import TrainWorkerSockets

    # Not --quiet: the workers' output reaches the console, where the final run's progress must show
    # and Ray's per-report lines and the stream's progress bars must not.
    process = start_search("--smoke-test", "--data-dir", str(tiny_mnist_dir), "--unverified-data",
                           "--storage", str(tmp_path / "results"), "--name", "listening")
    # The kill fixture ends the group at teardown; this ends a hung search before pytest would.
    watchdog = threading.Timer(400, lambda: os.killpg(process.pid, signal.SIGKILL))
    watchdog.start()
    answers, lines = {}, []
    try:
        with Listeners(process.pid) as listeners, TrainWorkerSockets(process.pid) as train_sockets:
            for line in process.stdout:
                lines.append(line)
                found = re.search(r"ray: dashboard at (\S+)", line)
                if found:
                    url = f"{found.group(1)}/api/jobs/"
                    with pytest.raises(urllib.error.HTTPError) as refused:
                        urllib.request.urlopen(url, timeout=10)
                    answers["without"] = refused.value.code
                    token = (as_a_user / ".ray" / "auth_token").read_text().strip()
                    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
                    with urllib.request.urlopen(request, timeout=10) as response:
                        answers["with"] = response.status
            process.wait(timeout=60)
    finally:
        watchdog.cancel()
    output = "".join(lines)
    assert process.returncode == 0, output
    assert "final: final-1-seed0" in output  # the final phase ran: Train workers, a process group
    # Its one epoch, logged once by rank 0 of the DDP run; nothing per report from Ray.
    assert output.count("final: final-1-seed0: epoch 1 of 1: validation det IoU") == 1, output
    for noise in ("Reporting training result", "Checkpoint successfully created", "row/s"):  # row/s: a data bar
        assert noise not in output, output
    assert answers == {"without": 401, "with": 200}, output
    assert listeners.of("RayTrainWorker") and listeners.of("raylet") and listeners.of("dashboard"), listeners.seen
    assert not listeners.beyond_loopback(), listeners.beyond_loopback()
    # The DDP final run's own sockets were seen, not missed between two polls: rank 0's rendezvous
    # store and gloo's listener(s), each connected to by the other worker, all on loopback.
    between = train_sockets.between_workers()
    assert len(between) >= 2, (between, train_sockets.listening, train_sockets.connected)
    assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1") for ip, _ in between), between
