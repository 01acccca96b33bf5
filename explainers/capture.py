"""Capture a layer's activations (and make d score / d activation cheap) during one forward.

The hook is registered for the duration of a ``with`` block and removed afterwards, and it only
acts for forwards made in the capturing context (a ``ContextVar``), so concurrent requests that
share one model never see each other's activations.

With ``gradient=True`` the captured activation becomes a fresh autograd leaf and grad mode is
switched on from that point of the forward: run the forward under ``torch.no_grad()`` and only
the network's tail after the layer records a graph. ``torch.autograd.grad(score, activation)``
then costs a backward through the head alone, not through the whole network. Layer outputs in
any layout (channels last, patch tokens) are read as ``B x C x h x w`` (:mod:`explainers.feature_layout`).
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from explainers.errors import ExplainError
from explainers.feature_layout import FeatureLayout, feature_layout, token_geometry

_active: ContextVar["LayerCapture | None"] = ContextVar("unbox_layer_capture", default=None)


def resolve_layer(model: nn.Module, path: str) -> nn.Module:
    """The submodule at ``path`` (``features.7``, ``layer4``) or an ``unknown_layer`` error."""
    if isinstance(model, torch.jit.ScriptModule):
        raise ExplainError("layer_unsupported", "TorchScript models cannot be hooked at a layer; "
                           "use a method that needs only the model's output")
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ExplainError("unknown_layer", f"layer {path!r} is not a module of this model") from None


class LayerCapture:
    """Context manager holding the activation of one layer from the forwards run inside it.

    The activation is read as ``B x C x h x w`` whatever the layer's layout
    (:mod:`explainers.feature_layout`, from the model's metadata and the input's size); with
    ``gradient=True`` the autograd leaf is the raw output (:attr:`leaf`) and
    :meth:`feature_gradient` reads its gradient the same way."""

    def __init__(self, model: nn.Module, layer: str, gradient: bool = False) -> None:
        self.module = resolve_layer(model, layer)
        self.model = model
        self.layer = layer
        self.gradient = gradient
        self.geometry = token_geometry(model)
        self.activation: torch.Tensor | None = None
        self.leaf: torch.Tensor | None = None
        self.layout: FeatureLayout | None = None
        self._input_hw: tuple[int, int] | None = None
        self._handles: list[Any] = []
        self._token: Any = None

    def _input_hook(self, _module: nn.Module, args: tuple[Any, ...]) -> None:
        if _active.get() is self and args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
            self._input_hw = (int(args[0].shape[-2]), int(args[0].shape[-1]))

    def _hook(self, _module: nn.Module, _inputs: Any, output: Any) -> Any:
        if _active.get() is not self:
            return None
        tensor = output[0] if isinstance(output, (tuple, list)) and output else output
        if not isinstance(tensor, torch.Tensor):
            raise ExplainError("layer_unsupported", f"layer {self.layer!r} does not output a tensor")
        if self._input_hw is None:
            raise ExplainError("layer_unsupported", "the model's input is not an image batch (B x 3 x H x W)")
        self.layout = feature_layout(tuple(tensor.shape), self._input_hw, self.geometry, self.layer)
        if not self.gradient:
            self.activation = self.layout.to_feature_map(tensor.detach())
            return None
        if tensor is not output:
            raise ExplainError("layer_unsupported", f"gradient methods need a layer with one tensor output; "
                               f"{self.layer!r} returns a {type(output).__name__}")
        leaf = tensor.detach().requires_grad_(True)
        self.leaf = leaf
        self.activation = self.layout.to_feature_map(leaf)
        torch.set_grad_enabled(True)  # the tail after this layer records a graph
        return leaf.clone()  # a non-leaf copy, so in-place ops downstream stay legal

    def feature_gradient(self, score: torch.Tensor) -> torch.Tensor:
        """d ``score`` / d activation, as ``B x C x h x w`` (gradient captures only)."""
        if self.leaf is None or self.layout is None:
            raise ExplainError("layer_unsupported", f"layer {self.layer!r} did not run in the forward pass")
        (gradient,) = torch.autograd.grad(score, self.leaf)
        return self.layout.to_feature_map(gradient)

    def __enter__(self) -> "LayerCapture":
        self._token = _active.set(self)
        self._handles = [self.model.register_forward_pre_hook(self._input_hook),
                         self.module.register_forward_hook(self._hook)]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        _active.reset(self._token)

    def require(self) -> torch.Tensor:
        """The captured activation (``B x C x h x w``), or an error when the layer did not run."""
        if self.activation is None:
            raise ExplainError("layer_unsupported", f"layer {self.layer!r} did not run in the forward pass")
        return self.activation
