"""Which of the I-GOS++ reference implementation's habits move the deletion / insertion AUCs?

    python -m bench.igos_quirks --preset cpu --seeds 0 1 2 3 4            # ours, five noise seeds
    python -m bench.igos_quirks --preset cpu --seeds 0 1 2 3 4 --all      # every habit switched on
    python -m bench.igos_quirks --preset reference --fresh-noise          # one habit, reference settings

Our I-GOS++ (``explainers.igos``) differs from the IGOS_pp code, as read from it, in four places
that the papers do not fix; each can be switched on here, by subclassing, without touching the
service's explainer:

* ``--align-corners``: masks upsampled bilinearly with aligned corners (ours: not aligned).
* ``--fresh-noise``: every line-search evaluation, including the current point's, draws new
  path noise (the service's ``line_search_noise="fresh"``; its default ``shared`` lets the
  candidates reuse the gradient's noise, common random numbers).
* ``--plain-armijo``: sufficient decrease ``c * s * ||g||^2`` (ours: the projected
  ``c * g . (M - clamp(M - s g))``).
* ``--inconsistent-btv``: bilateral weights averaged over colour channels before squaring
  along rows and after the exponential along columns (ours: ``exp(-mean_c(dI^2) / sigma)``
  in both directions).

``--all`` switches on all four and backtracks one more time (to a step below 1e-5, as the
reference does). Scores: the papers' protocol (28 x 28 cells, right Riemann sum) and pixels,
on scikit-image's chelsea, coffee, rocket and astronaut with efficientnet_lite0; the means over
the photos are printed per seed and over all seeds, since one seed's mean is one noisy draw.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from bench.igos import IMAGES, load_images, score_both
from explainers import igos
from explainers.baselines import make_baseline


def inconsistent_edge_weights(inputs: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's bilateral weights: channel mean inside the square along rows, outside
    the exponential along columns."""
    rows = torch.exp(-(inputs[..., 1:, :] - inputs[..., :-1, :]).mean(1, keepdim=True) ** 2 / sigma)
    cols = torch.exp(-(inputs[..., :, 1:] - inputs[..., :, :-1]) ** 2 / sigma).mean(1, keepdim=True)
    return rows, cols


def quirky(align_corners: bool, fresh_noise: bool, plain_armijo: bool) -> type[igos.IGOSPlusPlus]:
    """I-GOS++ with the chosen habits of the reference implementation."""

    class Quirky(igos.IGOSPlusPlus):
        def _upsample(self, masks, size):
            if tuple(masks.shape[-2:]) == tuple(size):
                return masks
            return F.interpolate(masks, size=size, mode="bilinear", align_corners=align_corners)

        def _line_search(self, session, point, grads, objective, inputs, base, targets, times, noise, edge,
                         max_batch, per_batch, endpoint, start_step, generator=None):
            if not plain_armijo or noise is None:  # otherwise the explainer's own (projected) test
                return super()._line_search(session, point, grads, objective, inputs, base, targets, times, noise,
                                            edge, max_batch, per_batch, endpoint, start_step, generator)
            cfg, size, terms = self.config, tuple(inputs.shape[-2:]), len(self._terms())

            def draw() -> torch.Tensor:
                return torch.randn_like(noise) * cfg.noise if fresh_noise else noise

            def value(masks):
                scores, _ = self._path_scores(session, self._term_masks(masks, size)[None], inputs, base, targets,
                                              times, draw(), max_batch)
                return self.search_term_scale * scores[0] + self._regulariser(masks, inputs, edge)

            used = 0
            with torch.no_grad():
                reference = value(point) if fresh_noise else objective.detach()
                squared = sum(g.pow(2).flatten(1).sum(1) for g in grads)
                step = start_step
                for _ in range(cfg.max_trials):
                    candidate = [(p - step * g).clamp(0, 1) for p, g in zip(point, grads)]
                    used += terms * times.numel()
                    if bool((value(candidate) <= reference - cfg.armijo * step * squared).all()) or step < cfg.min_step:
                        break
                    step *= cfg.backtrack
            return torch.full((inputs.shape[0],), step, device=inputs.device), used

    return Quirky


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["cpu", "reference"], default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--images", nargs="+", default=list(IMAGES), choices=IMAGES)
    parser.add_argument("--align-corners", action="store_true")
    parser.add_argument("--fresh-noise", action="store_true")
    parser.add_argument("--plain-armijo", action="store_true")
    parser.add_argument("--inconsistent-btv", action="store_true")
    parser.add_argument("--all", action="store_true", help="all four, and one more backtracking trial")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.all:
        args.align_corners = args.fresh_noise = args.plain_armijo = args.inconsistent_btv = True
    if args.inconsistent_btv:
        igos.edge_weights = inconsistent_edge_weights  # read by explain() at call time

    from models import ModelRegistry, load_catalog

    device = torch.device(args.device)
    model = ModelRegistry(load_catalog(None), str(device)).get("efficientnet_lite0")
    kind = quirky(args.align_corners, args.fresh_noise, args.plain_armijo)
    make = igos.IGOSPlusPlusConfig if args.preset == "reference" else igos.IGOSPlusPlusConfig.cpu_preset
    photos = {}
    for name, image in load_images(args.images).items():
        inputs, _ = model.preprocessor.to_input(image)
        target = int(model.logits(inputs)[0].argmax())
        photos[name] = (inputs, target, *make_baseline(inputs, "blur"))
    per_seed = {}
    for seed in args.seeds:
        torch.manual_seed(seed)  # the fresh line-search noise draws from the global generator
        config = make(seed=seed, line_search_noise="fresh" if args.fresh_noise else "shared",
                      **({"max_trials": 13, "min_step": 1e-5} if args.all else {}))
        scores = []
        for name, (inputs, target, baseline, info) in photos.items():
            started = time.perf_counter()
            explanation = kind(model.execution, config).explain(inputs, target, baseline=baseline)
            seconds = time.perf_counter() - started
            labels = torch.tensor([target], device=device)
            pixel_del, pixel_ins, cell_del, cell_ins = score_both(model.execution, inputs, explanation.saliency,
                                                                  labels, baseline, info, steps=50)
            row = [cell_del, cell_ins, pixel_del, pixel_ins]
            scores.append(row)
            print(json.dumps({"seed": seed, "image": name, "cells": row[:2], "pixels": row[2:],
                              "s": round(seconds, 2)}), flush=True)
        per_seed[seed] = [statistics.fmean(column) for column in zip(*scores)]
        print("seed %d means: cells %.3f / %.3f, pixels %.3f / %.3f" % (seed, *per_seed[seed]), flush=True)
    means = [statistics.fmean(column) for column in zip(*per_seed.values())]
    lows = [min(column) for column in zip(*per_seed.values())]
    highs = [max(column) for column in zip(*per_seed.values())]
    switched = [flag for flag in ("align_corners", "fresh_noise", "plain_armijo", "inconsistent_btv")
                if getattr(args, flag)] or ["none (ours)"]
    print(f"\nI-GOS++ ({args.preset} settings), habits: {', '.join(switched)}; seeds {args.seeds}")
    print("papers' protocol deletion %.3f (%.3f-%.3f) / insertion %.3f (%.3f-%.3f); pixels %.3f / %.3f"
          % (means[0], lows[0], highs[0], means[1], lows[1], highs[1], means[2], means[3]))


if __name__ == "__main__":
    main()
