"""Mask jobs: ``igos`` and ``igos++`` queued (see :mod:`workers.methods` for the contract).

Parameters are the method's config (I-GOS: 28 x 28 mask, 15 iterations of 20 steps, L1 1, TV 20;
I-GOS++: 20 iterations of 15 steps, L1 1, bilateral TV 20; Armijo line search from 1000) plus
the job's options. ``preset="cpu"`` swaps every parameter the client did not set for the CPU
preset of :meth:`explainers.igos.IGOSConfig.cpu_preset` (8 iterations of 5 steps, warm-started
line search): several times cheaper, at the price of a less converged mask.

The result holds the mask grid, the heat-map pictures, deletion/insertion curves and AUCs
scored against the same blurred baseline the optimisation used, the protocol, the parameters
used and the time taken.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from explainers.baselines import make_baseline
from explainers.igos import IGOSConfig
from explainers.method import Method
from explainers.metrics import DEFAULT_CELLS, DEFAULT_STEPS, AucRule, MetricUnit, deletion_insertion
from explainers.pipeline import render_pictures, target_prediction, top_predictions
from workers.methods import JobKind, JobParams, ProgressReporter

OPTIMISE_SHARE = 0.9  # progress fraction reached when the optimisation ends; scoring follows


class MaskJobOptions(BaseModel):
    """A mask job's own options: the preset and how the mask is scored."""

    model_config = ConfigDict(extra="forbid")

    preset: Literal["reference", "cpu"] = Field(
        "reference", description="'reference': the papers' settings; 'cpu': parameters you do not set take the "
                                 "CPU preset (8 iterations of 5 steps, warm-started line search)")
    metric_steps: int = Field(DEFAULT_STEPS, ge=1, le=500, description="steps of the deletion/insertion curves")
    metric_unit: MetricUnit = Field(
        "pixel", description="'pixel': change the map's pixels in order; 'cell': the I-GOS papers' protocol "
                             "(metric_cells x metric_cells cells, soft reveal), to compare with their figures")
    metric_cells: int = Field(DEFAULT_CELLS, ge=1, le=1024, description="cell grid side for metric_unit='cell'")
    metric_auc: AucRule = Field(
        "trapezoid", description="AUC rule: trapezoid, or the papers' right Riemann sum")


def mask_config(method: type[Method], params: JobParams) -> IGOSConfig:
    """The explainer's configuration: the preset, overridden by every field the client set."""
    assert issubclass(method.Config, IGOSConfig) and isinstance(params, MaskJobOptions)
    if params.preset == "cpu":
        return method.Config.cpu_preset(**params.chosen(method))
    return method.Config(**params.chosen(method))


def mask_params_used(method: type[Method], params: JobParams) -> dict[str, Any]:
    """The preset and metric_* fields as asked, then every optimisation parameter as the job uses it."""
    config = mask_config(method, params)
    return {**params.model_dump(mode="json", exclude=set(type(config).model_fields)), **config.model_dump(mode="json")}


def run_mask_job(method: type[Method], model: Any, image: Any, target: int | None, params: JobParams,
                 report: ProgressReporter, settings: Any) -> dict[str, Any]:
    """Optimise, score and render one image; ``report`` may raise ``JobCanceled`` per iteration."""
    started = time.perf_counter()
    assert isinstance(params, MaskJobOptions)
    config = mask_config(method, params)
    report(0.0, "preparing")
    inputs, _ = model.preprocessor.to_input(image)
    baseline, baseline_info = make_baseline(inputs, config.baseline)
    explainer = method(model.execution, config)
    explanation = explainer.explain(inputs, target, lambda fraction, stage: report(OPTIMISE_SHARE * fraction, stage),
                                    baseline=baseline)
    optimised = time.perf_counter()
    report(OPTIMISE_SHARE, "scoring deletion/insertion")
    faithfulness = deletion_insertion(model.execution, inputs, explanation.saliency, explanation.targets,
                                      steps=params.metric_steps, baseline=baseline,
                                      baseline_description=baseline_info, unit=params.metric_unit,
                                      cells=params.metric_cells, auc=params.metric_auc)
    scored = time.perf_counter()
    pictures = render_pictures(image, explanation.saliency[0], model.preprocessor, settings.overlay_max_side,
                               map_at_display_size=True)
    logits = explanation.logits[0]
    target_index = int(explanation.targets[0])
    mask = explanation.details["mask"][0]
    finished = time.perf_counter()
    report(1.0, "done")
    return {
        "method": method.name,
        "model": model.name,
        "target": vars(target_prediction(logits, model.labels, target_index)),
        "predictions": [vars(p) for p in top_predictions(logits, model.labels, 5)],
        "heatmap": pictures.as_json(),
        "mask": {"size": list(mask.shape), "grid": [[round(v, 4) for v in row] for row in mask.cpu().tolist()],
                 "meaning": "optimised mask in [0, 1]; low = salient (heatmap.grid = normalised 1 - mask)"},
        "metrics": faithfulness.as_json(0, curves=True),
        "params": mask_params_used(method, params),
        "precision": explanation.details["precision"],
        "forward_runtime": explanation.details["forward_runtime"],
        "images_evaluated": explanation.details["images_evaluated"],
        "timing_ms": {
            "optimise": round((optimised - started) * 1e3, 2),
            "metrics": round((scored - optimised) * 1e3, 2),
            "render": round((finished - scored) * 1e3, 2),
            "total": round((finished - started) * 1e3, 2),
        },
    }


MASK_JOBS = JobKind(MaskJobOptions, run_mask_job, timeout_s=1800, describe=mask_params_used)
