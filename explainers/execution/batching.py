"""How many images one forward takes, by device: small on a CPU, large on a GPU.

On a CPU per-image cost rises once a batch's activations spill the caches, so forwards take a
few images at a time; a GPU wants hundreds of images to fill its cores. A forward + backward
keeps every activation for the backward pass, and at 8 images of 224 px the largest of
efficientnet_lite0's is over glibc's ceiling for reusing freed memory (it would be mapped and
page-faulted afresh on every call), so gradients go through 4 images at a time on a CPU.
Chunking bounds memory and keeps the caches warm; results depend on it only in float rounding.
The measurements behind these numbers are in docs/benchmarks.md.
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
