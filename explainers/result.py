"""The typed result every explainer returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Explanation:
    """Saliency for a batch: maps in [0, 1] (high = important), the logits and the targets.

    ``saliency`` is ``B x h x w`` at the method's own resolution, on the model's device.
    ``details`` holds method-specific facts worth reporting (mode, channels, passes, ...).
    """

    method: str
    saliency: torch.Tensor
    logits: torch.Tensor
    targets: torch.Tensor
    layer: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


def normalize_maps(maps: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Per-map min-max scaling to [0, 1]; a constant map becomes all zeros."""
    flat = maps.flatten(1)
    low = flat.min(dim=1).values.view(-1, *([1] * (maps.dim() - 1)))
    shifted = maps - low
    high = shifted.flatten(1).max(dim=1).values.view(-1, *([1] * (maps.dim() - 1)))
    return shifted / (high + eps)


def resolve_targets(logits: torch.Tensor, targets: int | list[int] | torch.Tensor | None) -> torch.Tensor:
    """Target class per image: the given indices (validated) or each image's top-1."""
    from explainers.errors import ExplainError

    batch, classes = logits.shape
    if targets is None:
        return logits.argmax(dim=1)
    tensor = torch.as_tensor(targets, dtype=torch.long, device=logits.device).reshape(-1)
    if tensor.numel() == 1 and batch > 1:
        tensor = tensor.expand(batch)
    if tensor.numel() != batch:
        raise ExplainError("invalid_target", f"{tensor.numel()} targets for a batch of {batch}")
    if bool(((tensor < 0) | (tensor >= classes)).any()):
        raise ExplainError("invalid_target", f"target must be a class index in [0, {classes - 1}]")
    return tensor
