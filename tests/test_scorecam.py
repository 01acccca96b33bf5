"""Score-CAM: exact vs fast on the real default model, memory, batching, degenerate inputs,
the fast path's CPU behaviour, and the HTTP surface (``method=scorecam``, ``channels``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from explainers.cam import GradCAM, ScoreCAM, ScoreCAMConfig
from explainers.execution import Execution, ExecutionPolicy
from explainers.execution.execution import layer_gradient_pass
from explainers.result import normalize_maps
from tests.conftest import ESPRESSO, jpeg_bytes, left_right_mass
from core.settings import CoreSettings

FAST_CHANNELS = CoreSettings.model_fields["scorecam_channels"].default


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1])


@pytest.fixture(scope="module")
def resnet(resnet_catalog):
    from models import ModelRegistry, load_catalog

    return ModelRegistry(load_catalog(resnet_catalog), "cpu").get("resnet18_random")


@pytest.fixture(scope="module")
def exact_maps(default_model, chelsea, coffee):
    """Exact Score-CAM of both sample photos on efficientnet_lite0 at bn2 (the slow part)."""
    results = {}
    for name, image in (("chelsea", chelsea), ("coffee", coffee)):
        inputs, _ = default_model.preprocessor.to_input(image)
        results[name] = (inputs, ScoreCAM(default_model.execution, layer="bn2").explain(inputs))
    return results


@pytest.mark.parametrize("name", ["chelsea", "coffee"])
def test_fast_mode_correlates_with_exact(default_model, exact_maps, name):
    inputs, exact = exact_maps[name]
    assert exact.details["mode"] == "exact"
    total, constant = exact.details["total_channels"], exact.details["constant_channels"]
    assert total == 1280 and exact.details["channels"] == total - constant
    assert exact.details["forward_passes"] == total - constant + 2  # capture + shared zero-image score
    fast = ScoreCAM(default_model.execution, ScoreCAMConfig(channels=FAST_CHANNELS), layer="bn2").explain(inputs)
    assert fast.details["mode"] == "fast" and fast.details["channels"] == FAST_CHANNELS
    assert fast.details["forward_passes"] == FAST_CHANNELS + 2
    assert torch.equal(fast.targets, exact.targets)
    assert correlation(fast.saliency, exact.saliency) >= 0.9


def test_exact_mode_is_the_reference_definition(resnet):
    """Exact maps equal a direct transcription of the definition (all masked inputs at once)."""
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(1, 3, 48, 48, generator=generator)
    ours = ScoreCAM(resnet.execution.with_policy(images_per_forward=5), layer="layer2").explain(inputs, 11)
    with torch.inference_mode():
        acts = {}
        handle = resnet.module.layer2.register_forward_hook(lambda _m, _i, out: acts.setdefault("a", out))
        resnet.module(inputs)
        handle.remove()
        maps = acts["a"][0]
        up = nn.functional.interpolate(maps[None], size=(48, 48), mode="bilinear", align_corners=True)[0]
        low = up.amin(dim=(1, 2), keepdim=True)
        norm = (up - low) / (up.amax(dim=(1, 2), keepdim=True) - low + 1e-8)
        scores = resnet.module(inputs * norm[:, None])[:, 11]
        expected = (scores.softmax(0)[:, None, None] * maps).sum(0).clamp_min(0)
        expected = (expected - expected.min()) / (expected.max() - expected.min())
    assert torch.allclose(ours.saliency[0], expected, atol=1e-4)


def test_batch_size_does_not_change_the_map(resnet):
    generator = torch.Generator().manual_seed(2)
    inputs = torch.randn(1, 3, 48, 48, generator=generator)
    sizes = (16, 37, 128)  # 37: a short last batch; 128: every channel of layer2 in one batch
    maps = [ScoreCAM(resnet.execution.with_policy(images_per_forward=size), layer="layer2").explain(inputs, 5)
            for size in sizes]
    assert [m.details["batch_size"] for m in maps] == list(sizes)
    for other in maps[1:]:
        assert torch.allclose(maps[0].saliency, other.saliency, atol=1e-5)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operator creates while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel() * tensor.element_size())
        return out


def test_exact_mode_memory_stays_within_one_batch(resnet):
    """No tensor of all channels' masked inputs is ever allocated; the
    batch size follows the memory budget and bounds every forward."""
    side = 48
    inputs = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(4))
    channels = 256  # layer3
    all_masked = channels * 3 * side * side * 4
    per_sample = resnet.execution.bytes_per_image((3, side, side))
    budget_mb = 8 * per_sample / 2**20
    seen = []
    # PyTorch runs the forwards here: the probe sees its tensors (ONNX Runtime's are its own)
    execution = resnet.execution.with_policy(cpu_runtime="torch", memory_budget_mb=budget_mb)
    # the masked forwards run on the scoring network (the folded copy when batch norm folds)
    networks = {resnet.module, execution.folded_network(inputs)}
    handles = [net.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0])) for net in networks]
    try:
        with LargestTensor() as probe:
            result = ScoreCAM(execution, layer="layer3").explain(inputs, 1)
    finally:
        for handle in handles:
            handle.remove()
    assert result.details["mode"] == "exact" and result.details["batch_size"] == 8
    assert max(seen) == 8 and len(seen) >= channels // 8
    assert 8 * per_sample < all_masked / 2  # the budget rules out holding all masked inputs
    assert probe.largest <= 8 * per_sample


def test_blank_image_and_dead_channels_give_no_nan(default_model):
    blank = Image.new("RGB", (64, 48), (128, 128, 128))
    inputs, _ = default_model.preprocessor.to_input(blank)
    result = ScoreCAM(default_model.execution, ScoreCAMConfig(channels=8), layer="bn2").explain(inputs)
    assert torch.isfinite(result.saliency).all()
    assert result.saliency.min() >= 0 and result.saliency.max() <= 1


class HalfDead(nn.Module):
    """A conv layer whose odd channels are dead after the ReLU (or all of them)."""

    def __init__(self, all_dead: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.head = nn.Linear(8, 4)
        with torch.no_grad():
            dead = slice(None) if all_dead else slice(1, None, 2)
            self.conv.weight[dead] = 0
            self.conv.bias[dead] = -1
        self.eval().requires_grad_(False)

    def forward(self, x):
        return self.head(self.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.mark.parametrize("all_dead", [False, True])
def test_dead_channels_cost_one_forward_and_no_nan(all_dead):
    model = HalfDead(all_dead)
    inputs = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    result = ScoreCAM(Execution(model, ExecutionPolicy(images_per_forward=3)), layer="relu").explain(inputs, 2)
    assert torch.isfinite(result.saliency).all()
    assert result.details["constant_channels"] == (8 if all_dead else 4)
    assert result.details["forward_passes"] == 1 + result.details["channels"] + 1
    if all_dead:
        assert float(result.saliency.abs().max()) == 0.0


def test_espresso_map_lies_on_the_cup(default_model, cat_and_coffee):
    inputs, _ = default_model.preprocessor.to_input(cat_and_coffee)
    result = ScoreCAM(default_model.execution, ScoreCAMConfig(channels=FAST_CHANNELS), layer="bn2").explain(
        inputs, ESPRESSO)
    _, right = left_right_mass(result.saliency[0].numpy())
    assert right >= 0.7


def test_cpu_fast_path_defaults_are_exact(default_model):
    settings = CoreSettings()
    fast = settings.execution_policy()
    cpu = torch.device("cpu")
    assert fast.dtype(cpu, "scores") is None and not fast.wants_runners(cpu)
    assert ExecutionPolicy(precision="fp32").dtype(torch.device("cuda"), "scores") is None
    assert ExecutionPolicy(precision="auto").dtype(torch.device("cuda"), "scores") == torch.float16


def test_reduced_precision_keeps_maps_within_099(resnet):
    """bf16 autocast (runnable on the CPU) keeps Score-CAM and Grad-CAM maps close to fp32."""
    inputs = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    exact, bf16 = resnet.execution.with_policy(precision="fp32"), resnet.execution.with_policy(precision="bf16")
    for make in (lambda execution: ScoreCAM(execution.with_policy(images_per_forward=32), ScoreCAMConfig(channels=32),
                                            layer="layer3"),
                 lambda execution: GradCAM(execution, layer="layer3")):
        full, low = make(exact).explain(inputs, 9), make(bf16).explain(inputs, 9)
        assert low.details["precision"] == "bf16" and full.details["precision"] == "fp32"
        assert correlation(full.saliency, low.saliency) >= 0.99


def post_explain(url: str, image: bytes, **fields):
    import httpx

    data = {key: str(value) for key, value in fields.items()}
    return httpx.post(url + "/v1/explain", files={"image": ("x.jpg", image, "image/jpeg")}, data=data, timeout=120)


def test_api_scorecam_reports_mode_and_validates_channels(api_server, chelsea):
    image = jpeg_bytes(chelsea.resize((96, 64)))
    response = post_explain(api_server, image, method="scorecam", model="resnet18_random", channels=6)
    assert response.status_code == 200, response.text
    details = response.json()["details"]
    assert details["mode"] == "fast" and details["channels"] == 6 and details["forward_passes"] <= 8
    assert details["runtime"] == "onnxruntime"  # UNBOX_CPU_RUNTIME=auto on the CPU: the service default
    assert response.json()["method"] == "scorecam"
    for fields in ({"method": "scorecam", "channels": "many"}, {"method": "scorecam", "channels": 0},
                   {"method": "gradcam", "channels": 4}):
        rejected = post_explain(api_server, image, model="resnet18_random", **fields)
        assert rejected.status_code == 422, fields
        assert rejected.json()["error"]["code"] == "invalid_parameter"


def test_graph_pass_matches_eager_gradcam(resnet):
    """The sync-free forward + backward that a CUDA graph records (run eagerly here) gives
    Grad-CAM's maps, picking the top-1 on the device where asked."""
    inputs = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    targets, top1 = torch.tensor([3, 5]), torch.tensor([True, False])
    logits, activations, gradients, chosen = layer_gradient_pass(
        resnet.module, "layer4", inputs, lambda logits: torch.where(top1, logits.argmax(dim=1), targets))
    assert chosen.tolist() == [int(logits[0].argmax()), 5]
    eager = GradCAM(Execution(resnet.module, ExecutionPolicy()), layer="layer4").explain(inputs, chosen.tolist())
    weights = gradients.float().mean(dim=(2, 3))
    maps = torch.einsum("bk,bkhw->bhw", weights, activations.float()).clamp_min_(0)
    assert torch.allclose(eager.saliency, normalize_maps(maps), atol=1e-5)
