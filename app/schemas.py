"""Response schemas of the HTTP API (they document the contract in OpenAPI)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    code: str = Field(examples=["unsupported_format"])
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class PredictionOut(BaseModel):
    index: int
    label: str
    score: float = Field(description="softmax probability")


class PredictResponse(BaseModel):
    model: str
    predictions: list[PredictionOut]
    timing_ms: dict[str, float]


class HeatmapOut(BaseModel):
    width: int = Field(description="width of the uploaded image (pixels)")
    height: int = Field(description="height of the uploaded image (pixels)")
    grid: list[list[float]] = Field(description="the raw map at feature resolution, normalised to [0, 1]")
    png: str = Field(description="base64 8-bit grayscale PNG of the map at the uploaded image's size")
    overlay_png: str = Field(description="base64 colour overlay (inferno) on the image, longer side capped")


class ExplainResponse(BaseModel):
    model: str
    method: str
    layer: str | None
    target: PredictionOut
    predictions: list[PredictionOut]
    heatmap: HeatmapOut
    details: dict[str, Any] = Field(default_factory=dict, description="what ran: precision; for Score-CAM "
                                    "mode (exact | fast), channels, constant_channels, forward_passes, batch_size, runtime "
                                    "(onnxruntime | torch: what ran the masked forwards)")
    metrics: dict[str, Any] | None = Field(None, description="with metrics=true: deletion_auc, insertion_auc, "
                                           "their curves and the protocol (baseline, steps, score)")
    timing_ms: dict[str, float]


class ModelOut(BaseModel):
    name: str
    loaded: bool
    source: str
    input_size: int
    resize: str
    num_classes: int | None = None
    target_layer: str | None = None
    description: str = ""
    error: str | None = None


class ModelsResponse(BaseModel):
    default: str
    models: list[ModelOut]


ERROR_RESPONSES: dict[int | str, dict] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "unreadable or corrupt image",
        413: "too many bytes or pixels",
        415: "not an image in a supported format",
        422: "invalid parameter (unknown model, method, layer, target out of range)",
        503: "model loading or dependency unavailable",
    }.items()
}
