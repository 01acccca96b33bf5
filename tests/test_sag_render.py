"""The SAG drawing: one panel per graph root, children ranked by drop, the rest folded.

Synthetic graphs built the way the SAG search builds them (nodes keyed by patch set, a child is
its parent minus one patch, scores additive in known patch weights so every drop is known) are
drawn and the SVG is read back: its size stays bounded however large the graph, every drawn
edge is a real graph edge whose removed patch is exactly the difference of its two thumbnails,
and the fold counts and the ranking are recomputed here from the edges.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from PIL import Image

from explainers.sag import SAGEdge, SAGNode, SAGResult
from explainers.sag_render import panel_layout, patch_index_map, render_svg

SVG = "{http://www.w3.org/2000/svg}"
GRID = 7
INPUT = (224, 224)
EDGES = tuple(round(i * 224 / GRID) for i in range(GRID + 1))
IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
BOX = (0.0, 0.0, 64.0, 48.0)


def synthetic(roots: list[tuple[int, ...]], weights: dict[int, float], max_nodes: int = 100,
              expand_at: float = 0.0, full: float | None = None, jitter: float = 0.0) -> SAGResult:
    """A SAG-like graph: breadth first from ``roots``, every child = parent minus one patch,
    nodes keyed by patch set (shared between roots), score = sum of the kept patches' weights,
    plus up to ``jitter`` fixed per set (so a child's drop depends on the parent, not only on the
    removed patch), nodes expanded while their score is at least ``expand_at``, at most
    ``max_nodes`` nodes; ``full`` defaults to a little over the best root's score."""
    members = [frozenset(r) for r in roots]
    known = set(members)
    links: list[tuple[frozenset, frozenset, int]] = []
    frontier = [k for k in members if k]
    while frontier:
        new = []
        for parent in frontier:
            for p in sorted(parent):
                child = parent - {p}
                if child not in known:
                    if len(known) >= max_nodes:
                        continue
                    known.add(child)
                    members.append(child)
                    new.append(child)
                links.append((parent, child, p))
        frontier = [k for k in new if k and sum(weights[p] for p in k) >= expand_at]
    score = {k: sum(weights[p] for p in k) + jitter * (hash(tuple(sorted(k))) % 1000) / 1000 for k in members}
    if full is None:
        full = 1.05 * max((score[frozenset(r)] for r in roots), default=1.0)
    ids = {k: i for i, k in enumerate(members)}
    largest = max((len(r) for r in roots), default=0)
    root_set = set(frozenset(r) for r in roots)
    nodes = [SAGNode(ids[k], tuple(sorted(k)), score[k], 0 if k in root_set else max(1, largest - len(k)),
                     k in root_set, True) for k in members]
    edges = [SAGEdge(ids[a], ids[b], p, score[a] - score[b]) for a, b, p in dict.fromkeys(links)]
    return SAGResult(method="sag", target=1, full_score=full, logits=torch.zeros(1, 3), grid=GRID, edges_y=EDGES,
                     edges_x=EDGES, roots=[], nodes=nodes, edges=edges, ordering="occlusion", patch_order=[],
                     truncated=False, details={"baseline": "black"})


def spread_weights(seed: int = 1) -> dict[int, float]:
    """Distinct weights per patch, at least 0.025 (so drops rarely tie and stay positive)."""
    values = np.random.default_rng(seed).permutation(GRID * GRID) + 5
    return {p: float(v) / 200 for p, v in enumerate(values)}


def three_roots(size: int) -> list[tuple[int, ...]]:
    """Three roots of ``size`` patches sharing at most one patch, as the SAG selects them."""
    return [tuple(range(0, size)), tuple(range(size - 1, 2 * size - 1)), tuple(range(2 * size - 1, 3 * size - 1))]


def draw(result: SAGResult, **kwargs: object) -> ET.Element:
    return ET.fromstring(render_svg(result, IMAGE, BOX, INPUT, ("cat", "tabby cat"), **kwargs))


def node_elements(svg: ET.Element) -> dict[str, ET.Element]:
    return {g.get("id"): g for g in svg.iter(f"{SVG}g") if "node" in g.get("class", "").split()}


def patches_of(element: ET.Element) -> set[int]:
    return {int(p) for p in element.get("data-patches").split()}


