"""Explanation methods, pure PyTorch: no HTTP, no queues, no files."""

from explainers.cam import CAM, ActivationCAM, GradCAM
from explainers.errors import ExplainError
from explainers.result import Explanation

__all__ = ["CAM", "ActivationCAM", "ExplainError", "Explanation", "GradCAM"]
