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

Each search step, minimisation round and graph level scores all its sets at once through the
execution's patch-set scorer (scores cached by patch set; how the forwards run, whole or
incremental, in which precision and runtime, is the execution's). The number of images and
batched forwards is part of the result.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from explainers.errors import ExplainError
from explainers.execution import Execution, PatchScorer
from explainers.method import Method, MethodConfig, Progress, Targets, no_progress
from explainers.patches import patches_of
from explainers.result import resolve_targets

Ordering = Literal["auto", "igos", "gradcam", "occlusion"]

# Coarse I-GOS used to order the patches (methods.md: 2 iterations, 20 steps, L1 1, TV 20); its
# Armijo trials are scored at the path's end point (the I-GOS paper), a forward each.
IGOS_ORDERING = {"iterations": 2, "steps": 20, "l1": 1.0, "tv": 20.0, "line_search_objective": "endpoint"}


class SAGConfig(MethodConfig):
    """Search and graph parameters; the defaults follow the paper's reference set-up."""

    grid: int = Field(7, ge=2, le=16, description="patches per side (crisp squares)")
    beam_width: int = Field(3, ge=1, le=50, description="states kept per search step")
    successors: int = Field(15, ge=1, le=256, description="most important unused patches proposed per state")
    threshold: float = Field(0.9, gt=0, le=1, description="a set suffices at this share of the full-image "
                             "probability")
    max_root_size: int = Field(12, ge=1, le=64, description="largest patch set the search grows")
    max_roots: int = Field(10, ge=1, le=50, description="the search stops after this many roots")
    overlap_limit: int = Field(1, ge=0, le=64, description="most patches two graph roots may share")
    graph_roots: int = Field(3, ge=1, le=10, description="roots the graph is drawn from")
    graph_threshold: float = Field(0.4, ge=0, le=1, description="a node is expanded while its probability is "
                                   "at least this share of the full-image probability")
    max_nodes: int = Field(100, ge=1, le=2000, description="bound on the graph's nodes")
    baseline: Literal["black", "blur"] = Field("black", description="what removed patches show")
    ordering: Ordering = Field("auto", description="patch ordering: auto = coarse I-GOS, else Grad-CAM, "
                               "else single-patch deletion")


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


