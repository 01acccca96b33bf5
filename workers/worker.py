"""``unbox worker``: one in-process RQ worker with warm models on one device.

No fork per job (a forked child loses the CUDA context and the warm models): jobs run in the
worker's main thread (an RQ ``SimpleWorker``), under RQ's SIGALRM time limit. Around each job a
thread sends heartbeats every ``UNBOX_WORKER_HEARTBEAT_S``; a worker that stops beating (killed,
out of memory, machine lost) is noticed by the reaper of any other worker (or by the API) and
its job is retried once, then failed with ``worker_lost``. SIGTERM / Ctrl-C finishes the
current job, then exits (a second one stops at once). Webhooks go out from a separate thread.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

import redis
from rq.job import Job
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.worker import SimpleWorker, WorkerStatus

from models.catalog import load_catalog
from models.registry import ModelRegistry
from workers.jobqueue import connect, heartbeat_ttl, job_queue, job_view, reap_abandoned
from workers.methods import load_builtin_methods
from workers.runtime import WorkerRuntime, use_runtime
from workers.settings import CoreSettings, SettingsError
from workers.warmup import warm_fast_paths, warm_igos_compile, warm_onnx_runtime
from workers.webhooks import WebhookSender, end_event_once, event_for, schedule

logger = logging.getLogger("unbox.worker")


class _Heartbeats(threading.Thread):
    """Keeps a running job's heartbeat (and its worker's) fresh while the main thread computes."""

    def __init__(self, worker: "UnboxWorker", job: Job, execution: Any) -> None:
        super().__init__(name=f"unbox-heartbeat-{job.id}", daemon=True)
        self.worker, self.job, self.execution = worker, job, execution
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.worker.heartbeat_s):
            try:
                self.worker.maintain_heartbeats(self.job, self.execution)
            except redis.RedisError as exc:
                logger.warning("heartbeat for job %s failed: %s", self.job.id, exc)
            except Exception:
                logger.exception("heartbeat for job %s failed", self.job.id)

    def stop(self) -> None:
        self.done.set()
        self.join(5)


class _Reaper(threading.Thread):
    """Periodically retries or fails jobs whose worker died (any worker may do it)."""

    def __init__(self, worker: "UnboxWorker") -> None:
        super().__init__(name="unbox-reaper", daemon=True)
        self.worker = worker
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.worker.heartbeat_s):
            try:
                for queue in self.worker.queues:
                    for job in reap_abandoned(queue):
                        self.worker.job_ended(job)
            except redis.RedisError as exc:
                logger.debug("reaper cannot reach Redis: %s", exc)
            except Exception:
                logger.exception("reaper failed")


class UnboxWorker(SimpleWorker):
    """A ``SimpleWorker`` with short heartbeats, single-retry-on-death and job-end webhooks."""

    max_connection_wait_time = 5.0  # Redis back within seconds -> working again within seconds
    log_result_lifespan = False

    def __init__(self, queues: list[Queue], *, heartbeat_s: float, webhooks: WebhookSender | None = None,
                 **kwargs: Any) -> None:
        super().__init__(queues, serializer=JSONSerializer, **kwargs)
        self.heartbeat_s = heartbeat_s
        self.webhooks = webhooks

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return heartbeat_ttl(self.heartbeat_s)

    def execute_job(self, job: Job, queue: Queue) -> None:
        execution = self.prepare_execution(job)
        beats = _Heartbeats(self, job, execution)
        beats.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            beats.stop()
        self.set_state(WorkerStatus.IDLE)
        self.job_ended(job)

    def handle_job_failure(self, job: Job, queue: Queue, started_job_registry: Any = None, exc_string: str = "",
                           execution: Any = None) -> None:
        # The single retry is for a lost worker (see the reaper); a job that raised is final.
        if isinstance(job.meta.get("error"), dict):
            job.retries_left = 0
        super().handle_job_failure(job, queue, started_job_registry=started_job_registry,
                                   exc_string=exc_string, execution=execution)

    def job_ended(self, job: Job) -> None:
        """Schedule the job's webhook, if it asked for one and really ended."""
        try:
            job.refresh()
            view = job_view(job, with_result=False)
            url = (job.kwargs.get("payload") or {}).get("callback_url")
            if url and view["status"] in ("succeeded", "failed", "canceled"):
                schedule(self.connection, url, event_for(view), once=end_event_once(job.id, view["status"]))
                if self.webhooks is not None:
                    self.webhooks.wake.set()
        except Exception:
            logger.exception("could not schedule the webhook of job %s", job.id)


def _wait_for_redis(connection: redis.Redis, url: str) -> None:
    delay = 0.5
    while True:
        try:
            connection.ping()
            return
        except redis.RedisError as exc:
            logger.warning("waiting for Redis at %s: %s", url, exc)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def run_worker(settings: CoreSettings, burst: bool = False) -> int:
    """Load the models, then take jobs until SIGTERM (or, with ``burst``, until the queue is empty)."""
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not settings.redis_url:
        logger.error("UNBOX_REDIS_URL is not set: a worker needs the Redis that the API queues jobs in")
        return 2
    settings.apply_to_torch()
    try:
        load_builtin_methods(settings.job_method_modules)
    except SettingsError as exc:
        logger.error("%s", exc)
        return 2
    registry = ModelRegistry(load_catalog(settings.catalog), settings.resolved_device())
    for name in settings.models:
        started = time.perf_counter()
        model = registry.get(name)
        warm_fast_paths(model, settings)
        warm_igos_compile(model, settings)
        warm_onnx_runtime(model, settings, sag=True)
        logger.info("model %s warm on %s in %.1f s", name, registry.device, time.perf_counter() - started)
    connection = connect(settings.redis_url, settings.redis_timeout_s)
    _wait_for_redis(connection, settings.redis_url)
    secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
    sender = WebhookSender(connect(settings.redis_url, settings.redis_timeout_s), secret,
                           settings.webhook_max_attempts, settings.webhook_backoff_s, settings.webhook_timeout_s)
    worker = UnboxWorker([job_queue(connection, settings.queue_name)], connection=connection,
                         name=f"unbox-{socket.gethostname()}-{os.getpid()}", worker_ttl=60,
                         heartbeat_s=settings.worker_heartbeat_s, webhooks=sender)
    reaper = _Reaper(worker)
    sender.start()
    reaper.start()
    logger.info("worker %s taking jobs from queue %r", worker.name, settings.queue_name)
    try:
        with use_runtime(WorkerRuntime(settings, registry)):
            worker.work(burst=burst, logging_level=settings.log_level.upper())
    finally:
        reaper.done.set()
        sender.stop()
    logger.info("worker %s stopped", worker.name)
    return 0
