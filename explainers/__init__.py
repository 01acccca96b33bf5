"""Explanation methods, pure PyTorch: no HTTP, no queues, no files.

Each method file reads as its paper's algorithm; how forwards run is :mod:`explainers.execution`'s."""

from explainers.cam import CAM, ActivationCAM, GradCAM, ScoreCAM
from explainers.errors import ExplainError
from explainers.execution import Execution, ExecutionPolicy
from explainers.gradient_cams import EigenCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM
from explainers.method import Method, MethodConfig
from explainers.registry import METHODS, create
from explainers.result import Explanation
from explainers.rollout import AttentionRollout

__all__ = ["CAM", "METHODS", "ActivationCAM", "AttentionRollout", "EigenCAM", "Execution", "ExecutionPolicy",
           "ExplainError", "Explanation", "GradCAM", "GradCAMPlusPlus", "HiResCAM", "LayerCAM", "Method", "MethodConfig",
           "ScoreCAM", "XGradCAM", "create"]
