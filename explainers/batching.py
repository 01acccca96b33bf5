"""How many images one forward takes, by device: small on a CPU, large on a GPU.

Measured on the 2-core CPU (efficientnet_lite0, 224 px, 2026-11-26): about 20 ms per image at
4-8 images per forward but 31-34 ms at 32-64, because larger batches spill the caches; a GPU
wants hundreds of images to fill its cores. The explainers chunk their batched work by this
number (only to bound memory and keep the caches warm; results do not depend on it).
"""

from __future__ import annotations

import torch

CPU_IMAGES_PER_FORWARD = 8
CUDA_IMAGES_PER_FORWARD = 256


def images_per_forward(device: torch.device | str, requested: int | None = None) -> int:
    """``requested`` when given, else the device's default chunk size."""
    if requested is not None:
        return max(1, int(requested))
    kind = torch.device(device).type
    return CUDA_IMAGES_PER_FORWARD if kind == "cuda" else CPU_IMAGES_PER_FORWARD
