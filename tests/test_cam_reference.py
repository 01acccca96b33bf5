"""CAM, Grad-CAM and Score-CAM against direct evaluation of their definitions.

The expected maps are computed here from the definitions in ``/work/shared/methods.md`` (and,
for fast Score-CAM's channel choice, the rule ``explainers.cam.ScoreCAM`` documents), with
plain forward hooks and ``torch.autograd`` on the model itself: nothing of ``explainers``
(capture, lean networks, ONNX Runtime, normalisation) is used to build them. Maps are
compared at feature resolution after the same per-map min-max normalisation ours applies
(``explainers.result.normalize_maps``), with tolerances far below the difference any wrong
formula makes (each test states what it guards).

Targets that are *not* the top-1 class matter: on the real model the top-1's weighted sum
``sum_k w_k A_k`` at ``bn2`` is positive everywhere on the chelsea and coffee photos, so a missing ReLU (or
min-max replaced by max scaling) would not change its map; another class's sum is negative
over most of the grid, and there the ReLU must give exact zeros.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from explainers.cam import CAM, GradCAM, ScoreCAM, ScoreCAMConfig
from explainers.execution import Execution, ExecutionPolicy
from tests.conftest import ESPRESSO
from core.settings import CoreSettings

TABBY, EGYPTIAN_CAT = 281, 285
FAST_CHANNELS = CoreSettings.model_fields["scorecam_channels"].default  # the service's default (32)
ATOL = 1e-4  # maps are in [0, 1]; float rounding (ONNX Runtime, folded batch norm) is ~1e-6


# --- direct evaluation (independent of explainers/) -------------------------------------------

def forward_with_activation(module: nn.Module, layer: str, inputs: torch.Tensor, target: int | None = None):
    """Logits and the output ``A`` of ``layer`` from one forward with a plain hook; with
    ``target``, also ``d logits[0, target] / dA`` by autograd over the whole network."""
    store: dict[str, torch.Tensor] = {}
    handle = module.get_submodule(layer).register_forward_hook(lambda _m, _i, out: store.__setitem__("a", out))
    try:
        if target is None:
            with torch.no_grad():
                logits = module(inputs)
            return logits, store["a"][0].detach(), None
        with torch.enable_grad():
            logits = module(inputs.clone().requires_grad_(True))
            (gradient,) = torch.autograd.grad(logits[0, target], store["a"])
        return logits.detach(), store["a"][0].detach(), gradient[0]
    finally:
        handle.remove()


def minmax(grid: torch.Tensor) -> torch.Tensor:
    return (grid - grid.min()) / (grid.max() - grid.min())


def weighted_sum(weights: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
    """``sum_k w_k A_k`` (before the ReLU), ``h x w``."""
    return (weights[:, None, None] * activations).sum(dim=0)


def direct_gradcam(module, layer, inputs, target):
    logits, acts, grads = forward_with_activation(module, layer, inputs, target)
    raw = weighted_sum(grads.mean(dim=(1, 2)), acts)
    return raw, minmax(raw.clamp(min=0)), grads


def direct_cam(module, head: nn.Linear, layer, inputs, target):
    _, acts, _ = forward_with_activation(module, layer, inputs)
    raw = weighted_sum(head.weight[target], acts)
    return raw, minmax(raw.clamp(min=0))


def channel_scores(module, inputs, acts, channels: torch.Tensor, target: int) -> torch.Tensor:
    """Score-CAM's score of each channel in ``channels``: upsample (bilinear, corners aligned),
    min-max normalise (eps 1e-8), multiply the input, raw target logit. One batch, plain torch."""
    up = F.interpolate(acts[channels][None], size=inputs.shape[-2:], mode="bilinear", align_corners=True)[0]
    low = up.amin(dim=(1, 2), keepdim=True)
    masks = (up - low) / (up.amax(dim=(1, 2), keepdim=True) - low + 1e-8)
    with torch.inference_mode():
        masked = (inputs * masks[:, None]).contiguous(memory_format=torch.channels_last)  # speed only
        return module(masked)[:, target]


def scorecam_map(acts, scores: torch.Tensor) -> torch.Tensor:
    """``ReLU(sum_k softmax(scores)_k A_k)`` normalised; ``-inf`` scores are left out."""
    return minmax(weighted_sum(scores.softmax(dim=0), acts).clamp(min=0))


@pytest.fixture(scope="module")
def resnet(resnet_catalog):
    from models import ModelRegistry, load_catalog

    return ModelRegistry(load_catalog(resnet_catalog), "cpu").get("resnet18_random")


@pytest.fixture(scope="module")
def photos(chelsea, coffee, cat_and_coffee):
    return {"chelsea": chelsea, "coffee": coffee, "cat_and_coffee": cat_and_coffee}


def model_input(model, photos, name):
    return model.preprocessor.to_input(photos[name])[0]


# --- Grad-CAM ---------------------------------------------------------------------------------

# (photo, layer, target): bn2 is the default layer (gradient constant over the grid: global
# pool + linear); blocks.5 sits before conv_head + ReLU6, so its gradient varies spatially and
# a wrong pooling of it (max, sum of positive parts) changes the channel weights' ratios.
GRADCAM_CASES = [
    ("chelsea", "bn2", None),
    ("coffee", "bn2", TABBY),  # not top-1: its weighted sum is negative on ~65% of the grid
    ("cat_and_coffee", "blocks.5", ESPRESSO),  # not top-1 (the cat is)
    ("coffee", "blocks.5", None),
]


@pytest.mark.parametrize("photo,layer,target", GRADCAM_CASES)
def test_gradcam_equals_direct_evaluation(default_model, photos, photo, layer, target):
    """Grad-CAM = minmax(ReLU(sum_k mean_xy(d logit_t / dA_k) A_k)), the target's raw logit."""
    inputs = model_input(default_model, photos, photo)
    ours = GradCAM(default_model.execution, layer=layer).explain(inputs, target)
    if target is None:
        target = int(ours.logits[0].argmax())
    assert int(ours.targets[0]) == target
    _, expected, grads = direct_gradcam(default_model.module, layer, inputs, target)
    if layer != "bn2":  # precondition: the spatial pooling of the gradient matters here
        spread = (grads.amax(dim=(1, 2)) - grads.amin(dim=(1, 2))).max()
        assert float(spread) > 0.5 * float(grads.abs().max())
    assert ours.saliency.shape == (1, *expected.shape)
    assert torch.allclose(ours.saliency[0], expected, atol=ATOL), float((ours.saliency[0] - expected).abs().max())


