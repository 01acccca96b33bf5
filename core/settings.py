"""Settings shared by every Unbox process (API, worker, CLI), from ``UNBOX_*`` variables.

The worker side needs these without importing the HTTP front end; the API's own settings
(:class:`app.settings.Settings`) extend this class.
"""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from core.validation import validation_error_parts

if TYPE_CHECKING:
    from explainers.execution import ExecutionPolicy


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
    cudnn_benchmark: bool = Field(False, description="let cuDNN time its kernels per input shape (CUDA): "
                                  "about 5 % off I-GOS++ on an H200, but the first request of every new "
                                  "batch shape pays seconds (SAG's first run on one photo took over 80 s)")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = Field("text", description="text lines, or one JSON object per line "
                                                "(time, level, logger, message, request_id, job_id)")

    # --- Score-CAM and the GPU fast path (API and workers run the same explainers) ---
    scorecam_memory_mb: int = Field(512, ge=16, description="device memory one Score-CAM batch of masked "
                                    "forwards may use; sets the batch size")
    scorecam_channels: int = Field(32, ge=0, description="channels the synchronous Score-CAM scores by default "
                                   "(fast mode); 0 = all channels (exact)")
    fast_precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="precision of every explainer's forwards: auto = fp32 on the CPU and on CUDA fp16 "
        "(scores, layer gradients) or bf16 (I-GOS's path gradients); fp16 / bf16 everywhere they apply")
    fast_channels_last: bool = Field(True, description="NHWC inputs/weights for explainer forwards")
    fast_compile: bool = Field(False, description="torch.compile the fixed-shape forwards and I-GOS's "
                               "network (CUDA only; workers compile I-GOS at start-up, ~35 s per shape)")
    fast_cuda_graphs: bool = Field(True, description="CUDA-graph replay of fixed-shape forwards and "
                                   "Grad-CAM's forward + backward (CUDA only)")
    fast_warmup: bool = Field(True, description="compile/capture at start-up so no request pays for it")
    cpu_runtime: Literal["auto", "torch", "onnxruntime"] = Field(
        "auto", description="runtime of forward-only explainer batches on a CPU (SAG's patch sets, Score-CAM's "
        "masked images, I-GOS's line-search trials, deletion / insertion curves): auto = ONNX Runtime when "
        "installed (about 1.5x PyTorch's eager forwards on efficientnet_lite0), else PyTorch")

    def execution_policy(self) -> ExecutionPolicy:
        """How explainers' forwards run under these settings (imported lazily: settings stay light)."""
        from explainers.execution import ExecutionPolicy

        return ExecutionPolicy(precision=self.fast_precision, channels_last=self.fast_channels_last,
                               compile=self.fast_compile, cuda_graphs=self.fast_cuda_graphs,
                               cpu_runtime=self.cpu_runtime, memory_budget_mb=self.scorecam_memory_mb,
                               warmup=self.fast_warmup)

    # --- job queue (Redis): shared by the API, the workers and `unbox serve` ---
    redis_url: str | None = Field(None, description="redis://host:port/db; unset: `unbox serve` embeds one")
    embedded_redis_max_memory_mb: int = Field(1024, ge=16, description="maxmemory of the Redis `unbox serve` "
                                              "embeds (noeviction: a full Redis refuses new jobs with 503)")
    redis_timeout_s: float = Field(2.0, gt=0, le=60, description="connect/command timeout towards Redis")
    queue_name: str = Field("unbox", min_length=1, pattern=r"^[A-Za-z0-9_.-]{1,64}$",
                            description="the queue jobs go to and workers take from")
    job_result_ttl_s: int = Field(24 * 3600, ge=1, description="how long a finished job and its result are kept")
    job_image_ttl_s: int = Field(24 * 3600, ge=60, description="how long an uploaded image waits for its job")
    max_queue_length: int = Field(1000, ge=1, description="queued jobs beyond this are refused with 503")
    job_inline_picture_max_bytes: int = Field(64 * 1024, ge=0, description="a result picture larger than this "
                                              "is stored beside the result, behind a link (0: every picture)")
    job_result_max_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="largest result JSON kept (after "
                                      "its large pictures moved out); a larger one fails with result_too_large")
    job_files_max_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="largest total of one result's "
                                     "stored pictures")
    job_timeouts: dict[str, int] = Field(default_factory=dict,
                                         description='per-method timeout overrides in s, JSON: {"igos++": 900}')
    job_method_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="extra modules registering job methods (comma-separated)")
    serve_workers: int = Field(1, ge=1, le=64, description="worker processes `unbox serve` starts and restarts "
                               "when they die (each loads its own models)")
    worker_heartbeat_s: float = Field(2.0, gt=0, le=60,
                                      description="how often a worker renews its job's lease; silent for about 3 "
                                      "beats (on Redis's clock, never across a Redis stall) it is presumed dead and "
                                      "its job is retried once")
    webhook_secret: SecretStr | None = Field(None, description="Standard Webhooks secret: whsec_ + base64 of "
                                             "24 to 64 random bytes; unset: jobs with a callback_url get 422")
    webhook_max_attempts: int = Field(6, ge=1, le=20)
    webhook_backoff_s: float = Field(2.0, gt=0, description="first retry delay; doubles per attempt (cap 10 min)")
    webhook_timeout_s: float = Field(10.0, gt=0, le=120)
    webhook_allow_networks: Annotated[list[IPv4Network | IPv6Network], NoDecode] = Field(
        default_factory=list, description="networks callbacks may reach although not public (comma-separated "
        "CIDRs, e.g. 10.20.0.0/16 for on-premise receivers); cloud metadata addresses stay refused")

    @field_validator("webhook_secret", mode="before")
    @classmethod
    def _check_webhook_secret(cls, value: object) -> object:
        from workers.webhooks import GENERATE_SECRET, signing_key

        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if text is None or (isinstance(text, str) and not text.strip()):
            return None
        if not isinstance(text, str):
            raise ValueError("must be a string")
        try:
            signing_key(text.strip())
        except ValueError as exc:
            raise ValueError(f"{exc}; generate one with: {GENERATE_SECRET}") from None
        return text.strip()

    @field_validator("webhook_allow_networks", mode="before")
    @classmethod
    def _parse_allow_networks(cls, value: object) -> object:
        from workers.callback_guard import parse_networks

        return parse_networks(value) if isinstance(value, str) else value

    @field_validator("job_method_modules", "models", mode="before")
    @classmethod
    def _split_names(cls, value: object) -> object:
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

    def apply_to_torch(self) -> None:
        """Process-wide torch switches from these settings (threads, cuDNN kernel choice)."""
        import torch

        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        torch.backends.cudnn.benchmark = self.cudnn_benchmark


def readable_settings_error(exc: ValidationError) -> SettingsError:
    """One message naming each bad ``UNBOX_*`` variable (a secret's value is never shown)."""
    parts = validation_error_parts(exc.errors(), "settings", lambda field: f"UNBOX_{field.upper()}",
                                   lambda field, given: "(hidden)" if "secret" in field else repr(given))
    return SettingsError("invalid settings:\n" + "\n".join(f"  {part}" for part in parts))


def load_core_settings(**overrides: object) -> CoreSettings:
    try:
        return CoreSettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise readable_settings_error(exc) from None
