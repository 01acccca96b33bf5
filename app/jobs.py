"""The asynchronous job API (``/v1/jobs``): submit, poll, cancel and fetch the picture.

The API validates everything once at submission (method, params with the method's pydantic
model, model, target, callback URL, the image through ``app.intake``), stores the clean image
in Redis with a TTL and enqueues a JSON payload (``workers.payload.JobPayload``). When Redis
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
from typing import Annotated, Any, Iterator

import redis
from fastapi import APIRouter, File, Form, Header, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from rq import Retry as JobRetry
from rq.job import Job

from app.errors import ApiError
from app.schemas import ERROR_RESPONSES
from app.service import InferenceService
from app.settings import Settings
from models.catalog import DEFAULT_MODEL
from models.labels import load_labels
from workers.jobqueue import (TERMINAL, connect, fetch_job, is_stale, job_queue, job_view, reap_abandoned,
                              request_cancel)
from workers.methods import JobMethod, load_builtin_methods, method_timeout
from workers.payload import RUN_JOB, JobPayload, idempotency_key, image_key, png_bytes
from workers.webhooks import check_callback_url, end_event_once, event_for, schedule

logger = logging.getLogger("unbox.jobs")

_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
POLL_AFTER_S = "1"
UNAVAILABLE_RETRY_S = "5"
QUEUE_FULL_RETRY_S = "2"
ADMISSION_LOCK_S = 10.0  # a submitter that died holding the admission lock frees it after this
ADMISSION_WAIT_S = 5.0   # how long a submission waits for its turn before answering 503


class JobsClient:
    """The API's side of the queue; one per app. Holds a lazily connecting Redis client."""

    def __init__(self, settings: Settings, service: InferenceService) -> None:
        self.settings = settings
        self.service = service
        self.redis = connect(settings.redis_url, settings.redis_timeout_s) if settings.redis_url else None
        self.methods: dict[str, JobMethod] = load_builtin_methods(settings.job_method_modules)

    def close(self) -> None:
        if self.redis is not None:
            self.redis.close()

    # ----- plumbing -------------------------------------------------------------------------
    def _redis(self) -> redis.Redis:
        if self.redis is None:
            raise ApiError(503, "queue_not_configured",
                           "this server has no job queue; set UNBOX_REDIS_URL (or run `unbox serve`)")
        return self.redis

    @contextmanager
    def _reachable(self) -> Iterator[redis.Redis]:
        connection = self._redis()
        try:
            yield connection
        except redis.RedisError as exc:
            logger.warning("job queue unreachable: %s", exc)
            raise ApiError(503, "queue_unavailable", f"the job queue (Redis) is unreachable: {exc}; "
                           "predictions and synchronous explanations still work",
                           {"Retry-After": UNAVAILABLE_RETRY_S}) from None

    @contextmanager
    def _admission(self, connection: redis.Redis) -> Iterator[None]:
        """One submission at a time counts and enqueues on the queue (across all API
        processes: a Redis lock), so concurrent submissions never overfill it."""
        lock = connection.lock(f"unbox:admission:{self.settings.queue_name}", timeout=ADMISSION_LOCK_S,
                               sleep=0.005, blocking_timeout=ADMISSION_WAIT_S)
        if not lock.acquire():
            raise ApiError(503, "queue_busy", "too many submissions at once; retry shortly", {"Retry-After": "1"})
        try:
            yield
        finally:
            try:
                lock.release()
            except redis.exceptions.LockError:  # held past ADMISSION_LOCK_S: already expired, nothing to free
                logger.warning("the admission lock expired before its submission finished")

    def health(self) -> dict[str, Any]:
        """Redis reachability and queue depth, for ``/readyz``."""
        if self.redis is None:
            return {"status": "not_configured"}
        try:
            queued = job_queue(self.redis, self.settings.queue_name).count
            return {"status": "ok", "queued": queued}
        except redis.RedisError as exc:
            return {"status": "unreachable", "error": str(exc)}

    def _job(self, connection: redis.Redis, job_id: str) -> Job:
        job = fetch_job(connection, job_id) if _JOB_ID.match(job_id) else None
        if job is None:
            raise ApiError(404, "job_not_found", f"no job {job_id!r}: it never existed or it has expired")
        return job

    # ----- validation -----------------------------------------------------------------------
    def _method(self, name: str) -> JobMethod:
        method = self.methods.get(name) or load_builtin_methods(self.settings.job_method_modules).get(name)
        if method is None:
            known = ", ".join(sorted(load_builtin_methods(self.settings.job_method_modules)))
            raise ApiError(422, "unknown_method", f"unknown job method {name!r}; available: {known}")
        return method

    @staticmethod
    def _params(method: JobMethod, text: str | None) -> dict[str, Any]:
        try:
            raw = json.loads(text) if text and text.strip() else {}
        except json.JSONDecodeError as exc:
            raise ApiError(422, "invalid_params", f"params is not valid JSON: {exc.msg}") from None
        if not isinstance(raw, dict):
            raise ApiError(422, "invalid_params", "params must be a JSON object")
        try:
            # Only the fields the client set travel: presets (igos's preset="cpu") fill the rest.
            return method.params.model_validate(raw).model_dump(mode="json", exclude_unset=True)
        except ValidationError as exc:
            details = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'params'}: {err['msg']}"
                                for err in exc.errors())
            raise ApiError(422, "invalid_params", f"invalid params for {method.name}: {details}") from None

    def _num_classes(self, model: str) -> int:
        registry = self.service.registry
        if model not in registry.specs:
            known = ", ".join(sorted(registry.specs))
            raise ApiError(422, "unknown_model", f"unknown model {model!r}; available: {known}")
        if registry.is_loaded(model):
            return registry.get(model).num_classes
        return len(load_labels(registry.specs[model].labels))

    # ----- operations -----------------------------------------------------------------------
    def submit(self, data: bytes, method_name: str, model: str, target: int | None, params_text: str | None,
               callback_url: str | None, idempotency: str | None) -> tuple[dict[str, Any], bool]:
        """Validate and enqueue; returns the job's view and whether it is an idempotent replay."""
        method = self._method(method_name)
        params = self._params(method, params_text)
        classes = self._num_classes(model)
        if target is not None and not 0 <= target < classes:
            raise ApiError(422, "invalid_target", f"target must be a class index in [0, {classes - 1}]")
        layer, registry = params.get("layer"), self.service.registry
        known_layers = registry.get(model).layers if layer and registry.is_loaded(model) else ()
        if known_layers and layer not in known_layers:
            raise ApiError(422, "unknown_layer", f"model {model} has no module {layer!r}")
        if callback_url:
            problem = check_callback_url(callback_url)
            if problem:
                raise ApiError(422, "invalid_callback_url", problem)
        if idempotency is not None and not 1 <= len(idempotency) <= 255:
            raise ApiError(422, "invalid_idempotency_key", "Idempotency-Key must be 1 to 255 characters")
        self._redis()
        image = self.service.decode(data)
        payload = JobPayload(method=method.name, model=model, target=target, params=params,
                             callback_url=callback_url or None).model_dump(mode="json")
        fingerprint = hashlib.sha256(data + json.dumps(payload, sort_keys=True).encode()).hexdigest()
        png = png_bytes(image)
        settings = self.settings
        with self._reachable() as connection:
            job_id = uuid.uuid4().hex
            record_key = idempotency_key(idempotency) if idempotency else None
            if record_key:
                replay = self._claim_idempotency(connection, record_key, job_id, fingerprint)
                if replay is not None:
                    return replay, True
            queue = job_queue(connection, settings.queue_name)
            try:
                with self._admission(connection):
                    if queue.count >= settings.max_queue_length:
                        raise ApiError(503, "queue_full", f"the job queue is full ({settings.max_queue_length} "
                                       "jobs waiting); retry later", {"Retry-After": QUEUE_FULL_RETRY_S})
                    connection.set(image_key(job_id), png, ex=settings.job_image_ttl_s)
                    job = queue.enqueue_call(
                        RUN_JOB, kwargs={"payload": payload}, job_id=job_id,
                        timeout=method_timeout(method, settings.job_timeouts),
                        result_ttl=settings.job_result_ttl_s, failure_ttl=settings.job_result_ttl_s,
                        ttl=settings.job_image_ttl_s, retry=JobRetry(max=1),
                        meta={"progress": 0.0, "stage": "queued", "attempts": 0},
                        description=f"{method.name} on {model}")
            except BaseException:
                cleanup = [image_key(job_id)] + ([record_key] if record_key else [])
                try:
                    connection.delete(*cleanup)
                except redis.RedisError:
                    pass
                raise
            return job_view(job, with_result=False), False

    def _claim_idempotency(self, connection: redis.Redis, record_key: str, job_id: str,
                           fingerprint: str) -> dict[str, Any] | None:
        """Reserve ``record_key`` for the new job, or return the view of the job that holds it."""
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
            job = fetch_job(connection, held["job_id"])
            if job is not None:
                return job_view(job, with_result=False)
            if connection.ttl(record_key) > self.settings.job_result_ttl_s - 30:
                raise ApiError(409, "request_in_progress", "a request with this Idempotency-Key is still "
                               "being processed; retry shortly", {"Retry-After": "1"})
            connection.delete(record_key)  # its job expired: the key is free again
        raise ApiError(503, "queue_unavailable", "could not reserve the Idempotency-Key; retry",
                       {"Retry-After": "1"})

    def view(self, job_id: str) -> dict[str, Any]:
        with self._reachable() as connection:
            job = self._job(connection, job_id)
            if job.get_status(refresh=False) == "started" and is_stale(job, self.settings.worker_heartbeat_s):
                queue = job_queue(connection, self.settings.queue_name)
                for failed in reap_abandoned(queue):
                    self._schedule_webhook(connection, failed)
                job = self._job(connection, job_id)
            return job_view(job)

    def cancel(self, job_id: str) -> tuple[int, dict[str, Any]]:
        """Cancel a queued job now (200), ask a running one to stop (202); 409 once it has ended."""
        with self._reachable() as connection:
            job = self._job(connection, job_id)
            view = job_view(job, with_result=False)
            if view["status"] == "canceled":
                return 200, view
            if view["status"] in TERMINAL:
                raise ApiError(409, "job_finished", f"job {job_id} has already {view['status']}")
            request_cancel(connection, job_id, self.settings.job_result_ttl_s)
            if view["status"] == "queued":
                job.cancel()
                connection.delete(image_key(job_id))
                connection.expire(job.key, self.settings.job_result_ttl_s)
                job = self._job(connection, job_id)
                view = job_view(job, with_result=False)
                self._schedule_webhook(connection, job)
                return 200, view
            view["cancel_requested"] = True
            return 202, view

    def result_png(self, job_id: str) -> bytes:
        view = self.view(job_id)
        if view["status"] != "succeeded":
            raise ApiError(409, "job_not_succeeded", f"job {job_id} is {view['status']}; it has no picture")
        result = view.get("result") or {}
        encoded = (result.get("heatmap") or {}).get("overlay_png") or result.get("picture_png")
        if not encoded:
            raise ApiError(404, "no_picture", f"the result of job {job_id} has no picture")
        return base64.b64decode(encoded)

    def _schedule_webhook(self, connection: redis.Redis, job: Job) -> None:
        url = (job.kwargs.get("payload") or {}).get("callback_url")
        if url:
            view = job_view(job, with_result=False)
            schedule(connection, url, event_for(view), once=end_event_once(job.id, view["status"]))


