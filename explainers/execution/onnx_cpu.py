"""Forward-only scoring on a CPU through ONNX Runtime.

SAG's patch sets, Score-CAM's masked images, I-GOS's line-search trials and the deletion /
insertion curves only score images: no gradient, no hooks. On a CPU those forwards can run in
ONNX Runtime instead of PyTorch's eager kernels, which are slower there for these networks
(docs/benchmarks.md). Its sessions do not busy-wait between calls: PyTorch runs the steps in
between on the same cores, and spinning threads would take them.

A network is exported once (``torch.onnx.export``'s TorchScript exporter, dynamic batch and
image size), checked against PyTorch on the caller's example (logits within ``1e-4`` of the
largest, relative), and kept by the execution object that asked for it. Anything that fails (ONNX Runtime or ``onnx`` not
installed, an operator the exporter does not know, a mismatch) leaves the caller on PyTorch,
logged once per network. Results differ from PyTorch's in float rounding only (~1e-6
relative), the same order as batch-norm folding's.
"""

from __future__ import annotations

import io
import logging
import warnings

import torch
from torch import nn

from explainers.execution.policy import CpuRuntime

logger = logging.getLogger(__name__)

TOLERANCE = 1e-4  # relative to the largest logit: float rounding is ~1e-6, a wrong graph is far off


def available() -> bool:
    """Whether ONNX Runtime and the ``onnx`` package (the exporter's) are importable (asked once
    per execution object: a failed import is not cached by Python and searches the path again)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def wanted(runtime: CpuRuntime, device: torch.device, installed: bool | None = None) -> bool:
    """Whether ``runtime`` asks for ONNX Runtime on ``device`` (``auto``: on a CPU when installed;
    ``installed`` is :func:`available`'s answer when the caller already has it)."""
    if device.type != "cpu" or runtime == "torch":
        return False
    return runtime == "onnxruntime" or (available() if installed is None else installed)


class OnnxForward:
    """One exported network in an ONNX Runtime session: ``forward(batch) -> output``, torch in
    and out (the input read as contiguous float32 NCHW; the output a new CPU tensor)."""

    def __init__(self, model_bytes: bytes, threads: int) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # no busy-waiting between calls: PyTorch runs the steps in between on the same cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        array = batch.detach().to(torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])


def _export(module: nn.Module, example: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(module, (example,), buffer, input_names=["images"], output_names=["output"],
                          dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}, "output": {0: "batch"}},
                          opset_version=17, dynamo=False)
    return buffer.getvalue()


def _unexportable(module: object) -> str | None:
    """Why the exporter cannot take ``module``, known without a trial (a failed trial prints
    the whole traced graph to stdout): frozen ``nn.MultiheadAttention`` (torchvision's ViT)
    runs the fused ``aten::_native_multi_head_attention``, which has no ONNX symbol."""
    if isinstance(module, nn.Module) and any(isinstance(m, nn.MultiheadAttention) for m in module.modules()):
        return "nn.MultiheadAttention runs a fused kernel the ONNX exporter cannot translate"
    return None


def build(module: nn.Module, example: torch.Tensor) -> OnnxForward | None:
    """``module`` exported and loaded into ONNX Runtime, checked on ``example`` (a CPU batch);
    ``None`` when any step fails or the outputs differ by more than :data:`TOLERANCE`."""
    reason = _unexportable(module)
    if reason is not None:
        logger.warning("no ONNX Runtime copy of %s: %s", type(module).__name__, reason)
        return None
    with torch.inference_mode(False):  # a normal tensor, whatever mode the caller is in
        example = example.detach().float().contiguous().clone()
    try:
        runner = OnnxForward(_export(module, example), torch.get_num_threads())
        with torch.no_grad():
            expected = module(example).float()
        got = runner(example)
    except Exception as exc:  # missing packages, unknown operators: PyTorch scores it instead
        lines = str(exc).strip().splitlines()  # the exporter's messages can hold the whole graph
        logger.warning("no ONNX Runtime copy of %s: %s", type(module).__name__,
                       lines[-1][:300] if lines else type(exc).__name__)
        return None
    scale = max(float(expected.abs().max()), 1e-6)
    error = float((got - expected).abs().max()) / scale if got.shape == expected.shape else float("inf")
    if not error <= TOLERANCE:
        logger.warning("ONNX Runtime copy of %s differs by %.2g (relative); scoring with PyTorch",
                       type(module).__name__, error)
        return None
    return runner


def runtime_of(forward: object) -> str:
    """``onnxruntime`` for an :class:`OnnxForward`, else ``torch``: what results report."""
    return "onnxruntime" if isinstance(forward, OnnxForward) else "torch"


__all__ = ["OnnxForward", "available", "build", "runtime_of", "wanted"]
