"""Layer swaps for the private copies of :mod:`explainers.execution.lean`: the same function, less memory traffic.

* TensorFlow "same" convolutions (timm's ``Conv2dSame``: efficientnet_lite0's stem and every
  stride-2 depthwise convolution) pad their input with ``F.pad`` on each call, one extra pass
  over a feature map up to 8 x 96 x 113 x 113 plus its copy in the backward pass. When the pad
  is one pixel larger at the bottom / right than at the top / left (stride 2, odd kernel, even
  input), a kernel one tap larger whose first row / column is zero, run with symmetric padding
  ``left + 1``, reads exactly the taps the padded convolution reads, so no padded copy is made.
  Zero taps add exact zeros; efficientnet_lite0's logits came out bit-identical on the CPU.
* In-place ``ReLU6`` / ``Hardtanh`` under autograd makes PyTorch clone the input first (the
  backward needs it), 33 clones per efficientnet_lite0 pass; out of place there is nothing to
  clone. Without autograd (inference mode) the activation stays in place (no new tensor).

The "same" padding swap is made on a CPU only (on CUDA cuDNN picks kernels by shape). The
measured gains are in docs/benchmarks.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow "same" padding (before, after) along one side of ``size`` pixels."""
    total = max((-(-size // stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class ShiftedSameConv(nn.Conv2d):
    """A ``Conv2dSame`` (dilation 1) that pads through the convolution itself.

    Along a side whose "same" padding is symmetric it is a plain padded convolution; along a
    side padded one more after than before it uses the kernel shifted by one zero tap with
    padding ``before + 1``. ``kernel_size`` stays the original's (receptive-field geometry
    reads it); the shifted kernels are made once, from the (folded) weight."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0, 1, conv.groups,
                         conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
        self.weight = nn.Parameter(conv.weight.detach().clone(), requires_grad=False)
        if conv.bias is not None:
            self.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        for shift_y in (0, 1):
            for shift_x in (0, 1):
                shifted = F.pad(self.weight.detach(), (shift_x, 0, shift_y, 0))
                self.register_buffer(f"shifted_{shift_y}{shift_x}", shifted, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (before_y, after_y), (before_x, after_x) = (
            _same_padding(int(x.shape[dim]), self.kernel_size[axis], self.stride[axis], 1)
            for axis, dim in ((0, -2), (1, -1)))
        shift_y, shift_x = after_y - before_y, after_x - before_x  # 0 or 1 by construction
        weight = getattr(self, f"shifted_{shift_y}{shift_x}")
        return F.conv2d(x, weight, self.bias, self.stride, (before_y + shift_y, before_x + shift_x), 1, self.groups)


class GradAwareHardtanh(nn.Module):
    """``Hardtanh`` / ``ReLU6`` in place without autograd, out of place under it."""

    def __init__(self, min_val: float, max_val: float) -> None:
        super().__init__()
        self.min_val = min_val
        self.max_val = max_val

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_place = not (torch.is_grad_enabled() and x.requires_grad)
        return F.hardtanh(x, self.min_val, self.max_val, inplace=in_place)

    def extra_repr(self) -> str:
        return f"min_val={self.min_val}, max_val={self.max_val}"


def _same_conv_type() -> type[nn.Module] | None:
    try:
        from timm.layers import Conv2dSame
    except ImportError:  # timm is optional for custom models
        return None
    return Conv2dSame


def _swap(model: nn.Module, replace: dict[str, nn.Module]) -> None:
    for name, module in replace.items():
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attribute, module)


def pad_through_kernels(model: nn.Module) -> int:
    """Swap every dilation-1 ``Conv2dSame`` of ``model`` for a :class:`ShiftedSameConv`; returns
    how many were swapped."""
    same = _same_conv_type()
    if same is None:
        return 0
    found = {name: ShiftedSameConv(module) for name, module in model.named_modules()
             if type(module) is same and tuple(module.dilation) == (1, 1)}
    _swap(model, found)
    return len(found)


def activations_out_of_place_under_autograd(model: nn.Module) -> int:
    """Swap every in-place ``Hardtanh`` (``ReLU6`` included) for a :class:`GradAwareHardtanh`."""
    found = {name: GradAwareHardtanh(module.min_val, module.max_val) for name, module in model.named_modules()
             if isinstance(module, nn.Hardtanh) and module.inplace}
    _swap(model, found)
    return len(found)


__all__ = ["GradAwareHardtanh", "ShiftedSameConv", "activations_out_of_place_under_autograd", "pad_through_kernels"]
