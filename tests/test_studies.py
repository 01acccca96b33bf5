"""Studies end to end: a real Redis, real workers with the real pretrained models, real HTTP.

One stack serves the module: two workers holding efficientnet_lite0 and efficientnet_lite1.
The main study (12 images: the sample photos, two composites, flips) runs Grad-CAM and LayerCAM
on both models with every map analysis, while one worker is killed mid-study; its
summary must equal a recomputation from items.csv, and the regions analysis must rank first
the composite whose expected region is on the wrong half. Then: a repeated study is answered
from the cache, a cancel stops the rest, hostile archives are 4xx, and SAG's sub-explanations
are counted over both models.
"""

from __future__ import annotations

import csv
import io
import json
import signal
import statistics
import tarfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image, ImageOps

from tests.queue_support import Stack, running_stack, wait_for
from workers.jobqueue import job_key, queue_key
from workers.study_store import item_id, study_queue

MODELS = ["efficientnet_lite0", "efficientnet_lite1"]
ESPRESSO, EGYPTIAN_CAT = 967, 285
SPEC = {"name": "sample photos", "models": MODELS,
        "methods": [{"name": "gradcam"}, {"name": "layercam"}],
        "analyses": {"faithfulness": {"steps": 2, "bootstrap": 200}, "regions": {"gallery": 8},
                     "crosstest": {"budgets": [0.1, 0.3], "method": "gradcam"}, "agreement": {"grid": 7}}}
TERMINAL = {"succeeded", "canceled"}


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _small(image: Image.Image, side: int = 320) -> Image.Image:
    image = image.convert("RGB")
    scale = side / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))


@pytest.fixture(scope="module")
def photos(chelsea: Image.Image, coffee: Image.Image, cat_and_coffee: Image.Image) -> dict[str, Image.Image]:
    """Twelve images: the sample photos, two composites and flips."""
    from skimage import data

    base = {"chelsea.png": chelsea, "coffee.png": coffee, "astronaut.png": Image.fromarray(data.astronaut()),
            "rocket.png": Image.fromarray(data.rocket()), "camera.png": Image.fromarray(data.camera()),
            "composite.png": cat_and_coffee}
    swapped = Image.new("RGB", cat_and_coffee.size)
    half = cat_and_coffee.width // 2
    swapped.paste(cat_and_coffee.crop((half, 0, 2 * half, cat_and_coffee.height)), (0, 0))
    swapped.paste(cat_and_coffee.crop((0, 0, half, cat_and_coffee.height)), (half, 0))
    base["swapped.png"] = swapped
    images = {name: _small(image) for name, image in base.items()}
    for name in ("chelsea.png", "coffee.png", "composite.png", "rocket.png", "astronaut.png"):
        images[name.replace(".png", "_flip.png")] = ImageOps.mirror(images[name])
    assert len(images) == 12
    return images


