"""Baselines that stand in for "removed" image content (I-GOS, I-GOS++, SAG, deletion/insertion).

The blurred baseline follows the I-GOS papers: a Gaussian blur with kernel 51 and sigma 50 at a
224-pixel input, both scaled with the input size so that a larger input is blurred just as much
relative to its size (the reference steps to 151/150 at >= 500 px and 201/200 at >= 800 px;
we scale continuously). The blur is linear and normalisation is a per-channel affine map, so
blurring the *normalised* input equals normalising the blurred image: callers pass model inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

BaselineKind = Literal["blur", "mean"]

REFERENCE_SIZE = 224
REFERENCE_SIGMA = 50.0


@dataclass(frozen=True)
class BlurSpec:
    """Gaussian kernel size (odd) and sigma used for one input size."""

    kernel: int
    sigma: float

    @classmethod
    def for_size(cls, size: int) -> "BlurSpec":
        """51 / 50 at 224 px, scaled linearly with ``size`` (kernel stays odd and >= 3)."""
        sigma = REFERENCE_SIGMA * size / REFERENCE_SIZE
        kernel = max(3, 2 * int(round(sigma / 2)) + 1)
        return cls(kernel, sigma)


def _gaussian_kernel(spec: BlurSpec, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    offsets = torch.arange(spec.kernel, device=device, dtype=torch.float64) - (spec.kernel - 1) / 2
    weights = torch.exp(-(offsets ** 2) / (2 * spec.sigma ** 2))
    return (weights / weights.sum()).to(dtype)


def gaussian_blur(inputs: torch.Tensor, spec: BlurSpec) -> torch.Tensor:
    """Separable Gaussian blur of a ``B x C x H x W`` batch (reflect padding where it fits)."""
    channels = inputs.shape[1]
    kernel = _gaussian_kernel(spec, inputs.device, inputs.dtype)
    pad = spec.kernel // 2
    mode = "reflect" if pad < min(inputs.shape[-2:]) else "replicate"
    out = F.pad(inputs, (pad, pad, 0, 0), mode=mode)
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    out = F.pad(out, (0, 0, pad, pad), mode=mode)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def make_baseline(inputs: torch.Tensor, kind: BaselineKind = "blur") -> tuple[torch.Tensor, dict[str, object]]:
    """The baseline for a normalised batch and a description of it (for protocols/results).

    ``blur``: the size-scaled Gaussian blur above. ``mean``: all zeros in normalised space,
    i.e. the dataset's mean colour.
    """
    if kind == "mean":
        return torch.zeros_like(inputs), {"kind": "mean", "description": "dataset mean colour (zeros after normalisation)"}
    if kind != "blur":
        raise ValueError(f"unknown baseline {kind!r}; use 'blur' or 'mean'")
    spec = BlurSpec.for_size(max(inputs.shape[-2:]))
    with torch.no_grad():
        blurred = gaussian_blur(inputs.detach(), spec)
    return blurred, {"kind": "blur", "kernel": spec.kernel, "sigma": round(spec.sigma, 3)}
