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
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from workers.methods import JobMethod, ProgressReporter, register
from workers.redis_server import EmbeddedRedis

REPO = Path(__file__).resolve().parents[1]
WEBHOOK_SECRET = "whsec_" + "dW5ib3gtdGVzdC1zZWNyZXQtMzItYnl0ZXMtbG9uZyEh"  # base64 of a 33-byte test key
WEBHOOK_ALLOW_NETWORKS = "127.0.0.1/32"  # the test receivers listen on loopback, which callbacks may not reach by default


class SlowParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int = Field(20, ge=1, le=10_000)
    step_s: float = Field(0.1, ge=0.0, le=5.0)


def _run_slow(model: Any, image: Any, target: int | None, params: SlowParams,
              report: ProgressReporter, settings: Any = None) -> dict[str, Any]:
    from explainers.pipeline import explain_image

    for step in range(params.steps):
        report(step / params.steps, f"step {step + 1}/{params.steps}")
        time.sleep(params.step_s)
    result = explain_image(model, image, "gradcam", target, None, 3, 256)
    return {"target": vars(result.target), "heatmap": result.heatmap.as_json(), "params": params.model_dump()}


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _run_boom(model: Any, image: Any, target: int | None, params: NoParams, report: ProgressReporter,
              settings: Any = None) -> dict:
    report(0.5, "about to fail")
    raise ValueError("the method's own error")


def _run_no_picture(model: Any, image: Any, target: int | None, params: NoParams,
                    report: ProgressReporter, settings: Any = None) -> dict:
    return {"size": list(image.size)}


register(JobMethod("slow", SlowParams, _run_slow, timeout_s=60, description="test only: sleeps, then Grad-CAM"))
register(JobMethod("slow_2s_limit", SlowParams, _run_slow, timeout_s=2, description="test only: times out"))
register(JobMethod("boom", NoParams, _run_boom, description="test only: raises"))
register(JobMethod("no_picture", NoParams, _run_no_picture, description="test only: a result without a picture"))

TERMINAL = {"succeeded", "failed", "canceled"}
TINY_CATALOG = """
[models.tiny]
source = "torchvision:resnet18"
labels = "imagenet"
input_size = 64
target_layer = "layer4"
description = "ResNet-18 with random weights at 64 px: a job costs milliseconds (queue load tests)"

[models.tiny_vit]
source = "timm:deit_tiny_distilled_patch16_224"
labels = "imagenet"
input_size = 64
options = { img_size = 64, depth = 2, embed_dim = 48, num_heads = 3 }
description = "a distilled DeiT (two prefix tokens) of two blocks, random weights, at 64 px"
"""


@dataclass
class Stack:
    """A running queue: a real Redis, real workers and a real API process."""

    redis_server: EmbeddedRedis
    url: str
    env: dict[str, str]
    logs: Path
    api: subprocess.Popen
    workers: list[subprocess.Popen] = field(default_factory=list)
    name: str = "stack"  # its logs are {name}-worker.log and {name}-api.log

    def redis(self) -> "redis.Redis":
        import redis

        return redis.Redis.from_url(self.redis_server.url)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)

    def add_worker(self, **env: str) -> subprocess.Popen:
        process = start_worker({**self.env, **env}, self.logs / f"{self.name}-worker.log")
        self.workers.append(process)
        return process

    def worker_of(self, job_id: str) -> subprocess.Popen:
        """The worker process that holds the job's lease now."""
        name = self.redis().hget(f"unbox:job:{job_id}", "worker").decode()
        pid = int(name.rsplit("-", 1)[1])
        return next(worker for worker in self.workers if worker.pid == pid)