def size_of(svg: ET.Element) -> tuple[int, int]:
    width, height = int(svg.get("width")), int(svg.get("height"))
    assert svg.get("viewBox") == f"0 0 {width} {height}"
    return width, height


@pytest.fixture(scope="module")
def graphs() -> dict[str, SAGResult]:
    return {"small": synthetic(three_roots(6), spread_weights(), max_nodes=100, jitter=0.02),
            "huge": synthetic(three_roots(10), spread_weights(), max_nodes=2000, jitter=0.02)}


def test_the_synthetic_graphs_look_like_sag_graphs(graphs):
    small, huge = graphs["small"], graphs["huge"]
    assert len(small.nodes) == 100 and len(huge.nodes) == 2000 and len(huge.graph_roots) == 3
    ids = {n.id: n for n in huge.nodes}
    assert all(set(ids[e.source].patches) - set(ids[e.target].patches) == {e.removed} for e in huge.edges)
    parents = {}
    for e in huge.edges:
        parents.setdefault(e.target, set()).add(e.source)
    assert max(len(p) for p in parents.values()) > 1  # a DAG: children are shared
    assert all(e.drop > 0 for e in huge.edges)  # scores decrease along every edge


@pytest.mark.parametrize("name", ["small", "huge"])
def test_size_is_bounded_at_the_defaults(graphs, name):
    svg = draw(graphs[name])
    width, height = size_of(svg)
    assert width <= 2400 and height <= 2400
    assert svg.get("data-children") == "3" and svg.get("data-levels") == "3"
    panels = [g for g in svg.iter(f"{SVG}g") if g.get("class") == "sag-panel"]
    assert [int(g.get("data-root")) for g in panels] == [n.id for n in graphs[name].graph_roots]
    drawn = len(node_elements(svg))
    assert drawn == 3 * (1 + 3 * 3) if name == "huge" else 3 < drawn <= 3 * (1 + 3 * 3)


def test_long_labels_and_many_roots_do_not_widen_it():
    weights = spread_weights()
    result = synthetic([(p, p + 1, p + 2, p + 3) for p in range(0, 40, 4)], weights, max_nodes=400)
    assert len(result.graph_roots) == 10
    svg = ET.fromstring(render_svg(result, IMAGE, BOX, INPUT, ("x", "a very long class label " * 40)))
    width, height = size_of(svg)
    assert width <= 2400
    rows = {round(float(g.find(f"{SVG}rect").get("y"))) for g in svg.iter(f"{SVG}g") if g.get("class") == "sag-panel"}
    assert len(rows) == 4  # 10 panels wrap into rows of 3
    title = next(t for t in svg.iter(f"{SVG}text") if t.get("class") == "title")
    assert len(title.text) * 15 * 0.66 <= width  # cut, not widening


def test_drawn_edges_are_graph_edges_removing_exactly_their_patch(graphs):
    result = graphs["huge"]
    svg = draw(result)
    nodes = node_elements(svg)
    real = {(e.source, e.target, e.removed): e for e in result.edges}
    by_id = {n.id: n for n in result.nodes}
    lines = [e for e in svg.iter(f"{SVG}line") if e.get("class") == "edge"]
    assert lines
    drawn = set()
    for line in lines:
        panel, source, target, removed = (int(line.get(k)) for k in
                                          ("data-panel", "data-source", "data-target", "data-removed"))
        parent, child = nodes[f"p{panel}-node-{source}"], nodes[f"p{panel}-node-{target}"]
        assert patches_of(child) == patches_of(parent) - {removed} and removed in patches_of(parent)
        assert int(child.get("data-level")) == int(parent.get("data-level")) + 1
        assert (source, target, removed) in real
        assert float(line.get("data-drop")) == pytest.approx(real[(source, target, removed)].drop, abs=1e-4)
        assert patches_of(child) == set(by_id[target].patches)
        drawn.add((panel, source, target, removed))
    assert len(drawn) == len(lines)
    # each removed-patch outline sits on the child's thumbnail, over the removed patch
    rects = [r for r in svg.iter(f"{SVG}rect") if r.get("class") == "removed-patch"]
    outlined = set()
    for rect in rects:
        key = tuple(int(rect.get(k)) for k in ("data-panel", "data-source", "data-target", "data-removed"))
        outlined.add(key)
        image = nodes[f"p{key[0]}-node-{key[2]}"].find(f"{SVG}image")
        ix, iy, iw, ih = (float(image.get(k)) for k in ("x", "y", "width", "height"))
        cx = float(rect.get("x")) + float(rect.get("width")) / 2 - ix
        cy = float(rect.get("y")) + float(rect.get("height")) / 2 - iy
        assert 0 <= cx < iw and 0 <= cy < ih
        index = patch_index_map(result, round(iw), round(ih), INPUT)
        assert index[int(cy), int(cx)] == key[3]
        assert rect.get("stroke") == next(line.get("stroke") for line in lines if (
            int(line.get("data-panel")), int(line.get("data-source")), int(line.get("data-target")),
            int(line.get("data-removed"))) == key)
    assert outlined == drawn and len(rects) == len(lines)


