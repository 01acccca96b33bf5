"""Class activation maps: CAM, Grad-CAM (and the shared shape Score-CAM builds on).

Every method weights the channels of one layer's activations ``A`` (``B x K x h x w``) and
returns ``ReLU(sum_k w_k A_k)`` normalised to [0, 1] at feature resolution. The methods only
differ in :meth:`ActivationCAM.channel_weights`. All work stays on the model's device.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from explainers.capture import LayerCapture
from explainers.errors import ExplainError
from explainers.result import Explanation, normalize_maps, resolve_targets


class ActivationCAM:
    """Shared capture and post-processing; subclasses define the channel weights."""

    method: ClassVar[str] = "activation"
    needs_gradient: ClassVar[bool] = False

    def __init__(self, model: nn.Module, layer: str) -> None:
        self.model = model
        self.layer = layer

    def _forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the layer's activations from one forward pass."""
        with LayerCapture(self.model, self.layer, gradient=self.needs_gradient) as capture:
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
        logits, activations = self._forward(inputs)
        target_idx = resolve_targets(logits.detach(), targets)
        weights = self.channel_weights(inputs, activations, logits, target_idx)
        with torch.no_grad():
            maps = torch.einsum("bk,bkhw->bhw", weights.float(), activations.detach().float()).clamp_min_(0)
        return Explanation(self.method, normalize_maps(maps), logits.detach(), target_idx, self.layer)


class GradCAM(ActivationCAM):
    """Grad-CAM (Selvaraju et al., 2017): weights = spatial mean of d(target logit)/dA."""

    method = "gradcam"
    needs_gradient = True

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
