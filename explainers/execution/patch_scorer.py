"""Scores of patch sets for patch-set methods (SAG): batched forwards, a score cache by set.

A patch set keeps its patches of the input and shows the baseline everywhere else; its score is
the target's softmax probability. Every score is cached by the set's bitmask, each call scores
its uncached sets in as few forwards as the chunk size allows, and a set one patch away from a
set scored before runs only a crop around that patch through the network's early layers
(:mod:`explainers.execution.incremental`), checked against whole forwards on its first batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from explainers.execution.incremental import IncrementalForward, Window, known_layout
from explainers.patches import patch_edges, patches_of

logger = logging.getLogger(__name__)

Exported = Callable[[str, Callable[[torch.Tensor], torch.Tensor], torch.Tensor],
                    Callable[[torch.Tensor], torch.Tensor] | None]


class PatchScorer:
    """Scores patch sets (bitmask keys) in batched forwards, caching every score by key.

    With :meth:`use_incremental`, a set one patch away from a set scored before runs only the
    changed patch's neighbourhood through the network's early layers
    (:class:`explainers.execution.incremental.IncrementalForward`); the first such batch is checked
    against whole forwards, and the scorer falls back to whole forwards for good when they
    disagree.
    """

    def __init__(self, model: nn.Module, inputs: torch.Tensor, baseline: torch.Tensor, target: int,
                 grid: int, max_batch: int, autocast_dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.forward: Callable[[torch.Tensor], torch.Tensor] = model  # whole images to logits
        self.runtime = "torch"
        self.target = target
        self.grid = grid
        self.max_batch = max(1, max_batch)
        self.autocast_dtype = autocast_dtype
        self.device = inputs.device
        height, width = inputs.shape[-2:]
        self.edges_y = patch_edges(height, grid)
        self.edges_x = patch_edges(width, grid)
        rows = torch.bucketize(torch.arange(height), torch.tensor(self.edges_y[1:-1]), right=True)
        cols = torch.bucketize(torch.arange(width), torch.tensor(self.edges_x[1:-1]), right=True)
        self.patch_map = (rows[:, None] * grid + cols[None, :]).to(self.device)  # H x W patch index
        self.baseline = baseline
        self.difference = inputs - baseline
        self.cache: dict[int, float] = {}
        self.images = 0
        self.incremental_images = 0  # of ``images``: those that ran a crop through the early layers
        self.batches = 0
        self.requests = 0  # sets asked for, cached or not: what an implementation without a cache evaluates
        self.incremental: IncrementalForward | None = None
        self.verified: bool | None = None  # None: no incremental batch checked yet
        self.probe_images = 0  # images run to set the scorer up (precision probe, split probe)

    @property
    def patch_count(self) -> int:
        return self.grid * self.grid

    def use_onnx_runtime(self, exported: Exported) -> None:
        """Score through ONNX Runtime: the whole network, and the incremental split's prefix and
        suffix when there is one, each from ``exported(name, module, example)`` (the owner's
        cache of exports; ``None`` where a part does not export), so parts that do not stay on
        PyTorch (``runtime`` then says ``mixed``). Call after :meth:`use_incremental`."""
        example = self.baseline.detach()
        whole = exported("whole", self.model, example)
        if whole is not None:
            self.forward = whole
        swapped = [whole is not None]
        incremental = self.incremental
        if incremental is not None:
            split = incremental.split
            with torch.inference_mode():
                middle = split.prefix(example)
            prefix = exported(f"prefix-{split.units}", split.prefix, example)
            suffix = exported(f"suffix-{split.units}", split.suffix, middle)
            if prefix is not None and suffix is not None:
                incremental.split = replace(split, prefix=prefix, suffix=suffix)
            swapped.append(prefix is not None and suffix is not None)
        self.runtime = "onnxruntime" if all(swapped) else "mixed" if any(swapped) else "torch"

    def use_reduced_precision(self, dtype: torch.dtype | None, full_score: float) -> None:
        """Score under ``dtype`` autocast when that reproduces ``full_score`` (the full image's
        target probability in fp32) within 1 % on one probe forward; fp32 otherwise."""
        if dtype is None:
            return
        full = self.images_for([(1 << self.patch_count) - 1])
        self.autocast_dtype = dtype
        reduced = float(self.probabilities(full)[0])
        self.probe_images += 1
        if not abs(reduced - full_score) <= 0.01 * max(full_score, 1e-6):
            self.autocast_dtype = None

    def use_incremental(self) -> None:
        """Score one-patch changes incrementally when the network's layout allows it (one probe
        forward of a known layout finds the split)."""
        if not known_layout(self.model):
            return
        self.probe_images += 1
        try:
            self.incremental = IncrementalForward.build(self.model, self.baseline, self.edges_y, self.edges_x,
                                                        self._run)
        except Exception as exc:  # a layout that looked known but is not: never fail over speed
            logger.warning("no incremental scoring for %s: %s", type(self.model).__name__, exc)

    def _kept(self, keys: list[int]) -> torch.Tensor:
        """``B x P`` booleans: which patches each key keeps."""
        bits = np.zeros((len(keys), self.patch_count), dtype=np.bool_)
        for row, key in enumerate(keys):
            bits[row, list(patches_of(key))] = True
        return torch.from_numpy(bits).to(self.device)

    def masks(self, keys: list[int]) -> torch.Tensor:
        """``B x 1 x H x W`` float masks (1 = the patch is kept) for ``keys``."""
        return self._kept(keys)[:, self.patch_map].unsqueeze(1).to(self.difference.dtype)

    def images_for(self, keys: list[int]) -> torch.Tensor:
        """The masked inputs for ``keys``, channels-last."""
        masked = torch.addcmul(self.baseline, self.masks(keys), self.difference)
        return masked.contiguous(memory_format=torch.channels_last)

    def crops_for(self, keys: list[int], windows: list[Window], side: int) -> torch.Tensor:
        """The masked inputs for ``keys``, each cut to its window's ``side``-pixel crop
        (the same values as cropping :meth:`images_for`, without building whole images)."""
        cuts = [(slice(w.crop_y, w.crop_y + side), slice(w.crop_x, w.crop_x + side)) for w in windows]
        cells = torch.stack([self.patch_map[rows, cols] for rows, cols in cuts]).flatten(1)
        kept = self._kept(keys).gather(1, cells).view(len(keys), 1, side, side).to(self.difference.dtype)
        base = torch.cat([self.baseline[..., rows, cols] for rows, cols in cuts])
        difference = torch.cat([self.difference[..., rows, cols] for rows, cols in cuts])
        return torch.addcmul(base, kept, difference).contiguous(memory_format=torch.channels_last)

    def _run(self, network: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor) -> torch.Tensor:
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype)
                    if self.autocast_dtype is not None else nullcontext())
        with torch.inference_mode(), autocast:
            return network(batch)

    def _probabilities_of(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().softmax(dim=-1)[:, self.target]

    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """Target probability per image of a prepared batch (stays on the device)."""
        return self._probabilities_of(self._run(self.forward, batch))

    def _whole(self, keys: list[int]) -> torch.Tensor:
        """Probabilities of ``keys`` from whole forwards (their prefix outputs kept when split)."""
        images = self.images_for(keys)
        if self.incremental is None:
            return self.probabilities(images)
        return self._probabilities_of(self.incremental.whole(keys, images))

    def _changed(self, pairs: list[tuple[int, int]]) -> torch.Tensor:
        """Probabilities of (key, parent) children; the first batch is checked against whole
        forwards (relative to each score: SAG's span 1e-5 to 1, float32 rounding is ~1e-7)."""
        incremental = self.incremental
        assert incremental is not None
        keys = [key for key, _ in pairs]
        windows = incremental.windows_of(pairs)
        crops = self.crops_for(keys, windows, incremental.side)
        values = self._probabilities_of(incremental.changed(pairs, windows, crops))
        if self.verified is None:
            whole = self.probabilities(self.images_for(keys))
            self.images += len(keys)
            self.batches += 1
            relative = 1e-4 if self.autocast_dtype is None else 5e-3
            self.verified = bool(((whole - values).abs() <= 1e-7 + relative * whole.abs()).all())
            if not self.verified:
                logger.warning("incremental patch scores differ from whole forwards; scoring whole images")
                self.incremental = None
                return whole
        self.incremental_images += len(keys)
        return values

    def facts(self) -> dict[str, object]:
        """What scored the sets: precision, runtime and the incremental split (``None`` when
        every image ran whole), for the result's details."""
        from explainers.execution.policy import precision_name

        incremental = None if self.verified is None else {
            "verified": self.verified,
            "crop_px": self.incremental.side if self.incremental else None,
            "prefix_stride": self.incremental.split.stride if self.incremental else None}
        return {"precision": precision_name(self.autocast_dtype), "runtime": self.runtime, "incremental": incremental}

    def score(self, keys: Iterable[int]) -> dict[int, float]:
        """Scores of ``keys``; the uncached ones in as few forwards as ``max_batch`` allows."""
        wanted = list(dict.fromkeys(keys))
        self.requests += len(wanted)
        missing = [key for key in wanted if key not in self.cache]
        parents = {key: self.incremental.parent(key) if self.incremental else None for key in missing}
        whole = [key for key, parent in parents.items() if parent is None]
        pairs = [(key, parent) for key, parent in parents.items() if parent is not None]
        chunks = []
        for start in range(0, len(whole), self.max_batch):
            chunks.append(self._whole(whole[start:start + self.max_batch]))
        for start in range(0, len(pairs), self.max_batch):
            chunk = pairs[start:start + self.max_batch]
            if self.incremental is None:  # the check failed: whole forwards from here on
                chunks.append(self._whole([key for key, _ in chunk]))
            else:
                chunks.append(self._changed(chunk))
        done = whole + [key for key, _ in pairs]
        self.images += len(done)
        self.batches += len(chunks)
        if chunks:
            values = torch.cat(chunks).tolist()  # the one device -> host copy of this step
            self.cache.update(zip(done, values))
        return {key: self.cache[key] for key in wanted}


__all__ = ["PatchScorer"]
