"""HTTP routes: parse, call the service, render. No logic beyond that."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from app.auth import require
from app.schemas import (CLASS_INDEX, LAYER_PATH, WINDOW_TEXT, MODEL_NAME, RATE_LIMIT_HEADERS, SCORECAM_CHANNELS, SYNC_METHOD_NAMES,
                         ExplainResponse, HealthResponse, ModelOut, ModelsResponse, PredictResponse, ReadyResponse,
                         error_responses, header)
from app.service import InferenceService
from explainers.metrics import MetricUnit
from models.catalog import DEFAULT_MODEL

router = APIRouter()

ImageField = Annotated[UploadFile, File(description="the image: JPEG, PNG, WebP, BMP, GIF, TIFF or DICOM")]
ModelField = Annotated[str, Form(description="model name (see GET /v1/models)", json_schema_extra=MODEL_NAME)]
TopKField = Annotated[int, Form(ge=1, le=100, description="how many predictions to return")]
WindowField = Annotated[str | None, Form(description="greyscale window 'C,W' (centre, width in the data's units, "
                                         "e.g. 40,400 for CT soft tissue) or 'auto' (0.5-99.5th percentiles); "
                                         "default the DICOM file's own window, else the values' stored range",
                                         json_schema_extra=WINDOW_TEXT)]
FrameField = Annotated[int | None, Form(ge=0, le=100_000, description="frame of a multi-frame DICOM file "
                                        "(default the first)")]


def _service(request: Request) -> InferenceService:
    return request.app.state.service


SYNC_ERRORS = error_responses(400, 413, 415, 422, 429, 503)
PNG_HEADERS = {"X-Unbox-Target": header("the explained class index", {"type": "integer"}),
               "X-Unbox-Label": header("its label")}


@router.post("/v1/predict", response_model=PredictResponse, tags=["inference"],
             responses={**SYNC_ERRORS, 200: {"headers": RATE_LIMIT_HEADERS}},
             dependencies=[Depends(require("predict"))])
async def predict(request: Request, image: ImageField, model: ModelField = DEFAULT_MODEL,
                  top_k: TopKField = 5, window: WindowField = None, frame: FrameField = None) -> dict:
    """Classify an image: the top-k classes with their softmax probabilities."""
    data = await image.read()
    return await run_in_threadpool(_service(request).predict, data, model, top_k, window, frame)


@router.post("/v1/explain", response_model=ExplainResponse, responses={
    **SYNC_ERRORS, 200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                         "description": "JSON, or the overlay PNG for Accept: image/png",
                         "headers": {**RATE_LIMIT_HEADERS, **PNG_HEADERS}}},
    tags=["inference"], dependencies=[Depends(require("explain"))])
async def explain(
    request: Request,
    image: ImageField,
    method: Annotated[str, Form(description="a synchronous method of the registry (the enum): the CAM family, rollout; "
                                "default gradcam",
                                json_schema_extra=SYNC_METHOD_NAMES)] = "gradcam",
    model: ModelField = DEFAULT_MODEL,
    target: Annotated[int | None, Form(description="class index to explain, below the model's class count; "
                                      "default the top-1 class", json_schema_extra=CLASS_INDEX)] = None,
    layer: Annotated[str | None, Form(description="module path of the layer (one of the model's modules, else "
                                      "422 unknown_layer); default the model's", json_schema_extra=LAYER_PATH)] = None,
    top_k: TopKField = 5,
    channels: Annotated[str | None, Form(description="scorecam only (with another method: 422): how many channels "
                                          "to score (fast mode; default from UNBOX_SCORECAM_CHANNELS), at most "
                                          "UNBOX_SYNC_SCORECAM_MAX_CHANNELS, or 'all' (exact; 422 too_costly when "
                                          "the layer is wider than that cap)",
                                          json_schema_extra=SCORECAM_CHANNELS)] = None,
    metrics: Annotated[bool, Form(description="also score the map: deletion/insertion AUCs and their protocol "
                                  "(blurred baseline, softmax probability, 50 steps; about 100 extra forwards)")] = False,
    metrics_unit: Annotated[MetricUnit, Form(
        description="with metrics=true: 'pixel' (default) changes the map's pixels in order; 'cell' scores it like "
                    "the I-GOS papers' code (28 x 28 cells, soft reveal), to compare with their figures")] = "pixel",
    window: WindowField = None,
    frame: FrameField = None,
) -> Response:
    """Predict and explain in one call: a heat map of what drove the target class."""
    data = await image.read()
    result, upload = await run_in_threadpool(_service(request).explain, data, method, model, target, layer or None,
                                             top_k, channels, metrics_unit if metrics else None, window, frame)
    if "image/png" in request.headers.get("accept", "") and "application/json" not in request.headers.get("accept", ""):
        return Response(result.heatmap.overlay_png, media_type="image/png",
                        headers={"X-Unbox-Target": str(result.target.index), "X-Unbox-Label": result.target.label})
    return JSONResponse({**result.as_json(), "intake": upload.intake_json()})


@router.get("/v1/models", response_model=ModelsResponse, tags=["models"], dependencies=[Depends(require())])
def list_models(request: Request) -> dict:
    """The catalogue: every model that can be asked for, and whether it is warm."""
    registry = _service(request).registry
    models = []
    for name, spec in sorted(registry.specs.items()):
        loaded = registry.get(name) if registry.is_loaded(name) else None
        models.append(ModelOut(
            name=name, loaded=loaded is not None, source=spec.source, input_size=spec.input_size,
            resize=spec.resize, num_classes=loaded.num_classes if loaded else None,
            target_layer=loaded.default_layer if loaded else spec.target_layer,
            description=spec.description, error=registry.load_error(name)))
    return {"default": DEFAULT_MODEL, "models": models}


@router.get("/healthz", tags=["operations"], response_model=HealthResponse)
async def healthz() -> dict:
    """The process is alive. Runs on the event loop itself, so it never queues behind inference
    for a thread of the pool."""
    return {"status": "ok"}


@router.get("/readyz", tags=["operations"], response_model=ReadyResponse,
            responses={503: {"model": ReadyResponse, "description": "not ready yet (models loading or warming, "
                             "or a failed load): the same body"}})
async def readyz(request: Request) -> JSONResponse:
    """Ready when every start-up model is loaded and warmed (503 while loading, while its fast
    paths warm up, or after a failed load).

    ``queue`` reports Redis (ok / unreachable / not_configured), the queue depth and the workers
    (alive, busy). The status is ``degraded`` (still 200) when Redis is unreachable (predictions and
    explanations still work, job endpoints answer 503) or when jobs wait and no worker is alive.
    Answered on the event loop with a bounded Redis probe: it never waits behind inference.
    """
    service = _service(request)
    states = {}
    for name in service.settings.models:
        if service.registry.is_loaded(name):
            states[name] = "warming" if name in service.warming else "loaded"
        elif service.registry.load_error(name):
            states[name] = "failed: " + service.registry.load_error(name)
        else:
            states[name] = "loading"
    ready = all(state == "loaded" for state in states.values())
    queue = await request.app.state.jobs.health()
    if "workers" in queue:  # an open probe: counts, not the workers' hosts and jobs (GET /v1/workers)
        queue["workers"] = {key: queue["workers"][key] for key in ("alive", "busy")}
    no_workers = queue.get("queued", 0) > 0 and queue.get("workers", {}).get("alive", 1) == 0
    degraded = queue["status"] == "unreachable" or no_workers
    status = "not_ready" if not ready else "degraded" if degraded else "ready"
    if no_workers:
        queue["problem"] = "jobs are queued and no worker is alive"
    return JSONResponse({"status": status, "models": states, "queue": queue},
                        status_code=200 if ready else 503)


@router.get("/metrics", tags=["operations"], dependencies=[Depends(require("admin"))], response_class=PlainTextResponse,
            responses={200: {"description": "Prometheus text exposition format (version 0.0.4)"}})
def metrics(request: Request) -> Response:
    """Prometheus metrics."""
    service = _service(request)
    return Response(service.metrics.render(), media_type=service.metrics.content_type)
