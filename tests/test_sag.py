"""Structured Attention Graphs: search, graph, drawing and the ``sag`` job method.

Two models: a toy classifier whose probability is a known function of which bright patches are
kept (so the roots and the graph are known exactly), and the real efficientnet_lite0 on the cat
photo with a coarse grid (so the properties are checked on a real network, cheaply). Every
score is re-checked against an independent evaluation: a masked image built pixel by pixel here
and one forward of the model.
"""

from __future__ import annotations

import base64
import io
import json
import xml.etree.ElementTree as ET

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from core.settings import load_core_settings
from explainers.errors import ExplainError
from explainers.execution import Execution, ExecutionPolicy, PatchScorer
from explainers.patches import key_of, patches_of
from explainers.sag import SAG, SAGConfig, SAGResult, pool_to_patches, select_roots
from explainers.sag_render import panel_layout, render_svg, roots_overlay
from workers.methods import JobCanceled, get_method

SVG = "{http://www.w3.org/2000/svg}"
BRIGHT = (8, 12, 36, 40)  # the toy image's bright patches on a 7 x 7 grid of 8 px


class ToyNet(nn.Module):
    """Two classes; logit 0 = 4 x (number of bright patches kept) - 3, logit 1 = 0.

    One bright patch gives p = sigmoid(1) = 0.73 (< 0.9 x full), any two give sigmoid(5) = 0.993
    (sufficient), none gives sigmoid(-3) = 0.047 (below the 40 % graph threshold). Records the
    batch size of every forward.
    """

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        kept = F.avg_pool2d(x.mean(dim=1, keepdim=True), 8).flatten(1).sum(dim=1)
        return torch.stack([4 * kept - 3, torch.zeros_like(kept)], dim=1)


def toy_image() -> torch.Tensor:
    image = torch.zeros(1, 3, 56, 56)
    for p in BRIGHT:
        r, c = divmod(p, 7)
        image[..., 8 * r:8 * r + 8, 8 * c:8 * c + 8] = 1.0
    return image


