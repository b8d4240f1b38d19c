"""Nothing from disk is unpickled beyond tensors: checkpoints and exported weights load weights-only."""

from __future__ import annotations

import pickle

import pytest
import torch

from raylocal.config import ModelConfig
from raylocal.export import export_model, load_state_dict_model
from raylocal.model import build_model
from raylocal.train import CHECKPOINT_FILE, load_checkpoint_state


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


@pytest.mark.ray
def test_the_dashboards_job_api_refuses_requests_without_the_token(ray_session):
    """The test session's cluster is token-protected like the product's local instance; its
    token is the session's own (RAY_AUTH_TOKEN), not one written into ~/.ray."""
    import os

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
