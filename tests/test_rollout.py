"""Attention rollout (issue 20): the attention the execution reads is the model's own, the model's
output is untouched, the method is the paper's formula, and it is served like every heat map.

Tiny random-weight Vision Transformers are built directly (no downloads): timm ViT (one class
token), distilled DeiT (class + distillation token), a timm ViT with register tokens, and
torchvision's ``VisionTransformer`` (the class ``vit_b_16`` builds, at a small width).
"""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torchvision.models.vision_transformer import VisionTransformer

from explainers.errors import ExplainError
from explainers.execution import Execution
from explainers.execution.attention import AttentionReading
from explainers.pipeline import explain_image, explain_images
from explainers.registry import METHODS, create
from explainers.rollout import AttentionRollout, RolloutConfig, discard_lowest, fuse_heads, rollout, with_residual

SIZE = 64  # timm models: a 4 x 4 patch grid
TV_SIZE = 32  # torchvision: 8-pixel patches, also 4 x 4


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    return model.eval().requires_grad_(False)


def _timm(name: str, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    model = _frozen(timm.create_model(name, pretrained=False, img_size=SIZE, depth=2, **options))
    for block in model.blocks:
        block.attn.fused_attn = True  # the fused kernel that hides the probabilities
    return model


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    torchvision_vit = _frozen(VisionTransformer(image_size=TV_SIZE, patch_size=8, num_layers=2, num_heads=4,
                                                hidden_dim=64, mlp_dim=128, num_classes=10))
    torch.nn.init.normal_(torchvision_vit.heads.head.weight, std=0.1)  # torchvision zero-initialises the head
    return {
        "vit": _timm("vit_tiny_patch16_224"),
        "deit_distilled": _timm("deit_tiny_distilled_patch16_224"),
        "vit_registers": _timm("vit_tiny_patch16_224", reg_tokens=4),
        "torchvision": torchvision_vit,
    }


PREFIX = {"vit": 1, "deit_distilled": 2, "vit_registers": 5, "torchvision": 1}
TIMM = ("vit", "deit_distilled", "vit_registers")


def _inputs(name: str, batch: int = 2) -> torch.Tensor:
    side = TV_SIZE if name == "torchvision" else SIZE
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(1))


def _own_timm_attention(model: torch.nn.Module, inputs: torch.Tensor) -> list[torch.Tensor]:
    """The probabilities timm itself computes: an unfused copy, ``attn_drop``'s input = output."""
    twin = copy.deepcopy(model)
    seen: list[torch.Tensor] = []
    for block in twin.blocks:
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(lambda _m, _i, output: seen.append(output.detach().clone()))
    with torch.no_grad():
        twin(inputs)
    return seen


def _own_torchvision_attention(model: torch.nn.Module, inputs: torch.Tensor) -> list[torch.Tensor]:
    """The probabilities torch's MultiheadAttention reports with ``need_weights=True`` on the very
    tokens each block fed it."""
    fed: list[torch.Tensor] = []
    handles = [layer.self_attention.register_forward_pre_hook(lambda _m, args: fed.append(args[0].clone()))
               for layer in model.encoder.layers]
    with torch.no_grad():
        model(inputs)
    for handle in handles:
        handle.remove()
    weights = []
    with torch.no_grad():
        for layer, tokens in zip(model.encoder.layers, fed):
            _, own = layer.self_attention(tokens, tokens, tokens, need_weights=True, average_attn_weights=False)
            weights.append(own)
    return weights


@pytest.mark.parametrize("name", [*TIMM, "torchvision"])
def test_the_recomputed_attention_is_the_models_own(models, name):
    model = models[name]
    inputs = _inputs(name)
    _, read = Execution(model).session().attention(inputs)
    own = _own_torchvision_attention(model, inputs) if name == "torchvision" else _own_timm_attention(model, inputs)
    assert len(read) == len(own) == 2
    tokens = PREFIX[name] + 16
    for mine, theirs in zip(read, own):
        assert mine.shape == theirs.shape == (2, mine.shape[1], tokens, tokens)
        difference = float((mine - theirs.float()).abs().max())
        assert torch.allclose(mine, theirs.float(), atol=1e-5, rtol=0), (name, difference)