def toy_sag(images_per_forward: int | None = None, **overrides: object) -> tuple[ToyNet, SAG]:
    net = ToyNet()  # records its own batches: scored by PyTorch, not an exported copy
    config = SAGConfig(**{"ordering": "occlusion", "max_roots": 6, "max_root_size": 4, **overrides})
    execution = Execution(net, ExecutionPolicy(cpu_runtime="torch", images_per_forward=images_per_forward))
    return net, SAG(execution, config, normalization=((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))


def direct_scores(model: nn.Module, inputs: torch.Tensor, baseline: torch.Tensor, grid: int,
                  sets: list[tuple[int, ...]], target: int) -> list[float]:
    """Independent evaluation: paste each set's square patches onto the baseline, one forward."""
    height, width = inputs.shape[-2:]
    images = []
    for patches in sets:
        image = baseline.clone()
        for p in patches:
            r, c = divmod(p, grid)
            y0, y1 = round(r * height / grid), round((r + 1) * height / grid)
            x0, x1 = round(c * width / grid), round((c + 1) * width / grid)
            image[..., y0:y1, x0:x1] = inputs[..., y0:y1, x0:x1]
        images.append(image)
    with torch.inference_mode():
        return model(torch.cat(images)).float().softmax(dim=-1)[:, target].tolist()


def check_graph_shape(result: SAGResult) -> None:
    """Edges remove exactly one patch; nodes are unique patch sets; expansion follows the rule."""
    by_id = {node.id: node for node in result.nodes}
    assert len(by_id) == len(result.nodes)
    assert len({node.patches for node in result.nodes}) == len(result.nodes), "duplicate patch sets"
    assert len({(e.source, e.target) for e in result.edges}) == len(result.edges)
    for edge in result.edges:
        parent, child = set(by_id[edge.source].patches), set(by_id[edge.target].patches)
        assert child < parent and parent - child == {edge.removed}
        assert edge.drop == pytest.approx(by_id[edge.source].score - by_id[edge.target].score)
    children: dict[int, set[int]] = {}
    for edge in result.edges:
        children.setdefault(edge.source, set()).add(edge.removed)
    expand_at = result.details["graph_threshold"]
    for node in result.nodes:
        if node.expanded:
            assert node.root or node.score >= expand_at
            if not result.truncated:
                assert children.get(node.id, set()) == set(node.patches), "every single removal is an edge"
        elif not result.truncated and node.patches:
            assert node.score < expand_at and node.id not in children


# -- the toy model: everything is known ---------------------------------------------------------
def test_toy_roots_are_exactly_the_sufficient_pairs():
    net, sag = toy_sag()
    result = sag.explain(toy_image())
    assert result.ordering == "occlusion"
    assert set(result.patch_order[:4]) == set(BRIGHT)
    found = {root.patches for root in result.roots}
    assert found == {(a, b) for i, a in enumerate(BRIGHT) for b in BRIGHT[i + 1:]}
    for root in result.roots:
        assert root.score == pytest.approx(torch.sigmoid(torch.tensor(5.0)).item(), abs=1e-5)


def test_toy_graph_is_a_dag_with_shared_nodes():
    net, sag = toy_sag(overlap_limit=0, graph_roots=3)
    result = sag.explain(toy_image())
    roots = [node.patches for node in result.graph_roots]
    assert len(roots) == 2 and not set(roots[0]) & set(roots[1]), "overlap 0 leaves two disjoint pairs"
    assert sorted(node.patches for node in result.nodes) == sorted(
        roots + [(p,) for p in BRIGHT] + [()])  # 2 roots, 4 single patches, one shared empty set
    empty = next(node for node in result.nodes if node.patches == ())
    assert sum(edge.target == empty.id for edge in result.edges) == 4  # one node, four parents
    assert len(result.edges) == 8
    check_graph_shape(result)
    singles = [node for node in result.nodes if len(node.patches) == 1]
    assert all(node.expanded and node.level == 1 for node in singles)
    assert empty.level == 2 and not empty.expanded


def test_toy_forwards_are_batched_and_cached():
    net, sag = toy_sag(successors=15, images_per_forward=64)  # the CPU default (8) would split the steps
    result = sag.explain(toy_image())
    forward = result.details["forward"]
    assert len(net.batches) == forward["scorer_batches"] + 1  # + the full image
    assert sum(net.batches) == forward["images"]
    assert forward["images"] - 1 == forward["cached_sets"], "no patch set is evaluated twice"
    assert net.batches[1] == 49  # occlusion ordering: every single-patch removal in one forward
    assert net.batches[2] == 15  # search step 1: all 15 successors of the empty set at once
    assert result.details["search_steps"] == 2


def test_toy_overlap_limit_and_bounds():
    net, sag = toy_sag(overlap_limit=1, graph_roots=3, max_nodes=5)
    result = sag.explain(toy_image())
    roots = [set(node.patches) for node in result.graph_roots]
    assert len(roots) == 3
    assert all(len(a & b) <= 1 for i, a in enumerate(roots) for b in roots[i + 1:])
    assert len(result.nodes) == 5 and result.truncated
    check_graph_shape(result)


def test_auto_ordering_uses_igos_and_states_it():
    net, sag = toy_sag(ordering="auto")
    result = sag.explain(toy_image())
    assert result.ordering == "igos"
    assert result.details["forward"]["ordering_images"] > 0
    assert sorted(result.patch_order) == list(range(49))
    # the toy saturates (p = 0.99999), so the coarse I-GOS line search accepts no step and its
    # mask stays all ones: the order must come from I-GOS's descent direction, not the index
    assert result.patch_order != list(range(49))


def test_minimisation_drops_every_removable_patch():
    net = ToyNet()
    inputs = toy_image()
    scorer = PatchScorer(net, inputs, torch.zeros_like(inputs), target=0, grid=7, max_batch=64)
    threshold = 0.9 * scorer.score([key_of(range(49))])[key_of(range(49))]
    start = key_of((0, 1, 8, 12, 36))  # sufficient, with two useless dark patches and a spare bright one
    batches_before = len(net.batches)
    (root,) = SAG._minimise(scorer, [start], threshold)
    patches = set(patches_of(root))
    assert len(patches) == 2 and patches < {8, 12, 36}
    assert len(net.batches) - batches_before == 4  # one batched forward per round: 5 -> 4 -> 3 -> 2, check
    assert max(net.batches[batches_before:]) == 5


def test_pooling_is_the_mean_over_each_drawn_patch():
    inputs = torch.zeros(1, 3, 50, 45)  # 7 does not divide either side: patches of unequal sizes
    scorer = PatchScorer(nn.Identity(), inputs, inputs, 0, 7, 8)
    saliency = torch.rand(50, 45, generator=torch.Generator().manual_seed(0))
    pooled = pool_to_patches(saliency, scorer)
    ys, xs = scorer.edges_y, scorer.edges_x
    expected = torch.stack([saliency[ys[r]:ys[r + 1], xs[c]:xs[c + 1]].mean() for r in range(7) for c in range(7)])
    assert torch.allclose(pooled, expected, atol=1e-6)


def test_select_roots_rule():
    scores = {key_of((1, 2)): 0.9, key_of((2, 3)): 0.8, key_of((4, 5)): 0.7, key_of((1, 3)): 0.95}
    chosen = select_roots(list(scores), scores, overlap_limit=0, count=3)
    assert [patches_of(k) for k in chosen] == [(1, 3), (4, 5)]
    chosen = select_roots(list(scores), scores, overlap_limit=1, count=2)
    assert [patches_of(k) for k in chosen] == [(1, 3), (1, 2)]


def test_toy_blur_baseline_scores_match_direct_evaluation():
    from explainers.baselines import make_baseline

    net, sag = toy_sag(baseline="blur", threshold=0.5)
    inputs = toy_image()
    result = sag.explain(inputs)
    assert result.details["baseline"] == "blur"
    baseline = make_baseline(inputs, "blur")[0]
    sets = [node.patches for node in result.nodes]
    assert [n.score for n in result.nodes] == pytest.approx(direct_scores(net, inputs, baseline, 7, sets, 0), abs=1e-5)


def test_invalid_config_is_an_explain_error():
    with pytest.raises(ExplainError):
        SAGConfig(threshold=1.5)
    with pytest.raises(ValueError, match="images_per_forward"):
        ExecutionPolicy(images_per_forward=0)
    with pytest.raises(ExplainError):
        SAGConfig(grid=1)
    with pytest.raises(ExplainError):
        SAGConfig(max_nodes=0)
    with pytest.raises(ExplainError):
        toy_sag()[1].explain(torch.zeros(2, 3, 56, 56))


# -- the real model on the cat photo ------------------------------------------------------------
REAL = SAGConfig(grid=4, beam_width=2, successors=4, max_root_size=8, max_roots=2, max_nodes=12,
                 ordering="gradcam")


_CAT_RESULT: dict[int, tuple[torch.Tensor, SAGResult]] = {}  # one search per model, shared by modules


@pytest.fixture(scope="module")
def cat_result(default_model, chelsea):
    """The real model's SAG on the cat photo; modules importing this fixture reuse the search."""
    if id(default_model) not in _CAT_RESULT:
        inputs, _ = default_model.preprocessor.to_input(chelsea)
        sag = SAG(default_model.execution, REAL, default_model.default_layer, default_model.normalization)
        _CAT_RESULT[id(default_model)] = (inputs, sag.explain(inputs))
    return _CAT_RESULT[id(default_model)]


def black(model, inputs):
    mean = torch.tensor(model.spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.spec.std).view(1, 3, 1, 1)
    return ((0 - mean) / std).expand_as(inputs).clone()


def test_real_roots_suffice_and_are_minimal(default_model, cat_result):
    inputs, result = cat_result
    assert result.roots, "the cat photo has a sufficient patch set on a 4 x 4 grid"
    assert result.ordering == "gradcam" and result.details["precision"] == "fp32"
    base = black(default_model, inputs)
    full = direct_scores(default_model.module, inputs, base, 4, [tuple(range(16))], result.target)[0]
    assert full == pytest.approx(result.full_score, abs=1e-5)
    for root in result.roots:
        removals = [tuple(p for p in root.patches if p != q) for q in root.patches]
        score, *smaller = direct_scores(default_model.module, inputs, base, 4, [root.patches] + removals,
                                        result.target)
        assert score == pytest.approx(root.score, abs=1e-4)
        assert score >= 0.9 * result.full_score
        assert all(s < 0.9 * result.full_score for s in smaller), f"root {root.patches} is not minimal"


def test_real_graph_scores_equal_direct_evaluation(default_model, cat_result):
    inputs, result = cat_result
    check_graph_shape(result)
    assert len(result.nodes) > len(result.graph_roots)
    sets = [node.patches for node in result.nodes]
    direct = direct_scores(default_model.module, inputs, black(default_model, inputs), 4, sets, result.target)
    assert [node.score for node in result.nodes] == pytest.approx(direct, abs=1e-4)
    # on a CPU these scores came mostly from incremental (cropped) forwards, checked once
    assert result.details["incremental"]["verified"] and result.details["forward"]["incremental_images"] > 0
    assert result.details["runtime"] == "onnxruntime"  # the CPU default (explainers.onnx_cpu)
    roots = [set(node.patches) for node in result.graph_roots]
    assert all(len(a & b) <= REAL.overlap_limit for i, a in enumerate(roots) for b in roots[i + 1:])
    assert len(result.nodes) <= REAL.max_nodes


def test_svg_draws_each_roots_panel(default_model, chelsea, cat_result):
    inputs, result = cat_result
    svg = render_svg(result, chelsea, (0, 0, chelsea.width, chelsea.height), tuple(inputs.shape[-2:]),
                     default_model.labels)
    root = ET.fromstring(svg)
    nodes = [g for g in root.iter(f"{SVG}g") if "node" in g.get("class", "").split()]
    panels = panel_layout(result)
    expected = {f"p{i}-node-{n}" for i, panel in enumerate(panels) for row in panel.rows for n in row}
    assert [g.get("id") for g in nodes if "root" in g.get("class").split()] == [
        f"p{i}-node-{n.id}" for i, n in enumerate(result.graph_roots)]
    assert {g.get("id") for g in nodes} == expected and len(nodes) == len(expected)
    known = {n.id for n in result.nodes}
    assert all(int(g.get("data-node")) in known for g in nodes)
    lines = [e for e in root.iter(f"{SVG}line") if e.get("class") == "edge"]
    assert len(lines) == sum(len(panel.edges) for panel in panels)
    widths = {(int(e.get("data-source")), int(e.get("data-target"))): float(e.get("stroke-width")) for e in lines}
    drawn = [e for panel in panels for e in panel.edges]
    biggest = max(drawn, key=lambda e: e.drop)
    smallest = min(drawn, key=lambda e: e.drop)
    assert biggest.drop > max(smallest.drop, 0) + 0.01 * result.full_score  # so the widths must differ
    assert widths[(biggest.source, biggest.target)] > widths[(smallest.source, smallest.target)]
    # a thumbnail shows only its node's patches: a root's hidden area is black, its patches are not
    first = nodes[0]
    href = first.find(f"{SVG}image").get("href")
    thumb = Image.open(io.BytesIO(base64.b64decode(href.split(",", 1)[1]))).convert("L")
    node = result.graph_roots[0]
    assert first.get("data-node") == str(node.id)
    hidden = [p for p in range(16) if p not in node.patches]
    w, h = thumb.size
    for p, expect_dark in [(node.patches[0], False)] + ([(hidden[0], True)] if hidden else []):
        r, c = divmod(p, 4)
        box = (round((c + 0.25) * w / 4), round((r + 0.25) * h / 4), round((c + 0.75) * w / 4), round((r + 0.75) * h / 4))
        mean = sum(thumb.crop(box).getdata()) / ((box[2] - box[0]) * (box[3] - box[1]))
        assert (mean < 8) == expect_dark
    png = roots_overlay(result, chelsea, (0, 0, chelsea.width, chelsea.height), tuple(inputs.shape[-2:]), 200)
    overlay = Image.open(io.BytesIO(png))
    assert max(overlay.size) == 200 and overlay.mode == "RGB"


# -- the job method ----------------------------------------------------------------------------
def test_job_method_runs_directly(default_model, chelsea):
    method = get_method("sag")
    params = method.params.model_validate({"grid": 3, "successors": 3, "max_roots": 1, "max_nodes": 6,
                                           "ordering": "gradcam", "top_k": 3})
    calls: list[tuple[float, str]] = []
    result = method.run(default_model, chelsea, None, params, lambda f, s: calls.append((f, s)), load_core_settings())
    assert json.loads(json.dumps(result)) == result
    assert result["method"] == "sag" and result["target"]["index"] == result["predictions"][0]["index"]
    assert result["params"]["grid"] == 3 and result["baseline"] == "black" and result["ordering"] == "gradcam"
    assert any(stage.startswith("search step") for _, stage in calls)
    fractions = [f for f, _ in calls]
    assert fractions == sorted(fractions) and 0 <= fractions[0] and fractions[-1] <= 1
    assert result["roots"] and result["nodes"] and result["forward_passes"]["images"] > 1
    assert len(ET.fromstring(result["svg"]).findall(f".//{SVG}g[@class='node root']")) == len(
        [r for r in result["roots"] if r["selected"]])
    picture = Image.open(io.BytesIO(base64.b64decode(result["picture_png"])))
    assert picture.size == chelsea.size
    assert {"search", "graph", "render", "total"} <= set(result["timing_ms"])


def test_job_method_stops_when_cancelled(default_model, chelsea):
    method = get_method("sag")
    params = method.params.model_validate({"grid": 2, "ordering": "gradcam"})
    calls = []

    def report(fraction: float, stage: str) -> None:
        calls.append(stage)
        if stage.startswith("search step"):
            raise JobCanceled("cancelled")

    with pytest.raises(JobCanceled):
        method.run(default_model, chelsea, None, params, report, load_core_settings())

    assert calls[-1] == "search step 1: 0 roots" or calls[-1].startswith("search step 1")


def test_job_params_are_validated():
    from pydantic import ValidationError

    params = get_method("sag").params
    assert params().model_dump()["grid"] == 7
    for bad in ({"grid": 1}, {"threshold": 0}, {"baseline": "white"}, {"beam": 3}):
        with pytest.raises(ValidationError):
            params.model_validate(bad)
