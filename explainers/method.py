"""The one explainer contract: a method object bound to a model's execution, one ``explain``.

Every method is a :class:`Method` subclass with a ``name``, a pydantic ``Config`` (the one
definition of its parameters: defaults and bounds, from which job schemas and synchronous
options are derived) and ``explain(inputs, targets, progress) -> typed result``; it is
registered once, in :mod:`explainers.registry`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, Literal, Self

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from core.validation import describe_validation_errors
from explainers.errors import ExplainError
from explainers.execution import Execution

Progress = Callable[[float, str], None]  # (fraction done in [0, 1], stage); may raise to stop
Targets = int | list[int] | torch.Tensor | None
Normalization = tuple[tuple[float, ...], tuple[float, ...]]  # the model's input (mean, std)
IMAGENET: Normalization = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
ResultKind = Literal["heatmap", "mask", "graph"]


def no_progress(_fraction: float, _stage: str) -> None:
    """The progress of an explanation nobody watches."""


class MethodConfig(BaseModel):
    """A method's parameters: frozen, unknown names refused; a bad value is ``invalid_parameter``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ExplainError("invalid_parameter", describe_validation_errors(exc.errors(), "parameters")) from None

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes``, validated."""
        return type(self)(**{**self.model_dump(), **changes})


class NoParameters(MethodConfig):
    """The parameters of a method that has none."""


class Method(ABC):
    """An explanation method bound to one model's :class:`Execution`.

    ``layer`` is the module path activation methods read (``None``: the method needs none or
    uses the model's default); ``normalization`` the model's input mean and std, for methods
    whose baseline is a pixel colour."""

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = NoParameters
    synchronous: ClassVar[bool] = False  # cheap enough for a synchronous HTTP answer
    result_kind: ClassVar[ResultKind] = "heatmap"
    needs_layer: ClassVar[bool] = False
    uses_layer: ClassVar[bool] = True  # False: reads the whole network (rollout), never a default layer
    description: ClassVar[str] = ""

    def __init__(self, execution: Execution, config: MethodConfig | None = None, layer: str | None = None,
                 normalization: Normalization = IMAGENET) -> None:
        if config is not None and not isinstance(config, self.Config):
            raise ExplainError("invalid_parameter", f"{self.name} takes {self.Config.__name__}, not "
                               f"{type(config).__name__}")
        if self.needs_layer and layer is None:
            raise ExplainError("layer_unsupported", f"{self.name} needs a layer to explain at")
        self.execution = execution
        self.config = config if config is not None else self.Config()
        self.layer = layer
        self.normalization = normalization

    @abstractmethod
    def explain(self, inputs: torch.Tensor, targets: Targets = None, progress: Progress | None = None) -> Any:
        """Explain the normalised batch ``inputs`` for ``targets`` (default: each image's top-1)."""


__all__ = ["IMAGENET", "Method", "MethodConfig", "NoParameters", "Normalization", "Progress", "ResultKind",
           "Targets", "no_progress"]
