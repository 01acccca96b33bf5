"""Several methods on the same images, side by side: the comparison behind ``unbox compare``.

Every method of an image explains the same class (``target``, else the model's top-1 resolved
once per image) and runs in this process on one loaded model: heat-map methods through
:func:`explainers.pipeline.explain_image` with pixel deletion / insertion scores, mask methods
(I-GOS, I-GOS++) and graph methods (SAG) through their job runners, which score (or not) as
their jobs do. Deletion and insertion use one protocol for heat maps and masks (blurred
baseline, the same number of steps, trapezoidal AUC over pixels), so the numbers compare.
The figure shows each explanation's own time (its ``timing_ms``: scoring and drawing aside);
the wall time around each call, scoring included, is kept too.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from PIL import Image
from pydantic import BaseModel, ValidationError

from core.validation import describe_validation_errors

if TYPE_CHECKING:
    from explainers.compare_figure import FigureLayout, FigureRow
    from explainers.pipeline import Prediction

# Importing this module stays cheap (the CLI's parser reads DEFAULT_METHODS and PRESETS): the
# explainers, and torch with them, are imported by the functions that run them.

Preset = Literal["cpu", "paper"]
PRESETS: tuple[Preset, ...] = ("cpu", "paper")
DEFAULT_METHODS = ("gradcam", "scorecam", "igos", "igos++", "sag")  # the seed article's figure
METRIC_STEPS = 50  # explainers.metrics.DEFAULT_STEPS, without importing torch here
# (image name, method, fraction of that method done, stage): stage "start" before a method runs,
# its own stages while it runs (I-GOS's iterations, SAG's search steps), "end" once it has run;
# "warm-up" before an untimed first run (compare_images' warm_up)
CompareProgress = Callable[[str, str, float, str], None]

TITLES = {"gradcam": "Grad-CAM", "scorecam": "Score-CAM", "cam": "CAM", "gradcam++": "Grad-CAM++",
          "xgradcam": "XGrad-CAM", "layercam": "LayerCAM", "hirescam": "HiResCAM", "eigencam": "Eigen-CAM",
          "rollout": "Attention rollout", "igos": "I-GOS", "igos++": "I-GOS++", "sag": "SAG"}
# The dashboard's "Quick (coarser)" SAG preset: a 5 x 5 lattice and a narrow search.
QUICK_SAG = {"grid": 5, "beam_width": 2, "successors": 6, "max_roots": 4}


@dataclass
class MethodOutcome:
    """One method on one image: its picture, scores and times, or the error it raised."""

    method: str
    kind: str  # the registry's result kind: heatmap, mask or graph
    picture: Image.Image | None = None  # the overlay (graph: the roots over the image)
    deletion_auc: float | None = None
    insertion_auc: float | None = None
    seconds: float = 0.0  # wall time around the method's call, scoring included
    timing_ms: dict[str, float] = field(default_factory=dict)  # the method's own
    params: dict[str, Any] = field(default_factory=dict)
    target: int | None = None  # the class the method explained
    roots: int | None = None  # graph methods: how many roots were found
    error: str | None = None

    @property
    def explain_seconds(self) -> float:
        """The explanation's own time (scoring and drawing aside; the figure shows this one),
        else the wall time around the call."""
        own = self.timing_ms.get("explain", self.timing_ms.get("optimise"))
        return own / 1e3 if isinstance(own, (int, float)) else self.seconds


@dataclass
class ImageComparison:
    """One image: its name, the class every method explained, and each method's outcome."""

    name: str
    image: Image.Image
    target: Prediction
    outcomes: list[MethodOutcome]

    @property
    def failed(self) -> bool:
        return any(outcome.error is not None for outcome in self.outcomes)


def title(method: str) -> str:
    """The method's name as papers write it (the registry name for others)."""
    return TITLES.get(method, method)


def default_preset(device: str) -> Preset:
    """The paper settings where a GPU makes them affordable, the CPU preset elsewhere."""
    return "cpu" if device == "cpu" else "paper"


def preset_params(method: str, preset: Preset, scorecam_channels: int) -> dict[str, Any]:
    """A method's params for ``preset`` before the caller's overrides: ``paper`` is every
    method's own defaults (exact Score-CAM), ``cpu`` the CPU presets (I-GOS's ``preset="cpu"``,
    the dashboard's quick SAG, Score-CAM's ``scorecam_channels`` best channels; 0 = exact)."""
    from explainers.registry import METHODS

    if preset == "paper":
        return {}
    kind = METHODS[method].result_kind
    if kind == "mask":
        return {"preset": "cpu"}
    if kind == "graph":
        return dict(QUICK_SAG)
    if method == "scorecam":
        return {"channels": scorecam_channels or None}
    return {}


