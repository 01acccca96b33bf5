"""I-GOS (Qi, Khorram, Li, AAAI 2020) and I-GOS++ (Khorram et al., ACM CHIL 2021).

Both optimise a low-resolution mask ``M`` in [0, 1] where a **low value means salient**:
``phi(I, B, M) = I * up(M) + B * (1 - up(M))`` keeps the image where ``M`` is high and shows the
blurred baseline ``B`` where it is low. The descent direction is an integrated gradient: the
target's softmax probability is averaged over the path images ``phi(I, B, t_k * up(M))`` with
``t_k = k / n`` (k = 1..n), each with fresh seeded Gaussian noise in normalised space, and
differentiated with respect to ``M``.

* I-GOS minimises ``deletion + L1 * mean|1 - M| + TV * TV(M)`` (TV at mask resolution).
* I-GOS++ keeps a deletion mask ``M_d`` and an insertion mask ``M_i`` (both start at 1); the
  answer is ``M = M_d * M_i``. Per iteration four integrated terms: deletion on the product,
  insertion (``phi(B, I, t * up(M))``, maximised) on the product, deletion on ``M_d`` alone and
  insertion on ``M_i`` alone, halved; plus ``L1 * mean|1 - M| + L2 * BTV(M)`` on the product,
  where the bilateral TV adds an image-resolution TV of ``up(M)`` weighted by
  ``exp(-||dI||^2 / sigma)`` (colour channels averaged the same way in both directions).

Steps: Armijo backtracking (start 1000, shrink 0.2, sufficient decrease 1e-4, clamped
candidates, a capped number of trials evaluated a few at a time in one batched forward), or
Nesterov momentum ``i / (i + 3)`` with a fixed step. Speed by design: every path image of every
term of an iteration goes through one batched forward + backward (split into chunks of
images only to bound memory), the gradient reaches the masks through the cheap up-sampling
only once per iteration, and no autograd graph outlives an iteration. How the network runs
(variant, precision, chunk sizes) is the execution's; masks, scores and the regulariser stay
float32.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from explainers.baselines import BaselineKind, make_baseline
from explainers.errors import ExplainError
from explainers.execution import Session
from explainers.method import Method, MethodConfig, Progress, Targets
from explainers.result import Explanation, normalize_maps, resolve_targets

# A term of the objective: which mask it reads, the path direction and its weight.
_DELETION, _INSERTION = 0, 1


class IGOSConfig(MethodConfig):
    """Parameters of I-GOS (defaults: the I-GOS paper's demo; :class:`IGOSPlusPlusConfig` has
    I-GOS++'s).

    ``line_search_objective``: ``integrated`` evaluates each Armijo candidate on the same noisy
    path images as the gradient (the I-GOS++ reference; ``n`` forwards per term and trial);
    ``endpoint`` evaluates it at ``t = 1`` without noise (the I-GOS paper; one forward per term
    and trial), far cheaper. ``line_search_noise`` (integrated objective only): ``shared``
    scores the candidates on the gradient's own noisy path images; ``fresh`` (the I-GOS++
    reference) draws new noise, from the same seeded generator, for the current point and for
    every batch of candidates, at the price of one more set of path images per iteration.
    ``warm_start`` begins each iteration's backtracking at the previous accepted step divided
    by ``backtrack`` (capped at ``step_size``) instead of at ``step_size``, saving most trials
    once the step size has settled.
    """

    mask_size: int = Field(28, ge=1, le=1024, description="mask side in cells (at most the model's input size)")
    iterations: int = Field(15, ge=1, le=200)
    steps: int = Field(20, ge=1, le=100, description="integration steps along the path (t_k = k / n)")
    l1: float = Field(1.0, ge=0, le=1e3)
    tv: float = Field(20.0, ge=0, le=1e4, description="TV coefficient (bilateral TV for igos++)")
    bilateral_tv: bool = Field(False, description="TV of the up-sampled mask weighted by image edges, "
                               "averaged with the mask-resolution TV (I-GOS++)")
    bilateral_sigma: float = Field(0.01, gt=0, le=10)
    noise: float = Field(0.2, ge=0, le=5, description="std of the Gaussian noise added per step (normalised space)")
    baseline: BaselineKind = Field("blur", description="what a removed pixel shows: the blurred image or the "
                                   "dataset's mean colour")
    optimizer: Literal["line_search", "nesterov"] = "line_search"
    step_size: float = Field(1000.0, gt=0, le=1e6, description="first Armijo trial / fixed Nesterov step")
    armijo: float = Field(1e-4, ge=0, le=1, description="sufficient-decrease constant")
    backtrack: float = Field(0.2, gt=0, lt=1, description="factor between successive Armijo trials")
    min_step: float = Field(1e-5, ge=0, le=1e6, description="smallest Armijo trial")
    max_trials: int = Field(12, ge=1, le=30, description="cap on line-search trials per iteration")
    line_search_objective: Literal["integrated", "endpoint"] = "integrated"
    line_search_noise: Literal["shared", "fresh"] = "shared"
    warm_start: bool = False
    seed: int = Field(0, ge=0, le=2**31 - 1)

    @classmethod
    def cpu_preset(cls, **overrides: Any) -> "IGOSConfig":
        """A preset for a small CPU: 8 iterations of 5 steps with warm-started line searches
        (the mask size costs nothing, so it stays 28). Trade-off: a noisier integrated gradient
        and fewer descent steps, so the mask is less converged than at the reference settings."""
        return cls(**{"iterations": 8, "steps": 5, "warm_start": True, **overrides})


class IGOSPlusPlusConfig(IGOSConfig):
    """Parameters of I-GOS++: the reference as its main script actually runs (20 iterations of
    15 steps, L1 1, bilateral TV 20, mask 28)."""

    iterations: int = Field(20, ge=1, le=200)
    steps: int = Field(15, ge=1, le=100, description="integration steps along the path (t_k = k / n)")
    bilateral_tv: bool = Field(True, description="TV of the up-sampled mask weighted by image edges, "
                               "averaged with the mask-resolution TV (I-GOS++)")


def _tv(masks: torch.Tensor) -> torch.Tensor:
    """Per-image TV (beta = 2): mean squared difference along rows plus along columns."""
    rows = (masks[..., 1:, :] - masks[..., :-1, :]).pow(2).flatten(1).mean(1)
    cols = (masks[..., :, 1:] - masks[..., :, :-1]).pow(2).flatten(1).mean(1)
    return rows + cols


def edge_weights(inputs: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilateral weights ``exp(-mean_c(dI^2) / sigma)`` between vertical and horizontal pixel
    neighbours of the normalised image (channels averaged identically in both directions)."""
    rows = (inputs[..., 1:, :] - inputs[..., :-1, :]).pow(2).mean(1, keepdim=True)
    cols = (inputs[..., :, 1:] - inputs[..., :, :-1]).pow(2).mean(1, keepdim=True)
    return torch.exp(-rows / sigma), torch.exp(-cols / sigma)


