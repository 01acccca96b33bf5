"""One target per image in the library API: ``explain(inputs, targets=[...])`` on a batch gives
each image the map it gets alone with its target, and malformed targets are refused clearly."""

from __future__ import annotations

import pytest
import torch

from explainers.cam import GradCAM, ScoreCAM, ScoreCAMConfig
from explainers.errors import ExplainError
from explainers.pipeline import explain_image, explain_images
from explainers.registry import METHODS, create
from explainers.result import resolve_targets
from tests.conftest import CAT_CLASSES, ESPRESSO

TABBY = 281
TARGETS = [TABBY, ESPRESSO]  # chelsea, coffee

MAKERS = {
    "gradcam": lambda model: GradCAM(model.execution, layer=model.default_layer),
    "scorecam-fast": lambda model: ScoreCAM(model.execution, ScoreCAMConfig(channels=8), layer=model.default_layer),
}


@pytest.fixture(scope="module")
def photos(default_model, chelsea, coffee) -> torch.Tensor:
    """chelsea and coffee (different sizes), each preprocessed on its own, in one batch."""
    return torch.cat([default_model.preprocessor.to_input(image)[0] for image in (chelsea, coffee)])


@pytest.mark.parametrize("method", sorted(MAKERS))
def test_a_target_per_image_gives_each_image_its_own_map(default_model, photos, method):
    explainer = MAKERS[method](default_model)
    batch = explainer.explain(photos, TARGETS)
    assert batch.targets.tolist() == TARGETS
    assert batch.saliency.shape[0] == 2
    for b, target in enumerate(TARGETS):
        alone = explainer.explain(photos[b:b + 1], target)
        assert alone.targets.tolist() == [target]
        assert torch.allclose(batch.saliency[b], alone.saliency[0], atol=1e-4), (method, b)
        assert torch.allclose(batch.logits[b], alone.logits[0], atol=1e-3)
    # the coffee explained for the cat's class is a different map
    other = explainer.explain(photos[1:2], TABBY)
    assert (other.saliency[0] - batch.saliency[1]).abs().max() > 0.1, method


def test_one_int_or_a_tensor_for_the_batch(default_model, photos):
    explainer = MAKERS["gradcam"](default_model)
    listed = explainer.explain(photos, TARGETS)
    as_tensor = explainer.explain(photos, torch.tensor(TARGETS))
    assert torch.allclose(as_tensor.saliency, listed.saliency, atol=1e-5)
    same = explainer.explain(photos, TABBY)  # one int: the same class for every image
    assert same.targets.tolist() == [TABBY, TABBY]
    assert torch.allclose(same.saliency[0], listed.saliency[0], atol=1e-4)
    assert (same.saliency[1] - listed.saliency[1]).abs().max() > 0.1


def test_no_targets_means_each_images_top_1(default_model, photos):
    explanation = MAKERS["gradcam"](default_model).explain(photos)
    first, second = explanation.targets.tolist()
    assert first in CAT_CLASSES and second == ESPRESSO


@pytest.mark.parametrize("targets", [[TABBY], [TABBY, ESPRESSO, 1], [], torch.tensor([TABBY]),
                                     torch.tensor([[TABBY], [ESPRESSO]]), [TABBY, 2.0], torch.tensor([1.0, 2.0]),
                                     [True, False], "281"])
def test_malformed_targets_are_invalid_parameter(targets):
    with pytest.raises(ExplainError) as refused:
        resolve_targets(torch.zeros(2, 1000), targets)
    assert refused.value.code == "invalid_parameter"
    assert "target" in refused.value.message


@pytest.mark.parametrize("targets", [[TABBY, 1000], [-1, ESPRESSO], 1000, torch.tensor([TABBY, 5000]), 10**30])
def test_out_of_range_classes_are_refused(targets):
    """``invalid_target``: the code ``/v1/explain`` and ``/v1/jobs`` give the same mistake."""
    with pytest.raises(ExplainError, match=r"class index in \[0, 999\]") as refused:
        resolve_targets(torch.zeros(2, 1000), targets)
    assert refused.value.code == "invalid_target"


def test_a_method_refuses_an_out_of_range_class(default_model, photos):
    with pytest.raises(ExplainError, match=r"class index in \[0, 999\], got \[1000\]") as refused:
        MAKERS["gradcam"](default_model).explain(photos, [TABBY, 1000])
    assert refused.value.code == "invalid_target"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_refuses_a_wrong_length_list(default_model, photos, name):
    """Each registered method refuses one target for a batch of two before doing any work (SAG,
    which explains one image at a time, says so)."""
    method = create(name, default_model.execution, None, default_model.default_layer, default_model.normalization)
    with pytest.raises(ExplainError) as refused:
        method.explain(photos, [TABBY])
    assert refused.value.code == "invalid_parameter"
    expected = "one image at a time" if name == "sag" else "1 target for a batch of 2 images"
    assert expected in refused.value.message, refused.value.message


def test_explain_images_matches_one_image_at_a_time(default_model, chelsea, coffee):
    """The pipeline's batch form: each image preprocessed at its own size, one explain, one
    result per image, equal to :func:`explain_image` of that image with its target."""
    results = explain_images(default_model, [chelsea, coffee], "gradcam", TARGETS, top_k=3, overlay_max_side=256)
    assert [r.target.index for r in results] == TARGETS
    assert results[1].target.label == "espresso" and results[1].predictions[0].index == ESPRESSO
    for result, image, target in zip(results, (chelsea, coffee), TARGETS):
        alone = explain_image(default_model, image, "gradcam", target, top_k=3, overlay_max_side=256)
        assert (result.heatmap.width, result.heatmap.height) == image.size
        assert torch.allclose(torch.tensor(result.heatmap.grid), torch.tensor(alone.heatmap.grid), atol=1e-3)
        assert [p.index for p in result.predictions] == [p.index for p in alone.predictions]
        assert result.explanation.saliency.shape[0] == 1
    with pytest.raises(ExplainError) as refused:
        explain_images(default_model, [], "gradcam")
    assert refused.value.code == "invalid_parameter"
