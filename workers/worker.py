"""``unbox worker``: one in-process queue worker with warm models on one device.

No fork per job (a forked child loses the CUDA context and the warm models): jobs run in the
worker's main thread, under a SIGALRM time limit. A beat thread renews the running job's lease
and the worker's own entry every ``UNBOX_WORKER_HEARTBEAT_S`` and reaps the jobs of workers
that stopped beating. The worker outlives Redis outages: a lost connection, between jobs or
during one, is waited out with backoff; the running job goes on, its outcome is recorded when
Redis is back (or refused, when its lease was lost meanwhile), and then it takes jobs again.
SIGTERM / Ctrl-C finishes the current job, then exits; a second one stops at once and gives the
job back to the queue. Webhooks go out from a separate thread.

Only Unbox's own job functions ever run: a job whose payload is not a valid
:class:`~workers.payload.JobPayload` (a record some other tool wrote into the queue, an RQ-style
pickled call, a payload naming ``os.system``), or that names a method no module registered, is
refused before anything of it is looked up: failed with ``invalid_payload``, logged at ERROR by
job id (never its content), nothing imported or executed. While a job runs, its id and the id
of the request that submitted it are in the logging context (``workers.logging_setup``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, TypeVar

import redis
from pydantic import ValidationError

from models.build import ModelBuildError
from models.catalog import CatalogError, load_catalog
from models.registry import ModelRegistry, UnknownModelError
from workers.jobqueue import JobStore, Lease, Outcome, connect
from workers.jobs import JobFailure, JobTimeout, LeaseLost, Reporter, outcome_of, run_item, run_method
from workers.logging_setup import configure_logging, job_id_var, request_id_var
from workers.methods import get_method, load_builtin_methods
from workers.payload import JobPayload, image_key
from workers.redis_url import redact_url
from workers.result_files import split_files
from workers.runtime import WorkerRuntime
from core.settings import CoreSettings, SettingsError
from explainers.sag import SAGConfig
from workers.stored_image import StoredImageError, decode_stored
from workers.study_spec import StudySpec
from workers.study_store import StudyStore, study_image_key, study_queue
from workers.warmup import warm_igos_compile
from workers.webhooks import WebhookSender, schedule_job_end

logger = logging.getLogger("unbox.worker")
T = TypeVar("T")

IDLE_WAIT_S = 1.0
STUDY_SPECS_KEPT = 32  # specs of the studies seen lately, kept in memory (a study's spec never changes)
OUTAGE_BACKOFF_S = (0.25, 5.0)  # first and longest wait between tries while Redis is away


class ColdShutdown(BaseException):
    """The second stop signal: leave the running job at once (it goes back to the queue)."""


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Raise :class:`JobTimeout` in the main thread after ``seconds``."""
    def _expired(_signum: int, _frame: object) -> None:
        raise JobTimeout()

    previous = signal.signal(signal.SIGALRM, _expired)
    signal.setitimer(signal.ITIMER_REAL, max(float(seconds), 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class UnboxWorker:
    """Takes jobs from the queue one at a time and records exactly one outcome per attempt."""

    def __init__(self, settings: CoreSettings, runtime: WorkerRuntime, store: JobStore, name: str,
                 webhooks: WebhookSender | None = None) -> None:
        self.settings = settings
        self.runtime = runtime
        self.store = store
        self.name = name
        self.webhooks = webhooks
        self.stopping = threading.Event()
        self.cold = False
        self.lease: Lease | None = None
        self.jobs_done = 0
        self.started_at = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
        self._beats = threading.Thread(target=self._beat_loop, name="unbox-beats", daemon=True)
        self._finished = threading.Event()
        self._announcing = threading.Lock()
        self._outage_logged = False
        self.queues = [settings.queue_name, study_queue(settings.queue_name)]  # interactive jobs first
        self.studies = StudyStore(store.redis, settings.queue_name)
        self._specs: dict[str, StudySpec] = {}

    # --- signals ---
    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)

    def _on_stop_signal(self, signum: int, _frame: object) -> None:
        if self.stopping.is_set():
            if not self.cold:
                self.cold = True
                logger.warning("second stop signal: leaving the running job now")
                raise ColdShutdown()
            return
        self.stopping.set()
        running = f"; finishing job {self.lease.job_id} first" if self.lease else ""
        logger.info("worker %s stopping (%s)%s", self.name, signal.Signals(signum).name, running)

    # --- Redis outages ---
    def _wait_out(self, exc: Exception, delay: float) -> float:
        if not self._outage_logged:
            logger.warning("worker %s cannot reach Redis (%s); retrying", self.name, exc)
            self._outage_logged = True
        time.sleep(delay)
        return min(delay * 2, OUTAGE_BACKOFF_S[1])

    def _reached(self) -> None:
        if self._outage_logged:
            logger.info("worker %s reached Redis again", self.name)
            self._outage_logged = False

    def _persist(self, call: Callable[[], T], until: Callable[[], bool] | None = None) -> T | None:
        """``call()`` until Redis answers; ``None`` when ``until()`` says to give up first."""
        delay = OUTAGE_BACKOFF_S[0]
        while True:
            try:
                value = call()
                self._reached()
                return value
            except redis.RedisError as exc:
                if until is not None and until():
                    return None
                delay = self._wait_out(exc, delay)

    # --- the beat thread ---
    def info(self) -> dict[str, Any]:
        lease = self.lease
        return {"pid": os.getpid(), "host": socket.gethostname(), "state": "busy" if lease else "idle",
                "job": lease.job_id if lease else None, "started_at": self.started_at, "jobs_done": self.jobs_done,
                "device": str(self.runtime.registry.device), "models": list(self.settings.models),
                "queue": self.settings.queue_name, "stopping": self.stopping.is_set()}

    def _beat_once(self) -> None:
        lease = self.lease
        if lease is not None and not lease.lost and not self.store.heartbeat(lease):
            lease.lost = True
            logger.warning("job %s: this worker's lease was lost (the job was retried elsewhere or ended); "
                           "stopping it without writing", lease.job_id)
        self.store.beat_worker(self.name, self.info())
        for job_id, what in self.store.reap():
            logger.warning("job %s: its worker stopped beating; %s", job_id, what)
        self._announce_ended()

    def _beat_loop(self) -> None:
        while True:
            try:
                self._beat_once()
            except redis.RedisError as exc:
                logger.debug("beat failed: %s", exc)
            except Exception:
                logger.exception("beat failed")
            if self._finished.wait(self.settings.worker_heartbeat_s):
                return

    # --- jobs ---
    def _announce_ended(self) -> None:
        """Schedule the webhooks of jobs that ended (by any process), then take them off the list;
        a Redis error leaves the rest for the next beat, so every end is announced at least once."""
        with self._announcing:
            job_ids = self.store.ended()
            done = []
            try:
                for job_id in job_ids:
                    try:
                        scheduled = schedule_job_end(self.store, job_id)
                    except (ValueError, TypeError, AttributeError) as exc:  # a record Unbox did not write
                        logger.error("job %s: its end cannot be announced, its record is not Unbox's (%s)",
                                     job_id, type(exc).__name__)
                        scheduled = False
                    if scheduled and self.webhooks is not None:
                        self.webhooks.wake.set()
                    done.append(job_id)
            finally:
                self.store.announced(done)

    def _load_image(self, lease: Lease, request: JobPayload) -> Any:
        key = study_image_key(request.study.study, request.study.image) if request.study else image_key(lease.job_id)
        data = self._persist(lambda: self.store.redis.get(key), until=lambda: lease.lost)
        if data is None:
            raise JobFailure("image_expired", "the uploaded image expired before a worker took the job")
        try:
            return decode_stored(data)
        except StoredImageError as exc:
            raise JobFailure("image_unreadable", f"the stored image cannot be decoded here: {exc}") from None

    @staticmethod
    def _admitted(lease: Lease) -> tuple[JobPayload | None, str]:
        """The lease's payload as one of Unbox's own jobs, or ``None`` and why it is refused.
        Nothing in a refused payload is imported, looked up or run."""
        try:
            request = JobPayload.model_validate(lease.payload)
        except ValidationError:
            return None, "its payload is not an Unbox job payload"
        try:
            get_method(request.method)
        except KeyError:
            return None, "it names a job method this worker does not have"
        return request, ""

    def _refuse(self, lease: Lease, reason: str) -> None:
        logger.error("job %s refused (attempt %d): %s; nothing of it runs", lease.job_id, lease.attempt, reason)
        self._record(lease, Outcome("failed", error={"code": "invalid_payload", "message": (
            f"this job was refused: {reason}; workers run only Unbox's own job methods")},
            progress=0.0, stage="failed"))

    def _study_spec(self, lease: Lease, study_id: str) -> StudySpec:
        """The spec of a study item's study (read once per study; the API validated it)."""
        spec = self._specs.get(study_id)
        if spec is None:
            text = self._persist(lambda: self.studies.spec(study_id), until=lambda: lease.lost)
            if text is None:
                raise JobFailure("study_expired", f"study {study_id} expired before this item ran")
            spec = self._specs[study_id] = StudySpec.model_validate_json(text)
            while len(self._specs) > STUDY_SPECS_KEPT:
                self._specs.pop(next(iter(self._specs)))
        return spec

    def _attempt(self, lease: Lease, request: JobPayload, report: Reporter) -> dict[str, Any]:
        with time_limit(lease.timeout_s):
            image = self._load_image(lease, request)
            if request.study is not None:
                return run_item(request, image, self.runtime, report, self._study_spec(lease, request.study.study))
            return run_method(request, image, self.runtime, report)

    def _remember(self, request: JobPayload, outcome: Outcome) -> None:
        """Cache a study item's result for later studies (a miss later is the only cost of failing here)."""
        if request.study is None or outcome.status != "succeeded" or outcome.result is None:
            return
        try:
            self.studies.remember(request.study.cache_key, outcome.result, self.settings.job_result_ttl_s)
        except redis.RedisError as exc:
            logger.warning("study %s: an item's result was not cached (%s)", request.study.study, exc)

    def _record(self, lease: Lease, outcome: Outcome) -> bool:
        """Write the attempt's outcome; whether it was accepted (the lease still held)."""
        accepted = self._persist(lambda: self.store.finish(lease, outcome), until=lambda: self.cold)
        if accepted:
            logger.info("job %s %s (attempt %d)", lease.job_id, outcome.status, lease.attempt)
            try:
                self._announce_ended()
            except redis.RedisError:
                pass  # the beat thread announces it when Redis answers again
        elif accepted is False:
            logger.warning("job %s: attempt %d's outcome (%s) refused: its lease was lost meanwhile",
                           lease.job_id, lease.attempt, outcome.status)
        return bool(accepted)

    def _sized(self, lease: Lease, outcome: Outcome) -> Outcome:
        """A success with its large pictures moved beside it, or a failure when it is still too large."""
        if outcome.status != "succeeded" or outcome.result is None:
            return outcome
        settings = self.settings
        files = split_files(lease.job_id, outcome.result, settings.job_inline_picture_max_bytes)
        size = len(json.dumps(outcome.result, separators=(",", ":")))
        stored = sum(len(data) for data in files.values())
        if size > settings.job_result_max_bytes or stored > settings.job_files_max_bytes:
            return Outcome("failed", error={"code": "result_too_large", "message": (
                f"the result ({size} bytes, plus {stored} bytes of pictures) exceeds UNBOX_JOB_RESULT_MAX_BYTES="
                f"{settings.job_result_max_bytes} or UNBOX_JOB_FILES_MAX_BYTES={settings.job_files_max_bytes}")},
                progress=1.0, stage="failed")
        return Outcome("succeeded", result=outcome.result, files=files)

    def run_one(self, lease: Lease) -> None:
        """Run one leased job and record its outcome (or nothing, when the lease was lost)."""
        self.lease = lease
        job_context = job_id_var.set(lease.job_id)
        request_context = request_id_var.set(None)
        report = Reporter(self.store, lease)
        try:
            request, refusal = self._admitted(lease)
            if request is None:
                self._refuse(lease, refusal)
                self.jobs_done += 1
                return
            request_id_var.set(request.request_id)
            logger.info("job %s taken (attempt %d, %s on %s)", lease.job_id, lease.attempt, request.method,
                        request.model)
            outcome = self._sized(lease, outcome_of(lambda: self._attempt(lease, request, report), report,
                                                    lease.timeout_s))
            if self._record(lease, outcome):
                self._remember(request, outcome)
            self.jobs_done += 1
        except LeaseLost:
            logger.warning("job %s: attempt %d stopped, its lease was lost", lease.job_id, lease.attempt)
        except ColdShutdown:
            try:
                self.store.release(lease)
                logger.warning("job %s given back to the queue", lease.job_id)
            except redis.RedisError:
                logger.warning("job %s left to the reaper (Redis unreachable)", lease.job_id)
            raise
        finally:
            self.lease = None
            request_id_var.reset(request_context)
            job_id_var.reset(job_context)

    def work(self, burst: bool = False) -> None:
        """Take jobs until stopped (or, with ``burst``, until the queue is empty)."""
        self._beats.start()
        delay = OUTAGE_BACKOFF_S[0]
        try:
            while not self.stopping.is_set():
                try:
                    lease = self.store.take(self.name, self.queues, pending_ttl_s=self.settings.job_image_ttl_s)
                    self._reached()
                    delay = OUTAGE_BACKOFF_S[0]
                    if lease is None:
                        if burst:
                            return
                        self.store.wait_for_work(IDLE_WAIT_S, self.queues)
                        continue
                except redis.RedisError as exc:
                    delay = self._wait_out(exc, delay)
                    continue
                self.run_one(lease)
        except ColdShutdown:
            pass
        finally:
            self._finished.set()
            self.stopping.set()
            try:
                self.store.forget_worker(self.name)
            except redis.RedisError:
                pass


def run_worker(settings: CoreSettings, burst: bool = False) -> int:
    """Load the models, then take jobs until SIGTERM (or, with ``burst``, until the queue is empty).

    Returns 2 on a fatal configuration error (a supervisor should not restart it in a loop), else 0.
    """
    configure_logging(settings.log_level, settings.log_format)
    if not settings.redis_url:
        logger.error("UNBOX_REDIS_URL is not set: a worker needs the Redis that the API queues jobs in")
        return 2
    settings.apply_to_torch()
    try:
        load_builtin_methods(settings.job_method_modules)
        registry = ModelRegistry(load_catalog(settings.catalog), settings.resolved_device(),
                                 settings.execution_policy(), patch_grid=SAGConfig().grid)
    except (SettingsError, CatalogError) as exc:
        logger.error("%s", exc)
        return 2
    for name in settings.models:
        started = time.perf_counter()
        try:
            model = registry.get(name)
        except UnknownModelError:
            logger.error("UNBOX_MODELS names %r, which the catalogue does not have; known: %s", name,
                         ", ".join(sorted(registry.specs)))
            return 2
        except (ModelBuildError, OSError, ValueError, RuntimeError) as exc:
            logger.error("model %s cannot be loaded: %s", name, exc)
            return 2
        warm_igos_compile(model, settings)
        logger.info("model %s warm on %s in %.1f s", name, registry.device, time.perf_counter() - started)
    connection = connect(settings.redis_url, settings.redis_timeout_s)
    store = JobStore(connection, settings.queue_name, settings.worker_heartbeat_s)
    sender = WebhookSender.from_settings(connect(settings.redis_url, settings.redis_timeout_s), settings)
    worker = UnboxWorker(settings, WorkerRuntime(settings, registry), store,
                         f"unbox-{socket.gethostname()}-{os.getpid()}", sender)
    worker.install_signal_handlers()
    sender.start()
    logger.info("worker %s taking jobs from queue %r at %s", worker.name, settings.queue_name,
                redact_url(settings.redis_url))
    try:
        worker.work(burst=burst)
    finally:
        sender.stop()
    logger.info("worker %s stopped", worker.name)
    return 0
