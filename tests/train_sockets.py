"""The sockets Ray Train's workers open to one another: torch's rendezvous store, served by rank 0,
and gloo's pairs. Seen from the connections, not guessed from the ports: a listener of one Train
worker that another Train worker connected to. Ray's own worker port, which every Train worker
also listens on, is not one of them (the workers do not call one another through Ray)."""

from __future__ import annotations

from helpers import ProcessTreeWatch

TRAIN_WORKER = "RayTrainWorker"


class TrainWorkerSockets(ProcessTreeWatch):
    """Polls a process tree while it runs: the TCP listeners and connections of its Train workers."""

    def __init__(self, pid: int, every: float = 0.2):
        super().__init__(pid, every)
        self.listening: set[tuple[str, int, int]] = set()  # (ip, port, pid)
        self.connected: set[tuple[int, int]] = set()  # (remote port, pid of the connecting worker)

    def observe(self, process) -> None:
        import psutil

        if TRAIN_WORKER not in " ".join(process.cmdline()):
            return
        for c in process.net_connections("tcp"):
            if c.status == psutil.CONN_LISTEN:
                self.listening.add((c.laddr.ip, c.laddr.port, process.pid))
            elif c.raddr:
                self.connected.add((c.raddr.port, process.pid))

    def between_workers(self) -> list[tuple[str, int]]:
        """(ip, port) of each Train worker's listener that another Train worker connected to:
        the rendezvous store and gloo's listeners, once the process group formed."""
        return sorted({(ip, port) for ip, port, pid in self.listening
                       for remote_port, client in self.connected if remote_port == port and client != pid})
