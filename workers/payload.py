"""The one job-payload schema shared by the API and the workers, and Unbox's own Redis keys.

A job's RQ arguments are this payload as JSON (RQ's JSON serializer: no pickles cross the
queue). The uploaded image is *not* in the payload: the API validates it once, stores it as a
clean PNG under :func:`image_key` with a TTL, and the worker reads it from there.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

#: The function RQ runs for every Unbox job (imported by path inside the worker only).
RUN_JOB = "workers.jobs.run_job"
KEY_PREFIX = "unbox"


class JobPayload(BaseModel):
    """What a worker needs to run one job (besides the image, stored separately)."""

    model_config = ConfigDict(extra="forbid")

    method: str
    model: str
    target: int | None = Field(None, ge=0)
    params: dict[str, Any] = Field(default_factory=dict)
    callback_url: str | None = None


def image_key(job_id: str) -> str:
    return f"{KEY_PREFIX}:image:{job_id}"


def cancel_key(job_id: str) -> str:
    return f"{KEY_PREFIX}:cancel:{job_id}"


def idempotency_key(key: str) -> str:
    return f"{KEY_PREFIX}:idempotency:{hashlib.sha256(key.encode()).hexdigest()}"


def png_bytes(image: Image.Image) -> bytes:
    """The clean RGB image as PNG (lossless: the worker sees exactly what the API decoded)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def image_from_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")
