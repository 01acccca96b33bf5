"""Image -> model input tensor, and heat map -> the uploaded image's geometry.

``squash`` resizes the whole image to the model's square input, so a heat map covers the whole
upload; ``center_crop`` resizes the short side and crops the centre, so the map covers only the
crop (the rest of the image was never seen by the model and gets zero saliency). The crop is the
centre square of ``crop_pct`` of the short side (1.0: the whole short side; "resize the short
side to 256, crop 224" is 224 / 256), resampled to the input size in one step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models.catalog import ModelSpec


@dataclass(frozen=True)
class Geometry:
    """Where the model's input lies in the original image, in original pixels."""

    width: int
    height: int
    box: tuple[float, float, float, float]  # left, top, right, bottom of the region the model saw


class Preprocessor:
    """Turns RGB images into normalised model inputs and maps saliency back onto them."""

    def __init__(self, spec: ModelSpec, device: torch.device) -> None:
        self.size = spec.input_size
        self.resize = spec.resize
        self.crop_pct = spec.crop_pct
        self.device = device
        self.mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)

    def geometry(self, width: int, height: int) -> Geometry:
        """The region of a ``width`` x ``height`` image that the model input covers."""
        if self.resize == "squash":
            return Geometry(width, height, (0.0, 0.0, float(width), float(height)))
        side = float(min(width, height)) * self.crop_pct
        left, top = (width - side) / 2, (height - side) / 2
        return Geometry(width, height, (left, top, left + side, top + side))

    def resized(self, image: Image.Image) -> Image.Image:
        """The RGB image as the model sees it (``size`` x ``size``), before normalisation."""
        geometry = self.geometry(*image.size)
        box = None if self.resize == "squash" else geometry.box
        return image.resize((self.size, self.size), Image.Resampling.BILINEAR, box=box)

    def to_unit_tensor(self, image: Image.Image) -> torch.Tensor:
        """``1 x 3 x S x S`` float tensor in [0, 1] on the device (not yet normalised)."""
        array = np.asarray(self.resized(image.convert("RGB")), dtype=np.uint8)
        tensor = torch.from_numpy(array.copy()).to(self.device).permute(2, 0, 1).unsqueeze(0)
        return tensor.float().div_(255.0)

    def normalize(self, unit: torch.Tensor) -> torch.Tensor:
        """Normalise a [0, 1] batch with the model's mean and std."""
        return (unit - self.mean) / self.std

    def denormalize(self, normalized: torch.Tensor) -> torch.Tensor:
        """Back to [0, 1] pixel space."""
        return normalized * self.std + self.mean

    def to_input(self, image: Image.Image) -> tuple[torch.Tensor, Geometry]:
        """The normalised ``1 x 3 x S x S`` input for ``image`` and its geometry."""
        return self.normalize(self.to_unit_tensor(image)), self.geometry(*image.size)

    @staticmethod
    def map_to_image(saliency: torch.Tensor, geometry: Geometry, width: int | None = None,
                     height: int | None = None) -> torch.Tensor:
        """Resample an ``h x w`` map onto the original image (or a scaled copy of it).

        ``width``/``height`` pick the output size (default: the original size); the model's
        region is scaled accordingly and everything outside it is zero.
        """
        out_w = width or geometry.width
        out_h = height or geometry.height
        sx, sy = out_w / geometry.width, out_h / geometry.height
        left, top, right, bottom = geometry.box
        x0, y0 = round(left * sx), round(top * sy)
        x1, y1 = max(x0 + 1, round(right * sx)), max(y0 + 1, round(bottom * sy))
        grid = saliency.float().reshape(1, 1, *saliency.shape[-2:])
        region = F.interpolate(grid, size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)
        if (x0, y0, x1, y1) == (0, 0, out_w, out_h):
            return region[0, 0]
        canvas = torch.zeros(out_h, out_w, device=saliency.device)
        canvas[y0:y1, x0:x1] = region[0, 0, : out_h - y0, : out_w - x0]
        return canvas
