"""Bounded parsing of JSON that clients send in form fields (a job's ``params``).

Size and nesting are checked before :func:`json.loads` runs: the size in UTF-8 bytes, the
nesting by one linear scan that counts open ``[`` / ``{`` outside string literals. A hostile
document therefore never reaches the decoder's recursion (no ``RecursionError``, no 500) and
never costs more than one pass over a bounded text.
"""

from __future__ import annotations

import json
from typing import Any

from app.errors import ApiError

__all__ = ["nesting_depth", "parse_json_object"]

_OPEN, _CLOSE = frozenset("[{"), frozenset("]}")
_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
               type(None): "null"}


def nesting_depth(text: str, limit: int) -> int:
    """The deepest ``[`` / ``{`` nesting of ``text``, ignoring brackets inside strings.

    Stops early once the depth passes ``limit`` (returning that depth), so the cost is one pass
    at most. Unbalanced text is left for the decoder to reject."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in _OPEN:
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    return deepest
        elif char in _CLOSE:
            depth -= 1
    return deepest


def _refuse_constant(name: str) -> Any:
    """``NaN`` / ``Infinity`` are not JSON; the decoder accepts them unless told otherwise."""
    raise ValueError(f"{name} is not a JSON value")


def _invalid(field: str, reason: str) -> ApiError:
    return ApiError(422, "invalid_parameter", f"{field} {reason}")


def parse_json_object(text: str | None, *, field: str, max_bytes: int, max_depth: int) -> dict[str, Any]:
    """The JSON object in ``text`` (``{}`` when it is missing or blank), or a 422 ``invalid_parameter``
    naming ``field`` and the limit it broke: too many bytes, too deep, not JSON, not an object."""
    if text is None or not text.strip():
        return {}
    if len(text) > max_bytes or len(text.encode("utf-8", "surrogatepass")) > max_bytes:
        raise _invalid(field, f"is larger than {max_bytes} bytes (UNBOX_MAX_JSON_BYTES)")
    if nesting_depth(text, max_depth) > max_depth:
        raise _invalid(field, f"is nested deeper than {max_depth} levels (UNBOX_MAX_JSON_DEPTH)")
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise _invalid(field, f"is not valid JSON: {exc.msg} at character {exc.pos}") from None
    except RecursionError:  # not reachable past the depth check; kept so that it can never be a 500
        raise _invalid(field, f"is nested deeper than {max_depth} levels (UNBOX_MAX_JSON_DEPTH)") from None
    except ValueError as exc:  # NaN / Infinity, integers longer than Python's digit limit
        raise _invalid(field, f"is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise _invalid(field, f"must be a JSON object, not {_JSON_KINDS.get(type(value), 'that')}")
    return value
