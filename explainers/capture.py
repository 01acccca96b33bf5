"""Capture a layer's activations (and make d score / d activation cheap) during one forward.

The hook is registered for the duration of a ``with`` block and removed afterwards, and it only
acts for forwards made in the capturing context (a ``ContextVar``), so concurrent requests that
share one model never see each other's activations.

With ``gradient=True`` the captured activation becomes a fresh autograd leaf and grad mode is
switched on from that point of the forward: run the forward under ``torch.no_grad()`` and only
the network's tail after the layer records a graph. ``torch.autograd.grad(score, activation)``
then costs a backward through the head alone, not through the whole network.
"""

from __future__ import annotations

import math
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from explainers.errors import ExplainError

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


def to_feature_map(output: Any) -> torch.Tensor:
    """A layer output as ``B x K x h x w``; token outputs ``B x N x C`` of a square grid are
    reshaped (a leading class token is dropped)."""
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise ExplainError("layer_unsupported", "the layer does not output a tensor")
    if output.dim() == 4:
        return output
    if output.dim() == 3:
        tokens = output.shape[1]
        for drop in (0, 1):
            side = math.isqrt(tokens - drop)
            if side * side == tokens - drop and side > 0:
                grid = output[:, drop:, :]
                return grid.reshape(output.shape[0], side, side, output.shape[2]).permute(0, 3, 1, 2)
    raise ExplainError("layer_unsupported",
                       f"the layer outputs shape {tuple(output.shape)}; a feature map (B x K x h x w) is needed")


class LayerCapture:
    """Context manager holding the activation of one layer from the forwards run inside it."""

    def __init__(self, model: nn.Module, layer: str, gradient: bool = False) -> None:
        self.module = resolve_layer(model, layer)
        self.layer = layer
        self.gradient = gradient
        self.activation: torch.Tensor | None = None
        self._handle: Any = None
        self._token: Any = None

    def _hook(self, _module: nn.Module, _inputs: Any, output: Any) -> Any:
        if _active.get() is not self:
            return None
        feature_map = to_feature_map(output)
        if not self.gradient:
            self.activation = feature_map.detach()
            return None
        if isinstance(output, (tuple, list)) or output.dim() != 4:
            raise ExplainError("layer_unsupported", "gradient methods need a layer with a 4-D output")
        leaf = output.detach().requires_grad_(True)
        self.activation = leaf
        torch.set_grad_enabled(True)  # the tail after this layer records a graph
        return leaf.clone()  # a non-leaf copy, so in-place ops downstream stay legal

    def __enter__(self) -> "LayerCapture":
        self._token = _active.set(self)
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()
        _active.reset(self._token)

    def require(self) -> torch.Tensor:
        """The captured activation, or an error when the layer did not run."""
        if self.activation is None:
            raise ExplainError("layer_unsupported", f"layer {self.layer!r} did not run in the forward pass")
        return self.activation
