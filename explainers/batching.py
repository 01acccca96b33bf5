"""How many images one forward takes, by device: small on a CPU, large on a GPU.

Measured on the 2-core CPU (efficientnet_lite0, 224 px, 2026-11-26): about 20 ms per image at
4-8 images per forward but 31-34 ms at 32-64, because larger batches spill the caches; a GPU
wants hundreds of images to fill its cores. The explainers chunk their batched work by this
number (only to bound memory and keep the caches warm; results do not depend on it beyond
float rounding).

A forward + backward keeps every activation for the backward pass; at 8 images of 224 px the
largest (efficientnet_lite0's 96 x 112 x 112 expansion, 38.5 MB) is over glibc's 32 MB ceiling
for reusing freed memory, so it is mapped and page-faulted afresh on every call. On the same
CPU forward + backward cost 35-47 ms per image at 4 images against 41-51 ms at 8 (three
alternated runs, 2026-11-26), so gradients go through 4 images at a time on a CPU.
"""

from __future__ import annotations

import torch

CPU_IMAGES_PER_FORWARD = 8
CPU_IMAGES_PER_BACKWARD = 4
CUDA_IMAGES_PER_FORWARD = 256


def images_per_forward(device: torch.device | str, requested: int | None = None) -> int:
    """``requested`` when given, else the device's default chunk size."""
    if requested is not None:
        return max(1, int(requested))
    kind = torch.device(device).type
    return CUDA_IMAGES_PER_FORWARD if kind == "cuda" else CPU_IMAGES_PER_FORWARD


def images_per_backward(device: torch.device | str, requested: int | None = None) -> int:
    """``requested`` when given, else the device's chunk size for forward + backward passes."""
    if requested is not None:
        return max(1, int(requested))
    kind = torch.device(device).type
    return CUDA_IMAGES_PER_FORWARD if kind == "cuda" else CPU_IMAGES_PER_BACKWARD
