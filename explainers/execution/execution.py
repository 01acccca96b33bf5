"""The execution object of one loaded model on one device: every way its forwards can run.

Methods hold an :class:`Execution` and ask a :class:`Session` (one per explanation: what ran
is recorded there, never on the shared object) for the few operations they need: the model's
prediction, a layer's activations (and their gradient), forward-only logits of image batches,
target probabilities along integrated-gradient paths (with their gradient), and a patch-set
scorer. Which network runs them, in which precision, layout and runtime, and in chunks of how
many images, is decided here from the :class:`ExecutionPolicy`.

Network variants, each built once (at load when warmed, else on first use) and kept by this
object: the model as loaded (forward hooks of a calling context only), a copy with batch norm
folded into the convolutions, a copy with the loaded network's own arithmetic and cheaper
layers (CPU), a private channels-last copy (CUDA), ``torch.compile`` wrappers, fixed-shape
compiled / CUDA-graph runners, and ONNX Runtime sessions of the folded copy and of the patch
scorer's incremental prefix and suffix. Every copy is checked against the model before it is
used and refused when its outputs drift; any variant that cannot be built leaves the operation
on a slower exact one, logged once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from explainers.capture import LayerCapture
from explainers.errors import ExplainError
from explainers.execution import onnx_cpu
from explainers.execution.attention import AttentionReading, FuseHeads
from explainers.execution.batching import images_per_backward, images_per_forward
from explainers.execution.cuda import (CompiledOrEager, LayerGradientGraph, LogitsRunner, as_layout,
                                       forward_bytes_per_sample, module_device)
from explainers.execution.lean import fold_batch_norms, frozen_copy, same_arithmetic_copy
from explainers.execution.patch_scorer import PatchScorer
from explainers.execution.policy import ExecutionPolicy, Pass, precision_name
from explainers.result import resolve_targets

logger = logging.getLogger("unbox.execution")

GPU_MAX_MASKED_BATCH = 512  # masked forwards per batch on CUDA; the memory budget usually decides first
CUDA_TRIALS_PER_FORWARD = 4  # line-search candidates scored together on CUDA (a CPU's cost is linear)
# Loss scale for float16 backward passes: probabilities' gradients reach ~1e-6 at the logits,
# near float16's subnormal range; 2^10 keeps them representable with ample headroom.
FLOAT16_GRADIENT_SCALE = 1024.0
Targets = int | list[int] | torch.Tensor | None
Forward = Callable[[torch.Tensor], torch.Tensor]


class _GradientScale(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``scale`` (a power of two, so
    scaling commutes exactly with the rounding of the products around it)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def layer_gradient_pass(network: nn.Module, layer: str, inputs: torch.Tensor,
                        choose: Callable[[torch.Tensor], torch.Tensor],
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward with ``layer`` captured as an autograd leaf and d(target logit)/d(activation)
    through the network's head alone: (logits, activations, gradients, targets). ``choose``
    picks each image's target from the logits. No host sync, so a CUDA graph can record it."""
    with LayerCapture(network, layer, gradient=True) as capture:
        with torch.no_grad():  # the capture hook turns grad on after the layer
            logits = network(inputs)
        chosen = choose(logits)
        activation = capture.require()
        if not logits.requires_grad:
            raise ExplainError("layer_unsupported", f"the logits do not depend on layer {layer!r}")
        gradient = capture.feature_gradient(logits.float().gather(1, chosen[:, None]).sum())
    return logits.detach(), activation.detach(), gradient, chosen


@dataclass
class _Variants:
    """What one model's execution keeps, shared by every policy view of it (under ``lock``)."""

    lock: threading.RLock = field(default_factory=threading.RLock)
    build_lock: threading.Lock = field(default_factory=threading.Lock)  # one compile / capture at a time
    copies: dict[str, nn.Module] = field(default_factory=dict)
    exports: dict[tuple[int, str], onnx_cpu.OnnxForward | None] = field(default_factory=dict)
    footprints: dict[tuple[int, ...], int] = field(default_factory=dict)
    runners: dict[tuple[Any, ...], Any] = field(default_factory=dict)
    failed: set[tuple[Any, ...]] = field(default_factory=set)
    compiled: dict[int, CompiledOrEager] = field(default_factory=dict)
    onnx_available: bool | None = None


