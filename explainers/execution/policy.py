"""How forwards run, as one value: precision, layout, network variant, runtime, chunking.

One :class:`ExecutionPolicy` per loaded model and device, made from the ``UNBOX_FAST_*`` /
``UNBOX_CPU_RUNTIME`` settings. Methods never read it: the execution object does.

Precision has one vocabulary (``fp32``, ``fp16``, ``bf16``; ``auto``). ``auto`` is fp32 on a
CPU and, on CUDA, the reduced type each kind of pass was checked with: fp16 for forward-only
scores and a layer's gradients (10 mantissa bits; CAM-family maps stay within 0.99 correlation),
bf16 for gradients along integrated paths (their range: probabilities' gradients reach the
fp16 subnormals). An explicit ``fp16`` / ``bf16`` applies to every pass that admits reduced
precision, on any device. Deletion / insertion metrics and CAM's head check always run fp32.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, get_args

import torch

Precision = Literal["auto", "fp32", "fp16", "bf16"]
NetworkChoice = Literal["auto", "as_loaded", "folded"]
CpuRuntime = Literal["auto", "torch", "onnxruntime"]
IncrementalChoice = Literal["auto", "on", "off"]
Pass = Literal["scores", "layer_gradients", "path_gradients"]

PRECISION_NAMES = {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_REDUCED = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ExecutionPolicy:
    """Execution options; the defaults are the service's (exact fp32 on a CPU).

    ``network``: what scores images and back-propagates along paths: ``folded`` (batch norm
    folded into the convolutions, verified against the model), ``as_loaded`` (the model's own
    arithmetic), ``auto`` = folded. ``cpu_runtime``: forward-only batches on a CPU in ONNX
    Runtime (``auto``: when installed). ``incremental``: patch sets one patch away from a
    scored set run only a crop through the network's early layers (``auto``: on a CPU).
    ``images_per_forward``: a fixed chunk size instead of the device's. ``memory_budget_mb``:
    device memory one batch of masked forwards may take (Score-CAM's batch size).
    """

    precision: Precision = "auto"
    channels_last: bool = True
    compile: bool = False
    cuda_graphs: bool = False
    cpu_runtime: CpuRuntime = "auto"
    network: NetworkChoice = "auto"
    incremental: IncrementalChoice = "auto"
    images_per_forward: int | None = None
    memory_budget_mb: float = 512.0
    warmup: bool = True

    def __post_init__(self) -> None:
        for name, kind in (("precision", Precision), ("network", NetworkChoice), ("cpu_runtime", CpuRuntime),
                           ("incremental", IncrementalChoice)):
            if getattr(self, name) not in get_args(kind):
                raise ValueError(f"{name} must be one of {list(get_args(kind))}, not {getattr(self, name)!r}")
        if self.images_per_forward is not None and self.images_per_forward < 1:
            raise ValueError("images_per_forward must be a positive integer")
        if self.memory_budget_mb <= 0:
            raise ValueError("memory_budget_mb must be positive")

    def with_changes(self, **changes: object) -> "ExecutionPolicy":
        return replace(self, **changes)  # type: ignore[arg-type]

    def dtype(self, device: torch.device, kind: Pass) -> torch.dtype | None:
        """The autocast dtype of a ``kind`` pass on ``device``; ``None`` for plain fp32."""
        if self.precision == "fp32":
            return None
        if self.precision != "auto":
            return _REDUCED[self.precision]
        if device.type != "cuda":
            return None
        if kind == "path_gradients":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16

    def wants_runners(self, device: torch.device) -> bool:
        """Whether compiled or graph-replayed fixed-shape runners apply on ``device`` (CUDA only)."""
        return device.type == "cuda" and torch.cuda.is_available() and (self.compile or self.cuda_graphs)

    def folded(self) -> bool:
        return self.network in ("auto", "folded")


def precision_name(dtype: torch.dtype | None) -> str:
    return PRECISION_NAMES[dtype]


__all__ = ["CpuRuntime", "ExecutionPolicy", "IncrementalChoice", "NetworkChoice", "Pass", "Precision",
           "precision_name"]
