"""Warm-up of I-GOS's compiled network at worker start-up (the execution warms everything else
as its model loads)."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from core.settings import CoreSettings

logger = logging.getLogger("unbox.warmup")


def warm_igos_compile(model: Any, settings: CoreSettings) -> None:
    """With ``UNBOX_FAST_COMPILE`` on CUDA, compile I-GOS's network for the batch shapes of the
    default igos and igos++ jobs (one iteration of each on a noise image), so that the first
    job does not pay for it. Workers only: the API runs no I-GOS. A failure only means eager
    execution."""
    if not (settings.fast_compile and settings.fast_warmup and model.device.type == "cuda"):
        return
    from explainers.registry import method_class

    started = time.perf_counter()
    size = model.spec.input_size
    noise = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(model.device)
    try:
        for name in ("igos++", "igos"):
            method = method_class(name)
            method(model.execution, method.Config(iterations=1)).explain(noise)
        logger.info("model %s I-GOS compile warm-up in %.1f s", model.name, time.perf_counter() - started)
    except Exception as exc:
        logger.warning("model %s I-GOS compile warm-up failed (it runs eagerly): %s", model.name, exc)
