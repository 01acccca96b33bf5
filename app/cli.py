"""The ``unbox`` command: serve, api, worker and an offline ``explain``."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from app import package_version
from app.settings import Settings, SettingsError, load_settings

if TYPE_CHECKING:
    from workers.supervisor import WorkerSupervisor


def _setup_logging(settings: Settings) -> None:
    """One handler for every logger of this process (the ``unbox`` loggers, uvicorn's), in the
    format of UNBOX_LOG_FORMAT; the same set-up the workers use."""
    from workers.logging_setup import configure_logging

    configure_logging(settings.log_level, settings.log_format)


def _listen_overrides(args: argparse.Namespace) -> dict[str, object]:
    """``--host`` / ``--port`` (of ``api`` and ``serve``), which win over UNBOX_HOST / UNBOX_PORT."""
    return {name: value for name in ("host", "port") if (value := getattr(args, name, None)) is not None}


def _run_api(settings: Settings) -> int:
    import uvicorn

    from app.limits import uvicorn_options
    from app.main import create_app

    _setup_logging(settings)
    app = create_app(settings)
    print(f"Unbox API on http://{settings.host}:{settings.port}  (docs: /docs)", flush=True)
    # log_config=None: uvicorn's loggers print through our handler, in our format; its access log
    # is off because app.request_ids logs each request (with its route template and request id).
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, log_config=None,
                access_log=False, **uvicorn_options(settings))
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


def _workers_phrase(pids: list[int | None]) -> str:
    """``1 worker, pid 1234`` or ``3 workers, pids 1, 2, 3`` (tests parse the first form)."""
    shown = ", ".join(str(pid) for pid in pids)
    return f"1 worker, pid {shown}" if len(pids) == 1 else f"{len(pids)} workers, pids {shown}"


def _stop_workers(supervisor: WorkerSupervisor, grace_s: float) -> None:
    """Announce, then stop the supervised workers (SIGTERM, SIGKILL after ``grace_s``)."""
    live = [pid for pid in supervisor.pids() if pid is not None]
    if live:
        print(f"stopping the {'worker' if len(live) == 1 else 'workers'} "
              f"(pid{'' if len(live) == 1 else 's'} {', '.join(map(str, live))})", flush=True)
    supervisor.stop(grace_s)


def _serve(settings: Settings, workers: int | None = None) -> int:
    """Everything on one machine: Redis (embedded unless UNBOX_REDIS_URL is set), workers, the API.

    The ``workers`` (default UNBOX_SERVE_WORKERS) run under a supervisor that restarts any that
    dies. Children run in their own sessions, so Ctrl-C reaches only this process, which then
    stops the API, the workers (after their current jobs, at most 30 s) and Redis, in that order.
    """
    from workers.redis_server import EmbeddedRedis
    from workers.redis_url import redact_url
    from workers.supervisor import WorkerSupervisor

    def _terminate(_signum: int, _frame: object) -> None:
        raise SystemExit(0)

    _setup_logging(settings)
    signal.signal(signal.SIGTERM, _terminate)  # so SIGTERM unwinds through the clean-up below
    embedded: EmbeddedRedis | None = None
    supervisor: WorkerSupervisor | None = None
    try:
        if not settings.redis_url:
            embedded = EmbeddedRedis(max_memory_mb=settings.embedded_redis_max_memory_mb).start()
            settings = settings.model_copy(update={"redis_url": embedded.url})
        env = {**os.environ, "UNBOX_REDIS_URL": settings.redis_url or ""}
        supervisor = WorkerSupervisor([sys.executable, "-m", "app.cli", "worker"],
                                      workers or settings.serve_workers, env=env).start()
        where = f"embedded at {embedded.display_url}" if embedded else redact_url(settings.redis_url)
        print(f"Unbox on http://{settings.host}:{settings.port}  (Redis {where}; "
              f"{_workers_phrase(supervisor.pids())}; Ctrl-C stops all)", flush=True)
        return _run_api(settings)
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the clean-up
        if supervisor is not None:
            _stop_workers(supervisor, 30)
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
        # one explanation: nothing to gain from warming variants it may not use
        policy = settings.execution_policy().with_changes(warmup=False)
        registry = ModelRegistry(load_catalog(settings.catalog), settings.resolved_device(), policy)
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


def _keys(args: argparse.Namespace, settings: Settings) -> int:
    """``unbox keys add | list | revoke``: manage the key file named by UNBOX_API_KEYS_FILE (or --file)."""
    from app.api_keys import KeyFileError, add_key, parse_scopes, read_keys, revoke_key

    path = Path(args.file) if args.file else settings.api_keys_file
    if path is None:
        print("unbox keys: set UNBOX_API_KEYS_FILE (or pass --file) to the key file to manage", file=sys.stderr)
        return 2
    try:
        if args.keys_command == "add":
            record, token = add_key(path, args.name, parse_scopes(args.scopes), args.rate_limit, args.max_queued_jobs)
            print(f"created key {record.id} ({record.name}; scopes {', '.join(record.scopes)}) in {path}")
            print("store it now: it is shown once, and only its hash is kept")
            print(token)
        elif args.keys_command == "list":
            keys = [key.public() for key in read_keys(path).values()]
            if args.json:
                print(json.dumps(keys, indent=2))
            for key in [] if args.json else keys:
                print(f"{key['id']}  {key['name']:<24}  {','.join(key['scopes']):<28}  {key['created_at']}")
        else:
            record = revoke_key(path, args.id)
            print(f"revoked key {record.id} ({record.name}); the API refuses it within a second")
    except KeyFileError as exc:
        print(f"unbox keys: {exc}", file=sys.stderr)
        return 2
    return 0


def bounded_int(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer from ``low`` (to ``high``), with a readable refusal."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, got {value}" if high is not None
                                             else f"must be at least {low}, got {value}")
        return value
    return parse


def _add_keys_parser(commands: argparse._SubParsersAction) -> None:
    keys = commands.add_parser("keys", help="manage API keys (the file named by UNBOX_API_KEYS_FILE)")
    keys.add_argument("--file", default=None, help="the key file (default: UNBOX_API_KEYS_FILE)")
    actions = keys.add_subparsers(dest="keys_command", required=True)
    add = actions.add_parser("add", help="create a key; prints it once, alone on the last line")
    add.add_argument("name", help="who the key is for, e.g. radiology-dashboard")
    add.add_argument("--scopes", default="predict,explain,jobs",
                     help="comma-separated, of predict, explain, jobs, admin (default: predict,explain,jobs)")
    add.add_argument("--rate-limit", type=bounded_int(1), default=None, metavar="N",
                     help="requests per minute on /v1/predict and /v1/explain (default: UNBOX_RATE_LIMIT_PER_MINUTE)")
    add.add_argument("--max-queued-jobs", type=bounded_int(1), default=None, metavar="N",
                     help="jobs queued or running at once (default: UNBOX_MAX_QUEUED_JOBS_PER_KEY)")
    listing = actions.add_parser("list", help="the keys: id, name, scopes, creation time (never a secret)")
    listing.add_argument("--json", action="store_true")
    revoke = actions.add_parser("revoke", help="remove a key; the API refuses it at once")
    revoke.add_argument("id")


def _add_listen_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None, help="address the API listens on (default: UNBOX_HOST, 127.0.0.1)")
    parser.add_argument("--port", type=bounded_int(1, 65535), default=None,
                        help="port of the API (default: UNBOX_PORT, 8000)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unbox", description="Predictions with the heat maps that explain them.")
    parser.add_argument("--version", action="version", version=f"unbox {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run everything on this machine: the API, workers (restarted "
                                "when they die) and (unless UNBOX_REDIS_URL is set) an embedded Redis")
    serve.add_argument("--workers", type=bounded_int(1, 64), default=None, metavar="N",
                       help="worker processes to run and restart, 1-64 (default: UNBOX_SERVE_WORKERS, 1)")
    api = commands.add_parser("api", help="run the HTTP API alone")
    for listener in (serve, api):
        _add_listen_options(listener)
    worker_help = ("run one queue worker with warm models (needs UNBOX_REDIS_URL); meant to run under a "
                   "supervisor (systemd, Kubernetes, or `unbox serve`) that restarts it when it exits")
    worker = commands.add_parser(
        "worker", help=worker_help,
        description=worker_help + ". It exits 0 after SIGTERM (finishing its current job first) and 2 on a "
        "configuration error, which a restart will not fix. Examples: docs/deploy/unbox-worker.service "
        "(systemd), docs/deploy/kubernetes-worker.yaml.")
    worker.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    _add_keys_parser(commands)
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
        settings = load_settings(**_listen_overrides(args))
        if args.command == "serve":
            return _serve(settings, args.workers)
        if args.command == "worker":
            return _run_worker(args, settings)
        if args.command == "api":
            return _run_api(settings)
        if args.command == "keys":
            return _keys(args, settings)
        return _explain(args, settings)
    except SettingsError as exc:
        print(f"unbox: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