@pytest.mark.parametrize("photo,layer,target", [("chelsea", "bn2", ESPRESSO), ("coffee", "bn2", TABBY),
                                                ("cat_and_coffee", "blocks.5", EGYPTIAN_CAT)])
def test_gradcam_relu_gives_exact_zeros_on_negative_evidence(default_model, photos, photo, layer, target):
    """Where sum_k w_k A_k < 0 the map is exactly 0 (the ReLU); where it is > 0, positive."""
    inputs = model_input(default_model, photos, photo)
    raw, _, _ = direct_gradcam(default_model.module, layer, inputs, target)
    margin = 1e-3 * float(raw.abs().max())
    negative, positive = raw < -margin, raw > margin
    assert float(negative.float().mean()) >= 0.2  # precondition: plenty of negative evidence
    grid = GradCAM(default_model.execution, layer=layer).explain(inputs, target).saliency[0]
    assert int((grid[negative] != 0).sum()) == 0
    assert bool((grid[positive] > 0).all())
    assert float(grid.max()) == pytest.approx(1.0, abs=1e-5)


def test_gradcam_equals_direct_evaluation_on_resnet(resnet):
    """Random ResNet-18 at layer3 (gradient varies spatially; mixed-sign evidence)."""
    inputs = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(7))
    raw, expected, _ = direct_gradcam(resnet.module, "layer3", inputs, 9)
    assert float((raw < 0).float().mean()) > 0.3  # precondition
    ours = GradCAM(resnet.execution, layer="layer3").explain(inputs, 9).saliency[0]
    assert torch.allclose(ours, expected, atol=ATOL)
    assert int((ours[raw < -1e-3 * float(raw.abs().max())] != 0).sum()) == 0


