"""Read a Vision Transformer's attention probabilities without changing the model or its output.

Fused kernels never expose the probabilities: timm's ``Attention`` calls
``F.scaled_dot_product_attention`` when ``fused_attn`` is on, and torchvision's ``EncoderBlock``
calls ``nn.MultiheadAttention`` with ``need_weights=False``. So a forward hook on each block's
attention module reads the module's input tokens and recomputes ``softmax(q k^T * scale)`` from
the module's own projections (and, for timm, its ``q_norm`` / ``k_norm``), exactly as the
module's unfused path would. The hook returns nothing, so the forward and its logits are the
model's own, bit for bit.

Only what is recomputed faithfully is read: one unmasked self-attention module per block, of a
known kind (timm ``Attention`` and subclasses that keep its ``forward``; ``nn.MultiheadAttention``
without ``bias_k`` / ``add_zero_attn``). Masks, causal attention, cross-attention, rotary
variants (``AttentionRope``), blocks with parallel attentions or attention computed inline
(``ParallelScalingBlock``) are refused with ``method_unsupported`` and the reason.

The hooks act only for forwards of the reading context (a ``ContextVar``), so concurrent
requests sharing the model never see each other's reading; they are removed on exit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextvars import ContextVar
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from explainers.errors import ExplainError

FuseHeads = Callable[[torch.Tensor], torch.Tensor]  # B x heads x N x N -> what is kept per block
_active: ContextVar["AttentionReading | None"] = ContextVar("unbox_attention_reading", default=None)
_MHA_ARGUMENTS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
                  "is_causal")


def _unsupported(reason: str) -> ExplainError:
    return ExplainError("method_unsupported", f"attention cannot be read from this model: {reason}")


def _timm_attention() -> type[nn.Module] | None:
    try:
        from timm.layers import Attention
    except ImportError:  # timm is a dependency, but an older layout must not break other methods
        return None
    return Attention


def attention_kind(module: nn.Module) -> str | None:
    """``"timm"`` or ``"torch_mha"`` for an attention module whose probabilities can be recomputed
    faithfully, else ``None``."""
    timm_attention = _timm_attention()
    if timm_attention is not None and isinstance(module, timm_attention) \
            and type(module).forward is timm_attention.forward:
        return "timm"
    if isinstance(module, nn.MultiheadAttention) and type(module).forward is nn.MultiheadAttention.forward:
        return "torch_mha"
    return None


def _blocks(model: nn.Module) -> nn.Module | None:
    """The transformer blocks in forward order: timm ``blocks``, torchvision ``encoder.layers``."""
    for blocks in (getattr(model, "blocks", None), getattr(getattr(model, "encoder", None), "layers", None)):
        if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks):
            return blocks
    return None


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(path, module, kind) of each block's one readable self-attention module, in block order;
    ``method_unsupported`` when a block has none, several, or another kind of attention."""
    if isinstance(model, torch.jit.ScriptModule):
        raise _unsupported("TorchScript modules cannot be hooked")
    blocks = _blocks(model)
    if blocks is None:
        raise _unsupported(f"{type(model).__name__} has no transformer blocks (timm 'blocks' or torchvision "
                           "'encoder.layers')")
    prefix = "blocks" if blocks is getattr(model, "blocks", None) else "encoder.layers"
    found = []
    for name, block in blocks.named_children():
        readable = [(f"{prefix}.{name}.{path}", module, kind) for path, module in block.named_modules()
                    if (kind := attention_kind(module)) is not None]
        inside = {id(m) for _, reader, _ in readable for m in reader.modules()}
        other = sorted({type(m).__name__ for m in block.modules()
                        if id(m) not in inside and "attention" in type(m).__name__.lower()})
        if other:
            raise _unsupported(f"block {prefix}.{name} uses {', '.join(other)}, whose attention is not recomputed "
                               "here (only timm Attention and torch MultiheadAttention are)")
        if len(readable) != 1:
            raise _unsupported(f"block {prefix}.{name} ({type(block).__name__}) has {len(readable)} attention "
                               "modules; rollout needs exactly one self-attention per block")
        found.append(readable[0])
    return found


def _refuse_dropout(module: nn.Module, p: float) -> None:
    if module.training and p > 0:
        raise _unsupported("the attention module is in training mode with dropout")


