"""Ray instance stage: start a local Ray instance (or a multi-node test cluster), or join a
running one, and stop it. The one place that starts Ray: the CLI, the benchmarks and the tests.

A local instance serves this machine alone: Ray's own single-machine switch
(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) makes GCS, raylets and workers listen on 127.0.0.1, and
the dashboard is bound there too; Ray 2.60 turns token authentication on by itself. The
instance's GCS address is chosen before the start and named in RAY_ADDRESS, which every process
of the instance inherits: Ray Train's placement-group cleaner looks its cluster up with no
address, and with a second instance on the machine (another search) that lookup fails
("Found multiple active Ray instances") and the trial hangs.

Every environment variable set here is put back when the instance stops.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import sys
from collections.abc import Iterator
from typing import Any

from raylocal.config import ConfigError

LOOPBACK = "127.0.0.1"
# Ray reads this switch when it is first imported; raylocal sets it around every start, and
# checks after the start that the instance really is on loopback.
LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
OBJECT_STORE_FOR_TESTS = 512 * 1024**2


@contextlib.contextmanager
def environment(**values: str | None) -> Iterator[None]:
    """Set (or, with None, remove) environment variables; put back what was there on exit."""
    saved = {key: os.environ.get(key) for key in values}

    def apply(settings: dict[str, str | None]) -> None:
        for key, value in settings.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    apply(values)
    try:
        yield
    finally:
        apply(saved)


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nothing listens on now (the OS's pick), for a process about to start."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def check_reachable(address: str) -> None:
    """A HOST:PORT that nothing listens on fails here in seconds; ray.init would retry for minutes."""
    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError) as error:
        raise ConfigError(f"--address {address}: no Ray cluster answers there ({error})") from None


def check_loopback(address: str) -> None:
    import ray

    if not address.startswith(f"{LOOPBACK}:") or ray.util.get_node_ip_address() != LOOPBACK:
        raise RuntimeError(
            f"the local Ray instance came up at {address}, not on {LOOPBACK}: Ray was imported before "
            f"{LOOPBACK_SWITCH}=0 was set (set it before importing ray, or let raylocal import ray first)"
        )


def pinned(port: int):
    """The environment of a local instance's processes while it runs (loopback, its address in
    RAY_ADDRESS); RAY_GCS_SERVER_PORT is set by `starting` for the start only."""
    return environment(**{LOOPBACK_SWITCH: "0", "RAY_ADDRESS": f"{LOOPBACK}:{port}"})


def starting(port: int):
    return environment(RAY_GCS_SERVER_PORT=str(port))


def announce(context, what: str, log) -> None:
    log(f"ray: {what}")
    if context.dashboard_url:
        log(f"ray: dashboard at http://{context.dashboard_url}")


@contextlib.contextmanager
def local_instance(*, quiet: bool = False, log=print, **init_args: Any) -> Iterator[Any]:
    """A new local Ray instance for this machine alone (see the module's docstring); `init_args`
    go to `ray.init` (num_cpus, num_gpus, ...). Yields Ray's context; stops the instance on exit."""
    port = free_port()
    address = f"{LOOPBACK}:{port}"
    with pinned(port):
        import ray

        with starting(port):
            # "local" starts a new instance even when RAY_ADDRESS or an earlier `ray start` exists.
            context = ray.init(address="local", include_dashboard=True, dashboard_host=LOOPBACK,
                               log_to_driver=not quiet, **init_args)
        try:
            if context.address_info["address"] != address:
                raise RuntimeError(f"Ray started at {context.address_info['address']}, not at {address} as asked")
            check_loopback(address)
            announce(context, f"started a local instance at {address}", log)
            yield context
        finally:
            ray.shutdown()


@contextlib.contextmanager
def joined(address: str, *, quiet: bool = False, log=print) -> Iterator[Any]:
    """Join the running cluster at `address` (auto or HOST:PORT); disconnect on exit. A cluster
    on loopback is joined from loopback: this process must then see itself as 127.0.0.1 too."""
    check_reachable(address)
    host = address.rpartition(":")[0].strip("[]")
    loopback = {LOOPBACK_SWITCH: "0"} if host in (LOOPBACK, "localhost", "::1") else {}
    with environment(**loopback):
        import ray

        try:
            context = ray.init(address=address, log_to_driver=not quiet)
        except (ConnectionError, ValueError, RuntimeError) as error:
            raise ConfigError(f"--address {address}: cannot join a Ray cluster there: {error}") from None
        try:
            announce(context, f"joined cluster at {context.address_info['address']}", log)
            yield context
        finally:
            ray.shutdown()


def same_endpoint(address: str, other: str) -> bool:
    """Whether two HOST:PORT addresses name one endpoint (localhost is 127.0.0.1)."""

    def endpoint(text: str) -> tuple[str, str]:
        host, _, port = text.rpartition(":")
        host = host.strip("[]")
        with contextlib.suppress(OSError):
            host = socket.gethostbyname(host)
        return host, port

    return endpoint(address) == endpoint(other)


def connect(address: str | None, *, quiet: bool = False, log=print):
    """The CLI's Ray: nothing to do when this process is already connected (to `address`, if one
    is named), else join `address` or start a local instance. Ray is not imported here: a local
    start must set the loopback switch first."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        connected = ray.get_runtime_context().gcs_address
        if address not in (None, "auto") and not same_endpoint(address, connected):
            # Searching the cluster this process is on instead would ignore what the user asked for.
            raise ConfigError(f"--address {address}: this process is already connected to the Ray cluster at "
                              f"{connected}; call ray.shutdown() first, or pass --address {connected}")
        return contextlib.nullcontext()
    return joined(address, quiet=quiet, log=log) if address else local_instance(quiet=quiet, log=log)


@contextlib.contextmanager
def kept_address_file() -> Iterator[None]:
    """`ray.cluster_utils.Cluster` writes its address into Ray's "current cluster" file and
    deletes that file at shutdown, which would lose a cluster the user started with `ray start`
    (`ray status`, `--address auto`). Put the file back as it was."""
    from ray._common.utils import get_ray_address_file

    path = get_ray_address_file(None)
    saved = open(path).read() if os.path.isfile(path) else None
    try:
        yield
    finally:
        if saved is None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        else:
            with open(path, "w") as file:
                file.write(saved)


@contextlib.contextmanager
def token_auth(token: str) -> Iterator[None]:
    """Token mode for this process and the ones it starts. Ray reads its settings once, when
    imported; like `ray.init` does when it turns token mode on, re-read them (and again after)."""
    from ray._raylet import Config

    try:
        with environment(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token):
            Config.initialize("")
            yield
    finally:
        Config.initialize("")


@contextlib.contextmanager
def local_cluster(nodes: list[dict[str, Any]], *, connect_driver: bool = False) -> Iterator[Any]:
    """A Ray cluster of real separate nodes on this machine (`ray.cluster_utils.Cluster`), one
    per `nodes` entry (keyword arguments of `Cluster.add_node`), started as a local instance is:
    loopback, address pinned, token authentication, dashboard on a free port (another Ray may
    hold 8265). With
    `connect_driver`, this process joins it too. Yields the cluster; shuts it down on exit."""
    port = free_port()
    # Token authentication, which `ray.init` turns on for a local instance and the test-cluster
    # utility does not; a token of its own (unless one is given), so ~/.ray is left alone.
    token = os.environ.get("RAY_AUTH_TOKEN") or secrets.token_hex(32)
    with pinned(port), kept_address_file(), token_auth(token):
        import ray
        from ray.cluster_utils import Cluster

        head = {"object_store_memory": OBJECT_STORE_FOR_TESTS} | nodes[0] | {
            "include_dashboard": True, "dashboard_host": LOOPBACK, "dashboard_port": free_port()}
        with starting(port):
            cluster = Cluster(initialize_head=True, head_node_args=head)
        try:
            check_loopback(cluster.address)
            if cluster.address != f"{LOOPBACK}:{port}":
                raise RuntimeError(f"the cluster started at {cluster.address}, not at {LOOPBACK}:{port} as asked")
            for node in nodes[1:]:
                cluster.add_node(**{"object_store_memory": OBJECT_STORE_FOR_TESTS} | node)
            if connect_driver:
                ray.init(address=cluster.address, log_to_driver=False)
            yield cluster
        finally:
            if connect_driver:
                ray.shutdown()
            cluster.shutdown()
