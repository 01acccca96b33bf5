"""How a layer's output lies on the image, so that every activation method reads ``B x C x h x w``.

A layer may output channels first (``B x C x h x w``, convolutions), channels last
(``B x h x w x C``: Swin stages, the LayerNorm and MLP inside a ConvNeXt block) or a token
sequence ``B x N x C`` of a Vision Transformer, whose first tokens (class, distillation,
registers) precede the patch tokens of a ``gh x gw`` grid. Which one it is comes from the
model's own metadata (:class:`TokenGeometry`: patch size and prefix tokens) and the input's
size; an output that fits no layout is an ``ExplainError`` naming the layer and its shape, never
a silent reinterpretation (attention heads ``B x heads x N x d`` are not a feature map).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from explainers.errors import ExplainError

LayoutKind = Literal["nchw", "nhwc", "tokens"]
MAX_STRIDE_LOG2 = 7  # feature maps down to 1/128 of the input side


@dataclass(frozen=True)
class TokenGeometry:
    """A patch-token model's layout facts: ``prefix_tokens`` ahead of a grid of ``patch_size``
    patches (the grid follows the input size where the model accepts other sizes)."""

    prefix_tokens: int
    patch_size: tuple[int, int]
    patch_embed: nn.Module | None = None

    def grid(self, input_hw: tuple[int, int]) -> tuple[int, int]:
        """The patch grid of an input of ``input_hw`` pixels."""
        dynamic = getattr(self.patch_embed, "dynamic_feat_size", None)
        if callable(dynamic):
            rows, cols = dynamic(tuple(input_hw))
            return int(rows), int(cols)
        return input_hw[0] // self.patch_size[0], input_hw[1] // self.patch_size[1]


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[-1])
    return int(value), int(value)


def token_geometry(model: nn.Module) -> TokenGeometry | None:
    """The token layout a Vision Transformer declares (timm: ``num_prefix_tokens`` and
    ``patch_embed.patch_size``; torchvision: ``class_token`` and ``patch_size``); ``None`` for
    models that declare none (CNNs, Swin and ConvNeXt, whose maps are channels first or last)."""
    embed = getattr(model, "patch_embed", None)
    prefix = getattr(model, "num_prefix_tokens", None)
    if embed is not None and prefix is not None and getattr(embed, "patch_size", None) is not None:
        return TokenGeometry(int(prefix), _pair(embed.patch_size), embed)
    if isinstance(getattr(model, "class_token", None), torch.Tensor) and hasattr(model, "patch_size"):
        return TokenGeometry(1, _pair(model.patch_size))
    return None


def _side_at(side: int, pixels: int, k: int) -> bool:
    """Whether ``side`` cells are an input side of ``pixels`` at stride ``2**k`` (rounded either
    way, as padded and unpadded convolutions do)."""
    return side in (pixels >> k, -(-pixels // (1 << k)))


def _plausible_side(side: int, pixels: int) -> bool:
    return any(_side_at(side, pixels, k) for k in range(MAX_STRIDE_LOG2 + 1))


def _plausible_grid(rows: int, cols: int, input_hw: tuple[int, int]) -> bool:
    """Whether ``rows x cols`` is the input downsampled by one power-of-two stride."""
    return any(_side_at(rows, input_hw[0], k) and _side_at(cols, input_hw[1], k)
               for k in range(MAX_STRIDE_LOG2 + 1))


@dataclass(frozen=True)
class FeatureLayout:
    """How to read one layer output as ``B x C x h x w``."""

    kind: LayoutKind
    prefix_tokens: int = 0
    grid: tuple[int, int] = (0, 0)

    def to_feature_map(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (this layout) as ``B x C x h x w``: a view where the layout allows, so
        gradients flow through it."""
        if self.kind == "nchw":
            return tensor
        if self.kind == "nhwc":
            return tensor.permute(0, 3, 1, 2)
        rows, cols = self.grid
        patches = tensor[:, self.prefix_tokens:, :]
        return patches.reshape(tensor.shape[0], rows, cols, tensor.shape[2]).permute(0, 3, 1, 2)


def _refuse(layer: str, shape: tuple[int, ...], why: str) -> ExplainError:
    return ExplainError("layer_unsupported", f"layer {layer!r} outputs shape {shape}: {why}; explain at a "
                        "layer whose output is a feature map (B x C x h x w, B x h x w x C, or patch tokens)")


def feature_layout(shape: tuple[int, ...], input_hw: tuple[int, int], geometry: TokenGeometry | None,
                   layer: str) -> FeatureLayout:
    """The layout of an output of ``shape`` at ``layer`` for an input of ``input_hw`` pixels."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 4:
        _, a, b, c = shape
        if geometry is not None and (b, c) == geometry.grid(input_hw):
            return FeatureLayout("nchw")
        if geometry is not None and (a, b) == geometry.grid(input_hw):
            return FeatureLayout("nhwc")
        if _plausible_grid(b, c, input_hw):  # also a C x C grid of C channels: PyTorch's convention
            return FeatureLayout("nchw")
        if _plausible_grid(a, b, input_hw):
            return FeatureLayout("nhwc")
        raise _refuse(layer, shape, f"neither its last two nor its middle two dimensions are a feature "
                      f"grid of a {input_hw[0]} x {input_hw[1]} input (attention heads or another layout)")
    if len(shape) == 3:
        tokens = shape[1]
        if geometry is not None:
            rows, cols = geometry.grid(input_hw)
            if tokens == geometry.prefix_tokens + rows * cols:
                return FeatureLayout("tokens", geometry.prefix_tokens, (rows, cols))
            if tokens == rows * cols:
                return FeatureLayout("tokens", 0, (rows, cols))
            raise _refuse(layer, shape, f"{tokens} tokens are not {geometry.prefix_tokens} prefix tokens plus "
                          f"the model's {rows} x {cols} patch grid")
        side = math.isqrt(tokens)
        if side * side == tokens and _plausible_side(side, min(input_hw)):
            return FeatureLayout("tokens", 0, (side, side))
        raise _refuse(layer, shape, "the model declares no patch size or prefix tokens to place these tokens "
                      "on a grid")
    raise _refuse(layer, shape, "it has no spatial dimensions" if len(shape) == 2 else
                  "not a 3-D token or 4-D feature tensor")


__all__ = ["FeatureLayout", "TokenGeometry", "feature_layout", "token_geometry"]
