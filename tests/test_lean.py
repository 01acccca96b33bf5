"""The lean scoring copy: batch norm folded into convolutions, verified, never a wrong answer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from explainers.fastpath import private_copy
from explainers.lean import fold_batch_norms, lean_network


def batch_norms(module: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def test_default_model_folds_every_batch_norm_and_keeps_its_logits(default_model, chelsea):
    inputs, _ = default_model.preprocessor.to_input(chelsea)
    original = default_model.module
    before = batch_norms(original)
    lean = fold_batch_norms(original, inputs)
    assert lean is not None and before > 40 and batch_norms(lean) == 0
    assert batch_norms(original) == before, "the served model (and its Grad-CAM layer bn2) is untouched"
    with torch.no_grad():
        expected, folded = original(inputs), lean(inputs)
    assert torch.allclose(folded, expected, rtol=1e-4, atol=1e-4)
    assert int(folded.argmax()) == int(expected.argmax())


class SharedConvOutput(nn.Module):
    """A convolution whose output feeds its batch norm AND a residual sum: folding would change
    the residual branch, so the copy must be refused."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            self.norm.running_mean.uniform_(-2, 2)
            self.norm.running_var.uniform_(0.2, 3)
            self.norm.weight.uniform_(0.5, 2)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.head((self.norm(y) + y).mean(dim=(2, 3)))


def test_a_model_folding_would_change_is_scored_as_it_is():
    model = SharedConvOutput()
    example = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    assert fold_batch_norms(model, example) is None
    assert lean_network(model, example) is model


class TF32Probe(nn.Module):
    """Records the TF32 switches whenever it runs (a class-level list: copies share it)."""

    seen: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        TF32Probe.seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        return x


def test_the_fold_check_compares_in_full_float32_and_restores_tf32():
    """On CUDA, cuDNN runs float32 convolutions in TF32 by default (~1e-3 relative error), which
    made the check refuse the lean copy on an H200; the check must run without it."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), TF32Probe(), nn.Flatten()).eval()
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    TF32Probe.seen.clear()
    try:
        assert fold_batch_norms(model, torch.randn(1, 3, 6, 6)) is not None
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    # the pairing forward may run with TF32; both forwards the comparison rests on must not
    assert len(TF32Probe.seen) >= 2 and TF32Probe.seen[-2:] == [(False, False), (False, False)]


def test_lean_copy_is_cached_per_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten()).eval()
    example = torch.randn(1, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    first = lean_network(model, example)
    assert first is not model and batch_norms(first) == 0
    assert lean_network(model, torch.randn(5, 3, 6, 6)) is first
    with torch.no_grad():
        assert torch.allclose(first(example), model(example), atol=1e-5)


@pytest.mark.parametrize("make_copy", [lambda model, example: lean_network(model, example),
                                       lambda model, example: private_copy(model, False)], ids=["lean", "private"])
def test_a_copy_made_under_inference_mode_still_serves_autograd(make_copy):
    """The first caller may be inside torch.inference_mode (SAG, Score-CAM); a cached copy must
    not be made of inference tensors, or a later caller tracking gradients (I-GOS) would fail."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 2)).eval()
    with torch.inference_mode():
        twin = make_copy(model, torch.randn(2, 3, 8, 8))
    assert twin is not model
    inputs = torch.randn(2, 3, 8, 8, requires_grad=True)
    twin(inputs).sum().backward()
    assert inputs.grad is not None and torch.isfinite(inputs.grad).all()
