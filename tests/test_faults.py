"""Faults with real processes: each test starts its own Redis, workers and API, hurts them the
way production does (SIGKILL, SIGSTOP, a Redis killed and restarted, stop signals), and checks
that no job is lost, stuck, or given two outcomes. Jobs are the test-only ``slow`` method on a
64 px model, so a job's length is chosen by the test, and every wait polls for a state."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.queue_support import TERMINAL, Stack, png_of, running_stack, submitted, wait_for, worker_pids
from workers.jobqueue import job_key

LONG = json.dumps({"steps": 10000, "step_s": 0.05})  # runs until the test ends it


@pytest.fixture(scope="module")
def tiny_image(chelsea: Image.Image) -> bytes:
    return png_of(chelsea.resize((96, 64)))


@pytest.fixture
def stack(request: pytest.FixtureRequest, artifacts: Path, tmp_path: Path) -> Iterator[Stack]:
    marker = request.node.get_closest_marker("stack")
    options = marker.kwargs if marker else {}
    with running_stack(artifacts, tmp_path, request.node.name[:40], **options) as started:
        yield started


def poll(check, timeout: float = 60.0, interval: float = 0.1):
    """``check()`` until it returns something truthy; fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def record(stack: Stack, job_id: str) -> dict[str, str]:
    raw = stack.redis().hgetall(job_key(job_id))
    return {k.decode(): v.decode() for k, v in raw.items()}


def assert_never_rewritten(stack: Stack, job_id: str, watch_s: float) -> dict[str, str]:
    """The terminal record stays exactly as first written for ``watch_s``."""
    first = record(stack, job_id)
    deadline = time.monotonic() + watch_s
    while time.monotonic() < deadline:
        now = record(stack, job_id)
        assert {k: now[k] for k in ("status", "ended_at", "attempts", "token")} == \
            {k: first[k] for k in ("status", "ended_at", "attempts", "token")}, (first, now)
        time.sleep(0.1)
    return first


def test_killed_workers_job_is_retried_once_then_failed(stack: Stack, tiny_image: bytes) -> None:
    with stack.client() as client:
        job_id = submitted(client, tiny_image, "slow", model="tiny", params=LONG)
        wait_for(client, job_id, {"running"})
        first = stack.worker_of(job_id)
        first.send_signal(signal.SIGKILL)
        first.wait()
        view = poll(lambda: (v := client.get(f"/v1/jobs/{job_id}").json())["attempts"] == 2
                    and v["status"] == "running" and v)  # the other worker's reaper retried it
        second = stack.worker_of(job_id)
        assert second is not first
        second.send_signal(signal.SIGKILL)
        second.wait()
        view = wait_for(client, job_id, TERMINAL, timeout=30)  # no worker left: the API reaps
        assert view["status"] == "failed" and view["error"]["code"] == "worker_lost", view
        assert "killed" in view["error"]["message"] and view["attempts"] == 2
    assert not stack.redis().exists(f"unbox:image:{job_id}")


def test_redis_killed_and_restarted_under_busy_workers(stack: Stack, tiny_image: bytes) -> None:
    """Both workers are mid-job when Redis dies; it comes back on the same port with its data
    (append-only file). The workers live on, record both jobs' outcomes, and take new jobs."""
    steps = json.dumps({"steps": 60, "step_s": 0.1})
    with stack.client() as client:
        busy = [submitted(client, tiny_image, "slow", model="tiny", params=steps) for _ in stack.workers]
        for job_id in busy:
            wait_for(client, job_id, {"running"})
        time.sleep(1.2)  # past the append-only file's one-second fsync of the jobs' start
        stack.redis_server.process.send_signal(signal.SIGKILL)
        stack.redis_server.process.wait()
        down = client.post("/v1/jobs", files={"image": ("x.png", tiny_image, "image/png")}, data={"method": "gradcam"})
        assert down.status_code == 503 and down.json()["error"]["code"] == "queue_unavailable"
        time.sleep(3)
        stack.redis_server.start()
        for job_id in busy:
            view = wait_for(client, job_id, TERMINAL, timeout=60)
            assert view["status"] == "succeeded" and view["attempts"] == 1, view
        after = submitted(client, tiny_image, model="tiny")
        assert wait_for(client, after, TERMINAL, timeout=30)["status"] == "succeeded"
    assert all(worker.poll() is None for worker in stack.workers)