def method_params(methods: Sequence[str], preset: Preset, scorecam_channels: int,
                  overrides: dict[str, dict[str, Any]] | None = None,
                  metric_steps: int = METRIC_STEPS) -> dict[str, BaseModel]:
    """Each method's validated job params: the preset's (and for masks the figure's
    ``metric_steps``), then ``overrides[method]`` on top.

    ``unknown_method`` for a name the registry lacks, ``invalid_parameter`` for bad params;
    both before any image is explained."""
    from explainers.errors import ExplainError
    from explainers.registry import METHODS
    from workers.methods import get_method

    if preset not in PRESETS:
        raise ExplainError("invalid_parameter", f"preset must be one of {list(PRESETS)}, not {preset!r}")
    unknown = [name for name in [*methods, *(overrides or {})] if name not in METHODS]
    if unknown:
        raise ExplainError("unknown_method", f"unknown method {unknown[0]!r}; known: {', '.join(sorted(METHODS))}")
    chosen = {}
    for name in methods:
        scoring = {"metric_steps": metric_steps} if METHODS[name].result_kind == "mask" else {}
        raw = {**preset_params(name, preset, scorecam_channels), **scoring, **(overrides or {}).get(name, {})}
        try:
            chosen[name] = get_method(name).params.model_validate(raw)
        except ValidationError as exc:
            raise ExplainError("invalid_parameter",
                               f"{name} params: {describe_validation_errors(exc.errors(), 'params')}") from None
    return chosen


def _png(data: str | bytes) -> Image.Image:
    raw = base64.b64decode(data) if isinstance(data, str) else data
    return Image.open(io.BytesIO(raw)).convert("RGB")


def _run(name: str, model: Any, image: Image.Image, target: int, params: BaseModel, settings: Any,
         report: Callable[[float, str], None], metric_steps: int) -> MethodOutcome:
    """One method on one image (raises what the method raises)."""
    from explainers.metrics import map_metrics
    from explainers.pipeline import explain_image
    from explainers.registry import METHODS
    from workers.methods import get_method

    method = METHODS[name]
    outcome = MethodOutcome(name, method.result_kind, params=params.model_dump(mode="json"))
    if method.result_kind == "heatmap":
        result = explain_image(model, image, name, target, getattr(params, "layer", None),
                               getattr(params, "top_k", 5), settings.overlay_max_side,
                               params.method_config(method))  # type: ignore[attr-defined]
        scored = time.perf_counter()
        # what explain_image(metrics="pixel") scores, at the figure's number of steps
        inputs, _ = model.preprocessor.to_input(image)
        metrics = map_metrics(model.execution, inputs, result.explanation.saliency, result.explanation.targets,
                              steps=metric_steps, unit="pixel")
        outcome.picture = _png(result.heatmap.overlay_png)
        outcome.timing_ms = {**result.timing_ms, "metrics": round((time.perf_counter() - scored) * 1e3, 2)}
        outcome.target = result.target.index
    else:
        body = get_method(name).run(model, image, target, params, report, settings)
        outcome.picture = _png(body["picture_png"] if "picture_png" in body else body["heatmap"]["overlay_png"])
        outcome.timing_ms = dict(body.get("timing_ms", {}))
        outcome.target = body.get("target", {}).get("index")
        outcome.roots = len(body["roots"]) if method.result_kind == "graph" else None
        outcome.params = body.get("params", outcome.params)
        metrics = body.get("metrics") or {}
    if "deletion_auc" in metrics:
        outcome.deletion_auc = float(metrics["deletion_auc"])
        outcome.insertion_auc = float(metrics["insertion_auc"])
    return outcome


def resolve_target(model: Any, image: Image.Image, target: int | None) -> Prediction:
    """The class to explain (``target``, else the model's top-1) with its probability."""
    from explainers.pipeline import target_prediction, top_predictions

    inputs, _ = model.preprocessor.to_input(image)
    logits = model.logits(inputs)[0]
    if target is None:
        return top_predictions(logits, model.labels, 1)[0]
    return target_prediction(logits, model.labels, target)


