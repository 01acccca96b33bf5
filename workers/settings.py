"""Settings shared by every Unbox process (API, worker, CLI), from ``UNBOX_*`` variables.

The worker side needs these without importing the HTTP front end; the API's own settings
(:class:`app.settings.Settings`) extend this class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class SettingsError(RuntimeError):
    """Raised when the environment holds an invalid setting; the message is for humans."""


class CoreSettings(BaseSettings):
    """Configuration shared by the API and the workers."""

    model_config = SettingsConfigDict(env_prefix="UNBOX_", extra="ignore")

    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'")
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["efficientnet_lite0"],
        description="models loaded at start-up (comma-separated); others load on first use",
    )
    catalog: Path | None = Field(None, description="TOML catalogue file adding models")
    overlay_max_side: int = Field(1024, ge=16, le=8192)
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


def readable_settings_error(exc: ValidationError) -> SettingsError:
    """One message naming each bad ``UNBOX_*`` variable."""
    lines = []
    for err in exc.errors():
        field = ".".join(str(part) for part in err["loc"]) or "settings"
        lines.append(f"  UNBOX_{field.upper()}: {err['msg']} (got {err.get('input')!r})")
    return SettingsError("invalid settings:\n" + "\n".join(lines))


def load_core_settings(**overrides: object) -> CoreSettings:
    try:
        return CoreSettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise readable_settings_error(exc) from None
