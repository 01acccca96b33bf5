"""The asynchronous job API (``/v1/jobs``): submit, poll, cancel and fetch the picture.

The API validates everything once at submission (method, params with the method's pydantic
model, model, target, callback URL, the image through ``app.intake``), then stores the image in
its compact, metadata-free form and enqueues a JSON payload (``workers.payload.JobPayload``)
in one script of ``workers.jobqueue``. When Redis
is unreachable the job endpoints answer 503 and the rest of the API is unaffected; every call
reconnects, so it recovers by itself when Redis returns.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import uuid
from contextlib import contextmanager
from typing import Annotated, Any, Iterator, Literal

import redis
from fastapi import APIRouter, Depends, File, Form, Header, Path, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from app.auth import Principal, caller_of, require
from app.errors import ApiError
from app.job_schemas import JOB_METHOD_MARK, JobListResponse, JobMethodsResponse, JobSubmitted, JobSummary, JobView
from app.schemas import (CALLBACK_URL, CLASS_INDEX, FILE_NAME as FILE_NAME_SCHEMA, IDEMPOTENCY_KEY, JOB_ID,
                         JSON_OBJECT_TEXT, MODEL_NAME, RETRY_AFTER, WorkersResponse, error_responses, header)
from app.routes import FrameField, WindowField
from app.service import InferenceService
from app.settings import Settings
from core.validation import describe_validation_errors
from models.catalog import DEFAULT_MODEL
from models.labels import load_labels
from app.json_input import parse_json_object
from app.queue_health import QueueHealth
from workers.jobqueue import TERMINAL, JobStore, connect, is_out_of_memory, owner_of
from workers.methods import JobMethod, load_builtin_methods, method_timeout
from workers.payload import JobPayload, idempotency_key
from workers.result_files import FILE_NAME, file_key, inline_files, media_type
from workers.stored_image import encode_for_storage
from workers.callback_guard import CallbackGuard, CallbackRefused

logger = logging.getLogger("unbox.jobs")

_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_CURSOR = re.compile(r"^[0-9]{1,18}$")
QUOTA_RETRY_S = "5"
POLL_AFTER_S = "1"
UNAVAILABLE_RETRY_S = "5"
QUEUE_FULL_RETRY_S = "2"


class JobsClient:
    """The API's side of the queue; one per app. Holds a lazily connecting Redis client."""

    def __init__(self, settings: Settings, service: InferenceService) -> None:
        self.settings = settings
        self.service = service
        self.redis = connect(settings.redis_url, settings.redis_timeout_s) if settings.redis_url else None
        self.store = JobStore(self.redis, settings.queue_name, settings.worker_heartbeat_s) if self.redis else None
        self.health_check = QueueHealth(settings) if settings.redis_url else None
        self.methods: dict[str, JobMethod] = load_builtin_methods(settings.job_method_modules)

    def close(self) -> None:
        if self.redis is not None:
            self.redis.close()

    # ----- plumbing -------------------------------------------------------------------------
    def _store(self) -> JobStore:
        if self.store is None:
            raise ApiError(503, "queue_not_configured",
                           "this server has no job queue; set UNBOX_REDIS_URL (or run `unbox serve`)")
        return self.store

    @contextmanager
    def _reachable(self) -> Iterator[JobStore]:
        store = self._store()
        try:
            yield store
        except redis.RedisError as exc:
            if is_out_of_memory(exc):
                logger.error("job storage full: %s", exc)
                raise ApiError(503, "storage_full", "the job store is full (Redis maxmemory); retry later",
                               {"Retry-After": QUEUE_FULL_RETRY_S}) from None
            logger.warning("job queue unreachable: %s", exc)
            raise ApiError(503, "queue_unavailable", "the job queue is unreachable; "
                           "predictions and synchronous explanations still work",
                           {"Retry-After": UNAVAILABLE_RETRY_S}) from None

    async def health(self) -> dict[str, Any]:
        """Redis reachability, queue depth and workers, for ``/readyz`` (on the event loop, bounded)."""
        if self.health_check is None:
            return {"status": "not_configured"}
        return await self.health_check.check()

    def _fields(self, store: JobStore, job_id: str, owner: str) -> dict[str, str]:
        """The job's fields when it exists and is ``owner``'s; another tenant's job is a 404 too."""
        fields = store.fields(job_id) if _JOB_ID.match(job_id) else None
        if fields is None or owner_of(fields) != owner or fields.get("study"):  # a study's items: /v1/studies
            raise _job_not_found(job_id)
        return fields

    # ----- validation -----------------------------------------------------------------------
    def _method(self, name: str) -> JobMethod:
        method = self.methods.get(name) or load_builtin_methods(self.settings.job_method_modules).get(name)
        if method is None:
            known = ", ".join(sorted(load_builtin_methods(self.settings.job_method_modules)))
            raise ApiError(422, "unknown_method", f"unknown job method {name!r}; available: {known}")
        return method

    def _params(self, method: JobMethod, text: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
        """The params as the client set them (what travels: presets, such as igos's
        preset="cpu", fill the rest in the worker) and the params the job will run with."""
        raw = parse_json_object(text, field="params", max_bytes=self.settings.max_json_bytes,
                                max_depth=self.settings.max_json_depth)
        try:
            validated = method.params.model_validate(raw)
            return validated.model_dump(mode="json", exclude_unset=True), method.params_used(validated)
        except ValidationError as exc:
            details = describe_validation_errors(exc.errors(), "params")
            raise ApiError(422, "invalid_parameter", f"invalid params for {method.name}: {details}") from None

    def _num_classes(self, model: str) -> int:
        registry = self.service.registry
        if model not in registry.specs:
            known = ", ".join(sorted(registry.specs))
            raise ApiError(422, "unknown_model", f"unknown model {model!r}; available: {known}")
        if registry.is_loaded(model):
            return registry.get(model).num_classes
        return len(load_labels(registry.specs[model].labels))

    # ----- operations -----------------------------------------------------------------------
    def submit(self, caller: Principal, data: bytes, method_name: str, model: str, target: int | None,
               params_text: str | None, callback_url: str | None, idempotency: str | None,
               request_id: str | None = None, window: str | None = None,
               frame: int | None = None) -> tuple[dict[str, Any], bool]:
        """Validate and enqueue a job of ``caller``; returns the job's view and whether it is an
        idempotent replay (of one of the caller's own requests)."""
        method = self._method(method_name)
        params, params_used = self._params(method, params_text)
        classes = self._num_classes(model)
        if target is not None and not 0 <= target < classes:
            raise ApiError(422, "invalid_target", f"target must be a class index in [0, {classes - 1}]")
        layer, registry = params.get("layer"), self.service.registry
        known_layers = registry.get(model).layers if layer and registry.is_loaded(model) else ()
        if known_layers and layer not in known_layers:
            raise ApiError(422, "unknown_layer", f"model {model} has no module {layer!r}")
        if callback_url:
            if self.settings.webhook_secret is None:
                raise ApiError(422, "webhooks_not_configured", "this server sends no webhooks "
                               "(UNBOX_WEBHOOK_SECRET is not set); submit without callback_url and poll the job")
            try:
                CallbackGuard(self.settings.webhook_allow_networks).check(callback_url)
            except CallbackRefused as exc:
                raise ApiError(422, "invalid_callback_url", str(exc)) from None
        if idempotency is not None and not 1 <= len(idempotency) <= 255:
            raise ApiError(422, "invalid_idempotency_key", "Idempotency-Key must be 1 to 255 characters")
        self._store()
        decoded = self.service.decode_upload(data, window, frame)
        payload = JobPayload(method=method.name, model=model, target=target, params=params,
                             callback_url=callback_url or None).model_dump(mode="json", exclude={"study", "intake", "params_used"})
        if decoded.windowing is not None or decoded.dicom is not None:  # what the worker's pixels came from
            payload["intake"] = decoded.intake_json()
        fingerprint = hashlib.sha256(data + json.dumps(payload, sort_keys=True).encode()).hexdigest()
        payload["params_used"] = params_used  # follows from params; shown with the job
        payload["request_id"] = request_id  # traced with the job; not part of what the request asks
        settings = self.settings
        with self._reachable() as store:
            job_id = uuid.uuid4().hex
            record_key = idempotency_key(caller.owner, idempotency) if idempotency else None
            if record_key:
                replay = self._claim_idempotency(store, record_key, job_id, fingerprint)
                if replay is not None:
                    return replay, True
            try:
                stored = encode_for_storage(data, decoded.image, decoded.format)  # not for a replay
                answer = store.enqueue(job_id, payload, stored, timeout_s=method_timeout(method, settings.job_timeouts),
                                       pending_ttl_s=settings.job_image_ttl_s, result_ttl_s=settings.job_result_ttl_s,
                                       max_queue=settings.max_queue_length, owner=caller.owner,
                                       submitter=caller.client, max_active=caller.max_queued_jobs)
                if answer == "quota":
                    raise ApiError(429, "quota_exceeded", f"this client already has {caller.max_queued_jobs} jobs "
                                   "queued or running; wait for one to end", {"Retry-After": QUOTA_RETRY_S})
                if answer == "full":
                    raise ApiError(503, "queue_full", f"the job queue is full ({settings.max_queue_length} "
                                   "jobs waiting); retry later", {"Retry-After": QUEUE_FULL_RETRY_S})
                if not isinstance(answer, dict):
                    raise ApiError(503, "queue_unavailable", "the job could not be queued; retry",
                                   {"Retry-After": "1"})
            except BaseException:
                if record_key:
                    try:
                        store.redis.delete(record_key)
                    except redis.RedisError:
                        pass
                raise
            return answer, False

    def _claim_idempotency(self, store: JobStore, record_key: str, job_id: str,
                           fingerprint: str) -> dict[str, Any] | None:
        """Reserve ``record_key`` for the new job, or return the view of the job that holds it."""
        connection = store.redis
        record = json.dumps({"job_id": job_id, "fingerprint": fingerprint})
        for _ in range(3):
            if connection.set(record_key, record, nx=True, ex=self.settings.job_result_ttl_s):
                return None
            raw = connection.get(record_key)
            if raw is None:
                continue
            held = json.loads(raw)
            if held["fingerprint"] != fingerprint:
                raise ApiError(422, "idempotency_key_reused",
                               "this Idempotency-Key was used for a different request (image, method, model, "
                               "target, params or callback_url differ)")
            view = store.view(held["job_id"], with_result=False)
            if view is not None:
                return view
            if connection.ttl(record_key) > self.settings.job_result_ttl_s - 30:
                raise ApiError(409, "request_in_progress", "a request with this Idempotency-Key is still "
                               "being processed; retry shortly", {"Retry-After": "1"})
            connection.delete(record_key)  # its job expired: the key is free again
        raise ApiError(503, "queue_unavailable", "could not reserve the Idempotency-Key; retry",
                       {"Retry-After": "1"})

    def view(self, caller: Principal, job_id: str, inline: bool = False) -> dict[str, Any]:
        """The job's view; with ``inline``, its result's stored pictures put back inline."""
        with self._reachable() as store:
            fields = self._fields(store, job_id, caller.owner)
            if store.is_stale(fields):  # no live worker's reaper noticed yet: do it here
                store.reap()
                fields = self._fields(store, job_id, caller.owner)
            view = store.view_of(fields)
            if inline and isinstance(view.get("result"), dict):
                inline_files(view["result"], lambda name: store.redis.get(file_key(job_id, name)))
            return view

    def file(self, caller: Principal, job_id: str, name: str) -> tuple[bytes, str]:
        """A picture stored beside the job's result: its bytes and media type."""
        with self._reachable() as store:
            self._fields(store, job_id, caller.owner)
            if not FILE_NAME.match(name):
                raise ApiError(404, "file_not_found", f"job {job_id} has no file {name!r}")
            data = store.redis.get(file_key(job_id, name))
        if data is None:
            raise ApiError(404, "file_not_found", f"job {job_id} has no file {name!r} (or it has expired)")
        return data, media_type(name)

    def cancel(self, caller: Principal, job_id: str) -> tuple[int, dict[str, Any]]:
        """Cancel a queued job now (200), ask a running one to stop (202); 409 once it has ended."""
        if not _JOB_ID.match(job_id):
            raise _job_not_found(job_id)
        with self._reachable() as store:
            self._fields(store, job_id, caller.owner)
            answer = store.cancel(job_id, self.settings.job_result_ttl_s, caller.owner)
            view = store.view(job_id, with_result=False) if answer != "missing" else None
            if view is None:
                raise _job_not_found(job_id)
            if answer == "canceled":
                return 200, view
            if answer == "requested":
                view["cancel_requested"] = True
                return 202, view
            if view["status"] == "canceled":
                return 200, view
            raise ApiError(409, "job_finished", f"job {job_id} has already {view['status']}")

    def listing(self, caller: Principal, limit: int, cursor: str | None) -> dict[str, Any]:
        """The caller's jobs, newest first: a page of views (without results) and the next cursor."""
        before = None
        if cursor is not None:
            if not _CURSOR.match(cursor):
                raise ApiError(422, "invalid_cursor", "cursor must be a next_cursor value from this API")
            before = int(cursor)
        with self._reachable() as store:
            views, last = store.owned(caller.owner, limit, before)
        for view in views:
            view["links"] = _links(view["id"])
        return {"jobs": views, "next_cursor": None if last is None else str(last)}

    def result_png(self, caller: Principal, job_id: str) -> bytes:
        view = self.view(caller, job_id, inline=True)
        if view["status"] != "succeeded":
            raise ApiError(409, "job_not_succeeded", f"job {job_id} is {view['status']}; it has no picture")
        result = view.get("result") or {}
        encoded = (result.get("heatmap") or {}).get("overlay_png") or result.get("picture_png")
        if not encoded:
            raise ApiError(404, "no_picture", f"the result of job {job_id} has no picture")
        return base64.b64decode(encoded)


def _job_not_found(job_id: str) -> ApiError:
    return ApiError(404, "job_not_found", f"no job {job_id!r}: it never existed or it has expired")


# ----- routes -------------------------------------------------------------------------------
router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(require("jobs"))])


