"""Request ids: every HTTP request gets one, and says it in its response and in the logs.

An incoming ``X-Request-ID`` is kept when it is a plain token (``REQUEST_ID_PATTERN``: letters,
digits, ``._:-``, at most 128), else a fresh uuid4 hex replaces it, so no client can put
arbitrary text into the logs. The id goes into ``request.state.request_id`` (routes pass it into
a job's payload, so the worker's log lines about the job carry it too), into the logging context
(``workers.logging_setup.request_id_var``, which the JSON log format prints) and into the
``X-Request-ID`` header of every response, errors included: a crash that nothing handled is
answered here, with the usual 500 envelope, so that even that response carries it.

One log line per request (method, route template, status, duration, id) on ``unbox.http``: at
INFO, except the probes (``/healthz``, ``/readyz``), which log at DEBUG so they do not drown
the rest. Added last in ``create_app``, this middleware wraps all the others.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import error_response
from workers.logging_setup import request_id_var
from workers.payload import REQUEST_ID_PATTERN

HEADER = "X-Request-ID"
PROBE_PATHS = frozenset({"/healthz", "/readyz"})
_VALID = re.compile(REQUEST_ID_PATTERN)

logger = logging.getLogger("unbox.http")
crash_logger = logging.getLogger("unbox.errors")


def request_id_of(scope: Scope) -> str:
    """The client's ``X-Request-ID`` when it is acceptable, else a new uuid4 hex."""
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if _VALID.fullmatch(text):
                return text
            break
    return uuid.uuid4().hex


class RequestIds:
    """Pure ASGI middleware: the request id in, on the response, in the logs; one line per request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                MutableHeaders(scope=message)[HEADER] = request_id
            await send(message)

        context = request_id_var.set(request_id)
        try:
            try:
                await self.app(scope, receive, send_with_id)
            except Exception:
                if response_started:
                    raise
                crash_logger.exception("unhandled error")
                response = error_response(500, "internal_error", "internal error; see the server log")
                await response(scope, receive, send_with_id)
        finally:
            _log_request(scope, status, started, request_id)
            request_id_var.reset(context)


def _log_request(scope: Scope, status: int, started: float, request_id: str) -> None:
    level = logging.DEBUG if scope.get("path") in PROBE_PATHS else logging.INFO
    if not logger.isEnabledFor(level):
        return
    route = getattr(scope.get("route"), "path", None) or "unmatched"  # the template, never the raw path
    method = scope.get("method", "GET")
    duration_ms = round((time.perf_counter() - started) * 1e3, 1)
    logger.log(level, "%s %s %d %.1f ms (request %s)", method, route, status, duration_ms, request_id,
               extra={"http_method": method, "route": route, "status": status, "duration_ms": duration_ms})
