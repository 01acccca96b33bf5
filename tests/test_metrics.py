"""Deletion / insertion metrics on hand-built cases whose curves and AUCs are known exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from explainers.execution import Execution
from explainers.metrics import deletion_insertion, pixel_order

SIDE = 10          # 10 x 10 = 100 pixels
REGION_ROWS = 3    # the class lives in the top 3 rows: 30 % of the image


class RegionModel(nn.Module):
    """Two classes; P(class 0) = share of the top rows still showing the image (value 1).

    With the image all ones and the baseline all zeros, deleting ``k`` pixels of the region
    leaves ``P = 1 - k / 30``: every curve has a closed form.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = x[:, 0, :REGION_ROWS, :].flatten(1).mean(1).clamp(1e-9, 1 - 1e-9)
        return torch.stack([p.log(), (1 - p).log()], dim=1)


@pytest.fixture()
def case():
    inputs = torch.ones(2, 3, SIDE, SIDE)
    baseline = torch.zeros_like(inputs)
    region = torch.zeros(SIDE, SIDE)
    region[:REGION_ROWS] = 1.0
    perfect, reversed_ = region.clone(), 1.0 - region
    return Execution(RegionModel()), inputs, baseline, torch.stack([perfect, reversed_]), torch.tensor([0, 0])


def test_known_aucs_for_perfect_and_reversed_maps(case):
    execution, inputs, baseline, maps, targets = case
    scores = deletion_insertion(execution, inputs, maps, targets, steps=10, baseline=baseline)
    # perfect map: deletion falls 1 -> 0 over the first 30 %, insertion rises over it
    assert scores.deletion_curve[0].tolist() == pytest.approx([1, 2 / 3, 1 / 3] + [0] * 8, abs=1e-6)
    assert scores.insertion_curve[0].tolist() == pytest.approx([0, 1 / 3, 2 / 3] + [1] * 8, abs=1e-6)
    assert scores.deletion_auc.tolist() == pytest.approx([0.15, 0.85], abs=1e-6)
    assert scores.insertion_auc.tolist() == pytest.approx([0.85, 0.15], abs=1e-6)
    assert scores.fractions.tolist() == pytest.approx([j / 10 for j in range(11)])


def test_ties_keep_raster_order(case):
    """A constant map must remove pixels in raster order (stable sort): top rows first."""
    execution, inputs, baseline, _, targets = case
    flat = torch.full((1, SIDE, SIDE), 0.5)
    scores = deletion_insertion(execution, inputs[:1], flat, targets[:1], steps=10, baseline=baseline[:1])
    assert float(scores.deletion_auc[0]) == pytest.approx(0.15, abs=1e-6)
    ranks = pixel_order(flat, (SIDE, SIDE))[0]
    assert torch.equal(ranks, torch.arange(SIDE * SIDE))


