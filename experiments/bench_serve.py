"""Throughput and latency through `raylocal serve` against onnxruntime in one process, on the same canvases.

Test canvases (as `raylocal.evaluate` rebuilds them) are encoded as PNGs. Through Serve: a fixed
number of requests, one PNG each, from concurrent clients (threads of this process), with Serve's
dynamic batching as `raylocal serve` sets it and, to see what batching wins back, with batches of
one. Each request has a timeout; a failed or lost one is counted, not retried. In one process:
model.onnx on onnxruntime at batch 64 over the same canvases, and what decoding and preprocessing a
PNG costs on one thread. Printed: canvases per second, p50 and p99 latency per request, and the
ratio of Serve's throughput to onnxruntime's; and, for what HTTP and Serve cost alone, the rate
of GET /healthz requests.

The model's weights do not change its speed: without --export-dir, a model of the default size
(or --depth/--width) with random weights is exported with --views views to a temporary folder.

    python experiments/bench_serve.py --data-dir ../shared/data/mnist
"""

from __future__ import annotations

import io
import statistics
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import benchlib
import numpy as np
from PIL import Image

from raylocal.config import DataSettings, ModelConfig
from raylocal.evaluate import rebuild_test_split
from raylocal.preprocess import prepare

PASSES = 5

def get_args_parser():
    parser = benchlib.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--export-dir", type=Path, help="an export to serve (default: a random-weight model, below)")
    parser.add_argument("--depth", type=int, default=ModelConfig.depth)
    parser.add_argument("--width", type=int, default=ModelConfig.width)
    parser.add_argument("--views", type=int, default=5, help="views of the random-weight export (default 5)")
    parser.add_argument("--canvases", type=int, default=512, help="distinct test canvases sent (default 512)")
    parser.add_argument("--requests", type=int, default=2000, help="requests per Serve run (default 2000)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds a request may take (default 30)")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--cpus-per-replica", type=int, default=1)
    return parser


def random_export(args, folder: Path) -> Path:
    import torch

    from raylocal.export import export_model
    from raylocal.model import build_model

    torch.manual_seed(args.seed)
    model = build_model(ModelConfig(depth=args.depth, width=args.width))
    return export_model(model, folder / "best_model", {}, views=args.views, log=lambda line: None)


def pngs_of(canvases: np.ndarray) -> list[bytes]:
    bodies = []
    for canvas in canvases:
        buffer = io.BytesIO()
        Image.fromarray(canvas).save(buffer, "PNG")
        bodies.append(buffer.getvalue())
    return bodies


def in_process(export_dir: Path, canvases: np.ndarray, bodies: list[bytes]) -> float:
    """onnxruntime at batch 64 (canvases/s, all threads), and PNG decode + preprocessing on one thread."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    images = canvases[:, None].astype(np.float32) / 255
    batches = [images[i:i + 64] for i in range(0, len(images), 64)]
    session.run(None, {"images": batches[0]})  # the first call pays for allocations
    rates = []
    # The median of passes: on a shared machine one pass can fall on a neighbour's burst.
    for _ in range(PASSES):
        started = time.perf_counter()
        for batch in batches:
            session.run(None, {"images": batch})
        rates.append(len(images) / (time.perf_counter() - started))
    rate = statistics.median(rates)
    print(f"onnxruntime, 1 process, batch 64: {rate:,.0f} canvases/s (median of {PASSES} passes, "
          f"{min(rates):,.0f} to {max(rates):,.0f})")
    started = time.perf_counter()
    for body in bodies:
        prepare(body)
    print(f"PNG decode + preprocessing, 1 thread: {(time.perf_counter() - started) * 1000 / len(bodies):.3f} ms per image")
    return rate


def post(url: str, body: bytes | None, timeout: float) -> float | None:
    """Seconds the request took, or None when it failed (a GET without a body)."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "image/png"} if body else {})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return time.perf_counter() - started if response.status == 200 else None
    except (OSError, urllib.error.HTTPError):
        return None


def load(url: str, bodies: list[bytes | None], args, label: str, unit: str = "canvases/s") -> float:
    """`args.requests` requests from `args.clients` clients; canvases (requests) per second through Serve."""
    with ThreadPoolExecutor(args.clients) as clients:  # warm-up: a round per client
        list(clients.map(lambda i: post(url, bodies[i % len(bodies)], args.timeout), range(args.clients)))
        started = time.perf_counter()
        times = list(clients.map(lambda i: post(url, bodies[i % len(bodies)], args.timeout), range(args.requests)))
        wall = time.perf_counter() - started
    done = sorted(t for t in times if t is not None)
    failed = len(times) - len(done)
    rate = len(done) / wall
    p50 = statistics.median(done) * 1000 if done else float("nan")
    p99 = done[min(len(done) - 1, int(0.99 * len(done)))] * 1000 if done else float("nan")
    print(f"Serve, {label}, {args.clients} clients: {rate:,.0f} {unit}, p50 {p50:.1f} ms, p99 {p99:.1f} ms, "
          f"{failed} of {len(times)} requests failed")
    return rate


def through_serve(export_dir: Path, bodies: list[bytes], args) -> dict[str, float]:
    from raylocal import serve as raylocal_serve
    from raylocal.cluster import connect, free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}/predict"
    rates = {}
    with connect(None, quiet=True, log=lambda line: print(f"# {line}")):
        from ray import serve

        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            runs = {f"batch up to {args.max_batch_size} ({args.batch_wait_ms:g} ms wait)": args.max_batch_size,
                    "no batching (batch 1)": 1}
            for label, batch in runs.items():
                app = raylocal_serve.build(export_dir, device="cpu", replicas=args.replicas, max_batch_size=batch,
                                           batch_wait_ms=args.batch_wait_ms if batch > 1 else 0,
                                           cpus_per_replica=args.cpus_per_replica)
                serve.run(app, name=raylocal_serve.APP_NAME, route_prefix="/")
                rates[label] = load(url, bodies, args, label)
                if batch > 1:  # HTTP and Serve's hops alone, on the same deployment: no decoding, no model.
                    load(url.replace("/predict", "/healthz"), [None], args, "GET /healthz (no decoding, no model)",
                         "requests/s")
        finally:
            serve.shutdown()
    return rates


def main() -> None:
    args = get_args_parser().parse_args()
    benchlib.print_setup("bench_serve", **{k: v for k, v in vars(args).items() if k not in ("data_dir",)})
    mnist = benchlib.load_digits(args, quiet=True)
    canvases = rebuild_test_split(mnist, args.seed, DataSettings(), args.canvases)["image"]
    bodies = pngs_of(canvases)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        export_dir = args.export_dir or random_export(args, Path(tmp))
        print(f"# export: {export_dir}, {len(bodies)} PNG canvases of {sum(map(len, bodies)) / len(bodies):.0f} "
              "bytes on average")
        baseline = in_process(export_dir, canvases, bodies)
        rates = through_serve(export_dir, bodies, args)
    best = max(rates.values())
    print(f"ratio Serve (batched) / onnxruntime batch 64: {next(iter(rates.values())) / baseline:.3f}"
          f" (best Serve run {best / baseline:.3f})")


if __name__ == "__main__":
    main()
