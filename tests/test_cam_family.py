"""Grad-CAM++, XGrad-CAM, LayerCAM, HiResCAM and Eigen-CAM (explainers/gradient_cams.py).

Parity: each method against pytorch-grad-cam (the reference users compare with) on the real
default model (efficientnet_lite0) at its default layer ``bn2``, same input and target, maps
compared at input resolution with the helpers of ``tests/test_cams_parity.py``: the coffee photo
for espresso (967) and the cat photo for its top-1 class.

At ``bn2`` (a BatchNorm + ReLU6 right before global pooling and the linear head) the gradient
is constant over the grid, so HiResCAM and XGrad-CAM coincide with Grad-CAM there (by their
definitions, not by accident: that is asserted). Their definitions are therefore also checked
at ``blocks.6``, where the gradient varies spatially (``conv_head`` + ReLU6 lie after it),
against direct autograd evaluation (``tests/test_cam_reference.py``'s hooks, nothing of
``explainers``), and Grad-CAM++'s and XGrad-CAM's weights on a hand-made example computed by hand.

Eigen-CAM's sign: an SVD's singular vectors are defined up to sign and pytorch-grad-cam's
``EigenCAM`` keeps numpy's. Ours fixes it with the rule of pytorch-grad-cam's own
``get_2d_projection_with_sign_correction`` (flip when ``|min| > |max|``), so it is compared with
that sign-corrected projection of the activations the reference captured (ReLU and resize as the
reference does); and with the reference ``EigenCAM`` itself whenever numpy's sign already
satisfies the rule (it does for both photos with the installed numpy, but a LAPACK that returns
the other sign must not fail the test: the reference would then show the negative lobe).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from pytorch_grad_cam import EigenCAM as ReferenceEigenCAM
from pytorch_grad_cam import GradCAMPlusPlus as ReferenceGradCAMPlusPlus
from pytorch_grad_cam import HiResCAM as ReferenceHiResCAM
from pytorch_grad_cam import LayerCAM as ReferenceLayerCAM
from pytorch_grad_cam import XGradCAM as ReferenceXGradCAM
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection, get_2d_projection_with_sign_correction
from torch import nn

from explainers.cam import GradCAM
from explainers.execution import Execution, ExecutionPolicy
from explainers.gradient_cams import EigenCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM
from explainers.registry import METHODS, SYNCHRONOUS, create
from tests.conftest import ESPRESSO, left_right_mass
from tests.test_cam_reference import forward_with_activation, minmax
from tests.test_cams_parity import correlation, reference_maps, upsampled

EGYPTIAN_CAT = 285
GRADIENT_METHODS = {GradCAMPlusPlus: ReferenceGradCAMPlusPlus, XGradCAM: ReferenceXGradCAM,
                    LayerCAM: ReferenceLayerCAM, HiResCAM: ReferenceHiResCAM}
FAMILY = ("gradcam++", "xgradcam", "layercam", "hirescam", "eigencam")


@pytest.fixture(scope="module")
def photos(default_model, coffee, chelsea, cat_and_coffee):
    """(input, target) per photo: espresso on the coffee photo, the top-1 class on the cat."""
    coffee_input = default_model.preprocessor.to_input(coffee)[0]
    cat_input = default_model.preprocessor.to_input(chelsea)[0]
    both = default_model.preprocessor.to_input(cat_and_coffee)[0]
    return {"coffee": (coffee_input, ESPRESSO), "chelsea": (cat_input, int(default_model.logits(cat_input).argmax())),
            "cat_and_coffee": (both, None)}


@pytest.fixture(scope="module")
def explained(default_model, photos):
    """``explained(method, photo, layer)``: our explanation of the photo's target, computed once."""
    done = {}

    def explain(method, photo: str, layer: str = "bn2"):
        if (method, photo, layer) not in done:
            inputs, target = photos[photo]
            done[method, photo, layer] = method(default_model.execution, layer=layer).explain(inputs, target)
        return done[method, photo, layer]

    return explain


@pytest.fixture(scope="module")
def direct_blocks6(default_model, photos):
    """(A, d espresso logit / dA) of the coffee photo at blocks.6 by plain hooks and autograd."""
    inputs, target = photos["coffee"]
    _, activations, gradients = forward_with_activation(default_model.module, "blocks.6", inputs, target)
    return activations, gradients


# --- parity with pytorch-grad-cam -------------------------------------------------------------

@pytest.mark.parametrize("photo", ["coffee", "chelsea"])
@pytest.mark.parametrize("method", list(GRADIENT_METHODS), ids=lambda method: method.name)
def test_gradient_methods_match_pytorch_grad_cam(default_model, photos, explained, method, photo):
    inputs, target = photos[photo]
    ours = explained(method, photo)
    assert int(ours.targets[0]) == target and ours.method == method.name
    reference = reference_maps(GRADIENT_METHODS[method], default_model.module, "bn2", inputs, target)
    assert correlation(upsampled(ours.saliency, inputs.shape[-2:]), reference) >= 0.99


