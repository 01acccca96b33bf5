"""The ``unbox`` command: serve, api and an offline ``explain``."""

from __future__ import annotations

import argparse
import json
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
    commands.add_parser("serve", help="run everything on this machine (the API and its model)")
    commands.add_parser("api", help="run the HTTP API alone")
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
        if args.command in ("serve", "api"):
            return _run_api(settings)
        return _explain(args, settings)
    except SettingsError as exc:
        print(f"unbox: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
