"""Make the README's pictures from the sample photos, so that they stay true to the code.

``python scripts/readme_pictures.py`` (or ``make pictures``) writes, under ``docs/images``:

- ``gradcam-cat.png``: Grad-CAM of the cat photo over it, as ``POST /v1/explain`` draws it;
- ``sag-espresso.svg``: the Structured Attention Graph of the espresso photo at the default
  parameters, the SVG a ``sag`` job returns (the cat sample has no minimal sufficient patch set
  within the default search limits);
- ``compare.png``: the comparison figure of ``unbox compare`` on the cat and espresso photos
  (Grad-CAM, Score-CAM, I-GOS, I-GOS++, SAG; the CPU preset unless ``--preset paper``);
- ``dashboard.png``: the dashboard in headless Chromium against a real ``unbox serve``, after
  choosing the cat sample (skipped with ``--no-dashboard``).

Everything runs offline on the default model. PNGs are written palette-quantised to stay small.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from PIL import Image  # noqa: E402

SAMPLES = REPO / "app" / "static" / "samples"
OUT = REPO / "docs" / "images"
MODEL = "efficientnet_lite0"
CHROMIUM = Path(os.environ.get("UNBOX_TEST_CHROMIUM", "/usr/bin/chromium"))


def save_small_png(picture: Image.Image, path: Path) -> None:
    """``picture`` as a 256-colour PNG (photographs and heat maps survive it well)."""
    picture.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG).save(
        path, format="PNG", optimize=True)
    print(f"wrote {path.relative_to(REPO)} ({path.stat().st_size // 1024} KB, {picture.width}x{picture.height})")


def load_model(settings):
    from models.catalog import load_catalog
    from models.registry import ModelRegistry

    policy = settings.execution_policy().with_changes(warmup=False)
    return ModelRegistry(load_catalog(settings.catalog), settings.resolved_device(), policy).get(MODEL)


def gradcam_picture(model, settings) -> None:
    from explainers.pipeline import explain_image

    cat = Image.open(SAMPLES / "chelsea.jpg").convert("RGB")
    result = explain_image(model, cat, "gradcam", None, None, 5, 480, None)
    save_small_png(Image.open(io.BytesIO(result.heatmap.overlay_png)), OUT / "gradcam-cat.png")


def sag_picture(model, settings) -> None:
    from workers.methods import get_method

    sag = get_method("sag")
    espresso = Image.open(SAMPLES / "coffee.jpg").convert("RGB")
    result = sag.run(model, espresso, None, sag.params.model_validate({}), lambda fraction, stage: None, settings)
    path = OUT / "sag-espresso.svg"
    path.write_text(result["svg"], encoding="utf-8")
    print(f"wrote {path.relative_to(REPO)} ({path.stat().st_size // 1024} KB; {len(result['nodes'])} graph nodes)")


def compare_picture(model, settings, preset: str) -> None:
    from app.compare import compare_images, figure_rows
    from explainers.compare_figure import compose_figure

    photos = [(name, Image.open(SAMPLES / name).convert("RGB")) for name in ("chelsea.jpg", "coffee.jpg")]
    rows = compare_images(model, photos, ["gradcam", "scorecam", "igos", "igos++", "sag"], None, preset, settings)
    png, _ = compose_figure(figure_rows(rows))
    save_small_png(Image.open(io.BytesIO(png)), OUT / "compare.png")


def dashboard_picture() -> None:
    """Start ``unbox serve``, open the dashboard, choose the cat sample, screenshot the top."""
    from playwright.sync_api import sync_playwright

    from bench.queue import wait_ready
    from workers.redis_server import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "UNBOX_HOST": "127.0.0.1", "UNBOX_PORT": str(port), "UNBOX_LOG_LEVEL": "warning"}
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], cwd=REPO, env=env, stdout=log,
                                  stderr=subprocess.STDOUT)
        try:
            try:
                wait_ready(url, server)
            except SystemExit as exc:
                log.seek(0)
                raise SystemExit(f"unbox serve did not start ({exc}): {log.read()[-2000:].decode(errors='replace')}")
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
                page = browser.new_page(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
                page.goto(url + "/")
                page.wait_for_selector("html[data-ready=true]")
                page.click("button[data-sample='chelsea.jpg']")
                for panel in ("panel-gradcam", "panel-scorecam"):
                    page.wait_for_function(f"() => {{ const i = document.querySelector('#{panel} [data-role=overlay]');"
                                           " return i && !i.hidden && i.complete && i.naturalWidth > 0; }",
                                           timeout=120_000)
                # the top of the page down to the end of the heat-map panels
                bottom = page.evaluate("document.querySelector('#panel-gradcam').getBoundingClientRect().bottom"
                                       " + window.scrollY + 16")
                shot = page.screenshot(clip={"x": 0, "y": 0, "width": 1280, "height": bottom}, full_page=True)
                browser.close()
        finally:
            server.terminate()
            server.wait(timeout=30)
    save_small_png(Image.open(io.BytesIO(shot)), OUT / "dashboard.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=("cpu", "paper"), default="cpu",
                        help="parameters of the comparison's I-GOS, I-GOS++ and SAG (default cpu)")
    parser.add_argument("--no-dashboard", action="store_true", help="skip the dashboard screenshot")
    args = parser.parse_args(argv)

    from app.settings import load_settings

    settings = load_settings()
    OUT.mkdir(parents=True, exist_ok=True)
    model = load_model(settings)
    gradcam_picture(model, settings)
    sag_picture(model, settings)
    compare_picture(model, settings, args.preset)
    if not args.no_dashboard:
        dashboard_picture()
    return 0


if __name__ == "__main__":
    sys.exit(main())
