"""Warm-up of the explainers' compiled / CUDA-graph fast paths, shared by the API and workers."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from workers.settings import CoreSettings

logger = logging.getLogger("unbox.warmup")


def _warm(model: Any, what: str, run: Callable[[torch.Tensor], None]) -> None:
    """``run`` on a seeded noise image at the model's input size, timed and logged; a failure
    is logged and only means eager execution later."""
    started = time.perf_counter()
    try:
        size = model.spec.input_size
        run(torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(model.device))
        logger.info("model %s %s in %.1f s", model.name, what, time.perf_counter() - started)
    except Exception as exc:
        logger.warning("model %s %s failed (it runs eagerly): %s", model.name, what, exc)


def warm_fast_paths(model: Any, settings: CoreSettings) -> None:
    """On CUDA with compiled / graphed runners on, build them now so no request or job pays
    for it: one Grad-CAM and one Score-CAM on a noise image (the Score-CAM batch shape is the
    same in exact and fast mode). A no-op on the CPU; a failure only means eager execution."""
    fast = settings.fast_path()
    if not settings.fast_warmup or not fast.wants_runner(model.device) or model.default_layer is None:
        return
    from explainers.pipeline import SYNC_METHODS, make_explainer

    def run(noise: torch.Tensor) -> None:
        make_explainer("gradcam", model, None, fastpath=fast).explain(noise)
        if "scorecam" in SYNC_METHODS:
            options = {"channels": settings.scorecam_channels or None, "memory_budget_mb": settings.scorecam_memory_mb}
            make_explainer("scorecam", model, None, options, fast).explain(noise)

    _warm(model, "fast-path warm-up", run)


def warm_igos_compile(model: Any, settings: CoreSettings) -> None:
    """With ``UNBOX_FAST_COMPILE`` on CUDA, compile I-GOS's network for the batch shapes of the
    default igos and igos++ jobs (one iteration of each on a noise image), so that the first
    job does not pay the ~35 s. Workers only: the API runs no I-GOS. A failure only means
    eager execution."""
    if not (settings.fast_compile and settings.fast_warmup and model.device.type == "cuda"):
        return
    from explainers.igos import IGOSConfig, make_igos

    def run(noise: torch.Tensor) -> None:
        for method in ("igos++", "igos"):
            make_igos(method, model.module, IGOSConfig.for_method(method, iterations=1, compile=True)).explain(noise)

    _warm(model, "I-GOS compile warm-up", run)



def warm_onnx_runtime(model: Any, settings: CoreSettings, sag: bool) -> None:
    """On a CPU with ONNX Runtime wanted (``UNBOX_CPU_RUNTIME``), export now the network that
    Score-CAM, the metrics and I-GOS's trials score with and, with ``sag`` (workers), the parts
    SAG's scorer runs, so that no request or job pays for the export. A failure only means
    PyTorch scoring."""
    from explainers import onnx_cpu

    if not (settings.fast_warmup and onnx_cpu.wanted(settings.cpu_runtime, model.device)):
        return
    from explainers.fastpath import scoring_forward
    from explainers.sag import warm_cpu_runtime

    def run(noise: torch.Tensor) -> None:
        scoring = scoring_forward(model.module, noise, settings.cpu_runtime)
        logger.info("model %s scores in %s", model.name, onnx_cpu.runtime_of(scoring))
        if sag:
            logger.info("SAG scores with %s", warm_cpu_runtime(model.module, noise))

    _warm(model, "ONNX Runtime export", run)
