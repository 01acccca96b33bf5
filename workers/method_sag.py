"""Structured Attention Graphs as a queued job: ``sag``.

The result holds every root found (minimal sufficient patch sets), the whole graph (nodes keyed
by patch set, edges removing one patch), the scores, an SVG of the graph (one panel per graph
root, a few children per level: ``graph_children`` and ``graph_levels`` bound its size), a PNG
of the graph's roots over the image (``picture_png``, served as ``result.png``), the region of
the image the model saw (``region``), the parameters used, the patch ordering used, the
forward-pass counts and the timing.
"""

from __future__ import annotations

import base64
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from explainers.method import Method
from explainers.pipeline import target_prediction, top_predictions
from explainers.sag import SAGResult
from explainers.sag_render import render_svg, root_pictures, roots_overlay
from workers.methods import JobKind, JobParams, ProgressReporter

ROOT_PICTURE_SIDE = 256  # each root's own overlay stays small; picture_png has the full size


class GraphJobOptions(BaseModel):
    """A graph job's own options."""

    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(5, ge=1, le=100, description="how many predictions to return")
    graph_children: int = Field(3, ge=1, le=10, description="children drawn per level of each root's panel "
                                "(largest drops first; the rest folded into '+ N more')")
    graph_levels: int = Field(3, ge=1, le=12, description="levels drawn below each root")


def result_json(result: SAGResult) -> dict[str, Any]:
    """The JSON-able roots, graph and bookkeeping of a SAG result."""
    full = max(result.full_score, 1e-12)
    return {
        "full_score": round(result.full_score, 6),
        "threshold": round(result.details["threshold"], 6),
        "graph_threshold": round(result.details["graph_threshold"], 6),
        "grid": result.grid,
        "patch_edges": {"x": list(result.edges_x), "y": list(result.edges_y)},
        "ordering": result.ordering,
        "patch_order": result.patch_order,
        "baseline": result.details["baseline"],
        "precision": result.details["precision"],
        "search_steps": result.details["search_steps"],
        "roots": [{"patches": list(r.patches), "score": round(r.score, 6), "relative": round(r.score / full, 4),
                   "selected": r.selected} for r in result.roots],
        "nodes": [{"id": n.id, "patches": list(n.patches), "score": round(n.score, 6),
                   "relative": round(n.score / full, 4), "level": n.level, "root": n.root, "expanded": n.expanded}
                  for n in result.nodes],
        "edges": [{"source": e.source, "target": e.target, "removed": e.removed, "drop": round(e.drop, 6)}
                  for e in result.edges],
        "truncated": result.truncated,
        "forward_passes": result.details["forward"],
        "incremental": result.details["incremental"],  # None when every image ran whole
        "runtime": result.details["runtime"],  # what ran the patch-set forwards: onnxruntime, torch or mixed
    }


def run_graph_job(method: type[Method], model: Any, image: Any, target: int | None, params: JobParams,
                  report: ProgressReporter, settings: Any) -> dict[str, Any]:
    """Search, graph and drawings for one image; ``report`` is called per search step."""
    started = time.perf_counter()
    assert isinstance(params, GraphJobOptions)
    report(0.0, "preparing")
    inputs, geometry = model.preprocessor.to_input(image)
    layer = model.default_layer if getattr(model, "scriptable_hooks", True) else None
    explainer = method(model.execution, params.method_config(method), layer, model.normalization)
    result = explainer.explain(inputs, target, lambda fraction, stage: report(0.9 * fraction, stage))
    explained = time.perf_counter()
    report(0.9, "drawing")
    input_size = (int(inputs.shape[-2]), int(inputs.shape[-1]))
    svg = render_svg(result, image, geometry.box, input_size, model.labels, children=params.graph_children,
                     levels=params.graph_levels)
    overlay = roots_overlay(result, image, geometry.box, input_size, settings.overlay_max_side)
    pictures = root_pictures(result, image, geometry.box, input_size, ROOT_PICTURE_SIDE)
    finished = time.perf_counter()

    body = result_json(result)
    for root, picture in zip(body["roots"], pictures):
        root["png"] = base64.b64encode(picture["png"]).decode("ascii")
    logits = result.logits[0]
    timing = dict(result.details["timing_ms"])
    timing.update(explain=round((explained - started) * 1e3, 2), render=round((finished - explained) * 1e3, 2),
                  total=round((finished - started) * 1e3, 2))
    return {
        "model": model.name,
        "method": method.name,
        "target": vars(target_prediction(logits, model.labels, result.target)),
        "predictions": [vars(p) for p in top_predictions(logits, model.labels, params.top_k)],
        **body,
        "svg": svg,
        "picture_png": base64.b64encode(overlay).decode("ascii"),
        # the part of the uploaded image the model saw (image pixels) and the model input's size
        "region": {"box": [round(float(v), 2) for v in geometry.box], "input": [input_size[0], input_size[1]]},
        "params": params.model_dump(),
        "timing_ms": timing,
    }


GRAPH_JOBS = JobKind(GraphJobOptions, run_graph_job, timeout_s=900)