@contextmanager
def running_stack(artifacts: Path, folder: Path, name: str, workers: int = 2, models: str = "tiny",
                  env: dict[str, str] | None = None) -> Iterator[Stack]:
    """Redis + ``workers`` workers + the API, started side by side; everything stopped after."""
    from tests.conftest import start_api, stop

    server = EmbeddedRedis().start()
    catalog = folder / "catalog.toml"
    catalog.write_text(TINY_CATALOG)
    full_env = {"UNBOX_REDIS_URL": server.url, "UNBOX_JOB_METHOD_MODULES": "tests.queue_support",
                "UNBOX_CATALOG": str(catalog), "UNBOX_MODELS": models,
                "UNBOX_WEBHOOK_SECRET": WEBHOOK_SECRET, "UNBOX_WEBHOOK_BACKOFF_S": "0.3",
                "UNBOX_WEBHOOK_ALLOW_NETWORKS": WEBHOOK_ALLOW_NETWORKS,
                "UNBOX_WORKER_HEARTBEAT_S": "0.5", "UNBOX_TORCH_THREADS": "1",
                # PyTorch forwards, no warm-up pass: no ONNX export or fast-path warm-up at every
                # process's start (about a third of a stack's start on 2 cores). The jobs stack runs
                # the service's defaults; test_onnx_cpu and test_execution_seam test the warm-up.
                "UNBOX_CPU_RUNTIME": "torch", "UNBOX_FAST_WARMUP": "false", **(env or {})}
    (artifacts / f"{name}-worker.log").unlink(missing_ok=True)
    started: Stack | None = None
    with ThreadPoolExecutor(workers + 1) as pool:
        pending = [pool.submit(start_worker, full_env, artifacts / f"{name}-worker.log") for _ in range(workers)]
        try:
            api, url = start_api(full_env, artifacts / f"{name}-api.log")
            started = Stack(server, url, full_env, artifacts, api, [p.result() for p in pending], name=name)
        finally:
            if started is None:
                for future in pending:
                    if future.done() and future.exception() is None:
                        future.result().kill()
                server.close()
    try:
        yield started
    finally:
        for process in (*started.workers, started.api):
            if process.poll() is None:
                process.terminate()
        for process in (*started.workers, started.api):
            stop(process)
        server.close()


def submit(client: httpx.Client, image: bytes, method: str = "gradcam", **form: str) -> httpx.Response:
    headers = {"Idempotency-Key": form.pop("idempotency_key")} if "idempotency_key" in form else {}
    return client.post("/v1/jobs", files={"image": ("cat.png", image, "image/png")},
                       data={"method": method, **form}, headers=headers)


def submitted(client: httpx.Client, image: bytes, method: str = "gradcam", **form: str) -> str:
    response = submit(client, image, method, **form)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def png_of(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def worker_pids(redis_url: str, alive_only: bool = True) -> set[int]:
    """Pids of the workers registered in Redis (beating within the TTL when ``alive_only``)."""
    import redis

    from workers.jobqueue import JobStore

    connection = redis.Redis.from_url(redis_url)
    try:
        return {int(w["pid"]) for w in JobStore(connection, "unbox", 0.5).workers() if w["alive"] or not alive_only}
    finally:
        connection.close()


def start_worker(env: dict[str, str], log_path: Path, timeout: float = 180.0) -> subprocess.Popen:
    """An ``unbox worker`` process; returns once it beats in Redis."""
    import redis

    full_env = {**os.environ, "UNBOX_LOG_LEVEL": "info", **env}
    log = open(log_path, "ab")
    process = subprocess.Popen([sys.executable, "-m", "app.cli", "worker"], cwd=REPO, env=full_env,
                               stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"worker exited with {process.returncode}: "
                               f"{log_path.read_text(errors='replace')[-3000:]}")
        try:
            if process.pid in worker_pids(env["UNBOX_REDIS_URL"]):
                return process
        except redis.RedisError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("worker did not register in Redis")


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
    """A local HTTP server recording POSTs (headers lowercased, ``:path`` the request target);
    the first ``fail_first`` answers are 500; with ``redirect_to``, every answer is a 302 there;
    with ``tls``, it speaks HTTPS. ``host_name`` is the host its ``url`` names (it listens on 127.0.0.1)."""

    def __init__(self, fail_first: int = 0, redirect_to: str | None = None, tls: ssl.SSLContext | None = None,
                 host_name: str = "127.0.0.1") -> None:
        self.received: list[tuple[dict[str, str], bytes, int]] = []
        self.fail_first = fail_first
        self.redirect_to = redirect_to
        self.event = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status = 500 if len(receiver.received) < receiver.fail_first else 204
                status = 302 if receiver.redirect_to else status
                headers = {name.lower(): value for name, value in self.headers.items()}
                headers[":path"] = self.path
                receiver.received.append((headers, body, status))
                self.send_response(status)
                if receiver.redirect_to:
                    self.send_header("Location", receiver.redirect_to)
                self.end_headers()
                if status == 204:
                    receiver.event.set()

            def log_message(self, *_args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:  # HTTPS: the TLS handshake happens as each connection is accepted
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.url = f"{'https' if tls else 'http'}://{host_name}:{self.port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)  # quick close
        self.thread.start()

    def accepted(self) -> list[tuple[dict[str, str], dict[str, Any]]]:
        return [(headers, json.loads(body)) for headers, body, status in self.received if status == 204]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
