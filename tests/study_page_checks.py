"""Browser checks of a study's dashboard page (``/dashboard/studies/{id}``), for the study tests.

Not a test module: the study tests call :func:`check_study_page` with their running stack (a
Playwright browser and the base URL of a server that has finished the study). The numbers the
page shows are compared with ``GET /v1/studies/{id}`` read here with httpx (no API key).
"""

from __future__ import annotations

import math
from pathlib import Path

import httpx

TIMEOUT_MS = 60_000
SECTIONS = ("faithfulness", "subexplanations", "crosstest", "regions", "agreement")
ENDED = ("succeeded", "canceled")


def _visible_text(page, selector: str) -> str:
    assert page.locator(selector).count() == 1, f"{selector} is missing"
    assert page.is_visible(selector), f"{selector} is not shown"
    return page.inner_text(selector).strip()


def check_study_page(browser, base_url: str, study_id: str, artifacts: Path, expect_first: int | None = None) -> None:
    """Open /dashboard/studies/{id} in a fresh context (viewport 1280x900), wait for data-ready, assert: no JS errors
    (collect page.on('pageerror')); #study-progress has data-status succeeded; every summary section present in
    GET /v1/studies/{id}'s summary is rendered and non-empty (faithfulness bars count == number of per-entries x 2;
    crosstest cells count == models^2; gallery <img> all loaded with naturalWidth > 0; when expect_first is given,
    the first gallery item's data-index == expect_first); the dashboard root page lists the study in its Studies
    list with a link to the page; save a full-page screenshot to artifacts / 'study-page.png'."""
    base_url = base_url.rstrip("/")
    answer = httpx.get(f"{base_url}/v1/studies/{study_id}", timeout=30)
    assert answer.status_code == 200, f"GET /v1/studies/{study_id}: {answer.status_code} {answer.text[:300]}"
    view = answer.json()
    assert view["status"] == "succeeded", f"the study has not succeeded: {view['status']}"
    summary = view.get("summary") or {}
    page_path = f"/dashboard/studies/{study_id}"

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    try:
        page = context.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(base_url + page_path)
        page.wait_for_selector("html[data-ready=true]")
        page.wait_for_function("() => ['succeeded', 'canceled'].includes("
                               "document.querySelector('#study-progress')?.dataset.status)")
        assert page.get_attribute("#study-progress", "data-status") == "succeeded"
        assert page.is_hidden("#study-error"), page.text_content("#study-error")
        assert page.is_hidden("#study-cancel")
        title = view.get("name") or study_id
        assert title in page.text_content("#h-study")

        for name in SECTIONS:
            selector = f"#study-{name}"
            if summary.get(name):
                assert _visible_text(page, selector), f"{selector} is empty"
            else:
                assert page.locator(selector).count() == 0 or page.is_hidden(selector), f"{selector} shown without data"

        if summary.get("faithfulness"):
            per = summary["faithfulness"]["per"]
            bars = page.locator("#study-faithfulness svg rect.bar")
            assert bars.count() == 2 * len(per), (bars.count(), len(per))
            assert page.locator("#study-faithfulness svg[aria-label]").count() == len(per)
            assert "lower deletion, higher insertion is better" in page.text_content("#study-faithfulness").lower()
            for entry in per:
                for kind in ("deletion", "insertion"):
                    bar = (f"#study-faithfulness rect.bar[data-model='{entry['model']}']"
                           f"[data-method='{entry['method']}'][data-kind='{kind}']")
                    assert math.isclose(float(page.get_attribute(bar, "data-value")), entry[kind]["mean"], abs_tol=1e-9)

        if summary.get("subexplanations"):
            sub = summary["subexplanations"]
            assert page.locator("#study-subexplanations svg[aria-label]").count() == len(sub["per_model"])
            reading = (sub.get("reading") or {}).get("text")
            if reading:
                assert reading in page.text_content("#study-subexplanations")

        if summary.get("crosstest"):
            cross = summary["crosstest"]
            models = cross["models"]
            cells = page.locator("#study-crosstest [data-source][data-viewer]")
            assert cells.count() == len(models) ** 2, (cells.count(), models)
            shown = {(c["source"], c["viewer"]): c["value"] for c in page.eval_on_selector_all(
                "#study-crosstest [data-source][data-viewer]", "cells => cells.map(c => ({ ...c.dataset }))")}
            for entry in cross["matrix"]:  # the default budget is the first (lowest)
                expected = entry["values"][0] if entry["values"] else None
                value = shown[(entry["source"], entry["viewer"])]
                if expected is None:
                    assert value == "", (entry, value)
                else:
                    assert math.isclose(float(value), expected, abs_tol=1e-9), (entry, value)
            measure = {"accuracy": "accuracy", "retention": "retention"}.get(cross["measure"], cross["measure"])
            assert measure in page.text_content("#study-crosstest").lower()

        if summary.get("regions"):
            regions = summary["regions"]
            assert page.locator("#study-regions tbody tr").count() == len(regions["per"])
            ranked = regions.get("ranked") or []
            if ranked:
                page.wait_for_selector("#study-gallery[data-state=ready]")
                indexes = page.eval_on_selector_all("#study-gallery [data-index]",
                                                    "items => items.map(item => Number(item.dataset.index))")
                assert indexes == [entry["index"] for entry in ranked], indexes
                widths = page.eval_on_selector_all("#study-gallery img",
                                                   "imgs => imgs.map(img => img.complete ? img.naturalWidth : 0)")
                assert len(widths) == len(ranked) and all(width > 0 for width in widths), widths
                if expect_first is not None:
                    assert indexes[0] == expect_first, (indexes[0], expect_first)
            else:
                assert expect_first is None, "expected a gallery, the summary ranks no item"

        if summary.get("agreement"):
            assert page.locator("#study-agreement table").count() == len(summary["agreement"]["per_model"])

        page.screenshot(path=str(artifacts / "study-page.png"), full_page=True)

        # The dashboard lists the study with a link to its page.
        page.goto(base_url + "/")
        page.wait_for_selector("html[data-ready=true]")
        link = page.locator(f"#studies-list a[href='{page_path}']")
        link.wait_for()
        assert page.is_visible("#studies")
        assert (view.get("name") or study_id[:8]) in link.text_content()
    finally:
        context.close()
    assert not errors, f"JavaScript errors on the study page or the dashboard: {errors}"
