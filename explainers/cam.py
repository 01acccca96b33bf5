"""Class activation maps: CAM, Grad-CAM (and the shared shape Score-CAM builds on).

Every method weights the channels of one layer's activations ``A`` (``B x K x h x w``) and
returns ``ReLU(sum_k w_k A_k)`` normalised to [0, 1] at feature resolution. The methods only
differ in :meth:`ActivationCAM.channel_weights`. All work stays on the model's device.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from explainers.batching import images_per_forward
from explainers.capture import LayerCapture
from explainers.fastpath import (EXACT, FastPath, batch_size_for_budget, channels_last, gradcam_graph,
                                 inference, logits_runner, module_device, scoring_forward)
from explainers.errors import ExplainError
from explainers.onnx_cpu import runtime_of
from explainers.result import Explanation, normalize_maps, resolve_targets


class ActivationCAM:
    """Shared capture and post-processing; subclasses define the channel weights."""

    method: ClassVar[str] = "activation"
    needs_gradient: ClassVar[bool] = False
    options: ClassVar[tuple[str, ...]] = ()  # keyword parameters a request may set

    def __init__(self, model: nn.Module, layer: str, fastpath: FastPath | None = None) -> None:
        self.model = model
        self.layer = layer
        self.fastpath = fastpath or EXACT
        self.device = module_device(model)
        self.details: dict[str, Any] = {}

    def _forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the layer's activations from one forward pass."""
        if self.device.type == "cuda":
            inputs = channels_last(inputs, self.fastpath.channels_last)
        with LayerCapture(self.model, self.layer, gradient=self.needs_gradient) as capture, \
                self.fastpath.autocast(self.device):
            if self.needs_gradient:
                with torch.no_grad():  # the capture hook re-enables grad after the layer
                    logits = self.model(inputs)
            else:
                with torch.inference_mode():
                    logits = self.model(inputs)
        return logits, capture.require()

    def channel_weights(self, inputs: torch.Tensor, activations: torch.Tensor, logits: torch.Tensor,
                        targets: torch.Tensor) -> torch.Tensor:
        """``B x K`` weight per channel and image."""
        raise NotImplementedError

    def explain(self, inputs: torch.Tensor, targets: int | list[int] | torch.Tensor | None = None) -> Explanation:
        """Saliency maps for a normalised batch; ``targets`` default to each image's top-1."""
        self.details = {"precision": self.fastpath.precision_name(self.device)}
        logits, activations = self._forward(inputs)
        target_idx = resolve_targets(logits.detach(), targets)
        weights = self.channel_weights(inputs, activations, logits, target_idx)
        return self._result(weights, activations, logits, target_idx)

    def _result(self, weights: torch.Tensor, activations: torch.Tensor, logits: torch.Tensor,
                targets: torch.Tensor) -> Explanation:
        """``ReLU(sum_k w_k A_k)`` normalised, with the logits, targets and run details."""
        with torch.no_grad():
            maps = torch.einsum("bk,bkhw->bhw", weights.float(), activations.detach().float()).clamp_min_(0)
        return Explanation(self.method, normalize_maps(maps), logits.detach().float(), targets, self.layer,
                           dict(self.details))


class GradCAM(ActivationCAM):
    """Grad-CAM (Selvaraju et al., 2017): weights = spatial mean of d(target logit)/dA."""

    method = "gradcam"
    needs_gradient = True

    def explain(self, inputs: torch.Tensor, targets: int | list[int] | torch.Tensor | None = None) -> Explanation:
        """As :meth:`ActivationCAM.explain`; on CUDA with graphs on, a replay of one captured
        forward + head backward (fixed input shape) replaces the eager passes."""
        graph = gradcam_graph(self.model, self.layer, tuple(inputs.shape), self.fastpath)
        if graph is None:
            return super().explain(inputs, targets)
        self.details = {"precision": self.fastpath.precision_name(self.device), "cuda_graph": True}
        given = None
        if targets is not None:
            shape = (inputs.shape[0], graph.num_classes)
            given = resolve_targets(torch.empty(shape, device=inputs.device), targets)
        logits, activations, gradients, chosen = graph.run(inputs, given)
        return self._result(gradients.float().mean(dim=(2, 3)), activations, logits, chosen)

    def channel_weights(self, inputs, activations, logits, targets):
        if not logits.requires_grad:
            raise ExplainError("layer_unsupported", f"the logits do not depend on layer {self.layer!r}")
        score = logits.gather(1, targets[:, None]).sum()
        (gradients,) = torch.autograd.grad(score, activations)
        return gradients.mean(dim=(2, 3))


def _classifier_head(model: nn.Module, num_classes: int) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    if not linears:
        raise ExplainError("cam_unsupported", "CAM needs a linear classifier head; this model has none")
    return linears[-1]


