"""The dashboard: ``/`` serves the page, ``/dashboard/studies/{id}`` a study's page, ``/static/...``
their CSS, JavaScript modules and samples.

The page is plain files shipped in the package (``app/static``, no build step) and talks to
the public API like any other client, so this router only serves files. Paths are resolved
inside the static folder; anything else is a JSON 404 like every other API error.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from app.errors import ApiError

STATIC_DIR = Path(__file__).resolve().parent / "static"

# Explicit types: ES modules must be served as JavaScript whatever the host's mimetypes say.
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
}
# Revalidate each time (ETag / Last-Modified make that cheap) so an upgrade is seen at once.
CACHE_HEADERS = {"Cache-Control": "no-cache"}

pages_router = APIRouter(include_in_schema=False)


def static_file(relative: str) -> Path:
    """The file ``relative`` inside the static folder; a 404 ``ApiError`` for anything else."""
    candidate = (STATIC_DIR / relative).resolve()
    if not candidate.is_relative_to(STATIC_DIR) or not candidate.is_file() \
            or candidate.suffix.lower() not in MEDIA_TYPES:
        raise ApiError(404, "not_found", f"no static file {relative!r}")
    return candidate


def _file_response(path: Path) -> FileResponse:
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix.lower()], headers=CACHE_HEADERS)


@pages_router.api_route("/", methods=["GET", "HEAD"])
def dashboard() -> FileResponse:
    """The dashboard page."""
    return _file_response(static_file("index.html"))


@pages_router.api_route("/dashboard/studies/{study_id}", methods=["GET", "HEAD"])
def study_page(study_id: str) -> FileResponse:
    """A study's page. Its script reads the id from the address and asks ``/v1/studies/{id}``,
    which answers 404 for an unknown one, so the id is not checked here."""
    return _file_response(static_file("study.html"))


@pages_router.api_route("/static/{relative:path}", methods=["GET", "HEAD"])
def static(relative: str) -> FileResponse:
    """A file of the dashboard (stylesheet, module, sample photo)."""
    return _file_response(static_file(relative))