JobId = Annotated[str, Path(description="the job's id", json_schema_extra=JOB_ID)]


def _jobs(request: Request) -> JobsClient:
    return request.app.state.jobs


def _links(job_id: str) -> dict[str, str]:
    return {"self": f"/v1/jobs/{job_id}", "result_png": f"/v1/jobs/{job_id}/result.png"}


@router.post("", status_code=202, response_model=JobSubmitted, responses={
    202: {"description": "queued (or, for a repeated Idempotency-Key, the job it created)", "headers": {
        "Location": header("the job: /v1/jobs/{id}"), **RETRY_AFTER,
        "Idempotent-Replayed": header("true when this answers a repeated Idempotency-Key", {"const": "true"})}},
    **error_responses(400, 409, 413, 415, 422, 429, 503)})
async def submit_job(
    request: Request,
    image: Annotated[UploadFile, File(description="the image: JPEG, PNG, WebP, BMP, GIF, TIFF or DICOM")],
    method: Annotated[str, Form(description="job method, e.g. gradcam (see GET /v1/jobs/methods)",
                                json_schema_extra=JOB_METHOD_MARK)],
    model: Annotated[str, Form(description="model name (see GET /v1/models)",
                               json_schema_extra=MODEL_NAME)] = DEFAULT_MODEL,
    target: Annotated[int | None, Form(description="class index to explain, below the model's class count; "
                                       "default the top-1 class", json_schema_extra=CLASS_INDEX)] = None,
    params: Annotated[str | None, Form(description="JSON object of the method's parameters (their schema: GET "
                                       "/v1/jobs/methods); at most UNBOX_MAX_JSON_BYTES, UNBOX_MAX_JSON_DEPTH deep",
                                       json_schema_extra=JSON_OBJECT_TEXT)] = None,
    window: WindowField = None,
    frame: FrameField = None,
    callback_url: Annotated[str | None, Form(description="http(s) URL that gets a signed POST when the job ends "
                                             "(see webhooks; private addresses are refused unless allowed)",
                                             json_schema_extra=CALLBACK_URL)] = None,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", description=(
        "the same key (per caller) and request within the result TTL answers the same job"),
        json_schema_extra=IDEMPOTENCY_KEY)] = None,
) -> JSONResponse:
    """Queue a slow explanation; poll the returned Location (or wait for the webhook)."""
    data = await image.read()
    view, replayed = await run_in_threadpool(_jobs(request).submit, caller_of(request), data, method, model, target,
                                             params, callback_url, idempotency_key,
                                             getattr(request.state, "request_id", None), window, frame)
    body = {key: view[key] for key in ("id", "status", "method", "model", "created_at")}
    body["links"] = _links(view["id"])
    headers = {"Location": f"/v1/jobs/{view['id']}", "Retry-After": POLL_AFTER_S}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(body, status_code=202, headers=headers)


