"""Response schemas of the HTTP API (they document the contract in OpenAPI)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from explainers.registry import SYNCHRONOUS


class ErrorBody(BaseModel):
    code: str = Field(examples=["unsupported_format"])
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class PredictionOut(BaseModel):
    index: int
    label: str
    score: float = Field(description="softmax probability")


class WindowingOut(BaseModel):
    """How greyscale values beyond 8 bits (or with a window asked for) became the 8 bits the model saw."""

    source: Literal["request", "auto", "file_voi_lut", "file_window", "stored_bits", "data_range"] = Field(
        description="request: window=C,W; auto: the 0.5-99.5th percentiles; file_voi_lut / file_window: the DICOM "
                    "file's own; stored_bits: the range the file says its values use; data_range: min to max")
    center: float
    width: float
    function: Literal["LINEAR", "SIGMOID", "LUT"]
    inverted: bool = Field(description="MONOCHROME1: low values shown bright")


class DicomFactsOut(BaseModel):
    """The technical facts of a DICOM upload: the only header fields ever returned or kept."""

    rows: int
    columns: int
    frames: int
    frame: int = Field(description="the frame explained (the request's frame, default 0)")
    modality: str | None
    bits_stored: int | None
    photometric_interpretation: str | None
    transfer_syntax: str | None


class IntakeOut(BaseModel):
    format: str = Field(description="JPEG, PNG, WEBP, BMP, GIF, TIFF, MPO or DICOM")
    mode: str = Field(description="the upload's pixel mode (e.g. I;16, L, RGB, DICOM MONOCHROME2)")
    windowing: WindowingOut | None = Field(description="null for 8-bit images shown as they are")
    dicom: DicomFactsOut | None


class PredictResponse(BaseModel):
    model: str
    predictions: list[PredictionOut]
    intake: IntakeOut
    timing_ms: dict[str, float]


class HeatmapOut(BaseModel):
    width: int = Field(description="width of the uploaded image (pixels)")
    height: int = Field(description="height of the uploaded image (pixels)")
    grid: list[list[float]] = Field(description="the raw map at feature resolution, normalised to [0, 1]")
    png: str = Field(description="base64 8-bit grayscale PNG of the map at the uploaded image's size")
    overlay_png: str = Field(description="base64 colour overlay (inferno) on the image, longer side capped")


class ExplainResponse(BaseModel):
    model: str
    method: Literal[SYNCHRONOUS]  # type: ignore[valid-type]
    layer: str | None
    target: PredictionOut
    predictions: list[PredictionOut]
    heatmap: HeatmapOut
    details: dict[str, Any] = Field(default_factory=dict, description="what ran: precision; for Score-CAM "
                                    "mode (exact | fast), channels, constant_channels, forward_passes, batch_size, runtime "
                                    "(onnxruntime | torch: what ran the masked forwards)")
    metrics: dict[str, Any] | None = Field(None, description="with metrics=true: deletion_auc, insertion_auc, "
                                           "their curves and the protocol (baseline, steps, score)")
    intake: IntakeOut
    timing_ms: dict[str, float]


class ModelOut(BaseModel):
    name: str
    loaded: bool
    source: str
    input_size: int
    resize: str
    num_classes: int | None = None
    target_layer: str | None = None
    description: str = ""
    error: str | None = None


class ModelsResponse(BaseModel):
    default: str
    models: list[ModelOut]


class HealthResponse(BaseModel):
    status: Literal["ok"]


class WorkerOut(BaseModel):
    """One worker as it last reported itself (its beat's ``info``) and its liveness."""

    name: str
    alive: bool = Field(description="beat within the heartbeat TTL")
    last_beat_s_ago: float
    pid: int | None = None
    host: str | None = None
    state: Literal["busy", "idle"] | None = None
    job: str | None = Field(None, description="the job it runs, when busy")
    started_at: str | None = Field(None, json_schema_extra={"format": "date-time"})
    jobs_done: int | None = None
    device: str | None = None
    models: list[str] | None = None
    queue: str | None = None
    stopping: bool | None = None


class WorkersSummary(BaseModel):
    """Counts only: the unauthenticated probe names no host, process or job (GET /v1/workers does)."""

    alive: int
    busy: int


class QueueHealthOut(BaseModel):
    status: Literal["ok", "unreachable", "not_configured"]
    queued: int | None = Field(None, description="jobs waiting (when reachable)")
    workers: WorkersSummary | None = None
    problem: str | None = Field(None, description="set when jobs are queued and no worker is alive")


class ReadyResponse(BaseModel):
    """``/readyz``: 200 when ready or degraded, 503 (same body) while not ready."""

    status: Literal["ready", "degraded", "not_ready"]
    models: dict[str, str] = Field(description="per start-up model: loaded, warming, loading or 'failed: ...'")
    queue: QueueHealthOut


class WorkersResponse(BaseModel):
    workers: list[WorkerOut]
    alive: int
    busy: int
    queued: int


# ----- what form, query and path fields accept (JSON Schema the service checks itself) ----------
# The service validates these with its own error codes (unknown_model, invalid_target ...), so the
# constraints are documented here rather than enforced by FastAPI. ``x-unbox-fill`` marks what
# app.openapi fills in from the server itself (its catalogue, job methods and settings).
MODEL_NAME = {"x-unbox-fill": "models"}
CLASS_INDEX = {"x-unbox-fill": "class_index", "minimum": 0}
SYNC_METHOD_NAMES = {"enum": list(SYNCHRONOUS)}
SCORECAM_CHANNELS = {"x-unbox-fill": "scorecam_channels",
                     "anyOf": [{"type": "integer", "minimum": 1}, {"type": "string", "const": "all"}]}
LAYER_PATH = {"pattern": r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$", "maxLength": 256}
WINDOW_TEXT = {"pattern": r"^\s*([Aa][Uu][Tt][Oo]|-?[0-9]+(\.[0-9]+)?\s*,\s*[1-9][0-9]*(\.[0-9]+)?)\s*$", "maxLength": 64}
JSON_OBJECT_TEXT = {"contentMediaType": "application/json", "contentSchema": {"type": "object"}}
CALLBACK_URL = {"pattern": r"^https?://[^\x00-\x20\x7f\\/?#@]+([/?#][^\x00-\x20\x7f\\]*)?$", "maxLength": 2048}
IDEMPOTENCY_KEY = {"minLength": 1, "maxLength": 255}
JOB_ID = {"pattern": r"^[A-Za-z0-9_-]{1,64}$"}
FILE_NAME = {"pattern": r"^[A-Za-z0-9_.]{1,128}$"}


# ----- the error envelope in OpenAPI ----------------------------------------------------------
def header(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description, "schema": schema or {"type": "string"}}


RETRY_AFTER = {"Retry-After": header("seconds to wait before retrying", {"type": "integer", "minimum": 0})}
RATE_LIMIT_HEADERS = {
    "RateLimit-Policy": header('the caller\'s quota (IETF draft), e.g. "per-minute";q=120;w=60'),
    "RateLimit": header('what is left of it, e.g. "per-minute";r=119;t=1'),
}
CHALLENGE = {"WWW-Authenticate": header('the Bearer challenge, e.g. Bearer realm="unbox", error="invalid_token"')}

ERROR_STATUSES: dict[int, tuple[str, dict[str, Any]]] = {
    400: ("unreadable or corrupt image (bad_request, corrupt_image ...)", {}),
    401: ("unauthorized: no API key, or an invalid or revoked one (API keys on)", CHALLENGE),
    403: ("insufficient_scope: the API key lacks this route's scope", CHALLENGE),
    404: ("not found (job_not_found, file_not_found, no_picture, not_found)", {}),
    408: ("upload_timeout: the request body stalled; the connection is closed", {}),
    409: ("conflict (job_finished, job_not_succeeded, request_in_progress)", RETRY_AFTER),
    413: ("too many bytes or pixels (payload_too_large, upload_too_large, too_many_pixels)", {}),
    415: ("not an image in a supported format (unsupported_format)", {}),
    422: ("invalid parameter (invalid_parameter, unknown_model, unknown_method, unknown_layer, invalid_target, "
          "layer_unsupported, cam_unsupported, method_unsupported, invalid_callback_url, too_costly, "
          "idempotency_key_reused ...)", {}),
    429: ("rate_limited (requests per minute) or quota_exceeded (jobs queued or running)",
          {**RETRY_AFTER, **RATE_LIMIT_HEADERS}),
    500: ("internal_error: a bug; see the server log", {}),
    503: ("unavailable: model_loading, model_unavailable, queue_unavailable, queue_full, storage_full, "
          "too_many_uploads, queue_not_configured", RETRY_AFTER),
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` argument documenting ``statuses`` with the error envelope and their headers."""
    answers: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        description, headers = ERROR_STATUSES[status]
        answers[status] = {"model": ErrorResponse, "description": description}
        if headers:
            answers[status]["headers"] = dict(headers)
    return answers

