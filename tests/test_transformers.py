"""Transformers through the catalogue: layouts, default layers and parity with pytorch-grad-cam.

Small Vision Transformers (timm ViT, a distilled DeiT with two prefix tokens, timm Swin) and
torchvision's ViT-B/16 and Swin-T, with fixed random weights saved to files and declared in a
catalogue (nothing is downloaded). pytorch-grad-cam explains them with the ``reshape_transform``
its tutorials give for each family; our capture finds the layout from the model's own
metadata. Maps are compared at input resolution (correlation >= 0.99, same layer and input).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM as ReferenceGradCAM
from pytorch_grad_cam import ScoreCAM as ReferenceScoreCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from explainers.errors import ExplainError
from explainers.registry import create
from tests.test_cams_parity import correlation, upsampled

SMALL_VIT = {"img_size": 64, "depth": 2, "embed_dim": 48, "num_heads": 3}
# name: (source, options, input size, expected default layer, layout of that layer)
TRANSFORMERS: dict[str, tuple[str, dict[str, object], int, str]] = {
    "vit_small_random": ("timm:vit_tiny_patch16_224", SMALL_VIT, 64, "blocks.1.norm1"),
    "deit_distilled_random": ("timm:deit_tiny_distilled_patch16_224", SMALL_VIT, 64, "blocks.1.norm1"),
    "swin_small_random": ("timm:swin_tiny_patch4_window7_224",
                          {"img_size": 64, "embed_dim": 24, "depths": [1, 1, 2, 1], "num_heads": [1, 2, 2, 4],
                           "window_size": 4}, 64, "layers.3.blocks.0.norm2"),
    "tv_swin_random": ("torchvision:swin_t", {}, 128, "features.7.1.norm2"),
    "tv_vit_random": ("torchvision:vit_b_16", {"image_size": 64}, 64, "encoder.layers.encoder_layer_11.ln_1"),
}


def _toml_value(value: object) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


@pytest.fixture(scope="session")
def transformer_catalog(tmp_path_factory) -> Path:
    """The catalogue of :data:`TRANSFORMERS`, each with fixed random weights saved to a file."""
    from models.build import build_module
    from models.catalog import ModelSpec

    folder = tmp_path_factory.mktemp("transformers")
    entries = []
    for seed, (name, (source, options, size, _layer)) in enumerate(TRANSFORMERS.items()):
        torch.manual_seed(seed)
        module = build_module(ModelSpec(name=name, source=source, options=options, input_size=size), 1000)
        for parameter in module.parameters():  # torchvision's ViT starts with a zero head: no gradient at all
            if parameter.dim() >= 2 and not parameter.any():
                parameter.normal_(0.0, 0.02)
        torch.save(module.state_dict(), folder / f"{name}.pt")
        table = ", ".join(f"{key} = {_toml_value(value)}" for key, value in options.items())
        entries.append(f'[models.{name}]\nsource = "{source}"\nweights = "{name}.pt"\ninput_size = {size}\n'
                       + (f"options = {{ {table} }}\n" if table else ""))
    (folder / "catalog.toml").write_text("\n".join(entries))
    return folder / "catalog.toml"


@pytest.fixture(scope="module")
def transformers(transformer_catalog):
    from explainers.execution import ExecutionPolicy
    from models import ModelRegistry, load_catalog

    # not warmed at load: the fast variants build on first use, when a test needs them
    return ModelRegistry(load_catalog(transformer_catalog), "cpu", ExecutionPolicy(warmup=False))


def reshape_transform_for(model) -> object:
    """pytorch-grad-cam's reshape for the family, written from the model's facts by hand: ViT
    tokens minus the prefix tokens on the patch grid (its ViT / DeiT tutorials), Swin's tokens
    on the last stage's grid (its Swin tutorial; timm's blocks normalise B x N x C) or its
    channels-last maps permuted (torchvision's blocks normalise B x h x w x C)."""
    module = model.module
    prefix = getattr(module, "num_prefix_tokens", 1 if hasattr(module, "class_token") else 0)
    side = reference_grid(model)[0]

    def reshape(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() == 4:
            return tensor.permute(0, 3, 1, 2)
        grid = tensor[:, prefix:, :].reshape(tensor.size(0), side, side, tensor.size(2))
        return grid.transpose(2, 3).transpose(1, 2)

    return reshape


def reference_map(kind, model, layer: str, inputs: torch.Tensor, target: int) -> np.ndarray:
    import copy

    twin = copy.deepcopy(model.module).requires_grad_(True)
    cam = kind(model=twin, target_layers=[twin.get_submodule(layer)], reshape_transform=reshape_transform_for(model))
    if kind is ReferenceScoreCAM:
        cam.batch_size = 64  # speed only
    return cam(inputs, targets=[ClassifierOutputTarget(target)])


def _inputs(model, image) -> torch.Tensor:
    return model.preprocessor.to_input(image)[0]


@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_default_layer_is_the_one_the_literature_uses(transformers, name):
    assert transformers.get(name).default_layer == TRANSFORMERS[name][3]


@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_gradcam_matches_pytorch_grad_cam(transformers, name, chelsea):
    model = transformers.get(name)
    inputs, layer = _inputs(model, chelsea), model.default_layer
    gradcam = create("gradcam", model.execution, layer=layer)
    # random weights: the first of the top-5 classes whose map is not all negative (empty)
    for target in model.logits(inputs)[0].topk(5).indices.tolist():
        ours = gradcam.explain(inputs, target)
        if ours.saliency.max() > 0:
            break
    reference = reference_map(ReferenceGradCAM, model, layer, inputs, target)
    assert ours.saliency.shape[-2:] == reference_grid(model)
    assert reference.max() > 0, "a random model whose map is empty compares nothing"
    assert correlation(upsampled(ours.saliency, inputs.shape[-2:]), reference) >= 0.99


def reference_grid(model) -> tuple[int, int]:
    """The feature grid of the default layer: patch grid for ViTs, last stage for Swin."""
    size = model.spec.input_size
    stride = 32 if "swin" in type(model.module).__name__.lower() else 16
    return (size // stride, size // stride)


@pytest.mark.parametrize("name", ["vit_small_random", "deit_distilled_random", "swin_small_random"])
def test_scorecam_matches_pytorch_grad_cam(transformers, name, coffee):
    model = transformers.get(name)
    inputs, layer = _inputs(model, coffee), model.default_layer
    target = int(model.logits(inputs).argmax())
    ours = create("scorecam", model.execution, layer=layer).explain(inputs, target)
    assert ours.details["mode"] == "exact"
    reference = reference_map(ReferenceScoreCAM, model, layer, inputs, target)
    assert correlation(upsampled(ours.saliency, inputs.shape[-2:]), reference) >= 0.99


def test_fast_scorecam_runs_on_tokens(transformers, coffee):
    """The fast mode ranks channels by d score / d A * A through the token layout."""
    from explainers.cam import ScoreCAMConfig

    model = transformers.get("deit_distilled_random")
    result = create("scorecam", model.execution, ScoreCAMConfig(channels=8), model.default_layer).explain(
        _inputs(model, coffee))
    assert result.details["mode"] == "fast" and result.details["channels"] == 8
    assert result.saliency.shape[-2:] == (4, 4)


def test_the_distilled_tokens_are_not_part_of_the_map(transformers, chelsea):
    """DeiT's class and distillation tokens come first: the 4 x 4 grid is tokens 2..17. Reading
    one prefix token only would shift every patch by one and put the last patch token off
    the grid; the capture must use the model's two."""
    model = transformers.get("deit_distilled_random")
    inputs = _inputs(model, chelsea)
    _, activations = model.execution.session().capture(inputs, model.default_layer, reduced_precision=False)
    tokens = {}
    handle = model.module.get_submodule(model.default_layer).register_forward_hook(
        lambda _m, _i, out: tokens.__setitem__("out", out.detach()))
    with torch.inference_mode():
        model.module(inputs)
    handle.remove()
    expected = tokens["out"][:, 2:, :].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    assert torch.equal(activations, expected)


def test_attention_heads_are_refused_with_the_layer_and_shape(transformers, chelsea):
    model = transformers.get("vit_small_random")
    inputs = _inputs(model, chelsea)
    with pytest.raises(ExplainError) as refused:
        create("gradcam", model.execution, layer="blocks.1.attn.k_norm").explain(inputs)
    assert refused.value.code == "layer_unsupported"
    assert "blocks.1.attn.k_norm" in refused.value.message and "(1, 3, 17, 16)" in refused.value.message


def test_the_patch_embedding_is_never_the_default(transformers):
    for name in TRANSFORMERS:
        layer = transformers.get(name).default_layer
        assert "patch_embed" not in layer and "conv_proj" not in layer and layer not in ("permute", "norm")


@pytest.mark.parametrize("name", ["swin_small_random", "tv_swin_random"])
def test_cam_where_the_head_allows_it(transformers, name, chelsea):
    """Swin's logits are a linear layer on the global average of its final (channels-last)
    norm, so CAM applies there and equals Grad-CAM at that layer up to scale."""
    model = transformers.get(name)
    inputs = _inputs(model, chelsea)
    target = int(model.logits(inputs).argmax())
    cam = create("cam", model.execution, layer="norm").explain(inputs, target)
    gradcam = create("gradcam", model.execution, layer="norm").explain(inputs, target)
    assert cam.saliency.max() > 0
    assert torch.allclose(cam.saliency, gradcam.saliency, atol=1e-4)


def test_cam_is_refused_where_the_head_reads_the_class_token(transformers, chelsea):
    model = transformers.get("vit_small_random")
    with pytest.raises(ExplainError) as refused:
        create("cam", model.execution, layer=model.default_layer).explain(_inputs(model, chelsea))
    assert refused.value.code == "cam_unsupported"


def test_the_new_cams_match_pytorch_grad_cam_on_a_distilled_deit(transformers, coffee):
    """Grad-CAM++, XGrad-CAM, LayerCAM, HiResCAM and Eigen-CAM at the DeiT's default layer, with
    the reference's reshape_transform; Eigen-CAM against the reference's sign-corrected
    projection of the same activations (its sign rule, see tests/test_cam_family.py)."""
    from pytorch_grad_cam import EigenCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_with_sign_correction

    model = transformers.get("deit_distilled_random")
    inputs, layer = _inputs(model, coffee), model.default_layer
    target = int(model.logits(inputs).argmax())
    for name, kind in {"gradcam++": GradCAMPlusPlus, "xgradcam": XGradCAM, "layercam": LayerCAM,
                       "hirescam": HiResCAM}.items():
        ours = create(name, model.execution, layer=layer).explain(inputs, target)
        reference = reference_map(kind, model, layer, inputs, target)
        assert reference.max() > 0, name
        assert correlation(upsampled(ours.saliency, inputs.shape[-2:]), reference) >= 0.99, name
    import copy

    twin = copy.deepcopy(model.module).requires_grad_(True)
    eigen = EigenCAM(model=twin, target_layers=[twin.get_submodule(layer)], reshape_transform=reshape_transform_for(model))
    eigen(inputs, targets=None)
    activations = eigen.activations_and_grads.activations[0].numpy()
    corrected = scale_cam_image(np.maximum(get_2d_projection_with_sign_correction(activations), 0), (64, 64))
    ours = create("eigencam", model.execution, layer=layer).explain(inputs, target)
    assert correlation(upsampled(ours.saliency, inputs.shape[-2:]), corrected) >= 0.99


def test_register_tokens_and_dynamic_image_sizes():
    """A ViT with a class token and four registers (five prefix tokens), built for 64 px but
    allowing other sizes: at 96 px the capture puts tokens 5.. on the 6 x 6 grid the patch
    embedding reports, and Grad-CAM's map has that grid."""
    import timm

    from explainers.execution import Execution

    torch.manual_seed(0)
    module = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2, embed_dim=48,
                               num_heads=3, reg_tokens=4, dynamic_img_size=True).eval().requires_grad_(False)
    inputs = torch.randn(1, 3, 96, 96)
    execution = Execution(module)
    _, activations = execution.session().capture(inputs, "blocks.1.norm1", reduced_precision=False)
    seen = {}
    handle = module.blocks[1].norm1.register_forward_hook(lambda _m, _i, out: seen.__setitem__("out", out))
    with torch.inference_mode():
        module(inputs)
    handle.remove()
    assert seen["out"].shape[1] == 5 + 36
    assert torch.equal(activations, seen["out"][:, 5:, :].reshape(1, 6, 6, -1).permute(0, 3, 1, 2))
    assert create("gradcam", execution, layer="blocks.1.norm1").explain(inputs).saliency.shape[-2:] == (6, 6)