def test_last_step_covers_every_pixel_when_steps_do_not_divide(case):
    """7 steps over 100 pixels: 0, 14, 29, 43, 57, 71, 86, 100 pixels; the last point is the
    baseline (deletion) and the full image (insertion), and the AUC uses those fractions."""
    execution, inputs, baseline, maps, targets = case
    scores = deletion_insertion(execution, inputs, maps, targets, steps=7, baseline=baseline)
    counts = [0, 14, 29, 43, 57, 71, 86, 100]
    assert scores.fractions.tolist() == pytest.approx([c / 100 for c in counts])
    expected = [max(0.0, 1 - c / 30) for c in counts]
    assert scores.deletion_curve[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert float(scores.deletion_curve[0, -1]) == pytest.approx(0.0, abs=1e-6)
    assert float(scores.insertion_curve[0, -1]) == pytest.approx(1.0, abs=1e-6)
    assert float(scores.deletion_auc[0]) == pytest.approx(np.trapezoid(expected, [c / 100 for c in counts]), abs=1e-6)
    assert float(scores.deletion_auc[0]) == pytest.approx(0.152167, abs=1e-5)


def test_chunking_and_resampling_do_not_change_results(case):
    execution, inputs, baseline, maps, targets = case
    whole = deletion_insertion(execution.with_policy(images_per_forward=64), inputs, maps, targets, steps=10,
                               baseline=baseline)
    chunked = deletion_insertion(execution.with_policy(images_per_forward=3), inputs, maps, targets, steps=10,
                                 baseline=baseline)
    assert torch.equal(whole.deletion_curve, chunked.deletion_curve)
    assert torch.equal(whole.insertion_curve, chunked.insertion_curve)
    # a coarse 5 x 5 map, high on its top row, is resampled to 10 x 10 and still finds the region
    coarse = torch.zeros(1, 5, 5)
    coarse[0, 0] = 1.0
    coarse[0, 1] = 0.5
    scores = deletion_insertion(execution, inputs[:1], coarse, targets[:1], steps=10, baseline=baseline[:1])
    assert float(scores.deletion_auc[0]) == pytest.approx(0.15, abs=1e-6)


def test_protocol_travels_with_the_numbers(case):
    execution, inputs, baseline, maps, targets = case
    scores = deletion_insertion(execution, inputs, maps, targets, steps=10, baseline=baseline,
                                baseline_description={"kind": "zeros"})
    data = scores.as_json(1)
    assert data["deletion_auc"] == pytest.approx(0.85, abs=1e-6)
    assert data["protocol"]["steps"] == 10
    assert data["protocol"]["baseline"] == {"kind": "zeros"}
    assert "softmax" in data["protocol"]["score"] and "stable" in data["protocol"]["order"]
    assert len(data["curves"]["deletion"]) == 11 and len(data["curves"]["fraction"]) == 11


def test_blur_baseline_is_the_default(case):
    execution, inputs, _, maps, targets = case
    scores = deletion_insertion(execution, inputs, maps, targets, steps=5)
    assert scores.protocol.baseline["kind"] == "blur"
    # blurring a constant image changes nothing, so deleting it keeps the full score
    assert scores.deletion_curve[0].tolist() == pytest.approx([1.0] * 6, abs=1e-5)


def test_cell_unit_at_full_resolution_is_the_pixel_unit(case):
    """With one cell per pixel the soft reveal is the identity: both units give the same curves."""
    execution, inputs, baseline, maps, targets = case
    pixels = deletion_insertion(execution, inputs, maps, targets, steps=10, baseline=baseline)
    cells = deletion_insertion(execution, inputs, maps, targets, steps=10, baseline=baseline, unit="cell", cells=SIDE)
    assert torch.allclose(pixels.deletion_curve, cells.deletion_curve, atol=1e-6)
    assert torch.allclose(pixels.insertion_curve, cells.insertion_curve, atol=1e-6)


def test_cell_unit_reveals_cells_softly_with_aligned_corners(case):
    """5 x 5 cells on 10 x 10 pixels: changing the top cell row blends pixel rows 0, 1, 2 by
    1, 5/9, 1/9 (aligned-corner bilinear: pixel row i sits at cell coordinate 4i/9), so the
    class share of the top 3 rows drops to 4/9 (deletion) or rises to 5/9 (insertion); the
    second cell row covers the region entirely."""
    execution, inputs, baseline, _, targets = case
    coarse = torch.zeros(1, 5, 5)
    coarse[0, 0], coarse[0, 1] = 1.0, 0.5
    scores = deletion_insertion(execution, inputs[:1], coarse, targets[:1], steps=5, baseline=baseline[:1],
                                unit="cell", cells=5)
    assert scores.fractions.tolist() == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert scores.deletion_curve[0].tolist() == pytest.approx([1, 4 / 9, 0, 0, 0, 0], abs=1e-6)
    assert scores.insertion_curve[0].tolist() == pytest.approx([0, 5 / 9, 1, 1, 1, 1], abs=1e-6)
    assert float(scores.deletion_auc[0]) == pytest.approx(0.2 * 17 / 18, abs=1e-6)
    assert float(scores.insertion_auc[0]) == pytest.approx(1 - 0.2 * 17 / 18, abs=1e-6)
    protocol = scores.as_json(0)["protocol"]
    assert protocol["unit"] == "cell" and protocol["cells"] == 5 and "aligned corners" in protocol["change"]


def test_right_riemann_rule_leaves_out_the_first_point(case):
    """The papers' AUC: the mean of the points after each step (equal steps)."""
    execution, inputs, baseline, maps, targets = case
    scores = deletion_insertion(execution, inputs, maps, targets, steps=10, baseline=baseline, auc="right")
    # perfect: deletion 1, 2/3, 1/3, 0 ... ; reversed: seven 1s (the 70 other pixels), 2/3, 1/3, 0
    assert scores.deletion_auc.tolist() == pytest.approx([(2 / 3 + 1 / 3) / 10, (7 + 1) / 10], abs=1e-6)
    assert scores.insertion_auc.tolist() == pytest.approx([(1 / 3 + 2 / 3 + 8) / 10, (1 / 3 + 2 / 3 + 1) / 10], abs=1e-6)
    assert "right Riemann" in scores.protocol.auc
    with pytest.raises(ValueError):
        deletion_insertion(execution, inputs, maps, targets, steps=10, baseline=baseline, unit="patch")


def test_explain_endpoint_scores_the_map_on_request(api_server, chelsea):
    """``metrics=true`` on /v1/explain adds the AUCs and their protocol; without it, nothing."""
    import httpx

    from tests.conftest import jpeg_bytes

    files = {"image": ("cat.jpg", jpeg_bytes(chelsea.resize((224, 150))), "image/jpeg")}
    answer = httpx.post(f"{api_server}/v1/explain", files=files, data={"metrics": "true"}, timeout=300)
    assert answer.status_code == 200, answer.text
    metrics = answer.json()["metrics"]
    assert set(metrics) == {"deletion_auc", "insertion_auc", "protocol"}
    assert metrics["protocol"]["steps"] == 50 and metrics["protocol"]["baseline"]["kind"] == "blur"
    assert 0.0 <= metrics["deletion_auc"] < metrics["insertion_auc"] <= 1.0  # Grad-CAM on a cat is a decent map
    assert metrics["protocol"]["unit"] == "pixel"
    cells = httpx.post(f"{api_server}/v1/explain", files=files, data={"metrics": "true", "metrics_unit": "cell"},
                       timeout=300)
    assert cells.status_code == 200, cells.text
    protocol = cells.json()["metrics"]["protocol"]
    assert protocol["unit"] == "cell" and protocol["cells"] == 28
    assert cells.json()["metrics"]["insertion_auc"] != metrics["insertion_auc"]  # a different protocol, other numbers
    bad = httpx.post(f"{api_server}/v1/explain", files=files, data={"metrics": "true", "metrics_unit": "voxel"},
                     timeout=60)
    assert bad.status_code == 422 and "error" in bad.json()
    plain = httpx.post(f"{api_server}/v1/explain", files=files, timeout=300)
    assert plain.status_code == 200 and "metrics" not in plain.json()
    bad = httpx.post(f"{api_server}/v1/explain", files=files, data={"metrics": "maybe"}, timeout=300)
    assert bad.status_code == 422
