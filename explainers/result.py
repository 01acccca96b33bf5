"""The typed result every explainer returns."""

from __future__ import annotations

import operator
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
    """Target class per image of the batch whose ``logits`` (``B x classes``) are given.

    ``targets`` is ``None`` (each image's top-1), one integer (every image), or one integer per
    image: a list / tuple of length ``B`` or a 1-D integer tensor of length ``B``. Another
    length, a float, a bool or a nested shape is ``invalid_parameter``; an index outside
    ``[0, classes)`` is ``invalid_target`` (the code the API gives the same mistake)."""
    from explainers.errors import ExplainError

    batch, classes = logits.shape
    if targets is None:
        return logits.argmax(dim=1)
    per_image = "give one int for every image or one per image (a list or 1-D tensor of the batch's length)"
    if getattr(targets, "ndim", 0) and not isinstance(targets, torch.Tensor):  # a NumPy array
        targets = torch.as_tensor(targets)
    if isinstance(targets, torch.Tensor):
        if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
            raise ExplainError("invalid_parameter", f"targets must be integer class indices, got a {targets.dtype} "
                               f"tensor")
        if targets.dim() > 1:
            raise ExplainError("invalid_parameter", f"targets must be a 1-D tensor, got shape "
                               f"{tuple(targets.shape)}; {per_image}")
        given = targets.to(device=logits.device, dtype=torch.long)
    else:
        several = isinstance(targets, (list, tuple))
        values = list(targets) if several else [targets]
        try:
            if any(isinstance(value, bool) for value in values):
                raise TypeError
            indices = [operator.index(value) for value in values]
        except TypeError:
            raise ExplainError("invalid_parameter", f"targets must be integer class indices, got {targets!r}; "
                               f"{per_image}") from None
        outside = [index for index in indices if not 0 <= index < classes]
        if outside:  # checked before torch.tensor, which may overflow
            raise ExplainError("invalid_target", f"target must be a class index in [0, {classes - 1}], got "
                               f"{outside if several else outside[0]}")
        given = torch.tensor(indices if several else indices[0], dtype=torch.long, device=logits.device)
    if given.dim() == 0:
        given = given.expand(batch)
    if given.numel() != batch:
        raise ExplainError("invalid_parameter", f"{given.numel()} target{'' if given.numel() == 1 else 's'} "
                           f"for a batch of {batch} image{'' if batch == 1 else 's'}; {per_image}")
    outside = (given < 0) | (given >= classes)
    if bool(outside.any()):
        raise ExplainError("invalid_target", f"target must be a class index in [0, {classes - 1}], got "
                           f"{given[outside].tolist()}")
    return given
