"""Queued job methods ``igos`` and ``igos++`` (see :mod:`workers.methods` for the contract).

Parameters default to the papers' settings (I-GOS: 28 x 28 mask, 15 iterations of 20 steps,
L1 1, TV 20; I-GOS++: 20 iterations of 15 steps, L1 1, bilateral TV 20; Armijo line search from
1000). ``preset="cpu"`` swaps every parameter the client did not set for the CPU preset of
:meth:`explainers.igos.IGOSConfig.cpu_preset` (8 iterations of 5 steps, warm-started line
search): several times cheaper, at the price of a less converged mask.

The result holds the mask grid, the heat-map pictures, deletion/insertion curves and AUCs
scored against the same blurred baseline the optimisation used, the protocol, the parameters
used and the time taken.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from explainers.baselines import make_baseline
from explainers.igos import IGOSConfig, make_igos
from explainers.metrics import DEFAULT_CELLS, DEFAULT_STEPS, AucRule, MetricUnit, deletion_insertion
from explainers.pipeline import render_pictures, target_prediction, top_predictions
from workers.methods import JobMethod, ProgressReporter, register
from workers.settings import load_core_settings

OPTIMISE_SHARE = 0.9  # progress fraction reached when the optimisation ends; scoring follows


class IGOSParams(BaseModel):
    """I-GOS parameters (defaults from the I-GOS paper's demo)."""

    model_config = ConfigDict(extra="forbid")

    preset: Literal["reference", "cpu"] = Field(
        "reference", description="'reference': the papers' settings; 'cpu': parameters you do not set take the "
                                 "CPU preset (8 iterations of 5 steps, warm-started line search)")
    mask_size: int = Field(28, ge=1, le=1024, description="mask side in cells (at most the model's input size)")
    iterations: int = Field(15, ge=1, le=200)
    steps: int = Field(20, ge=1, le=100, description="integration steps along the path (t_k = k / n)")
    l1: float = Field(1.0, ge=0, le=1e3)
    tv: float = Field(20.0, ge=0, le=1e4, description="TV coefficient (bilateral TV for igos++)")
    noise: float = Field(0.2, ge=0, le=5, description="std of the Gaussian noise added per step (normalised space)")
    optimizer: Literal["line_search", "nesterov"] = "line_search"
    step_size: float = Field(1000.0, gt=0, le=1e6, description="first Armijo trial / fixed Nesterov step")
    max_trials: int = Field(12, ge=1, le=30, description="cap on line-search trials per iteration")
    line_search_objective: Literal["integrated", "endpoint"] = "integrated"
    warm_start: bool = False
    seed: int = Field(0, ge=0, le=2**31 - 1)
    metric_steps: int = Field(DEFAULT_STEPS, ge=1, le=500, description="steps of the deletion/insertion curves")
    metric_unit: MetricUnit = Field(
        "pixel", description="'pixel': change the map's pixels in order; 'cell': the I-GOS papers' protocol "
                             "(metric_cells x metric_cells cells, soft reveal), to compare with their figures")
    metric_cells: int = Field(DEFAULT_CELLS, ge=1, le=1024, description="cell grid side for metric_unit='cell'")
    metric_auc: AucRule = Field(
        "trapezoid", description="AUC rule: trapezoid, or the papers' right Riemann sum")

    method_name: ClassVar[str] = "igos"

    def to_config(self) -> IGOSConfig:
        """The explainer configuration: the preset, overridden by every field the client set."""
        fields = set(IGOSConfig.__dataclass_fields__)
        chosen = {name: getattr(self, name) for name in self.model_fields_set if name in fields}
        if self.preset == "cpu":
            return IGOSConfig.cpu_preset(self.method_name, **chosen)
        defaults = {name: getattr(self, name) for name in type(self).model_fields if name in fields}
        return IGOSConfig.for_method(self.method_name, **{**defaults, **chosen})


class IGOSPlusPlusParams(IGOSParams):
    """I-GOS++ parameters (defaults: the reference as its main script runs it)."""

    iterations: int = Field(20, ge=1, le=200)
    steps: int = Field(15, ge=1, le=100, description="integration steps along the path (t_k = k / n)")
    method_name: ClassVar[str] = "igos++"


def run_igos(method: str, model: Any, image: Any, target: int | None, params: IGOSParams,
             report: ProgressReporter) -> dict[str, Any]:
    """Optimise, score and render one image; ``report`` may raise ``JobCanceled`` per iteration."""
    started = time.perf_counter()
    settings = load_core_settings()
    config = replace(params.to_config(), compile=settings.fast_compile, cpu_runtime=settings.cpu_runtime)
    report(0.0, "preparing")
    inputs, _ = model.preprocessor.to_input(image)
    baseline, baseline_info = make_baseline(inputs, config.baseline)
    explainer = make_igos(method, model.module, config)

    def progress(done: int, total: int) -> None:
        report(OPTIMISE_SHARE * done / total, f"iteration {done}/{total}")

    explanation = explainer.explain(inputs, target, progress=progress, baseline=baseline)
    optimised = time.perf_counter()
    report(OPTIMISE_SHARE, "scoring deletion/insertion")
    faithfulness = deletion_insertion(model.module, inputs, explanation.saliency, explanation.targets,
                                      steps=params.metric_steps, baseline=baseline,
                                      baseline_description=baseline_info, unit=params.metric_unit,
                                      cells=params.metric_cells, auc=params.metric_auc,
                                      cpu_runtime=settings.cpu_runtime)
    scored = time.perf_counter()
    pictures = render_pictures(image, explanation.saliency[0], model.preprocessor, settings.overlay_max_side,
                               map_at_display_size=True)
    logits = explanation.logits[0]
    target_index = int(explanation.targets[0])
    mask = explanation.details["mask"][0]
    finished = time.perf_counter()
    report(1.0, "done")
    return {
        "method": method,
        "model": model.name,
        "target": vars(target_prediction(logits, model.labels, target_index)),
        "predictions": [vars(p) for p in top_predictions(logits, model.labels, 5)],
        "heatmap": pictures.as_json(),
        "mask": {"size": list(mask.shape), "grid": [[round(v, 4) for v in row] for row in mask.cpu().tolist()],
                 "meaning": "optimised mask in [0, 1]; low = salient (heatmap.grid = normalised 1 - mask)"},
        "metrics": faithfulness.as_json(0, curves=True),
        # the preset and metric_* fields as asked, then every optimisation parameter as used
        "params": {**params.model_dump(exclude=set(IGOSConfig.__dataclass_fields__)), **asdict(config)},
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


IGOS_METHOD = register(JobMethod(
    name="igos", params=IGOSParams, timeout_s=1800,
    run=lambda model, image, target, params, report: run_igos("igos", model, image, target, params, report),
    description="I-GOS (Qi et al., AAAI 2020): integrated-gradient mask optimisation; deletion/insertion scored"))

IGOS_PP_METHOD = register(JobMethod(
    name="igos++", params=IGOSPlusPlusParams, timeout_s=1800,
    run=lambda model, image, target, params, report: run_igos("igos++", model, image, target, params, report),
    description="I-GOS++ (Khorram et al., CHIL 2021): deletion x insertion masks, bilateral TV; scored"))