def test_redis_paused_past_the_heartbeat_ttl_leaves_one_outcome(stack: Stack, tiny_image: bytes) -> None:
    """SIGSTOP on Redis for longer than the heartbeat TTL (4 s here) mid-job: when it resumes,
    the job is not judged abandoned (the stall was Redis's, not the worker's): one attempt, one
    terminal record, never rewritten."""
    steps = json.dumps({"steps": 50, "step_s": 0.1})
    with stack.client() as client:
        job_id = submitted(client, tiny_image, "slow", model="tiny", params=steps)
        wait_for(client, job_id, {"running"})
        stack.redis_server.process.send_signal(signal.SIGSTOP)
        time.sleep(6)
        stack.redis_server.process.send_signal(signal.SIGCONT)
        view = wait_for(client, job_id, TERMINAL, timeout=60)
        assert view["status"] == "succeeded" and view["attempts"] == 1, view
    final = assert_never_rewritten(stack, job_id, watch_s=5)
    assert final["lost"] == "0" and final["token"] == "1"
    assert all(worker.poll() is None for worker in stack.workers)


def test_a_frozen_worker_cannot_write_over_the_retry(stack: Stack, tiny_image: bytes) -> None:
    """A worker frozen (SIGSTOP) past the TTL loses its lease; the job is retried elsewhere and
    succeeds. Thawed, the first worker's late outcome is refused: the record stays the retry's."""
    steps = json.dumps({"steps": 40, "step_s": 0.1})
    with stack.client() as client:
        job_id = submitted(client, tiny_image, "slow", model="tiny", params=steps)
        wait_for(client, job_id, {"running"})
        frozen = stack.worker_of(job_id)
        frozen.send_signal(signal.SIGSTOP)
        try:
            poll(lambda: client.get(f"/v1/jobs/{job_id}").json()["attempts"] == 2)
            retried_by = stack.worker_of(job_id)
            assert retried_by is not frozen
        finally:
            frozen.send_signal(signal.SIGCONT)
        view = wait_for(client, job_id, TERMINAL, timeout=60)
        assert view["status"] == "succeeded" and view["attempts"] == 2, view
        final = assert_never_rewritten(stack, job_id, watch_s=5)
        assert final["worker"].endswith(f"-{retried_by.pid}") and final["lost"] == "1"
        log = (stack.logs / f"{stack.name}-worker.log").read_text(errors="replace")
        assert f"job {job_id}: this worker's lease was lost" in log or f"job {job_id}: attempt 1" in log
        assert frozen.poll() is None  # the thawed worker lives on and takes jobs again
        after = submitted(client, tiny_image, model="tiny")
        assert wait_for(client, after, TERMINAL, timeout=30)["status"] == "succeeded"


@pytest.mark.stack(workers=1)
def test_warm_then_cold_shutdown(stack: Stack, tiny_image: bytes) -> None:
    """SIGTERM while a job runs: the job finishes (one attempt), then the worker exits 0. A second
    worker gets SIGTERM twice mid-job: it leaves at once and the job goes back to the queue,
    where a third worker takes it."""
    with stack.client() as client:
        job_id = submitted(client, tiny_image, "slow", model="tiny", params=json.dumps({"steps": 20, "step_s": 0.1}))
        wait_for(client, job_id, {"running"})
        worker = stack.workers[0]
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0
        log = (stack.logs / f"{stack.name}-worker.log").read_text(errors="replace")
        assert f"finishing job {job_id} first" in log  # the signal landed while the job ran
        view = client.get(f"/v1/jobs/{job_id}").json()
        assert view["status"] == "succeeded" and view["attempts"] == 1, view

        second = stack.add_worker()
        job_id = submitted(client, tiny_image, "slow", model="tiny", params=LONG)
        wait_for(client, job_id, {"running"})
        second.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert second.poll() is None  # warm: still finishing the job
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=20) == 0
        view = client.get(f"/v1/jobs/{job_id}").json()
        assert view["status"] == "queued" and view["queue_position"] == 0, view
        third = stack.add_worker()
        view = wait_for(client, job_id, {"running"}, timeout=60)
        assert view["attempts"] == 2 and stack.worker_of(job_id) is third
        assert client.delete(f"/v1/jobs/{job_id}").status_code == 202
        assert wait_for(client, job_id, TERMINAL)["status"] == "canceled"