workers_router = APIRouter(prefix="/v1/workers", tags=["jobs"], dependencies=[Depends(require("admin"))])


@workers_router.get("", response_model=WorkersResponse, responses=error_responses(503))
async def list_workers(request: Request) -> JSONResponse:
    """The workers seen lately: alive (beating within the heartbeat TTL), busy or idle, their job."""
    health = await _jobs(request).health()
    if health["status"] == "not_configured":
        raise ApiError(503, "queue_not_configured", "this server has no job queue")
    if health["status"] != "ok":
        raise ApiError(503, "queue_unavailable", "the job queue is unreachable", {"Retry-After": UNAVAILABLE_RETRY_S})
    return JSONResponse({"workers": health["workers"]["list"], "alive": health["workers"]["alive"],
                         "busy": health["workers"]["busy"], "queued": health["queued"]})


@router.get("", response_model=JobListResponse, responses=error_responses(503))
async def list_jobs(request: Request,
                    limit: Annotated[int, Query(ge=1, le=100, description="jobs per page")] = 20,
                    cursor: Annotated[str | None, Query(pattern=r"^[0-9]{1,18}$", description=(
                        "next_cursor of the previous page; omitted: the newest jobs"))] = None) -> JSONResponse:
    """The caller's own jobs, newest first (no results: GET each job for those), paged by cursor."""
    page = await run_in_threadpool(_jobs(request).listing, caller_of(request), limit, cursor)
    return JSONResponse(page)


