"""How an explainer's forwards run fast: precision, memory format, compiled or graph-replayed.

On the CPU the defaults stay exact: fp32, eager; only Score-CAM's masked batches are laid out
channels_last (same values, up to float summation order; about 1.5-2x faster convolutions on
the CPU). On CUDA a :class:`FastPath` can turn on

- reduced precision (``fp16``/``bf16`` autocast; scores, softmax and the weighted sum are
  taken in fp32; bf16 is checked on the CPU to keep maps within 0.99 correlation of fp32,
  fp16 on CUDA is not verified on hardware yet: run ``python -m bench.cams`` on a GPU),
- channels_last (NHWC) inputs and weights, which the convolution kernels prefer,
- ``torch.compile`` and CUDA graphs for the fixed-shape forwards (Score-CAM's masked
  batches) and the fixed-shape forward + head backward of Grad-CAM.

Compiled and graphed runners work on a private copy of the model (:func:`private_copy`), so
the forward hooks that :class:`explainers.capture.LayerCapture` registers on the shared model
for other requests never reach a captured graph, and they are cached per model and shape so
that start-up warm-up (``app.main``) pays for compilation and capture instead of a request.
Any failure to compile or capture falls back to eager execution, logged once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal

import torch
from torch import nn

from explainers import onnx_cpu
from explainers.capture import LayerCapture
from explainers.lean import frozen_copy, lean_network, same_arithmetic_network
from explainers.onnx_cpu import CpuRuntime

logger = logging.getLogger("unbox.fastpath")

Precision = Literal["auto", "fp32", "fp16", "bf16"]
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
_WARMUP_RUNS = 3


@dataclass(frozen=True)
class FastPath:
    """Execution options for an explainer's forwards; the default is exact eager fp32.

    ``precision="auto"`` means fp32 on the CPU and fp16 on CUDA (fp16 keeps 10 mantissa bits
    against bf16's 7, and the classifiers served here stay well inside its range).
    """

    precision: Precision = "fp32"
    channels_last: bool = True
    compile: bool = False
    cuda_graphs: bool = False
    cpu_runtime: CpuRuntime = "auto"  # forward-only batches on a CPU: ONNX Runtime when installed

    def dtype(self, device: torch.device) -> torch.dtype | None:
        """The autocast dtype on ``device``, or ``None`` for plain fp32."""
        if self.precision == "fp32":
            return None
        if self.precision == "auto":
            return torch.float16 if device.type == "cuda" else None
        return _DTYPES[self.precision]

    def precision_name(self, device: torch.device) -> str:
        dtype = self.dtype(device)
        return "fp32" if dtype is None else {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        """Autocast for ``device`` at the chosen precision (a null context for fp32)."""
        dtype = self.dtype(device)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    def wants_runner(self, device: torch.device) -> bool:
        """Whether compiled or graphed runners apply on ``device`` (CUDA only)."""
        return device.type == "cuda" and torch.cuda.is_available() and (self.compile or self.cuda_graphs)


EXACT = FastPath()


def module_device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def channels_last(batch: torch.Tensor, enabled: bool = True) -> torch.Tensor:
    """``batch`` in NHWC memory order (values unchanged) when enabled and 4-D."""
    if enabled and batch.dim() == 4:
        return batch.contiguous(memory_format=torch.channels_last)
    return batch


# -- memory estimate ------------------------------------------------------------------------

_footprints: "weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, ...], int]]" = weakref.WeakKeyDictionary()
_footprint_lock = threading.Lock()


def forward_bytes_per_sample(module: nn.Module, image_shape: tuple[int, ...]) -> int:
    """Estimated peak bytes one sample of shape ``image_shape`` (C x H x W) needs in an
    inference-mode forward: the largest input + output of any leaf module, plus the input.

    Measured once per model and shape with a hooked forward of one zero image, then cached;
    Score-CAM divides its memory budget by this to choose its batch size.
    """
    key = tuple(int(s) for s in image_shape)
    with _footprint_lock:
        known = _footprints.setdefault(module, {}).get(key)
    if known is not None:
        return known
    peak = [0]

    def nbytes(value: Any) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * 4  # fp32 sizes: conservative under autocast
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
            module(torch.zeros(1, *key, device=module_device(module)))
    finally:
        for handle in handles:
            handle.remove()
    estimate = peak[0] + 4 * int(torch.tensor(key).prod())
    with _footprint_lock:
        _footprints[module][key] = estimate
    return estimate


def batch_size_for_budget(module: nn.Module, image_shape: tuple[int, ...], budget_bytes: int,
                          limit: int) -> int:
    """How many samples fit ``budget_bytes`` (at least 1, at most ``limit``)."""
    per_sample = forward_bytes_per_sample(module, image_shape)
    return max(1, min(limit, budget_bytes // max(1, per_sample)))


# -- private copies, compiled and graphed runners -------------------------------------------

_copies: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()
_runners: "weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], Any]]" = weakref.WeakKeyDictionary()
_cache_lock = threading.Lock()
_build_lock = threading.Lock()  # one compile / capture at a time; requests wait for warm-up
_failed: set[tuple[Any, ...]] = set()


def private_copy(module: nn.Module, memory_channels_last: bool) -> nn.Module:
    """A frozen eval-mode copy of ``module`` owned by the fast path (no foreign hooks). Made of
    normal tensors even when the first caller is in inference mode, since I-GOS back-propagates
    through the same copy."""
    with _cache_lock, torch.inference_mode(False):
        twin = _copies.get(module)
        if twin is None:
            twin = frozen_copy(module)
            if memory_channels_last:
                twin = twin.to(memory_format=torch.channels_last)
            _copies[module] = twin
        return twin


def network_for(module: nn.Module, example: torch.Tensor, lean: bool = True) -> nn.Module:
    """The network that batched explainers run on ``example``'s device. With ``lean`` (for
    those that only score images: SAG's patch sets, Score-CAM's masked forwards, the metrics)
    the copy with batch norm folded (:mod:`explainers.lean`, channels-last on CUDA); otherwise,
    or when no lean copy can be made, the channels-last private copy on CUDA and elsewhere the
    copy with the loaded network's own arithmetic (its logits bit-identical; layers swapped for
    less memory traffic) or ``module`` itself. Feed it channels-last batches on CUDA."""
    if example.device.type != "cuda":
        return lean_network(module, example) if lean else same_arithmetic_network(module, example)
    network = lean_network(module, example) if lean else module
    if network is not module:
        return network
    try:
        return private_copy(module, True)
    except Exception:  # e.g. a TorchScript module deepcopy refuses
        return module


def scoring_forward(module: nn.Module, example: torch.Tensor,
                    cpu_runtime: CpuRuntime = "auto") -> Callable[[torch.Tensor], torch.Tensor]:
    """Logits of image batches for explainers that only score (no gradient, no hooks):
    :func:`network_for`'s lean network, run by ONNX Runtime on a CPU when ``cpu_runtime``
    wants it and the network exports (:mod:`explainers.onnx_cpu`)."""
    network = network_for(module, example)
    if onnx_cpu.wanted(cpu_runtime, example.device):
        exported = onnx_cpu.whole_forward(network, example[:1])
        if exported is not None:
            return exported
    return network


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


# (each wrapper keeps its network alive: compiled networks live as long as the process, like
# the served models whose copies they wrap)
_compiled: "weakref.WeakKeyDictionary[nn.Module, CompiledOrEager]" = weakref.WeakKeyDictionary()


def compiled_network(network: nn.Module) -> CompiledOrEager:
    """The cached :class:`CompiledOrEager` of ``network`` (I-GOS on CUDA with
    ``UNBOX_FAST_COMPILE``: compiled once per batch shape, then reused by every job)."""
    with _cache_lock:
        wrapper = _compiled.get(network)
        if wrapper is None:
            wrapper = _compiled[network] = CompiledOrEager(network)
        return wrapper


def _cached(module: nn.Module, key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
    with _cache_lock:
        table = _runners.setdefault(module, {})
        runner = table.get(key)
    if runner is not None:
        return runner
    with _build_lock:
        with _cache_lock:
            runner = _runners[module].get(key)
        if runner is not None or (id(module), key) in _failed:
            return runner
        try:
            runner = build()
        except Exception as exc:  # fall back to eager; a fast path must never fail a request
            logger.warning("fast path %s unavailable, running eagerly: %s", key[0], exc)
            _failed.add((id(module), key))
            return None
        with _cache_lock:
            _runners[module][key] = runner
        return runner


class LogitsRunner:
    """``module(batch)`` for one fixed batch shape under inference mode, compiled and/or
    replayed from a CUDA graph; a short batch is zero-padded to the fixed shape."""

    def __init__(self, module: nn.Module, shape: tuple[int, ...], fast: FastPath) -> None:
        device = module_device(module)
        self.shape = shape
        self.fast = fast
        self.device = device
        self.lock = threading.Lock()
        twin = private_copy(module, fast.channels_last)
        if fast.compile:
            mode = "reduce-overhead" if fast.cuda_graphs else "default"
            self.forward: Callable[[torch.Tensor], torch.Tensor] = torch.compile(twin, mode=mode, dynamic=False)
        else:
            self.forward = twin
        self.static_input = channels_last(torch.zeros(shape, device=device), fast.channels_last)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_output: torch.Tensor | None = None
        if fast.cuda_graphs and not fast.compile:  # compile's reduce-overhead mode graphs itself
            self._warm_up_on_side_stream()
            self._capture()
        else:
            for _ in range(_WARMUP_RUNS):  # compiles (and, in reduce-overhead mode, records) now
                self._run()

    def _run(self) -> torch.Tensor:
        with torch.inference_mode(), self.fast.autocast(self.device):
            return self.forward(self.static_input)

    def _warm_up_on_side_stream(self) -> None:
        """Warm-up before a capture, on a side stream as CUDA graph capture requires."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(_WARMUP_RUNS):
                self._run()
        torch.cuda.current_stream(self.device).wait_stream(stream)

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.static_output = self._run()
        self.graph = graph

    def target_scores(self, batch: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """fp32 target logits of the ``n <= shape[0]`` images of ``batch`` (length ``n``)."""
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
            return logits[:n].float().index_select(1, target.reshape(1)).reshape(n).clone()


def logits_runner(module: nn.Module, shape: tuple[int, ...], fast: FastPath) -> LogitsRunner | None:
    """The cached runner for ``module`` at batch ``shape``, or ``None`` when not applicable
    (CPU, both options off, or a compile/capture failure)."""
    device = module_device(module)
    if not fast.wants_runner(device):
        return None
    key = ("logits", tuple(shape), fast)
    return _cached(module, key, lambda: LogitsRunner(module, tuple(shape), fast))


def gradcam_pass(module: nn.Module, layer: str, inputs: torch.Tensor, targets: torch.Tensor, top1: torch.Tensor,
                 fast: FastPath) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grad-CAM's forward + head backward with no host sync, as a CUDA graph records it:
    (logits, activations, d score / d activations, targets). ``targets`` and ``top1`` are
    ``B x 1``; where ``top1`` is set the image's top-1 class (picked on the device) is used."""
    device = inputs.device
    with LayerCapture(module, layer, gradient=True) as capture, fast.autocast(device):
        with torch.no_grad():  # the capture hook turns grad on after the layer
            logits = module(inputs)
        chosen = torch.where(top1, logits.argmax(dim=1, keepdim=True), targets)
        score = logits.float().gather(1, chosen).sum()
        activation = capture.require()
        (gradient,) = torch.autograd.grad(score, activation)
    return logits.detach(), activation.detach(), gradient, chosen.reshape(-1)


class GradCAMGraph:
    """One CUDA graph of forward + head backward for Grad-CAM at a fixed input shape.

    The graph records: the capture hook at ``layer``, the logits, the target (given, or the
    top-1 picked on the device), and d(target logit)/d(activation). A replay copies in the
    image and target and copies the static outputs out, under a lock.
    """

    def __init__(self, module: nn.Module, layer: str, shape: tuple[int, ...], fast: FastPath) -> None:
        device = module_device(module)
        self.device = device
        self.fast = fast
        self.lock = threading.Lock()
        self.twin = private_copy(module, fast.channels_last)
        self.layer = layer
        self.static_input = channels_last(torch.zeros(shape, device=device), fast.channels_last)
        self.static_target = torch.zeros(shape[0], 1, dtype=torch.long, device=device)
        self.static_top1 = torch.ones(shape[0], 1, dtype=torch.bool, device=device)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(_WARMUP_RUNS):
                self._run()
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.outputs = self._run()
        self.num_classes = int(self.outputs[0].shape[1])

    def _run(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return gradcam_pass(self.twin, self.layer, self.static_input, self.static_target, self.static_top1, self.fast)

    def run(self, inputs: torch.Tensor, targets: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """(logits, activations, gradients, targets) for ``inputs``, copied out of the graph."""
        with self.lock:
            self.static_input.copy_(inputs)
            if targets is None:
                self.static_top1.fill_(True)
            else:
                self.static_top1.fill_(False)
                self.static_target.copy_(targets.reshape(-1, 1))
            self.graph.replay()
            return tuple(t.clone() for t in self.outputs)


def gradcam_graph(module: nn.Module, layer: str, shape: tuple[int, ...], fast: FastPath) -> GradCAMGraph | None:
    """The cached Grad-CAM graph, or ``None`` where CUDA graphs are off or unavailable."""
    device = module_device(module)
    if not (fast.cuda_graphs and device.type == "cuda" and torch.cuda.is_available()):
        return None
    key = ("gradcam", layer, tuple(shape), fast)
    return _cached(module, key, lambda: GradCAMGraph(module, layer, tuple(shape), fast))


@contextlib.contextmanager
def inference(device: torch.device, fast: FastPath) -> Iterator[None]:
    """Inference mode plus the fast path's autocast."""
    with torch.inference_mode(), fast.autocast(device):
        yield
