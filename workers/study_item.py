"""One study item inside a worker: (image, model, method) in, a compact result out.

A study keeps numbers, not pictures: the map at the method's own resolution (pooled to at most
``MAX_GRID`` per side), the target and its probability, and what the study's analyses need from
this item. Region shares and rankings are computed later from the stored map (they depend on the
manifest, not on the model), so only work that needs the network happens here:

- ``faithfulness``: deletion and insertion AUCs of the map (:func:`explainers.metrics.deletion_insertion`,
  blurred baseline, the study's number of steps);
- ``crosstest`` (items of the cross-test's source method): the ``budget`` most salient share of
  the image kept, the rest filled (blur or black), shown to every model of the study;
- ``subexplanations`` (SAG items): every minimal sufficient explanation the search found and,
  per threshold, how many of its subsets (removing patches one at a time while the probability
  stays above the lowest threshold) keep that share of the full-image probability.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from explainers.baselines import BlurSpec, gaussian_blur, make_baseline
from explainers.method import Method
from explainers.metrics import deletion_insertion
from explainers.pipeline import make_explainer, target_prediction
from explainers.registry import METHODS
from explainers.result import Explanation
from explainers.sag import SAGResult
from workers.method_igos import mask_config
from workers.methods import JobParams, ProgressReporter, get_method
from workers.study_spec import CrosstestOptions, StudySpec, SubexplanationOptions

MAX_GRID = 32  # a map finer than this is average-pooled to it: compact enough for Redis, fine enough to rank
CROSSTEST_SIDE = 448  # the long side the cross-test's masked images are composed at


def item_options(spec: StudySpec, method: str) -> dict[str, Any]:
    """The study options an item of ``method`` depends on (part of its cache key)."""
    analyses, options = spec.analyses, {}
    kind = METHODS[method].result_kind
    if kind == "graph":
        if analyses.subexplanations is not None:
            options["subexplanations"] = analyses.subexplanations.model_dump()
        return options
    if analyses.faithfulness is not None:
        options["faithfulness_steps"] = analyses.faithfulness.steps
    if analyses.crosstest is not None and crosstest_method(spec) == method:
        options["crosstest"] = {**analyses.crosstest.model_dump(exclude={"method"}), "viewers": list(spec.models)}
    return options


def crosstest_method(spec: StudySpec) -> str | None:
    """The method whose maps give the cross-test's regions (the option, else the first map method)."""
    if spec.analyses.crosstest is None:
        return None
    if spec.analyses.crosstest.method is not None:
        return spec.analyses.crosstest.method
    return next((m.name for m in spec.methods if METHODS[m.name].result_kind != "graph"), None)


def run_study_item(model: Any, image: Image.Image, method_name: str, target: int | None, raw_params: dict[str, Any],
                   label: int | None, spec: StudySpec, registry: Any, report: ProgressReporter) -> dict[str, Any]:
    """Explain ``image`` with ``model`` and ``method_name``, then run the item's share of the analyses."""
    started = time.perf_counter()
    method = METHODS[method_name]
    params = get_method(method_name).params.model_validate(raw_params)
    inputs, geometry = model.preprocessor.to_input(image)
    report(0.05, method_name)
    if method.result_kind == "graph":
        result = _graph_item(model, inputs, method, params, target, spec.analyses.subexplanations, report)
        result["timing_ms"] = {"total": round((time.perf_counter() - started) * 1e3, 2)}
        return result
    explanation = _explain_map(model, inputs, method, params, target, report)
    saliency = explanation.saliency[:1].float()
    target_index = int(explanation.targets[0])
    logits = explanation.logits[0]
    explained = time.perf_counter()
    result: dict[str, Any] = {
        "target": vars(target_prediction(logits, model.labels, target_index)),
        "top1": int(logits.argmax()),
        "map": compact_map(saliency[0], geometry.box),
        "faithfulness": None, "crosstest": None, "subexplanations": None, "cached": False,
    }
    timing = {"explain": round((explained - started) * 1e3, 2)}
    if spec.analyses.faithfulness is not None:
        report(0.7, "deletion / insertion")
        scores = deletion_insertion(model.execution, inputs, saliency, explanation.targets[:1],
                                    steps=spec.analyses.faithfulness.steps, baseline="blur")
        result["faithfulness"] = scores.as_json(0, curves=False)
        timing["faithfulness"] = round((time.perf_counter() - explained) * 1e3, 2)
    if spec.analyses.crosstest is not None and crosstest_method(spec) == method_name:
        report(0.85, "cross-test")
        mark = time.perf_counter()
        result["crosstest"] = crosstest(image, saliency[0], model.preprocessor, spec.analyses.crosstest,
                                        [registry.get(name) for name in spec.models], label)
        timing["crosstest"] = round((time.perf_counter() - mark) * 1e3, 2)
    timing["total"] = round((time.perf_counter() - started) * 1e3, 2)
    result["timing_ms"] = timing
    report(1.0, "done")
    return result


def _explain_map(model: Any, inputs: torch.Tensor, method: type[Method], params: JobParams, target: int | None,
                 report: ProgressReporter) -> Explanation:
    """The method's map of one image, configured as its job would be."""
    if method.result_kind == "mask":
        config = mask_config(method, params)
        baseline, _ = make_baseline(inputs, config.baseline)
        explainer = method(model.execution, config)
        return explainer.explain(inputs, target, lambda fraction, stage: report(0.05 + 0.6 * fraction, stage),
                                 baseline=baseline)
    explainer = make_explainer(method.name, model, getattr(params, "layer", None), params.method_config(method))
    return explainer.explain(inputs, target)


