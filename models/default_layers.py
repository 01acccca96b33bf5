"""The layer a model is explained at when the catalogue names none: the one the literature uses.

- Vision Transformers (timm ViT / DeiT / BEiT / EVA, torchvision ViT): the last block's first
  norm. The class token alone feeds the head, so the gradient at the last block's *output* is
  zero on every patch token; its first norm still feeds the last attention.
- Swin (timm, torchvision): the last stage's last block's second norm, channels last
  (pytorch-grad-cam's Swin example).
- ConvNeXt (timm, torchvision): the last stage.
- CNNs: the last module whose output is a spatial feature map (channels first, more than one
  cell), which is how CAMs have been computed since the CAM paper.

Never a patch embedding, an identity, a permute or a flatten: a module whose output is its input
or a view of it with another shape is skipped, and a CNN-style guess is refused (``None``) when
the network carries on in tokens or channels-last tensors after it (a Transformer whose family
is unknown here), so the catalogue must name the layer.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from explainers.feature_layout import feature_layout, token_geometry

logger = logging.getLogger("unbox.models")


def _last_index(container: object) -> int | None:
    return len(container) - 1 if isinstance(container, (nn.Sequential, nn.ModuleList)) and len(container) else None


def _vision_transformer_layer(module: nn.Module) -> str | None:
    blocks = getattr(module, "blocks", None)
    last = _last_index(blocks)
    if token_geometry(module) is not None and last is not None and hasattr(blocks[last], "norm1"):
        return f"blocks.{last}.norm1"
    encoder_layers = getattr(getattr(module, "encoder", None), "layers", None)
    last = _last_index(encoder_layers)
    if token_geometry(module) is not None and last is not None:
        name, block = list(encoder_layers.named_children())[last]
        if hasattr(block, "ln_1"):
            return f"encoder.layers.{name}.ln_1"
    return None


def _swin_layer(module: nn.Module) -> str | None:
    if "swin" not in type(module).__name__.lower():
        return None
    stages, prefix = getattr(module, "layers", None), "layers"
    if _last_index(stages) is not None:  # timm: layers[i].blocks[j]
        last = _last_index(stages)
        blocks = getattr(stages[last], "blocks", None)
        if _last_index(blocks) is not None and hasattr(blocks[-1], "norm2"):
            return f"{prefix}.{last}.blocks.{_last_index(blocks)}.norm2"
    stages = getattr(module, "features", None)  # torchvision: features[i][j] (odd i: stages)
    last = _last_index(stages)
    if last is not None and _last_index(stages[last]) is not None and hasattr(stages[last][-1], "norm2"):
        return f"features.{last}.{_last_index(stages[last])}.norm2"
    return None


def _convnext_layer(module: nn.Module) -> str | None:
    if "convnext" not in type(module).__name__.lower():
        return None
    for name in ("stages", "features"):  # timm, torchvision
        last = _last_index(getattr(module, name, None))
        if last is not None:
            return f"{name}.{last}"
    return None


def _is_reshape(module: nn.Module, inputs: tuple[object, ...], output: object) -> bool:
    """An identity, a permute, a flatten: the output is the input (not changed in place, as
    an in-place ReLU does) or a view of it with another shape."""
    if not inputs or not isinstance(inputs[0], torch.Tensor) or not isinstance(output, torch.Tensor):
        return False
    source = inputs[0]
    if output is source:
        return not getattr(module, "inplace", False)
    shares = output.untyped_storage().data_ptr() == source.untyped_storage().data_ptr()
    return shares and (output.shape != source.shape or output.stride() != source.stride())


def _last_cnn_feature_map(module: nn.Module, size: int) -> str | None:
    """The last module with a spatial channels-first output, unless tokens or channels-last
    tensors follow it (then ``None``)."""
    geometry = token_geometry(module)
    fired: list[tuple[str, str]] = []  # (name, layout kind or "")
    handles = []

    def record(name: str, sub: nn.Module, inputs: tuple[object, ...], output: object) -> None:
        if _is_reshape(sub, inputs, output) or not isinstance(output, torch.Tensor) or output.dim() not in (3, 4):
            return
        try:
            layout = feature_layout(tuple(output.shape), (size, size), geometry, name)
        except Exception:
            return
        spatial = layout.kind != "nchw" or output.shape[-1] * output.shape[-2] > 1
        if spatial:
            fired.append((name, layout.kind))

    for name, sub in module.named_modules():
        if name:
            handles.append(sub.register_forward_hook(lambda m, i, o, name=name: record(name, m, i, o)))
    try:
        with torch.inference_mode():
            module(torch.zeros(1, 3, size, size, device=next(module.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()
    channels_first = [index for index, (_, kind) in enumerate(fired) if kind == "nchw"]
    if not channels_first:
        return None
    last = channels_first[-1]
    if any(kind != "nchw" for _, kind in fired[last + 1:]):
        return None
    return fired[last][0]


def default_layer(module: nn.Module, input_size: int) -> str | None:
    """The layer to explain ``module`` at by default (see the module docstring); ``None`` when
    no rule applies and the catalogue must name one."""
    for rule in (_vision_transformer_layer, _swin_layer, _convnext_layer):
        layer = rule(module)
        if layer is not None:
            return layer
    layer = _last_cnn_feature_map(module, input_size)
    if layer is None:
        logger.warning("no default explanation layer for %s: set target_layer in the catalogue",
                       type(module).__name__)
    return layer


__all__ = ["default_layer"]