# ----- routes -------------------------------------------------------------------------------
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def _jobs(request: Request) -> JobsClient:
    return request.app.state.jobs


def _links(job_id: str) -> dict[str, str]:
    return {"self": f"/v1/jobs/{job_id}", "result_png": f"/v1/jobs/{job_id}/result.png"}


@router.post("", status_code=202, responses={**ERROR_RESPONSES, 404: {"description": "unknown job"}})
async def submit_job(
    request: Request,
    image: Annotated[UploadFile, File(description="the image: JPEG, PNG, WebP, BMP, GIF or TIFF")],
    method: Annotated[str, Form(description="job method, e.g. gradcam (see GET /v1/jobs/methods)")],
    model: Annotated[str, Form(description="model name (see GET /v1/models)")] = DEFAULT_MODEL,
    target: Annotated[int | None, Form(description="class index to explain; default the top-1 class")] = None,
    params: Annotated[str | None, Form(description="JSON object of method parameters")] = None,
    callback_url: Annotated[str | None, Form(description="URL that gets a signed POST when the job ends")] = None,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JSONResponse:
    """Queue a slow explanation; poll the returned Location (or wait for the webhook)."""
    data = await image.read()
    view, replayed = await run_in_threadpool(_jobs(request).submit, data, method, model, target, params,
                                             callback_url, idempotency_key)
    body = {key: view[key] for key in ("id", "status", "method", "model", "created_at")}
    body["links"] = _links(view["id"])
    headers = {"Location": f"/v1/jobs/{view['id']}", "Retry-After": POLL_AFTER_S}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(body, status_code=202, headers=headers)


@router.get("/methods")
def list_methods(request: Request) -> dict:
    """The job methods this server accepts, with their parameters' JSON schema and time limit."""
    jobs = _jobs(request)
    methods = load_builtin_methods(jobs.settings.job_method_modules)
    return {"methods": [{"name": m.name, "description": m.description,
                         "timeout_s": method_timeout(m, jobs.settings.job_timeouts),
                         "params": m.params.model_json_schema()} for _, m in sorted(methods.items())]}


@router.get("/{job_id}", responses={404: {"description": "unknown or expired job"}, 503: {"description": "queue down"}})
async def get_job(request: Request, job_id: str) -> JSONResponse:
    """Status, progress (0..1), stage, timestamps, and the result or the error."""
    view = await run_in_threadpool(_jobs(request).view, job_id)
    view["links"] = _links(job_id)
    headers = {} if view["status"] in TERMINAL else {"Retry-After": POLL_AFTER_S}
    return JSONResponse(view, headers=headers)


@router.delete("/{job_id}", responses={404: {"description": "unknown or expired job"},
                                       409: {"description": "the job has already ended"}})
async def cancel_job(request: Request, job_id: str) -> JSONResponse:
    """Cancel a queued job at once (200); ask a running job to stop at its next step (202)."""
    status, view = await run_in_threadpool(_jobs(request).cancel, job_id)
    view["links"] = _links(job_id)
    return JSONResponse(view, status_code=status)


@router.get("/{job_id}/result.png", response_class=Response,
            responses={200: {"content": {"image/png": {}}}, 404: {"description": "unknown job or no picture"},
                       409: {"description": "the job has not succeeded"}})
async def job_picture(request: Request, job_id: str) -> Response:
    """The job's picture: the heat-map overlay, or the method's own picture (e.g. a graph)."""
    png = await run_in_threadpool(_jobs(request).result_png, job_id)
    return Response(png, media_type="image/png")
