"""The API's settings: the shared core (``workers.settings``) plus the HTTP front end's own."""

from __future__ import annotations

from pydantic import Field, ValidationError

from workers.settings import CoreSettings, SettingsError, readable_settings_error

__all__ = ["Settings", "SettingsError", "load_settings"]


class Settings(CoreSettings):
    """All configuration of the API process; every field is an ``UNBOX_*`` variable."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(50_000_000, ge=1)
    max_concurrent_inference: int = Field(1, ge=1, le=64)


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment, turning validation errors into one readable message."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise readable_settings_error(exc) from None