# --- CAM --------------------------------------------------------------------------------------

@pytest.mark.parametrize("photo,target", [("chelsea", None), ("coffee", TABBY), ("cat_and_coffee", EGYPTIAN_CAT)])
def test_cam_equals_direct_evaluation(default_model, photos, photo, target):
    """CAM = minmax(ReLU(sum_k W[t, k] A_k)) with W the classifier's weight matrix."""
    inputs = model_input(default_model, photos, photo)
    ours = CAM(default_model.execution, layer="bn2").explain(inputs, target)
    if target is None:
        target = int(ours.logits[0].argmax())
    assert int(ours.targets[0]) == target
    raw, expected = direct_cam(default_model.module, default_model.module.classifier, "bn2", inputs, target)
    assert torch.allclose(ours.saliency[0], expected, atol=ATOL), float((ours.saliency[0] - expected).abs().max())
    negative = raw < -1e-3 * float(raw.abs().max())
    assert int((ours.saliency[0][negative] != 0).sum()) == 0


def test_cam_equals_direct_evaluation_on_resnet(resnet):
    inputs = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(7))
    raw, expected = direct_cam(resnet.module, resnet.module.fc, "layer4", inputs, 9)
    assert float((raw < 0).float().mean()) > 0.3  # precondition
    ours = CAM(resnet.execution, layer="layer4").explain(inputs, 9).saliency[0]
    assert torch.allclose(ours, expected, atol=ATOL)
    assert int((ours[raw < -1e-3 * float(raw.abs().max())] != 0).sum()) == 0


# --- Score-CAM --------------------------------------------------------------------------------

def test_exact_scorecam_equals_direct_evaluation(default_model, photos):
    """Exact Score-CAM on the real model at blocks.1 (24 channels, 56 x 56, mixed sign) for a
    target that is not the top-1: every channel scored by its masked input's raw target logit,
    softmax over channels, ReLU. (test_scorecam.py checks the random ResNet's layer2.)"""
    inputs, target = model_input(default_model, photos, "cat_and_coffee"), ESPRESSO
    ours = ScoreCAM(default_model.execution, layer="blocks.1").explain(inputs, target)
    assert ours.details["mode"] == "exact" and int(ours.targets[0]) == target != int(ours.logits[0].argmax())
    _, acts, _ = forward_with_activation(default_model.module, "blocks.1", inputs)
    assert float((acts < 0).float().mean()) > 0.2  # precondition: the final ReLU has work to do
    scores = channel_scores(default_model.module, inputs, acts, torch.arange(acts.shape[0]), target)
    expected = scorecam_map(acts, scores)
    assert torch.allclose(ours.saliency[0], expected, atol=ATOL), float((ours.saliency[0] - expected).abs().max())


class ConstantChannel(nn.Module):
    """conv -> ReLU -> global pool -> linear, explained at the conv (mixed sign); channel 0 is
    constant (zero weights, bias -2): it normalises to the all-zero mask, yet it is still one
    of the softmax's channels and its -2 shifts where the map's ReLU clips."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.relu = nn.ReLU()
        self.head = nn.Linear(6, 3)
        with torch.no_grad():
            self.conv.weight[0] = 0
            self.conv.bias[0] = -2
        self.eval().requires_grad_(False)

    def forward(self, x):
        return self.head(self.relu(self.conv(x)).mean(dim=(2, 3)))


def test_exact_scorecam_with_a_constant_channel_equals_direct_evaluation():
    """The definition over *all* channels, the constant one included (ours scores it once,
    with the zero image)."""
    model = ConstantChannel()
    inputs = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    ours = ScoreCAM(Execution(model, ExecutionPolicy(images_per_forward=4)), layer="conv").explain(inputs, 1)
    assert ours.details["constant_channels"] == 1
    _, acts, _ = forward_with_activation(model, "conv", inputs)
    scores = channel_scores(model, inputs, acts, torch.arange(6), 1)
    expected = scorecam_map(acts, scores)
    without = scores.clone()
    without[0] = -torch.inf
    assert float((expected - scorecam_map(acts, without)).abs().max()) > 100 * ATOL  # precondition
    assert torch.allclose(ours.saliency[0], expected, atol=ATOL), float((ours.saliency[0] - expected).abs().max())


def relevance(ranking: str, acts: torch.Tensor, grads: torch.Tensor | None) -> torch.Tensor:
    """The fast mode's channel relevance as ``ScoreCAM`` documents it (higher = keep)."""
    if ranking == "taylor":
        return (grads * acts).mean(dim=(1, 2))
    flat = acts.flatten(1)
    return flat.mean(dim=1) if ranking == "activation" else flat.var(dim=1)