@pytest.mark.stack(workers=1, env={"UNBOX_JOB_TIMEOUTS": '{"slow": 1}'})
def test_job_timeouts_from_the_environment_reach_the_worker(stack: Stack, tiny_image: bytes) -> None:
    with stack.client() as client:
        methods = {m["name"]: m for m in client.get("/v1/jobs/methods").json()["methods"]}
        assert methods["slow"]["timeout_s"] == 1
        job_id = submitted(client, tiny_image, "slow", model="tiny", params=LONG)
        view = wait_for(client, job_id, TERMINAL, timeout=30)
        assert view["status"] == "failed" and view["error"]["code"] == "timeout", view
        assert "1 s" in view["error"]["message"] and view["attempts"] == 1


@pytest.mark.stack(workers=0)
def test_readyz_and_workers_show_liveness(stack: Stack, tiny_image: bytes) -> None:
    """No worker and a queued job: degraded. A worker starts: listed alive and idle, the job
    runs; once the worker is killed it is listed as not alive and a queued job degrades again."""
    with stack.client() as client:
        job_id = submitted(client, tiny_image, "slow", model="tiny", params=LONG)
        ready = client.get("/readyz").json()
        assert ready["status"] == "degraded" and ready["queue"]["workers"]["alive"] == 0, ready
        assert client.get(f"/v1/jobs/{job_id}").json()["queue_position"] == 0
        worker = stack.add_worker()
        wait_for(client, job_id, {"running"}, timeout=60)
        def busy_entry() -> dict | None:
            listed = client.get("/v1/workers").json()["workers"]
            return next((w for w in listed if w["pid"] == worker.pid and w["state"] == "busy"), None)

        entry = poll(busy_entry, timeout=10)
        assert entry["alive"] and entry["job"] == job_id and entry["models"] == ["tiny"]
        ready = client.get("/readyz").json()
        assert ready["status"] == "ready" and ready["queue"]["workers"] == {"alive": 1, "busy": 1}
        assert job_id not in json.dumps(ready) and str(worker.pid) not in json.dumps(ready)  # an open probe
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        poll(lambda: worker.pid not in worker_pids(stack.redis_server.url))
        queued = submitted(client, tiny_image, model="tiny")
        ready = client.get("/readyz").json()
        assert ready["status"] == "degraded" and "no worker" in ready["queue"]["problem"]
        assert client.get(f"/v1/jobs/{queued}").json()["status"] == "queued"


def test_health_answers_while_redis_is_paused(stack: Stack) -> None:
    """A stalled Redis makes /readyz say so within its probe bound, instead of hanging the probe."""
    with stack.client() as client:
        stack.redis_server.process.send_signal(signal.SIGSTOP)
        try:
            began = time.perf_counter()
            ready = client.get("/readyz")
            took = time.perf_counter() - began
            health = client.get("/healthz")
        finally:
            stack.redis_server.process.send_signal(signal.SIGCONT)
        assert ready.status_code == 200 and ready.json()["queue"]["status"] == "unreachable", ready.text
        assert ready.json()["status"] == "degraded" and took < 1.5, took
        assert health.status_code == 200
        assert poll(lambda: client.get("/readyz").json()["status"] == "ready", timeout=10)
    with httpx.Client(base_url=stack.url) as client:
        assert "redis://" not in client.get("/readyz").text
