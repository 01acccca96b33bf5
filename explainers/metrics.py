"""Deletion and insertion scores of a saliency map (Petsiuk et al., RISE, 2018; as used by I-GOS).

Protocol (stated in every result, see :meth:`Protocol.as_json`), one of two units:

- ``pixel`` (the default): the map is resampled bilinearly to the model's input resolution and
  its pixels are ordered from most to least salient with a *stable* sort (ties keep raster
  order). Over ``steps`` equal steps, deletion replaces the first ``round(j * N / steps)``
  pixels of the image by the baseline and insertion reveals them on the baseline; the last
  step is exactly all ``N`` pixels.
- ``cell``: the protocol of the I-GOS / I-GOS++ papers' code, for comparing with their
  figures. The map is resampled to ``cells x cells`` (I-GOS's 28 x 28 mask as it is), the
  cells are ordered the same way, and the changed cells form a 0/1 grid that is upsampled
  bilinearly with aligned corners (the papers' ``UpsamplingBilinear2d``) into a soft blend
  weight between the image and the baseline.

The score is the softmax probability of the target class. The AUC is the area under the curve
over the fraction changed (0..1): the trapezoidal rule by default, or ``right`` (the right
Riemann sum the papers' code uses: it leaves out the first point, which flatters both scores
by half a step's width times the curve's total fall or rise). Lower deletion and higher
insertion AUC are better.

All curve images are built on the device and scored in batched forwards; the only device ->
host copy is the final one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F

from explainers.baselines import BaselineKind, make_baseline
from explainers.execution import Execution

DEFAULT_STEPS = 50
DEFAULT_CELLS = 28  # the I-GOS papers' mask side
MetricUnit = Literal["pixel", "cell"]
AucRule = Literal["trapezoid", "right"]
AUC_RULES = {
    "trapezoid": "trapezoidal rule over the fraction deleted/inserted (0..1)",
    "right": "right Riemann sum over the fraction deleted/inserted (0..1), first point left out",
}


@dataclass(frozen=True)
class Protocol:
    """How a map was scored; travels with the numbers."""

    steps: int = DEFAULT_STEPS
    baseline: dict[str, Any] = field(default_factory=lambda: {"kind": "blur"})
    resolution: tuple[int, int] = (224, 224)
    unit: MetricUnit = "pixel"
    cells: int | None = None  # the cell grid's side for unit "cell"
    score: str = "softmax probability of the target class"
    order: str = "descending saliency, stable sort (ties in raster order), map resampled bilinearly"
    auc: str = AUC_RULES["trapezoid"]

    @property
    def change(self) -> str:
        if self.unit == "pixel":
            return "pixels replaced (deletion) or revealed (insertion) outright"
        return (f"{self.cells} x {self.cells} cells; the changed cells' 0/1 grid upsampled bilinearly "
                "(aligned corners) blends image and baseline")

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["resolution"] = list(self.resolution)
        data["change"] = self.change
        if self.cells is None:
            del data["cells"]
        return data


@dataclass
class Faithfulness:
    """Deletion and insertion curves (``B x steps+1``) and their AUCs (``B``), on the host."""

    deletion_curve: torch.Tensor
    insertion_curve: torch.Tensor
    fractions: torch.Tensor
    deletion_auc: torch.Tensor
    insertion_auc: torch.Tensor
    protocol: Protocol

    def as_json(self, index: int = 0, curves: bool = True) -> dict[str, Any]:
        """One image's figures as plain JSON."""
        data: dict[str, Any] = {
            "deletion_auc": round(float(self.deletion_auc[index]), 6),
            "insertion_auc": round(float(self.insertion_auc[index]), 6),
            "protocol": self.protocol.as_json(),
        }
        if curves:
            data["curves"] = {
                "fraction": [round(v, 6) for v in self.fractions.tolist()],
                "deletion": [round(v, 6) for v in self.deletion_curve[index].tolist()],
                "insertion": [round(v, 6) for v in self.insertion_curve[index].tolist()],
            }
        return data