class Execution:
    """How forwards of ``model`` run on its device under ``policy`` (see the module docstring)."""

    def __init__(self, model: nn.Module, policy: ExecutionPolicy | None = None,
                 _variants: _Variants | None = None) -> None:
        self.model = model
        self.policy = policy or ExecutionPolicy()
        self.device = module_device(model)
        self._variants = _variants or _Variants()

    # -- views ------------------------------------------------------------------------------
    def with_policy(self, **changes: object) -> "Execution":
        """The same model and variants under a changed policy."""
        return Execution(self.model, self.policy.with_changes(**changes), self._variants)

    def rounding_sensitive(self) -> "Execution":
        """For computations whose result hangs on float rounding (an ordering read off a barely
        moved mask): on a CPU the loaded network's own arithmetic; elsewhere unchanged."""
        return self.with_policy(network="as_loaded") if self.device.type == "cpu" else self

    def session(self) -> "Session":
        return Session(self)

    # -- chunking ---------------------------------------------------------------------------
    def images_per_forward(self) -> int:
        return images_per_forward(self.device, self.policy.images_per_forward)

    def images_per_backward(self) -> int:
        return images_per_backward(self.device, self.policy.images_per_forward)

    def trials_per_forward(self) -> int:
        return CUDA_TRIALS_PER_FORWARD if self.device.type == "cuda" else 1

    def batch_for_budget(self, image_shape: tuple[int, ...]) -> int:
        """Masked images per forward: the policy's fixed chunk, else as many as the memory
        budget holds at the model's measured per-image footprint, capped for the device."""
        if self.policy.images_per_forward is not None:
            return self.policy.images_per_forward
        cap = GPU_MAX_MASKED_BATCH if self.device.type == "cuda" else images_per_forward(self.device)
        budget = int(self.policy.memory_budget_mb * 2**20)
        return max(1, min(cap, budget // max(1, self.bytes_per_image(image_shape))))

    def bytes_per_image(self, image_shape: tuple[int, ...]) -> int:
        key = tuple(int(s) for s in image_shape)
        with self._variants.lock:
            known = self._variants.footprints.get(key)
        if known is None:
            known = forward_bytes_per_sample(self.model, key)
            with self._variants.lock:
                self._variants.footprints[key] = known
        return known

    # -- network variants -------------------------------------------------------------------
    def _copy(self, kind: str, make: Callable[[], nn.Module | None]) -> nn.Module:
        """The copy ``kind``, made once by ``make`` (the model itself when it gives none or fails)."""
        variants = self._variants
        with variants.lock:
            copy = variants.copies.get(kind)
            if copy is not None:
                return copy
            with torch.inference_mode(False):  # normal tensors, whatever mode the first caller is in
                try:
                    copy = make() or self.model
                except Exception as exc:  # TorchScript, exotic modules: never fail a request over speed
                    logger.warning("no %s copy of %s: %s", kind, type(self.model).__name__, exc)
                    copy = self.model
            variants.copies[kind] = copy
            return copy

    def folded_network(self, example: torch.Tensor) -> nn.Module:
        """The copy with batch norm folded (channels-last on CUDA; "same" padding through the
        kernels on a CPU), verified on ``example``'s first image; the model when none verifies."""
        if self.device.type == "cuda":
            def make() -> nn.Module | None:
                lean = fold_batch_norms(self.model, example[:1].clone())
                return None if lean is None else lean.to(memory_format=torch.channels_last)
            return self._copy("folded-cuda", make)
        return self._copy("folded-cpu", lambda: fold_batch_norms(self.model, example[:1].clone(), pad_in_kernels=True))

    def same_arithmetic_network(self, example: torch.Tensor) -> nn.Module:
        """The copy with only cheaper layers (batch norm kept; logits bit-identical on a CPU)."""
        return self._copy("same-arithmetic", lambda: same_arithmetic_copy(self.model, example[:1].clone()))

    def private_copy(self) -> nn.Module:
        """A frozen copy no request hooks (compiled and graphed runners record it)."""
        channels_last = self.policy.channels_last

        def make() -> nn.Module:
            twin = frozen_copy(self.model)
            return twin.to(memory_format=torch.channels_last) if channels_last else twin
        return self._copy("private-nhwc" if channels_last else "private-nchw", make)

    def _path_network(self, example: torch.Tensor) -> tuple[nn.Module, bool]:
        """The network path images (and their gradients) run on, and whether it takes NHWC."""
        folded = self.policy.folded()
        if self.device.type != "cuda":
            network = self.folded_network(example) if folded else self.same_arithmetic_network(example)
            return network, folded and network is not self.model
        network = self.folded_network(example) if folded else self.model
        if network is self.model:
            try:
                network = self.private_copy()
            except Exception:  # e.g. a TorchScript module deepcopy refuses
                return self.model, False
        return network, network is not self.model

    def onnx_wanted(self) -> bool:
        variants = self._variants
        if variants.onnx_available is None:
            variants.onnx_available = onnx_cpu.available()
        return onnx_cpu.wanted(self.policy.cpu_runtime, self.device, variants.onnx_available)

    def exported(self, owner: nn.Module, name: str, module: Forward, example: torch.Tensor) -> Forward | None:
        """The ONNX Runtime session of ``module`` (part ``name`` of ``owner``), exported and
        checked on ``example`` once; ``None`` (also kept) when it cannot be."""
        key = (id(owner), name)
        variants = self._variants
        if key in variants.exports:
            return variants.exports[key]
        with variants.lock:
            if key not in variants.exports:
                variants.exports[key] = onnx_cpu.build(module, example)  # type: ignore[arg-type]
            return variants.exports[key]

    def scoring_network(self, example: torch.Tensor) -> tuple[Forward, bool]:
        """What scores images forward-only in fp32: the folded copy (the model as loaded under
        ``network="as_loaded"``), in ONNX Runtime on a CPU when wanted; and whether it takes NHWC."""
        network, channels_last = self._path_network(example)
        if self.policy.folded() and self.onnx_wanted():
            exported = self.exported(network, "whole", network, example[:1])
            if exported is not None:
                return exported, False
        return network, channels_last

    def compiled(self, network: nn.Module) -> CompiledOrEager:
        with self._variants.lock:
            wrapper = self._variants.compiled.get(id(network))
            if wrapper is None:
                wrapper = self._variants.compiled[id(network)] = CompiledOrEager(network)
            return wrapper

    def _runner(self, key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
        variants = self._variants
        with variants.lock:
            runner = variants.runners.get(key)
        if runner is not None:
            return runner
        with variants.build_lock:
            with variants.lock:
                runner = variants.runners.get(key)
            if runner is not None or key in variants.failed:
                return runner
            try:
                runner = build()
            except Exception as exc:  # eager it is; a fast path must never fail a request
                logger.warning("fast path %s unavailable, running eagerly: %s", key[0], exc)
                variants.failed.add(key)
                return None
            with variants.lock:
                variants.runners[key] = runner
            return runner

    def logits_runner(self, shape: tuple[int, ...], dtype: torch.dtype | None) -> LogitsRunner | None:
        """The fixed-shape compiled / graphed forward at ``shape`` (CUDA with runners on)."""
        if not self.policy.wants_runners(self.device):
            return None
        policy = self.policy
        key = ("logits", tuple(shape), dtype, policy.compile, policy.cuda_graphs, policy.channels_last)
        return self._runner(key, lambda: LogitsRunner(
            self.private_copy(), tuple(shape), policy.channels_last, policy.compile, policy.cuda_graphs,
            lambda: _autocast(self.device, dtype)))

    def layer_gradient_graph(self, layer: str, shape: tuple[int, ...],
                             dtype: torch.dtype | None) -> LayerGradientGraph | None:
        """The CUDA graph of :func:`layer_gradient_pass` at ``shape`` (CUDA graphs on)."""
        if not (self.policy.cuda_graphs and self.device.type == "cuda" and torch.cuda.is_available()):
            return None

        def layer_pass(twin: nn.Module, inputs: torch.Tensor, choose: Callable[[torch.Tensor], torch.Tensor]):
            with _autocast(self.device, dtype):
                return layer_gradient_pass(twin, layer, inputs, choose)

        key = ("layer-gradients", layer, tuple(shape), dtype, self.policy.channels_last)
        return self._runner(key, lambda: LayerGradientGraph(
            self.private_copy(), tuple(shape), self.policy.channels_last, layer_pass))

    # -- warm-up ----------------------------------------------------------------------------
    def warm(self, input_size: int, layer: str | None = None, patch_grid: int | None = None) -> None:
        """Build now what requests would build on first use, on a seeded noise image: the
        copies, the ONNX Runtime sessions (with ``patch_grid`` also the patch scorer's split
        parts), and on CUDA the fixed-shape runners of a layer-gradient pass and of masked
        forwards at ``layer``. Failures are logged and only mean slower execution."""
        try:
            self._warm(input_size, layer, patch_grid)
        except Exception as exc:  # never fail a model's load over speed
            logger.warning("warm-up of %s failed (variants build on first use): %s", type(self.model).__name__, exc)

    def _warm(self, input_size: int, layer: str | None, patch_grid: int | None) -> None:
        noise = torch.randn(1, 3, input_size, input_size, generator=torch.Generator().manual_seed(0)).to(self.device)
        session = self.session()
        self.folded_network(noise)
        if self.device.type == "cpu":
            self.same_arithmetic_network(noise)
        if self.onnx_wanted():
            network, _ = self.scoring_network(noise)
            logger.info("forward-only scores run in %s", onnx_cpu.runtime_of(network))
            if patch_grid is not None:
                scorer = session.patch_scorer(noise, torch.zeros_like(noise), 0, patch_grid, full_score=None)
                logger.info("patch sets score with %s", scorer.runtime)
        if self.policy.wants_runners(self.device) and layer is not None:
            session.layer_gradients(noise, layer, None)
            shape = tuple(noise.shape[1:])
            self.logits_runner((self.batch_for_budget(shape), *shape), self.policy.dtype(self.device, "scores"))


class Session:
    """The operations of one explanation on an :class:`Execution`, recording what ran."""

    def __init__(self, execution: Execution) -> None:
        self.execution = execution
        self.policy = execution.policy
        self.device = execution.device
        self._ran: dict[str, dict[str, Any]] = {}

    def ran(self, kind: str) -> dict[str, Any]:
        """What ran the ``kind`` operations of this session (``precision``, ``runtime`` ...)."""
        return dict(self._ran.get(kind, {}))

    def _note(self, kind: str, **facts: Any) -> None:
        self._ran.setdefault(kind, {}).update(facts)

    def _dtype(self, kind: Pass, reduced: bool = True) -> torch.dtype | None:
        return self.policy.dtype(self.device, kind) if reduced else None

    # -- chunking ---------------------------------------------------------------------------
    def images_per_forward(self) -> int:
        return self.execution.images_per_forward()

    def images_per_backward(self) -> int:
        return self.execution.images_per_backward()

    def trials_per_forward(self) -> int:
        return self.execution.trials_per_forward()

    def batch_for_budget(self, image_shape: tuple[int, ...]) -> int:
        return self.execution.batch_for_budget(image_shape)

    # -- operations -------------------------------------------------------------------------
    def classify(self, inputs: torch.Tensor) -> torch.Tensor:
        """fp32 logits of the model as loaded (no autograd): the prediction results report."""
        with torch.inference_mode():
            return self.execution.model(as_layout(inputs, self.policy.channels_last)).float()

    def _hooked_input(self, inputs: torch.Tensor) -> torch.Tensor:
        return as_layout(inputs, self.policy.channels_last and self.device.type == "cuda")

    def capture(self, inputs: torch.Tensor, layer: str, reduced_precision: bool = True,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and ``layer``'s activations (``B x K x h x w``) from one forward of the model as
        loaded, in inference mode; ``reduced_precision=False`` keeps it fp32."""
        dtype = self._dtype("scores", reduced_precision)
        self._note("capture", precision=precision_name(dtype))
        with LayerCapture(self.execution.model, layer) as capture, _autocast(self.device, dtype), \
                torch.inference_mode():
            logits = self.execution.model(self._hooked_input(inputs))
        return logits, capture.require()

    def layer_gradients(self, inputs: torch.Tensor, layer: str, targets: Targets,
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits, activations, d target logit / d activations, targets) of one forward with a
        backward through the head after ``layer`` only; ``targets`` default to the top-1."""
        dtype = self._dtype("layer_gradients")
        graph = self.execution.layer_gradient_graph(layer, tuple(inputs.shape), dtype)
        self._note("layer_gradients", precision=precision_name(dtype), cuda_graph=graph is not None)
        if graph is not None:
            given = None
            if targets is not None:
                given = resolve_targets(torch.empty(inputs.shape[0], graph.num_classes, device=inputs.device), targets)
            return graph(inputs, given)  # type: ignore[return-value]
        with _autocast(self.device, dtype):
            return layer_gradient_pass(self.execution.model, layer, self._hooked_input(inputs),
                                       lambda logits: resolve_targets(logits.detach(), targets))

    def logits(self, images: torch.Tensor, exact: bool = False, batch: int | None = None) -> torch.Tensor:
        """fp32 logits of a batch scored forward-only, in chunks. ``exact`` keeps fp32
        arithmetic (measurements); ``batch`` is the caller's fixed chunk size, which lets CUDA
        replay one compiled / graphed runner for every chunk."""
        dtype = self._dtype("scores", not exact)
        chunk = batch or self.images_per_forward()
        runner = None
        if batch is not None and not exact:
            runner = self.execution.logits_runner((batch, *images.shape[1:]), dtype)
        if runner is not None:
            self._note("scores", precision=precision_name(dtype), runtime="torch")
            return torch.cat([runner(images[i:i + chunk]) for i in range(0, images.shape[0], chunk)])
        if dtype is None:
            network, channels_last = self.execution.scoring_network(images)
        else:  # ONNX Runtime would not honour a reduced-precision autocast
            network, channels_last = self.execution._path_network(images)
        self._note("scores", precision=precision_name(dtype), runtime=onnx_cpu.runtime_of(network))
        outputs = []
        with torch.inference_mode(), _autocast(self.device, dtype):
            for start in range(0, images.shape[0], chunk):
                outputs.append(network(as_layout(images[start:start + chunk], channels_last)).float())
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def probabilities(self, images: torch.Tensor, targets: torch.Tensor, gradient: bool = False) -> torch.Tensor:
        """Each image's target softmax probability (fp32) for integrated-gradient paths; with
        ``gradient`` differentiable with respect to ``images`` (the caller's graph continues
        through them). One network call: the caller chunks (it builds the images per chunk)."""
        execution = self.execution
        dtype = self._dtype("path_gradients")
        kind = "path_gradients" if gradient else "path_scores"
        if not gradient and dtype is None and self.device.type != "cuda" and self.policy.folded():
            network, channels_last = execution.scoring_network(images)
        else:
            module, channels_last = execution._path_network(images)
            network = execution.compiled(module) if self.policy.compile and self.device.type == "cuda" else module
        self._note(kind, precision=precision_name(dtype), runtime=onnx_cpu.runtime_of(network))
        scaled = gradient and dtype == torch.float16
        if scaled:  # float16 back-propagation: a fixed scale keeps small gradients above underflow
            images = _GradientScale.apply(images, 1.0 / FLOAT16_GRADIENT_SCALE)
        with _autocast(self.device, dtype):
            logits = network(as_layout(images, channels_last))
        if scaled:
            logits = _GradientScale.apply(logits, FLOAT16_GRADIENT_SCALE)
        return logits.float().softmax(dim=1).gather(1, targets[:, None])[:, 0]

    def patch_scorer(self, inputs: torch.Tensor, baseline: torch.Tensor, target: int, grid: int,
                     full_score: float | None) -> PatchScorer:
        """A scorer of patch sets of ``inputs`` over ``baseline`` on a ``grid x grid`` lattice:
        the folded copy, in reduced precision when it reproduces ``full_score`` (the full
        image's fp32 target probability), incremental where the policy wants it, in ONNX
        Runtime on a CPU when wanted."""
        execution = self.execution
        network = execution._path_network(inputs)[0]
        scorer = PatchScorer(network, inputs, baseline, target, grid, self.images_per_forward())
        if full_score is not None:
            scorer.use_reduced_precision(self._dtype("scores"), full_score)
        incremental = self.policy.incremental
        if incremental == "on" or (incremental == "auto" and self.device.type == "cpu"):
            scorer.use_incremental()
        if scorer.autocast_dtype is None and execution.onnx_wanted():
            scorer.use_onnx_runtime(lambda name, module, example: execution.exported(network, name, module, example))
        return scorer  # what scored the sets: scorer.facts(), read once the search is done

    def attention(self, inputs: torch.Tensor, fuse_heads: FuseHeads | None = None,
                  ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """fp32 logits and every transformer block's attention probabilities (fp32, forward
        order) from one inference-mode fp32 forward of the model as loaded: ``B x heads x N x N``
        each, or what ``fuse_heads`` makes of them, applied as each block runs so only the fused
        maps are kept. The probabilities are recomputed from each attention module's own
        projections on its input (fused kernels never expose them); the forward and its logits
        are the model's own. ``method_unsupported`` for a model whose attention cannot be read."""
        with AttentionReading(self.execution.model, fuse_heads) as reading, torch.inference_mode():
            logits = self.execution.model(self._hooked_input(inputs))
        maps = reading.require()
        self._note("attention", precision="fp32", network="as_loaded", blocks=len(maps),
                   modules="+".join(reading.kinds), recomputed=True)
        return logits.float(), maps


__all__ = ["Execution", "Session", "layer_gradient_pass"]