def reference_eigencam(module: nn.Module, layer: str, inputs: torch.Tensor) -> tuple[np.ndarray, np.ndarray, bool]:
    """The reference EigenCAM's maps, the sign-corrected projection of the same activations
    (ReLU, then resized and scaled as the reference scales its maps) and whether numpy's sign
    already satisfies the correction rule for every image."""
    twin = copy.deepcopy(module).requires_grad_(True)
    cam = ReferenceEigenCAM(model=twin, target_layers=[twin.get_submodule(layer)])
    plain = cam(inputs, targets=None)
    activations = cam.activations_and_grads.activations[0].numpy()
    size = (inputs.shape[-1], inputs.shape[-2])
    corrected = scale_cam_image(np.maximum(get_2d_projection_with_sign_correction(activations), 0), size)
    raw = get_2d_projection(activations)
    agrees = bool(np.all(np.abs(raw.min(axis=(1, 2))) <= np.abs(raw.max(axis=(1, 2)))))
    return corrected, plain, agrees


@pytest.mark.parametrize("photo", ["coffee", "chelsea"])
def test_eigencam_matches_the_sign_corrected_reference(default_model, photos, explained, photo):
    inputs, target = photos[photo]
    ours = explained(EigenCAM, photo)
    assert int(ours.targets[0]) == target  # class-agnostic, but the target is still reported
    corrected, plain, agrees = reference_eigencam(default_model.module, "bn2", inputs)
    mine = upsampled(ours.saliency, inputs.shape[-2:])
    assert correlation(mine, corrected) >= 0.99
    if agrees:
        assert correlation(mine, plain) >= 0.99


# --- behaviour ----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", list(GRADIENT_METHODS), ids=lambda method: method.name)
def test_gradient_maps_follow_the_class(default_model, photos, method):
    """On the cat | coffee collage the espresso map peaks on the cup (right half), the cat's on
    the cat (left half), and espresso puts clearly more mass on the right than the cat does.
    (Grad-CAM++ and LayerCAM at bn2 spread more mass over the image than Grad-CAM, so the
    shares are compared between the classes rather than against a fixed 70 %.)"""
    inputs, _ = photos["cat_and_coffee"]
    both = method(default_model.execution, layer="bn2").explain(inputs.repeat(2, 1, 1, 1), [ESPRESSO, EGYPTIAN_CAT])
    assert both.targets.tolist() == [ESPRESSO, EGYPTIAN_CAT]  # one target per image of the batch
    espresso, cat = both.saliency.numpy()
    middle = espresso.shape[1] // 2  # 7 columns: 0-2 cat, 3 the seam, 4-6 coffee
    assert np.unravel_index(espresso.argmax(), espresso.shape)[1] > middle
    assert np.unravel_index(cat.argmax(), cat.shape)[1] < middle
    assert left_right_mass(espresso)[1] - left_right_mass(cat)[1] >= 0.2


@pytest.mark.parametrize("method", [HiResCAM, LayerCAM], ids=lambda method: method.name)
def test_element_wise_maps_equal_direct_evaluation(explained, direct_blocks6, method):
    """HiResCAM = minmax(ReLU(sum_k g * A)), LayerCAM = minmax(ReLU(sum_k ReLU(g) * A)), with
    g = d logit / dA by plain autograd, at blocks.6 where g varies over the grid and changes sign."""
    ours = explained(method, "coffee", "blocks.6")
    activations, gradients = direct_blocks6
    spread = gradients.amax(dim=(1, 2)) - gradients.amin(dim=(1, 2))
    assert float(spread.max()) > 0.5 * float(gradients.abs().max())  # precondition: not pooled weights
    assert bool((gradients < 0).any()) and bool((gradients > 0).any())
    g = gradients if method is HiResCAM else gradients.clamp_min(0)
    expected = minmax((g * activations).sum(dim=0).clamp_min(0))
    assert torch.allclose(ours.saliency[0], expected, atol=1e-4), float((ours.saliency[0] - expected).abs().max())
    gradcam = explained(GradCAM, "coffee", "blocks.6").saliency[0]
    assert float((ours.saliency[0] - gradcam).abs().max()) > 0.1  # not Grad-CAM where g varies


def test_where_the_gradient_is_constant_hirescam_and_xgradcam_are_gradcam(explained):
    """At bn2 (global pooling + linear head next) g_kij = g_k: HiResCAM's sum_k g_k A_k and
    XGrad-CAM's w_k = g_k sum A_k / sum A_k are Grad-CAM's map; LayerCAM (only the positive
    g_k) and Grad-CAM++ (alpha depends on sum A_k) are not."""
    gradcam = explained(GradCAM, "coffee").saliency
    for method in (HiResCAM, XGradCAM):
        same = explained(method, "coffee").saliency
        assert torch.allclose(same, gradcam, atol=1e-5), method.name
    for method in (LayerCAM, GradCAMPlusPlus):
        other = explained(method, "coffee").saliency
        assert float((other - gradcam).abs().max()) > 0.1, method.name


