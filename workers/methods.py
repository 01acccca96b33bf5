"""The job-method registry: what a queued explanation method is and how it is looked up.

A :class:`JobMethod` names a method (``gradcam``, ``igos++``, ``sag`` ...), the pydantic model
of its ``params`` (validated by the API at submission, so bad parameters are a 422 before
anything is queued, and again by the worker), and the function that runs it. The API and the
worker share this one definition.

``run(model, image, target, params, report)`` gets a warm model (``models.LoadedModel``), the
clean RGB image the API stored, the target class (``None`` = top-1), the validated params and
a progress reporter; it returns a JSON-able dict. ``report(fraction, stage)`` records progress
and raises :class:`JobCanceled` when the job was cancelled: call it between iterations.

Result conventions: a heat-map method returns ``heatmap`` shaped like ``/v1/explain``'s
(``width``, ``height``, ``grid``, ``png``, ``overlay_png`` in base64) plus ``target``,
``predictions``, ``params`` and ``timing_ms``; a method whose picture is not a single heat map
adds ``picture_png`` (base64), which ``GET /v1/jobs/{id}/result.png`` serves instead.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from pydantic import BaseModel

from workers.settings import SettingsError


class JobCanceled(Exception):
    """Raised by a progress report when the job has been cancelled; the method stops there."""


class ProgressReporter(Protocol):
    def __call__(self, fraction: float, stage: str) -> None: ...


@dataclass(frozen=True)
class JobMethod:
    name: str
    params: type[BaseModel]
    run: Callable[[Any, Any, int | None, BaseModel, ProgressReporter], dict[str, Any]]
    timeout_s: int = 600
    description: str = ""


_METHODS: dict[str, JobMethod] = {}

# Modules that register methods when imported; a module not written yet is skipped.
BUILTIN_METHOD_MODULES = ("workers.method_cams", "workers.method_igos", "workers.method_sag")


def register(method: JobMethod) -> JobMethod:
    _METHODS[method.name] = method
    return method


def load_builtin_methods(extra_modules: Sequence[str] = ()) -> dict[str, JobMethod]:
    """Import every built-in method module once (plus ``extra_modules``, the plug-ins named by
    ``UNBOX_JOB_METHOD_MODULES``, which must exist); returns the registry."""
    for module in BUILTIN_METHOD_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    for module in extra_modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise SettingsError(f"UNBOX_JOB_METHOD_MODULES names {module!r}, which cannot be imported: {exc}") from None
    return dict(_METHODS)


def method_timeout(method: JobMethod, overrides: dict[str, int]) -> int:
    """The job timeout in seconds: the ``UNBOX_JOB_TIMEOUTS`` override, else the method's own."""
    return int(overrides.get(method.name, method.timeout_s))


def get_method(name: str) -> JobMethod:
    """The registered method ``name``; ``KeyError`` when there is none."""
    load_builtin_methods()
    return _METHODS[name]
