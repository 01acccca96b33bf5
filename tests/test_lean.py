"""The lean scoring copy: batch norm folded into convolutions, verified, never a wrong answer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from explainers.execution import Execution, ExecutionPolicy
from explainers.execution.lean import fold_batch_norms


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
    assert Execution(model).folded_network(example) is model


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
    execution = Execution(model)
    first = execution.folded_network(example)
    assert first is not model and batch_norms(first) == 0
    assert execution.folded_network(torch.randn(5, 3, 6, 6)) is first
    assert execution.with_policy(precision="bf16").folded_network(example) is first  # views share the copy
    with torch.no_grad():
        assert torch.allclose(first(example), model(example), atol=1e-5)


@pytest.mark.parametrize("make_copy", [
    lambda model, example: Execution(model).folded_network(example),
    lambda model, example: Execution(model, ExecutionPolicy(channels_last=False)).private_copy()],
    ids=["lean", "private"])
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


# -- layer swaps (explainers.execution.lean_layers) --------------------------------------------
@pytest.mark.parametrize("kernel,stride,groups", [(3, 2, 6), (5, 2, 6), (3, 2, 1), (3, 1, 6), (5, 1, 1)])
@pytest.mark.parametrize("size", [(8, 8), (9, 9), (8, 11), (7, 10)])
def test_shifted_same_conv_equals_the_padded_same_conv(kernel, stride, groups, size):
    """Odd and even sides, square or not: the pad through the kernel reads the very taps the
    padded convolution reads (stride 2 on an even side pads one more after than before)."""
    from timm.layers import Conv2dSame

    from explainers.execution.lean_layers import ShiftedSameConv

    torch.manual_seed(3)
    same = Conv2dSame(6, 6, kernel, stride=stride, groups=groups).eval().requires_grad_(False)
    shifted = ShiftedSameConv(same)
    assert shifted.kernel_size == same.kernel_size, "receptive-field geometry reads the original kernel"
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 6, *size).contiguous(memory_format=memory_format)
        a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        expected, got = same(a), shifted(b)
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, atol=1e-6)
        weights = torch.randn_like(expected)
        (expected * weights).sum().backward()
        (got * weights).sum().backward()
        assert torch.allclose(b.grad, a.grad, atol=1e-6)


def test_grad_aware_hardtanh_is_in_place_only_without_autograd():
    from explainers.execution.lean_layers import GradAwareHardtanh

    act = GradAwareHardtanh(0.0, 6.0)
    x = torch.linspace(-3, 9, 25)
    with torch.no_grad():
        y = x.clone()
        assert act(y).data_ptr() == y.data_ptr() and float(y.min()) == 0 and float(y.max()) == 6
    leaf = x.clone().requires_grad_(True)
    out = act(leaf)
    assert torch.equal(leaf.detach(), x), "under autograd the input is left as it was"
    out.sum().backward()
    reference = x.clone().requires_grad_(True)
    nn.ReLU6()(reference).sum().backward()
    assert torch.equal(leaf.grad, reference.grad)


def test_default_models_cpu_lean_copy_pads_through_kernels_and_keeps_its_logits(default_model, chelsea):
    from timm.layers import Conv2dSame

    from explainers.execution.lean_layers import GradAwareHardtanh, ShiftedSameConv

    inputs, _ = default_model.preprocessor.to_input(chelsea)
    lean = fold_batch_norms(default_model.module, inputs, pad_in_kernels=True)
    kinds = [type(m) for m in lean.modules()]
    assert kinds.count(ShiftedSameConv) == 5 and Conv2dSame not in kinds  # the stem and four stride-2 stages
    assert kinds.count(GradAwareHardtanh) > 30
    assert not any(isinstance(m, nn.Hardtanh) and m.inplace for m in lean.modules())
    with torch.no_grad():
        expected, got = default_model.module(inputs), lean(inputs.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_same_arithmetic_copy_keeps_the_loaded_networks_logits_bit_for_bit(default_model, chelsea):
    """SAG's coarse ordering hangs on float rounding, so its copy swaps layers only where the
    arithmetic stays the model's own: batch norm unfolded, logits identical to the last bit."""
    from explainers.execution.lean import same_arithmetic_copy
    from explainers.execution.lean_layers import ShiftedSameConv

    inputs, _ = default_model.preprocessor.to_input(chelsea)
    twin = same_arithmetic_copy(default_model.module, inputs)
    assert twin is not None and batch_norms(twin) == batch_norms(default_model.module)
    assert sum(isinstance(m, ShiftedSameConv) for m in twin.modules()) == 5
    with torch.no_grad():
        assert torch.equal(twin(inputs), default_model.module(inputs))
    network = default_model.execution.same_arithmetic_network(inputs)
    assert network is not default_model.module and batch_norms(network) == batch_norms(default_model.module)
