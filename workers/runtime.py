"""What a running job may use from its worker: the settings and the warm model registry.

The worker publishes its runtime in a context variable before its loop, so method code
reads the settings it runs under with :func:`current_runtime` instead of module globals.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator

from models.registry import ModelRegistry
from workers.settings import CoreSettings

_RUNTIME: ContextVar["WorkerRuntime | None"] = ContextVar("unbox_worker_runtime", default=None)


@dataclass(frozen=True)
class WorkerRuntime:
    settings: CoreSettings
    registry: ModelRegistry


@contextmanager
def use_runtime(runtime: WorkerRuntime) -> Iterator[WorkerRuntime]:
    token = _RUNTIME.set(runtime)
    try:
        yield runtime
    finally:
        _RUNTIME.reset(token)


def current_runtime() -> WorkerRuntime:
    """The runtime of the worker running this job; ``RuntimeError`` outside an Unbox worker."""
    runtime = _RUNTIME.get()
    if runtime is None:
        raise RuntimeError("Unbox jobs run inside `unbox worker` (no worker runtime in this process)")
    return runtime


def runtime_settings() -> CoreSettings:
    """The running worker's settings (read from the environment outside a worker)."""
    runtime = _RUNTIME.get()
    if runtime is not None:
        return runtime.settings
    from workers.settings import load_core_settings

    return load_core_settings()


def overlay_max_side(default: int = 1024) -> int:
    """The overlay size cap of the running worker (``default`` outside one)."""
    runtime = _RUNTIME.get()
    return runtime.settings.overlay_max_side if runtime is not None else default