def fast_scorecam_map(module, inputs, acts, target, chosen: torch.Tensor, constant: torch.Tensor) -> torch.Tensor:
    """Score-CAM restricted to ``chosen``; the constant channels keep their shared score (the
    zero image's: a constant channel normalises to the all-zero mask); the rest are left out."""
    scores = torch.full((acts.shape[0],), -torch.inf)
    scores[chosen] = channel_scores(module, inputs, acts, chosen, target)
    if bool(constant.any()):
        with torch.no_grad():
            scores[constant] = module(torch.zeros_like(inputs))[0, target]
    return scorecam_map(acts, scores)


# (photo, target, ranking, input side, also build the least-relevant map): coffee is the photo
# where keeping the 32 *least* relevant channels still correlates 0.95 with the exact map; the
# activation ranking runs at 160 px (any size works: global pooling) to save time.
FAST_CASES = [("coffee", None, "taylor", 224, True),
              ("cat_and_coffee", ESPRESSO, "taylor", 224, False),  # not top-1: the ranking is the target's
              ("chelsea", None, "activation", 160, False)]


@pytest.mark.parametrize("photo,target,ranking,side,contrast", FAST_CASES)
def test_fast_scorecam_scores_the_most_relevant_channels(default_model, photos, photo, target, ranking, side,
                                                         contrast):
    """Fast Score-CAM at bn2 = Score-CAM over the k non-constant channels of highest relevance
    (taylor: mean_xy(A_k dS/dA_k) of the target's logit; activation: mean_xy A_k), the
    constant channels sharing the zero image's score. On coffee the map of the k *least*
    relevant channels is built too, to show the tolerance is far below the difference."""
    module = default_model.module
    inputs = model_input(default_model, photos, photo)
    if inputs.shape[-1] != side:
        inputs = F.interpolate(inputs, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    ours = ScoreCAM(default_model.execution, ScoreCAMConfig(channels=FAST_CHANNELS, ranking=ranking),
                    layer="bn2").explain(inputs, target)
    assert ours.details["mode"] == "fast" and ours.details["channels"] == FAST_CHANNELS
    if target is None:
        target = int(ours.logits[0].argmax())
    assert int(ours.targets[0]) == target
    _, acts, grads = forward_with_activation(module, "bn2", inputs, target)
    flat = acts.flatten(1)
    constant = flat.amax(dim=1) == flat.amin(dim=1)
    assert ours.details["constant_channels"] == int(constant.sum())
    candidates = (~constant).nonzero().flatten()
    order = relevance(ranking, acts, grads)[candidates].argsort(descending=True)
    expected = fast_scorecam_map(module, inputs, acts, target, candidates[order[:FAST_CHANNELS]], constant)
    if contrast:  # precondition: the channel choice is visible at this tolerance
        wrong = fast_scorecam_map(module, inputs, acts, target, candidates[order[-FAST_CHANNELS:]], constant)
        assert float((expected - wrong).abs().max()) > 100 * ATOL
    assert torch.allclose(ours.saliency[0], expected, atol=ATOL), float((ours.saliency[0] - expected).abs().max())
