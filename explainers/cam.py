"""Class activation maps: CAM, Grad-CAM and Score-CAM.

Every method forms one map ``M`` (``B x h x w``) from a layer's activations ``A``
(``B x K x h x w``) and returns ``ReLU(M)`` normalised to [0, 1] at feature resolution. For the
channel-weighted methods here ``M = sum_k w_k A_k`` and they only differ in
:meth:`ActivationCAM.channel_weights`; methods that are not channel-weighted (HiResCAM, LayerCAM,
Eigen-CAM in :mod:`explainers.gradient_cams`) override :meth:`ActivationCAM.cam_map`. How the
forwards run is the execution's.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from explainers.errors import ExplainError
from explainers.execution import Session
from explainers.method import Method, MethodConfig, Progress, Targets
from explainers.result import Explanation, normalize_maps, resolve_targets


class ActivationCAM(Method):
    """Shared capture and post-processing; subclasses define the channel weights (or the map)."""

    synchronous = True
    needs_layer = True
    needs_gradient: ClassVar[bool] = False
    reduced_precision: ClassVar[bool] = True

    def _activations(self, session: Session, inputs: torch.Tensor, targets: Targets,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(logits, activations, targets, d target logit / d activations or ``None``)."""
        assert self.layer is not None
        if self.needs_gradient:
            logits, activations, gradients, chosen = session.layer_gradients(inputs, self.layer, targets)
            return logits, activations, chosen, gradients
        logits, activations = session.capture(inputs, self.layer, self.reduced_precision)
        return logits, activations, resolve_targets(logits.detach(), targets), None

    def channel_weights(self, session: Session, inputs: torch.Tensor, activations: torch.Tensor,
                        logits: torch.Tensor, targets: torch.Tensor, gradients: torch.Tensor | None) -> torch.Tensor:
        """``B x K`` weight per channel and image."""
        raise NotImplementedError

    def cam_map(self, session: Session, inputs: torch.Tensor, activations: torch.Tensor,
                logits: torch.Tensor, targets: torch.Tensor, gradients: torch.Tensor | None) -> torch.Tensor:
        """The ``B x h x w`` map before the ReLU: by default ``sum_k w_k A_k`` with
        :meth:`channel_weights`; methods that are not channel-weighted override this."""
        weights = self.channel_weights(session, inputs, activations, logits, targets, gradients)
        with torch.no_grad():
            return torch.einsum("bk,bkhw->bhw", weights.float(), activations.detach().float())

    def explain(self, inputs: torch.Tensor, targets: Targets = None, progress: Progress | None = None) -> Explanation:
        """Saliency maps for a normalised batch; ``targets`` default to each image's top-1."""
        session = self.execution.session()
        logits, activations, chosen, gradients = self._activations(session, inputs, targets)
        self.details: dict[str, Any] = {}
        maps = self.cam_map(session, inputs, activations, logits, chosen, gradients).detach().float().clamp_min(0)
        ran = session.ran("layer_gradients" if self.needs_gradient else "capture")
        details = {"precision": ran["precision"], **self.details}
        if ran.get("cuda_graph"):
            details["cuda_graph"] = True
        if progress is not None:
            progress(1.0, "done")
        return Explanation(self.name, normalize_maps(maps), logits.detach().float(), chosen, self.layer, details)


class GradCAM(ActivationCAM):
    """Grad-CAM (Selvaraju et al., 2017): weights = spatial mean of d(target logit)/dA."""

    name = "gradcam"
    needs_gradient = True
    description = "Grad-CAM heat map (a fraction of a second on a CPU)"

    def channel_weights(self, session, inputs, activations, logits, targets, gradients):
        assert gradients is not None
        return gradients.float().mean(dim=(2, 3))


def _classifier_head(model: nn.Module, num_classes: int) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    if not linears:
        raise ExplainError("cam_unsupported", "CAM needs a linear classifier head; this model has none")
    return linears[-1]


class CAM(ActivationCAM):
    """CAM (Zhou et al., 2016): weights = the linear head's row for the target class.

    Only valid when the logits are exactly ``Linear(global_average_pool(A))``; that is checked
    on the very activations of the request (in fp32), so any other head is refused with a reason.
    """

    name = "cam"
    reduced_precision = False
    description = "CAM heat map (models whose head is a linear layer on global average pooling)"

    def channel_weights(self, session, inputs, activations, logits, targets, gradients):
        head = _classifier_head(self.execution.model, logits.shape[1])
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


Ranking = Literal["taylor", "activation", "variance"]


class ScoreCAMConfig(MethodConfig):
    """Score-CAM's parameters: all channels (exact), or the ``channels`` best-ranked ones."""

    channels: int | None = Field(None, ge=1, description="score only the k most relevant channels (fast "
                                 "mode); default all channels (exact)")
    ranking: Ranking = Field("taylor", description="how the fast mode ranks channels: taylor "
                             "(mean of A_k * dS/dA_k), activation (mean of A_k) or variance (of A_k)")


