"""The job function RQ runs: payload in, method run on a warm model, JSON result out.

Errors become ``meta["error"] = {code, message}`` (then the exception propagates so RQ marks
the job failed); a cancel request seen at a progress report ends the job as ``canceled``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pydantic import ValidationError
from rq import get_current_job
from rq.job import Job
from rq.timeouts import JobTimeoutException

from explainers.errors import ExplainError
from models.registry import UnknownModelError
from workers.jobqueue import CANCELED_MARKER
from workers.methods import JobCanceled, get_method
from workers.payload import JobPayload, cancel_key, image_from_png, image_key
from workers.runtime import current_runtime

logger = logging.getLogger("unbox.jobs")


class JobFailure(Exception):
    """A failure with a client-facing code (image expired, unknown model ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Reporter:
    """``report(fraction, stage)``: progress into job meta; raises :class:`JobCanceled` on request.

    One Redis round trip per call (meta write + cancel-flag read, pipelined); meta writes are
    skipped when less than ``min_interval_s`` passed and the stage did not change.
    """

    def __init__(self, job: Job, min_interval_s: float = 0.1) -> None:
        self.job = job
        self.min_interval_s = min_interval_s
        self._last_write = 0.0

    def __call__(self, fraction: float, stage: str) -> None:
        fraction = min(max(float(fraction), 0.0), 1.0)
        changed = stage != self.job.meta.get("stage")
        self.job.meta["progress"] = round(fraction, 4)
        self.job.meta["stage"] = stage
        now = time.monotonic()
        with self.job.connection.pipeline(transaction=False) as pipe:
            if changed or now - self._last_write >= self.min_interval_s:
                pipe.hset(self.job.key, "meta", self.job._serialize_meta())
                self._last_write = now
            pipe.exists(cancel_key(self.job.id))
            canceled = pipe.execute()[-1]
        if canceled:
            raise JobCanceled(self.job.id)

    def save(self, **fields: Any) -> None:
        self.job.meta.update(fields)
        self.job.save_meta()


def _fail(reporter: Reporter, code: str, message: str) -> None:
    reporter.save(error={"code": code, "message": message}, stage="failed")


def run_job(payload: dict[str, Any]) -> dict[str, Any]:
    """Run one Unbox job inside an ``unbox worker`` (the function every job names)."""
    job = get_current_job()
    if job is None:
        raise RuntimeError("run_job runs inside an RQ worker")
    runtime = current_runtime()
    connection = job.connection
    reporter = Reporter(job)
    reporter.save(attempts=int(job.meta.get("attempts", 0)) + 1, progress=0.0, stage="starting", error=None)
    started = time.perf_counter()
    ended = True
    try:
        request = JobPayload.model_validate(payload)
        reporter(0.0, "loading model")
        try:
            method = get_method(request.method)
        except KeyError:
            raise JobFailure("unknown_method", f"this worker has no job method {request.method!r}") from None
        params = method.params.model_validate(request.params)
        try:
            model = runtime.registry.get(request.model)
        except UnknownModelError:
            raise JobFailure("unknown_model", f"this worker has no model {request.model!r}") from None
        data = connection.get(image_key(job.id))
        if data is None:
            raise JobFailure("image_expired", "the uploaded image expired before a worker took the job")
        image = image_from_png(data)
        reporter(0.0, "running")
        result = method.run(model, image, request.target, params, reporter)
        result.setdefault("timing_ms", {})["job"] = round((time.perf_counter() - started) * 1e3, 2)
        reporter.save(progress=1.0, stage="done")
    except JobCanceled:
        reporter.save(stage="canceled")
        result = {CANCELED_MARKER: True}
    except JobFailure as exc:
        _fail(reporter, exc.code, exc.message)
        raise
    except ExplainError as exc:
        _fail(reporter, exc.code, exc.message)
        raise
    except ValidationError as exc:
        _fail(reporter, "invalid_parameter", "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'params'}: {err['msg']}" for err in exc.errors()))
        raise
    except JobTimeoutException:
        _fail(reporter, "timeout", f"the job exceeded its time limit of {job.timeout} s")
        raise
    except Exception as exc:
        logger.exception("job %s failed", job.id)
        _fail(reporter, "job_failed", f"{type(exc).__name__}: {exc}"[:500])
        raise
    except BaseException:
        ended = False  # cold shutdown: the job may be retried, which needs the image
        raise
    finally:
        if ended:
            connection.delete(image_key(job.id), cancel_key(job.id))
    return result