def pixel_order(saliency: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``B x N`` rank of every pixel (0 = most salient) of the map resampled to ``size``."""
    maps = saliency.float()
    if maps.dim() == 2:
        maps = maps[None]
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    flat = maps.flatten(1)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    positions = torch.arange(flat.shape[1], device=flat.device).expand_as(order)
    return ranks.scatter_(1, order, positions)


def _counts(units: int, steps: int, device: torch.device) -> torch.Tensor:
    """Pixels (or cells) changed after each step 0..steps; exactly ``units`` at the last step."""
    return torch.round(torch.arange(steps + 1, device=device, dtype=torch.float64) * units / steps).long()


def _area(curves: torch.Tensor, fractions: torch.Tensor, rule: AucRule) -> torch.Tensor:
    """Area under ``curves`` (``... x points``) over ``fractions`` by ``rule``."""
    if rule == "trapezoid":
        return torch.trapezoid(curves, fractions, dim=-1)
    return (curves[..., 1:] * fractions.diff()).sum(dim=-1)


@torch.no_grad()
def deletion_insertion(execution: Execution, inputs: torch.Tensor, saliency: torch.Tensor, targets: torch.Tensor,
                       steps: int = DEFAULT_STEPS, baseline: torch.Tensor | BaselineKind = "blur",
                       baseline_description: dict[str, Any] | None = None, unit: MetricUnit = "pixel",
                       cells: int = DEFAULT_CELLS, auc: AucRule = "trapezoid") -> Faithfulness:
    """Deletion and insertion curves of ``saliency`` (``B x h x w``, high = important).

    ``inputs`` is the normalised batch the model takes, ``targets`` one class per image,
    ``baseline`` a tensor like ``inputs`` (described by ``baseline_description`` in the
    protocol) or a kind for :func:`explainers.baselines.make_baseline`; ``unit``, ``cells`` and
    ``auc`` choose the protocol (module docstring). The images are scored in fp32 (a
    measurement), by the execution's forward-only network.
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    if unit not in get_args(MetricUnit) or auc not in AUC_RULES or cells < 1:
        raise ValueError("unit must be 'pixel' or 'cell', auc 'trapezoid' or 'right', cells >= 1")
    if isinstance(baseline, str):
        base, description = make_baseline(inputs, baseline)
    else:
        base, description = baseline.to(inputs.dtype), baseline_description or {"kind": "given"}
    batch, _, height, width = inputs.shape
    grid = (height, width) if unit == "pixel" else (cells, cells)
    units = grid[0] * grid[1]
    ranks = pixel_order(saliency.to(inputs.device), grid).view(1, batch, 1, *grid)
    counts = _counts(units, steps, inputs.device)
    targets = torch.as_tensor(targets, device=inputs.device).reshape(-1).expand(batch)
    points = steps + 1
    # Work list: (curve kind, step) pairs; each pair yields one image per batch element.
    session = execution.session()
    per_chunk = max(1, session.images_per_forward() // batch)
    scores = []
    for start in range(0, 2 * points, per_chunk):
        entries = torch.arange(start, min(start + per_chunk, 2 * points), device=inputs.device)
        kinds, step_index = entries // points, entries % points
        changed = ranks < counts[step_index].view(-1, 1, 1, 1, 1)  # c x B x 1 x grid
        deleting = (kinds == 0).view(-1, 1, 1, 1, 1)
        # deletion: baseline where changed; insertion: image where changed, baseline elsewhere
        if unit == "pixel":
            use_base = torch.where(deleting, changed, ~changed)
            images = torch.where(use_base, base.unsqueeze(0), inputs.unsqueeze(0))
        else:
            share = F.interpolate(changed.flatten(0, 1).to(inputs.dtype), size=(height, width),
                                  mode="bilinear", align_corners=True).view(len(entries), batch, 1, height, width)
            base_share = torch.where(deleting, share, 1 - share)
            images = torch.lerp(inputs.unsqueeze(0), base.unsqueeze(0), base_share)
        logits = session.logits(images.flatten(0, 1), exact=True)
        probabilities = logits.softmax(dim=1).gather(1, targets.repeat(len(entries))[:, None])
        scores.append(probabilities.view(len(entries), batch))
    curves = torch.cat(scores).view(2, points, batch).permute(0, 2, 1).cpu()
    fractions = counts.double().cpu() / units
    aucs = _area(curves.double(), fractions, auc)
    protocol = Protocol(steps=steps, baseline=description, resolution=(height, width), unit=unit,
                        cells=cells if unit == "cell" else None, auc=AUC_RULES[auc])
    return Faithfulness(curves[0], curves[1], fractions.float(), aucs[0].float(), aucs[1].float(), protocol)


def map_metrics(execution: Execution, inputs: torch.Tensor, saliency: torch.Tensor, targets: torch.Tensor,
                steps: int = DEFAULT_STEPS, unit: MetricUnit = "pixel") -> dict[str, Any]:
    """``{"deletion_auc", "insertion_auc", "protocol"}`` of one image's map (blurred baseline,
    trapezoidal AUC, ``unit`` pixels or 28 x 28 cells): what ``/v1/explain`` returns with
    ``metrics=true``."""
    scores = deletion_insertion(execution, inputs[:1], saliency[:1], targets[:1], steps=steps, baseline="blur",
                                unit=unit)
    return scores.as_json(0, curves=False)
