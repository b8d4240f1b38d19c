"""Serving entry point: `raylocal serve EXPORT_DIR` (also `python -m raylocal.serve EXPORT_DIR`).

A Ray Serve application answering over HTTP (docs/serving.md):

- `POST /predict` with an image file as the body (PNG, JPEG, anything PIL reads): the image goes
  through `raylocal.preprocess`, the code `raylocal predict` runs, and the answer is one JSON object
  {"label", "confidence", "box" (normalized to the image), "box_pixels" (the image's pixels),
  "canvas_box" (normalized to the 75x75 canvas the model saw), "preprocessing" (the steps taken)}.
- `POST /predict` with a JSON body {"canvases": [C1, C2, ...]}, each C a 75x75 nested list of numbers
  in [0, 1] (row by row, white digit on black: the exported model's own input, no preprocessing):
  the answer is {"predictions": [one object as above per canvas]}, at most MAX_CANVASES per request.
- `GET /healthz`: {"status": "ok", ...} while the application is up.

A bad request gets a 4xx status and {"error": "<one line>"}, and the server goes on serving.
Requests are batched across clients (`@serve.batch`); inference runs on onnxruntime (model.onnx) on
CPUs, or on model.pt2's program on a GPU. Serve's HTTP has no authentication: it binds to 127.0.0.1
unless --host says otherwise. `serve.yaml` runs the same application with `serve deploy`
(`app_builder`). Ray and torch are imported where used: `--help` answers without them.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from raylocal.cli import UsageError, run

MAX_CANVASES = 256
# Bodies up to this size (canvas PNGs, not photos) decode on the replica's event loop (docs/decisions.md#serve-decoding).
INLINE_BYTES = 64 * 1024
APP_NAME = "raylocal"
DEVICES = ("auto", "cpu", "cuda")


class RequestError(ValueError):
    """A request the server refuses: an HTTP status (4xx) and a one-line reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