def compare_images(model: Any, images: Sequence[tuple[str, Image.Image]], methods: Sequence[str],
                   target: int | Sequence[int | None] | None, preset: Preset, settings: Any,
                   progress: CompareProgress | None = None, overrides: dict[str, dict[str, Any]] | None = None,
                   metric_steps: int = METRIC_STEPS, warm_up: bool = False) -> list[ImageComparison]:
    """Every method of ``methods`` on every named image, all on ``model``.

    ``target``: one class for every image, one per image, or None (each image's top-1);
    ``preset`` and ``overrides`` give the params (:func:`method_params`); heat maps and masks
    are scored over ``metric_steps`` steps (unless a mask's params say otherwise); ``settings``
    are the workers' (``overlay_max_side``, ``scorecam_channels``). With ``warm_up`` every
    method first runs once, untimed, on the first image, so that no time includes the one-off
    costs of a first run (kernels and runtimes built for a new shape). A method that refuses
    an image (:class:`ExplainError`) becomes an outcome with its ``error``; the others run."""
    from explainers.errors import ExplainError
    from explainers.registry import METHODS

    chosen = method_params(methods, preset, settings.scorecam_channels, overrides, metric_steps)
    targets = list(target) if isinstance(target, Sequence) else [target] * len(images)
    if len(targets) != len(images):
        raise ExplainError("invalid_parameter", f"{len(targets)} targets for {len(images)} images")
    comparisons: list[ImageComparison] = []
    if warm_up and images:
        name, image = images[0]
        first = resolve_target(model, image, targets[0]).index
        for method in methods:
            if progress is not None:
                progress(name, method, 0.0, "warm-up")
            try:
                _run(method, model, image, first, chosen[method], settings, lambda fraction, stage: None,
                     metric_steps)
            except ExplainError:
                pass  # the timed run reports it
    for (name, image), wanted in zip(images, targets):
        explained = resolve_target(model, image, wanted)
        outcomes = []
        for method in methods:
            def report(fraction: float, stage: str, _method: str = method, _name: str = name) -> None:
                if progress is not None:
                    progress(_name, _method, fraction, stage)

            report(0.0, "start")
            started = time.perf_counter()
            try:
                outcome = _run(method, model, image, explained.index, chosen[method], settings, report,
                               metric_steps)
            except ExplainError as exc:
                outcome = MethodOutcome(method, METHODS[method].result_kind,
                                        params=chosen[method].model_dump(mode="json"), error=exc.message)
            outcome.seconds = time.perf_counter() - started
            report(1.0, "end")
            outcomes.append(outcome)
        comparisons.append(ImageComparison(name, image, explained, outcomes))
    return comparisons


def format_seconds(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.1f} s"


def caption(outcome: MethodOutcome) -> list[str]:
    """A method cell's caption: its AUCs (or why there are none) and its time, or its error."""
    if outcome.error is not None:
        return [f"failed: {outcome.error}"]
    if outcome.deletion_auc is not None and outcome.insertion_auc is not None:
        scores = f"deletion {outcome.deletion_auc:.3f} · insertion {outcome.insertion_auc:.3f}"
    elif outcome.kind == "graph":
        count = outcome.roots or 0
        scores = f"not a heat map: {count} root{'' if count == 1 else 's'}"
    else:
        scores = "no deletion / insertion scores"
    return [scores, f"explained in {format_seconds(outcome.explain_seconds)}"]


def image_caption(comparison: ImageComparison) -> list[str]:
    target = comparison.target
    return [comparison.name, f"{target.label} ({target.index}) p={target.score:.3f}"]


def figure_rows(comparisons: Sequence[ImageComparison]) -> list[FigureRow]:
    """The comparison as rows of :func:`explainers.compare_figure.compose_figure`."""
    from explainers.compare_figure import Cell, FigureRow

    return [FigureRow(Cell(c.name, c.image, image_caption(c)),
                      [Cell(title(o.method), o.picture, caption(o), failed=o.error is not None) for o in c.outcomes])
            for c in comparisons]


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def summary(comparisons: Sequence[ImageComparison], layout: FigureLayout) -> list[dict[str, Any]]:
    """Per image: name, target, its cell, and per method the scores, times, caption and cell
    (boxes as ``[x, y, width, height]`` in figure pixels)."""
    images = []
    for comparison, row in zip(comparisons, layout.cells):
        methods = []
        for outcome, cell in zip(comparison.outcomes, row[1:]):
            methods.append({
                "method": outcome.method, "title": title(outcome.method), "kind": outcome.kind,
                "target": outcome.target, "deletion_auc": _rounded(outcome.deletion_auc),
                "insertion_auc": _rounded(outcome.insertion_auc), "seconds": round(outcome.seconds, 3),
                "explain_seconds": round(outcome.explain_seconds, 3),
                "timing_ms": outcome.timing_ms, "roots": outcome.roots, "error": outcome.error,
                "caption": caption(outcome), "params": outcome.params, **cell.as_json(),
            })
        images.append({"name": comparison.name, "target": vars(comparison.target),
                       "caption": image_caption(comparison), **row[0].as_json(), "methods": methods})
    return images


__all__ = ["DEFAULT_METHODS", "PRESETS", "CompareProgress", "ImageComparison", "MethodOutcome", "Preset",
           "caption", "compare_images", "default_preset", "figure_rows", "method_params", "preset_params",
           "resolve_target", "summary", "title"]