class CAM(ActivationCAM):
    """CAM (Zhou et al., 2016): weights = the linear head's row for the target class.

    Only valid when the logits are exactly ``Linear(global_average_pool(A))``; that is checked
    on the very activations of the request, so any other head is refused with a reason.
    """

    method = "cam"

    def __init__(self, model: nn.Module, layer: str, fastpath: FastPath | None = None) -> None:
        # fp32 always: one cheap forward, and the head check below compares logits closely
        super().__init__(model, layer, dataclasses.replace(fastpath or EXACT, precision="fp32"))

    def channel_weights(self, inputs, activations, logits, targets):
        head = _classifier_head(self.model, logits.shape[1])
        if head.in_features != activations.shape[1]:
            raise ExplainError("cam_unsupported", f"CAM needs global pooling + a linear head right after "
                               f"layer {self.layer!r}: it has {activations.shape[1]} channels, the head "
                               f"takes {head.in_features}")
        pooled = activations.float().mean(dim=(2, 3))
        predicted = pooled @ head.weight.float().T
        if head.bias is not None:
            predicted = predicted + head.bias.float()
        tolerance = 1e-3 * (1.0 + logits.float().abs().max())
        if not torch.allclose(predicted, logits.float(), atol=float(tolerance), rtol=1e-3):
            raise ExplainError("cam_unsupported", f"CAM needs the logits to be a linear layer applied to "
                               f"the global average pool of layer {self.layer!r}; this model's head is different")
        return head.weight[targets].to(activations.dtype)


RANKINGS = ("taylor", "activation", "variance")
GPU_MAX_BATCH = 512  # Score-CAM's cap on CUDA; the memory budget usually decides first


