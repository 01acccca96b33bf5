"""Our Grad-CAM and Score-CAM against pytorch-grad-cam (the reference users compare with).

Same model, layer and input; maps compared at input resolution, ours upsampled the way
pytorch-grad-cam resizes its own (bilinear, half-pixel centres as OpenCV does).
pytorch-grad-cam needs parameters that require grad, so it gets its own copy of the module
(our models are frozen). Its Score-CAM runs one forward per channel of the layer, so the
Score-CAM cases use layers with few channels (efficientnet_lite0's ``blocks.1``: 24 channels;
ResNet-18's ``layer2`` at a 64-pixel input: 128 channels): the real default model at
``bn2`` has 1280 channels and takes pytorch-grad-cam about two minutes on a 2-core CPU.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_grad_cam import GradCAM as ReferenceGradCAM
from pytorch_grad_cam import ScoreCAM as ReferenceScoreCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from explainers.cam import GradCAM, ScoreCAM


@pytest.fixture(scope="module")
def resnet(resnet_catalog):
    """torchvision ResNet-18 with fixed random weights, loaded through our catalogue."""
    from models import ModelRegistry, load_catalog

    return ModelRegistry(load_catalog(resnet_catalog), "cpu").get("resnet18_random")


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def upsampled(saliency: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Our feature-resolution map at input size, as pytorch-grad-cam resizes its maps."""
    return F.interpolate(saliency[None].float(), size=size, mode="bilinear", align_corners=False)[0].numpy()


def reference_maps(kind, module: torch.nn.Module, layer: str, inputs: torch.Tensor, target: int) -> np.ndarray:
    twin = copy.deepcopy(module).requires_grad_(True)
    cam = kind(model=twin, target_layers=[twin.get_submodule(layer)])
    if kind is ReferenceScoreCAM:
        cam.batch_size = 64  # speed only: the reference's maps do not depend on it
    return cam(inputs, targets=[ClassifierOutputTarget(target)])


def test_gradcam_matches_pytorch_grad_cam_on_resnet(resnet, chelsea):
    inputs, _ = resnet.preprocessor.to_input(chelsea)
    ours = GradCAM(resnet.execution, layer="layer4").explain(inputs, 281)
    reference = reference_maps(ReferenceGradCAM, resnet.module, "layer4", inputs, 281)
    assert correlation(upsampled(ours.saliency, inputs.shape[-2:]), reference) >= 0.99


def test_gradcam_matches_pytorch_grad_cam_on_default_model(default_model, coffee):
    inputs, _ = default_model.preprocessor.to_input(coffee)
    ours = GradCAM(default_model.execution, layer="bn2").explain(inputs, 967)
    reference = reference_maps(ReferenceGradCAM, default_model.module, "bn2", inputs, 967)
    assert correlation(upsampled(ours.saliency, inputs.shape[-2:]), reference) >= 0.99


def test_scorecam_matches_pytorch_grad_cam_on_default_model(default_model, chelsea):
    inputs, _ = default_model.preprocessor.to_input(chelsea)
    ours = ScoreCAM(default_model.execution, layer="blocks.1").explain(inputs, 285)
    assert ours.details["mode"] == "exact"
    reference = reference_maps(ReferenceScoreCAM, default_model.module, "blocks.1", inputs, 285)
    assert correlation(upsampled(ours.saliency, inputs.shape[-2:]), reference) >= 0.99


def test_scorecam_matches_pytorch_grad_cam_on_resnet(resnet):
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(1, 3, 64, 64, generator=generator)
    ours = ScoreCAM(resnet.execution.with_policy(images_per_forward=16), layer="layer2").explain(inputs, 7)
    reference = reference_maps(ReferenceScoreCAM, resnet.module, "layer2", inputs, 7)
    assert correlation(upsampled(ours.saliency, (64, 64)), reference) >= 0.99
