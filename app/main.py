"""The FastAPI application factory."""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from app import package_version
from app.api_keys import KeyFileError, KeyRing
from app.auth import AuthMiddleware
from app.errors import install_error_handlers
from app.jobs import JobsClient
from app.jobs import router as jobs_router
from app.jobs import workers_router
from app.limits import BodySizeLimit, UploadGuard
from app.metrics import Metrics, MetricsMiddleware
from app.openapi import install_openapi
from app.pages import pages_router
from app.studies import StudiesClient
from app.studies import router as studies_router
from app.rate_limits import RateLimiter, RateLimitMiddleware
from app.request_ids import RequestIds
from app.routes import router
from app.service import InferenceService
from app.settings import Settings, SettingsError, load_settings
from models.catalog import CatalogError, load_catalog
from models.registry import ModelRegistry

logger = logging.getLogger("unbox")
MULTIPART_SLACK_BYTES = 64 * 1024  # form fields and part headers around the image
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
CORS_METHODS = ["GET", "POST", "DELETE"]
CORS_REQUEST_HEADERS = ["Authorization", "Content-Type", "Idempotency-Key", "X-Request-ID", "Accept"]
CORS_RESPONSE_HEADERS = ["Location", "Retry-After", "RateLimit", "RateLimit-Policy", "X-Request-ID",
                         "Idempotent-Replayed", "X-Unbox-Target", "X-Unbox-Label", "WWW-Authenticate"]


def _load_startup_models(registry: ModelRegistry, names: list[str], warming: set[str] | None = None) -> None:
    """Load each start-up model (its execution warms as it loads), removing it from ``warming``
    when done, so that readiness waits for the warm-up as well as the load."""
    for name in names:
        try:
            registry.get(name)
            logger.info("model %s loaded", name)
        except Exception as exc:  # reported by /readyz and /v1/models
            logger.error("model %s failed to load: %s", name, exc)
        finally:
            if warming is not None:
                warming.discard(name)


def create_app(settings: Settings | None = None) -> FastAPI:
    """A ready-to-serve app; models listed in ``settings.models`` load in the background."""
    settings = settings or load_settings()
    try:
        specs = load_catalog(settings.catalog)
    except CatalogError as exc:
        raise SettingsError(str(exc)) from None
    unknown = [name for name in settings.models if name not in specs]
    if unknown:
        raise SettingsError(f"UNBOX_MODELS names unknown models {unknown}; known: {sorted(specs)}")
    keyring = _keyring(settings)
    settings.apply_to_torch()
    registry = ModelRegistry(specs, settings.resolved_device(), settings.execution_policy())
    metrics = Metrics(settings)  # with a Redis configured, the queue's numbers too (read at scrape time)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = threading.Thread(target=_load_startup_models,
                                  args=(registry, settings.models, app.state.service.warming),
                                  name="unbox-model-loader", daemon=True)
        loader.start()
        yield
        app.state.jobs.close()
        await app.state.rate_limiter.close()
        metrics.close()

    app = FastAPI(
        title="Unbox",
        version=package_version(),
        summary="Predictions with the heat maps that explain them.",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.service = InferenceService(settings, registry, metrics)
    app.state.jobs = JobsClient(settings, app.state.service)  # Redis connects lazily, per call
    app.state.studies = StudiesClient(app.state.jobs)
    app.state.rate_limiter = RateLimiter(settings.redis_url)
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(jobs_router)
    app.include_router(workers_router)
    app.include_router(studies_router)
    app.include_router(pages_router)
    _mount_offline_docs(app)
    install_openapi(app)  # the document says what this server (its catalogue, its job methods) does
    app.add_middleware(BodySizeLimit, max_body_bytes=settings.max_upload_bytes + MULTIPART_SLACK_BYTES,
                       path_limits={"/v1/studies": settings.study_max_archive_bytes + MULTIPART_SLACK_BYTES})
    app.add_middleware(UploadGuard, read_timeout_s=settings.upload_read_timeout_s,
                       max_concurrent=settings.max_concurrent_uploads)
    app.add_middleware(RateLimitMiddleware, limiter=app.state.rate_limiter)
    app.add_middleware(AuthMiddleware, settings=settings, keyring=keyring)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=CORS_METHODS,
                           allow_headers=CORS_REQUEST_HEADERS, expose_headers=CORS_RESPONSE_HEADERS, max_age=600)
    app.add_middleware(RequestIds)  # added last: the outermost, so every response carries X-Request-ID
    return app


def _keyring(settings: Settings) -> KeyRing | None:
    """The API keys, or ``None`` (authentication off, said loudly when others can connect)."""
    if settings.api_keys_file is None:
        if settings.host not in LOOPBACK_HOSTS:
            logger.warning("AUTHENTICATION IS OFF and the API listens on %s: anyone who reaches it can read "
                           "every job and its pictures. Set UNBOX_API_KEYS_FILE and create keys with "
                           "`unbox keys add NAME` (see the README's security model).", settings.host)
        return None
    try:
        keyring = KeyRing(settings.api_keys_file)
    except KeyFileError as exc:
        raise SettingsError(f"UNBOX_API_KEYS_FILE: {exc}") from None
    if not keyring.keys:  # fail closed, and let `unbox keys add` open it without a restart
        logger.warning("UNBOX_API_KEYS_FILE %s %s: every /v1 request gets 401 until `unbox keys add NAME` "
                       "creates a key", settings.api_keys_file,
                       "holds no keys" if settings.api_keys_file.exists() else "does not exist yet")
    return keyring


def _mount_offline_docs(app: FastAPI) -> None:
    """Swagger UI served from the package's own copy, so /docs works without network."""
    from swagger_ui_bundle import swagger_ui_path

    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title="Unbox API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")