class ScoreCAM(ActivationCAM):
    """Score-CAM (Wang et al., 2020) as pytorch-grad-cam defines it, batched on the device.

    Per channel ``k``: upsample ``A_k`` to the input size (bilinear, corners aligned, as
    ``nn.UpsamplingBilinear2d``), min-max normalise it (eps 1e-8), multiply the normalised
    input by it and take the raw target logit as the channel's score; weights = softmax over
    channels of the scores; map = ReLU(sum_k w_k A_k).

    Exact mode (``channels=None``) scores every channel. The masked inputs are built batch by
    batch (never all channels at once), in channels_last, under inference mode; the batch size
    comes from ``memory_budget_mb`` divided by the model's measured per-sample forward
    footprint (or ``batch_size`` when given). A channel that is constant over the map (dead
    ReLU channels: 746 of efficientnet_lite0's 1280 on the cat photo) normalises to all zeros,
    so its masked input is the zero image: that score is computed once for all of them.

    Fast mode (``channels=k``) scores only the ``k`` best-ranked non-constant channels (the
    constant ones still share their single forward) and leaves the others out of the softmax.
    Ranking ``"taylor"`` (default) orders channels by ``mean_xy(A_k * dS/dA_k)``, the
    first-order estimate of how much of the target logit flows through channel ``k``; it costs
    one backward through the head only. Why: the exact map is dominated by the few channels
    whose masked input keeps the target's evidence (softmax over scores spanning ~13 logits),
    and the Taylor term is the cheap, *class-specific* predictor of those channels, so it also
    works for a target that is not the top-1 class. Measured on efficientnet_lite0 (bn2),
    correlation with the exact map at k = 16 / 32 / 64: taylor 0.93 / 0.97 / 0.99 (cat photo)
    and 0.93 / 0.98 / 0.99 (coffee); activation mean 0.92 / 0.97 / 0.99 and 0.90 / 0.94 / 0.98;
    spatial variance (class-blind) 0.93 / 0.98 / 0.99 and 0.97 / 0.97 / 0.99.

    Batches on the CPU are capped at 16 images: throughput peaks at small batches there
    (efficientnet_lite0 at 224 px, one core: 47 ms per image at 16, 58 at 32, 122 at 128).
    """

    method = "scorecam"
    options = ("channels", "batch_size", "memory_budget_mb", "ranking")

    def __init__(self, model: nn.Module, layer: str, fastpath: FastPath | None = None, channels: int | None = None,
                 batch_size: int | None = None, memory_budget_mb: float = 512.0, ranking: str = "taylor",
                 max_batch: int | None = None) -> None:
        super().__init__(model, layer, fastpath)
        if channels is not None and channels < 1:
            raise ExplainError("invalid_parameter", "channels must be a positive integer (or all)")
        if batch_size is not None and batch_size < 1:
            raise ExplainError("invalid_parameter", "batch_size must be a positive integer")
        if memory_budget_mb <= 0:
            raise ExplainError("invalid_parameter", "memory_budget_mb must be positive")
        if ranking not in RANKINGS:
            raise ExplainError("invalid_parameter", f"ranking must be one of {list(RANKINGS)}")
        self.channels = channels
        self.batch_size = batch_size
        self.memory_budget_mb = memory_budget_mb
        self.ranking = ranking
        self.runtime = "torch"  # what ran the masked forwards last (set per batch)
        # CPU throughput peaks at small batches (cache-resident activations, explainers.batching);
        # a GPU wants big ones
        cuda = self.device.type == "cuda"
        self.max_batch = max_batch or (GPU_MAX_BATCH if cuda else images_per_forward(self.device))
        self.needs_gradient = channels is not None and ranking == "taylor"  # type: ignore[misc]

    def _batch_size(self, inputs: torch.Tensor) -> int:
        if self.batch_size is not None:
            return self.batch_size
        budget = int(self.memory_budget_mb * 2**20)
        return batch_size_for_budget(self.model, tuple(inputs.shape[1:]), budget, self.max_batch)

    def _rank(self, activations: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``B x K`` relevance of each channel for the fast mode (higher = keep)."""
        if self.ranking == "taylor":
            if not logits.requires_grad:
                raise ExplainError("layer_unsupported", f"the logits do not depend on layer {self.layer!r}")
            score = logits.gather(1, targets[:, None]).sum()
            (gradients,) = torch.autograd.grad(score, activations)
            return (gradients.float() * activations.detach().float()).mean(dim=(2, 3))
        flat = activations.detach().float().flatten(2)
        return flat.mean(dim=2) if self.ranking == "activation" else flat.var(dim=2)

    def channel_weights(self, inputs, activations, logits, targets):
        relevance = self._rank(activations, logits, targets) if self.channels is not None else None
        activations = activations.detach()
        batch = self._batch_size(inputs)
        weights = []
        passes = 0
        scored = constant_total = 0
        for b in range(inputs.shape[0]):
            scores, n_scored, n_constant = self._image_scores(
                inputs[b:b + 1], activations[b].float(), targets[b], None if relevance is None else relevance[b], batch)
            weights.append(scores.softmax(dim=0))
            passes += n_scored + (1 if n_constant else 0)
            scored += n_scored
            constant_total += n_constant
        total = activations.shape[1]
        fast = self.channels is not None and scored < total * inputs.shape[0] - constant_total
        self.details.update({
            "mode": "fast" if fast else "exact",
            "channels": scored // inputs.shape[0],  # scored per image (mean over the batch)
            "total_channels": total,
            "constant_channels": constant_total,
            "forward_passes": passes + 1,  # + the forward that captured the activations
            "batch_size": batch,
            "runtime": self.runtime,  # what ran the masked forwards (explainers.onnx_cpu on a CPU)
        })
        if fast:
            self.details["ranking"] = self.ranking
        return torch.stack(weights)

    def _image_scores(self, image: torch.Tensor, maps: torch.Tensor, target: torch.Tensor,
                      relevance: torch.Tensor | None, batch: int) -> tuple[torch.Tensor, int, int]:
        """Score per channel of one image (``-inf`` for channels left out) and the counts."""
        channels = maps.shape[0]
        flat = maps.flatten(1)
        constant = flat.amax(dim=1) == flat.amin(dim=1)
        candidates = (~constant).nonzero().reshape(-1)
        if relevance is not None and self.channels is not None and self.channels < candidates.numel():
            keep = relevance[candidates].topk(self.channels).indices
            candidates = candidates[keep].sort().values
        scores = torch.full((channels,), -math.inf, device=maps.device)
        n_constant = int(constant.sum())
        if n_constant:
            zero = torch.zeros_like(image)
            scores[constant] = self._target_scores(zero, target, batch)[0]
        size = tuple(image.shape[-2:])
        for start in range(0, candidates.numel(), batch):
            index = candidates[start:start + batch]
            up = F.interpolate(maps[index][None], size=size, mode="bilinear", align_corners=True)[0]
            low = up.flatten(1).amin(dim=1)[:, None, None]
            high = up.flatten(1).amax(dim=1)[:, None, None]
            masks = (up - low) / (high - low + 1e-8)
            masked = torch.empty((index.numel(), *image.shape[1:]), device=image.device,
                                 memory_format=torch.channels_last if self.fastpath.channels_last
                                 else torch.contiguous_format)
            torch.mul(image, masks[:, None], out=masked)
            del up, masks
            scores[index] = self._target_scores(masked, target, batch)
        return scores, int(candidates.numel()), n_constant

    def _target_scores(self, masked: torch.Tensor, target: torch.Tensor, batch: int) -> torch.Tensor:
        """fp32 target logits of a batch of masked inputs (no host sync)."""
        runner = logits_runner(self.model, (batch, *masked.shape[1:]), self.fastpath)
        if runner is not None:
            return runner.target_scores(masked, target)
        # ONNX Runtime on a CPU in fp32 only (it would not honour a reduced-precision autocast)
        runtime = self.fastpath.cpu_runtime if self.fastpath.dtype(self.device) is None else "torch"
        network = scoring_forward(self.model, masked, runtime)
        self.runtime = runtime_of(network)
        with inference(self.device, self.fastpath):
            logits = network(masked)
        return logits.float().index_select(1, target.reshape(1)).reshape(-1)
