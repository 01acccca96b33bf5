"""Structured Attention Graphs (Shitole et al., NeurIPS 2021): minimal sufficient patch sets.

The image is cut into a ``grid x grid`` lattice of crisp, non-overlapping rectangles (patch
``p = row * grid + col``; pixel edges ``round(i * size / grid)``), and a *patch set* keeps those
rectangles of the input while every other pixel shows the baseline (black = pixel value 0, as
in the paper, or a blurred copy). A set's score is the softmax probability of the target class;
a set *suffices* when its score is ``>= threshold x`` the full image's score.

1. Patch order: a coarse importance per patch (I-GOS when ``explainers.igos`` works, else
   Grad-CAM or single-patch deletion) ranks the candidates; I-GOS's ties (a mask its line
   search barely moved) are broken by its descent direction. The ordering used is recorded.
2. Beam search from the empty set: every state proposes its ``successors`` most important
   unused patches; candidates over the threshold are minimised greedily (drop the patch whose
   removal keeps the highest score while staying over it, until no single removal does) and
   become roots; the best others form the next beam. It stops at ``max_roots`` roots, after
   ``grid**2`` steps, or when the beam is empty.
3. Graph roots: the found roots by score (then size); a root is kept when it shares at most
   ``overlap_limit`` patches with every root kept before, up to ``graph_roots``.
4. Graph: from the graph roots remove every patch in turn; a node whose score is at least
   ``graph_threshold x`` the full score is expanded again. Nodes are keyed by their patch set
   (an int bitmask), so the result is a DAG without duplicates. ``max_nodes`` bounds it.

Speed: each search step, minimisation round and graph level is ONE batched forward (chunked
at ``max_batch``) in inference mode with channels-last input; scores are cached by patch set;
on CUDA half precision is used when it reproduces the full-image score. On a CPU every set one
patch away from a set scored before is scored incrementally (``explainers.incremental``: only
a crop around the changed patch goes through the network's early layers; checked against whole
forwards on its first batch). The number of images and batched forwards is part of the result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from explainers import onnx_cpu
from explainers.batching import images_per_forward
from explainers.errors import ExplainError
from explainers.fastpath import network_for
from explainers.incremental import IncrementalForward, Window, known_layout
from explainers.result import resolve_targets

logger = logging.getLogger(__name__)

Progress = Callable[[float, str], None]
Ordering = Literal["auto", "igos", "gradcam", "occlusion"]

# Coarse I-GOS used to order the patches (methods.md: 2 iterations, 20 steps, L1 1, TV 20); its
# Armijo trials are scored at the path's end point (the I-GOS paper), a forward each.
IGOS_ORDERING = {"iterations": 2, "steps": 20, "l1": 1.0, "tv": 20.0, "line_search_objective": "endpoint"}


@dataclass(frozen=True)
class SAGConfig:
    """Search and graph parameters; the defaults follow the paper's reference set-up."""

    grid: int = 7
    beam_width: int = 3
    successors: int = 15
    threshold: float = 0.9
    max_root_size: int = 12
    max_roots: int = 10
    overlap_limit: int = 1
    graph_roots: int = 3
    graph_threshold: float = 0.4
    max_nodes: int = 100
    baseline: Literal["black", "blur"] = "black"
    ordering: Ordering = "auto"
    max_batch: int | None = None  # images per forward; None: the device's default
    reduced_precision: bool = True
    # one-patch changes scored through a crop of the network's local prefix
    # (explainers.incremental); auto: on a CPU, where a forward's cost is its pixel count
    incremental: Literal["auto", "on", "off"] = "auto"
    # runtime of the patch-set forwards on a CPU (explainers.onnx_cpu); auto: ONNX Runtime when
    # installed. The coarse I-GOS ordering needs gradients and stays on PyTorch
    cpu_runtime: onnx_cpu.CpuRuntime = "auto"


@dataclass(frozen=True)
class SAGRoot:
    """A minimal sufficient patch set found by the search."""

    patches: tuple[int, ...]
    score: float
    selected: bool


@dataclass(frozen=True)
class SAGNode:
    """A graph node: one patch set, its score, its drawing level (roots = 0)."""

    id: int
    patches: tuple[int, ...]
    score: float
    level: int
    root: bool
    expanded: bool