class Grid(nn.Module):
    """The input itself is the layer ``features`` (``1 x 2 x 2 x 2``); logits = a linear map of it,
    so d logit_t / dA = ``weight[t]`` reshaped: the gradient is chosen by hand."""

    def __init__(self, gradient: torch.Tensor) -> None:
        super().__init__()
        self.features = nn.Identity()
        self.head = nn.Linear(gradient.numel(), 2, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.stack([gradient.flatten(), torch.zeros(gradient.numel())]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


# channel 0: A sums to 10, g = 1, -1, 0, 2; channel 1: A sums to 2, g = 0.5 everywhere
HAND_A = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [1.0, 0.0]]]])
HAND_G = torch.tensor([[[1.0, -1.0], [0.0, 2.0]], [[0.5, 0.5], [0.5, 0.5]]])


def test_gradcam_plus_plus_weights_by_hand():
    """alpha = g^2 / (2 g^2 + sum(A) g^3 + 1e-6), w_k = sum alpha ReLU(g).
    Channel 0: g = 1 -> 1/12; g = -1 -> ReLU(g) = 0; g = 0 -> 0; g = 2 -> 4/88, times 2:
    w_0 = 1/12 + 1/11 = 23/132. Channel 1: alpha = 0.25 / (0.5 + 2 * 0.125) = 1/3 at each of
    4 cells, times 0.5: w_1 = 2/3."""
    method = GradCAMPlusPlus(Execution(Grid(HAND_G), ExecutionPolicy(cpu_runtime="torch")), layer="features")
    weights = method.channel_weights(None, HAND_A, HAND_A, None, torch.tensor([0]), HAND_G[None])
    assert torch.allclose(weights, torch.tensor([[23 / 132, 2 / 3]]), rtol=1e-5)
    result = method.explain(HAND_A, 0)
    expected = minmax((23 / 132) * HAND_A[0, 0] + (2 / 3) * HAND_A[0, 1])
    assert torch.allclose(result.saliency[0], expected, atol=1e-6)  # the real capture, gradient and map


def test_xgradcam_weights_by_hand():
    """w_k = sum_ij A g / (sum A + 1e-7): (1 - 2 + 0 + 8) / 10 = 0.7 and (0.5 + 0.5) / 2 = 0.5."""
    method = XGradCAM(Execution(Grid(HAND_G), ExecutionPolicy(cpu_runtime="torch")), layer="features")
    weights = method.channel_weights(None, HAND_A, HAND_A, None, torch.tensor([0]), HAND_G[None])
    assert torch.allclose(weights, torch.tensor([[0.7, 0.5]]), rtol=1e-5)
    expected = minmax(0.7 * HAND_A[0, 0] + 0.5 * HAND_A[0, 1])
    assert torch.allclose(method.explain(HAND_A, 0).saliency[0], expected, atol=1e-6)


def test_eigencam_is_class_agnostic_and_its_sign_is_fixed(default_model, photos):
    inputs, _ = photos["cat_and_coffee"]
    method = EigenCAM(default_model.execution, layer="bn2")
    espresso, cat = method.explain(inputs, ESPRESSO), method.explain(inputs, EGYPTIAN_CAT)
    assert torch.equal(espresso.saliency, cat.saliency)
    assert espresso.targets.tolist() == [ESPRESSO] and cat.targets.tolist() == [EGYPTIAN_CAT]
    _, activations = default_model.execution.session().capture(inputs, "bn2")
    projection = method.cam_map(None, inputs, activations, None, None, None)
    assert float(projection.max()) >= abs(float(projection.min()))  # the dominant lobe is positive
    flipped = method.cam_map(None, inputs, -activations, None, None, None)  # SVD sees the other sign
    assert torch.allclose(flipped, projection, atol=1e-4 * float(projection.abs().max()))


# --- served by the registry -----------------------------------------------------------------------

def test_the_family_is_served_synchronously():
    from app.schemas import SYNC_METHOD_NAMES
    from workers.methods import load_builtin_methods

    assert set(FAMILY) <= set(SYNCHRONOUS)
    assert set(FAMILY) <= set(SYNC_METHOD_NAMES["enum"])  # the /v1/explain method enum
    assert set(FAMILY) <= set(load_builtin_methods())  # GET /v1/jobs/methods
    for name in FAMILY:
        assert METHODS[name].name == name and METHODS[name].description
        assert METHODS[name].needs_gradient == (name != "eigencam")
    assert "class-agnostic" in METHODS["eigencam"].description
    tiny = Execution(Grid(HAND_G), ExecutionPolicy(cpu_runtime="torch"))
    for name in FAMILY:
        result = create(name, tiny, layer="features", synchronous=True).explain(HAND_A)
        assert result.method == name and result.saliency.shape == (1, 2, 2)
