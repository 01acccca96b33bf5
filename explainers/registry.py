"""The one registry of explanation methods, shared by the API, the CLI and the workers.

Adding a method is its file (a :class:`explainers.method.Method` subclass) plus one entry in
:data:`METHOD_CLASSES`. Synchronous methods are answered by ``/v1/explain``; every method is
also a queued job, with a job schema derived from its ``Config``.
"""

from __future__ import annotations

from explainers.cam import CAM, GradCAM, ScoreCAM
from explainers.errors import ExplainError
from explainers.execution import Execution
from explainers.gradient_cams import EigenCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM
from explainers.igos import IGOS, IGOSPlusPlus
from explainers.method import IMAGENET, Method, MethodConfig, Normalization, ResultKind
from explainers.rollout import AttentionRollout
from explainers.sag import SAG

METHOD_CLASSES: tuple[type[Method], ...] = (GradCAM, ScoreCAM, CAM, GradCAMPlusPlus, XGradCAM, LayerCAM, HiResCAM,
                                            EigenCAM, AttentionRollout, IGOS, IGOSPlusPlus, SAG)
METHODS: dict[str, type[Method]] = {method.name: method for method in METHOD_CLASSES}
SYNCHRONOUS: tuple[str, ...] = tuple(sorted(name for name, method in METHODS.items() if method.synchronous))


def names_of(kind: ResultKind) -> tuple[str, ...]:
    """The registered methods whose result is ``kind``, in registration order (schemas list them)."""
    return tuple(name for name, method in METHODS.items() if method.result_kind == kind)


def method_class(name: str, synchronous: bool = False) -> type[Method]:
    """The method registered as ``name`` (with ``synchronous`` only those ``/v1/explain`` serves);
    ``unknown_method`` otherwise."""
    method = METHODS.get(name)
    if method is None or (synchronous and not method.synchronous):
        known = SYNCHRONOUS if synchronous else tuple(sorted(METHODS))
        raise ExplainError("unknown_method", f"method must be one of {list(known)}")
    return method


def create(name: str, execution: Execution, config: MethodConfig | None = None, layer: str | None = None,
           normalization: Normalization = IMAGENET, synchronous: bool = False) -> Method:
    """The method ``name`` bound to ``execution`` (see :class:`explainers.method.Method`)."""
    return method_class(name, synchronous)(execution, config, layer, normalization)


__all__ = ["METHODS", "METHOD_CLASSES", "SYNCHRONOUS", "create", "method_class", "names_of"]