@dataclass(frozen=True)
class SAGEdge:
    """``source`` minus the single patch ``removed`` is ``target``; ``drop`` = score difference."""

    source: int
    target: int
    removed: int
    drop: float


@dataclass
class SAGResult:
    """Roots, graph and bookkeeping of one SAG explanation (one image, one target)."""

    method: str
    target: int
    full_score: float
    logits: torch.Tensor
    grid: int
    edges_y: tuple[int, ...]
    edges_x: tuple[int, ...]
    roots: list[SAGRoot]
    nodes: list[SAGNode]
    edges: list[SAGEdge]
    ordering: str
    patch_order: list[int]
    truncated: bool
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def graph_roots(self) -> list[SAGNode]:
        return [node for node in self.nodes if node.root]


def patch_edges(size: int, grid: int) -> tuple[int, ...]:
    """Pixel boundaries of ``grid`` crisp patches along a side of ``size`` pixels."""
    return tuple(round(i * size / grid) for i in range(grid + 1))


def patches_of(key: int) -> tuple[int, ...]:
    """The patch indices of a bitmask key, ascending."""
    out = []
    index = 0
    while key:
        if key & 1:
            out.append(index)
        key >>= 1
        index += 1
    return tuple(out)


def key_of(patches: Iterable[int]) -> int:
    """The bitmask key of a patch set."""
    key = 0
    for patch in patches:
        key |= 1 << int(patch)
    return key