@pytest.mark.parametrize("name", [*TIMM, "torchvision"])
def test_reading_attention_leaves_the_logits_bit_identical(models, name):
    model = models[name]
    inputs = _inputs(name)
    with torch.inference_mode():
        before = model(inputs)
    session = Execution(model).session()
    logits, read = session.attention(inputs, lambda heads: heads.mean(dim=1))
    with torch.inference_mode():
        after = model(inputs)
    assert torch.equal(logits, before.float()) and torch.equal(after, before)
    assert all(m.shape == (2, PREFIX[name] + 16, PREFIX[name] + 16) for m in read)  # heads fused in the hook
    assert not any(module._forward_hooks for module in model.modules())  # every hook removed
    assert session.ran("attention") == {"precision": "fp32", "network": "as_loaded", "blocks": 2,
                                        "modules": "torch_mha" if name == "torchvision" else "timm",
                                        "recomputed": True}


def test_forwards_outside_the_reading_context_are_not_read(models):
    """Hooks on a shared model act only for the reading's own context (another request's thread)."""
    model = models["vit"]
    with AttentionReading(model) as reading:
        worker = threading.Thread(target=lambda: model(_inputs("vit")))
        worker.start()
        worker.join()
        assert reading.maps == [None, None]
        with torch.inference_mode():
            model(_inputs("vit"))
    assert all(m is not None for m in reading.maps)


# -- the method is the formula -----------------------------------------------------------------

def _reference(heads: list[np.ndarray], fusion: str, ratio: float, prefix: int) -> tuple[np.ndarray, np.ndarray]:
    """Rollout written out in float64 NumPy: (the class token's full row, the [0, 1] 4 x 4 maps)."""
    batch, _, tokens, _ = heads[0].shape
    flow = np.broadcast_to(np.eye(tokens), (batch, tokens, tokens)).copy()
    for block in heads:  # first block first: R = Â_L ... Â_1
        fused = {"mean": block.mean(axis=1), "max": block.max(axis=1), "min": block.min(axis=1)}[fusion].copy()
        count = int(ratio * (tokens - 1))  # the lowest share of the columns other than the class token's
        for b in range(batch):
            for i in range(tokens):
                lowest = np.argsort(fused[b, i, 1:])[:count]
                fused[b, i, 1 + lowest] = 0.0  # never column 0, the class token's
        mixed = 0.5 * fused + 0.5 * np.eye(tokens)
        mixed /= mixed.sum(axis=-1, keepdims=True)
        flow = mixed @ flow
    row = flow[:, 0, :]
    maps = row[:, prefix:].reshape(batch, 4, 4)
    low = maps.reshape(batch, -1).min(axis=1)[:, None, None]
    high = (maps - low).reshape(batch, -1).max(axis=1)[:, None, None]
    return row, (maps - low) / (high + 1e-7)


@pytest.mark.parametrize("name,fusion,ratio", [("vit", "mean", 0.0), ("deit_distilled", "max", 0.5),
                                               ("vit_registers", "min", 0.9), ("torchvision", "mean", 0.3)])
