"""The model catalogue: how a named model is built, its labels, preprocessing and warm cache."""

from models.catalog import ModelSpec, load_catalog
from models.registry import LoadedModel, ModelRegistry, UnknownModelError

__all__ = ["LoadedModel", "ModelRegistry", "ModelSpec", "UnknownModelError", "load_catalog"]
