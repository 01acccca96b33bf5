"""The warm model cache: each named model is built once, in eval mode, on one device, with the
execution object (:class:`explainers.execution.Execution`) that owns how its forwards run."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from explainers.execution import Execution, ExecutionPolicy
from models.build import ModelBuildError, build_module
from models.catalog import ModelSpec
from models.default_layers import default_layer
from models.labels import load_labels
from models.preprocess import Preprocessor


class UnknownModelError(KeyError):
    """No model of that name in the catalogue."""


class ModelLoadingError(RuntimeError):
    """The model is being loaded right now; try again shortly."""


@dataclass
class LoadedModel:
    """A ready model: module, its execution, labels, preprocessing and its default explanation layer."""

    spec: ModelSpec
    module: nn.Module
    execution: Execution
    labels: tuple[str, ...]
    device: torch.device
    preprocessor: Preprocessor
    default_layer: str | None
    load_seconds: float = 0.0
    layers: tuple[str, ...] = field(default_factory=tuple)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The input normalisation's (mean, std)."""
        return tuple(self.spec.mean), tuple(self.spec.std)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def scriptable_hooks(self) -> bool:
        """False for TorchScript modules, whose submodules cannot take forward hooks."""
        return not isinstance(self.module, torch.jit.ScriptModule)

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """Raw class scores for a normalised batch, without autograd."""
        with torch.inference_mode():
            return self.module(inputs)


class ModelRegistry:
    """Builds models of a catalogue on demand and keeps them warm; safe across threads.

    Each model's execution follows ``policy``; with ``policy.warmup`` it is warmed as the model
    loads (``patch_grid``: also for patch sets on that lattice, where SAG runs)."""

    def __init__(self, specs: dict[str, ModelSpec], device: str, policy: ExecutionPolicy | None = None,
                 patch_grid: int | None = None) -> None:
        self.specs = specs
        self.device = torch.device(device)
        self.policy = policy or ExecutionPolicy()
        self.patch_grid = patch_grid
        self._models: dict[str, LoadedModel] = {}
        self._errors: dict[str, str] = {}
        self._locks: dict[str, threading.Lock] = {name: threading.Lock() for name in specs}

    def spec(self, name: str) -> ModelSpec:
        try:
            return self.specs[name]
        except KeyError:
            raise UnknownModelError(name) from None

    def is_loaded(self, name: str) -> bool:
        return name in self._models

    def loaded(self) -> list[LoadedModel]:
        return list(self._models.values())

    def load_error(self, name: str) -> str | None:
        return self._errors.get(name)

    def get(self, name: str, wait: bool = True) -> LoadedModel:
        """The warm model ``name``; builds it first when needed.

        With ``wait=False`` a model that another thread is building raises
        :class:`ModelLoadingError` instead of blocking.
        """
        model = self._models.get(name)
        if model is not None:
            return model
        spec = self.spec(name)
        lock = self._locks[name]
        if not lock.acquire(blocking=wait):
            raise ModelLoadingError(name)
        try:
            if name not in self._models:
                model = self._models[name] = self._build(spec)
                self._errors.pop(name, None)
                if self.policy.warmup:  # usable now (eagerly); the fast variants follow
                    layer = model.default_layer if model.scriptable_hooks else None
                    model.execution.warm(spec.input_size, layer, self.patch_grid)
            return self._models[name]
        except Exception as exc:
            self._errors[name] = str(exc)
            raise
        finally:
            lock.release()

    def _build(self, spec: ModelSpec) -> LoadedModel:
        started = time.perf_counter()
        labels = load_labels(spec.labels)
        module = build_module(spec, num_classes=len(labels)).to(self.device)
        scripted = isinstance(module, torch.jit.ScriptModule)
        layer = spec.target_layer
        if layer is None and not scripted:
            layer = default_layer(module, spec.input_size)
        probe = torch.zeros(1, 3, spec.input_size, spec.input_size, device=self.device)
        with torch.inference_mode():
            out = module(probe)
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != len(labels):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ModelBuildError(f"model {spec.name} returns {shape}, expected (N, {len(labels)}) logits")
        if layer is not None and not scripted:
            try:
                module.get_submodule(layer)
            except AttributeError:
                raise ModelBuildError(f"target_layer {layer!r} is not a module of {spec.name}") from None
        layers = () if scripted else tuple(name for name, _ in module.named_modules() if name)
        execution = Execution(module, self.policy)
        return LoadedModel(
            spec=spec,
            module=module,
            execution=execution,
            labels=labels,
            device=self.device,
            preprocessor=Preprocessor(spec, self.device),
            default_layer=layer,
            load_seconds=time.perf_counter() - started,
            layers=layers,
        )