def make_baseline(kind: str, inputs: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The normalised baseline image: black (pixel value 0) or a blurred copy of ``inputs``."""
    if kind == "black":
        return ((torch.zeros_like(inputs) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)).to(inputs.dtype)
    if kind == "blur":
        from explainers.baselines import make_baseline as shared_baseline

        return shared_baseline(inputs, "blur")[0]
    raise ExplainError("invalid_parameter", f"baseline must be 'black' or 'blur', not {kind!r}")


class PatchScorer:
    """Scores patch sets (bitmask keys) in batched forwards, caching every score by key.

    With :meth:`use_incremental`, a set one patch away from a set scored before runs only the
    changed patch's neighbourhood through the network's early layers
    (:class:`explainers.incremental.IncrementalForward`); the first such batch is checked
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

    @property
    def patch_count(self) -> int:
        return self.grid * self.grid

    def use_onnx_runtime(self) -> None:
        """Score through ONNX Runtime (:mod:`explainers.onnx_cpu`): the whole network, and the
        incremental split's prefix and suffix when there is one; parts it cannot export stay
        on PyTorch (``runtime`` then says ``mixed``). Call after :meth:`use_incremental`."""
        example = self.baseline.detach()
        whole = onnx_cpu.whole_forward(self.model, example)
        if whole is not None:
            self.forward = whole
        swapped = [whole is not None]
        incremental = self.incremental
        if incremental is not None:
            split = incremental.split
            with torch.inference_mode():
                middle = split.prefix(example)
            prefix = onnx_cpu.cached_forward(self.model, f"prefix-{split.units}", split.prefix, example)
            suffix = onnx_cpu.cached_forward(self.model, f"suffix-{split.units}", split.suffix, middle)
            if prefix is not None and suffix is not None:
                incremental.split = replace(split, prefix=prefix, suffix=suffix)
            swapped.append(prefix is not None and suffix is not None)
        self.runtime = "onnxruntime" if all(swapped) else "mixed" if any(swapped) else "torch"

    def use_incremental(self) -> int:
        """Score one-patch changes incrementally when the network's layout allows it; returns
        the images run to find the split (one probe forward of a known layout, else none)."""
        if not known_layout(self.model):
            return 0
        try:
            self.incremental = IncrementalForward.build(self.model, self.baseline, self.edges_y, self.edges_x,
                                                        self._run)
        except Exception as exc:  # a layout that looked known but is not: never fail over speed
            logger.warning("no incremental scoring for %s: %s", type(self.model).__name__, exc)
        return 1

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


class SAG:
    """Structured Attention Graph explainer for one classifier."""

    method = "sag"

    def __init__(self, model: nn.Module, config: SAGConfig | None = None, layer: str | None = None,
                 mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
                 std: tuple[float, float, float] = (0.229, 0.224, 0.225)) -> None:
        self.model = model
        self.config = config or SAGConfig()
        self.layer = layer
        self.mean = mean
        self.std = std
        self._check_config()

    def _check_config(self) -> None:
        cfg = self.config
        if not 1 <= cfg.grid <= 16:
            raise ExplainError("invalid_parameter", "grid must be between 1 and 16")
        if not 0 < cfg.threshold <= 1 or not 0 <= cfg.graph_threshold <= 1:
            raise ExplainError("invalid_parameter", "thresholds must lie in (0, 1]")
        if min(cfg.beam_width, cfg.successors, cfg.max_root_size, cfg.max_roots, cfg.graph_roots,
               cfg.max_nodes, 1 if cfg.max_batch is None else cfg.max_batch) < 1 or cfg.overlap_limit < 0:
            raise ExplainError("invalid_parameter", "counts and sizes must be positive")
        if cfg.incremental not in ("auto", "on", "off"):
            raise ExplainError("invalid_parameter", "incremental must be auto, on or off")
        if cfg.cpu_runtime not in ("auto", "torch", "onnxruntime"):
            raise ExplainError("invalid_parameter", "cpu_runtime must be auto, torch or onnxruntime")

    # -- entry point -----------------------------------------------------------------------
    def explain(self, inputs: torch.Tensor, target: int | None = None,
                progress: Progress | None = None) -> SAGResult:
        """Roots and graph for one normalised image ``1 x 3 x H x W`` (target default top-1).

        ``progress(fraction, stage)`` is called after the ordering, each search step and each
        graph level; an exception it raises (a cancelled job) stops the search there.
        """
        if inputs.dim() != 4 or inputs.shape[0] != 1:
            raise ExplainError("invalid_input", "SAG explains one image at a time (1 x 3 x H x W)")
        cfg = self.config
        report = progress or (lambda _fraction, _stage: None)
        timings: dict[str, float] = {}
        started = time.perf_counter()

        with torch.inference_mode():
            logits = self.model(inputs.contiguous(memory_format=torch.channels_last)).float()
        target_index = int(resolve_targets(logits, target)[0])
        full_score = float(logits.softmax(dim=-1)[0, target_index])
        mean = torch.tensor(self.mean, device=inputs.device)
        std = torch.tensor(self.std, device=inputs.device)
        baseline = make_baseline(cfg.baseline, inputs, mean, std)
        scorer = PatchScorer(network_for(self.model, inputs), inputs, baseline, target_index, cfg.grid,
                             images_per_forward(inputs.device, cfg.max_batch))
        precision, probes = self._choose_precision(scorer, full_score)
        if cfg.incremental == "on" or (cfg.incremental == "auto" and inputs.device.type == "cpu"):
            probes += scorer.use_incremental()  # the split is read off one forward of the baseline
        if onnx_cpu.wanted(cfg.cpu_runtime, inputs.device):
            scorer.use_onnx_runtime()
        timings["setup"] = time.perf_counter() - started

        mark = time.perf_counter()
        importance, ordering, outside = patch_importance(self.model, inputs, target_index, cfg.ordering,
                                                         self.layer, scorer, full_score)
        order = sorted(range(scorer.patch_count), key=lambda p: (*(-v for v in importance[p]), p))
        ordering_images = scorer.images
        timings["ordering"] = time.perf_counter() - mark
        report(0.1, f"ordering ({ordering})")

        mark = time.perf_counter()
        threshold = cfg.threshold * full_score
        found, steps = self._search(scorer, order, threshold, report)
        search_images = scorer.images - ordering_images
        timings["search"] = time.perf_counter() - mark

        mark = time.perf_counter()
        chosen = select_roots(found, scorer.cache, cfg.overlap_limit, cfg.graph_roots)
        nodes, edges, truncated = self._graph(scorer, chosen, cfg.graph_threshold * full_score, report)
        graph_images = scorer.images - ordering_images - search_images
        timings["graph"] = time.perf_counter() - mark
        timings["total"] = time.perf_counter() - started

        chosen_set = set(chosen)
        ranked = sorted(found, key=lambda k: (-scorer.cache[k], bin(k).count("1"), k))
        roots = [SAGRoot(patches_of(k), scorer.cache[k], k in chosen_set) for k in ranked]
        return SAGResult(
            method=self.method, target=target_index, full_score=full_score, logits=logits,
            grid=cfg.grid, edges_y=scorer.edges_y, edges_x=scorer.edges_x, roots=roots, nodes=nodes,
            edges=edges, ordering=ordering, patch_order=order, truncated=truncated,
            details={
                "threshold": threshold,
                "graph_threshold": cfg.graph_threshold * full_score,
                "baseline": cfg.baseline,
                "precision": precision,
                "runtime": scorer.runtime,
                "search_steps": steps,
                "incremental": None if scorer.verified is None else {
                    "verified": scorer.verified,
                    "crop_px": scorer.incremental.side if scorer.incremental else None,
                    "prefix_stride": scorer.incremental.split.stride if scorer.incremental else None},
                "forward": {"images": 1 + probes + outside + scorer.images, "full_image": 1 + probes,
                            "ordering_images": ordering_images + outside, "search_images": search_images,
                            "graph_images": graph_images, "scorer_batches": scorer.batches,
                            "requested_sets": scorer.requests,
                            "incremental_images": scorer.incremental_images,
                            "cached_sets": len(scorer.cache)},
                "timing_ms": {name: round(seconds * 1e3, 2) for name, seconds in timings.items()},
            },
        )

    # -- pieces ----------------------------------------------------------------------------
    def _choose_precision(self, scorer: PatchScorer, full_score: float) -> tuple[str, int]:
        """Half precision on CUDA when it reproduces the full-image score within 1 % (one
        probe forward); float32 elsewhere. Returns the precision and the probe images."""
        if not (self.config.reduced_precision and scorer.device.type == "cuda"):
            return "float32", 0
        full = scorer.images_for([(1 << scorer.patch_count) - 1])
        scorer.autocast_dtype = torch.float16
        half = float(scorer.probabilities(full)[0])
        if abs(half - full_score) <= 0.01 * max(full_score, 1e-6):
            return "float16", 1
        scorer.autocast_dtype = None
        return "float32", 1

    def _search(self, scorer: PatchScorer, order: list[int], threshold: float,
                report: Progress) -> tuple[list[int], int]:
        """Beam search for minimal sufficient sets; returns the roots and the steps taken."""
        cfg = self.config
        max_steps = scorer.patch_count
        roots: list[int] = []
        beam = [0]
        visited: set[int] = {0}
        step = 0
        while beam and step < max_steps and len(roots) < cfg.max_roots:
            step += 1
            candidates: list[int] = []
            for state in beam:
                proposed = 0
                for patch in order:
                    if proposed == cfg.successors:
                        break
                    if state >> patch & 1:
                        continue
                    proposed += 1
                    candidate = state | 1 << patch
                    if candidate in visited or any(candidate & root == root for root in roots):
                        continue  # already searched, or a superset of a known root
                    visited.add(candidate)
                    candidates.append(candidate)
            scores = scorer.score(candidates)
            over = [key for key in candidates if scores[key] >= threshold]
            under = [key for key in candidates if scores[key] < threshold
                     and bin(key).count("1") < cfg.max_root_size]
            over.sort(key=lambda k: (-scores[k], k))
            while over and len(roots) < cfg.max_roots:  # only as many as the missing roots
                batch, over = over[:cfg.max_roots - len(roots)], over[cfg.max_roots - len(roots):]
                for root in self._minimise(scorer, batch, threshold):
                    if root not in roots and len(roots) < cfg.max_roots:
                        roots.append(root)
                over = [key for key in over if not any(key & root == root for root in roots)]
            under.sort(key=lambda k: (-scores[k], k))
            beam = under[:cfg.beam_width]
            fraction = max(step / max_steps, len(roots) / cfg.max_roots)
            report(0.1 + 0.6 * min(1.0, fraction), f"search step {step}: {len(roots)} roots")
        return roots, step

    @staticmethod
    def _minimise(scorer: PatchScorer, keys: list[int], threshold: float) -> list[int]:
        """Greedy minimisation of sufficient sets, all sets' removals in one batch per round.

        Each round removes, from every pending set, the patch whose removal keeps the highest
        score over ``threshold``; a set none of whose single removals stays over it is minimal.
        """
        done: list[int] = []
        pending = list(dict.fromkeys(keys))
        while pending:
            children = {key: [key & ~(1 << p) for p in patches_of(key)] for key in pending}
            scores = scorer.score(child for kids in children.values() for child in kids)
            following: list[int] = []
            for key in pending:
                fine = [child for child in children[key] if scores[child] >= threshold]
                if fine:
                    following.append(max(fine, key=lambda c: (scores[c], -c)))
                elif key not in done:
                    done.append(key)
            pending = list(dict.fromkeys(following))
        return done

    def _graph(self, scorer: PatchScorer, roots: list[int], expand_at: float,
               report: Progress) -> tuple[list[SAGNode], list[SAGEdge], bool]:
        """Expand the roots level by level; nodes keyed by patch set, all removals tried."""
        cfg = self.config
        members: list[int] = list(roots)
        known = set(members)
        links: list[tuple[int, int, int]] = []
        expanded: set[int] = set()
        frontier = [key for key in roots if scorer.cache[key] >= expand_at and key]
        truncated = False
        level = 0
        while frontier:
            level += 1
            children = [(key, key & ~(1 << p), p) for key in frontier for p in patches_of(key)]
            new = [child for _, child, _ in children if child not in known]
            room = cfg.max_nodes - len(known)
            new = list(dict.fromkeys(new))
            if len(new) > room:
                new, truncated = new[:max(room, 0)], True
            scorer.score(new)
            known.update(new)
            members.extend(new)
            expanded.update(frontier)
            links.extend((parent, child, p) for parent, child, p in children if child in known)
            frontier = [key for key in new if key and scorer.cache[key] >= expand_at]
            report(0.7 + 0.25 * min(1.0, level / max(1, cfg.max_root_size)), f"graph level {level}: {len(known)} nodes")
        largest = max((bin(key).count("1") for key in roots), default=0)
        root_set = set(roots)

        def level_of(key: int) -> int:
            return 0 if key in root_set else max(1, largest - bin(key).count("1"))

        ordered = roots + sorted((k for k in members if k not in root_set),
                                 key=lambda k: (level_of(k), -scorer.cache[k], k))
        ids = {key: index for index, key in enumerate(ordered)}
        nodes = [SAGNode(ids[k], patches_of(k), scorer.cache[k], level_of(k), k in root_set, k in expanded)
                 for k in ordered]
        edges = [SAGEdge(ids[parent], ids[child], p, scorer.cache[parent] - scorer.cache[child])
                 for parent, child, p in dict.fromkeys(links)]
        return nodes, edges, truncated


def warm_cpu_runtime(model: nn.Module, inputs: torch.Tensor, grid: int = SAGConfig.grid) -> str:
    """Export now the networks SAG's scorer runs in ONNX Runtime for images of ``inputs``' size
    (cached per network; about 2 s for efficientnet_lite0), so that no job pays for it; returns
    the runtime the scorer will use."""
    scorer = PatchScorer(network_for(model, inputs), inputs, torch.zeros_like(inputs), 0, grid, 1)
    scorer.use_incremental()
    scorer.use_onnx_runtime()
    return scorer.runtime


def select_roots(found: list[int], scores: dict[int, float], overlap_limit: int, count: int) -> list[int]:
    """Diverse roots: by score (then fewer patches), keep a root sharing at most
    ``overlap_limit`` patches with each root kept before, until ``count`` are kept."""
    kept: list[int] = []
    for key in sorted(found, key=lambda k: (-scores[k], bin(k).count("1"), k)):
        if len(kept) == count:
            break
        if all(bin(key & other).count("1") <= overlap_limit for other in kept):
            kept.append(key)
    return kept


# -- patch ordering ----------------------------------------------------------------------------
def pool_to_patches(saliency: torch.Tensor, scorer: PatchScorer) -> torch.Tensor:
    """Mean of an ``h x w`` map (resampled to the input size) over each crisp patch.

    Sums as ``rows^T @ map @ cols`` with 0/1 patch-membership matrices: a fixed summation order,
    so the patch ranking repeats exactly (scattered adds accumulate in thread order)."""
    height, width = scorer.patch_map.shape
    up = F.interpolate(saliency.float().reshape(1, 1, *saliency.shape[-2:]), size=(height, width),
                       mode="bilinear", align_corners=False)[0, 0]
    grid = scorer.grid
    rows = F.one_hot(scorer.patch_map[:, 0] // grid, grid).to(up.dtype)  # H x grid
    cols = F.one_hot(scorer.patch_map[0, :] % grid, grid).to(up.dtype)   # W x grid
    sums = rows.T @ up @ cols
    counts = rows.sum(0)[:, None] * cols.sum(0)[None, :]
    return (sums / counts.clamp_min(1)).flatten()


def _igos_importance(model: nn.Module, inputs: torch.Tensor, target: int,
                     scorer: PatchScorer) -> tuple[torch.Tensor, int]:
    """Coarse I-GOS deletion mask at grid resolution (I-GOS's own blurred baseline, as in the
    reference), pooled to patches, with its last descent direction as the tie-break (``P x 2``);
    also the number of images it evaluated. Raises when I-GOS is unavailable.

    The tie-break matters: two iterations from an all-ones mask often end with the Armijo
    search accepting no step, so the mask moves by its smallest trial step (~2e-5) and stays
    exactly 1 in float32 on some photos (astronaut, the cat + coffee composite; 2026-11-26),
    which used to leave the patches in index order. The direction is what that step follows."""
    from explainers import igos

    # on a CPU the loaded network's own arithmetic (NCHW, batch norm unfolded; a copy with
    # bit-identical logits, explainers.lean.same_arithmetic_copy): the order hangs on rounding.
    # The lean, channels-last copy orders 1-2 s faster but, over 14 photos (2026-11-26), changed
    # the order on 4 and found 63 roots instead of 68 (the cat photo's 2 among those lost)
    network = "auto" if inputs.is_cuda else "as_loaded"
    config = igos.IGOSConfig(mask_size=scorer.grid, network=network, **IGOS_ORDERING)
    explanation = igos.IGOS(model, config).explain(inputs, target)
    counts = explanation.details.get("images_evaluated", {})
    direction = explanation.details["directions"].get("mask", torch.zeros_like(explanation.saliency))[0]
    importance = torch.stack([pool_to_patches(explanation.saliency[0], scorer), pool_to_patches(direction, scorer)], 1)
    return importance, int(sum(counts.values()))


def _gradcam_importance(model: nn.Module, inputs: torch.Tensor, target: int, layer: str,
                        scorer: PatchScorer) -> tuple[torch.Tensor, int]:
    """Grad-CAM at ``layer`` pooled to patches (one forward, a backward through the head)."""
    from explainers.cam import GradCAM

    explanation = GradCAM(model, layer).explain(inputs, target)
    return pool_to_patches(explanation.saliency[0], scorer), 1


def _occlusion_importance(scorer: PatchScorer, full_score: float) -> tuple[torch.Tensor, int]:
    """Drop of the target probability when each single patch is removed (one batch; the
    scorer counts these images itself)."""
    everything = (1 << scorer.patch_count) - 1
    keys = [everything & ~(1 << p) for p in range(scorer.patch_count)]
    scores = scorer.score(keys)
    return torch.tensor([full_score - scores[k] for k in keys]), 0


def patch_importance(model: nn.Module, inputs: torch.Tensor, target: int, ordering: str, layer: str | None,
                     scorer: PatchScorer, full_score: float) -> tuple[list[tuple[float, ...]], str, int]:
    """Per-patch importance (higher = tried first; a tuple: later entries break ties), the name
    of the ordering used and the images it evaluated outside the scorer.

    ``auto`` tries I-GOS, then Grad-CAM at ``layer``, then single-patch deletion; a method
    that cannot run (not installed, TorchScript model without hooks) passes to the next.
    """
    tries = {"auto": ["igos", "gradcam", "occlusion"], "igos": ["igos"], "gradcam": ["gradcam"],
             "occlusion": ["occlusion"]}.get(ordering)
    if tries is None:
        raise ExplainError("invalid_parameter", "ordering must be auto, igos, gradcam or occlusion")
    reasons = []
    for name in tries:
        try:
            if name == "igos":
                values, images = _igos_importance(model, inputs, target, scorer)
            elif name == "gradcam":
                if layer is None:
                    raise ExplainError("layer_unsupported", "no layer to run Grad-CAM at")
                values, images = _gradcam_importance(model, inputs, target, layer, scorer)
            else:
                values, images = _occlusion_importance(scorer, full_score)
        except (ImportError, AttributeError, TypeError, ExplainError) as exc:
            reasons.append(f"{name}: {exc}")
            continue
        rows = values.float().cpu().reshape(scorer.patch_count, -1).tolist()
        return [tuple(row) for row in rows], name, images
    raise ExplainError("ordering_unavailable", "no patch ordering could run: " + "; ".join(reasons))
