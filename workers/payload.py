"""The one job-payload schema shared by the API and the workers, and Unbox's own Redis keys.

A job carries this payload as JSON: data, never a callable or a pickle, so whoever can write to
the queue can only ask for Unbox's own methods. The uploaded image is *not* in the payload: the
API validates it once, stores it in a compact, metadata-free form (``workers.stored_image``)
under :func:`image_key` with a TTL, and the worker reads it from there.
"""

from __future__ import annotations

import hashlib
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from workers.study_spec import StudyItemRef

KEY_PREFIX = "unbox"
REQUEST_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"  # an X-Request-ID the API accepts (else it makes one)


class JobPayload(BaseModel):
    """What a worker needs to run one job (besides the image, stored separately)."""

    model_config = ConfigDict(extra="forbid")

    method: str
    model: str
    target: int | None = Field(None, ge=0)
    params: dict[str, Any] = Field(default_factory=dict)
    params_used: dict[str, Any] | None = Field(None, description="what the job runs with (the method's defaults "
                                               "and preset, overridden by params), shown with the job")
    callback_url: str | None = None
    request_id: str | None = Field(None, pattern=REQUEST_ID_PATTERN,
                                   description="the submitting request's X-Request-ID, carried into the worker's logs")
    intake: dict[str, Any] | None = Field(None, description="how the API decoded the upload (format, windowing, a "
                                          "DICOM's technical facts): reported with the job, never a header value")
    study: StudyItemRef | None = Field(None, description="set on a study's item: its study and image (stored "
                                       "once per study, not per job)")


def image_key(job_id: str) -> str:
    return f"{KEY_PREFIX}:image:{job_id}"


def cancel_key(job_id: str) -> str:
    return f"{KEY_PREFIX}:cancel:{job_id}"


def idempotency_key(owner: str, key: str) -> str:
    """Where an Idempotency-Key's record lives: per owner, so two tenants' keys never meet."""
    digest = hashlib.sha256(owner.encode() + b"\0" + key.encode()).hexdigest()
    return f"{KEY_PREFIX}:idempotency:{digest}"
