"""The synchronous CAM methods as queued jobs: ``gradcam`` and (when the pipeline has it) ``scorecam``.

They prove the queue end to end with cheap, well-known maps, and give clients one API for every
method. The result has the same shape as ``/v1/explain``'s answer, plus ``details`` (what ran:
precision, Score-CAM's mode and channel count ...). A queued Score-CAM is exact by default: the
queue is where its cost is affordable; ``channels`` picks the fast mode.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from explainers.pipeline import SYNC_METHODS, explain_image
from workers.methods import JobMethod, ProgressReporter, register
from workers.runtime import runtime_settings


class CamParams(BaseModel):
    """Parameters of a Grad-CAM job (the same as ``/v1/explain``'s form fields)."""

    model_config = ConfigDict(extra="forbid")

    layer: str | None = Field(None, description="module path of the layer; default the model's")
    top_k: int = Field(5, ge=1, le=100, description="how many predictions to return")


class ScoreCamParams(CamParams):
    """Parameters of a Score-CAM job."""

    channels: int | None = Field(None, ge=1, description="score only the k most relevant channels "
                                 "(fast mode); default all channels (exact)")


def _runner(method: str):
    def run(model: Any, image: Any, target: int | None, params: CamParams,
            report: ProgressReporter) -> dict[str, Any]:
        settings = runtime_settings()
        options = None
        if isinstance(params, ScoreCamParams):
            options = {"channels": params.channels, "memory_budget_mb": settings.scorecam_memory_mb}
        report(0.05, method)
        result = explain_image(model, image, method, target, params.layer, params.top_k, settings.overlay_max_side,
                               options, settings.fast_path(), map_at_display_size=True)
        return {**result.as_json(), "params": params.model_dump()}

    return run


register(JobMethod("gradcam", CamParams, _runner("gradcam"), timeout_s=120,
                   description="Grad-CAM heat map (a fraction of a second on a CPU)"))
if "scorecam" in SYNC_METHODS:
    register(JobMethod("scorecam", ScoreCamParams, _runner("scorecam"), timeout_s=900,
                       description="Score-CAM heat map, exact by default (one masked forward per channel)"))
