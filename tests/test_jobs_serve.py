"""`unbox serve` with no UNBOX_REDIS_URL: embedded Redis + one worker + the API from one
command; Ctrl-C stops all three, and the worker finishes its running job first (warm shutdown,
seen through the job's signed webhook, which the stopping worker still delivers). A SIGKILLed
worker is reaped (no zombie) and restarted by serve's supervisor, and the new one takes jobs."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from pathlib import Path

import httpx
from PIL import Image

from tests.conftest import CAT_CLASSES, start_api
from tests.queue_support import WEBHOOK_ALLOW_NETWORKS, WEBHOOK_SECRET, WebhookReceiver, png_of, wait_for
from workers.webhooks import signing_key, verify


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_serve_runs_redis_worker_and_api_and_ctrl_c_stops_all(artifacts: Path, chelsea: Image.Image) -> None:
    log = artifacts / "serve.log"
    receiver = WebhookReceiver()
    process, url = start_api({"UNBOX_REDIS_URL": "", "UNBOX_TORCH_THREADS": "1", "UNBOX_WEBHOOK_SECRET": WEBHOOK_SECRET,
                              "UNBOX_WEBHOOK_ALLOW_NETWORKS": WEBHOOK_ALLOW_NETWORKS,
                              "UNBOX_JOB_METHOD_MODULES": "tests.queue_support"}, log, command="serve")
    try:
        banner = re.search(r"Unbox on (http://\S+) .*Redis embedded at redis://127\.0\.0\.1:(\d+)/0; "
                           r"1 worker, pid (\d+)", log.read_text())
        assert banner, log.read_text()[-2000:]
        assert banner.group(1) == url
        redis_port, worker_pid = int(banner.group(2)), int(banner.group(3))
        image = png_of(chelsea.resize((150, 100)))
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.get("/readyz").json()["queue"]["status"] == "ok"
            response = client.post("/v1/jobs", files={"image": ("cat.png", image, "image/png")},
                                   data={"method": "gradcam"})
            assert response.status_code == 202, response.text
            view = wait_for(client, response.json()["id"], {"succeeded", "failed", "canceled"}, timeout=120)
            assert view["status"] == "succeeded", view
            assert view["result"]["target"]["index"] in CAT_CLASSES
            response = client.post("/v1/jobs", files={"image": ("cat.png", image, "image/png")},
                                   data={"method": "slow", "params": '{"steps": 40, "step_s": 0.1}',
                                         "callback_url": receiver.url})
            slow_id = response.json()["id"]
            running = wait_for(client, slow_id, {"running"}, timeout=60)
            assert running["progress"] < 0.5, running  # seconds of work left when the signal lands
        assert _alive(worker_pid)
    finally:
        process.send_signal(signal.SIGINT)  # what Ctrl-C sends
        code = process.wait(timeout=90)
        receiver.close()
    assert code == 0, log.read_text()[-2000:]
    assert not _alive(worker_pid)
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", redis_port)) != 0, "the embedded Redis is still running"
    delivered = receiver.accepted()
    assert len(delivered) == 1, receiver.received
    headers, event = delivered[0]
    assert event["type"] == "job.succeeded" and event["data"]["id"] == slow_id  # finished before exiting
    assert verify(signing_key(WEBHOOK_SECRET), headers, receiver.received[0][1])


def _poll_log(log: Path, pattern: str, timeout: float) -> re.Match[str]:
    """Wait until ``pattern`` shows up in the log; fail with the log's tail otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, log.read_text(errors="replace"))
        if match:
            return match
        time.sleep(0.1)
    raise AssertionError(f"{pattern!r} not in the log: {log.read_text(errors='replace')[-3000:]}")


def test_serve_restarts_a_killed_worker_which_then_takes_jobs(artifacts: Path, chelsea: Image.Image) -> None:
    log = artifacts / "serve-restart.log"
    process, url = start_api({"UNBOX_REDIS_URL": "", "UNBOX_TORCH_THREADS": "1", "UNBOX_CPU_RUNTIME": "torch",
                              "UNBOX_FAST_WARMUP": "false"}, log, command="serve",  # restarts under test, not warm-up
                             args=["--workers", "1"])
    new_pid = None
    try:
        banner = re.search(r"Unbox on http://\S+ .*; 1 worker, pid (\d+); Ctrl-C stops all", log.read_text())
        assert banner, log.read_text()[-2000:]
        old_pid = int(banner.group(1))
        os.kill(old_pid, signal.SIGKILL)
        _poll_log(log, rf"worker 1 \(pid {old_pid}\) was killed by SIGKILL; restarting in [\d.]+ s", timeout=20)
        new_pid = int(_poll_log(log, r"worker 1 restarted: pid (\d+) \(restart 1\)", timeout=20).group(1))
        assert new_pid != old_pid and _alive(new_pid)
        assert not Path(f"/proc/{old_pid}").exists(), "the killed worker was left a zombie"
        with httpx.Client(base_url=url, timeout=30) as client:
            response = client.post("/v1/jobs", files={"image": ("cat.png", png_of(chelsea.resize((150, 100))),
                                                                "image/png")}, data={"method": "gradcam"})
            assert response.status_code == 202, response.text
            view = wait_for(client, response.json()["id"], {"succeeded", "failed", "canceled"}, timeout=120)
        assert view["status"] == "succeeded", view
        assert view["result"]["target"]["index"] in CAT_CLASSES
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=90)
    assert code == 0, log.read_text()[-2000:]
    assert new_pid is None or not _alive(new_pid)
