"""The FastAPI application factory."""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from app.errors import install_error_handlers
from app.jobs import JobsClient
from app.jobs import router as jobs_router
from app.jobs import workers_router
from app.limits import BodySizeLimit, UploadGuard
from app.metrics import Metrics, MetricsMiddleware
from app.pages import pages_router
from app.routes import router
from app.service import InferenceService
from app.settings import Settings, SettingsError, load_settings
from models.catalog import CatalogError, load_catalog
from models.registry import ModelRegistry
from workers.warmup import warm_fast_paths, warm_onnx_runtime

logger = logging.getLogger("unbox")
MULTIPART_SLACK_BYTES = 64 * 1024  # form fields and part headers around the image


def _load_startup_models(registry: ModelRegistry, names: list[str], settings: Settings | None = None,
                         warming: set[str] | None = None) -> None:
    """Load (and, with ``settings``, warm) each start-up model, removing it from ``warming``
    when done, so that readiness waits for the warm-up as well as the load."""
    for name in names:
        try:
            model = registry.get(name)
            logger.info("model %s loaded", name)
            if settings is not None:
                warm_fast_paths(model, settings)
                warm_onnx_runtime(model, settings, sag=False)
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
    settings.apply_to_torch()
    registry = ModelRegistry(specs, settings.resolved_device())
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = threading.Thread(target=_load_startup_models,
                                  args=(registry, settings.models, settings, app.state.service.warming),
                                  name="unbox-model-loader", daemon=True)
        loader.start()
        yield
        app.state.jobs.close()

    app = FastAPI(
        title="Unbox",
        version="0.1.0",
        summary="Predictions with the heat maps that explain them.",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.service = InferenceService(settings, registry, metrics)
    app.state.jobs = JobsClient(settings, app.state.service)  # Redis connects lazily, per call
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(jobs_router)
    app.include_router(workers_router)
    app.include_router(pages_router)
    _mount_offline_docs(app)
    app.add_middleware(BodySizeLimit, max_body_bytes=settings.max_upload_bytes + MULTIPART_SLACK_BYTES)
    app.add_middleware(UploadGuard, read_timeout_s=settings.upload_read_timeout_s,
                       max_concurrent=settings.max_concurrent_uploads)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


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