def test_rollout_is_the_papers_formula(models, name, fusion, ratio):
    model = models[name]
    inputs = _inputs(name)
    execution = Execution(model)
    heads = [a.double().numpy() for a in execution.session().attention(inputs)[1]]
    row, expected = _reference(heads, fusion, ratio, PREFIX[name])
    assert np.allclose(row.sum(axis=1), 1.0, atol=1e-12)  # the class token's row is a distribution
    explanation = create("rollout", execution, RolloutConfig(head_fusion=fusion, discard_ratio=ratio)).explain(inputs)
    assert explanation.saliency.shape == (2, 4, 4) and explanation.layer is None
    assert np.allclose(explanation.saliency.numpy(), expected, atol=1e-5)
    assert explanation.details["patch_share"] == pytest.approx(float(row[:, PREFIX[name]:].sum(axis=1).mean()),
                                                              abs=1e-4)
    assert explanation.details["prefix_tokens"] == PREFIX[name] and explanation.details["class_agnostic"]


def test_a_hand_built_two_block_rollout():
    """Â = 0.5 A + 0.5 I per block and R = Â_2 Â_1, worked out by hand on three tokens."""
    first = torch.tensor([[[[0.0, 0.5, 0.5], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]]])  # 1 image, 1 head
    second = torch.tensor([[[[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]]])
    blocks = [with_residual(fuse_heads(block, "mean")) for block in (first, second)]
    assert torch.allclose(blocks[0][0, 0], torch.tensor([0.5, 0.25, 0.25]))
    flow = rollout(blocks)
    assert torch.allclose(flow[0, 0], torch.tensor([0.25, 0.625, 0.125]))  # 0.5 [.5 .25 .25] + 0.5 [0 1 0]
    assert float(flow[0, 0].sum()) == pytest.approx(1.0)


def test_discarding_keeps_the_class_token_column():
    row = torch.tensor([[[0.01, 0.2, 0.3, 0.49]]])  # the class token's column is the row's lowest
    kept = discard_lowest(row, 0.67)  # floor(0.67 * 3) = 2 of the other columns
    assert torch.equal(kept, torch.tensor([[[0.01, 0.0, 0.0, 0.49]]]))
    assert discard_lowest(row, 0.0) is row
    heads = torch.tensor([[[[0.2, 0.8]]], [[[0.6, 0.4]]]]).transpose(0, 1)  # 2 heads, one row
    assert torch.equal(fuse_heads(heads, "max"), torch.tensor([[[0.6, 0.8]]]))
    assert torch.equal(fuse_heads(heads, "min"), torch.tensor([[[0.2, 0.4]]]))
    assert torch.allclose(fuse_heads(heads, "mean"), torch.tensor([[[0.4, 0.6]]]))


def test_parameters_change_the_map_and_targets_do_not(models):
    execution = Execution(models["vit"])
    inputs = _inputs("vit")
    paper = create("rollout", execution).explain(inputs)
    for config in (RolloutConfig(discard_ratio=0.9), RolloutConfig(head_fusion="max"),
                   RolloutConfig(head_fusion="min")):
        other = create("rollout", execution, config).explain(inputs)
        assert float((other.saliency - paper.saliency).abs().max()) > 1e-3, config
    assert paper.targets.tolist() == paper.logits.argmax(dim=1).tolist()  # top-1 of the same forward
    chosen = create("rollout", execution).explain(inputs, [3, 7])
    assert chosen.targets.tolist() == [3, 7] and torch.equal(chosen.saliency, paper.saliency)  # class-agnostic
    assert float(paper.saliency.amin()) == 0.0 and float(paper.saliency.amax()) == pytest.approx(1.0, abs=1e-3)


def test_a_cnn_is_refused_with_a_reason(default_model, chelsea):
    inputs, _ = default_model.preprocessor.to_input(chelsea)
    with pytest.raises(ExplainError) as refused:
        create("rollout", default_model.execution, layer=default_model.default_layer).explain(inputs)
    assert refused.value.code == "method_unsupported"
    assert "Vision Transformer" in refused.value.message and "patch tokens" in refused.value.message


def test_attention_it_cannot_recompute_is_refused():
    from timm.models.vision_transformer import ParallelScalingBlock, ParallelThingsBlock

    for block, why in ((ParallelScalingBlock, "0 attention modules"), (ParallelThingsBlock, "2 attention modules")):
        model = _frozen(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=SIZE, depth=1,
                                          block_fn=block))
        with pytest.raises(ExplainError) as refused:
            create("rollout", Execution(model)).explain(_inputs("vit", 1))
        assert refused.value.code == "method_unsupported" and why in refused.value.message
    pooled = _frozen(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=SIZE, depth=1,
                                       class_token=False, global_pool="avg"))
    with pytest.raises(ExplainError, match="class token") as refused:
        create("rollout", Execution(pooled)).explain(_inputs("vit", 1))
    assert refused.value.code == "method_unsupported"


