"""Shared fixtures: a tiny MNIST in IDX files and one Ray instance for the whole session."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from raylocal.mnist import write_idx_files

TINY_TRAIN, TINY_TEST = 1200, 200
REAL_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def tiny_digits(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Digit-like 28x28 images: a bright bar whose position encodes the label, so a model can learn it."""
    labels = rng.integers(0, 10, count).astype(np.uint8)
    images = rng.integers(0, 40, (count, 28, 28)).astype(np.uint8)
    for index, label in enumerate(labels):
        top = 2 + 2 * int(label)
        images[index, top : top + 4, 6:22] = 255
    return images, labels


@pytest.fixture(scope="session")
def tiny_mnist_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny_mnist")
    rng = np.random.default_rng(7)
    write_idx_files(directory, *tiny_digits(rng, TINY_TRAIN), *tiny_digits(rng, TINY_TEST))
    return directory


@pytest.fixture(scope="session")
def ray_session():
    """The one Ray cluster of the test session (Ray Train refuses to pick among several instances):
    two real nodes on this machine, a head and a worker with one CPU each, so that every
    integration test also runs multi-node."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Ray's usage-stats poller outlives pytest's captured streams and logs into closed files.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from raylocal.tune import free_port, pin_local_address

    # Named in RAY_ADDRESS for every process of the cluster: Ray Train finds its cluster by it,
    # also while a test's own searches run further Ray instances beside this one.
    pin_local_address()
    node = {"num_cpus": 1, "object_store_memory": 512 * 1024**2}
    # The dashboard is on because Ray Train cleans up placement groups through its state API.
    cluster = Cluster(
        initialize_head=True, head_node_args=node | {"include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": free_port()}
    )
    os.environ.pop("RAY_GCS_SERVER_PORT")
    cluster.add_node(**node)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
