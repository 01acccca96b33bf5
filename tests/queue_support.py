"""Queue test support: a slow test-only job method, worker processes and a webhook receiver.

The ``slow`` method gives cancel / kill / shutdown tests a long job whose length they choose:
Grad-CAM takes ~0.1 s and Score-CAM does not report per channel, while an I-GOS iteration
costs seconds of full CPU on a 2-core machine (cancel would wait for it, and kills would race
real compute). ``slow`` sleeps between progress reports, then returns a real Grad-CAM result.
Workers and the API load it through the plug-in setting ``UNBOX_JOB_METHOD_MODULES``.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from workers.methods import JobMethod, ProgressReporter, register

REPO = Path(__file__).resolve().parents[1]
WEBHOOK_SECRET = "whsec_" + "dW5ib3gtdGVzdC1zZWNyZXQtMzItYnl0ZXMtbG9uZyEh"  # base64 of a test key


class SlowParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int = Field(20, ge=1, le=10_000)
    step_s: float = Field(0.1, ge=0.0, le=5.0)


def _run_slow(model: Any, image: Any, target: int | None, params: SlowParams,
              report: ProgressReporter) -> dict[str, Any]:
    from explainers.pipeline import explain_image

    for step in range(params.steps):
        report(step / params.steps, f"step {step + 1}/{params.steps}")
        time.sleep(params.step_s)
    result = explain_image(model, image, "gradcam", target, None, 3, 256)
    return {"target": vars(result.target), "heatmap": result.heatmap.as_json(), "params": params.model_dump()}


register(JobMethod("slow", SlowParams, _run_slow, timeout_s=60, description="test only: sleeps, then Grad-CAM"))
register(JobMethod("slow_2s_limit", SlowParams, _run_slow, timeout_s=2, description="test only: times out"))


def png_of(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def start_worker(env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """An ``unbox worker`` process; returns once it has registered itself in Redis."""
    import redis
    from rq import Worker

    full_env = {**os.environ, "UNBOX_LOG_LEVEL": "warning", **env}
    log = open(log_path, "ab")
    process = subprocess.Popen([sys.executable, "-m", "app.cli", "worker"], cwd=REPO, env=full_env,
                               stdout=log, stderr=subprocess.STDOUT)
    connection = redis.Redis.from_url(env["UNBOX_REDIS_URL"])
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"worker exited with {process.returncode}: "
                                   f"{log_path.read_text(errors='replace')[-3000:]}")
            try:
                if any(w.name.endswith(f"-{process.pid}") for w in Worker.all(connection=connection)):
                    return process
            except redis.RedisError:
                pass
            time.sleep(0.2)
        process.kill()
        raise RuntimeError("worker did not register in Redis")
    finally:
        connection.close()


def wait_for(client: httpx.Client, job_id: str, statuses: set[str], timeout: float = 60.0,
             interval: float = 0.05) -> dict[str, Any]:
    """Poll ``GET /v1/jobs/{id}`` until its status is one of ``statuses``."""
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        view = response.json()
        if view["status"] in statuses:
            return view
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {view['status']} ({view.get('stage')}) after {timeout} s")
        time.sleep(interval)


class WebhookReceiver:
    """A local HTTP server recording POSTs; the first ``fail_first`` answers are 500."""

    def __init__(self, fail_first: int = 0) -> None:
        self.received: list[tuple[dict[str, str], bytes, int]] = []
        self.fail_first = fail_first
        self.event = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status = 500 if len(receiver.received) < receiver.fail_first else 204
                headers = {name.lower(): value for name, value in self.headers.items()}
                receiver.received.append((headers, body, status))
                self.send_response(status)
                self.end_headers()
                if status == 204:
                    receiver.event.set()

            def log_message(self, *_args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def accepted(self) -> list[tuple[dict[str, str], dict[str, Any]]]:
        return [(headers, json.loads(body)) for headers, body, status in self.received if status == 204]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
