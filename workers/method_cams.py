"""Heat-map jobs: every heat-map method of the registry queued (the CAM family, ``rollout``).

They prove the queue end to end with cheap, well-known maps, and give clients one API for every
method. The result has the same shape as ``/v1/explain``'s answer, plus ``details`` (what ran:
precision, Score-CAM's mode and channel count ...). A queued Score-CAM is exact by default: the
queue is where its cost is affordable; ``channels`` picks the fast mode.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from explainers.method import Method
from explainers.pipeline import explain_image
from workers.methods import JobKind, JobParams, ProgressReporter


class HeatmapJobOptions(BaseModel):
    """A heat-map job's own options (the same as ``/v1/explain``'s form fields)."""

    model_config = ConfigDict(extra="forbid")

    layer: str | None = Field(None, description="module path of the layer; default the model's")
    top_k: int = Field(5, ge=1, le=100, description="how many predictions to return")


def run_heatmap_job(method: type[Method], model: Any, image: Any, target: int | None, params: JobParams,
                    report: ProgressReporter, settings: Any) -> dict[str, Any]:
    """The method's map, pictures and predictions, as ``/v1/explain`` answers."""
    report(0.05, method.name)
    assert isinstance(params, HeatmapJobOptions)
    result = explain_image(model, image, method.name, target, params.layer, params.top_k, settings.overlay_max_side,
                           params.method_config(method), map_at_display_size=True)
    return {**result.as_json(), "params": params.model_dump()}


HEATMAP_JOBS = JobKind(HeatmapJobOptions, run_heatmap_job, timeout_s=900)
