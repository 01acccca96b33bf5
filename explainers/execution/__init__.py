"""The execution seam: how explainers' forwards run (network variants, precision, layout,
chunking, ONNX Runtime, CUDA runners, incremental patch scoring). Methods use only
:class:`Execution` and its :class:`Session`; everything else in this package is how."""

from explainers.execution.execution import Execution, Session
from explainers.execution.patch_scorer import PatchScorer
from explainers.execution.policy import ExecutionPolicy, Precision

__all__ = ["Execution", "ExecutionPolicy", "PatchScorer", "Precision", "Session"]
