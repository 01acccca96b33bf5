"""A lean copy of a classifier for passes that only score images: batch norm folded away.

Scoring passes (SAG's patch sets, Score-CAM's masked forwards, the metrics, I-GOS's path images)
push hundreds of images through the network and never look inside it, so they can run a copy in
which every eval-mode batch norm that directly follows a convolution is folded into that
convolution's weights and bias (``w' = w * g / sqrt(v + eps)``, ``b' = (b - m) * g / sqrt(v +
eps) + beta``) and removed: one pass over every feature map less. In float32 the folding's
rounding (~1e-6) can turn I-GOS's accept / reject steps into a different, equally converged
mask; a seeded run still repeats exactly.

The copy also swaps layers for ones computing the same function with less memory traffic
(:mod:`explainers.execution.lean_layers`): activations in place only without autograd, and on a
CPU the "same" convolutions padded through their kernels.

Which batch norm follows which convolution is read off one traced forward (the batch norm's
input is the very tensor the convolution returned), so no architecture is hard-coded; timm's
``BatchNormAct2d`` keeps its activation. The copy is checked against the original on the
caller's own input and thrown away when the logits differ, so a model this cannot fold (a
convolution output that also feeds a residual, TorchScript) is simply scored as it is.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator

import torch
from torch import nn

from explainers.execution.lean_layers import activations_out_of_place_under_autograd, pad_through_kernels

logger = logging.getLogger(__name__)


def _conv_batchnorm_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """(convolution, batch norm) module names where the batch norm consumed the convolution's output."""
    produced: dict[int, str] = {}
    pairs: list[tuple[str, str]] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(
                lambda _m, _i, output, name=name: produced.__setitem__(id(output), name)))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            handles.append(module.register_forward_pre_hook(
                lambda _m, inputs, name=name: pairs.append((produced.get(id(inputs[0]), ""), name))))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return [(conv, norm) for conv, norm in pairs if conv]


def _fold(conv: nn.Conv2d, norm: nn.modules.batchnorm._BatchNorm) -> None:
    scale = (norm.weight if norm.affine else torch.ones_like(norm.running_var)) / torch.sqrt(norm.running_var + norm.eps)
    shift = norm.bias if norm.affine else torch.zeros_like(norm.running_mean)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
    conv.weight = nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1), requires_grad=False)
    conv.bias = nn.Parameter((bias - norm.running_mean) * scale + shift, requires_grad=False)


def _without_norm(norm: nn.Module) -> nn.Module:
    """What stays of a folded batch norm: timm's fused activation (and dropout), else nothing."""
    kept = [getattr(norm, part) for part in ("drop", "act") if isinstance(getattr(norm, part, None), nn.Module)]
    return nn.Sequential(*kept) if kept else nn.Identity()


def frozen_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with frozen parameters and no forward hooks (hooks copied
    from a request in flight must not follow it)."""
    twin = copy.deepcopy(model).eval().requires_grad_(False)
    for module in twin.modules():
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
    return twin


@contextlib.contextmanager
def ieee_float32() -> Iterator[None]:
    """Full float32 convolutions and matrix products on CUDA for the duration (no TF32). The
    fold check must measure folding's own rounding (~1e-6); under TF32 (cuDNN's default for
    float32 convolutions) the two networks differ by about 1e-3 and the copy would be refused."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max()) / max(float(expected.abs().max()), 1e-6)


def fold_batch_norms(model: nn.Module, example: torch.Tensor, tolerance: float = 1e-3,
                     pad_in_kernels: bool = False) -> nn.Module | None:
    """A frozen eval-mode copy of ``model`` with batch norms folded into their convolutions
    and activations out of place under autograd (:mod:`explainers.execution.lean_layers`), with
    ``pad_in_kernels`` also its "same" convolutions padded through their kernels; ``None``
    when nothing folds or the copy's logits on ``example`` differ from the original's by more
    than ``tolerance`` relative to their largest magnitude."""
    twin = frozen_copy(model)
    example = example.detach().float()
    pairs = _conv_batchnorm_pairs(twin, example)
    if not pairs:
        return None
    with torch.no_grad(), ieee_float32():
        expected = twin(example).float()
        for conv_name, norm_name in pairs:
            norm = twin.get_submodule(norm_name)
            _fold(twin.get_submodule(conv_name), norm)
            parent_name, _, attribute = norm_name.rpartition(".")
            setattr(twin.get_submodule(parent_name) if parent_name else twin, attribute, _without_norm(norm))
        activations_out_of_place_under_autograd(twin)
        if pad_in_kernels:
            pad_through_kernels(twin)
        folded = twin(example).float()
    error = _relative_error(folded, expected)
    if not error <= tolerance:
        logger.warning("batch-norm folding changed the logits by %.2g (relative); scoring the model as it is", error)
        return None
    return twin


def same_arithmetic_copy(model: nn.Module, example: torch.Tensor, tolerance: float = 1e-6) -> nn.Module | None:
    """A frozen copy of ``model`` with only the layer swaps of :mod:`explainers.execution.lean_layers`
    (batch norm kept): the same forward arithmetic, so logits equal the model's (bit-identical
    for efficientnet_lite0 on the CPU); ``None`` when nothing was swapped or the logits on
    ``example`` differ by more than ``tolerance`` relative. For computations whose result
    hangs on float rounding (SAG's coarse I-GOS ordering)."""
    twin = frozen_copy(model)
    example = example.detach().float()
    with torch.no_grad(), ieee_float32():
        expected = twin(example).float()  # the copy before its swaps: hooks of requests in flight stay out
        if activations_out_of_place_under_autograd(twin) + pad_through_kernels(twin) == 0:
            return None
        error = _relative_error(twin(example).float(), expected)
    if not error <= tolerance:
        logger.warning("layer swaps changed the logits by %.2g (relative); using the model as it is", error)
        return None
    return twin


__all__ = ["fold_batch_norms", "frozen_copy", "ieee_float32", "same_arithmetic_copy"]
