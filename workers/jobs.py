"""One job's run inside a worker: payload in, method on a warm model, an :class:`Outcome` out.

Every way a method can end becomes an outcome with a client-facing error code; only a lost
lease (:class:`LeaseLost`) and a cold shutdown propagate, because then this attempt must write
nothing. Progress reports survive Redis outages: a report that cannot reach Redis is skipped
(and reports pause for a moment), so an outage slows a job at most a little and never fails it.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import redis
from pydantic import ValidationError

from core.errors import UnboxError
from core.validation import describe_validation_errors
from models.registry import UnknownModelError
from workers.jobqueue import JobStore, Lease, Outcome
from workers.methods import JobCanceled, get_method
from workers.payload import JobPayload
from workers.runtime import WorkerRuntime

logger = logging.getLogger("unbox.jobs")

REPORT_PAUSE_AFTER_OUTAGE_S = 1.0


class JobFailure(UnboxError):
    """A failure with a client-facing code (image expired, unknown model ...)."""


class LeaseLost(Exception):
    """This attempt no longer holds the job (it was retried elsewhere, or failed): stop, write nothing."""


class JobTimeout(Exception):
    """The job ran past its time limit (raised in the worker's main thread by SIGALRM)."""


class Reporter:
    """``report(fraction, stage)``: progress into the job; raises :class:`JobCanceled` on a cancel
    request and :class:`LeaseLost` once the lease is gone.

    One Redis round trip per call; progress writes are skipped when less than ``min_interval_s``
    passed and the stage did not change.
    """

    def __init__(self, store: JobStore, lease: Lease, min_interval_s: float = 0.1) -> None:
        self.store = store
        self.lease = lease
        self.min_interval_s = min_interval_s
        self.fraction = 0.0
        self.stage = "starting"
        self._last_write = 0.0
        self._quiet_until = 0.0

    def __call__(self, fraction: float, stage: str) -> None:
        if self.lease.lost:
            raise LeaseLost(self.lease.job_id)
        self.fraction = min(max(float(fraction), 0.0), 1.0)
        now = time.monotonic()
        write = stage != self.stage or now - self._last_write >= self.min_interval_s
        self.stage = stage
        if now < self._quiet_until:
            return
        try:
            answer = self.store.progress(self.lease, self.fraction, stage, write)
        except redis.RedisError as exc:
            logger.debug("progress of job %s not recorded: %s", self.lease.job_id, exc)
            self._quiet_until = time.monotonic() + REPORT_PAUSE_AFTER_OUTAGE_S
            return
        if write:
            self._last_write = now
        if answer < 0:
            self.lease.lost = True
            raise LeaseLost(self.lease.job_id)
        if answer == 1:
            raise JobCanceled(self.lease.job_id)


def run_method(request: JobPayload, image: Any, runtime: WorkerRuntime, report: Reporter) -> dict[str, Any]:
    """Validate the payload against this worker, then run the method; its JSON result."""
    started = time.perf_counter()
    report(0.0, "loading model")
    try:
        method = get_method(request.method)
    except KeyError:
        raise JobFailure("unknown_method", f"this worker has no job method {request.method!r}") from None
    params = method.params.model_validate(request.params)
    try:
        model = runtime.registry.get(request.model)
    except UnknownModelError:
        raise JobFailure("unknown_model", f"this worker has no model {request.model!r}") from None
    report(0.0, "running")
    result = method.run(model, image, request.target, params, report, runtime.settings)
    result.setdefault("timing_ms", {})["job"] = round((time.perf_counter() - started) * 1e3, 2)
    return result


def run_item(request: JobPayload, image: Any, runtime: WorkerRuntime, report: Reporter, spec: Any) -> dict[str, Any]:
    """Run a study's item (``request.study`` is set): the method on the image, then the item's
    share of the study's analyses (:mod:`workers.study_item`); its compact result."""
    from explainers.registry import METHODS
    from workers.study_item import run_study_item

    report(0.0, "loading model")
    if request.method not in METHODS:
        raise JobFailure("unknown_method", f"studies run registered explainers only, not {request.method!r}")
    try:
        model = runtime.registry.get(request.model)
    except UnknownModelError:
        raise JobFailure("unknown_model", f"this worker has no model {request.model!r}") from None
    assert request.study is not None
    return run_study_item(model, image, request.method, request.target, request.params, request.study.label, spec,
                          runtime.registry, report)


def _failed(report: Reporter, code: str, message: str) -> Outcome:
    return Outcome("failed", error={"code": code, "message": message[:500]}, progress=report.fraction,
                   stage="failed")


def outcome_of(run: Callable[[], dict[str, Any]], report: Reporter, timeout_s: int) -> Outcome:
    """Run ``run`` and turn how it ended into the attempt's outcome (a lost lease propagates)."""
    try:
        result = run()
    except JobCanceled:
        return Outcome("canceled", error={"code": "canceled", "message": "the job was canceled while running"},
                       progress=report.fraction, stage="canceled")
    except UnboxError as exc:  # JobFailure, ExplainError
        return _failed(report, exc.code, exc.message)
    except ValidationError as exc:
        return _failed(report, "invalid_parameter", describe_validation_errors(exc.errors(), "params"))
    except JobTimeout:
        return _failed(report, "timeout", f"the job exceeded its time limit of {timeout_s} s")
    except LeaseLost:
        raise
    except Exception as exc:
        logger.exception("job %s failed", report.lease.job_id)
        return _failed(report, "job_failed", f"{type(exc).__name__}: {exc}")
    return Outcome("succeeded", result=result)
