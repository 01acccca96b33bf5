"""What a running job may use from its worker: the settings and the warm model registry,
handed to the job explicitly (never read from module globals or the environment)."""

from __future__ import annotations

from dataclasses import dataclass

from core.settings import CoreSettings
from models.registry import ModelRegistry


@dataclass(frozen=True)
class WorkerRuntime:
    settings: CoreSettings
    registry: ModelRegistry