class ScoreCAM(ActivationCAM):
    """Score-CAM (Wang et al., 2020) as pytorch-grad-cam defines it, batched on the device.

    Per channel ``k``: upsample ``A_k`` to the input size (bilinear, corners aligned, as
    ``nn.UpsamplingBilinear2d``), min-max normalise it (eps 1e-8), multiply the normalised
    input by it and take the raw target logit as the channel's score; weights = softmax over
    channels of the scores; map = ReLU(sum_k w_k A_k).

    Exact mode (``channels=None``) scores every channel; the masked inputs are built batch by
    batch (never all channels at once), as many per batch as the execution's memory budget
    allows. A channel that is constant over the map (dead ReLU channels) normalises to all
    zeros, so its masked input is the zero image: that score is computed once for all of them.

    Fast mode (``channels=k``) scores only the ``k`` best-ranked non-constant channels (the
    constant ones still share their single forward) and leaves the others out of the softmax.
    Ranking ``taylor`` (default) orders channels by ``mean_xy(A_k * dS/dA_k)``, the first-order
    estimate of how much of the target logit flows through channel ``k`` (one backward through
    the head). Why: the exact map is dominated by the few channels whose masked input keeps the
    target's evidence, and the Taylor term is the cheap, *class-specific* predictor of those
    channels, so it also works for a target that is not the top-1 class.
    """

    name = "scorecam"
    Config = ScoreCAMConfig
    description = "Score-CAM heat map, exact by default (one masked forward per channel)"
    config: ScoreCAMConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.needs_gradient = self.config.channels is not None and self.config.ranking == "taylor"  # type: ignore[misc]

    def _rank(self, activations: torch.Tensor, gradients: torch.Tensor | None) -> torch.Tensor:
        """``B x K`` relevance of each channel for the fast mode (higher = keep)."""
        if self.config.ranking == "taylor":
            assert gradients is not None
            return (gradients.float() * activations.detach().float()).mean(dim=(2, 3))
        flat = activations.detach().float().flatten(2)
        return flat.mean(dim=2) if self.config.ranking == "activation" else flat.var(dim=2)

    def channel_weights(self, session, inputs, activations, logits, targets, gradients):
        channels = self.config.channels
        relevance = self._rank(activations, gradients) if channels is not None else None
        activations = activations.detach()
        batch = session.batch_for_budget(tuple(inputs.shape[1:]))
        weights = []
        passes = scored = constant_total = 0
        for b in range(inputs.shape[0]):
            scores, n_scored, n_constant = self._image_scores(
                session, inputs[b:b + 1], activations[b].float(), targets[b],
                None if relevance is None else relevance[b], batch)
            weights.append(scores.softmax(dim=0))
            passes += n_scored + (1 if n_constant else 0)
            scored += n_scored
            constant_total += n_constant
        total = activations.shape[1]
        fast = channels is not None and scored < total * inputs.shape[0] - constant_total
        self.details = {
            "mode": "fast" if fast else "exact",
            "channels": scored // inputs.shape[0],  # scored per image (mean over the batch)
            "total_channels": total,
            "constant_channels": constant_total,
            "forward_passes": passes + 1,  # + the forward that captured the activations
            "batch_size": batch,
            "runtime": session.ran("scores").get("runtime", "torch"),  # what ran the masked forwards
        }
        if fast:
            self.details["ranking"] = self.config.ranking
        return torch.stack(weights)

    def _image_scores(self, session: Session, image: torch.Tensor, maps: torch.Tensor, target: torch.Tensor,
                      relevance: torch.Tensor | None, batch: int) -> tuple[torch.Tensor, int, int]:
        """Score per channel of one image (``-inf`` for channels left out) and the counts."""
        channels = maps.shape[0]
        flat = maps.flatten(1)
        constant = flat.amax(dim=1) == flat.amin(dim=1)
        candidates = (~constant).nonzero().reshape(-1)
        keep = self.config.channels
        if relevance is not None and keep is not None and keep < candidates.numel():
            chosen = relevance[candidates].topk(keep).indices
            candidates = candidates[chosen].sort().values
        scores = torch.full((channels,), -math.inf, device=maps.device)
        n_constant = int(constant.sum())
        if n_constant:
            scores[constant] = self._target_scores(session, torch.zeros_like(image), target, batch)[0]
        size = tuple(image.shape[-2:])
        for start in range(0, candidates.numel(), batch):
            index = candidates[start:start + batch]
            up = F.interpolate(maps[index][None], size=size, mode="bilinear", align_corners=True)[0]
            low = up.flatten(1).amin(dim=1)[:, None, None]
            high = up.flatten(1).amax(dim=1)[:, None, None]
            masked = image * ((up - low) / (high - low + 1e-8))[:, None]
            del up
            scores[index] = self._target_scores(session, masked, target, batch)
        return scores, int(candidates.numel()), n_constant

    @staticmethod
    def _target_scores(session: Session, masked: torch.Tensor, target: torch.Tensor, batch: int) -> torch.Tensor:
        """fp32 target logits of a batch of masked inputs (no host sync)."""
        return session.logits(masked, batch=batch).index_select(1, target.reshape(1)).reshape(-1)


__all__ = ["CAM", "ActivationCAM", "GradCAM", "ScoreCAM", "ScoreCAMConfig"]
