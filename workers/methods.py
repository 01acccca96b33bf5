"""The job methods: every explanation method of :mod:`explainers.registry`, queued, plus plug-ins.

A :class:`JobMethod` names a method, the pydantic model of its ``params`` (validated by the API
at submission, so bad parameters are a 422 before anything is queued, and again by the worker)
and the function that runs it. For a registered explainer the params model is derived: the
method's own ``Config`` (one set of defaults and bounds) plus the options of its job kind
(:mod:`workers.method_cams` for heat maps, :mod:`workers.method_igos` for masks,
:mod:`workers.method_sag` for graphs), and so is the run function. Plug-in modules named by
``UNBOX_JOB_METHOD_MODULES`` :func:`register` others.

``run(model, image, target, params, report, settings)`` gets a warm model
(``models.LoadedModel``), the clean RGB image the API stored, the target class (``None`` =
top-1), the validated params, a progress reporter and the worker's settings; it returns a
JSON-able dict. ``report(fraction, stage)`` records progress and raises :class:`JobCanceled`
when the job was cancelled: call it between iterations.

Result conventions: a heat-map method returns ``heatmap`` shaped like ``/v1/explain``'s
(``width``, ``height``, ``grid``, ``png``, ``overlay_png`` in base64) plus ``target``,
``predictions``, ``params`` and ``timing_ms``; a method whose picture is not a single heat map
adds ``picture_png`` (base64), which ``GET /v1/jobs/{id}/result.png`` serves instead.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from pydantic import BaseModel, create_model

from core.settings import SettingsError
from explainers.method import Method, MethodConfig, Progress


class JobCanceled(Exception):
    """Raised by a progress report when the job has been cancelled; the method stops there."""


ProgressReporter = Progress  # the explainers' one progress type: (fraction in [0, 1], stage)
RunJob = Callable[..., dict[str, Any]]  # (model, image, target, params, report, settings) -> result


@dataclass(frozen=True)
class JobMethod:
    name: str
    params: type[BaseModel]
    run: RunJob
    timeout_s: int = 600
    description: str = ""
    # (validated params) -> the parameters the job runs with (defaults and presets applied);
    # None: the validated params with their defaults
    describe: Callable[[BaseModel], dict[str, Any]] | None = None

    def params_used(self, params: BaseModel) -> dict[str, Any]:
        """What a job of these validated ``params`` runs with, shown with the job from submission."""
        return self.describe(params) if self.describe else params.model_dump(mode="json")


@dataclass(frozen=True)
class JobKind:
    """How one kind of explainer result becomes a job: its job-only options and its runner,
    ``run(method_class, model, image, target, params, report, settings)``."""

    options: type[BaseModel]
    run: Callable[..., dict[str, Any]]
    timeout_s: int
    # (method class, validated params) -> the parameters as run; None: the params with defaults
    describe: Callable[[type[Method], BaseModel], dict[str, Any]] | None = None


class JobParams(BaseModel):
    """Job params: a method's config fields plus its kind's options (see :func:`job_method`)."""

    def chosen(self, method: type[Method]) -> dict[str, Any]:
        """The method's config fields the client set."""
        return {name: getattr(self, name) for name in self.model_fields_set if name in method.Config.model_fields}

    def method_config(self, method: type[Method]) -> MethodConfig:
        """The method's config from the fields the client set (the defaults are the config's)."""
        return method.Config(**self.chosen(method))


_PLUGINS: dict[str, JobMethod] = {}
CHEAP_TIMEOUT_S = 120  # a synchronous method's job (Grad-CAM, CAM) takes a fraction of a second


def register(method: JobMethod) -> JobMethod:
    """Add a plug-in job method (modules named by ``UNBOX_JOB_METHOD_MODULES`` call this)."""
    _PLUGINS[method.name] = method
    return method


def _kinds() -> dict[str, JobKind]:
    from workers.method_cams import HEATMAP_JOBS
    from workers.method_igos import MASK_JOBS
    from workers.method_sag import GRAPH_JOBS

    return {"heatmap": HEATMAP_JOBS, "mask": MASK_JOBS, "graph": GRAPH_JOBS}


def job_method(method: type[Method], kind: JobKind) -> JobMethod:
    """The job of explainer ``method``: params = its ``Config`` + the kind's options."""
    params = create_model(f"{method.__name__}JobParams", __base__=(kind.options, method.Config, JobParams))
    params.__doc__ = f"Parameters of a {method.name} job: the method's own and its job's options."
    cheap = method.synchronous and not method.Config.model_fields
    timeout = CHEAP_TIMEOUT_S if cheap else kind.timeout_s

    def run(model: Any, image: Any, target: int | None, job_params: BaseModel, report: ProgressReporter,
            settings: Any) -> dict[str, Any]:
        return kind.run(method, model, image, target, job_params, report, settings)

    describe = (lambda job_params: kind.describe(method, job_params)) if kind.describe else None
    return JobMethod(method.name, params, run, timeout, method.description, describe)


def _builtin() -> dict[str, JobMethod]:
    from explainers.registry import METHODS

    kinds = _kinds()
    return {name: job_method(method, kinds[method.result_kind]) for name, method in METHODS.items()}


_BUILTIN: dict[str, JobMethod] = {}


def load_builtin_methods(extra_modules: Sequence[str] = ()) -> dict[str, JobMethod]:
    """Every registered explainer as a job method, plus the plug-ins of ``extra_modules`` (the
    modules named by ``UNBOX_JOB_METHOD_MODULES``, which must exist)."""
    if not _BUILTIN:
        _BUILTIN.update(_builtin())
    for module in extra_modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise SettingsError(f"UNBOX_JOB_METHOD_MODULES names {module!r}, which cannot be imported: {exc}") from None
    return {**_PLUGINS, **_BUILTIN}


def method_timeout(method: JobMethod, overrides: dict[str, int]) -> int:
    """The job timeout in seconds: the ``UNBOX_JOB_TIMEOUTS`` override, else the method's own."""
    return int(overrides.get(method.name, method.timeout_s))


def get_method(name: str) -> JobMethod:
    """The job method ``name``; ``KeyError`` when there is none."""
    return load_builtin_methods()[name]