@pytest.mark.parametrize("children,levels", [(3, 3), (2, 4), (1, 2), (5, 1)])
def test_rows_and_folds_match_the_graph(graphs, children, levels):
    result = graphs["huge"]
    svg = draw(result, children=children, levels=levels)
    nodes = node_elements(svg).values()
    lines = [e for e in svg.iter(f"{SVG}line") if e.get("class") == "edge"]
    marks = {(int(g.get("data-panel")), int(g.get("data-level"))): int(g.get("data-folded"))
             for g in svg.iter(f"{SVG}g") if g.get("class") == "more"}
    assert all(n > 0 for n in marks.values())
    for panel, root in enumerate(result.graph_roots):
        rows: dict[int, list[int]] = {}
        for g in nodes:
            if int(g.get("data-panel")) == panel:
                rows.setdefault(int(g.get("data-level")), []).append(int(g.get("data-node")))
        assert rows[0] == [root.id]
        assert sorted(rows) == list(range(levels + 1))
        for level in range(1, levels + 1):
            shown = set(rows[level])
            assert len(rows[level]) == len(shown) <= children
            candidates = {e.target for e in result.edges if e.source in rows[level - 1]}
            assert shown <= candidates
            assert marks.get((panel, level), 0) == len(candidates) - len(shown)
            # a child ranks by its largest drop from a shown parent: no folded child beats a shown one
            best = {t: max(e.drop for e in result.edges if e.source in rows[level - 1] and e.target == t)
                    for t in candidates}
            if candidates - shown:
                assert min(best[t] for t in shown) >= max(best[t] for t in candidates - shown)
            # every graph edge between two shown rows is drawn, and no other
            expected = {(e.source, e.target) for e in result.edges if e.source in rows[level - 1] and e.target in shown}
            got = {(int(e.get("data-source")), int(e.get("data-target"))) for e in lines
                   if int(e.get("data-panel")) == panel and int(e.get("data-target")) in shown}
            assert got == expected
    width, height = size_of(svg)
    assert width <= 2400 and height <= 2400


def test_children_shown_are_the_largest_drops():
    weights = {0: 5 / 16, 1: 4 / 16, 2: 3 / 16, 3: 2 / 16, 4: 1 / 16}  # exact in binary: drops tie exactly
    result = synthetic([(0, 1, 2, 3, 4)], weights, full=1.0)
    by_id = {n.id: n for n in result.nodes}
    (panel,) = panel_layout(result, children=3, levels=3)
    sets = [[set(by_id[i].patches) for i in row] for row in panel.rows]
    assert sets[0] == [{0, 1, 2, 3, 4}]
    # removing patch 0 drops 5/16, patch 1 4/16, patch 2 3/16: largest first
    assert sets[1] == [{1, 2, 3, 4}, {0, 2, 3, 4}, {0, 1, 3, 4}]
    # best drops of the nine grandchildren: {2,3,4} and {1,3,4} 5/16, {0,3,4} 4/16, the rest less
    assert sorted(map(sorted, sets[2])) == [[0, 3, 4], [1, 3, 4], [2, 3, 4]]
    assert set(by_id[panel.rows[2][2]].patches) == {0, 3, 4}
    assert panel.folded == [0, 2, 6, len({e.target for e in result.edges if e.source in panel.rows[2]}) - 3]
    assert all(by_id[e.source].patches != by_id[e.target].patches for e in panel.edges)
    # {1,3,4} has two shown parents ({1,2,3,4} minus 2 and {0,1,3,4} minus 0): both edges drawn
    child = next(i for i in panel.rows[2] if set(by_id[i].patches) == {1, 3, 4})
    assert sorted(e.removed for e in panel.edges if e.target == child) == [0, 2]
    svg = draw(result)
    (more,) = [g for g in svg.iter(f"{SVG}g") if g.get("class") == "more" and g.get("data-level") == "2"]
    assert more.get("data-folded") == "6" and "".join(more.itertext()).startswith("+ 6 more")
    texts = {g.get("data-node"): "".join(g.find(f"{SVG}text").itertext()) for g in node_elements(svg).values()}
    assert texts[str(panel.root)] == "0.938 (94%)"  # 15/16


