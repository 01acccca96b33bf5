"""Incremental scoring of one-patch changes (``explainers.execution.incremental`` through SAG's scorer).

Every incremental score is compared with a whole forward of the same masked image, on the real
efficientnet_lite0 (the layout SAG serves by default) and on a torchvision ResNet; a split
made wrong on purpose must be caught by the scorer's own check.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from explainers.execution import PatchScorer
from explainers.execution.incremental import IncrementalForward, NetworkSplit, crop_side, split_network, window_for
from explainers.sag import make_baseline


def scorers(module: torch.nn.Module, inputs: torch.Tensor, grid: int, mean, std) -> tuple[PatchScorer, PatchScorer]:
    """An incremental scorer and a whole-forward one for the same image (black baseline)."""
    base = make_baseline("black", inputs, torch.tensor(mean), torch.tensor(std))
    with torch.inference_mode():
        target = int(module(inputs).argmax())
    incremental = PatchScorer(module, inputs, base, target, grid, 8)
    whole = PatchScorer(module, inputs, base, target, grid, 8)
    incremental.use_incremental()
    assert incremental.probe_images == 1  # one probe forward found the split

    return incremental, whole


def one_patch_walk(grid: int, steps: int, seed: int = 0) -> list[list[int]]:
    """Batches of keys, each key one patch away from a key of an earlier batch (as SAG asks)."""
    rng = random.Random(seed)
    cells = grid * grid
    corners = [0, grid - 1, cells - grid, cells - 1]
    batches = [[0], [1 << p for p in corners + [cells // 2]]]
    for _ in range(steps):
        parents = rng.sample(batches[-1], min(3, len(batches[-1])))
        batches.append([parent ^ (1 << rng.randrange(cells)) for parent in parents for _ in range(3)])
    return batches


def test_lite0_incremental_scores_equal_whole_forwards(default_model, chelsea):
    inputs, _ = default_model.preprocessor.to_input(chelsea)
    incremental, whole = scorers(default_model.module, inputs, 7, default_model.spec.mean, default_model.spec.std)
    forward = incremental.incremental
    assert forward is not None and forward.split.stride == 4 and len(forward.windows) == 49
    assert forward.side < inputs.shape[-1] / 2  # the point: a crop, not the image
    keys = [0b1011 << 20, (1 << 49) - 1, 1 << 48]
    windows = [forward.windows[p] for p in (20, 24, 48)]
    crops = incremental.crops_for(keys, windows, forward.side)
    images = incremental.images_for(keys)
    for row, w in enumerate(windows):
        assert torch.equal(crops[row], images[row, :, w.crop_y:w.crop_y + forward.side, w.crop_x:w.crop_x + forward.side])
    for keys in one_patch_walk(7, 5):
        fast, slow = incremental.score(keys), whole.score(keys)
        assert [fast[k] for k in keys] == pytest.approx([slow[k] for k in keys], rel=1e-5, abs=1e-8)
    assert incremental.verified is True
    assert incremental.incremental_images >= incremental.images - 8  # all but the first whole batches


def test_a_wrong_split_is_caught_and_scores_stay_right(default_model, chelsea):
    inputs, _ = default_model.preprocessor.to_input(chelsea)
    incremental, whole = scorers(default_model.module, inputs, 7, default_model.spec.mean, default_model.spec.std)
    # sabotage: pretend the early layers see nothing beyond their own cell
    good = incremental.incremental
    split = replace(good.split, reach=0)
    side = crop_side(32, split.stride, 0)
    boxes = {p: (32 * (p // 7), 32 * (p % 7), 32 * (p // 7) + 32, 32 * (p % 7) + 32) for p in range(49)}
    windows = {p: window_for(box, tuple(inputs.shape[-2:]), split, side) for p, box in boxes.items()}
    incremental.incremental = IncrementalForward(split, windows, side, good.run)
    for keys in one_patch_walk(7, 3):
        fast, slow = incremental.score(keys), whole.score(keys)
        assert [fast[k] for k in keys] == pytest.approx([slow[k] for k in keys], rel=1e-5, abs=1e-8)
    assert incremental.verified is False and incremental.incremental is None


def test_windows_cover_what_a_patch_can_reach():
    split = NetworkSplit(prefix=lambda x: x, suffix=lambda x: x, stride=4, reach=10)
    side = crop_side(32, 4, 10)
    assert side % 4 == 0
    for top in range(0, 224, 32):
        for left in range(0, 224, 32):
            w = window_for((top, left, top + 32, left + 32), (224, 224), split, side)
            assert w is not None and w.crop_y % 4 == 0 and w.crop_x % 4 == 0
            assert 0 <= w.crop_y <= 224 - side and 0 <= w.crop_x <= 224 - side
            for start, (first, last), origin, low in ((top, w.rows, w.crop_y, left), (left, w.cols, w.crop_x, top)):
                # every cell whose window [4c - 10, 4c + 3 + 10] meets the patch is pasted ...
                reached = [c for c in range(56) if 4 * c - 10 < start + 32 and 4 * c + 13 >= start]
                assert first <= reached[0] and reached[-1] < last
                # ... and computed from a crop holding its whole window (or the image border)
                assert origin == 0 or 4 * first - 10 >= origin
                assert origin + side == 224 or 4 * (last - 1) + 13 < origin + side


def test_torchvision_resnet_splits_and_scores_exactly():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    module = torchvision.models.resnet18(weights=None, num_classes=10).eval().requires_grad_(False)
    inputs = torch.randn(1, 3, 128, 128)
    incremental, whole = scorers(module, inputs, 4, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert incremental.incremental is not None and incremental.incremental.split.stride == 2
    for keys in one_patch_walk(4, 4):
        fast, slow = incremental.score(keys), whole.score(keys)
        assert [fast[k] for k in keys] == pytest.approx([slow[k] for k in keys], rel=1e-5, abs=1e-8)
    assert incremental.verified is True and incremental.incremental_images > 0


def test_unknown_layouts_are_scored_whole():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    assert split_network(net, torch.zeros(1, 3, 64, 64), 16) is None
