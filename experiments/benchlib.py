"""What every benchmark script here shares: its setup line, the data, one local Ray instance."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import time

# Ray listens on loopback only, as `raylocal.tune` does; must be set before Ray is imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402

from raylocal.mnist import Mnist, load_mnist  # noqa: E402
from raylocal.synthesis import split_plan, synthesize_split  # noqa: E402


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data-dir", help="MNIST IDX files (else $RAYLOCAL_DATA_DIR, cache, download)")
    parser.add_argument("--unverified-data", action="store_true", help="accept MNIST files with other hashes (test fixtures)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def data_flags(args: argparse.Namespace) -> list[str]:
    """The data flags of this benchmark, for the `raylocal.tune` command it runs."""
    return (["--data-dir", args.data_dir] if args.data_dir else []) + (["--unverified-data"] if args.unverified_data else [])


def print_setup(name: str, **settings) -> None:
    import torch

    versions = f"torch {torch.__version__}"
    with contextlib.suppress(ImportError):
        import ray

        versions += f", ray {ray.__version__}"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(f"# {name}: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), {device}, {versions}")
    print("# settings: " + ", ".join(f"{key}={value}" for key, value in settings.items()))


def load_digits(args: argparse.Namespace, quiet: bool = False) -> Mnist:
    log = (lambda line: None) if quiet else (lambda line: print(f"# {line}"))
    return load_mnist(args.data_dir, verify=not args.unverified_data, log=log)


def train_split(mnist: Mnist, rows: int, seed: int) -> dict[str, np.ndarray]:
    """The first `rows` canvases of training epoch 0, as the search would train on them."""
    plan = split_plan(len(mnist.train_images), len(mnist.test_images))
    columns = synthesize_split(mnist.train_images, mnist.train_labels, plan, seed=seed, split="train", epoch=0, stop=rows)
    return {key: columns[key] for key in ("image", "box", "label")}


@contextlib.contextmanager
def local_cluster(nodes: list[dict]):
    """A Ray cluster of `nodes` (keyword arguments of `ray.cluster_utils.Cluster.add_node`) on this
    machine, its GCS address pinned for every process as `raylocal.tune` pins its own."""
    from ray.cluster_utils import Cluster

    from raylocal.tune import free_port, pin_local_address

    pinned = pin_local_address()
    object_store = 512 * 1024**2
    cluster = Cluster(
        initialize_head=True,
        # A cluster's head takes dashboard port 8265 or fails; another instance may hold it.
        head_node_args=nodes[0] | {"object_store_memory": object_store, "include_dashboard": True,
                                   "dashboard_host": "127.0.0.1", "dashboard_port": free_port()},
    )
    os.environ.pop("RAY_GCS_SERVER_PORT")
    try:
        if cluster.address != pinned:
            raise RuntimeError(f"the cluster started at {cluster.address}, not at {pinned} as asked")
        for node in nodes[1:]:
            cluster.add_node(**node, object_store_memory=object_store)
        yield cluster
    finally:
        cluster.shutdown()


@contextlib.contextmanager
def local_ray(num_cpus: int, dashboard: bool = True, gpus: int = 0):
    """One local Ray instance with `num_cpus` CPUs (and `gpus` GPUs), pinned the way `raylocal.tune` pins its own."""
    import ray

    from raylocal.tune import pin_local_address

    pin_local_address()
    started = time.perf_counter()
    ray.init(
        address="local", num_cpus=num_cpus, num_gpus=gpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
        log_to_driver=False, configure_logging=False,
    )
    os.environ.pop("RAY_GCS_SERVER_PORT")
    print(f"# ray.init with {num_cpus} CPUs took {time.perf_counter() - started:.1f}s")
    try:
        yield ray
    finally:
        ray.shutdown()


def ratio_line(name: str, value: float, target: float, higher_is_better: bool = True) -> str:
    met = value >= target if higher_is_better else value <= target
    sign = ">=" if higher_is_better else "<="
    return f"{name}: {value:.3f} (target {sign} {target}) -> {'met' if met else 'NOT met'}"
