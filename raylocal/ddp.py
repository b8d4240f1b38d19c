"""DDP's process group for Ray Train workers, listening only where it must.

Ray Train's own set-up lets rank 0 host torch's rendezvous store (TCPStore), and the store
listens on every interface (`::`) whatever the master address says: a local search would accept
connections from the network. Here rank 0 binds the store's socket to the master address itself
(Ray's address of rank 0's node: 127.0.0.1 in a local instance) and hands it to the store
(`master_listen_fd`). gloo's and NCCL's own sockets are pinned to the interface of each rank's
node address: loopback in a local instance, the cluster's network across machines (where the host
name may resolve to no address of the machine, and gloo would fall back to loopback and fail).
Everything else is Ray Train's `TorchConfig`.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta

from ray.train.torch import TorchConfig

# Ray 2.60's backend, whose process-group start this module replaces (ray is pinned in pyproject).
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

LOOPBACK_ADDRESSES = ("127.0.0.1", "::1")
# The socket variables gloo and NCCL read to choose their interface.
INTERFACE_VARIABLES = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def loopback_interface() -> str:
    return "lo0" if sys.platform == "darwin" else "lo"


def interface_of(address: str) -> str | None:
    """The network interface that holds `address` on this machine, if one does."""
    import psutil  # Ray ships it and puts it on the path (ray/thirdparty_files)

    for name, entries in psutil.net_if_addrs().items():
        if any(entry.address.split("%")[0] == address for entry in entries):
            return name
    return None


def join_process_group(backend: str, world_rank: int, world_size: int, address: str, port: int,
                       timeout_s: float) -> None:
    """Runs on every worker: rank 0 serves the store on `address:port` alone, the others join it."""
    import torch.distributed as dist

    # A Train worker process serves this one run; what it sets here ends with it.
    os.environ |= {"MASTER_ADDR": address, "MASTER_PORT": str(port)}
    if address in LOOPBACK_ADDRESSES:
        os.environ |= dict.fromkeys(INTERFACE_VARIABLES, loopback_interface())
    else:
        import ray

        # This rank's own node address, where Ray reaches it: gloo's default is the host name's.
        interface = interface_of(ray.util.get_node_ip_address())
        if interface:
            os.environ |= {name: os.environ.get(name, interface) for name in INTERFACE_VARIABLES}
    timeout = timedelta(seconds=timeout_s)
    if world_rank == 0:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        listener = socket.create_server((address, port), family=family, backlog=max(128, world_size))
        store = dist.TCPStore(address, port, world_size, is_master=True, timeout=timeout,
                              master_listen_fd=listener.detach())
    else:
        store = dist.TCPStore(address, port, world_size, is_master=False, timeout=timeout)
    dist.init_process_group(backend=backend, store=store, rank=world_rank, world_size=world_size,
                            timeout=timeout)


class BoundTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: BoundTorchConfig) -> None:
        import ray
        from ray.train._internal.utils import get_address_and_port
        from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup

        address, port = worker_group.execute_single(0, get_address_and_port)
        if not isinstance(worker_group, V1WorkerGroup):
            # Ray Train V1 sets these when training starts, V2 here (as Ray's own backend does).
            worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([
            worker_group.execute_single_async(rank, join_process_group, backend=backend_config.backend,
                                              world_rank=rank, world_size=len(worker_group), address=address,
                                              port=port, timeout_s=backend_config.timeout_s)
            for rank in range(len(worker_group))
        ])


@dataclass
class BoundTorchConfig(TorchConfig):
    """`TorchConfig` whose process group listens on the master address only (see the module)."""

    @property
    def backend_cls(self):
        return BoundTorchBackend


def torch_config(backend: str) -> TorchConfig:
    """The process-group settings of every TorchTrainer raylocal starts (gloo or nccl)."""
    return BoundTorchConfig(backend=backend)
