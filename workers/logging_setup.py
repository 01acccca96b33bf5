"""Logging of every Unbox process, configured once: text lines or one JSON object per line.

``unbox api``, ``unbox serve`` and ``unbox worker`` call :func:`configure_logging` at start-up
(``UNBOX_LOG_LEVEL``, ``UNBOX_LOG_FORMAT``); it gives the root logger one handler on stderr, so
the ``unbox`` loggers and uvicorn's (run with ``log_config=None``) all print the same way.

The two context variables say what a line is about: ``request_id_var`` is the HTTP request's
``X-Request-ID`` (set by the API's middleware; a worker sets it to the id of the request that
submitted the job it runs) and ``job_id_var`` the job a worker is running. The JSON format adds
them to every line written while they are set. Both sides import them from here, since
``workers`` never imports ``app``. Any Redis URL in a line has its password masked.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import IO, Any, Literal

from workers.redis_url import mask_urls

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
HANDLER_NAME = "unbox"

request_id_var: ContextVar[str | None] = ContextVar("unbox_request_id", default=None)
job_id_var: ContextVar[str | None] = ContextVar("unbox_job_id", default=None)

# Attributes every LogRecord has; anything else on a record came from ``extra=`` and is kept.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
_DROPPED = frozenset({"color_message"})  # uvicorn's ANSI-coloured copy of the message


class TextFormatter(logging.Formatter):
    """The classic one-line format, Redis passwords masked."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        return mask_urls(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id / job_id when set, the
    record's ``extra`` fields, and ``exc_info`` as the formatted traceback."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, var in (("request_id", request_id_var), ("job_id", job_id_var)):
            value = getattr(record, name, None) or var.get()
            if value:
                entry[name] = value
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in _DROPPED and not key.startswith("_"):
                entry.setdefault(key, value)
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return mask_urls(json.dumps(entry, default=str, ensure_ascii=False))


def configure_logging(level: str = "info", log_format: LogFormat = "text", stream: IO[str] | None = None) -> None:
    """Give the root logger Unbox's handler (once per process; a second call only changes its
    level and format) so every logger, ``unbox.*`` and uvicorn's included, prints through it."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if h.get_name() == HANDLER_NAME), None)
    if handler is None:
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.set_name(HANDLER_NAME)
        root.addHandler(handler)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root.setLevel(level.upper())
    logging.getLogger("unbox").setLevel(logging.NOTSET)  # follows the root's level