def timm_probabilities(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """``B x heads x N x N`` softmax probabilities of a timm ``Attention`` call, recomputed as its
    unfused path computes them (``q * scale @ k^T``; the fused kernel's default scale)."""
    x = args[0] if args else kwargs["x"]
    mask = args[1] if len(args) > 1 else kwargs.get("attn_mask")
    causal = args[2] if len(args) > 2 else kwargs.get("is_causal", False)
    if mask is not None or causal:
        raise _unsupported("masked or causal attention (rollout reads full self-attention)")
    _refuse_dropout(module, float(module.attn_drop.p))
    batch, tokens, _ = x.shape
    heads = int(module.num_heads)
    head_dim = int(getattr(module, "head_dim", module.qkv.out_features // (3 * heads)))
    qkv = module.qkv(x).reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    q, k = module.q_norm(q), module.k_norm(k)
    scale = head_dim ** -0.5 if module.fused_attn else module.scale  # SDPA's default is 1 / sqrt(head_dim)
    return ((q * scale) @ k.transpose(-2, -1)).float().softmax(dim=-1)


def mha_probabilities(module: nn.MultiheadAttention, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """``B x heads x N x N`` softmax probabilities of an ``nn.MultiheadAttention`` self-attention
    call, recomputed as ``F.multi_head_attention_forward`` does with ``need_weights=True``."""
    call = {**dict(zip(_MHA_ARGUMENTS, args)), **kwargs}
    query = call["query"]
    if call.get("key") is not query or call.get("value") is not query:
        raise _unsupported("MultiheadAttention is not called as self-attention (query, key and value differ)")
    if call.get("key_padding_mask") is not None or call.get("attn_mask") is not None or call.get("is_causal"):
        raise _unsupported("masked or causal attention (rollout reads full self-attention)")
    if module.bias_k is not None or module.add_zero_attn:
        raise _unsupported("MultiheadAttention with bias_k / bias_v or add_zero_attn adds keys to every row")
    if query.dim() != 3:
        raise _unsupported(f"MultiheadAttention input of shape {tuple(query.shape)} (expected batched tokens)")
    _refuse_dropout(module, float(module.dropout))
    x = query if module.batch_first else query.transpose(0, 1)
    batch, tokens, _ = x.shape
    width, heads, head_dim = module.embed_dim, module.num_heads, module.head_dim
    if module._qkv_same_embed_dim:
        w_q, w_k = module.in_proj_weight[:width], module.in_proj_weight[width:2 * width]
    else:
        w_q, w_k = module.q_proj_weight, module.k_proj_weight
    bias = module.in_proj_bias
    b_q, b_k = (None, None) if bias is None else (bias[:width], bias[width:2 * width])
    q = F.linear(x, w_q, b_q).view(batch, tokens, heads, head_dim).transpose(1, 2)
    k = F.linear(x, w_k, b_k).view(batch, tokens, heads, head_dim).transpose(1, 2)
    return ((q * math.sqrt(1.0 / float(head_dim))) @ k.transpose(-2, -1)).float().softmax(dim=-1)


_READERS = {"timm": timm_probabilities, "torch_mha": mha_probabilities}


class AttentionReading:
    """Context manager holding each block's attention probabilities from the forwards run inside
    it (in fp32, block order): ``B x heads x N x N``, or what ``fuse_heads`` makes of them, applied
    in the hook so that only the fused maps are kept."""

    def __init__(self, model: nn.Module, fuse_heads: FuseHeads | None = None) -> None:
        self.model = model
        self.modules = attention_modules(model)
        self.kinds = sorted({kind for _, _, kind in self.modules})
        self.fuse_heads = fuse_heads
        self.maps: list[torch.Tensor | None] = [None] * len(self.modules)
        self._handles: list[Any] = []
        self._token: Any = None

    def _hook(self, index: int, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
              _output: Any) -> None:
        if _active.get() is not self:
            return None
        path, _, kind = self.modules[index]
        if self.maps[index] is not None:
            raise _unsupported(f"the attention module {path!r} ran more than once in one forward")
        probabilities = _READERS[kind](module, args, kwargs)
        self.maps[index] = probabilities if self.fuse_heads is None else self.fuse_heads(probabilities)
        return None

    def __enter__(self) -> "AttentionReading":
        self._token = _active.set(self)
        self._handles = [module.register_forward_hook(partial(self._hook, index), with_kwargs=True)
                         for index, (_, module, _) in enumerate(self.modules)]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        _active.reset(self._token)

    def require(self) -> list[torch.Tensor]:
        """Every block's probabilities, or an error naming an attention module that did not run."""
        missing = [path for (path, _, _), seen in zip(self.modules, self.maps) if seen is None]
        if missing:
            raise _unsupported(f"the attention module {missing[0]!r} did not run in the forward pass")
        return [seen for seen in self.maps if seen is not None]


__all__ = ["AttentionReading", "FuseHeads", "attention_kind", "attention_modules", "mha_probabilities",
           "timm_probabilities"]
