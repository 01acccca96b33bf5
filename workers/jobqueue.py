"""Job storage conventions on top of RQ: the connection, the queue, the public job view, the reaper.

Both sides use this module: the API to enqueue, read and cancel jobs; the workers to reap jobs
whose worker died. Status words are Unbox's, not RQ's:

=============  ===================================================================
``queued``     waiting in the queue (RQ queued / scheduled / deferred)
``running``    a worker holds it (RQ started); ``progress`` and ``stage`` move
``succeeded``  the method returned; ``result`` holds its JSON
``failed``     it raised, timed out, or its worker died twice; ``error`` says which
``canceled``   cancelled while queued, or stopped at a progress report while running
=============  ===================================================================
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry as RedisRetry
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from workers.payload import cancel_key, image_key

logger = logging.getLogger("unbox.jobs")

TERMINAL = frozenset({"succeeded", "failed", "canceled"})
CANCELED_MARKER = "canceled"  # a job stopped at a progress report returns {"canceled": True}
REAPER_LOCK = "unbox:reaper-lock"

_STATUS = {
    JobStatus.QUEUED: "queued",
    JobStatus.SCHEDULED: "queued",
    JobStatus.DEFERRED: "queued",
    JobStatus.STARTED: "running",
    JobStatus.FINISHED: "succeeded",
    JobStatus.FAILED: "failed",
    JobStatus.STOPPED: "canceled",
    JobStatus.CANCELED: "canceled",
}


def connect(url: str, timeout_s: float) -> redis.Redis:
    """A Redis client that fails fast (``timeout_s``) when the server is away and reconnects by itself."""
    return redis.Redis.from_url(
        url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s, health_check_interval=15,
        retry=RedisRetry(ExponentialBackoff(cap=0.2, base=0.02), 1))


def job_queue(connection: redis.Redis, name: str) -> Queue:
    """The RQ queue ``name`` with JSON job payloads."""
    return Queue(name, connection=connection, serializer=JSONSerializer)


def fetch_job(connection: redis.Redis, job_id: str) -> Job | None:
    """The job ``job_id``, or ``None`` when it never existed or has expired."""
    try:
        return Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
    except NoSuchJobError:
        return None


def request_cancel(connection: redis.Redis, job_id: str, ttl_s: int) -> None:
    """Flag ``job_id`` as cancelled; the job's next progress report raises ``JobCanceled``."""
    connection.set(cancel_key(job_id), b"1", ex=ttl_s)


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _failure(job: Job) -> dict[str, str]:
    """``{code, message}`` of a failed job: what the job recorded, else what RQ recorded."""
    recorded = job.meta.get("error")
    if isinstance(recorded, dict) and "code" in recorded:
        return {"code": str(recorded["code"]), "message": str(recorded.get("message", ""))}
    result = job.latest_result()
    text = (result.exc_string or "") if result is not None else ""
    if "AbandonedJobError" in text:
        return {"code": "worker_lost",
                "message": "the worker running this job stopped unexpectedly (killed or out of memory), "
                           "and so did the worker that retried it; the job was given up"}
    if "JobTimeoutException" in text:
        return {"code": "timeout", "message": "the job exceeded its time limit"}
    last = text.strip().splitlines()[-1] if text.strip() else "the job failed"
    return {"code": "job_failed", "message": last[:500]}


def job_view(job: Job, *, with_result: bool = True) -> dict[str, Any]:
    """The public JSON of a job, as ``GET /v1/jobs/{id}`` returns it."""
    rq_status = job.get_status(refresh=False)
    status = _STATUS.get(rq_status, "queued")
    meta = job.meta or {}
    payload = job.kwargs.get("payload") or {}
    view: dict[str, Any] = {
        "id": job.id,
        "status": status,
        "method": payload.get("method"),
        "model": payload.get("model"),
        "target": payload.get("target"),
        "progress": float(meta.get("progress", 0.0)),
        "stage": meta.get("stage", "queued"),
        "attempts": int(meta.get("attempts", 0)),
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "ended_at": _iso(job.ended_at),
    }
    if status == "queued":
        view["started_at"] = view["ended_at"] = None
    if status == "succeeded":
        value = job.return_value()
        if isinstance(value, dict) and value.get(CANCELED_MARKER) is True:
            view["status"] = "canceled"
            view["error"] = {"code": "canceled", "message": "the job was canceled while running"}
        else:
            view["progress"] = 1.0
            view["stage"] = "done"
            if with_result:
                view["result"] = value
    elif status == "failed":
        view["error"] = _failure(job)
    elif status == "canceled":
        view["error"] = {"code": "canceled", "message": "the job was canceled"}
    return view


def heartbeat_ttl(heartbeat_s: float) -> int:
    """Seconds after its last heartbeat that a running job's worker is presumed dead."""
    return int(3 * heartbeat_s + 2.999)


def reap_abandoned(queue: Queue) -> list[Job]:
    """Retry (once) or fail the running jobs whose worker stopped sending heartbeats.

    Any process may call this (workers do it periodically, the API when it sees a stale
    running job); a short Redis lock keeps two reapers from retrying one job twice. Returns
    the jobs that ended as failed, for their webhooks.
    """
    connection = queue.connection
    if not connection.set(REAPER_LOCK, b"1", nx=True, ex=10):
        return []
    try:
        registry = StartedJobRegistry(queue.name, connection=connection, serializer=JSONSerializer)
        expired = registry.get_expired_job_ids()
        if not expired:
            return []
        registry.cleanup()
        failed = []
        for job_id in dict.fromkeys(expired):
            job = fetch_job(connection, job_id)
            if job is None:
                continue
            status = job.get_status(refresh=False)
            if status == JobStatus.FAILED:
                connection.delete(image_key(job_id))
                failed.append(job)
            logger.warning("job %s: its worker stopped sending heartbeats; now %s", job_id, status)
        return failed
    finally:
        connection.delete(REAPER_LOCK)


def is_stale(job: Job, heartbeat_s: float) -> bool:
    """A running job whose last heartbeat is older than the heartbeat TTL."""
    beat = job.last_heartbeat or job.started_at
    if beat is None:
        return False
    if beat.tzinfo is None:
        beat = beat.replace(tzinfo=timezone.utc)
    return (datetime.now(timezone.utc) - beat).total_seconds() > heartbeat_ttl(heartbeat_s)
