"""Heat maps as pictures: 8-bit grayscale PNGs and colour overlays on the image."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from explainers.colormaps import lookup_table

PNG_COMPRESS_LEVEL = 1  # fast encoding; the maps compress well anyway


def fit_within(width: int, height: int, max_side: int) -> tuple[int, int]:
    """``width`` x ``height`` scaled down (never up) so that the longer side is <= ``max_side``."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def to_uint8(saliency: torch.Tensor) -> np.ndarray:
    """A [0, 1] map as a uint8 array (one device -> host copy)."""
    return saliency.mul(255.0).add_(0.5).clamp_(0, 255).to(torch.uint8).cpu().numpy()


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 ``H x W`` (grayscale) or ``H x W x 3`` (RGB) array."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def colorize(levels: np.ndarray, colormap: str = "inferno") -> np.ndarray:
    """``H x W`` uint8 levels -> ``H x W x 3`` colours of a perceptual colour map."""
    return lookup_table(colormap)[levels]


def blend(image: np.ndarray, levels: np.ndarray, alpha: float = 0.5, colormap: str = "inferno") -> np.ndarray:
    """The colour-mapped heat map laid over an RGB image of the same size."""
    weight = int(round(alpha * 256))  # fixed point: 8 fractional bits, uint16 never overflows
    heat = colorize(levels, colormap).astype(np.uint16)
    mixed = image.astype(np.uint16) * (256 - weight) + heat * weight + 128
    return (mixed >> 8).astype(np.uint8)
