"""The ``unbox`` command: serve, api, worker, an offline ``explain`` and ``compare``."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NoReturn

from app import package_version
from app.settings import Settings, SettingsError, load_settings

if TYPE_CHECKING:
    from PIL import Image

    from app.compare import ImageComparison

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


def _explain_outputs(usage_error: Callable[[str], NoReturn], images: list[str], output: str | None,
                     gray: str | None) -> list[tuple[Path, Path | None]]:
    """(overlay, map) path per image. One image: ``-o`` / ``--map`` are files (default
    overlay.png), or directories to write ``<stem>.overlay.png`` / ``<stem>.map.png`` into.
    Several images: they are directories (``-o`` default: the current one), created if need be."""
    several = len(images) > 1
    stems = [Path(image).stem for image in images]
    if several and len(set(stems)) < len(stems):
        clash = next(stem for stem in stems if stems.count(stem) > 1)
        usage_error(f"several images are named {clash!r}: their outputs would overwrite each other; "
                    "explain them in separate runs")

    def place(option: str, value: str | None, kind: str) -> list[Path | None]:
        if value is None:
            return [None] * len(images)
        path = Path(value)
        if several:
            if path.exists() and not path.is_dir():
                usage_error(f"{option} names a directory when explaining several images; {path} is a file")
            if not path.exists() and path.suffix.lower() == ".png":
                usage_error(f"{option} names a directory when explaining several images, not {path}")
            path.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            return [path / f"{stem}.{kind}.png" for stem in stems]
        return [path]

    default = "." if several else "overlay.png"
    overlays = [path for path in place("-o/--output", output if output is not None else default, "overlay") if path]
    return list(zip(overlays, place("--map", gray, "map")))


def _explain(args: argparse.Namespace, settings: Settings) -> int:
    """``unbox explain IMAGE... [--target N]...``: each image's predictions, overlay and map.

    Images are read and decoded one by one, explained ``--batch-size`` at a time (one batch per
    model forward); an image that cannot be read or is rejected is reported with its path and
    skipped. One image prints (and exits) as it always has; several print a block (or with
    ``--json`` one JSON line) per image, and exit 1 if any image failed."""
    from app.intake import ImageRejected, decode_image
    from app.windowing import WindowRefused, parse_window
    from explainers.errors import ExplainError
    from explainers.pipeline import explain_images
    from models.catalog import load_catalog
    from models.registry import ModelRegistry, UnknownModelError

    images: list[str] = args.images
    given: list[int] = args.target or []
    if len(given) not in (0, 1, len(images)):
        args.usage_error(f"--target: give one for every image or one per image ({len(images)} images), "
                         f"not {len(given)}")
    targets: list[int | None] = (given * len(images) if len(given) == 1 else list(given)) or [None] * len(images)
    outputs = _explain_outputs(args.usage_error, images, args.output, args.map)
    try:
        window = parse_window(args.window)
    except WindowRefused as exc:
        args.usage_error(f"--window: {exc.message}")
    several = len(images) > 1
    model = None  # loaded with the first batch, so that a lone bad image fails fast
    failed = 0

    def report(path: str, message: str) -> None:
        nonlocal failed
        failed += 1
        print(f"error: {path}: {message}" if several else f"error: {message}", file=sys.stderr, flush=True)

    def explain_batch(batch: list[tuple[int, Image.Image]]) -> int | None:
        """Explain and write one batch; an exit code when nothing more can be explained."""
        nonlocal model
        try:
            if model is None:
                # explanations of one kind: nothing to gain from warming variants they may not use
                policy = settings.execution_policy().with_changes(warmup=False)
                registry = ModelRegistry(load_catalog(settings.catalog), settings.resolved_device(), policy)
                model = registry.get(args.model)
                classes = len(model.labels)
                outside = sorted({t for t in targets if t is not None and not 0 <= t < classes})
                if outside:
                    print(f"error: target must be a class index in [0, {classes - 1}], got {outside[0]}",
                          file=sys.stderr)
                    return 2
            chosen = [targets[index] for index, _ in batch]
            results = explain_images(model, [image for _, image in batch], args.method,
                                     None if chosen[0] is None else chosen, args.layer, args.top_k,
                                     settings.overlay_max_side)
        except UnknownModelError:
            print(f"error: unknown model {args.model!r}", file=sys.stderr)
            return 2
        except ExplainError as exc:  # the method, layer or model, not an image: every batch would fail
            print(f"error: {exc.message}", file=sys.stderr)
            return 2
        for (index, _), result in zip(batch, results):
            overlay, gray = outputs[index]
            overlay.write_bytes(result.heatmap.overlay_png)
            if gray is not None:
                gray.write_bytes(result.heatmap.png)
            record = {"model": result.model, "method": result.method, "layer": result.layer,
                      "target": vars(result.target), "predictions": [vars(p) for p in result.predictions],
                      "grid": result.heatmap.grid, "timing_ms": result.timing_ms}
            if args.json and not several:
                print(json.dumps(record, indent=2))
            elif args.json:  # JSON Lines: one record per image, in the order given
                files = {"overlay": str(overlay), **({"map": str(gray)} if gray is not None else {})}
                print(json.dumps({"image": images[index], **files, **record}), flush=True)
            else:
                indent = "  " if several else ""
                lines = [f"{indent}{p.score:8.4f}  {p.index:5d}  {p.label}" for p in result.predictions]
                lines.append(f"{indent}explained {result.target.label} ({result.target.index}) with "
                             f"{result.method} at {result.layer}; overlay written to {overlay}")
                print("\n".join(([images[index]] if several else []) + lines), flush=True)
        return None

    pending: list[tuple[int, Image.Image]] = []
    for index, path in enumerate(images):
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            failed += 1
            print(f"error: cannot read {path}: {exc.strerror}", file=sys.stderr, flush=True)
            continue
        try:
            pending.append((index, decode_image(data, settings.max_image_pixels, window, args.frame).image))
        except ImageRejected as exc:
            report(path, exc.message)
            continue
        if len(pending) == args.batch_size:
            if (code := explain_batch(pending)) is not None:
                return code
            pending = []
    if pending and (code := explain_batch(pending)) is not None:
        return code
    return 0 if not failed else 1 if several else 2


def _parse_params(usage_error: Callable[[str], NoReturn], given: list[str]) -> dict[str, dict[str, object]]:
    """``--params METHOD=JSON`` (repeatable) as {method: params}; a later one for the same
    method updates the earlier."""
    overrides: dict[str, dict[str, object]] = {}
    for text in given:
        method, sep, raw = text.partition("=")
        if not sep or not method.strip():
            usage_error(f"--params: expected METHOD=JSON, got {text!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            usage_error(f"--params {method.strip()}: not JSON ({exc.msg} at character {exc.pos + 1})")
        if not isinstance(value, dict):
            usage_error(f"--params {method.strip()}: expected a JSON object, got {raw!r}")
        overrides.setdefault(method.strip(), {}).update(value)
    return overrides


def _compare_table(comparisons: list[ImageComparison], figure: Path, width: int, height: int) -> str:
    """One line per image x method: scores and the explanation's seconds (as the figure shows
    them; scoring aside), then where the figure went."""
    from app.compare import title

    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    header = ("image", "class", "method", "deletion", "insertion", "seconds", "note")
    rows = [header]
    for comparison in comparisons:
        target = comparison.target
        for outcome in comparison.outcomes:
            note = (f"error: {outcome.error}" if outcome.error else
                    f"{outcome.roots} root{'' if outcome.roots == 1 else 's'}, not a heat map" if outcome.kind == "graph"
                    else "")
            rows.append((comparison.name, f"{target.label} ({target.index})", title(outcome.method),
                         number(outcome.deletion_auc), number(outcome.insertion_auc), f"{outcome.explain_seconds:.2f}",
                         note))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    right = {3, 4, 5}
    lines = ["  ".join([*(cell.rjust(w) if i in right else cell.ljust(w)
                          for i, (cell, w) in enumerate(zip(row, widths))), row[-1]]).rstrip() for row in rows]
    lines.append(f"figure written to {figure} ({width} x {height} px)")
    return "\n".join(lines)


def _compare(args: argparse.Namespace, settings: Settings) -> int:
    """``unbox compare IMAGE... -o figure.png``: several methods on the same images, one figure.

    Every method of an image explains the same class (``--target``, else the model's top-1);
    the figure has a row per image and a column per method with its deletion / insertion AUCs
    and time. An image that cannot be read is reported and left out; a method that fails on an
    image is a cell with its error. Exit 0, 1 when anything failed, 2 on a usage or model error
    or when no image could be read."""
    from app.compare import compare_images, default_preset, figure_rows, method_params, summary, title
    from app.intake import ImageRejected, decode_image
    from app.windowing import WindowRefused, parse_window
    from explainers.compare_figure import compose_figure
    from explainers.errors import ExplainError
    from explainers.registry import METHODS
    from models.catalog import load_catalog
    from models.registry import ModelRegistry, UnknownModelError

    images: list[str] = args.images
    methods = list(dict.fromkeys(name.strip() for name in args.methods.split(",") if name.strip()))
    if not methods:
        args.usage_error("--methods: name at least one method")
    unknown = [name for name in methods if name not in METHODS]
    if unknown:
        args.usage_error(f"--methods: unknown method {unknown[0]!r}; known: {', '.join(sorted(METHODS))}")
    overrides = _parse_params(args.usage_error, args.params or [])
    strays = [name for name in overrides if name not in methods]
    if strays:
        args.usage_error(f"--params names {strays[0]!r}, which is not among --methods ({', '.join(methods)})")
    given: list[int] = args.target or []
    if len(given) not in (0, 1, len(images)):
        args.usage_error(f"--target: give one for every image or one per image ({len(images)} images), "
                         f"not {len(given)}")
    targets: list[int | None] = (given * len(images) if len(given) == 1 else list(given)) or [None] * len(images)
    try:
        window = parse_window(args.window)
    except WindowRefused as exc:
        args.usage_error(f"--window: {exc.message}")
    output = Path(args.output)
    if output.is_dir() or not output.parent.is_dir():
        args.usage_error(f"-o/--output: {output} must be a file in an existing directory")
    device = settings.resolved_device()
    preset = args.preset or default_preset(device)
    try:
        chosen = method_params(methods, preset, settings.scorecam_channels, overrides, args.metric_steps)
    except ExplainError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    # the lattice SAG scores patch sets on, so that the warm-up builds its scorer too
    grid = next((getattr(chosen[name], "grid", None) for name in methods if METHODS[name].result_kind == "graph"),
                None)

    failed = 0
    decoded: list[tuple[str, Image.Image]] = []
    kept: list[int | None] = []
    for path, target in zip(images, targets):
        try:
            data = Path(path).read_bytes()
            decoded.append((Path(path).name, decode_image(data, settings.max_image_pixels, window, args.frame).image))
            kept.append(target)
        except OSError as exc:
            failed += 1
            print(f"error: cannot read {path}: {exc.strerror}", file=sys.stderr, flush=True)
        except ImageRejected as exc:
            failed += 1
            print(f"error: {path}: {exc.message}", file=sys.stderr, flush=True)
    if not decoded:
        return 2

    settings.apply_to_torch()
    # warmed as the workers are (UNBOX_FAST_WARMUP): the times compare the methods, not which
    # one happened to build the model's runtimes first
    registry = ModelRegistry(load_catalog(settings.catalog), device, settings.execution_policy(), grid)
    try:
        model = registry.get(args.model)
    except UnknownModelError:
        print(f"error: unknown model {args.model!r}; available: {', '.join(sorted(registry.specs))}",
              file=sys.stderr)
        return 2
    outside = sorted({t for t in kept if t is not None and not 0 <= t < len(model.labels)})
    if outside:
        print(f"error: target must be a class index in [0, {len(model.labels) - 1}], got {outside[0]}",
              file=sys.stderr)
        return 2

    started: dict[str, float] = {}

    def progress(name: str, method: str, fraction: float, stage: str) -> None:
        if stage == "start":
            started[method] = time.perf_counter()
            print(f"{name}: {method} ...", file=sys.stderr, flush=True)
        elif stage == "warm-up":
            print(f"{name}: {method} (warm-up, untimed) ...", file=sys.stderr, flush=True)
        elif stage == "end":
            print(f"{name}: {method} took {time.perf_counter() - started[method]:.2f} s", file=sys.stderr,
                  flush=True)

    print(f"comparing {', '.join(methods)} on {len(decoded)} image{'' if len(decoded) == 1 else 's'} "
          f"with {model.name} ({preset} preset, {device})", file=sys.stderr, flush=True)
    try:
        comparisons = compare_images(model, decoded, methods, kept, preset, settings, progress, overrides,
                                     args.metric_steps, args.warm_up)
    except ExplainError as exc:  # a refusal before any method ran (params, targets)
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    png, layout = compose_figure(figure_rows(comparisons))
    try:
        output.write_bytes(png)
    except OSError as exc:
        print(f"error: cannot write {output}: {exc.strerror}", file=sys.stderr)
        return 2
    failed += sum(comparison.failed for comparison in comparisons)
    if args.json:
        print(json.dumps({"model": model.name, "preset": preset, "device": device, "methods": methods,
                          "figure": {"path": str(output), "width": layout.width, "height": layout.height,
                                     "columns": ["image", *(title(name) for name in methods)],
                                     "header": [list(box) for box in layout.header]},
                          "images": summary(comparisons, layout)}, indent=2))
    else:
        print(_compare_table(comparisons, output, layout.width, layout.height))
    return 1 if failed else 0


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


def _add_compare_parser(commands: argparse._SubParsersAction) -> None:
    from app.compare import DEFAULT_METHODS, METRIC_STEPS, PRESETS

    compare = commands.add_parser(
        "compare", help="compare methods on the same images in one figure (for papers and reports)",
        description="Explain the same images with several methods, offline, and draw one figure: a row per "
        "image, a column per method, each cell with its deletion / insertion AUCs and its time. Every method "
        "of an image explains the same class. Exit 0; 1 when an image or a method failed (the rest is still "
        "drawn); 2 on a usage or model error, or when no image could be read.")
    compare.add_argument("images", nargs="+", metavar="IMAGE", help="one or more image files")
    compare.add_argument("-o", "--output", default="compare.png", help="figure PNG to write (default: compare.png)")
    compare.add_argument("--methods", default=",".join(DEFAULT_METHODS), metavar="M1,M2,...",
                         help=f"methods of the registry, comma-separated, in column order (default: "
                         f"{','.join(DEFAULT_METHODS)})")
    compare.add_argument("--preset", choices=PRESETS, default=None,
                         help="cpu: the CPU presets (I-GOS preset=cpu, quick SAG, Score-CAM on "
                         "UNBOX_SCORECAM_CHANNELS channels); paper: every method's own defaults (default: cpu "
                         "on a CPU device, paper on CUDA)")
    compare.add_argument("--params", action="append", default=None, metavar="METHOD=JSON",
                         help="a method's params over the preset's, as its job takes them, e.g. "
                         "'igos={\"iterations\": 4}'; repeatable")
    compare.add_argument("--metric-steps", type=bounded_int(1, 500), default=METRIC_STEPS, metavar="N",
                         help=f"steps of every deletion / insertion curve, heat maps and masks alike (default: "
                         f"{METRIC_STEPS})")
    compare.add_argument("--warm-up", action="store_true", help="run every method once, untimed, on the first "
                         "image before the timed runs, so that no time includes one-off first-run costs")
    compare.add_argument("--model", default="efficientnet_lite0")
    compare.add_argument("--target", type=int, action="append", default=None, metavar="N",
                         help="class index (default: each image's top-1 of the model); once for every image, "
                         "or once per image in the order given")
    _add_intake_options(compare)
    compare.add_argument("--json", action="store_true", help="print a JSON summary instead of the table: per "
                         "image its target and cell, per method its AUCs, seconds and cell in the figure")
    compare.set_defaults(usage_error=compare.error)


def _add_intake_options(parser: argparse.ArgumentParser) -> None:
    """How a DICOM or high-bit-depth file becomes the 8-bit image explained (as the API's form fields)."""
    parser.add_argument("--window", default=None, metavar="C,W|auto", help="greyscale window for DICOM and "
                        "high-bit-depth images (default: the file's own, else the values' stored range)")
    parser.add_argument("--frame", type=bounded_int(0), default=None, metavar="N",
                        help="frame of a multi-frame DICOM file (default the first)")


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
    explain = commands.add_parser("explain", help="explain images offline, no server",
                                  description="Explain images offline, no server: one --target for every "
                                  "image or one per image; several images are explained --batch-size at a "
                                  "time, each one's files named after it.")
    explain.add_argument("images", nargs="+", metavar="IMAGE", help="one or more image files")
    explain.add_argument("--method", default="gradcam", help="a synchronous method of the registry (the CAM "
                         "family, rollout; a wrong name lists them); default gradcam")
    explain.add_argument("--model", default="efficientnet_lite0")
    explain.add_argument("--target", type=int, action="append", default=None, metavar="N",
                         help="class index (default: each image's top-1); once for every image, or once "
                         "per image in the order given")
    explain.add_argument("--layer", default=None, help="module path (default: the model's)")
    _add_intake_options(explain)
    explain.add_argument("--top-k", type=int, default=5)
    explain.add_argument("--batch-size", type=bounded_int(1, 256), default=8, metavar="N",
                         help="images per model forward, 1-256 (default: 8)")
    explain.add_argument("-o", "--output", default=None,
                         help="overlay PNG to write (default: overlay.png); with several images (or when "
                         "it is a directory) the directory for <name>.overlay.png (default: .)")
    explain.add_argument("--map", default=None, help="also write the grayscale map PNG here (with several "
                         "images: a directory, for <name>.map.png)")
    explain.add_argument("--json", action="store_true", help="print the result as JSON (several images: "
                         "one JSON line each, with its image and files)")
    explain.set_defaults(usage_error=explain.error)  # exit 2 with this command's usage
    _add_compare_parser(commands)
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
        if args.command == "compare":
            return _compare(args, settings)
        return _explain(args, settings)
    except SettingsError as exc:
        print(f"unbox: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