def make_baseline(kind: str, inputs: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The normalised baseline image: black (pixel value 0) or a blurred copy of ``inputs``."""
    if kind == "black":
        return ((torch.zeros_like(inputs) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)).to(inputs.dtype)
    if kind == "blur":
        from explainers.baselines import make_baseline as shared_baseline

        return shared_baseline(inputs, "blur")[0]
    raise ExplainError("invalid_parameter", f"baseline must be 'black' or 'blur', not {kind!r}")


class SAG(Method):
    """Structured Attention Graph explainer for one classifier."""

    name = "sag"
    Config = SAGConfig
    result_kind = "graph"
    description = "Structured Attention Graph: minimal sufficient patch sets and their subsets"
    config: SAGConfig

    # -- entry point -----------------------------------------------------------------------
    def explain(self, inputs: torch.Tensor, targets: Targets = None, progress: Progress | None = None) -> SAGResult:
        """Roots and graph for one normalised image ``1 x 3 x H x W`` (target default top-1).

        ``progress(fraction, stage)`` is called after the ordering, each search step and each
        graph level; an exception it raises (a cancelled job) stops the search there.
        """
        if inputs.dim() != 4:
            raise ExplainError("invalid_input", "SAG explains one image at a time (1 x 3 x H x W)")
        if inputs.shape[0] != 1:
            raise ExplainError("invalid_parameter", f"SAG explains one image at a time (a batch of 1 x 3 x H x W), "
                               f"got a batch of {inputs.shape[0]}: explain the images one by one")
        cfg = self.config
        report = progress or no_progress
        timings: dict[str, float] = {}
        started = time.perf_counter()

        session = self.execution.session()
        logits = session.classify(inputs)
        target_index = int(resolve_targets(logits, targets)[0])
        full_score = float(logits.softmax(dim=-1)[0, target_index])
        mean = torch.tensor(self.normalization[0], device=inputs.device)
        std = torch.tensor(self.normalization[1], device=inputs.device)
        baseline = make_baseline(cfg.baseline, inputs, mean, std)
        scorer = session.patch_scorer(inputs, baseline, target_index, cfg.grid, full_score)
        probes = scorer.probe_images
        timings["setup"] = time.perf_counter() - started

        mark = time.perf_counter()
        importance, ordering, outside = patch_importance(self.execution, inputs, target_index, cfg.ordering,
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
            method=self.name, target=target_index, full_score=full_score, logits=logits,
            grid=cfg.grid, edges_y=scorer.edges_y, edges_x=scorer.edges_x, roots=roots, nodes=nodes,
            edges=edges, ordering=ordering, patch_order=order, truncated=truncated,
            details={
                "threshold": threshold,
                "graph_threshold": cfg.graph_threshold * full_score,
                "baseline": cfg.baseline,
                **scorer.facts(),  # precision, runtime, incremental
                "search_steps": steps,
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


def _igos_importance(execution: Execution, inputs: torch.Tensor, target: int,
                     scorer: PatchScorer) -> tuple[torch.Tensor, int]:
    """Coarse I-GOS deletion mask at grid resolution (I-GOS's own blurred baseline, as in the
    reference), pooled to patches, with its last descent direction as the tie-break (``P x 2``);
    also the number of images it evaluated. Raises when I-GOS is unavailable.

    The tie-break matters: two iterations from an all-ones mask often end with the Armijo
    search accepting no step, so the mask moves by its smallest trial step (~2e-5) and stays
    exactly 1 in float32 on some photos, which used to leave the patches in index order. The
    direction is what that step follows."""
    from explainers.igos import IGOS, IGOSConfig

    # the order hangs on rounding: the execution's rounding-sensitive view (on a CPU the loaded
    # network's own arithmetic) keeps it what the model as loaded gives
    config = IGOSConfig(mask_size=scorer.grid, **IGOS_ORDERING)
    explanation = IGOS(execution.rounding_sensitive(), config).explain(inputs, target)
    counts = explanation.details.get("images_evaluated", {})
    direction = explanation.details["directions"].get("mask", torch.zeros_like(explanation.saliency))[0]
    importance = torch.stack([pool_to_patches(explanation.saliency[0], scorer), pool_to_patches(direction, scorer)], 1)
    return importance, int(sum(counts.values()))


def _gradcam_importance(execution: Execution, inputs: torch.Tensor, target: int, layer: str,
                        scorer: PatchScorer) -> tuple[torch.Tensor, int]:
    """Grad-CAM at ``layer`` pooled to patches (one forward, a backward through the head)."""
    from explainers.cam import GradCAM

    explanation = GradCAM(execution, layer=layer).explain(inputs, target)
    return pool_to_patches(explanation.saliency[0], scorer), 1


def _occlusion_importance(scorer: PatchScorer, full_score: float) -> tuple[torch.Tensor, int]:
    """Drop of the target probability when each single patch is removed (one batch; the
    scorer counts these images itself)."""
    everything = (1 << scorer.patch_count) - 1
    keys = [everything & ~(1 << p) for p in range(scorer.patch_count)]
    scores = scorer.score(keys)
    return torch.tensor([full_score - scores[k] for k in keys]), 0


def patch_importance(execution: Execution, inputs: torch.Tensor, target: int, ordering: str, layer: str | None,
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
                values, images = _igos_importance(execution, inputs, target, scorer)
            elif name == "gradcam":
                if layer is None:
                    raise ExplainError("layer_unsupported", "no layer to run Grad-CAM at")
                values, images = _gradcam_importance(execution, inputs, target, layer, scorer)
            else:
                values, images = _occlusion_importance(scorer, full_score)
        except (ImportError, AttributeError, TypeError, ExplainError) as exc:
            reasons.append(f"{name}: {exc}")
            continue
        rows = values.float().cpu().reshape(scorer.patch_count, -1).tolist()
        return [tuple(row) for row in rows], name, images
    raise ExplainError("ordering_unavailable", "no patch ordering could run: " + "; ".join(reasons))