def test_a_panel_goes_on_from_an_expanded_child_when_the_largest_drops_are_leaves():
    """Large drops fall below graph_threshold, where the graph stops expanding: the last place of
    the row goes to the largest-drop child the graph goes on from, so the panel shows the next level."""
    weights = {0: 0.40, 1: 0.30, 2: 0.20, 3: 0.06, 4: 0.04}
    result = synthetic([(0, 1, 2, 3, 4)], weights, full=1.0, expand_at=0.85)  # only 0.94 and 0.96 expand
    by_id = {n.id: n for n in result.nodes}
    (panel,) = panel_layout(result, children=3, levels=3)
    sets = [[set(by_id[i].patches) for i in row] for row in panel.rows]
    assert sets[1] == [{1, 2, 3, 4}, {0, 2, 3, 4}, {0, 1, 2, 4}]  # drops 0.40, 0.30, then 0.06 (expanded)
    assert panel.folded[1] == 2  # {0, 1, 3, 4} (drop 0.20, a leaf) and {0, 1, 2, 3} (0.04)
    assert len(panel.rows) >= 3 and all(set(by_id[i].patches) < {0, 1, 2, 4} for i in panel.rows[2])
    with_children = {e.source for e in result.edges}
    (both_leaves,) = [panel_layout(synthetic([(0, 1, 2, 3, 4)], weights, full=1.0, expand_at=2.0), 3, 3)[0]]
    assert len(both_leaves.rows) == 2 and len(both_leaves.rows[1]) == 3  # nothing to go on from: drops only
    assert panel.rows[1][2] in with_children and not any(i in with_children for i in panel.rows[1][:2])


def test_a_root_without_children_is_drawn_alone():
    weights = spread_weights()
    result = synthetic([(3, 10, 11)], weights)
    result = SAGResult(**{**vars(result), "nodes": [n for n in result.nodes if n.root], "edges": []})
    (panel,) = panel_layout(result)
    assert panel.rows == [[result.nodes[0].id]] and panel.folded == [0] and panel.edges == []
    svg = draw(result)
    (node,) = node_elements(svg).values()
    assert node.get("class") == "node root" and node.get("data-patches") == "3 10 11"
    assert node.get("data-level") == "0" and node.get("id") == f"p0-node-{result.nodes[0].id}"
    assert float(node.get("data-relative")) == pytest.approx(result.nodes[0].score / result.full_score, abs=1e-4)
    assert not [e for e in svg.iter(f"{SVG}line") if e.get("class") == "edge"]
    assert not [g for g in svg.iter(f"{SVG}g") if g.get("class") == "more"]


def test_no_roots_gives_a_small_svg_saying_so():
    result = synthetic([], spread_weights())
    assert panel_layout(result) == []
    svg = draw(result)
    width, height = size_of(svg)
    assert width <= 1000 and height <= 300
    assert not node_elements(svg)
    assert any("no graph" in (t.text or "").lower() for t in svg.iter(f"{SVG}text"))


def test_levels_stop_when_no_children_remain():
    result = synthetic([(0, 1)], spread_weights())  # {0,1} -> {0},{1} -> {} : two levels below the root
    (panel,) = panel_layout(result, children=3, levels=5)
    assert [len(row) for row in panel.rows] == [1, 2, 1] and panel.folded == [0, 0, 0]
    svg = draw(result, levels=5)
    assert {g.get("data-level") for g in node_elements(svg).values()} == {"0", "1", "2"}
    empty = next(g for g in node_elements(svg).values() if g.get("data-level") == "2")
    assert empty.get("data-patches") == ""
