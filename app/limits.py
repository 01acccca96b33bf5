"""Refuse oversize request bodies before they are held: ASGI middleware counting body bytes.

A declared ``Content-Length`` over the limit is answered 413 at once, without reading the body.
A body streamed without one is counted as it arrives; the read that crosses the limit raises a
413 ``HTTPException``, which the error handlers render (FastAPI re-raises HTTP exceptions from
form parsing unchanged), so at most ``limit`` bytes are ever buffered.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import error_response


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    def _message(self) -> str:
        return f"the request body exceeds {self.max_body_bytes} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.max_body_bytes:
                    response = error_response(413, "upload_too_large", self._message(), {"Connection": "close"})
                    await response(scope, receive, send)
                    return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, counting_receive, send)
