"""The error every layer speaks: a stable machine-readable ``code`` and a message for humans."""

from __future__ import annotations


class UnboxError(Exception):
    """A refusal with a ``code`` (``invalid_parameter``, ``unknown_model`` ...) and a ``message``.

    Each layer raises its own subclass (explainers ``ExplainError``, workers ``JobFailure``, the
    API ``ApiError`` with an HTTP status); the codes are one vocabulary across them."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


__all__ = ["UnboxError"]
