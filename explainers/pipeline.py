"""One image in, prediction + explanation + pictures out: shared by the API, CLI and workers
(:func:`explain_images` does several in one batch).

It only relies on the duck-typed model handle below (the catalogue's ``LoadedModel`` fits),
so explainers stay independent of how models are built and stored.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch import nn

from explainers.errors import ExplainError
from explainers.execution import Execution
from explainers.method import Method, MethodConfig, Normalization, Targets
from explainers.metrics import MetricUnit, map_metrics
from explainers.registry import create, method_class
from explainers.render import blend, encode_png, fit_within, to_uint8
from explainers.result import Explanation


class ModelHandle(Protocol):
    name: str
    module: nn.Module
    execution: Execution
    labels: tuple[str, ...]
    preprocessor: Any
    default_layer: str | None
    normalization: Normalization


@dataclass
class Prediction:
    index: int
    label: str
    score: float


@dataclass
class HeatmapPictures:
    """A map at feature resolution plus its pictures at the uploaded image's geometry."""

    width: int
    height: int
    grid: list[list[float]]
    png: bytes
    overlay_png: bytes

    def as_json(self) -> dict[str, Any]:
        return {
            "width": self.width,
            "height": self.height,
            "grid": self.grid,
            "png": base64.b64encode(self.png).decode("ascii"),
            "overlay_png": base64.b64encode(self.overlay_png).decode("ascii"),
        }


@dataclass
class ImageExplanation:
    model: str
    method: str
    layer: str | None
    target: Prediction
    predictions: list[Prediction]
    heatmap: HeatmapPictures
    explanation: Explanation
    timing_ms: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Any] | None = None  # deletion/insertion AUCs + protocol, when asked for

    def as_json(self) -> dict[str, Any]:
        """The JSON answer of ``/v1/explain`` (also a CAM job's result)."""
        body = {
            "model": self.model,
            "method": self.method,
            "layer": self.layer,
            "target": vars(self.target),
            "predictions": [vars(p) for p in self.predictions],
            "heatmap": self.heatmap.as_json(),
            # what ran (mode, channels, forward passes, precision), as plain JSON values
            "details": json.loads(json.dumps(self.explanation.details, default=str)),
        }
        if self.metrics is not None:
            body["metrics"] = self.metrics
        body["timing_ms"] = self.timing_ms
        return body


def top_predictions(logits: torch.Tensor, labels: tuple[str, ...], k: int) -> list[Prediction]:
    """The ``k`` most probable classes of one image's logits."""
    probabilities = logits.float().softmax(dim=-1)
    values, indices = probabilities.topk(min(k, probabilities.numel()))
    return [Prediction(int(i), labels[int(i)], round(float(v), 6)) for v, i in zip(values.tolist(), indices.tolist())]


def target_prediction(logits: torch.Tensor, labels: tuple[str, ...], index: int) -> Prediction:
    probabilities = logits.float().softmax(dim=-1)
    return Prediction(index, labels[index], round(float(probabilities[index]), 6))


def make_explainer(method: str, model: ModelHandle, layer: str | None = None, config: MethodConfig | None = None,
                   synchronous: bool = False) -> Method:
    """The method ``method`` bound to ``model``'s execution at ``layer`` (default: the model's).

    A method that reads no layer (``uses_layer = False``: attention rollout) gets none, and a
    layer asked for it is ``invalid_parameter`` rather than silently ignored."""
    if not method_class(method, synchronous).uses_layer:
        if layer is not None:
            raise ExplainError("invalid_parameter", f"method {method} reads every block of the model and takes "
                               f"no layer (got {layer!r})")
        return create(method, model.execution, config, None, model.normalization, synchronous)
    return create(method, model.execution, config, layer or model.default_layer, model.normalization, synchronous)


def render_pictures(image: Image.Image, saliency: torch.Tensor, preprocessor: Any,
                    overlay_max_side: int, map_at_display_size: bool = False) -> HeatmapPictures:
    """Grayscale PNG of the map at the image's size (at the overlay's with ``map_at_display_size``,
    as stored job results keep it) and a colour overlay capped at ``overlay_max_side``."""
    geometry = preprocessor.geometry(*image.size)
    width, height = fit_within(image.width, image.height, overlay_max_side)
    display = (width, height) != image.size
    small = image.resize((width, height), Image.Resampling.BILINEAR) if display else image
    levels = to_uint8(preprocessor.map_to_image(saliency, geometry, width, height)) if display else None
    full = levels if map_at_display_size and levels is not None else to_uint8(
        preprocessor.map_to_image(saliency, geometry))
    overlay = blend(np.asarray(small.convert("RGB")), full if levels is None else levels)
    grid = [[round(v, 4) for v in row] for row in saliency.float().cpu().tolist()]
    return HeatmapPictures(image.width, image.height, grid, encode_png(full), encode_png(overlay))


