"""Service settings, read from environment variables with the prefix ``UNBOX_``.

Every knob of the service lives here; nothing reads the environment elsewhere. Invalid values
fail at start-up with a readable message (see :func:`load_settings`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class SettingsError(RuntimeError):
    """Raised when the environment holds an invalid setting; the message is for humans."""


class Settings(BaseSettings):
    """All configuration of an Unbox process (API, worker or CLI)."""

    model_config = SettingsConfigDict(env_prefix="UNBOX_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'")
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["efficientnet_lite0"],
        description="models loaded at start-up (comma-separated); others load on first use",
    )
    catalog: Path | None = Field(None, description="TOML catalogue file adding models")
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(50_000_000, ge=1)
    overlay_max_side: int = Field(1024, ge=16, le=8192)
    max_concurrent_inference: int = Field(1, ge=1, le=64)
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads; default torch's")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        if value in ("auto", "cpu", "cuda", "mps") or (
            value.startswith("cuda:") and value[5:].isdigit()
        ):
            return value
        raise ValueError("must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")

    @field_validator("catalog")
    @classmethod
    def _check_catalog(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"catalogue file {value} does not exist")
        return value

    def resolved_device(self) -> str:
        """The torch device string to use; fails when an explicit CUDA device is absent."""
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise SettingsError(f"UNBOX_DEVICE={self.device} but no CUDA device is available")
        return self.device


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment, turning validation errors into one readable message."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = ".".join(str(part) for part in err["loc"]) or "settings"
            lines.append(f"  UNBOX_{field.upper()}: {err['msg']} (got {err.get('input')!r})")
        raise SettingsError("invalid settings:\n" + "\n".join(lines)) from None