def _bilateral_tv(up: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    rows = (up[..., 1:, :] - up[..., :-1, :]).pow(2).mul(weights[0]).flatten(1).mean(1)
    cols = (up[..., :, 1:] - up[..., :, :-1]).pow(2).mul(weights[1]).flatten(1).mean(1)
    return rows + cols


def _runs(start: int, stop: int, length: int) -> list[tuple[int, int, int]]:
    """Split entries ``start..stop-1`` into runs of ``length`` consecutive entries (run ``k``
    holds entries ``k * length .. (k + 1) * length - 1``): ``(k, first, last)`` with offsets
    relative to ``start``."""
    runs = []
    for run in range(start // length, (stop - 1) // length + 1):
        first, last = max(start, run * length), min(stop, (run + 1) * length)
        runs.append((run, first - start, last - start))
    return runs


class _MaskSearch(Method):
    """The shared optimiser; subclasses say which masks and terms exist."""

    name: ClassVar[str] = "igos"
    Config = IGOSConfig
    result_kind = "mask"
    config: IGOSConfig
    num_masks: ClassVar[int] = 1
    # weight of the integrated terms in the objective the line search tests, relative to the
    # weights in ``_terms`` (which shape the descent direction)
    search_term_scale: ClassVar[float] = 1.0
    # factor on the TV terms (the I-GOS++ paper's bilateral TV averages its two parts)
    tv_scale: ClassVar[float] = 1.0

    # -- the pieces subclasses define -------------------------------------------------------
    def _terms(self) -> list[tuple[int, int, float]]:
        """(mask index, direction, weight) per term; mask index ``-1`` = product of all masks."""
        raise NotImplementedError

    # -- helpers ---------------------------------------------------------------------------
    def _upsample(self, masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(masks.shape[-2:]) == tuple(size):
            return masks
        return F.interpolate(masks, size=size, mode="bilinear", align_corners=False)

    def _term_masks(self, masks: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """``T x B x 1 x H x W`` up-sampled mask read by each term."""
        ups = [self._upsample(m, size) for m in masks]
        product = ups[0]
        for up in ups[1:]:
            product = product * up
        return torch.stack([product if index < 0 else ups[index] for index, _, _ in self._terms()])

    def _regulariser(self, masks: list[torch.Tensor], inputs: torch.Tensor,
                     weights: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """Per-image ``L1 * mean|1 - M| + TV * (TV(M) [+ BTV(up(M))])`` on the product mask."""
        product = masks[0]
        for mask in masks[1:]:
            product = product * mask
        tv = self.config.tv * self.tv_scale
        value = self.config.l1 * (1 - product).abs().flatten(1).mean(1) + tv * _tv(product)
        if weights is not None:
            up = self._upsample(product, tuple(inputs.shape[-2:]))
            value = value + tv * _bilateral_tv(up, weights)
        return value

    def _path_scores(self, session: Session, term_masks: torch.Tensor, inputs: torch.Tensor, base: torch.Tensor,
                     targets: torch.Tensor, times: torch.Tensor, noise: torch.Tensor | None, max_batch: int,
                     grad_of: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weighted score sum per (candidate, image) over all terms and path points.

        ``term_masks`` is ``C x T x B x 1 x H x W`` (C candidates); ``times`` the ``n`` path
        positions; ``noise`` ``T x n x B x 3 x H x W`` or None. With ``grad_of`` (C must be 1)
        also returns d value / d term_masks, accumulated chunk by chunk so that memory stays
        bounded while the forward + backward stay batched.
        """
        cands, terms, batch = term_masks.shape[:3]
        steps = times.numel()
        spec = self._terms()
        directions = torch.tensor([d for _, d, _ in spec], device=inputs.device)
        weights = torch.tensor([w for _, _, w in spec], device=inputs.device, dtype=torch.float32) / steps
        diff = inputs - base
        total = cands * terms * steps
        per_chunk = max(1, max_batch // batch)
        values = torch.zeros(cands, batch, device=inputs.device)
        grad = torch.zeros_like(term_masks) if grad_of is not None else None
        for start in range(0, total, per_chunk):
            entry = torch.arange(start, min(start + per_chunk, total), device=inputs.device)
            cand, term, step = entry // (terms * steps), (entry // steps) % terms, entry % steps
            source = term_masks if grad_of is None else grad_of
            leaf = source[cand, term]  # c x B x 1 x H x W
            if grad_of is not None:
                leaf = leaf.detach().requires_grad_(True)
            scaled = leaf * times[step].view(-1, 1, 1, 1, 1)
            deleting = (directions[term] == _DELETION).view(-1, 1, 1, 1, 1)
            # deletion: B + m (I - B) = phi(I, B, m); insertion: I - m (I - B) = phi(B, I, m)
            images = torch.where(deleting, base.unsqueeze(0) + scaled * diff, inputs.unsqueeze(0) - scaled * diff)
            if noise is not None:
                images = images + noise[term, step]
            with torch.set_grad_enabled(grad_of is not None):
                probs = session.probabilities(images.flatten(0, 1), targets.repeat(len(entry)),
                                              gradient=grad_of is not None)
                contribution = probs.view(len(entry), batch) * weights[term][:, None]
                if grad_of is not None:
                    (g,) = torch.autograd.grad(contribution.sum(), leaf)
            # entries are consecutive, so each (candidate, term) is a contiguous run: summing runs
            # in a fixed order keeps seeded runs bit-identical (index_put_ / index_add_ with
            # repeated indices accumulate in thread order on a multi-core CPU and on CUDA)
            for run, first, last in _runs(start, start + len(entry), steps):
                cand_index, term_index = divmod(run, terms)
                values[cand_index] += contribution[first:last].detach().sum(0)
                if grad is not None:
                    grad[cand_index, term_index] += g[first:last].sum(0)
        return values, grad

    # -- the optimisation ----------------------------------------------------------------------
    def explain(self, inputs: torch.Tensor, targets: Targets = None, progress: Progress | None = None, *,
                baseline: torch.Tensor | None = None) -> Explanation:
        """Optimise the masks for a normalised batch; ``saliency = normalise(1 - M)``.

        ``progress(fraction, stage)`` is called after every iteration (an exception raised there,
        e.g. a job cancellation, stops the search). ``baseline`` replaces the configured one.
        ``details`` hold the raw mask(s), the baseline description, per-iteration objective and
        step sizes, and the counts of images evaluated.
        """
        cfg = self.config
        session = self.execution.session()
        device = inputs.device
        inputs = inputs.detach().float()
        batch, _, height, width = inputs.shape
        if cfg.mask_size > min(height, width):
            raise ExplainError("invalid_parameter", f"mask_size {cfg.mask_size} exceeds the input size {min(height, width)}")
        max_batch, backward_batch = session.images_per_forward(), session.images_per_backward()
        trials_per_batch = min(session.trials_per_forward(), cfg.max_trials)
        logits = session.classify(inputs)
        target_idx = resolve_targets(logits, targets)
        if baseline is None:
            base, base_info = make_baseline(inputs, cfg.baseline)
        else:
            base, base_info = baseline.detach().float(), {"kind": "given"}
        size = (height, width)
        edge = edge_weights(inputs, cfg.bilateral_sigma) if cfg.bilateral_tv else None
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
        times = torch.arange(1, cfg.steps + 1, device=device, dtype=torch.float32) / cfg.steps
        endpoint = torch.ones(1, device=device)
        terms = len(self._terms())
        masks = [torch.ones(batch, 1, cfg.mask_size, cfg.mask_size, device=device) for _ in range(self.num_masks)]
        previous = [m.clone() for m in masks]
        history_value, history_step = [], []
        direction: list[torch.Tensor] = []
        counts = {"forward_backward": 0, "forward": 0}

        for iteration in range(cfg.iterations):
            if cfg.optimizer == "nesterov":
                momentum = iteration / (iteration + 3)
                point = [(m + momentum * (m - p)).clamp_(0, 1) for m, p in zip(masks, previous)]
            else:
                point = masks
            noise = None
            if cfg.noise > 0:
                noise = torch.randn((terms, cfg.steps, batch, 3, height, width), generator=generator,
                                    device=device).mul_(cfg.noise)
            leaves = [m.detach().requires_grad_(True) for m in point]
            with torch.enable_grad():
                term_masks = self._term_masks(leaves, size)
                values, grad_terms = self._path_scores(session, term_masks.detach()[None], inputs, base, target_idx,
                                                       times, noise, backward_batch, grad_of=term_masks.detach()[None])
                regular = self._regulariser(leaves, inputs, edge)
                objective = self.search_term_scale * values[0] + regular
                surrogate = (term_masks * grad_terms[0]).sum() + regular.sum()
                grads = torch.autograd.grad(surrogate, leaves)
            counts["forward_backward"] += terms * cfg.steps * batch
            if cfg.optimizer == "nesterov":
                step = torch.full((batch,), cfg.step_size, device=device)
                previous = masks
            else:
                start_step = cfg.step_size
                if cfg.warm_start and history_step:
                    start_step = min(cfg.step_size, float(history_step[-1].max()) / cfg.backtrack)
                step, used = self._line_search(session, point, grads, objective, inputs, base, target_idx, times,
                                               noise, edge, max_batch, trials_per_batch, endpoint, start_step,
                                               generator)
                counts["forward"] += used
            masks = [(p.detach() - step.view(-1, 1, 1, 1) * g).clamp_(0, 1) for p, g in zip(point, grads)]
            direction = [g.detach() for g in grads]
            history_value.append(objective.detach())
            history_step.append(step)
            del leaves, term_masks, grad_terms, grads, noise
            if progress is not None:
                progress((iteration + 1) / cfg.iterations, f"iteration {iteration + 1}/{cfg.iterations}")

        final = masks[0]
        for mask in masks[1:]:
            final = final * mask
        final = final[:, 0]
        details = {
            "mask": final,
            "masks": {name: m[:, 0] for name, m in zip(self._mask_names(), masks)},
            # the last iteration's descent direction per mask (d objective / d mask; positive =
            # lowering the mask helps): what a tiny step moves the mask along
            "directions": {name: g[:, 0] for name, g in zip(self._mask_names(), direction)},
            "baseline": base_info,
            "config": cfg.model_dump(),
            "objective": torch.stack(history_value, dim=1) if history_value else torch.empty(batch, 0),
            "step_sizes": torch.stack(history_step, dim=1) if history_step else torch.empty(batch, 0),
            "images_evaluated": counts,
            "precision": session.ran("path_gradients").get("precision", "fp32"),
            # what ran the forward-only images (line-search trials); gradients run in PyTorch
            "forward_runtime": session.ran("path_scores").get("runtime", "torch"),
        }
        return Explanation(self.name, normalize_maps(1 - final), logits, target_idx, None, details)

    def _mask_names(self) -> list[str]:
        return ["mask"]

    def _line_search(self, session: Session, point: list[torch.Tensor], grads: tuple[torch.Tensor, ...],
                     objective: torch.Tensor, inputs: torch.Tensor, base: torch.Tensor, targets: torch.Tensor,
                     times: torch.Tensor, noise: torch.Tensor | None,
                     edge: tuple[torch.Tensor, torch.Tensor] | None, max_batch: int, per_batch: int,
                     endpoint: torch.Tensor, start_step: float,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
        """Armijo backtracking per image: the largest ``s = alpha * beta^j`` (j < max_trials)
        with ``F(M_s) <= F(M) - c * g . (M - M_s)`` where ``M_s = clamp(M - s g)`` (the projected
        form of ``c * s * ||g||^2``: components pushed against a bound promise no decrease).
        Candidates go through the network ``per_batch`` at a time (a fixed number, so that the
        network sees few batch shapes). Without an accepted step the smallest tried one is used.
        With ``line_search_noise="fresh"`` the current point and every batch of candidates are
        scored on new noise drawn from ``generator``."""
        cfg = self.config
        batch = inputs.shape[0]
        size = tuple(inputs.shape[-2:])
        integrated = cfg.line_search_objective == "integrated"
        path_times, path_noise = (times, noise) if integrated else (endpoint, None)
        fresh = path_noise is not None and cfg.line_search_noise == "fresh"

        def draw() -> torch.Tensor:
            return torch.randn(noise.shape, generator=generator, device=inputs.device).mul_(cfg.noise)
        trials = [start_step * cfg.backtrack ** j for j in range(cfg.max_trials)]
        trials = [s for s in trials if s >= cfg.min_step] or trials[:1]
        chosen = torch.full((batch,), trials[-1], device=inputs.device)
        settled = torch.zeros(batch, dtype=torch.bool, device=inputs.device)
        used = 0
        with torch.no_grad():
            reference = objective.detach()
            if not integrated or fresh:  # F(M) without the gradient's noise needs its own forwards
                current = self._term_masks(point, size)[None]
                values, _ = self._path_scores(session, current, inputs, base, targets, path_times,
                                              draw() if fresh else None, max_batch)
                reference = self.search_term_scale * values[0] + self._regulariser(point, inputs, edge)
                used += len(self._terms()) * path_times.numel() * batch
            active = torch.arange(batch, device=inputs.device)
            for start in range(0, len(trials), per_batch):
                # only images still searching go through the network
                pick = (lambda t: t) if start == 0 else (lambda t: t[active])
                sub_point, sub_grads = [pick(p) for p in point], [pick(g) for g in grads]
                sub_edge = None if edge is None else (pick(edge[0]), pick(edge[1]))
                if fresh:
                    path_noise = draw()
                sub_noise = None if path_noise is None else (path_noise if start == 0 else path_noise[:, :, active])
                steps = torch.tensor(trials[start:start + per_batch], device=inputs.device)
                candidates = [[(p - s * g).clamp(0, 1) for p, g in zip(sub_point, sub_grads)] for s in steps.tolist()]
                stacked = torch.stack([self._term_masks(c, size) for c in candidates])
                values, _ = self._path_scores(session, stacked, pick(inputs), pick(base), pick(targets), path_times,
                                              sub_noise, max_batch)
                used += stacked.shape[0] * stacked.shape[1] * path_times.numel() * len(active)
                regular = torch.stack([self._regulariser(c, pick(inputs), sub_edge) for c in candidates])
                # projected Armijo: the decrease promised by the step actually taken after clamping
                promised = torch.stack([sum(((p - q) * g).flatten(1).sum(1) for p, q, g in zip(sub_point, c, sub_grads))
                                        for c in candidates])
                accepted = (self.search_term_scale * values + regular) <= pick(reference) - cfg.armijo * promised
                first = torch.where(accepted.any(0), accepted.float().argmax(0), -1)
                take = first >= 0
                chosen[active] = torch.where(take, steps[first.clamp_min(0)], chosen[active])
                settled[active] = take
                active = (~settled).nonzero().squeeze(1)  # one host sync per batch of candidates
                if active.numel() == 0:
                    break
        return chosen, used


class IGOS(_MaskSearch):
    """I-GOS: one deletion mask, integrated deletion gradient, L1 + TV."""

    name = "igos"
    num_masks = 1
    description = "I-GOS (Qi et al., AAAI 2020): integrated-gradient mask optimisation"

    def _terms(self) -> list[tuple[int, int, float]]:
        return [(0, _DELETION, 1.0)]


class IGOSPlusPlus(_MaskSearch):
    """I-GOS++: deletion and insertion masks; the answer is their product."""

    name = "igos++"
    Config = IGOSPlusPlusConfig
    num_masks = 2
    description = "I-GOS++ (Khorram et al., CHIL 2021): deletion x insertion masks, bilateral TV"
    # The reference's balance (iGOS++ paper, CHIL 2021): the descent direction halves the summed
    # gradient of the four terms, while the step is judged on their unhalved sum; its bilateral
    # TV is the mean of the mask-resolution and image-resolution parts.
    search_term_scale = 2.0
    tv_scale = 0.5

    def _terms(self) -> list[tuple[int, int, float]]:
        # deletion and insertion on the product, deletion on M_d, insertion on M_i; halved
        return [(-1, _DELETION, 0.5), (-1, _INSERTION, -0.5), (0, _DELETION, 0.5), (1, _INSERTION, -0.5)]

    def _mask_names(self) -> list[str]:
        return ["deletion", "insertion"]


__all__ = ["IGOS", "IGOSConfig", "IGOSPlusPlus", "IGOSPlusPlusConfig", "edge_weights"]
