"""Class labels: ImageNet names (offline, from torchvision's weight metadata) or a text file."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def imagenet_labels() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names; read from torchvision's metadata, no download."""
    from torchvision.models import ResNet50_Weights

    return tuple(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


def load_labels(source: str) -> tuple[str, ...]:
    """Labels named by a catalogue entry: ``imagenet`` or a UTF-8 file with one label per line."""
    if source == "imagenet":
        return imagenet_labels()
    lines = Path(source).read_text(encoding="utf-8").splitlines()
    labels = tuple(line.strip() for line in lines if line.strip())
    if not labels:
        raise ValueError(f"label file {source} is empty")
    return labels