@router.get("/methods", response_model=JobMethodsResponse)
def list_methods(request: Request) -> dict:
    """The job methods this server accepts, with their parameters' JSON schema and time limit."""
    jobs = _jobs(request)
    methods = load_builtin_methods(jobs.settings.job_method_modules)
    return {"methods": [{"name": m.name, "description": m.description,
                         "timeout_s": method_timeout(m, jobs.settings.job_timeouts),
                         "params": m.params.model_json_schema()} for _, m in sorted(methods.items())]}


@router.get("/{job_id}", response_model=JobView, responses={
    200: {"headers": {"Retry-After": {**RETRY_AFTER["Retry-After"], "description": "while queued or running: "
                                      "seconds until it is worth polling again"}}},
    **error_responses(404, 503)})
async def get_job(request: Request, job_id: JobId, pictures: Annotated[Literal["links", "inline"], Query(
        description="links (default): pictures larger than UNBOX_JOB_INLINE_PICTURE_MAX_BYTES are links to "
                    "/v1/jobs/{id}/files/{name}; inline: every picture inline, in one (larger) answer")] = "links",
                  ) -> JSONResponse:
    """Status, progress (0..1), stage, timestamps, queue position, and the result or the error."""
    view = await run_in_threadpool(_jobs(request).view, caller_of(request), job_id, pictures == "inline")
    view["links"] = _links(job_id)
    headers = {} if view["status"] in TERMINAL else {"Retry-After": POLL_AFTER_S}
    return JSONResponse(view, headers=headers)


