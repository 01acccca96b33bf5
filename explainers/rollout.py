"""Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", 2020).

For each block ``l`` the attention probabilities ``A_l`` (``B x heads x N x N``) are fused over
the heads (``head_fusion``: mean, the paper's; max or min); optionally the lowest
``discard_ratio`` of each row's weights is zeroed, never the class token's own column (0.0, the
paper's; jacobgil's vit-explain popularised 0.9). The residual connection is accounted for as
``Â_l = 0.5 A_l + 0.5 I``, rows renormalised to sum 1, and the rollout is the product
``R = Â_L ... Â_1``. The map is the class token's row (token 0) over the patch tokens (all prefix
tokens skipped: class, distillation, registers), on the patch grid, normalised to [0, 1].

Rollout is class-agnostic: every target gets the same map. The reported target is still
resolved (top-1 by default) from the logits of the same forward. How the attention is read
(the fused kernels hide it) is the execution's :meth:`Session.attention`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from explainers.errors import ExplainError
from explainers.execution import Session
from explainers.feature_layout import token_geometry
from explainers.method import Method, MethodConfig, Progress, Targets
from explainers.result import Explanation, normalize_maps, resolve_targets

HeadFusion = Literal["mean", "max", "min"]
CLASS_TOKEN = 0


class RolloutConfig(MethodConfig):
    """Attention rollout's parameters (the defaults are the paper's)."""

    head_fusion: HeadFusion = Field("mean", description="how each block's heads are fused: mean (the paper), "
                                    "max or min")
    discard_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="share of each row's lowest attention "
                                 "weights zeroed before the residual is added (never the class token's "
                                 "column); 0 = the paper, 0.9 = jacobgil's vit-explain")


def fuse_heads(attention: torch.Tensor, how: HeadFusion) -> torch.Tensor:
    """``B x heads x N x N`` -> ``B x N x N``: the mean, max or min over the heads."""
    if how == "mean":
        return attention.mean(dim=1)
    return attention.amax(dim=1) if how == "max" else attention.amin(dim=1)


def discard_lowest(attention: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero the lowest ``ratio`` of each row's weights over the columns other than the class
    token's (``floor(ratio * (N - 1))`` per row); the class token's column is always kept."""
    others = attention[..., CLASS_TOKEN + 1:]
    count = int(ratio * others.shape[-1])
    if count == 0:
        return attention
    lowest = others.topk(count, dim=-1, largest=False).indices
    kept = others.scatter(-1, lowest, 0.0)
    return torch.cat([attention[..., :CLASS_TOKEN + 1], kept], dim=-1)


def with_residual(attention: torch.Tensor) -> torch.Tensor:
    """``Â = 0.5 A + 0.5 I``, each row renormalised to sum 1."""
    identity = torch.eye(attention.shape[-1], dtype=attention.dtype, device=attention.device)
    mixed = 0.5 * attention + 0.5 * identity
    return mixed / mixed.sum(dim=-1, keepdim=True)


def rollout(attentions: list[torch.Tensor]) -> torch.Tensor:
    """``R = Â_L @ ... @ Â_1`` of the blocks' ``B x N x N`` matrices (first block first)."""
    result = attentions[0]
    for attention in attentions[1:]:
        result = attention @ result
    return result


class AttentionRollout(Method):
    """Attention rollout for Vision Transformers (timm ViT / DeiT, incl. distilled and register
    tokens; torchvision ViT); models without patch tokens or readable attention are refused."""

    name = "rollout"
    Config = RolloutConfig
    synchronous = True
    needs_layer = False
    uses_layer = False  # reads every block: the pipeline passes it no default layer
    result_kind = "heatmap"
    description = ("Attention rollout (Abnar & Zuidema, 2020) for Vision Transformers: class-agnostic, the same "
                   "map for every target (one forward)")
    config: RolloutConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.layer = None  # the map is the whole network's attention flow, not a layer's

    def _fuse(self, attention: torch.Tensor) -> torch.Tensor:
        return fuse_heads(attention, self.config.head_fusion)

    def _refuse(self, session: Session, inputs: torch.Tensor, targets: Targets, reason: str) -> ExplainError:
        """The refusal of this model, after the request's own target mistakes (as every method)."""
        resolve_targets(session.classify(inputs), targets)
        return ExplainError("method_unsupported", f"attention rollout needs a Vision Transformer with a class "
                            f"token and patch tokens: {reason}")

    def explain(self, inputs: torch.Tensor, targets: Targets = None, progress: Progress | None = None) -> Explanation:
        """Rollout maps (``B x rows x cols``) of a normalised batch; ``targets`` (default each
        image's top-1) are only reported: the map is the same for every class."""
        model = self.execution.model
        session = self.execution.session()
        geometry = token_geometry(model)
        if geometry is None:
            raise self._refuse(session, inputs, targets, f"{type(model).__name__} declares no patch tokens")
        if geometry.prefix_tokens < 1 or getattr(model, "cls_token", True) is None:
            raise self._refuse(session, inputs, targets, f"{type(model).__name__} has no class token")
        logits, attentions = session.attention(inputs, self._fuse)
        chosen = resolve_targets(logits, targets)
        rows, cols = geometry.grid((int(inputs.shape[-2]), int(inputs.shape[-1])))
        tokens = geometry.prefix_tokens + rows * cols
        if not attentions or any(attention.shape[-1] != tokens for attention in attentions):
            raise ExplainError("method_unsupported", f"attention rollout needs self-attention over the "
                               f"{geometry.prefix_tokens} prefix tokens and the {rows} x {cols} patch grid; this "
                               f"model attends over {[int(a.shape[-1]) for a in attentions]} tokens")
        ratio = self.config.discard_ratio
        flow = rollout([with_residual(discard_lowest(attention, ratio)) for attention in attentions])
        row = flow[:, CLASS_TOKEN, :]  # sums to 1: a product of row-stochastic matrices
        patches = row[:, geometry.prefix_tokens:]
        maps = patches.reshape(inputs.shape[0], rows, cols)
        details = {"precision": session.ran("attention")["precision"], "blocks": len(attentions),
                   "head_fusion": self.config.head_fusion, "discard_ratio": ratio,
                   "prefix_tokens": geometry.prefix_tokens, "class_agnostic": True,
                   "patch_share": round(float(patches.sum(dim=1).mean()), 4)}
        if progress is not None:
            progress(1.0, "done")
        return Explanation(self.name, normalize_maps(maps), logits, chosen, None, details)


__all__ = ["AttentionRollout", "RolloutConfig", "discard_lowest", "fuse_heads", "rollout", "with_residual"]
