"""What every benchmark script here shares: its setup line, the data, one local Ray instance."""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import os
import platform
import time

import numpy as np

from raylocal import cluster
from raylocal.mnist import Mnist, load_mnist
from raylocal.synthesis import split_plan, synthesize_split


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
    # The version from the package's metadata: importing Ray before `local_ray` starts it would
    # lose the loopback switch (raylocal.cluster refuses such a start).
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        versions += f", ray {importlib.metadata.version('ray')}"
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


def local_cluster(nodes: list[dict]):
    """A Ray cluster of `nodes` (keyword arguments of `ray.cluster_utils.Cluster.add_node`) on this
    machine, started as `raylocal.tune` starts its own instance (`raylocal.cluster`)."""
    return cluster.local_cluster(nodes)


@contextlib.contextmanager
def local_ray(num_cpus: int, gpus: int = 0):
    """One local Ray instance with `num_cpus` CPUs (and `gpus` GPUs), started as `raylocal.tune` starts its own."""
    started = time.perf_counter()
    with cluster.local_instance(quiet=True, log=lambda line: None, num_cpus=num_cpus, num_gpus=gpus,
                                configure_logging=False) as context:
        print(f"# ray.init with {num_cpus} CPUs took {time.perf_counter() - started:.1f}s")
        yield context


def ratio_line(name: str, value: float, target: float, higher_is_better: bool = True) -> str:
    met = value >= target if higher_is_better else value <= target
    sign = ">=" if higher_is_better else "<="
    return f"{name}: {value:.3f} (target {sign} {target}) -> {'met' if met else 'NOT met'}"