def compact_map(saliency: torch.Tensor, box: tuple[float, float, float, float]) -> dict[str, Any]:
    """The map as stored: at most ``MAX_GRID`` per side, 4 decimals, with where it lies in the image."""
    grid = saliency.float()
    if max(grid.shape) > MAX_GRID:
        size = (min(grid.shape[0], MAX_GRID), min(grid.shape[1], MAX_GRID))
        grid = F.adaptive_avg_pool2d(grid[None, None], size)[0, 0]
    return {"size": list(grid.shape), "grid": [[round(v, 4) for v in row] for row in grid.cpu().tolist()],
            "box": [round(float(v), 3) for v in box]}


def keep_mask(saliency: torch.Tensor, preprocessor: Any, width: int, height: int, budget: float,
              image_size: tuple[int, int]) -> np.ndarray:
    """The ``budget`` share of a ``width x height`` picture of the image with the highest saliency
    (stable sort: ties keep raster order), as a boolean array."""
    geometry = preprocessor.geometry(*image_size)
    levels = preprocessor.map_to_image(saliency, geometry, width, height).flatten()
    order = torch.sort(-levels, stable=True).indices
    kept = torch.zeros(levels.numel(), dtype=torch.bool, device=levels.device)
    kept[order[: max(1, round(budget * levels.numel()))]] = True
    return kept.view(height, width).cpu().numpy()


def crosstest(image: Image.Image, saliency: torch.Tensor, preprocessor: Any, options: CrosstestOptions,
              viewers: list[Any], label: int | None) -> dict[str, Any]:
    """Show each budget's most salient region alone to every viewer model.

    A viewer's class is the label when the manifest gives one (then ``correct`` says whether the
    viewer's top-1 on the region is the label), else its own top-1 on the full image; ``retention``
    is its probability of that class on the region over the probability on the full image."""
    from explainers.render import fit_within

    width, height = fit_within(image.width, image.height, CROSSTEST_SIDE)
    small = image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    fill = gaussian_blur(pixels, BlurSpec.for_size(max(width, height))) if options.fill == "blur" else \
        torch.zeros_like(pixels)
    composites = []
    for budget in options.budgets:
        kept = torch.from_numpy(keep_mask(saliency, preprocessor, width, height, budget, image.size))
        mixed = torch.where(kept[None, None], pixels, fill)[0]
        composites.append(Image.fromarray((mixed.permute(1, 2, 0).numpy() * 255.0 + 0.5).clip(0, 255)
                                          .astype(np.uint8)))
    out: dict[str, Any] = {"budgets": list(options.budgets), "viewers": {}}
    for viewer in viewers:
        batch = torch.cat([viewer.preprocessor.to_input(picture)[0] for picture in [small, *composites]])
        probabilities = viewer.execution.session().logits(batch, exact=True).softmax(dim=-1)  # a measurement: fp32
        cls = label if label is not None and label < probabilities.shape[1] else int(probabilities[0].argmax())
        full = float(probabilities[0, cls])
        scores = [float(p) for p in probabilities[1:, cls]]
        out["viewers"][viewer.name] = {
            "class": cls, "full_score": round(full, 6), "scores": [round(s, 6) for s in scores],
            "retention": [round(s / full, 6) if full > 0 else 0.0 for s in scores],
            "correct": [bool(int(p.argmax()) == label) if label is not None else None for p in probabilities[1:]],
        }
    return out


def _graph_item(model: Any, inputs: torch.Tensor, method: type[Method], params: JobParams, target: int | None,
                options: SubexplanationOptions | None, report: ProgressReporter) -> dict[str, Any]:
    """SAG's search with a graph grown from every root it found (not only the diverse few it
    draws), so that each minimal sufficient explanation's subsets can be counted."""
    config = params.method_config(method)
    if options is not None:
        roots = min(config.max_roots, 10)
        config = config.model_copy(update={
            "max_roots": roots, "graph_roots": roots, "overlap_limit": min(config.grid ** 2, 64),
            "graph_threshold": options.thresholds[0], "max_nodes": options.max_nodes})
    layer = model.default_layer if getattr(model, "scriptable_hooks", True) else None
    explainer = method(model.execution, config, layer, model.normalization)
    result: SAGResult = explainer.explain(inputs, target, lambda fraction, stage: report(0.05 + 0.9 * fraction, stage))
    logits = result.logits[0]
    return {
        "target": vars(target_prediction(logits, model.labels, result.target)),
        "top1": int(logits.argmax()),
        "map": None, "faithfulness": None, "crosstest": None, "cached": False,
        "subexplanations": count_subexplanations(result, options.thresholds) if options is not None else None,
    }


def count_subexplanations(result: SAGResult, thresholds: list[float]) -> dict[str, Any]:
    """Per minimal sufficient explanation (a graph root): how many of its non-empty proper subsets
    in the graph keep each threshold's share of the full-image probability."""
    full = max(result.full_score, 1e-12)
    children: dict[int, list[int]] = {}
    for edge in result.edges:
        children.setdefault(edge.source, []).append(edge.target)
    nodes = {node.id: node for node in result.nodes}
    mses = []
    for root in (node for node in result.nodes if node.root):
        seen, stack = set(), list(children.get(root.id, ()))
        while stack:
            node = stack.pop()
            if node not in seen:
                seen.add(node)
                stack.extend(children.get(node, ()))
        shares = [nodes[n].score / full for n in seen if nodes[n].patches]
        mses.append({"patches": list(root.patches), "score": round(root.score / full, 6),
                     "counts": [sum(share >= t for share in shares) for t in thresholds]})
    return {"thresholds": list(thresholds), "full_score": round(result.full_score, 6), "mses": mses,
            "truncated": result.truncated}
