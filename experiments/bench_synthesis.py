"""Synthesis throughput: the pure numpy function alone vs. the search's Ray Data pipeline.

Both sides make the same canvases back to back in this run: by default the 70k set (MNIST's
55k training + 5k validation + 10k test digits, one epoch, shards of 5,000); `--epochs 5` makes
what the default search makes. The pure function runs single-threaded
(numpy's paste is one core), so "the pure function on the same cores" is its per-core rate
times the cores Ray gets: perfect scaling, the bar Ray Data is held to. Ray Data's figure is
end to end: `raylocal.data.build_search_data` from the MNIST arrays to every shard in the
object store, including the start of its worker processes.

    python experiments/bench_synthesis.py
    python experiments/bench_synthesis.py --cpus 1 --repeats 1     # quick
"""

from __future__ import annotations

import os
import time

import benchlib

from raylocal.config import DataSettings
from raylocal.synthesis import num_shards, split_plan, synthesize_shard

PURE_TARGET = 200_000
RAY_TARGET = 0.5


def get_args_parser():
    parser = benchlib.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs given to Ray")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side; the best is kept")
    parser.add_argument("--epochs", type=int, default=1, help="training epochs (the default search makes 5)")
    parser.add_argument("--shard-size", type=int, default=5_000)
    parser.add_argument("--tight-boxes", action="store_true")
    return parser


def pure_seconds(mnist, args) -> tuple[float, int]:
    plan = split_plan(len(mnist.train_images), len(mnist.test_images))
    started, count = time.perf_counter(), 0
    tasks = [("val", 0), ("test", 0)] + [("train", epoch) for epoch in range(args.epochs)]
    for split, epoch in tasks:
        images, labels = (mnist.test_images, mnist.test_labels) if split == "test" else (mnist.train_images, mnist.train_labels)
        for shard in range(num_shards(plan, split, args.shard_size)):
            part = synthesize_shard(
                images, labels, plan, seed=args.seed, split=split, epoch=epoch, shard=shard,
                shard_size=args.shard_size, tight_boxes=args.tight_boxes,
            )
            count += len(part["label"])
    return time.perf_counter() - started, count


def main(args) -> None:
    benchlib.print_setup("synthesis throughput", cpus=args.cpus, epochs=args.epochs, repeats=args.repeats, shard_size=args.shard_size,
                         tight_boxes=args.tight_boxes)
    mnist = benchlib.load_digits(args)
    pure = [pure_seconds(mnist, args) for _ in range(args.repeats)]
    seconds, count = min(pure)
    per_core = count / seconds
    print(f"pure function, 1 core     {count:,} canvases in {seconds:.3f}s = {per_core:10,.0f} canvases/s "
          f"(runs: {', '.join(f'{s:.3f}s' for s, _ in pure)})")

    from raylocal.data import build_search_data

    settings = DataSettings(shard_size=args.shard_size, tight_boxes=args.tight_boxes)
    with benchlib.local_ray(args.cpus):
        runs = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            data = build_search_data(mnist, settings, args.epochs, seed=args.seed, log=lambda line: print(f"# {line}"))
            runs.append(time.perf_counter() - started)
            rows = sum(split.rows for split in data.train_epochs) + data.val.rows + data.test.rows
            del data
    ray_rate = rows / min(runs)
    print(f"Ray Data, first run (cold worker processes): {runs[0]:.3f}s = {rows / runs[0]:,.0f} canvases/s")
    print(f"Ray Data, {args.cpus} CPUs        {rows:,} canvases in {min(runs):.3f}s = {ray_rate:10,.0f} canvases/s "
          f"(runs: {', '.join(f'{s:.3f}s' for s in runs)})")
    print(benchlib.ratio_line("pure function, canvases/s per core / 1000", per_core / 1000, PURE_TARGET / 1000))
    print(benchlib.ratio_line(f"Ray Data / (pure per core x {args.cpus} cores)", ray_rate / (per_core * args.cpus), RAY_TARGET))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
