"""Object-store memory of the final phase's Ray Data stream over a long run.

Runs one final training run (`raylocal.final.train_final`: a TorchTrainer over every CPU, each
epoch's canvases synthesized by Ray Data while the workers train) for `--epochs` epochs, and
samples the object store's bytes in use across the cluster every `--every` seconds (the figure
`ray memory --stats-only` prints). Printed: the store before the run (validation, test and the
one search epoch this script synthesizes up front), its peak in each quarter of the run, and what
synthesizing every epoch up front, as the search does, would have held.

    python experiments/bench_stream.py                                   # minutes on 2 cores
    python experiments/bench_stream.py --epochs 3 --train-digits 1200    # quick

Also printed: the training speed, and the CPU seconds of Ray Data's split coordinator (the actor
that runs the stream's scheduling loop), for raylocal's settings or Ray's own (`--coordinator`,
`--loop`).
"""

from __future__ import annotations

import tempfile
import threading
import time
from dataclasses import asdict

import benchlib

from raylocal.config import DataSettings, Hyperparameters

MIB = 1024**2


def get_args_parser():
    parser = benchlib.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--train-digits", type=int, default=12_000, help="MNIST training digits used (val: 1/12)")
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--every", type=float, default=1.0, help="seconds between samples")
    parser.add_argument("--cpus-per-worker", type=int, default=1,
                        help="threads of each final-phase worker (2 on 2 cores: one worker, no DDP)")
    parser.add_argument("--coordinator", choices=("lowest", "normal"), default="lowest",
                        help="priority of Ray Data's split coordinator: raylocal's (lowest) or as Ray starts it")
    parser.add_argument("--loop", choices=("paced", "spinning"), default="paced",
                        help="the stream's scheduling loop: raylocal's (waits after a step that moved nothing) or as "
                             "Ray Data runs it")
    return parser


def store_bytes() -> int:
    """Bytes in use in the object stores of every node (what `ray memory --stats-only` reports)."""
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    return get_memory_info_reply(get_state_from_address(None)).store_stats.object_store_bytes_used


def coordinator_cpu_seconds() -> dict[int, float]:
    """CPU seconds of every Ray Data split coordinator process on this machine, by process id."""
    import psutil

    seconds = {}
    for process in psutil.process_iter(["pid", "cmdline", "cpu_times"]):
        if (process.info["cmdline"] or [""])[0].startswith("ray::SplitCoordinator") and process.info["cpu_times"]:
            seconds[process.info["pid"]] = process.info["cpu_times"].user + process.info["cpu_times"].system
    return seconds


class Sampler(threading.Thread):
    def __init__(self, every: float) -> None:
        super().__init__(daemon=True)
        self.every, self.samples, self.done = every, [], threading.Event()
        self.coordinator: dict[int, float] = {}  # the last CPU seconds seen of each coordinator

    def run(self) -> None:
        while not self.done.is_set():
            self.samples.append((time.perf_counter(), store_bytes()))
            self.coordinator |= coordinator_cpu_seconds()
            self.done.wait(self.every)


def main(args) -> None:
    with benchlib.local_ray(2), tempfile.TemporaryDirectory() as storage:
        # After the start: importing Ray before it (print_setup names its version) would lose its
        # loopback switch.
        benchlib.print_setup("final-phase stream memory", epochs=args.epochs, train_digits=args.train_digits,
                             depth=args.depth, width=args.width, coordinator=args.coordinator, loop=args.loop,
                             cpus_per_worker=args.cpus_per_worker)
        mnist = benchlib.load_digits(args)
        from raylocal.data import STREAM_STORE_BYTES, build_search_data
        from raylocal.final import Candidate, train_final
        from raylocal.resources import cluster_resources, final_layout
        from raylocal.trial import TrialSettings

        data = build_search_data(mnist, DataSettings(train_digits=args.train_digits, test_digits=2000), epochs=1,
                                 seed=args.seed, log=lambda line: print(f"# {line}"))
        layout = final_layout(*cluster_resources(), cpus_per_worker=args.cpus_per_worker)
        params = Hyperparameters(depth=args.depth, width=args.width)
        settings = TrialSettings(max_epochs=1, first_epoch_reports=1, reports_per_epoch=1, layout=layout,
                                 storage_path=storage, experiment_name="stream", seed=args.seed, fixed=asdict(params))
        before = store_bytes()
        sampler = Sampler(args.every)
        started = time.perf_counter()
        sampler.start()
        run = train_final(Candidate("fixed", {}, 0.0, 0.0, 0.0), args.seed, args.epochs, data, settings, layout, None,
                          storage, name="stream", log=lambda line: print(f"# {line}"),
                          yield_cpu=args.coordinator == "lowest", paced=args.loop == "paced")
        sampler.done.set()
        sampler.join()
        wall = time.perf_counter() - started
    rows = data.train_epochs[0].rows
    canvas_bytes = 75 * 75 + 4 * 4 + 8
    print(f"object store before the run: {before / MIB:8.1f} MiB (val, test and 1 search epoch)")
    quarters = [[used for at, used in sampler.samples if q * wall / 4 <= at - started < (q + 1) * wall / 4]
                for q in range(4)]
    for q, values in enumerate(quarters):
        peak = max(values, default=0)
        print(f"peak in quarter {q + 1} of the run: {peak / MIB:8.1f} MiB ({len(values)} samples)")
    peak = max(used for _, used in sampler.samples)
    print(f"peak over the run: {peak / MIB:.1f} MiB; stream's own peak (less the store before): "
          f"{(peak - before) / MIB:.1f} MiB; Ray Data's budget for it: {STREAM_STORE_BYTES / MIB:.0f} MiB")
    print(f"all {args.epochs} epochs synthesized up front would hold {args.epochs * rows * canvas_bytes / MIB:.1f} MiB "
          f"({rows:,} canvases per epoch)")
    print(f"trained {run.curve[-1]['epoch']:g} epochs in {wall:.1f}s; last validation det IoU "
          f"{run.curve[-1]['val_det_iou']:.4f}")
    # Training speed of all workers together, epochs after the first (which holds the start-up).
    speeds = sorted(row["train_images_per_s"] for row in run.curve[1:]) or [run.curve[0]["train_images_per_s"]]
    seconds = sorted(row["report_seconds"] for row in run.curve[1:]) or [run.curve[0]["report_seconds"]]
    busy = sum(sampler.coordinator.values())
    print(f"split coordinator: {busy:.1f} CPU seconds over the run ({busy / wall:.1%} of a core; {args.coordinator} "
          f"priority, {args.loop} loop)")
    print(f"training speed ({layout.workers} worker(s) x {layout.cpus_per_worker} thread(s), {args.coordinator} "
          f"coordinator, {args.loop} loop): median {speeds[len(speeds) // 2]:,.0f} canvases/s "
          f"over {max(1, len(run.curve) - 1)} epoch(s) (range {speeds[0]:,.0f}-{speeds[-1]:,.0f}); median epoch "
          f"{seconds[len(seconds) // 2]:.1f} s")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
