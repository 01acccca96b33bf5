"""Fixed-shape runners for CUDA: ``torch.compile`` and CUDA-graph replays of a private copy.

Compiled and graphed runners work on a private copy of the model (no forward hooks of other
requests can reach a captured graph), at one batch shape each, so that start-up warm-up pays
for compilation and capture instead of a request. Their owner (:class:`Execution`) caches them
and falls back to eager execution, for good and logged once, when one cannot be built.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

logger = logging.getLogger("unbox.execution")

WARMUP_RUNS = 3
Autocast = Callable[[], Any]  # a fresh autocast context (or a null one) per call


def module_device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def as_layout(batch: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``batch`` in NHWC memory order (values unchanged) when asked and 4-D."""
    if channels_last and batch.dim() == 4:
        return batch.contiguous(memory_format=torch.channels_last)
    return batch


def forward_bytes_per_sample(module: nn.Module, image_shape: tuple[int, ...]) -> int:
    """Estimated peak bytes one sample of shape ``image_shape`` (C x H x W) needs in an
    inference-mode forward: the largest input + output of any leaf module, plus the input
    (measured with a hooked forward of one zero image, fp32 sizes)."""
    peak = [0]

    def nbytes(value: Any) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * 4
        if isinstance(value, (tuple, list)):
            return sum(nbytes(v) for v in value)
        return 0

    me = threading.get_ident()

    def hook(_module: nn.Module, inputs: Any, output: Any) -> None:
        if threading.get_ident() == me:  # other requests' forwards on the shared model do not count
            peak[0] = max(peak[0], nbytes(inputs) + nbytes(output))

    leaves = [m for m in module.modules() if not list(m.children())]
    handles = [leaf.register_forward_hook(hook) for leaf in leaves]
    try:
        with torch.inference_mode():
            module(torch.zeros(1, *image_shape, device=module_device(module)))
    finally:
        for handle in handles:
            handle.remove()
    return peak[0] + 4 * int(torch.tensor(image_shape).prod())


class CompiledOrEager:
    """``torch.compile`` of a network (one compile per input shape, autograd included) that
    falls back to the network itself, for good and logged once, when compiling fails."""

    def __init__(self, network: nn.Module) -> None:
        self.network = network
        self.compiled: Callable[[torch.Tensor], torch.Tensor] | None = torch.compile(network, dynamic=False)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(images)
            except Exception as exc:  # a compiler missing or failing: never fail a job over speed
                logger.warning("torch.compile unavailable for %s, running eagerly: %s", type(self.network).__name__, exc)
                self.compiled = None
        return self.network(images)


def _warm_up_on_side_stream(device: torch.device, run: Callable[[], object]) -> None:
    """Warm-up before a capture, on a side stream as CUDA graph capture requires."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(WARMUP_RUNS):
            run()
    torch.cuda.current_stream(device).wait_stream(stream)


class LogitsRunner:
    """``twin(batch)`` for one fixed batch shape under inference mode, compiled and/or replayed
    from a CUDA graph; a short batch is zero-padded to the fixed shape."""

    def __init__(self, twin: nn.Module, shape: tuple[int, ...], channels_last: bool, compile: bool,
                 cuda_graphs: bool, autocast: Autocast) -> None:
        device = module_device(twin)
        self.shape = shape
        self.autocast = autocast
        self.lock = threading.Lock()
        if compile:
            mode = "reduce-overhead" if cuda_graphs else "default"
            self.forward: Callable[[torch.Tensor], torch.Tensor] = torch.compile(twin, mode=mode, dynamic=False)
        else:
            self.forward = twin
        self.static_input = as_layout(torch.zeros(shape, device=device), channels_last)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_output: torch.Tensor | None = None
        if cuda_graphs and not compile:  # compile's reduce-overhead mode graphs itself
            _warm_up_on_side_stream(device, self._run)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.static_output = self._run()
            self.graph = graph
        else:
            for _ in range(WARMUP_RUNS):  # compiles (and, in reduce-overhead mode, records) now
                self._run()

    def _run(self) -> torch.Tensor:
        with torch.inference_mode(), self.autocast():
            return self.forward(self.static_input)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """fp32 logits of the ``n <= shape[0]`` images of ``batch``."""
        n = batch.shape[0]
        with self.lock:
            self.static_input[:n].copy_(batch)
            if n < self.shape[0]:
                self.static_input[n:].zero_()
            if self.graph is not None:
                self.graph.replay()
                logits = self.static_output
            else:
                logits = self._run()
            assert logits is not None
            return logits[:n].float().clone()


LayerPass = Callable[[nn.Module, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]],
                     tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


class LayerGradientGraph:
    """One CUDA graph of a layer-gradient pass (forward with the layer captured, the target
    chosen on the device, d target logit / d activation through the head) at a fixed shape.
    A replay copies in the image and target and copies the static outputs out, under a lock."""

    def __init__(self, twin: nn.Module, shape: tuple[int, ...], channels_last: bool, layer_pass: LayerPass) -> None:
        device = module_device(twin)
        self.lock = threading.Lock()
        self.twin = twin
        self.layer_pass = layer_pass
        self.static_input = as_layout(torch.zeros(shape, device=device), channels_last)
        self.static_target = torch.zeros(shape[0], dtype=torch.long, device=device)
        self.static_top1 = torch.ones(shape[0], dtype=torch.bool, device=device)
        _warm_up_on_side_stream(device, self._run)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.outputs = self._run()
        self.num_classes = int(self.outputs[0].shape[1])

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.where(self.static_top1, logits.argmax(dim=1), self.static_target)

    def _run(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.layer_pass(self.twin, self.static_input, self._choose)

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """(logits, activations, gradients, targets) for ``inputs``, copied out of the graph."""
        with self.lock:
            self.static_input.copy_(inputs)
            if targets is None:
                self.static_top1.fill_(True)
            else:
                self.static_top1.fill_(False)
                self.static_target.copy_(targets.reshape(-1))
            self.graph.replay()
            return tuple(t.clone() for t in self.outputs)


__all__ = ["CompiledOrEager", "LayerGradientGraph", "LogitsRunner", "as_layout", "forward_bytes_per_sample",
           "module_device"]
