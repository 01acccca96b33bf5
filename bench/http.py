"""HTTP latency of ``POST /v1/explain`` (Grad-CAM, a 640 x 480 JPEG) against a real server.

Starts ``unbox api`` as its own process, sends ``--requests`` requests at concurrency 1 and 8,
prints p50 / p95 / throughput and appends them to docs/benchmarks.md.

    python -m bench.http [--requests 60] [--no-write]
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

REPO = Path(__file__).resolve().parents[1]


def _photo() -> bytes:
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.chelsea()).resize((640, 480), Image.Resampling.BILINEAR).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _start_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "UNBOX_PORT": str(port), "UNBOX_LOG_LEVEL": "warning"}
    process = subprocess.Popen([sys.executable, "-m", "app.cli", "api"], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit("server did not become ready")


def _run(url: str, image: bytes, requests: int, concurrency: int) -> dict[str, float]:
    client = httpx.Client(timeout=120)

    def one(_: int) -> float:
        began = time.perf_counter()
        response = client.post(url + "/v1/explain", files={"image": ("cat.jpg", image, "image/jpeg")})
        response.raise_for_status()
        return (time.perf_counter() - began) * 1e3

    for _ in range(3):
        one(0)  # warm-up
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        latencies = sorted(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    client.close()
    return {"p50": statistics.median(latencies), "p95": latencies[int(0.95 * (len(latencies) - 1))],
            "throughput": requests / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to docs/benchmarks.md")
    args = parser.parse_args()
    image = _photo()
    process, url = _start_server()
    try:
        rows = {c: _run(url, image, args.requests, c) for c in (1, 8)}
    finally:
        process.terminate()
        process.wait(timeout=30)
    lines = ["| concurrency | p50 (ms) | p95 (ms) | throughput (req/s) |", "|---|---|---|---|"]
    lines += [f"| {c} | {r['p50']:.1f} | {r['p95']:.1f} | {r['throughput']:.2f} |" for c, r in rows.items()]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, CPU"
        section = (f"\n## HTTP: POST /v1/explain (Grad-CAM, 640 x 480 JPEG, efficientnet_lite0)\n\n"
                   f"{stamp}; {machine}; {args.requests} requests per row, `python -m bench.http`.\n"
                   f"Latency is client-side, end to end (upload, decode, explain, two PNGs, JSON).\n\n{table}\n")
        with open(REPO / "docs" / "benchmarks.md", "a", encoding="utf-8") as handle:
            handle.write(section)


if __name__ == "__main__":
    main()
