"""One way to say what failed validation: ``field: message`` parts joined by ``; ``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

SKIPPED_LOCATION_PARTS = ("body", "query", "form", "path", "header")


def location(parts: Iterable[Any]) -> str:
    """A pydantic error location as a dotted field name (request-part prefixes dropped)."""
    return ".".join(str(part) for part in parts if part not in SKIPPED_LOCATION_PARTS)


def validation_error_parts(errors: Iterable[Mapping[str, Any]], default_field: str = "request",
                           field_name: Callable[[str], str] = str,
                           shown_input: Callable[[str, Any], str] | None = None) -> list[str]:
    """pydantic's ``errors()`` as ``field: message`` per error (``field_name`` renames fields,
    e.g. to environment variables; ``shown_input`` appends what was given)."""
    parts = []
    for error in errors:
        raised = (error.get("ctx") or {}).get("error")
        described = getattr(raised, "message", None)
        if isinstance(described, str) and not error.get("loc"):  # a config that described its own errors
            parts.append(described)
            continue
        field = location(error.get("loc", ())) or default_field
        text = f"{field_name(field)}: {error.get('msg')}"
        if shown_input is not None:
            text += f" (got {shown_input(field, error.get('input'))})"
        parts.append(text)
    return parts


def describe_validation_errors(errors: Iterable[Mapping[str, Any]], default_field: str = "request") -> str:
    """:func:`validation_error_parts` as one line."""
    return "; ".join(validation_error_parts(errors, default_field)) or f"invalid {default_field}"


__all__ = ["describe_validation_errors", "location", "validation_error_parts"]
