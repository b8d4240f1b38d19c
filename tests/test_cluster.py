"""The one place that starts Ray: environment changes undone, free ports, a local instance on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from raylocal.cluster import check_reachable, environment, free_port, same_endpoint
from raylocal.config import ConfigError


def test_environment_sets_removes_and_puts_everything_back(monkeypatch):
    monkeypatch.setenv("RAYLOCAL_TEST_KEPT", "before")
    monkeypatch.delenv("RAYLOCAL_TEST_NEW", raising=False)
    with environment(RAYLOCAL_TEST_KEPT=None, RAYLOCAL_TEST_NEW="during"):
        assert "RAYLOCAL_TEST_KEPT" not in os.environ and os.environ["RAYLOCAL_TEST_NEW"] == "during"
    assert os.environ["RAYLOCAL_TEST_KEPT"] == "before" and "RAYLOCAL_TEST_NEW" not in os.environ
    with pytest.raises(RuntimeError), environment(RAYLOCAL_TEST_KEPT="changed"):
        raise RuntimeError("a failure inside still restores")
    assert os.environ["RAYLOCAL_TEST_KEPT"] == "before"


def test_free_port_is_bindable_on_loopback():
    port = free_port()
    with socket.socket() as server:
        server.bind(("127.0.0.1", port))


def test_an_address_names_the_connected_cluster_however_its_host_is_spelled():
    assert same_endpoint("localhost:6379", "127.0.0.1:6379") and same_endpoint("127.0.0.1:6379", "127.0.0.1:6379")
    assert not same_endpoint("127.0.0.1:6380", "127.0.0.1:6379") and not same_endpoint("10.1.2.3:6379", "127.0.0.1:6379")


def test_an_address_nothing_listens_on_fails_fast():
    port = free_port()  # closed again at once: nothing listens there
    with pytest.raises(ConfigError, match=f"--address 127.0.0.1:{port}: no Ray cluster answers there"):
        check_reachable(f"127.0.0.1:{port}")


@pytest.mark.ray
def test_a_local_instance_is_on_loopback_and_leaves_the_environment_as_it_found_it(tmp_path):
    """In a fresh process, as a user's notebook would: start, look, stop, look again."""
    script = """
import json, os
from raylocal.cluster import local_instance
keys = ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
before = {key: os.environ.get(key) for key in keys}
with local_instance(quiet=True, log=print, num_cpus=1) as context:
    import ray
    during = {key: os.environ.get(key) for key in keys}
    address, node_ip = context.address_info["address"], ray.util.get_node_ip_address()
after = {key: os.environ.get(key) for key in keys}
print(json.dumps({"before": before, "during": during, "after": after, "address": address, "node_ip": node_ip,
                  "connected": ray.is_initialized()}))
"""
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                             cwd=tmp_path, env=env)
    assert process.returncode == 0, process.stderr[-3000:]
    seen = json.loads(process.stdout.strip().splitlines()[-1])
    assert seen["address"].startswith("127.0.0.1:") and seen["node_ip"] == "127.0.0.1"
    assert seen["during"]["RAY_ADDRESS"] == seen["address"]
    assert seen["during"]["RAY_GCS_SERVER_PORT"] is None  # for the start only
    assert seen["after"] == seen["before"] == {key: None for key in seen["before"]}
    assert not seen["connected"]
    assert f"ray: started a local instance at {seen['address']}" in process.stdout


@pytest.mark.ray
def test_a_test_cluster_leaves_rays_current_cluster_file_as_it_found_it(tmp_path):
    """`ray start --head` records its address there for `ray status` and `--address auto`."""
    script = """
import os
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported, as the test session does
from ray._common.utils import get_ray_address_file
from raylocal.cluster import local_cluster
path = get_ray_address_file(None)
saved = open(path).read() if os.path.isfile(path) else None
try:
    with open(path, "w") as file:
        file.write("10.11.12.13:6379")
    with local_cluster([{"num_cpus": 1}]) as cluster:
        written = open(path).read() == cluster.address
    print(written, open(path).read())
finally:
    if saved is None:
        os.remove(path)
    else:
        open(path, "w").write(saved)
"""
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                             cwd=tmp_path, env=env)
    assert process.returncode == 0, process.stderr[-3000:]
    assert process.stdout.split()[-2:] == ["True", "10.11.12.13:6379"]


@pytest.mark.ray
@pytest.mark.slow
def test_address_auto_joins_an_instance_started_with_ray_start_head(ray_start_head, tmp_path, tiny_mnist_dir):
    from ray._common.utils import get_ray_address_file

    env, address = ray_start_head
    users_file = get_ray_address_file(None)
    before = open(users_file).read() if os.path.isfile(users_file) else None
    process = subprocess.run(
        [sys.executable, "-m", "raylocal.tune", "--address", "auto", "--smoke-test", "--no-final", "--quiet",
         "--data-dir", str(tiny_mnist_dir), "--unverified-data", "--storage", str(tmp_path / "results"),
         "--name", "joined"],
        env=env, capture_output=True, text=True, timeout=400, cwd=tmp_path, start_new_session=True,
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    assert f"ray: joined cluster at {address}" in process.stdout
    assert "started a local instance" not in process.stdout
    assert (tmp_path / "results" / "joined" / "best_model" / "model.onnx").is_file()
    # The user's own "current cluster" file (where `ray status` and `--address auto` look) is untouched.
    assert (open(users_file).read() if os.path.isfile(users_file) else None) == before