# -- registered and served ---------------------------------------------------------------------

def test_the_method_file_reads_attention_only_through_the_session():
    """rollout.py holds the algorithm; how attention is read is the execution seam's."""
    import ast
    from pathlib import Path

    import explainers.rollout

    tree = ast.parse(Path(explainers.rollout.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    own = {name for name in imported if name.startswith("explainers")}
    assert own == {"explainers.execution", "explainers.method", "explainers.result", "explainers.errors",
                   "explainers.feature_layout"}, own
    assert imported - own <= {"__future__", "typing", "torch", "pydantic"}, imported


def test_rollout_is_registered_as_a_synchronous_heat_map():
    from workers.methods import load_builtin_methods

    method = METHODS["rollout"]
    assert method is AttentionRollout and method.synchronous and not method.needs_layer
    assert method.result_kind == "heatmap" and "class-agnostic" in method.description
    with pytest.raises(ExplainError) as refused:
        RolloutConfig(discard_ratio=1.0)
    assert refused.value.code == "invalid_parameter"
    job = load_builtin_methods()["rollout"].params
    assert job.model_fields["head_fusion"].default == "mean" and job.model_fields["discard_ratio"].default == 0.0


class _Handle:
    """What :mod:`explainers.pipeline` needs of a loaded model (the catalogue's ``LoadedModel``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        from models.catalog import ModelSpec
        from models.default_layers import default_layer
        from models.preprocess import Preprocessor

        spec = ModelSpec(name="tiny-vit", source="timm:vit_tiny_patch16_224", input_size=SIZE)
        self.name = spec.name
        self.module = model
        self.execution = Execution(model)
        self.labels = tuple(f"class {i}" for i in range(1000))
        self.preprocessor = Preprocessor(spec, torch.device("cpu"))
        self.default_layer = default_layer(model, SIZE)
        self.normalization = (tuple(spec.mean), tuple(spec.std))


def test_the_pipeline_serves_rollout_without_a_layer(models, chelsea, coffee):
    handle = _Handle(models["vit"])
    assert handle.default_layer == "blocks.1.norm1"  # the model has one; rollout must not report it
    result = explain_image(handle, chelsea, "rollout", top_k=3, overlay_max_side=128)
    body = result.as_json()
    assert body["method"] == "rollout" and body["layer"] is None
    assert len(body["heatmap"]["grid"]) == 4 and len(body["heatmap"]["grid"][0]) == 4
    assert (body["heatmap"]["width"], body["heatmap"]["height"]) == chelsea.size
    assert body["target"]["index"] == body["predictions"][0]["index"]
    assert body["details"]["blocks"] == 2 and body["details"]["head_fusion"] == "mean"
    batch = explain_images(handle, [chelsea, coffee], "rollout", top_k=3, overlay_max_side=128)
    assert np.allclose(batch[0].heatmap.grid, result.heatmap.grid, atol=1e-3)
    with pytest.raises(ExplainError) as refused:
        explain_image(handle, chelsea, "rollout", layer="blocks.0.norm1")
    assert refused.value.code == "invalid_parameter" and "no layer" in refused.value.message
    image = Image.new("RGB", (50, 30), (120, 60, 200))
    assert explain_image(handle, image, "rollout", overlay_max_side=64).heatmap.width == 50