def explain_image(model: ModelHandle, image: Image.Image, method: str = "gradcam", target: int | None = None,
                  layer: str | None = None, top_k: int = 5, overlay_max_side: int = 1024,
                  config: MethodConfig | None = None, metrics: MetricUnit | None = None,
                  map_at_display_size: bool = False) -> ImageExplanation:
    """Predict ``image`` with ``model`` and explain ``target`` (default top-1) with the
    synchronous ``method`` and its ``config``; with ``metrics`` (a unit of
    :func:`explainers.metrics.deletion_insertion`) also score the map; ``map_at_display_size``
    renders the map PNG at the overlay's size (see :func:`render_pictures`).

    What ran (Score-CAM's mode and channel count, the precision, ...) is in
    ``result.explanation.details``."""
    started = time.perf_counter()
    explainer = make_explainer(method, model, layer, config, synchronous=True)
    inputs, _ = model.preprocessor.to_input(image)
    prepared = time.perf_counter()
    explanation = explainer.explain(inputs, target)
    logits = explanation.logits[0]
    target_index = int(explanation.targets[0])
    predictions = top_predictions(logits, model.labels, top_k)
    explained = time.perf_counter()
    pictures = render_pictures(image, explanation.saliency[0], model.preprocessor, overlay_max_side,
                               map_at_display_size)
    finished = time.perf_counter()
    scores = (map_metrics(model.execution, inputs, explanation.saliency, explanation.targets, unit=metrics)
              if metrics else None)
    return ImageExplanation(
        model=model.name,
        method=method,
        layer=explainer.layer,
        target=target_prediction(logits, model.labels, target_index),
        predictions=predictions,
        heatmap=pictures,
        explanation=explanation,
        metrics=scores,
        timing_ms={
            "preprocess": round((prepared - started) * 1e3, 2),
            "explain": round((explained - prepared) * 1e3, 2),
            "render": round((finished - explained) * 1e3, 2),
            "total": round((finished - started) * 1e3, 2),
            **({"metrics": round((time.perf_counter() - finished) * 1e3, 2)} if metrics else {}),
        },
    )


def explain_images(model: ModelHandle, images: Sequence[Image.Image], method: str = "gradcam",
                   targets: Targets = None, layer: str | None = None, top_k: int = 5,
                   overlay_max_side: int = 1024, config: MethodConfig | None = None,
                   map_at_display_size: bool = False) -> list[ImageExplanation]:
    """:func:`explain_image` for several images in one batch: each image is preprocessed on
    its own (any size; the preprocessor makes every input the model's size), the batch goes
    through one ``explain`` of the synchronous ``method``, and each image gets its own result.

    ``targets``: ``None`` (each image's top-1), one class for all, or one per image (see
    :func:`explainers.result.resolve_targets`). Each result's ``timing_ms`` has its own image's
    ``preprocess`` and ``render`` times and the whole batch's ``explain`` time; its
    ``explanation`` is the batch's, sliced to that image. The caller bounds the batch size."""
    if not images:
        raise ExplainError("invalid_parameter", "no images to explain")
    explainer = make_explainer(method, model, layer, config, synchronous=True)
    prepare_ms = []
    inputs = []
    for image in images:
        started = time.perf_counter()
        inputs.append(model.preprocessor.to_input(image)[0])
        prepare_ms.append((time.perf_counter() - started) * 1e3)
    batch = torch.cat(inputs)
    started = time.perf_counter()
    explanation = explainer.explain(batch, targets)
    explain_ms = (time.perf_counter() - started) * 1e3
    results = []
    for b, image in enumerate(images):
        started = time.perf_counter()
        logits = explanation.logits[b]
        pictures = render_pictures(image, explanation.saliency[b], model.preprocessor, overlay_max_side,
                                   map_at_display_size)
        render_ms = (time.perf_counter() - started) * 1e3
        own = Explanation(explanation.method, explanation.saliency[b:b + 1], explanation.logits[b:b + 1],
                          explanation.targets[b:b + 1], explanation.layer, explanation.details)
        results.append(ImageExplanation(
            model=model.name,
            method=method,
            layer=explainer.layer,
            target=target_prediction(logits, model.labels, int(explanation.targets[b])),
            predictions=top_predictions(logits, model.labels, top_k),
            heatmap=pictures,
            explanation=own,
            timing_ms={
                "preprocess": round(prepare_ms[b], 2),
                "explain": round(explain_ms, 2),
                "render": round(render_ms, 2),
                "total": round(prepare_ms[b] + explain_ms + render_ms, 2),
            },
        ))
    return results