def manifest_and_archive(photos: dict[str, Image.Image]) -> bytes:
    """A zip with manifest.csv: labels for the two photos; the composite's espresso explained with
    the expected region on the cat's half (wrong), the flipped composite with it on the cup's half."""
    width, height = photos["composite.png"].size
    left_half = f"0 0 {width // 2} {height}"
    lines = ["path,target,label,region,region_kind",
             f"photos/chelsea.png,,{EGYPTIAN_CAT},0 0 {photos['chelsea.png'].width} 25,forbidden",
             f"photos/coffee.png,,{ESPRESSO},,",
             f"photos/composite.png,{ESPRESSO},,{left_half},expected",
             f"photos/composite_flip.png,{ESPRESSO},,{left_half},expected"]
    lines += [f"photos/{name}" for name in photos if name not in (
        "chelsea.png", "coffee.png", "composite.png", "composite_flip.png")]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("manifest.csv", "\n".join(lines) + "\n")
        for name, image in photos.items():
            archive.writestr(f"photos/{name}", _png(image))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def stack(artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("studies")
    with running_stack(artifacts, folder, "studies", workers=2, models=",".join(MODELS),
                       env={"UNBOX_STUDY_MAX_FILES": "40", "UNBOX_MAX_IMAGE_PIXELS": "4000000"}) as started:
        yield started


def submit_study(client: httpx.Client, archive: bytes, spec: dict[str, Any], name: str = "study.zip") -> httpx.Response:
    return client.post("/v1/studies", files={"archive": (name, archive, "application/zip")},
                       data={"spec": json.dumps(spec)})


def wait_study(client: httpx.Client, study_id: str, timeout: float = 240.0,
               until: Any = lambda view: view["status"] in TERMINAL) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(f"/v1/studies/{study_id}")
        assert response.status_code == 200, response.text
        view = response.json()
        if until(view):
            return view
        assert time.monotonic() < deadline, f"study {study_id} still {view['status']}: {view['progress']}"
        time.sleep(0.1)


def item_record(stack: Stack, study_id: str, index: int) -> dict[str, str]:
    raw = stack.redis().hgetall(job_key(item_id(study_id, index)))
    return {k.decode(): v.decode() for k, v in raw.items()}


def read_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def number(text: str) -> float | None:
    return float(text) if text != "" else None


@pytest.fixture(scope="module")
def main_study(stack: Stack, photos: dict[str, Image.Image]) -> dict[str, Any]:
    """The 12-image study, with one worker SIGKILLed while it holds an item (then replaced)."""
    client = stack.client()
    response = submit_study(client, manifest_and_archive(photos), SPEC)
    assert response.status_code == 202, response.text
    study_id = response.json()["id"]
    assert response.headers["Location"] == f"/v1/studies/{study_id}"
    assert response.json()["progress"]["total"] == 12 * 2 * 2
    assert response.json()["images"] == 12
    job = client.post("/v1/jobs", files={"image": ("cat.png", _png(photos["chelsea.png"]), "image/png")},
                      data={"method": "gradcam", "model": MODELS[0]})
    assert job.status_code == 202, job.text
    wait_for(client, job.json()["id"], {"succeeded"})  # interactive jobs go before the study's items
    done_when_job_ended = client.get(f"/v1/studies/{study_id}").json()["progress"]["done"]
    wait_study(client, study_id, until=lambda view: view["progress"]["done"] >= 3)
    held = None
    deadline = time.monotonic() + 60
    while held is None and time.monotonic() < deadline:  # SIGKILL the worker of a running item
        running = [value.decode() for value in stack.redis().zrange("unbox:running", 0, -1)]
        job = next((job_id for job_id in running if job_id.startswith(study_id)), None)
        worker = stack.redis().hget(job_key(job), "worker") if job else None
        if not worker:
            time.sleep(0.02)
            continue
        name = worker.decode()
        victim = next(w for w in stack.workers if w.pid == int(name.rsplit("-", 1)[1]))
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        index = int(job.rsplit("-", 1)[1])
        record = item_record(stack, study_id, index)
        if (record["status"], record["worker"]) == ("running", name):  # it died holding the item
            held = index
        stack.add_worker()  # a supervisor would replace it; the study must not wait for that
    assert held is not None, "no worker was caught holding an item"
    view = wait_study(client, study_id)
    return {"id": study_id, "view": view, "killed_item": held, "client": client,
            "done_when_job_ended": done_when_job_ended}


def test_study_finishes_and_a_killed_worker_loses_no_item(stack: Stack, main_study: dict[str, Any]) -> None:
    view = main_study["view"]
    assert view["status"] == "succeeded"
    assert view["progress"] == {**view["progress"], "done": 48, "total": 48, "succeeded": 48, "failed": 0}
    killed = item_record(stack, main_study["id"], main_study["killed_item"])
    assert killed["status"] == "succeeded" and int(killed["attempts"]) == 2 and killed["lost"] == "1"
    for index in range(48):  # exactly one outcome each, no leftover image or lease
        record = item_record(stack, main_study["id"], index)
        assert record["status"] == "succeeded" and record["result"], index
    assert not stack.redis().exists(f"unbox:image:{item_id(main_study['id'], 0)}")
    assert main_study["done_when_job_ended"] < 24  # the single-image job did not wait for the study
    summary = view["summary"]
    assert set(summary) >= {"items", "faithfulness", "regions", "crosstest", "agreement"}
    assert summary["items"]["total"] == 48 and summary["items"]["succeeded"] == 48


def test_summary_equals_a_recomputation_from_items_csv(main_study: dict[str, Any]) -> None:
    client, study_id, summary = main_study["client"], main_study["id"], main_study["view"]["summary"]
    response = client.get(f"/v1/studies/{study_id}/items.csv")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
    rows = read_csv(response.text)
    assert len(rows) == 48
    assert list(rows[0])[:9] == ["path", "model", "method", "target", "score", "deletion_auc", "insertion_auc",
                                 "region_share", "pointing_hit"]
    assert {row["path"] for row in rows} == {f"photos/{name}" for name in (
        "chelsea.png", "coffee.png", "astronaut.png", "rocket.png", "camera.png", "composite.png", "swapped.png",
        "chelsea_flip.png", "coffee_flip.png", "composite_flip.png", "rocket_flip.png", "astronaut_flip.png")}
    for entry in summary["faithfulness"]["per"]:
        group = [row for row in rows if (row["model"], row["method"]) == (entry["model"], entry["method"])]
        for metric in ("deletion", "insertion"):
            values = [float(row[f"{metric}_auc"]) for row in group]
            assert entry["n"] == len(values) == 12
            assert entry[metric]["mean"] == round(statistics.fmean(values), 6)
            assert entry[metric]["median"] == round(statistics.median(values), 6)
            low, high = entry[metric]["ci95"]
            assert low <= entry[metric]["mean"] <= high
    for entry in summary["regions"]["per"]:
        group = [row for row in rows if (row["model"], row["method"]) == (entry["model"], entry["method"])
                 and row["region_share"] != ""]
        assert entry["n"] == len(group) == 3
        assert entry["mean_share"] == round(statistics.fmean(float(row["region_share"]) for row in group), 6)
        assert entry["pointing_rate"] == round(statistics.fmean(float(row["pointing_hit"]) for row in group), 6)
    crosstest = summary["crosstest"]
    assert crosstest["method"] == "gradcam" and crosstest["measure"] == "retention"  # most rows have no label
    for cell in crosstest["matrix"]:
        group = [row for row in rows if row["model"] == cell["source"] and row["method"] == "gradcam"]
        for budget, value in zip(crosstest["budgets"], cell["values"]):
            column = [float(row[f"crosstest_{cell['viewer']}_{budget}"]) for row in group]
            assert value == round(statistics.fmean(column), 6)


def test_regions_rank_first_the_map_outside_its_expected_region(main_study: dict[str, Any]) -> None:
    ranked = main_study["view"]["summary"]["regions"]["ranked"]
    assert ranked[0]["path"] == "photos/composite.png"
    assert ranked[0]["region_kind"] == "expected" and ranked[0]["suspicion"] > 0.6
    wrong = {(e["model"], e["method"]): e["suspicion"] for e in ranked if e["path"] == "photos/composite.png"}
    right = [entry["suspicion"] for entry in ranked if entry["path"] == "photos/composite_flip.png"]
    assert len(wrong) == 4 and len(right) == 4  # the gallery (8) holds both composites' items, nothing else
    # Grad-CAM's espresso map lies on the cup: far outside the cat's half, mostly inside the cup's
    assert min(value for (_, method), value in wrong.items() if method == "gradcam") > max(right) + 0.1
    overlay = main_study["client"].get(f"/v1/studies/{main_study['id']}/items/{ranked[0]['index']}/overlay.png")
    assert overlay.status_code == 200 and overlay.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_repeated_study_is_answered_from_the_cache(stack: Stack, main_study: dict[str, Any],
                                                     photos: dict[str, Image.Image]) -> None:
    client = main_study["client"]
    response = submit_study(client, manifest_and_archive(photos), SPEC)
    assert response.status_code == 202, response.text
    view = response.json()
    assert view["status"] == "succeeded" and view["progress"]["cached"] == 48  # nothing was queued
    again = {k: v for k, v in view["summary"].items() if k != "items"}
    first = {k: v for k, v in main_study["view"]["summary"].items() if k != "items"}
    assert again == first
    listed = client.get("/v1/studies").json()["studies"]
    assert [study["id"] for study in listed][:2] == [view["id"], main_study["id"]]


def test_cancel_midway_stops_the_rest(stack: Stack, main_study: dict[str, Any], photos: dict[str, Image.Image]) -> None:
    client = main_study["client"]
    spec = {"models": MODELS, "methods": [{"name": "gradcam", "params": {"top_k": 3}}],  # not cached
            "analyses": {"faithfulness": {"steps": 30}}}
    response = submit_study(client, manifest_and_archive(photos), spec)
    assert response.status_code == 202, response.text
    study_id = response.json()["id"]
    wait_study(client, study_id, until=lambda view: view["progress"]["done"] >= 1)
    canceled = client.delete(f"/v1/studies/{study_id}")
    assert canceled.status_code == 200, canceled.text
    # the canceled items left the queue list with the cancel: its length counts waiting items only
    waiting = stack.redis().lrange(queue_key(study_queue("unbox")), 0, -1)
    assert not [i for i in waiting if i.decode().startswith(f"{study_id}-")], waiting
    at_cancel = canceled.json()["progress"]
    assert canceled.json()["status"] in ("canceling", "canceled")
    view = wait_study(client, study_id, timeout=60)
    assert view["status"] == "canceled"
    progress = view["progress"]
    assert progress["done"] == progress["total"] == 24
    assert progress["canceled"] >= 24 - at_cancel["succeeded"] - 2 - 2  # at most the two running ones finished
    assert progress["succeeded"] <= at_cancel["succeeded"] + 2
    statuses = [item_record(stack, study_id, index)["status"] for index in range(24)]
    assert set(statuses) <= {"succeeded", "canceled"} and "canceled" in statuses
    assert client.delete(f"/v1/studies/{study_id}").json()["status"] == "canceled"  # idempotent
    time.sleep(1.0)
    assert client.get(f"/v1/studies/{study_id}").json()["progress"] == progress  # nothing ran after


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_hostile_archives_and_bad_specs_are_4xx(stack: Stack, photos: dict[str, Image.Image]) -> None:
    client = stack.client()
    spec = {"models": ["efficientnet_lite0"], "methods": [{"name": "gradcam"}]}
    cat = _png(photos["chelsea.png"])
    link = io.BytesIO()
    with tarfile.open(fileobj=link, mode="w") as archive:
        entry = tarfile.TarInfo("cat.png")
        entry.type, entry.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(entry)
    cases = [
        (_zip({"../evil.png": cat}), spec, 422, "unsafe_archive"),
        (link.getvalue(), spec, 422, "unsafe_archive"),
        (_zip({"bomb.png": b"\0" * (8 * 1024 * 1024)}), spec, 413, "archive_too_large"),
        (_zip({f"{n}.png": cat for n in range(41)}), spec, 413, "archive_too_large"),
        (b"not an archive at all", spec, 400, "invalid_archive"),
        (_zip({"notes.txt": b"hello"}), spec, 422, "empty_study"),
        (_zip({"cat.png": cat}), {"models": ["nope"], "methods": [{"name": "gradcam"}]}, 422, "unknown_model"),
        (_zip({"cat.png": cat}), {"models": ["efficientnet_lite0"], "methods": [{"name": "os.system"}]}, 422,
         "unknown_method"),
        (_zip({"cat.png": cat}), {**spec, "analyses": {"crosstest": {}}}, 422, "invalid_spec"),
        (_zip({"cat.png": cat}), {**spec, "analyses": {"subexplanations": {}}}, 422, "invalid_spec"),
        (_zip({"cat.png": cat}), {**spec, "methods": [{"name": "gradcam", "params": {"top_k": 0}}]}, 422,
         "invalid_spec"),
        (_zip({"manifest.csv": b"path,target\ncat.png,5000\n", "cat.png": cat}), spec, 422, "invalid_manifest"),
    ]
    for archive, case_spec, status, code in cases:
        response = submit_study(client, archive, case_spec)
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), response.text
    deep = {"models": ["efficientnet_lite0"], "methods": [{"name": "gradcam"}], "name": None}
    for _ in range(40):
        deep = {"x": deep}
    assert submit_study(client, _zip({"cat.png": cat}), deep).status_code == 422
    # an unreadable image is a failed item, not a failed study
    response = submit_study(client, _zip({"broken.png": b"\x89PNG\r\n\x1a\nnot really", "cat.png": cat}), spec)
    assert response.status_code == 202, response.text
    view = wait_study(client, response.json()["id"], timeout=60)
    assert view["status"] == "succeeded" and view["progress"]["failed"] == 1 and view["progress"]["succeeded"] == 1
    rows = read_csv(client.get(f"/v1/studies/{view['id']}/items.csv").text)
    broken = next(row for row in rows if row["path"] == "broken.png")
    assert (broken["status"], broken["error_code"], broken["score"]) == ("failed", "corrupt_image", "")
    assert client.get("/v1/studies/" + "0" * 32).status_code == 404