@router.delete("/{job_id}", response_model=JobSummary, responses={
    200: {"description": "canceled (it was queued, or was canceled already)"},
    202: {"model": JobSummary, "description": "running: asked to stop at its next step (cancel_requested)"},
    **error_responses(404, 409, 503)})
async def cancel_job(request: Request, job_id: JobId) -> JSONResponse:
    """Cancel a queued job at once (200); ask a running job to stop at its next step (202)."""
    status, view = await run_in_threadpool(_jobs(request).cancel, caller_of(request), job_id)
    view["links"] = _links(job_id)
    return JSONResponse(view, status_code=status)


@router.get("/{job_id}/files/{name}", response_class=Response, responses={
    200: {"description": "the picture", "content": {"image/png": {"schema": {"type": "string", "format": "binary"}},
                                                    "image/svg+xml": {"schema": {"type": "string"}}}},
    **error_responses(404, 503)})
async def job_file(request: Request, job_id: JobId,
                   name: Annotated[str, Path(json_schema_extra=FILE_NAME_SCHEMA)]) -> Response:
    """A picture of the job's result stored beside it (the link its result field holds)."""
    data, media = await run_in_threadpool(_jobs(request).file, caller_of(request), job_id, name)
    return Response(data, media_type=media)


@router.get("/{job_id}/result.png", response_class=Response, responses={
    200: {"description": "the picture", "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
    **error_responses(404, 409, 503)})
async def job_picture(request: Request, job_id: JobId) -> Response:
    """The job's picture: the heat-map overlay, or the method's own picture (e.g. a graph)."""
    png = await run_in_threadpool(_jobs(request).result_png, caller_of(request), job_id)
    return Response(png, media_type="image/png")
