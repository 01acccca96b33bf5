"""The ``unbox`` command: serve, api, worker and an offline ``explain``."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from app.settings import Settings, SettingsError, load_settings


def _run_api(settings: Settings) -> int:
    import uvicorn

    from app.main import create_app

    app = create_app(settings)
    print(f"Unbox API on http://{settings.host}:{settings.port}  (docs: /docs)", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level)
    return 0


def _run_worker(args: argparse.Namespace, settings: Settings) -> int:
    import logging

    from workers.worker import run_worker

    code = run_worker(settings, burst=args.burst)
    # The worker has stopped cleanly; skip the interpreter's teardown of torch, which takes
    # seconds (it only frees memory the OS reclaims anyway).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _stop_child(process: subprocess.Popen, name: str, grace_s: float) -> None:
    """Announce, then stop ``process`` (SIGTERM, SIGKILL after ``grace_s``)."""
    from workers.processes import terminate

    if process.poll() is None:
        print(f"stopping {name} (pid {process.pid})", flush=True)
        terminate(process, grace_s)


def _serve(settings: Settings) -> int:
    """Everything on one machine: Redis (embedded unless UNBOX_REDIS_URL is set), one worker, the API.

    Children run in their own sessions, so Ctrl-C reaches only this process, which then stops
    the API, the worker (after its current job, at most 30 s) and Redis, in that order.
    """
    from workers.redis_server import EmbeddedRedis

    def _terminate(_signum: int, _frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _terminate)  # so SIGTERM unwinds through the clean-up below
    embedded: EmbeddedRedis | None = None
    worker: subprocess.Popen | None = None
    try:
        if not settings.redis_url:
            embedded = EmbeddedRedis().start()
            settings = settings.model_copy(update={"redis_url": embedded.url})
        env = {**os.environ, "UNBOX_REDIS_URL": settings.redis_url or ""}
        worker = subprocess.Popen([sys.executable, "-m", "app.cli", "worker"], env=env, start_new_session=True)
        where = f"embedded at {embedded.url}" if embedded else settings.redis_url
        print(f"Unbox on http://{settings.host}:{settings.port}  (Redis {where}; 1 worker, pid {worker.pid}; "
              "Ctrl-C stops all)", flush=True)
        return _run_api(settings)
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the clean-up
        if worker is not None:
            _stop_child(worker, "the worker", 30)
        if embedded is not None:
            print("stopping the embedded Redis", flush=True)
            embedded.close()


def _explain(args: argparse.Namespace, settings: Settings) -> int:
    from app.intake import ImageRejected, decode_image
    from explainers.errors import ExplainError
    from explainers.pipeline import explain_image
    from models.catalog import load_catalog
    from models.registry import ModelRegistry, UnknownModelError

    try:
        data = Path(args.image).read_bytes()
    except OSError as exc:
        print(f"error: cannot read {args.image}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        image = decode_image(data, settings.max_image_pixels).image
        registry = ModelRegistry(load_catalog(settings.catalog), settings.resolved_device())
        model = registry.get(args.model)
        result = explain_image(model, image, args.method, args.target, args.layer, args.top_k,
                               settings.overlay_max_side)
    except ImageRejected as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except UnknownModelError:
        print(f"error: unknown model {args.model!r}", file=sys.stderr)
        return 2
    except ExplainError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    Path(args.output).write_bytes(result.heatmap.overlay_png)
    if args.map:
        Path(args.map).write_bytes(result.heatmap.png)
    if args.json:
        print(json.dumps({"model": result.model, "method": result.method, "layer": result.layer,
                          "target": vars(result.target), "predictions": [vars(p) for p in result.predictions],
                          "grid": result.heatmap.grid, "timing_ms": result.timing_ms}, indent=2))
    else:
        for p in result.predictions:
            print(f"{p.score:8.4f}  {p.index:5d}  {p.label}")
        print(f"explained {result.target.label} ({result.target.index}) with {result.method} at "
              f"{result.layer}; overlay written to {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unbox", description="Predictions with the heat maps that explain them.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run everything on this machine: the API, a worker and (unless "
                        "UNBOX_REDIS_URL is set) an embedded Redis")
    commands.add_parser("api", help="run the HTTP API alone")
    worker = commands.add_parser("worker", help="run one queue worker with warm models (needs UNBOX_REDIS_URL)")
    worker.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    explain = commands.add_parser("explain", help="explain one image offline, no server")
    explain.add_argument("image")
    explain.add_argument("--method", default="gradcam", help="gradcam (default) or cam")
    explain.add_argument("--model", default="efficientnet_lite0")
    explain.add_argument("--target", type=int, default=None, help="class index (default: top-1)")
    explain.add_argument("--layer", default=None, help="module path (default: the model's)")
    explain.add_argument("--top-k", type=int, default=5)
    explain.add_argument("-o", "--output", default="overlay.png", help="overlay PNG to write")
    explain.add_argument("--map", default=None, help="also write the grayscale map PNG here")
    explain.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
        if args.command == "serve":
            return _serve(settings)
        if args.command == "worker":
            return _run_worker(args, settings)
        if args.command == "api":
            return _run_api(settings)
        return _explain(args, settings)
    except SettingsError as exc:
        print(f"unbox: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
