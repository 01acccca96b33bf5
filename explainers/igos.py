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
``max_batch`` images only to bound memory), the gradient reaches the masks through the cheap
up-sampling only once per iteration, no autograd graph outlives an iteration, and on CUDA the
network runs in bfloat16 autocast on a copy with batch norm folded into the convolutions (masks,
scores and the regulariser stay float32).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from typing import Callable, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from explainers.baselines import BaselineKind, make_baseline
from explainers.batching import images_per_backward, images_per_forward
from explainers.errors import ExplainError
from explainers.fastpath import compiled_network, network_for, scoring_forward
from explainers.onnx_cpu import CpuRuntime, runtime_of
from explainers.result import Explanation, normalize_maps, resolve_targets

ProgressCallback = Callable[[int, int], None]

# A term of the objective: which mask it reads, the path direction and its weight.
_DELETION, _INSERTION = 0, 1
# Loss scale for float16 backward passes: the weighted probabilities' gradients reach ~1e-6 at
# the logits, near float16's subnormal range; 2^10 keeps them representable with ample headroom.
_FLOAT16_GRAD_SCALE = 1024.0


@dataclass(frozen=True)
class IGOSConfig:
    """Parameters of I-GOS / I-GOS++ (defaults: the I-GOS paper's demo; see ``for_method``).

    ``line_search_objective``: ``integrated`` evaluates each Armijo candidate on the same noisy
    path images as the gradient (the I-GOS++ reference; ``n`` forwards per term and trial);
    ``endpoint`` evaluates it at ``t = 1`` without noise (the I-GOS paper; one forward per term
    and trial), far cheaper on a CPU. ``line_search_noise`` (integrated objective only):
    ``shared`` scores the candidates on the gradient's own noisy path images; ``fresh`` (the
    I-GOS++ reference) draws new noise, from the same seeded generator, for the current point
    and for every batch of candidates, at the price of one more set of path images per
    iteration. ``warm_start`` begins each iteration's backtracking at
    the previous accepted step divided by ``backtrack`` (capped at ``step_size``) instead of at
    ``step_size``, saving most trials once the step size has settled.

    ``network``: ``as_loaded`` scores path images on the network as loaded; ``lean`` on the copy
    with batch norm folded into the convolutions (:mod:`explainers.lean`, a fifth less work);
    ``auto`` (the default) is ``lean``, fed channels-last images, on every device: I-GOS++ on an
    H200 0.72 instead of 0.90 s per image (`bench.igos_variants`), the CPU preset on the 2-core
    CPU 12.1 instead of 21.6 s (chelsea, same process, 2026-11-26). In float32 the accept /
    reject steps turn folding's ~1e-6 rounding into a visibly different (equally converged)
    mask than the network as loaded gives; a seeded run still repeats exactly.
    ``as_loaded`` keeps the network's arithmetic and, on a CPU, the NCHW layout (there a copy
    whose layers are swapped for less memory traffic, :mod:`explainers.lean_layers`, logits
    bit-identical; SAG's coarse ordering about a tenth faster over 14 photos, the same orders).
    ``cpu_runtime``: with the lean network on a CPU in float32, the forward-only images (line
    search trials) run in ONNX Runtime when it is wanted and installed
    (:func:`explainers.fastpath.scoring_forward`); path images that need gradients stay on
    PyTorch. ``compile`` (CUDA only): the network through
    ``torch.compile``, compiled once per batch shape and cached per network (I-GOS++ on an
    H200, compiling the network as loaded: 0.83 -> 0.57 s per image; about 35 s for the first
    job's shapes).
    """

    mask_size: int = 28
    iterations: int = 15
    steps: int = 20
    l1: float = 1.0
    tv: float = 20.0
    bilateral_tv: bool = False
    bilateral_sigma: float = 0.01
    noise: float = 0.2
    baseline: BaselineKind = "blur"
    optimizer: Literal["line_search", "nesterov"] = "line_search"
    step_size: float = 1000.0
    armijo: float = 1e-4
    backtrack: float = 0.2
    min_step: float = 1e-5
    max_trials: int = 12
    trials_per_batch: int | None = None  # None: 4 on CUDA, 1 on CPU (compute is linear there)
    line_search_objective: Literal["integrated", "endpoint"] = "integrated"
    line_search_noise: Literal["shared", "fresh"] = "shared"
    warm_start: bool = False  # start backtracking at the last accepted step / backtrack
    max_batch: int | None = None  # images per forward (and forward + backward); None: the device's defaults (explainers.batching)
    precision: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    network: Literal["auto", "as_loaded", "lean"] = "auto"
    cpu_runtime: CpuRuntime = "auto"  # forward-only scoring on a CPU with a lean network (workers: UNBOX_CPU_RUNTIME)
    compile: bool = False  # torch.compile the network on CUDA (workers: UNBOX_FAST_COMPILE)
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "mask_size": self.mask_size >= 1, "iterations": self.iterations >= 0, "steps": self.steps >= 1,
            "l1": self.l1 >= 0, "tv": self.tv >= 0, "noise": self.noise >= 0, "step_size": self.step_size > 0,
            "backtrack": 0 < self.backtrack < 1, "max_trials": self.max_trials >= 1,
            "bilateral_sigma": self.bilateral_sigma > 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ExplainError("invalid_params", f"invalid I-GOS parameters: {', '.join(bad)}")

    @classmethod
    def for_method(cls, method: str, **overrides: object) -> "IGOSConfig":
        """The papers' defaults for ``igos`` or ``igos++`` (the I-GOS++ reference as its main
        script actually runs: 20 iterations of 15 steps, L1 1, bilateral TV 20, mask 28)."""
        if method == "igos":
            base = cls()
        elif method == "igos++":
            base = cls(iterations=20, steps=15, l1=1.0, tv=20.0, bilateral_tv=True)
        else:
            raise ExplainError("unknown_method", f"unknown I-GOS variant {method!r}")
        return replace(base, **overrides)  # type: ignore[arg-type]

    @classmethod
    def cpu_preset(cls, method: str, **overrides: object) -> "IGOSConfig":
        """A preset for a small CPU: 8 iterations of 5 steps with warm-started line searches
        (the mask size costs nothing, so it stays 28). Trade-off: a noisier integrated gradient
        and fewer descent steps, so the mask is less converged than at the reference settings."""
        preset = dict(iterations=8, steps=5, warm_start=True)
        return cls.for_method(method, **{**preset, **overrides})


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


