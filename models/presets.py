"""Catalogue presets: a known architecture's source and the preprocessing of its library's weights.

A catalogue entry ``preset = "NAME"`` takes ``source``, ``input_size``, ``resize``, ``crop_pct``,
``mean`` and ``std`` from here (the entry's own keys override them) and then needs only
``weights``. Every value was read from the library's own metadata for its pretrained weights,
which lives in the library code (nothing is downloaded):

- torchvision: ``get_model_weights(NAME).DEFAULT.transforms()`` (``weights = "pretrained"`` loads
  the DEFAULT weights): ``resize_size`` (short side), ``crop_size``, ``interpolation``, ``mean``,
  ``std``;
- timm: ``timm.models.get_pretrained_cfg(NAME)``: ``input_size``, ``crop_pct``, ``interpolation``,
  ``mean``, ``std``; timm resizes the short side to ``floor(size / crop_pct)``, then crops.

"Resize the short side to R, centre-crop S" is ``resize = "center_crop"`` with
``crop_pct = S / R``: the centre square of ``S / R`` of the short side, resampled to ``S``.
Unbox resamples bilinearly (with PIL's antialiasing); ``interpolation`` records the library's
filter, which differs for ``swin_t`` and ``deit_small`` (bicubic). ``tests/test_model_catalogue.py``
checks this table against the installed libraries' metadata.

Presets set no ``target_layer``: the model registry picks each family's default layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preset:
    """The catalogue keys one preset fills, and where its preprocessing came from."""

    name: str
    source: str
    input_size: int
    resize_size: int  # the library's short side before its centre crop of input_size
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # the library's resampling filter (Unbox resamples bilinearly)
    origin: str  # the library metadata the values were read from
    description: str

    @property
    def crop_pct(self) -> float:
        return self.input_size / self.resize_size

    def fields(self) -> dict[str, Any]:
        """Catalogue-entry keys (as a TOML entry would give them)."""
        return {"source": self.source, "input_size": self.input_size, "resize": "center_crop",
                "crop_pct": self.crop_pct, "mean": list(self.mean), "std": list(self.std),
                "description": self.description}


PRESETS: dict[str, Preset] = {preset.name: preset for preset in (
    Preset("convnext_tiny", "torchvision:convnext_tiny", 224, 236, IMAGENET_MEAN, IMAGENET_STD, "bilinear",
           "torchvision ConvNeXt_Tiny_Weights.IMAGENET1K_V1.transforms()",
           "ConvNeXt-Tiny (ImageNet-1k torchvision preset)"),
    Preset("resnet50", "torchvision:resnet50", 224, 232, IMAGENET_MEAN, IMAGENET_STD, "bilinear",
           "torchvision ResNet50_Weights.IMAGENET1K_V2.transforms()",
           "ResNet-50 (ImageNet-1k torchvision preset)"),
    Preset("vit_b_16", "torchvision:vit_b_16", 224, 256, IMAGENET_MEAN, IMAGENET_STD, "bilinear",
           "torchvision ViT_B_16_Weights.IMAGENET1K_V1.transforms()",
           "ViT-B/16 (ImageNet-1k torchvision preset)"),
    Preset("deit_small", "timm:deit_small_patch16_224", 224, 248, IMAGENET_MEAN, IMAGENET_STD, "bicubic",
           "timm get_pretrained_cfg('deit_small_patch16_224') (fb_in1k): crop_pct 0.9, floor(224 / 0.9) = 248",
           "DeiT-S/16 (ImageNet-1k timm preset)"),
    Preset("swin_t", "torchvision:swin_t", 224, 232, IMAGENET_MEAN, IMAGENET_STD, "bicubic",
           "torchvision Swin_T_Weights.IMAGENET1K_V1.transforms()",
           "Swin-T (ImageNet-1k torchvision preset)"),
)}

__all__ = ["PRESETS", "Preset"]
