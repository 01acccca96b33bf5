"""Large pictures of a job's result stored beside it, behind links, instead of inline.

A result's pictures (``png``, ``overlay_png``, ``picture_png`` as base64, ``svg`` as text, at
any depth) can be megabytes for a large upload or a big graph. Each one larger than the inline
limit is moved to its own Redis key, with the result's lifetime, and its field holds the link
``/v1/jobs/{id}/files/{name}`` instead; ``result["files"]`` lists the moved pictures. So polling
a job stays cheap, and a client fetches only the pictures it shows. A link never looks like an
inline value (base64 PNG and SVG text do not start with ``/``).
"""

from __future__ import annotations

import base64
import re
from typing import Any, Callable

from workers.payload import KEY_PREFIX

PICTURE_FIELDS = {"png": "image/png", "overlay_png": "image/png", "picture_png": "image/png",
                  "svg": "image/svg+xml"}
FILE_NAME = re.compile(r"^[A-Za-z0-9_.]{1,128}$")


def file_key(job_id: str, name: str) -> str:
    return f"{KEY_PREFIX}:file:{job_id}:{name}"


def file_link(job_id: str, name: str) -> str:
    return f"/v1/jobs/{job_id}/files/{name}"


def media_type(name: str) -> str:
    """The media type of a stored picture, from the field it came from."""
    return PICTURE_FIELDS.get(name.rsplit(".", 1)[-1], "application/octet-stream")


def _raw(field: str, value: str) -> bytes:
    return value.encode("utf-8") if field == "svg" else base64.b64decode(value)


def _inline(field: str, data: bytes) -> str:
    return data.decode("utf-8") if field == "svg" else base64.b64encode(data).decode("ascii")


def _pictures(node: Any, path: str = "") -> list[tuple[dict[str, Any], str, str]]:
    """``(container, field, name)`` of every picture field under ``node``."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            name = f"{path}.{key}" if path else str(key)
            if key in PICTURE_FIELDS and isinstance(value, str):
                found.append((node, key, name))
            else:
                found.extend(_pictures(value, name))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found.extend(_pictures(value, f"{path}.{index}" if path else str(index)))
    return found


def split_files(job_id: str, result: dict[str, Any], inline_max_bytes: int) -> dict[str, bytes]:
    """Move every picture of ``result`` larger than ``inline_max_bytes`` out (in place); returns
    the moved pictures' bytes by file name."""
    files: dict[str, bytes] = {}
    listed: dict[str, dict[str, Any]] = {}
    for container, field, name in _pictures(result):
        value = container[field]
        if len(value) <= inline_max_bytes or value.startswith("/v1/"):
            continue
        data = _raw(field, value)
        files[name] = data
        container[field] = file_link(job_id, name)
        listed[name] = {"href": file_link(job_id, name), "media_type": media_type(name), "bytes": len(data)}
    if listed:
        result["files"] = listed
    return files


def inline_files(result: dict[str, Any], read: Callable[[str], bytes | None]) -> dict[str, Any]:
    """``result`` with every linked picture put back inline (``read(name)`` gives its bytes; a
    picture that expired stays a link)."""
    for container, field, name in _pictures(result):
        value = container[field]
        if value.startswith("/v1/jobs/") and "/files/" in value:
            data = read(value.rsplit("/files/", 1)[1])
            if data is not None:
                container[field] = _inline(field, data)
    result.pop("files", None)
    return result
