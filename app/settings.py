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


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment, turning validation errors into one readable message."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise readable_settings_error(exc) from None