class _MaskSearch:
    """The shared optimiser; subclasses say which masks and terms exist."""

    method: ClassVar[str] = "igos"
    num_masks: ClassVar[int] = 1
    # weight of the integrated terms in the objective the line search tests, relative to the
    # weights in ``_terms`` (which shape the descent direction)
    search_term_scale: ClassVar[float] = 1.0
    # factor on the TV terms (the I-GOS++ paper's bilateral TV averages its two parts)
    tv_scale: ClassVar[float] = 1.0

    def __init__(self, model: nn.Module, config: IGOSConfig | None = None) -> None:
        self.model = model
        self.config = config or IGOSConfig.for_method(self.method)

    # -- the pieces subclasses define -------------------------------------------------------
    def _terms(self) -> list[tuple[int, int, float]]:
        """(mask index, direction, weight) per term; mask index ``-1`` = product of all masks."""
        raise NotImplementedError

    # -- helpers ---------------------------------------------------------------------------
    def _settings(self, device: torch.device) -> tuple[int, int, torch.dtype | None]:
        cuda = device.type == "cuda"
        max_batch = images_per_forward(device, self.config.max_batch)
        trials = self.config.trials_per_batch or (4 if cuda else 1)
        precision = self.config.precision
        dtype = None
        if cuda and precision in ("auto", "bfloat16"):
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        elif cuda and precision == "float16":
            dtype = torch.float16
        return max_batch, min(trials, self.config.max_trials), dtype

    def _network(self, images: torch.Tensor, dtype: torch.dtype | None) -> Callable[[torch.Tensor], torch.Tensor]:
        """The network path images go through (see ``IGOSConfig.network``)."""
        choice = self.config.network
        lean = choice in ("lean", "auto")
        if lean and dtype is None and not torch.is_grad_enabled() and not images.is_cuda:
            scoring = scoring_forward(self.model, images, self.config.cpu_runtime)
            self.forward_runtime = runtime_of(scoring)
            return scoring
        network = network_for(self.model, images, lean=lean)
        if self.config.compile and images.is_cuda:
            return compiled_network(network)
        return network

    def _probabilities(self, images: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        """Softmax probability of each image's target (float32)."""
        precision = nullcontext() if dtype is None else torch.autocast(device_type=images.device.type, dtype=dtype)
        network = self._network(images, dtype)
        # the lean copy and CUDA's private copies (compiled or not) run channels-last; the CPU's
        # copy with the loaded network's arithmetic keeps its layout (NCHW), so results stay
        as_loaded_on_cpu = self.config.network == "as_loaded" and not images.is_cuda
        if isinstance(network, nn.Module) and network is not self.model and not as_loaded_on_cpu:
            images = images.contiguous(memory_format=torch.channels_last)
        with precision:
            logits = network(images)
        return logits.float().softmax(dim=1).gather(1, targets[:, None])[:, 0]

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

    def _path_scores(self, term_masks: torch.Tensor, inputs: torch.Tensor, base: torch.Tensor,
                     targets: torch.Tensor, times: torch.Tensor, noise: torch.Tensor | None,
                     dtype: torch.dtype | None, max_batch: int,
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
                probs = self._probabilities(images.flatten(0, 1), targets.repeat(len(entry)), dtype)
                contribution = probs.view(len(entry), batch) * weights[term][:, None]
                if grad_of is not None:
                    # float16 back-propagation: a fixed scale keeps small gradients above underflow
                    scale = _FLOAT16_GRAD_SCALE if dtype == torch.float16 else 1.0
                    (g,) = torch.autograd.grad(contribution.sum() * scale, leaf)
                    if scale != 1.0:
                        g = g / scale
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
    def explain(self, inputs: torch.Tensor, targets: int | list[int] | torch.Tensor | None = None,
                progress: ProgressCallback | None = None, baseline: torch.Tensor | None = None) -> Explanation:
        """Optimise the masks for a normalised batch; ``saliency = normalise(1 - M)``.

        ``progress(done, total)`` is called after every iteration (an exception raised there,
        e.g. a job cancellation, stops the search). ``details`` hold the raw mask(s), the
        baseline description, per-iteration objective and step sizes, and the counts of images
        evaluated.
        """
        cfg = self.config
        self.forward_runtime = "torch"  # what ran this run's forward-only images (line search)
        device = inputs.device
        inputs = inputs.detach().float()
        batch, _, height, width = inputs.shape
        if cfg.mask_size > min(height, width):
            raise ExplainError("invalid_params", f"mask_size {cfg.mask_size} exceeds the input size {min(height, width)}")
        max_batch, trials_per_batch, dtype = self._settings(device)
        backward_batch = images_per_backward(device, self.config.max_batch)
        with torch.no_grad():
            logits = self.model(inputs).float()
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
                values, grad_terms = self._path_scores(term_masks.detach()[None], inputs, base, target_idx, times,
                                                       noise, dtype, backward_batch,
                                                       grad_of=term_masks.detach()[None])
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
                step, used = self._line_search(point, grads, objective, inputs, base, target_idx, times, noise,
                                               edge, dtype, max_batch, trials_per_batch, endpoint, start_step,
                                               generator)
                counts["forward"] += used
            masks = [(p.detach() - step.view(-1, 1, 1, 1) * g).clamp_(0, 1) for p, g in zip(point, grads)]
            direction = [g.detach() for g in grads]
            history_value.append(objective.detach())
            history_step.append(step)
            del leaves, term_masks, grad_terms, grads, noise
            if progress is not None:
                progress(iteration + 1, cfg.iterations)

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
            "config": asdict(cfg),
            "objective": torch.stack(history_value, dim=1) if history_value else torch.empty(batch, 0),
            "step_sizes": torch.stack(history_step, dim=1) if history_step else torch.empty(batch, 0),
            "images_evaluated": counts,
            "precision": str(dtype).replace("torch.", "") if dtype is not None else "float32",
            "forward_runtime": self.forward_runtime,  # of the forward-only images; gradients: torch
        }
        return Explanation(self.method, normalize_maps(1 - final), logits, target_idx, None, details)

    def _mask_names(self) -> list[str]:
        return ["mask"]

    def _line_search(self, point: list[torch.Tensor], grads: tuple[torch.Tensor, ...], objective: torch.Tensor,
                     inputs: torch.Tensor, base: torch.Tensor, targets: torch.Tensor, times: torch.Tensor,
                     noise: torch.Tensor | None, edge: tuple[torch.Tensor, torch.Tensor] | None,
                     dtype: torch.dtype | None, max_batch: int, per_batch: int,
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
                values, _ = self._path_scores(current, inputs, base, targets, path_times,
                                              draw() if fresh else None, dtype, max_batch)
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
                values, _ = self._path_scores(stacked, pick(inputs), pick(base), pick(targets), path_times, sub_noise,
                                              dtype, max_batch)
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

    method = "igos"
    num_masks = 1

    def _terms(self) -> list[tuple[int, int, float]]:
        return [(0, _DELETION, 1.0)]


class IGOSPlusPlus(_MaskSearch):
    """I-GOS++: deletion and insertion masks; the answer is their product."""

    method = "igos++"
    num_masks = 2
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


EXPLAINERS: dict[str, type[_MaskSearch]] = {"igos": IGOS, "igos++": IGOSPlusPlus}


def make_igos(method: str, model: nn.Module, config: IGOSConfig | None = None) -> _MaskSearch:
    """The I-GOS variant ``method`` (``igos`` or ``igos++``) for ``model``."""
    try:
        kind = EXPLAINERS[method]
    except KeyError:
        raise ExplainError("unknown_method", f"method must be one of {sorted(EXPLAINERS)}") from None
    return kind(model, config or IGOSConfig.for_method(method))


__all__ = ["IGOS", "IGOSConfig", "IGOSPlusPlus", "edge_weights", "make_igos"]
