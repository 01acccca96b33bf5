"""The dashboard against a real ``unbox api`` with API keys on (UNBOX_API_KEYS_FILE), in Chromium.

Keys are made with the real CLI (``unbox keys add``). The page asks for a key when the models
call answers 401, says when a key is refused, keeps the right one in sessionStorage only (not
localStorage, not a cookie, never in a URL), sends it on every /v1 call and asks again in a new
session; a key without a scope and a rate-limited key get readable messages. The server runs
without a queue, so the one check on job results (the "Result picture" link, which must be
fetched with the key) answers the job routes from the test itself.

Screenshots go to ``test-artifacts/dashboard-auth-*.png``.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import REPO, start_api, stop
# importing test_dashboard skips this module without Playwright, and fails it under CI=true
from tests.test_dashboard import TIMEOUT_MS, browser, wait_for_overlay  # noqa: F401 (the browser fixture)

KEY_ITEM = "unbox.apiKey"  # the sessionStorage item api.js keeps the key in


def add_key(keys_file: Path, name: str, *extra: str) -> str:
    """Create a key with the real CLI; it prints the key alone on its last line."""
    done = subprocess.run([sys.executable, "-m", "app.cli", "keys", "add", name, *extra], cwd=REPO, check=True,
                          capture_output=True, text=True, env={**os.environ, "UNBOX_API_KEYS_FILE": str(keys_file)},
                          timeout=60)
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("keys")
    keys_file = folder / "keys.toml"
    return {
        "file": keys_file,
        "full": add_key(keys_file, "dashboard", "--scopes", "predict,explain,jobs"),
        "predict_only": add_key(keys_file, "predict-only", "--scopes", "predict"),
        "one_per_minute": add_key(keys_file, "slow-lane", "--rate-limit", "1"),
    }


@pytest.fixture(scope="module")
def server(keys: dict[str, object], artifacts: Path) -> Iterator[str]:
    """``unbox api`` (the default model, no queue) with the key file above. Scoring stays in
    PyTorch (no ONNX export at start-up, seconds saved) and Score-CAM scores 16 channels."""
    process, url = start_api({"UNBOX_API_KEYS_FILE": str(keys["file"]), "UNBOX_SCORECAM_CHANNELS": "16",
                              "UNBOX_CPU_RUNTIME": "torch", "UNBOX_FAST_WARMUP": "false", "UNBOX_TORCH_THREADS": "2"},
                             artifacts / "dashboard-auth-server.log")
    yield url
    stop(process)


class Session:
    """A browser context (one "session") with one page that records every /v1 request and answer."""

    def __init__(self, browser, url: str, key: str | None = None) -> None:
        self.context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        self.context.set_default_timeout(TIMEOUT_MS)
        if key:  # as if the key had been entered earlier in this tab
            self.context.add_init_script(f"sessionStorage.setItem({json.dumps(KEY_ITEM)}, {json.dumps(key)})")
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.requests: list[tuple[str, str | None]] = []  # (url, Authorization header)
        self.statuses: list[tuple[str, int]] = []
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("request", lambda r: self.requests.append((r.url, r.headers.get("authorization")))
                     if "/v1/" in r.url else None)
        self.page.on("response", lambda r: self.statuses.append((r.url, r.status)) if "/v1/" in r.url else None)
        self.url = url

    def open(self) -> object:
        self.page.goto(self.url + "/")
        self.page.wait_for_selector("html[data-ready=true]")
        return self.page

    def close(self) -> None:
        self.context.close()
        assert not self.errors, f"JavaScript errors on the page: {self.errors}"


@pytest.fixture
def session(browser, server: str, artifacts: Path, request: pytest.FixtureRequest) -> Iterator[object]:
    """Opens sessions; screenshots the last page when the test fails and closes them all."""
    opened: list[Session] = []

    def open_session(key: str | None = None) -> Session:
        opened.append(Session(browser, server, key))
        opened[-1].open()
        return opened[-1]

    failed_before = request.session.testsfailed
    yield open_session
    if request.session.testsfailed > failed_before and opened:
        opened[-1].page.screenshot(path=str(artifacts / f"dashboard-auth-failed-{request.node.name}.png"),
                                   full_page=True)
    for each in opened:
        each.close()


def storage_and_cookies(page) -> dict[str, str]:
    return page.evaluate("() => ({ session: JSON.stringify({ ...sessionStorage }),"
                         " local: JSON.stringify({ ...localStorage }), cookie: document.cookie })")


def test_key_form_refusal_then_key_for_this_session_only(session, keys, artifacts: Path) -> None:
    key = keys["full"]
    first = session()
    page = first.page

    # The first API call (the method list or the models) got 401: the form appears, with focus
    # in its labelled password input.
    page.wait_for_selector("#key-panel:not([hidden])")
    refused = {u.removeprefix(first.url) for u, s in first.statuses if s == 401}
    assert refused & {"/v1/models", "/v1/jobs/methods"}, first.statuses
    field = page.get_by_label("API key", exact=True)
    assert field.get_attribute("type") == "password" and field.get_attribute("id") == "key-input"
    assert page.evaluate("document.activeElement.id") == "key-input"
    assert "unbox keys add" in page.text_content("#key-hint")
    assert page.is_hidden("#key-error") and page.is_hidden("#forget-key")
    assert page.input_value("#model-select") == ""  # the models list waits for a key

    # A wrong key (Enter submits): refused, said so, and the form stays with focus in it.
    page.keyboard.type("ubx_not_a_key")
    page.keyboard.press("Enter")
    page.wait_for_selector("#key-error:not([hidden])")
    assert "refused" in page.text_content("#key-error")
    assert page.is_visible("#key-panel") and page.evaluate("document.activeElement.id") == "key-input"
    assert page.get_attribute("#key-input", "aria-invalid") == "true"
    assert page.is_hidden("#forget-key")  # a refused key is not kept
    page.screenshot(path=str(artifacts / "dashboard-auth-refused.png"))

    # The right key ("Use key"): the waiting calls go again, and the page works.
    page.fill("#key-input", key)
    page.click("#key-panel button[type=submit]")
    page.wait_for_selector("#key-panel", state="hidden")
    page.wait_for_function("() => document.querySelector('#model-select').value === 'efficientnet_lite0'")
    assert page.is_visible("#forget-key")
    entered = len(first.requests)
    page.click("button[data-sample='chelsea.jpg']")
    page.wait_for_selector("#predictions .prediction")
    wait_for_overlay(page, "panel-gradcam")
    assert page.is_hidden("#panel-gradcam [data-role=error]")
    page.screenshot(path=str(artifacts / "dashboard-auth-working.png"), full_page=True)

    # Every /v1 call since carried the key in its header, and no URL ever held it.
    sent = first.requests[entered:]
    assert {"/v1/predict", "/v1/explain"} <= {u.removeprefix(first.url) for u, _ in sent}
    assert all(header == f"Bearer {key}" for _, header in sent), sent
    assert not any(key in u for u, _ in first.requests)

    # The key is in sessionStorage only.
    held = storage_and_cookies(page)
    assert json.loads(held["session"]).get(KEY_ITEM) == key
    assert key not in held["local"] and key not in held["cookie"]
    assert not any(key in cookie["value"] for cookie in first.context.cookies())

    # A reload keeps the tab's session: no form.
    page.reload()
    page.wait_for_function("() => document.querySelector('#model-select').value === 'efficientnet_lite0'")
    assert page.is_hidden("#key-panel")

    # A new session asks again.
    second = session().page
    second.wait_for_selector("#key-panel:not([hidden])")
    assert KEY_ITEM not in json.loads(storage_and_cookies(second)["session"])

    # "Forget key" drops it; the next call asks again.
    page.click("#forget-key")
    assert "forgotten" in page.text_content("#key-state")
    assert page.evaluate("document.activeElement.id") == "key-state"
    assert KEY_ITEM not in json.loads(storage_and_cookies(page)["session"])
    page.click("button[data-sample='coffee.jpg']")
    page.wait_for_selector("#key-panel:not([hidden])")
    assert page.is_hidden("#key-error")  # nothing was refused: no key was sent


def test_missing_scope_and_rate_limit_are_explained(session, keys) -> None:
    # A key without the explain scope: predictions work, the heat maps name the scope.
    page = session(keys["predict_only"]).page
    page.click("button[data-sample='chelsea.jpg']")
    page.wait_for_selector("#predictions .prediction")
    page.wait_for_selector("#panel-gradcam [data-role=error]:not([hidden])")
    assert 'lacks the "explain" scope' in page.text_content("#panel-gradcam [data-role=error]")
    assert page.is_hidden("#key-panel")

    # A key allowed one request a minute: the prediction uses it, the heat maps wait.
    page = session(keys["one_per_minute"]).page
    page.click("button[data-sample='chelsea.jpg']")
    page.wait_for_selector("#predictions .prediction")
    page.wait_for_selector("#panel-gradcam [data-role=error]:not([hidden])")
    text = page.text_content("#panel-gradcam [data-role=error]")
    assert text.startswith("Rate limited, retry in ") and " s." in text, text


def test_result_picture_is_fetched_with_the_key(session, keys) -> None:
    """The one API resource the page links to (a job's result.png) cannot carry the header as a
    link: with a key held it is fetched with it and linked as an object URL. The job routes are
    answered here (this server has no queue) and give the picture only for the right key."""
    key = keys["full"]
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 60, 20)).save(buffer, format="PNG")
    picture = buffer.getvalue()
    job = {"id": "j1", "status": "succeeded", "method": "igos", "model": "efficientnet_lite0", "progress": 1,
           "result": {"target": {"index": 281, "label": "tabby", "score": 0.5},
                      "heatmap": {"overlay_png": base64.b64encode(picture).decode(), "png": None}},
           "links": {"self": "/v1/jobs/j1", "result_png": "/v1/jobs/j1/result.png"}}

    def jobs(route) -> None:
        request = route.request
        if request.headers.get("authorization") != f"Bearer {key}":
            route.fulfill(status=401, json={"error": {"code": "unauthorized", "message": "no key"}},
                          headers={"WWW-Authenticate": 'Bearer realm="unbox"'})
        elif request.url.endswith("/result.png"):
            route.fulfill(status=200, body=picture, content_type="image/png")
        elif request.method == "POST":
            route.fulfill(status=202, json={field: job[field] for field in ("id", "method", "model", "links")}
                          | {"status": "queued"})
        else:
            route.fulfill(status=200, json=job)

    opened = session(key)
    page = opened.page
    page.route("**/v1/jobs/j1**", jobs)
    page.route("**/v1/jobs", jobs)
    page.click("button[data-sample='chelsea.jpg']")
    page.wait_for_selector("#predictions .prediction")
    card = page.locator("#job-igos")
    card.locator("[data-role=start]").click()
    link = card.locator(".download:has-text('Result picture')")
    page.wait_for_function("() => document.querySelector('#job-igos .download[data-state=ready]')")
    assert link.get_attribute("href").startswith("blob:")
    with page.expect_download() as download_info:
        link.click()
    assert Path(download_info.value.path()).read_bytes() == picture
    assert (opened.url + "/v1/jobs/j1/result.png", f"Bearer {key}") in opened.requests
