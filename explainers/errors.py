"""Errors an explainer raises for requests it cannot serve (the caller maps them to 4xx)."""

from __future__ import annotations


class ExplainError(ValueError):
    """A request the method cannot honour; ``code`` is a stable machine-readable reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
