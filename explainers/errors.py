"""Errors an explainer raises for requests it cannot serve (the caller maps them to 4xx)."""

from __future__ import annotations

from core.errors import UnboxError


class ExplainError(UnboxError, ValueError):
    """A request the method cannot honour; ``code`` is a stable machine-readable reason."""
