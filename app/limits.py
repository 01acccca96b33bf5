"""Limits on request bodies, as ASGI middleware: their size, how long they may stall, how many
are received at once; plus the HTTP server options that go with them.

Size (:class:`BodySizeLimit`). A declared ``Content-Length`` over the limit is answered 413 at
once, without reading the body. A body streamed without one is counted as it arrives; the read
that crosses the limit raises a 413 ``HTTPException``, which the error handlers render (FastAPI
re-raises HTTP exceptions from form parsing unchanged), so at most ``limit`` bytes are ever
buffered.

Stalls and crowds (:class:`UploadGuard`). Every read of a body chunk is given a deadline. A read
that passes it raises :class:`UploadTimeout` into whatever is reading (FastAPI's form parsing,
an endpoint); whatever the application then answers, the guard replaces it with its own 408
``upload_timeout`` carrying ``Connection: close``, so that the server closes the socket and a
client that stopped sending holds nothing. Beyond ``max_concurrent`` bodies being received, a
request is answered 503 ``too_many_uploads`` with ``Retry-After`` before its body is read.
Requests without a body (health checks, job polling) are never counted or timed.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import error_response
from app.settings import Settings

__all__ = ["BodySizeLimit", "UploadGuard", "UploadTimeout", "uvicorn_options"]

MAX_HEADER_BYTES = 16 * 1024  # request line plus headers; longer ones get uvicorn's 400


class BodySizeLimit:
    """``max_body_bytes`` for every request, except the paths of ``path_limits`` (a study's archive)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, path_limits: dict[str, int] | None = None) -> None:
        self.app = app
        self.default_bytes = max_body_bytes
        self.path_limits = path_limits or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.path_limits.get(scope.get("path", ""), self.default_bytes)
        message = f"the request body exceeds {limit} bytes"
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > limit:
                    response = error_response(413, "upload_too_large", message, {"Connection": "close"})
                    await response(scope, receive, send)
                    return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413, message)
            return message

        await self.app(scope, counting_receive, send)


class UploadTimeout(HTTPException):
    """A body read waited past its deadline. An ``HTTPException`` so that FastAPI's form parsing
    passes it on unchanged and no handler logs it as a crash; :class:`UploadGuard` answers it."""

    def __init__(self, seconds: float) -> None:
        super().__init__(408, _timeout_message(seconds), headers={"Connection": "close"})


def _timeout_message(seconds: float) -> str:
    return (f"the request body stopped arriving: no data for {seconds:g} s (UNBOX_UPLOAD_READ_TIMEOUT_S); "
            "the connection is closed")


def has_body(scope: Scope) -> bool:
    """Whether the request announces a body: a non-zero Content-Length or a Transfer-Encoding."""
    for name, value in scope.get("headers", ()):
        if name == b"transfer-encoding":
            return True
        if name == b"content-length":
            return value.strip() not in (b"0", b"")
    return False


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


class _Upload:
    """One request's body reads (each with a deadline) and its answer (replaced by the 408
    once a read timed out)."""

    def __init__(self, receive: Receive, send: Send, read_timeout_s: float, release: Any) -> None:
        self._receive, self._send = receive, send
        self.read_timeout_s = read_timeout_s
        self._release = release
        self.complete = self.timed_out = self.started = self.answered = False

    def release(self) -> None:
        """Give back the upload slot, once."""
        if self._release is not None:
            self._release()
            self._release = None

    async def receive(self) -> Message:
        if self.timed_out:
            return {"type": "http.disconnect"}  # the request is over for the application too
        if self.complete:
            return await self._receive()  # disconnect detection: no deadline
        try:
            message = await asyncio.wait_for(self._receive(), self.read_timeout_s)
        except asyncio.TimeoutError:
            self.timed_out = True
            self.release()
            raise UploadTimeout(self.read_timeout_s) from None
        if message["type"] != "http.request" or not message.get("more_body", False):
            self.complete = True
            self.release()
        return message

    async def send(self, message: Message) -> None:
        if self.answered:
            return  # the 408 went out instead
        if self.timed_out and not self.started:
            await self.answer_timeout()  # instead of what the application answers
            return
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)

    async def answer_timeout(self) -> None:
        """Send the 408 (once); ``Connection: close`` makes the server close the socket."""
        if self.answered or self.started:
            return  # already answered (or the application's answer had begun)
        self.answered = True
        response = error_response(408, "upload_timeout", _timeout_message(self.read_timeout_s),
                                  {"Connection": "close"})
        await response({"type": "http"}, _no_receive, self._send)


class UploadGuard:
    """Per-read deadline on request bodies (408) and a cap on bodies received at once (503)."""

    def __init__(self, app: ASGIApp, read_timeout_s: float, max_concurrent: int) -> None:
        self.app = app
        self.read_timeout_s = read_timeout_s
        self.max_concurrent = max_concurrent
        self.receiving = 0  # one event loop: no lock needed

    def _release(self) -> None:
        self.receiving -= 1

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not has_body(scope):
            await self.app(scope, receive, send)
            return
        if self.receiving >= self.max_concurrent:
            await self._refuse(scope, send)
            return
        self.receiving += 1
        upload = _Upload(receive, send, self.read_timeout_s, self._release)
        try:
            await self.app(scope, upload.receive, upload.send)
        except UploadTimeout:
            pass  # answered below
        finally:
            upload.release()
        if upload.timed_out:
            await upload.answer_timeout()

    async def _refuse(self, scope: Scope, send: Send) -> None:
        message = (f"{self.max_concurrent} uploads are being received (UNBOX_MAX_CONCURRENT_UPLOADS); "
                   "retry shortly")
        response = error_response(503, "too_many_uploads", message, {"Retry-After": "1", "Connection": "close"})
        await response(scope, _no_receive, send)


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run`` that bound what a client can hold: idle keep-alive
    connections close after ``keep_alive_timeout_s``, request headers are capped in size."""
    return {"timeout_keep_alive": settings.keep_alive_timeout_s,
            "h11_max_incomplete_event_size": MAX_HEADER_BYTES}
