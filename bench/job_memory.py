"""Bytes in Redis per queued and per finished job, now against the former storage, in one run.

Starts an embedded Redis and a real ``unbox api`` (no worker), submits Grad-CAM jobs for a
640 x 480 JPEG and a 12-megapixel JPEG and reads ``MEMORY USAGE`` of what a queued job keeps
(its record and its stored image); then runs ``unbox worker --burst`` and reads what the
finished job keeps (its record and its result's pictures stored beside it). The former storage
is computed from the same data: the decoded image re-encoded as PNG (what a queued job held),
and the Grad-CAM result as the worker built it before, every picture inline and the map PNG at
the upload's full size (what a finished job held).

    python -m bench.job_memory
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import redis
from PIL import Image

from app.intake import decode_image
from bench.queue import wait_ready
from workers.redis_server import EmbeddedRedis, free_port

REPO = Path(__file__).resolve().parents[1]


def _photo(width: int, height: int) -> bytes:
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.coffee()).resize((width, height), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _former_png(image: Image.Image) -> int:
    """Bytes of the former stored image: the decoded RGB re-encoded as PNG (compress level 1)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return len(buffer.getvalue())


def _former_result(image: Image.Image) -> int:
    """Bytes of the former finished Grad-CAM result: pictures inline, the map at full size."""
    from explainers.pipeline import explain_image
    from models import ModelRegistry, load_catalog
    from core.settings import CoreSettings

    model = ModelRegistry(load_catalog(None), "cpu", CoreSettings().execution_policy()).get("efficientnet_lite0")
    result = explain_image(model, image, "gradcam", None, None, 5, 1024)
    return len(json.dumps({**result.as_json(), "params": {"layer": None, "top_k": 5}}, separators=(",", ":")))


def _usage(connection: redis.Redis, pattern: str) -> int:
    return sum(int(connection.memory_usage(key) or 0) for key in connection.scan_iter(pattern))


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "app.cli", *args], cwd=REPO, env={**os.environ, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    photos = {"640 x 480 JPEG": _photo(640, 480), "4000 x 3000 JPEG (12 MP)": _photo(4000, 3000)}
    with EmbeddedRedis() as server:
        port = free_port()
        env = {"UNBOX_REDIS_URL": server.url, "UNBOX_PORT": str(port), "UNBOX_LOG_LEVEL": "warning",
               "UNBOX_TORCH_THREADS": "2"}
        api = _spawn(["api"], env)
        url = f"http://127.0.0.1:{port}"
        connection = redis.Redis.from_url(server.url)
        try:
            wait_ready(url, api)
            ids, queued = {}, {}
            with httpx.Client(base_url=url, timeout=60) as client:
                for name, data in photos.items():
                    response = client.post("/v1/jobs", files={"image": ("photo.jpg", data, "image/jpeg")},
                                           data={"method": "gradcam"})
                    response.raise_for_status()
                    job_id = response.json()["id"]
                    ids[name] = job_id
                    queued[name] = _usage(connection, f"unbox:*{job_id}*")
                worker = _spawn(["worker", "--burst"], env)
                worker.wait(timeout=600)
                print("| upload | upload bytes | queued job before (PNG re-encode) | queued job now | ratio to upload "
                      "| finished job before (pictures inline, map at full size) | finished job now (record + stored pictures) "
                      "| GET /v1/jobs/{id} answer now |")
                print("|---|---|---|---|---|---|---|---|")
                for name, data in photos.items():
                    job_id = ids[name]
                    view = client.get(f"/v1/jobs/{job_id}").json()
                    assert view["status"] == "succeeded", view
                    decoded = decode_image(data, 10**9).image
                    before_queued = _former_png(decoded)
                    before_finished = _former_result(decoded)
                    finished = _usage(connection, f"unbox:*{job_id}*")
                    answer = len(json.dumps(view, separators=(",", ":")))
                    print(f"| {name} | {len(data):,} | {before_queued:,} | {queued[name]:,} | "
                          f"{queued[name] / len(data):.2f}x | {before_finished:,} | {finished:,} | {answer:,} |")
        finally:
            api.terminate()
            api.wait(30)


if __name__ == "__main__":
    main()
