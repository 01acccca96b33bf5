"""The API's settings: the shared core (``core.settings``) plus the HTTP front end's own."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import NoDecode

from core.settings import CoreSettings, SettingsError, readable_settings_error

__all__ = ["Settings", "SettingsError", "load_settings"]


class Settings(CoreSettings):
    """All configuration of the API process; every field is an ``UNBOX_*`` variable."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(50_000_000, ge=1)
    max_concurrent_inference: int = Field(1, ge=1, le=64)
    max_json_bytes: int = Field(64 * 1024, ge=256, description="largest JSON form field (a job's params), "
                                "in UTF-8 bytes; larger ones get 422")
    max_json_depth: int = Field(32, ge=2, le=200, description="deepest nesting of arrays and objects in a JSON "
                                "form field; deeper ones get 422 before they are decoded")
    upload_read_timeout_s: float = Field(10.0, gt=0, le=3600, description="longest wait for the next chunk of "
                                         "a request body; a stalled upload gets 408 and its connection is closed")
    keep_alive_timeout_s: int = Field(5, ge=1, le=3600, description="seconds an idle keep-alive connection "
                                      "stays open; behind a load balancer, more than the balancer's idle timeout")
    max_concurrent_uploads: int = Field(64, ge=1, description="request bodies received at once; beyond it a "
                                        "request gets 503 too_many_uploads (Retry-After) without being read")
    sync_scorecam_max_channels: int = Field(256, ge=1, description="most channels a synchronous Score-CAM "
                                            "(/v1/explain) may score; more (or 'all' on a wider layer) gets "
                                            "422 too_costly: queue it with POST /v1/jobs method scorecam")

    # --- studies (POST /v1/studies) ---
    study_max_archive_bytes: int = Field(256 * 1024 * 1024, ge=1024, description="largest study archive upload")
    study_max_unpacked_bytes: int = Field(1024 * 1024 * 1024, ge=1024, description="largest total of an archive's "
                                          "members once unpacked (zip bombs are refused before this)")
    study_max_files: int = Field(2000, ge=1, description="most files in a study archive (and rows in its manifest)")
    study_max_items: int = Field(20000, ge=1, description="most items (images x models x methods) in one study")
    max_active_studies_per_key: int = Field(4, ge=0, description="studies one key (one client address with keys "
                                            "off) may have running at once; 0: no limit")
    study_max_queued_items: int = Field(200_000, ge=1, description="study items waiting at once, over all studies; "
                                        "beyond it a study gets 503 queue_full")

    # --- tenants and trust ---
    api_keys_file: Path | None = Field(None, description="TOML file of API keys (`unbox keys add`); set: every "
                                       "/v1 route needs Authorization: Bearer KEY; unset: no authentication")
    metrics_need_key: bool = Field(True, description="with API keys on, GET /metrics needs a key with the admin "
                                   "scope (false: open, e.g. to a scraper on a private network)")
    docs_need_key: bool = Field(False, description="with API keys on, /docs and /openapi.json need a key")
    rate_limit_per_minute: int = Field(120, ge=0, description="requests per minute per key (per client address "
                                       "with keys off) on /v1/predict and /v1/explain; 0: no limit; a key's "
                                       "rate_limit_per_minute overrides it")
    max_queued_jobs_per_key: int = Field(100, ge=0, description="jobs one key (one client address with keys off) "
                                         "may have queued or running at once; 0: no limit; a key's "
                                         "max_queued_jobs overrides it")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="origins allowed to call the API from a browser (comma-separated, "
        "e.g. https://dash.example.org); none by default")

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [origin.strip().rstrip("/") for origin in value.split(",") if origin.strip()]
        return value

    @field_validator("cors_origins")
    @classmethod
    def _check_origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if origin != "*" and not re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+", origin):
                raise ValueError(f"{origin!r} is not an origin (scheme://host[:port], no path)")
        return value

    @field_validator("api_keys_file")
    @classmethod
    def _check_keys_file(cls, value: Path | None) -> Path | None:
        if value is not None and value.exists() and not value.is_file():
            raise ValueError(f"{value} is not a file")
        return value


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment, turning validation errors into one readable message."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise readable_settings_error(exc) from None