def get_args_parser(prog: str = "raylocal-serve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve an exported localizer over HTTP with Ray Serve: POST /predict (an image, or JSON "
        '{"canvases": [...]}), GET /healthz. See docs/serving.md.',
    )
    parser.add_argument("export_dir", metavar="EXPORT_DIR",
                        help="folder written by raylocal tune (holds model.onnx and model.pt2)")
    http = parser.add_argument_group("HTTP")
    http.add_argument("--host", default="127.0.0.1", metavar="ADDR",
                      help="address to listen on (default 127.0.0.1; Serve's HTTP has no authentication, so any "
                           "other address exposes the model to whoever reaches it)")
    http.add_argument("--port", type=port_number, default=8000, metavar="PORT", help="HTTP port (default 8000)")
    scaling = parser.add_argument_group("replicas and batching")
    replicas = scaling.add_mutually_exclusive_group()
    replicas.add_argument("--replicas", type=positive_int, default=1, metavar="N", help="replicas (default 1)")
    replicas.add_argument("--autoscale", type=min_max, metavar="MIN:MAX",
                          help="autoscale between MIN and MAX replicas on the requests in flight")
    scaling.add_argument("--max-batch-size", type=positive_int, default=64, metavar="N",
                         help="most canvases one model call takes (default 64)")
    scaling.add_argument("--batch-wait-ms", type=non_negative_float, default=5.0, metavar="MS",
                         help="how long a batch waits to fill before it runs (default 5)")
    scaling.add_argument("--cpus-per-replica", type=positive_int, default=1, metavar="N",
                         help="CPUs each replica reserves; onnxruntime uses as many threads (default 1)")
    scaling.add_argument("--device", choices=DEVICES, default="auto",
                         help="cpu: model.onnx on onnxruntime; cuda: model.pt2 on one GPU per replica; "
                              "auto (default): cuda when the cluster has GPUs")
    cluster = parser.add_argument_group("Ray")
    cluster.add_argument("--address", metavar="HOST:PORT",
                         help="join this running Ray cluster (or 'auto') instead of starting a local instance")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def port_number(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [1, 65535], got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def min_max(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    try:
        bounds = int(low), int(high)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX, e.g. 1:4, got {text!r}") from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError(f"need 1 <= MIN <= MAX, got {text!r}")
    return bounds


def local_export(export_dir: str) -> Path:
    """The export folder as an absolute path, a URI's downloaded into this machine's cache (replicas get
    the model's bytes, so they need no copy), checked before Ray starts."""
    from raylocal.storage import fetch

    path = fetch(export_dir)
    missing = [name for name in ("model.onnx", "model.pt2") if not (path / name).is_file()]
    if missing:
        raise UsageError(f"{path} is not an export: it has no {' or '.join(missing)}")
    return path


# --- requests: pure functions, no Ray ---------------------------------------------------------------


def parse_request(body: bytes, content_type: str = "") -> list:
    """A request body as a list of `preprocess.Prepared`; RequestError for anything else."""
    from raylocal.preprocess import MAX_BYTES, ImageError, prepare

    if not body:
        raise RequestError(400, 'empty body: send a PNG or JPEG image, or JSON {"canvases": [...]}')
    if len(body) > MAX_BYTES:
        raise RequestError(413, f"body of {len(body):,} bytes is larger than the limit of {MAX_BYTES // 2**20} MiB")
    if content_type.startswith("application/json") or body.lstrip()[:1] in (b"{", b"["):
        return parse_canvases(body)
    try:
        return [prepare(body)]
    except ImageError as error:
        too_large = "larger than" in str(error)
        raise RequestError(413 if too_large else 415, str(error).replace("body: ", "", 1)) from None


def parse_canvases(body: bytes) -> list:
    """{"canvases": [75x75 arrays of numbers in [0, 1]]} as Prepared canvases (see the module's docstring)."""
    import numpy as np

    from raylocal.preprocess import canvas_from_values
    from raylocal.synthesis import CANVAS

    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RequestError(400, f"not valid JSON: {error}") from None
    if not isinstance(data, dict) or not isinstance(data.get("canvases"), list) or not data["canvases"]:
        raise RequestError(422, 'expected a JSON object {"canvases": [C, ...]} with at least one 75x75 canvas C')
    if len(data["canvases"]) > MAX_CANVASES:
        raise RequestError(413, f"{len(data['canvases'])} canvases: at most {MAX_CANVASES} per request")
    try:
        values = np.asarray(data["canvases"], dtype=np.float64)
    except (ValueError, TypeError):
        raise RequestError(422, f"canvases must be {CANVAS}x{CANVAS} arrays of numbers, all the same shape") from None
    if values.shape[1:] != (CANVAS, CANVAS):
        raise RequestError(422, f"canvases must be {CANVAS}x{CANVAS} arrays of numbers; got shape {values.shape[1:]}")
    if not np.isfinite(values).all():
        raise RequestError(422, "canvases hold non-finite values (NaN or infinity)")
    if values.min() < 0 or values.max() > 1:
        raise RequestError(422, f"canvas values must lie in [0, 1]; got {values.min():g} to {values.max():g}")
    return [canvas_from_values(canvas) for canvas in values]


def runtime_for(device: str) -> str:
    """onnxruntime on CPUs; on a GPU, the exported program (onnxruntime here has no CUDA provider)."""
    return "onnx" if device == "cpu" else "pt2"


class Predictor:
    """The export's model on one device: (logits, boxes) as numpy for uint8 canvases [N,75,75]. Built
    from the file's bytes, so that a replica on another node needs no copy of the export. The runtime
    follows the device (`runtime_for`); naming it runs model.pt2 on a CPU too, which tests use."""

    def __init__(self, model: bytes, device: str = "cpu", threads: int = 1, runtime: str | None = None):
        self.device = device
        self.runtime = runtime or runtime_for(device)
        if self.runtime == "onnx":
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            self.session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        else:
            import io

            import torch
            from torch.export.passes import move_to_device_pass

            # Traced on the CPU: the program's constants move with it (raylocal.latency.load_pt2).
            self.program = move_to_device_pass(torch.export.load(io.BytesIO(model)), device).module()

    @classmethod
    def of(cls, export_dir: Path, device: str = "cpu", threads: int = 1, runtime: str | None = None) -> Predictor:
        runtime = runtime or runtime_for(device)
        return cls(model_bytes(export_dir, runtime), device, threads, runtime)

    def __call__(self, canvases):
        import numpy as np

        if self.runtime == "onnx":
            images = canvases[:, None].astype(np.float32) / np.float32(255)
            logits, boxes = self.session.run(["logits", "boxes"], {"images": images})
            return logits, boxes
        import torch

        from raylocal.export import run_program

        logits, boxes = run_program(self.program, torch.from_numpy(canvases).to(self.device))
        return logits.float().cpu().numpy(), boxes.float().cpu().numpy()


def model_bytes(export_dir: Path, runtime: str) -> bytes:
    return (export_dir / f"model.{runtime}").read_bytes()


# --- the Serve application ----------------------------------------------------------------------------


def deployment(export_dir: Path, device: str, max_batch_size: int, batch_wait_s: float):
    """The Serve deployment class (built here so that importing this module imports no Ray)."""
    import asyncio

    import numpy as np
    from ray import serve
    from starlette.responses import JSONResponse

    from raylocal.preprocess import answer

    @serve.deployment
    class Localizer:
        def __init__(self, model: bytes, threads: int):
            self.predictor = Predictor(model, device, threads)
            self.infer.set_max_batch_size(max_batch_size)
            self.infer.set_batch_wait_timeout_s(batch_wait_s)

        @serve.batch
        async def infer(self, canvases: list) -> list:
            logits, boxes = self.predictor(np.stack(canvases))
            return list(zip(logits, boxes))

        async def __call__(self, request) -> JSONResponse:
            path = request.url.path.rstrip("/")
            if path == "/healthz":
                return JSONResponse({"status": "ok", "export": str(export_dir), "device": device})
            if path != "/predict":
                return JSONResponse({"error": f"no such path {path}: POST /predict or GET /healthz"}, 404)
            if request.method != "POST":
                return JSONResponse({"error": "POST an image or JSON canvases to /predict"}, 405)
            body = await request.body()
            content_type = request.headers.get("content-type", "")
            try:
                # A large body decodes in a thread so that the replica batches other requests meanwhile; a
                # small one inline, since the thread's hop costs more than it (docs/decisions.md#serve-decoding).
                prepared = (parse_request(body, content_type) if len(body) <= INLINE_BYTES
                            else await asyncio.to_thread(parse_request, body, content_type))
            except RequestError as error:
                return JSONResponse({"error": str(error)}, error.status)
            outputs = await asyncio.gather(*(self.infer(image.canvas) for image in prepared))
            answers = [answer(image, logits, box) for image, (logits, box) in zip(prepared, outputs)]
            is_json = body.lstrip()[:1] == b"{"
            return JSONResponse({"predictions": answers} if is_json else answers[0])

    return Localizer


def build(export_dir: str | Path, *, device: str = "cpu", replicas: int = 1, autoscale: tuple[int, int] | None = None,
          max_batch_size: int = 64, batch_wait_ms: float = 5.0, cpus_per_replica: int = 1):
    """The bound Serve application."""
    export_dir = local_export(str(export_dir))
    scaling = ({"autoscaling_config": {"min_replicas": autoscale[0], "max_replicas": autoscale[1],
                                       "target_ongoing_requests": max_batch_size}}
               if autoscale else {"num_replicas": replicas})
    options = {"ray_actor_options": {"num_cpus": cpus_per_replica, "num_gpus": 1 if device == "cuda" else 0},
               # A log line per request costs the replica's CPU time that batching would serve.
               "logging_config": {"enable_access_log": False},
               # Room for a full batch to wait while one runs.
               "max_ongoing_requests": 2 * max_batch_size, **scaling}
    localizer = deployment(export_dir, device, max_batch_size, batch_wait_ms / 1000)
    # The model travels as bytes through Ray's object store: replicas need no copy of the folder.
    return localizer.options(**options).bind(model_bytes(export_dir, runtime_for(device)), cpus_per_replica)


def app_builder(args: dict):
    """`serve deploy serve.yaml`'s import_path: the application from the config's `args`, named as
    the flags are (export_dir, device, replicas, max_batch_size, batch_wait_ms, cpus_per_replica)."""
    args = dict(args)
    device = args.pop("device", "cpu")
    if device == "auto":
        import ray

        device = "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
    autoscale = args.pop("autoscale", None)
    return build(args.pop("export_dir"), device=device, autoscale=min_max(autoscale) if autoscale else None, **args)


def main(args: argparse.Namespace, log=print) -> None:
    export_dir = local_export(args.export_dir)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log(f"WARNING: --host {args.host}: Serve's HTTP has no authentication; whoever reaches port {args.port} "
            "there can use the model (docs/serving.md#binding-what---host-exposes)")
    from raylocal.cluster import connect

    with connect(args.address, log=log):
        import ray
        from ray import serve

        device = args.device
        if device == "auto":
            device = "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
        app = build(export_dir, device=device, replicas=args.replicas, autoscale=args.autoscale,
                    max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
                    cpus_per_replica=args.cpus_per_replica)
        serve.start(http_options={"host": args.host, "port": args.port})
        try:
            serve.run(app, name=APP_NAME, route_prefix="/")
            log(f"serving {export_dir} ({'model.pt2 on a GPU' if device == 'cuda' else 'model.onnx on CPUs'}) at "
                f"http://{args.host}:{args.port}/predict, GET /healthz; Ctrl+C stops", flush=True)
            wait_for_a_signal()
        finally:
            serve.shutdown()


def wait_for_a_signal() -> None:
    """Until SIGINT or SIGTERM: either ends the server the same way, shutting Serve down."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()


def user_errors() -> tuple[type[Exception], ...]:
    """What `main` raises for a user's mistake (one line, exit 2)."""
    from raylocal.config import ConfigError

    return UsageError, ConfigError


def cli(argv: list[str] | None = None, prog: str = "raylocal-serve") -> int:
    return run(get_args_parser(prog), main, user_errors, argv)


if __name__ == "__main__":
    sys.exit(cli())
