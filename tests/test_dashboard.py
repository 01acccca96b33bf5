"""The dashboard at ``/`` in a real browser (Playwright driving Debian's Chromium) against a real
``unbox serve`` (API, embedded Redis and a worker, the real efficientnet_lite0 model).

Screenshots go to the ``artifacts`` folder (``test-artifacts/dashboard-*.png``).
"""

from __future__ import annotations

import io
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import CAT_CLASSES, CUP, ESPRESSO, jpeg_bytes, start_api, stop

CHROMIUM = Path(os.environ.get("UNBOX_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
MAX_UPLOAD_BYTES = 1_000_000  # small, so that a 413 is cheap to provoke
TIMEOUT_MS = 60_000  # waits for server work on the shared 2-core CPU
NARROW = 390  # CSS pixels: a phone held upright
# I-GOS at a toy size (7 x 7 mask, one iteration of one step, a 5-step metric): seconds on a CPU.
QUICK_IGOS = '{"preset": "cpu", "mask_size": 7, "iterations": 1, "steps": 1, "max_trials": 2, "metric_steps": 5}'
STATIC = Path(__file__).resolve().parents[1] / "app" / "static"


def in_ci() -> bool:
    """On CI (``CI=true``, as CI services set it and as CI runs ``CI=true bash .ci/run``)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def browser_missing(reason: str, module: bool = False) -> NoReturn:
    """Skip the browser tests when Playwright or Chromium is missing; on CI that is a failure
    (.ci/run installs Chromium), so that the browser tests cannot vanish quietly."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: the browser tests must run, see .ci/run)", pytrace=False)
    pytest.skip(reason, allow_module_level=module)


try:
    from playwright import sync_api
except ImportError as exc:
    browser_missing(f"Playwright is not importable ({exc}): pip install -e '.[dev]'", module=True)


@pytest.fixture(scope="module")
def server(artifacts: Path) -> Iterator[str]:
    """``unbox serve`` with a small Score-CAM channel count and the test-only ``slow`` job method."""
    process, url = start_api({"UNBOX_SCORECAM_CHANNELS": "16", "UNBOX_MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES),
                              "UNBOX_JOB_METHOD_MODULES": "tests.queue_support", "UNBOX_TORCH_THREADS": "1",
                              "UNBOX_CPU_RUNTIME": "torch", "UNBOX_FAST_WARMUP": "false"},  # the page is under test
                             artifacts / "dashboard-server.log", command="serve")
    yield url
    stop(process)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not CHROMIUM.exists():
        browser_missing(f"no Chromium at {CHROMIUM}: install it with `apt-get install -y chromium` (see .ci/run)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server: str, artifacts: Path, request: pytest.FixtureRequest) -> Iterator[object]:
    """A fresh page on the dashboard; fails the test on any uncaught JavaScript error and, when
    the test failed, saves what the page showed (``dashboard-failed-<test>.png``)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(server + "/")
    page.wait_for_selector("html[data-ready=true]")
    failed_before = request.session.testsfailed
    yield page
    if request.session.testsfailed > failed_before:
        page.screenshot(path=str(artifacts / f"dashboard-failed-{request.node.name}.png"), full_page=True)
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def upload(page, name: str, data: bytes, mime: str) -> None:
    page.set_input_files("#file-input", files=[{"name": name, "mimeType": mime, "buffer": data}])


def overlay_width(page, panel: str) -> int:
    return page.eval_on_selector(f"#{panel} [data-role=overlay]", "img => img.complete ? img.naturalWidth : 0")


def wait_for_overlay(page, panel: str) -> None:
    page.wait_for_function(
        f"() => {{ const img = document.querySelector('#{panel} [data-role=overlay]');"
        " return img && !img.hidden && img.complete && img.naturalWidth > 0; }")


def job_outcome(page, card: str, timeout_ms: int = TIMEOUT_MS) -> str:
    """Wait until the job card ``card`` shows an ended job (or an error); its status and messages."""
    page.wait_for_function(
        f"() => {{ const c = document.querySelector('{card}');"
        " return ['succeeded', 'failed', 'canceled'].includes(c.dataset.status) || c.dataset.state === 'error'; }",
        timeout=timeout_ms)
    status = page.get_attribute(card, "data-status")
    texts = page.eval_on_selector(card, "c => [c.querySelector('[data-role=status]').textContent,"
                                        " c.querySelector('[data-role=error]').textContent]")
    return f"{status}: {' / '.join(t for t in texts if t)}"


def first_prediction_index(page) -> int:
    return int(page.get_attribute("#predictions li:first-child .prediction", "data-index"))


# ---------------------------------------------------------------- served files (no browser)

def test_page_and_static_files_are_served(server: str) -> None:
    with httpx.Client(base_url=server, timeout=10) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert '<script type="module" src="/static/js/main.js">' in page.text
        module = client.get("/static/js/main.js")
        assert module.status_code == 200 and module.headers["content-type"].startswith("text/javascript")
        assert client.get("/static/css/dashboard.css").headers["content-type"].startswith("text/css")
        for path in ("/static/../pages.py", "/static/%2e%2e/pages.py", "/static/nope.js", "/static/js"):
            answer = client.get(path)
            assert answer.status_code == 404, path
            assert answer.json()["error"]["code"] == "not_found"
    for name in ("chelsea.jpg", "coffee.jpg", "astronaut.jpg"):
        path = STATIC / "samples" / name
        assert path.stat().st_size <= 80_000
        with Image.open(path) as image:
            assert max(image.size) <= 640 and image.format == "JPEG"


# ---------------------------------------------------------------- the browser

def test_cat_photo_predictions_and_both_heatmaps(page, chelsea: Image.Image, artifacts: Path) -> None:
    upload(page, "chelsea.jpg", jpeg_bytes(chelsea), "image/jpeg")
    page.wait_for_selector("#predictions .prediction")
    assert page.locator("#predictions .prediction").count() == 5
    assert first_prediction_index(page) in CAT_CLASSES
    assert page.get_attribute("#predictions li:first-child .prediction", "aria-pressed") == "true"
    wait_for_overlay(page, "panel-gradcam")
    wait_for_overlay(page, "panel-scorecam")
    assert overlay_width(page, "panel-gradcam") > 0 and overlay_width(page, "panel-scorecam") > 0
    assert page.is_hidden("#panel-scorecam [data-role=error]")
    page.screenshot(path=str(artifacts / "dashboard-cat.png"), full_page=True)

    # Downloads: a real file with the picture behind each link.
    with page.expect_download() as download_info:
        page.click("#panel-gradcam .download:has-text('Overlay PNG')")
    saved = Path(download_info.value.path())
    with Image.open(saved) as picture:
        assert picture.format == "PNG" and picture.size == chelsea.size
    assert page.locator("#panel-scorecam .download").count() == 3

    # The opacity slider (from the keyboard) drives every overlay.
    page.focus("#opacity")
    page.keyboard.press("Home")
    assert page.input_value("#opacity") == "0"
    page.wait_for_function("() => getComputedStyle(document.querySelector("
                           "'#panel-gradcam [data-role=overlay]')).opacity === '0'")
    page.keyboard.press("End")
    assert page.text_content("#opacity-value") == "100%"

    # Choosing another class explains that class.
    second = page.locator("#predictions li:nth-child(2) .prediction")
    label = second.locator(".prediction-label").text_content()
    second.focus()
    page.keyboard.press("Enter")
    assert second.get_attribute("aria-pressed") == "true"
    assert page.locator("#predictions li:first-child .prediction").get_attribute("aria-pressed") == "false"
    assert page.evaluate("document.activeElement.dataset.index") == second.get_attribute("data-index")
    page.wait_for_function(
        "label => document.querySelector('#panel-gradcam [data-role=meta]').textContent.startsWith(label)", arg=label)
    wait_for_overlay(page, "panel-gradcam")
    assert label in page.text_content("#explain-target")


def test_every_synchronous_method_is_offered(page, server: str, chelsea: Image.Image, artifacts: Path) -> None:
    """The "more heat maps" panel lists the server's other synchronous methods (the /v1/explain
    method enum), under readable titles, and draws the one chosen."""
    document = httpx.get(server + "/openapi.json", timeout=30).json()
    enum = document["components"]["schemas"]["Body_explain_v1_explain_post"]["properties"]["method"]["enum"]
    upload(page, "chelsea.jpg", jpeg_bytes(chelsea), "image/jpeg")
    page.wait_for_selector("#panel-more:not([hidden])")
    options = dict(page.eval_on_selector_all("#more-method option", "os => os.map(o => [o.value, o.textContent])"))
    assert set(options) == set(enum) - {"gradcam", "scorecam"}  # those two have their own panels
    titles = {"cam": "CAM", "gradcam++": "Grad-CAM++", "xgradcam": "XGrad-CAM", "layercam": "LayerCAM",
              "hirescam": "HiResCAM", "eigencam": "Eigen-CAM"}
    assert {name: options.get(name) for name in titles} == titles
    assert page.input_value("#more-method") == "gradcam++"
    wait_for_overlay(page, "panel-more")
    label = page.text_content("#predictions li:first-child .prediction-label")
    assert page.text_content("#panel-more [data-role=meta]").startswith(label)

    page.select_option("#more-method", "eigencam")
    assert "class-agnostic" in page.text_content("#panel-more [data-role=desc]")
    page.wait_for_function("() => { const img = document.querySelector('#panel-more [data-role=overlay]');"
                           " return !img.hidden && img.complete && img.naturalWidth > 0"
                           " && img.alt.startsWith('Eigen-CAM heat map for'); }")
    assert "-eigencam-" in page.get_attribute("#panel-more .download:has-text('JSON')", "download")
    assert page.is_hidden("#panel-more [data-role=error]")
    page.locator("#panel-more").screenshot(path=str(artifacts / "dashboard-more-heatmaps.png"))


def test_text_file_and_oversize_image_show_readable_errors(page, artifacts: Path) -> None:
    upload(page, "notes.txt", b"not an image, just some words\n" * 20, "text/plain")
    alert = page.locator("#intake-error")
    alert.wait_for(state="visible")
    assert "not a supported image" in alert.text_content()
    assert page.locator("#predictions .prediction").count() == 0
    assert page.is_hidden("#panel-gradcam [data-role=overlay]")
    page.screenshot(path=str(artifacts / "dashboard-error-415.png"))

    noise = np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    assert len(buffer.getvalue()) > MAX_UPLOAD_BYTES
    upload(page, "huge.png", buffer.getvalue(), "image/png")
    page.wait_for_function("() => document.querySelector('#intake-error').textContent.includes('too large')")
    assert "exceeds" in alert.text_content()


def test_server_without_queue_shows_503(browser, api_server: str, chelsea: Image.Image, artifacts: Path) -> None:
    """``unbox api`` alone (no Redis): the page says so, and starting a job shows the API's 503."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    try:
        page.goto(api_server + "/")
        page.wait_for_selector("#queue-note:not([hidden])")
        assert "without a job queue" in page.text_content("#queue-note")
        card = page.locator("#job-sag")
        card.locator("[data-role=start]").click()
        assert "Choose an image first" in card.locator("[data-role=error]").text_content()
        upload(page, "chelsea.jpg", jpeg_bytes(chelsea), "image/jpeg")
        card.locator("[data-role=start]").click()
        page.wait_for_function("() => document.querySelector('#job-sag [data-role=error]').textContent"
                               ".includes('temporarily unavailable')")
        assert "UNBOX_REDIS_URL" in card.locator("[data-role=error]").text_content()
        assert card.locator("[data-role=start]").is_enabled() and card.locator("[data-role=cancel]").is_disabled()
        card.scroll_into_view_if_needed()
        page.screenshot(path=str(artifacts / "dashboard-no-queue-503.png"))
    finally:
        context.close()


def test_narrow_screen_and_keyboard_only(browser, server: str, artifacts: Path) -> None:
    context = browser.new_context(viewport={"width": NARROW, "height": 844}, is_mobile=True, has_touch=True)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    try:
        page.goto(server + "/")
        page.wait_for_selector("html[data-ready=true]")
        # Reach the espresso sample with Tab alone, then press Enter.
        for _ in range(12):
            page.keyboard.press("Tab")
            if page.evaluate("document.activeElement.dataset.sample") == "coffee.jpg":
                break
        else:
            pytest.fail("the espresso sample button is not reachable with Tab")
        page.keyboard.press("Enter")
        page.wait_for_selector("#predictions .prediction")
        assert first_prediction_index(page) in {ESPRESSO, CUP}
        wait_for_overlay(page, "panel-gradcam")
        wait_for_overlay(page, "panel-scorecam")
        overflow = page.evaluate("document.documentElement.scrollWidth") - NARROW
        assert overflow <= 0, f"the page scrolls sideways by {overflow} px on a narrow screen"
        rights = page.eval_on_selector_all("main *", "nodes => nodes.filter(n => !n.closest('.graph-viewport'))"
                                           ".map(n => n.getBoundingClientRect().right)")
        assert max(rights) <= NARROW, "an element sticks out of the narrow screen"
        page.screenshot(path=str(artifacts / "dashboard-narrow.png"), full_page=True)
    finally:
        context.close()


def test_jobs_run_with_live_progress_and_cancel(page, chelsea: Image.Image, artifacts: Path) -> None:
    upload(page, "chelsea.jpg", jpeg_bytes(chelsea), "image/jpeg")
    page.wait_for_selector("#predictions .prediction")
    page.wait_for_selector("#more-jobs:not([hidden])")
    page.click("#more-jobs > summary")

    # A long job (the test-only `slow` method): progress rises, then Cancel stops it. Its polls
    # follow the server's Retry-After (raised to 2 s here), not a fixed period.
    polls: list[float] = []

    def retry_after_2s(route) -> None:
        response = route.fetch()
        polls.append(time.monotonic())
        route.fulfill(response=response, headers={**response.headers, "retry-after": "2"})

    page.route(re.compile(r".*/v1/jobs/[0-9a-f]{32}\?pictures=inline$"), retry_after_2s)
    slow = page.locator("#job-slow")
    slow.locator("summary").click()
    slow.locator("textarea").fill('{"steps": 400, "step_s": 0.05}')
    slow.locator("[data-role=start]").click()
    page.wait_for_function("() => document.querySelector('#job-slow progress').value > 0.02")
    first = page.eval_on_selector("#job-slow progress", "bar => bar.value")
    page.wait_for_function("first => document.querySelector('#job-slow progress').value > first", arg=first)
    assert "Running" in slow.locator("[data-role=status]").text_content()
    slow.locator("[data-role=cancel]").click()
    outcome = job_outcome(page, "#job-slow")
    assert outcome.startswith("canceled"), outcome
    page.unroute(re.compile(r".*/v1/jobs/[0-9a-f]{32}\?pictures=inline$"))
    gaps = [b - a for a, b in zip(polls[1:], polls[2:])]  # the first poll follows the submission at once
    assert len(gaps) >= 1 and min(gaps) >= 1.9, f"polls did not wait for Retry-After: {gaps}"
    used = slow.locator("[data-role=params-used]").text_content()  # as validated, defaults included
    assert "steps = 400" in used and "step_s = 0.05" in used, used
    assert slow.locator("[data-role=start]").is_enabled()

    # A real method finishes and its result is drawn: I-GOS at a tiny size, so that it takes
    # seconds on a CPU, with its mask, deletion/insertion curves and downloads.
    card = page.locator("#job-igos")
    card.locator("summary").click()
    card.locator("textarea").fill(QUICK_IGOS)
    card.locator("[data-role=start]").click()
    outcome = job_outcome(page, "#job-igos", timeout_ms=120_000)
    assert outcome.startswith("succeeded"), outcome
    assert card.locator("[data-role=error]").is_hidden()
    page.wait_for_function("() => document.querySelector('#job-igos [data-role=job-overlay]').naturalWidth > 0")
    assert card.locator(".curves polyline").count() == 2
    assert "AUC" in card.locator(".legend").text_content()
    links = card.locator("[data-role=downloads] .download")
    assert {"Result JSON", "Overlay PNG", "Mask PNG", "Result picture"} <= {
        text.strip("↓ ").strip() for text in links.all_text_contents()}
    with page.expect_download() as download_info:
        card.locator(".download:has-text('Result picture')").click()
    with Image.open(download_info.value.path()) as picture:
        assert picture.format == "PNG" and picture.width > 0
    card.scroll_into_view_if_needed()
    page.screenshot(path=str(artifacts / "dashboard-jobs.png"), full_page=True)


# Deep methods at a toy size for the comparison (I-GOS++ takes the same parameters); SAG keeps its
# default parameters, so the graph drawn is the default one.
QUICK_MASKS = QUICK_IGOS
# SAG at a toy size for the second row (a 4 x 4 lattice, Grad-CAM ordering, a small graph)
TOY_SAG = '{"grid": 4, "beam_width": 1, "successors": 4, "max_roots": 1, "ordering": "gradcam", "max_nodes": 12}'
RECORD_STATUS_TEXTS = """() => { window.statusTexts = [];
  new MutationObserver(() => document.querySelectorAll('.job [data-role=status]').forEach(
    n => window.statusTexts.push(n.closest('.job').dataset.method + ': ' + n.textContent)))
    .observe(document.getElementById('jobs'), {subtree: true, childList: true, characterData: true}); }"""
EDGES_REMOVING_MORE_THAN_ONE_PATCH = """svg => [...svg.querySelectorAll('line.edge')].filter(line => {
  const node = id => svg.querySelector('#p' + line.dataset.panel + '-node-' + id);
  const patches = n => new Set(n.dataset.patches.split(' ').filter(Boolean).map(Number));
  const source = patches(node(line.dataset.source)), target = patches(node(line.dataset.target));
  const removed = Number(line.dataset.removed);
  return !(source.has(removed) && !target.has(removed) && target.size === source.size - 1
           && [...target].every(p => source.has(p)));
}).length"""


def test_compare_grid_and_readable_sag_graph(page, coffee: Image.Image, chelsea: Image.Image,
                                            artifacts: Path) -> None:
    """Every method fills the comparison grid (the deep ones as jobs, with the parameters in their
    cards); the jobs show their queue position and the parameters they run with; the default SAG
    graph (the espresso photo has 10 roots, a 100-node graph) is readable: its roots in view without
    scrolling, zoom and node details work."""
    upload(page, "coffee.jpg", jpeg_bytes(coffee), "image/jpeg")
    page.wait_for_selector("#predictions .prediction")
    page.wait_for_selector("#more-jobs:not([hidden])")  # the job listing has arrived
    for card in ("#job-igos", "#job-igospp"):
        page.locator(f"{card} summary").click()
        page.locator(f"{card} textarea").fill(QUICK_MASKS)
    page.evaluate(RECORD_STATUS_TEXTS)
    page.click("#compare-start")
    page.wait_for_selector("#compare-grid[data-complete=true]", timeout=240_000)

    states = page.eval_on_selector_all("#compare-grid .compare-cell", "cells => Object.fromEntries(cells.map("
                                       "c => [c.dataset.method, [c.dataset.state, c.innerText]]))")
    for method in ("gradcam", "scorecam", "gradcam++", "layercam", "igos", "igos++", "sag"):
        assert states[method][0] == "done", (method, states[method])
    assert all(state == "done" or "Not for this model" in text for state, text in states.values()), states
    for method in ("gradcam", "scorecam", "igos", "igos++"):
        deletion, insertion = map(float, re.search(r"deletion ([\d.]+) · insertion ([\d.]+)", states[method][1]).groups())
        assert 0 <= deletion <= 1 and 0 <= insertion <= 1, (method, deletion, insertion)
        if method in ("gradcam", "scorecam"):  # a map on the cup: deleting it first costs more than adding it
            assert deletion < insertion, (method, deletion, insertion)
        assert re.search(r"explained in [\d.]+ m?s", states[method][1]), states[method]
    assert "not a heat map" in states["sag"][1]

    # the job panels: what each job ran with (the card's parameters after the CPU preset), the queue
    used = page.locator("#job-igos [data-role=params-used]").text_content()
    assert "Ran with:" in used and 'preset = "cpu"' in used and "iterations = 1" in used and "mask_size = 7" in used
    assert "iterations = 20" not in used
    texts = page.evaluate("window.statusTexts")
    assert any(re.search(r"Queued.*(next in the queue|\d+ jobs? ahead)", t) for t in texts), texts[:20]

    # the SAG graph at its default parameters: bounded, one panel per root, edges remove one patch
    svg = page.locator("#job-sag svg.sag-svg")
    width, height = (float(svg.get_attribute(name)) for name in ("data-width", "data-height"))
    assert width <= 2400 and height <= 2400, (width, height)
    panels = svg.locator("g.sag-panel").count()
    roots = svg.locator("g.node.root")
    assert 1 <= panels == roots.count() <= 3  # the graph's roots share at most one patch: often fewer than 3
    assert svg.evaluate(EDGES_REMOVING_MORE_THAN_ONE_PATCH) == 0
    assert svg.locator("line.edge").count() > 0
    folded = svg.evaluate("svg => [...svg.querySelectorAll('g.more')].map(g => Number(g.dataset.folded))")
    assert all(n > 0 for n in folded)
    viewport = page.locator("#job-sag [data-role=graph-viewport]")
    viewport.scroll_into_view_if_needed()
    page.evaluate("() => document.querySelector('#job-sag [data-role=graph-viewport]').scrollIntoView({block: 'start'})")
    inside = svg.evaluate("""svg => { const view = svg.closest('.graph-viewport').getBoundingClientRect();
      return [...svg.querySelectorAll('g.node.root')].map(n => { const r = n.getBoundingClientRect();
        return r.width > 20 && r.left >= Math.max(view.left, 0) - 1 && r.right <= Math.min(view.right, innerWidth) + 1
               && r.top >= Math.max(view.top, 0) - 1 && r.bottom <= Math.min(view.bottom, innerHeight) + 1; }); }""")
    assert inside and all(inside), f"a root is outside the visible area: {inside}"
    page.screenshot(path=str(artifacts / "dashboard-sag.png"))

    first_root = roots.first
    before = first_root.bounding_box()["width"]
    page.click("#job-sag [data-role=zoom-in]")
    page.click("#job-sag [data-role=zoom-in]")
    assert first_root.bounding_box()["width"] > 1.8 * before
    assert float(svg.get_attribute("data-zoom")) > 1.9
    page.click("#job-sag [data-role=fit]")
    assert abs(first_root.bounding_box()["width"] - before) < 1

    child = svg.locator("g.node:not(.root)").first
    child.click()
    detail = page.locator("#job-sag [data-role=node-detail]")
    detail.wait_for(state="visible")
    assert f"p = {float(child.get_attribute('data-score')):.3f}" in detail.locator("[data-role=node-score]").text_content()
    assert detail.locator("canvas").evaluate("c => c.width") >= 300

    # a second image adds a row (SAG at a toy size now); the first row stays as it was
    upload(page, "chelsea.jpg", jpeg_bytes(chelsea), "image/jpeg")
    page.wait_for_function("() => document.querySelector('#predictions .prediction')"
                           " && document.querySelector('#original-caption').textContent.startsWith('chelsea')")
    page.locator("#job-sag summary").click()
    page.locator("#job-sag textarea").fill(TOY_SAG)
    page.click("#compare-start")
    page.wait_for_function("() => document.querySelectorAll('#compare-grid .compare-row').length === 2"
                           " && document.querySelector('#compare-grid').dataset.complete === 'true'", timeout=180_000)
    rows = page.eval_on_selector_all("#compare-grid .compare-row", "rows => rows.map(r => [r.querySelector('h3')"
                                     ".textContent, r.querySelectorAll('.compare-cell[data-state=done]').length])")
    assert rows[0][0].startswith("coffee.jpg") and rows[1][0].startswith("chelsea.jpg"), rows
    assert rows[0][1] == rows[1][1] == 11, rows

    with page.expect_download() as download_info:
        page.click("#compare-download")
    with Image.open(download_info.value.path()) as figure:  # a header, then a row per image: 13 columns
        assert figure.format == "PNG" and figure.width >= 13 * 200 and figure.height > 350, figure.size
    page.locator("#compare").scroll_into_view_if_needed()
    page.screenshot(path=str(artifacts / "dashboard-compare.png"), full_page=True)