def test_subexplanations_are_counted_per_model(stack: Stack, photos: dict[str, Image.Image]) -> None:
    client = stack.client()
    sag = {"grid": 4, "ordering": "gradcam", "beam_width": 2, "successors": 6, "max_roots": 3, "max_root_size": 6}
    spec = {"models": MODELS, "methods": [{"name": "sag", "params": sag}],
            "analyses": {"subexplanations": {"thresholds": [0.5, 0.8], "max_nodes": 60}}}
    archive = _zip({"chelsea.png": _png(photos["chelsea.png"]), "coffee.png": _png(photos["coffee.png"])})
    response = submit_study(client, archive, spec)
    assert response.status_code == 202, response.text
    view = wait_study(client, response.json()["id"], timeout=180)
    assert view["status"] == "succeeded", view["progress"]
    section = view["summary"]["subexplanations"]
    assert section["thresholds"] == [0.5, 0.8] and [m["model"] for m in section["per_model"]] == MODELS
    for model in section["per_model"]:
        assert model["images"] == 2 and model["mses_per_image"]["mean"] >= 1
        low, high = model["counts"]
        assert low["mean"] >= high["mean"] >= 0  # a subset above 80 % is above 50 % too
    assert section["reading"]["most_compositional"] in MODELS and section["reading"]["text"]
    rows = read_csv(client.get(f"/v1/studies/{view['id']}/items.csv").text)
    assert sum(int(row["mse_count"]) for row in rows) >= 4
    for row in rows:
        if int(row["mse_count"]):
            assert float(row["subexpl_0.5"]) >= float(row["subexpl_0.8"]) >= 0
        assert row["deletion_auc"] == "" and row["region_share"] == ""


def test_the_study_page_shows_the_summary(stack: Stack, main_study: dict[str, Any], artifacts: Path) -> None:
    """The dashboard's study page in a real Chromium: every section, the gallery led by the composite."""
    from tests.study_page_checks import check_study_page
    from tests.test_dashboard import CHROMIUM, CHROMIUM_ARGS, browser_missing

    if not CHROMIUM.exists():
        browser_missing(f"no Chromium at {CHROMIUM} (see .ci/run)")
    from playwright import sync_api

    ranked = main_study["view"]["summary"]["regions"]["ranked"]
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            check_study_page(browser, stack.url, main_study["id"], artifacts, expect_first=ranked[0]["index"])
        finally:
            browser.close()
