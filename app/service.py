"""What the routes call: decode, pick the model, run inference, shape the answer.

Blocking work (decoding, torch) runs here, in a worker thread of the server; a semaphore caps
how many inferences run at once so concurrent requests queue instead of thrashing the CPU.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from app.errors import ApiError
from app.intake import DecodedImage, ImageRejected, decode_image
from app.windowing import WindowRefused, parse_window
from app.metrics import Metrics
from app.settings import Settings
from explainers.capture import LayerCapture, resolve_layer
from explainers.cam import ScoreCAMConfig
from explainers.errors import ExplainError
from explainers.method import MethodConfig
from explainers.metrics import MetricUnit
from explainers.pipeline import ImageExplanation, explain_image, top_predictions
from models.build import ModelBuildError
from models.registry import LoadedModel, ModelLoadingError, ModelRegistry, UnknownModelError


class InferenceService:
    def __init__(self, settings: Settings, registry: ModelRegistry, metrics: Metrics) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self._slots = threading.BoundedSemaphore(settings.max_concurrent_inference)
        # start-up models whose load or fast-path warm-up (CUDA graphs, compiled runners) has
        # not finished: /readyz stays 503 until this is empty
        self.warming: set[str] = set(settings.models)
        self._layer_widths: dict[tuple[str, str], int] = {}  # (model, layer) -> channels, probed once

    def model(self, name: str) -> LoadedModel:
        """The warm model ``name``, or the right 4xx/503."""
        try:
            return self.registry.get(name, wait=name not in self.settings.models)
        except UnknownModelError:
            known = ", ".join(sorted(self.registry.specs))
            raise ApiError(422, "unknown_model", f"unknown model {name!r}; available: {known}") from None
        except ModelLoadingError:
            raise ApiError(503, "model_loading", f"model {name!r} is still loading; retry shortly",
                           {"Retry-After": "2"}) from None
        except (ModelBuildError, OSError, RuntimeError, ValueError) as exc:
            raise ApiError(503, "model_unavailable", f"model {name!r} cannot be loaded: {exc}") from None

    def decode_upload(self, data: bytes, window: str | None = None, frame: int | None = None) -> DecodedImage:
        """The upload decoded (8-bit RGB, windowed where it applies; its format and windowing), or
        the 4xx that says why not."""
        if len(data) > self.settings.max_upload_bytes:
            raise ApiError(413, "upload_too_large", f"the upload exceeds {self.settings.max_upload_bytes} bytes")
        try:
            return decode_image(data, self.settings.max_image_pixels, parse_window(window), frame)
        except (ImageRejected, WindowRefused) as exc:
            raise ApiError(getattr(exc, "status", 422), exc.code, exc.message) from None

    def predict(self, data: bytes, model_name: str, top_k: int, window: str | None = None,
                frame: int | None = None) -> dict[str, Any]:
        started = time.perf_counter()
        upload = self.decode_upload(data, window, frame)
        image = upload.image
        model = self.model(model_name)
        decoded = time.perf_counter()
        inputs, _ = model.preprocessor.to_input(image)
        with self._slots:
            began = time.perf_counter()
            logits = model.logits(inputs)[0]
            self.metrics.inference.labels(model.name, "predict").observe(time.perf_counter() - began)
        predictions = top_predictions(logits, model.labels, top_k)
        finished = time.perf_counter()
        return {
            "model": model.name,
            "predictions": [asdict(p) for p in predictions],
            "intake": upload.intake_json(),
            "timing_ms": {"decode": round((decoded - started) * 1e3, 2),
                          "inference": round((finished - decoded) * 1e3, 2),
                          "total": round((finished - started) * 1e3, 2)},
        }

    def method_config(self, method: str, channels: str | None, model: LoadedModel | None = None,
                      layer: str | None = None) -> MethodConfig | None:
        """The method's config from the form: Score-CAM's channel count (the request's, else the
        settings' default; ``all`` = exact). ``channels`` elsewhere is a 422.

        A synchronous request may score at most ``sync_scorecam_max_channels`` channels: a larger
        count, or ``all`` on a wider layer of ``model`` (at ``layer``, default the model's), is a
        422 ``too_costly`` that points to the job API, where that cost is affordable."""
        text = (channels or "").strip().lower()
        if method != "scorecam":
            if text:
                raise ApiError(422, "invalid_parameter", "channels applies to method scorecam only")
            return None
        if not text:
            count = self.settings.scorecam_channels or None
        elif text == "all":
            count = None
            if model is not None:
                self._check_exact_scorecam(model, layer or model.default_layer)
        else:
            try:
                count = int(text)
            except ValueError:
                count = 0
            if count < 1:
                raise ApiError(422, "invalid_parameter", "channels must be a positive integer or 'all'")
            if count > self.settings.sync_scorecam_max_channels:
                raise self._too_costly(f"channels={count} is more")
        return ScoreCAMConfig(channels=count)

    def _too_costly(self, what: str) -> ApiError:
        cap = self.settings.sync_scorecam_max_channels
        return ApiError(422, "too_costly", f"{what} than the {cap} channels a synchronous Score-CAM may score "
                        f"(UNBOX_SYNC_SCORECAM_MAX_CHANNELS); ask for channels of at most {cap}, or queue it "
                        "with POST /v1/jobs and method=scorecam")

    def _check_exact_scorecam(self, model: LoadedModel, layer: str | None) -> None:
        """Refuse ``channels=all`` when the layer has more channels than the synchronous cap."""
        if layer is None:
            return  # no layer to explain at: the explainer answers that
        width = self.layer_channels(model, layer)
        if width > self.settings.sync_scorecam_max_channels:
            raise self._too_costly(f"channels=all scores the {width} channels of layer {layer!r}, more")

    def layer_channels(self, model: LoadedModel, layer: str) -> int:
        """How many channels the feature map of ``layer`` has: from the module when it says so
        (convolutions, batch norms), else from one probe forward, remembered per model and layer."""
        key = (model.name, layer)
        if key not in self._layer_widths:
            try:
                module = resolve_layer(model.module, layer)
                self._layer_widths[key] = _declared_channels(module) or self._probe_channels(model, layer)
            except ExplainError as exc:
                raise ApiError(422, exc.code, exc.message) from None
        return self._layer_widths[key]

    def _probe_channels(self, model: LoadedModel, layer: str) -> int:
        size = model.spec.input_size
        probe = torch.zeros(1, 3, size, size, device=model.device)
        with self._slots, LayerCapture(model.module, layer) as capture, torch.inference_mode():
            model.module(probe)
        return int(capture.require().shape[1])

    def explain(self, data: bytes, method: str, model_name: str, target: int | None, layer: str | None,
                top_k: int, channels: str | None = None, metrics: MetricUnit | None = None,
                window: str | None = None, frame: int | None = None) -> tuple[ImageExplanation, DecodedImage]:
        """The explanation of the upload, and the upload as decoded (its intake facts go in the answer)."""
        started = time.perf_counter()
        self.method_config(method, channels)  # the request's own mistakes first, before any decoding
        upload = self.decode_upload(data, window, frame)
        image = upload.image
        model = self.model(model_name)
        if target is not None and not 0 <= target < model.num_classes:
            raise ApiError(422, "invalid_target", f"target must be a class index in [0, {model.num_classes - 1}]")
        config = self.method_config(method, channels, model, layer)
        decoded = time.perf_counter()
        try:
            with self._slots:
                result = explain_image(model, image, method, target, layer, top_k, self.settings.overlay_max_side,
                                       config, metrics=metrics)
        except ExplainError as exc:
            raise ApiError(422, exc.code, exc.message) from None
        self.metrics.inference.labels(model.name, method).observe(result.timing_ms["explain"] / 1e3)
        result.timing_ms = {"decode": round((decoded - started) * 1e3, 2), **result.timing_ms,
                            "total": round((time.perf_counter() - started) * 1e3, 2)}
        return result, upload


def _declared_channels(module: nn.Module) -> int | None:
    """The output channel count a convolution or 2-D batch norm declares (None for others)."""
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    if isinstance(module, nn.BatchNorm2d):
        return module.num_features
    return None
