"""A finished study's analyses: one row per item (``items.csv``) and the summary JSON.

Pure functions over the items' compact results (numpy only: no torch, no Redis), so the API,
the workers and the tests compute the same numbers. The rule that keeps the two outputs
consistent: every summary number that has a column in ``items.csv`` is computed *from the rows*
(floats rounded to 6 decimals, means as exactly rounded sums, :func:`math.fsum`, over the count),
so recomputing it from the CSV gives the same value bit for bit. Only what has no column (the
per-MSE sizes and counts of the sub-explanations, the maps of the agreement analysis) comes
from the items themselves.

Choices that are ours (the CVPR 2024 study does not fix them):

- maps are compared at a *working resolution*: the image scaled so that its long side is at
  most :data:`WORK_SIDE` pixels (never scaled up); the map is resampled bilinearly with
  half-pixel centres (torch's ``align_corners=False``) onto its box and is zero outside it;
- a pixel belongs to a box when its centre lies inside (``x0 <= x + 0.5 < x1``);
- mask regions are resized nearest-neighbour with pixel centres (``floor((i + 0.5) * in / out)``);
- negative saliency (not expected: maps are in [0, 1]) counts as zero mass, and an all-zero map
  has a region share of 0.0 and no pointing-game hit;
- the crosstest columns hold 1/0 (the viewer's top-1 is the label) when *every* counted item of
  the source method has a label, and the retention otherwise, so that the column always holds
  the summary's measure;
- the agreement analysis rounds the resampled maps to 10 decimals before ranking, so values
  equal up to floating-point noise count as ties.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from workers.study_spec import StudySpec

WORK_SIDE = 256  # the long side of the working resolution of the region analysis
HISTOGRAM_BINS = 30  # at most this many bins in a sub-explanation count histogram
DECIMALS = 6

CSV_FIXED_COLUMNS: tuple[str, ...] = (
    "path", "model", "method", "target", "score", "deletion_auc", "insertion_auc",
    "region_share", "pointing_hit",
)
_TAIL_COLUMNS: tuple[str, ...] = (
    "index", "status", "error_code", "cached", "label", "top1", "correct", "region_kind",
    "suspicion", "mse_count", "mse_size_mean",
)


# --------------------------------------------------------------------------- small helpers


def _round(value: float | None) -> float | None:
    if value is None:
        return None
    return round(float(value), DECIMALS)


def _mean(values: Sequence[float]) -> float | None:
    """Exactly rounded mean (``fsum / n``, i.e. :func:`statistics.fmean`), rounded to 6 decimals."""
    if not values:
        return None
    return _round(math.fsum(values) / len(values))


def _median(values: Sequence[float]) -> float | None:
    if not values:
        return None
    return _round(statistics.median(values))


def _number_name(value: float) -> str:
    """How a threshold or budget appears in a column name: ``0.5``, ``0.05``, ``1``."""
    return format(float(value), "g")


def subexpl_column(threshold: float) -> str:
    return f"subexpl_{_number_name(threshold)}"


def crosstest_column(viewer: str, budget: float) -> str:
    return f"crosstest_{viewer}_{_number_name(budget)}"


def _result(item: dict) -> dict | None:
    if item.get("status") != "succeeded":
        return None
    result = item.get("result")
    return result if isinstance(result, dict) else None


def _part(item: dict, key: str) -> Any:
    result = _result(item)
    return None if result is None else result.get(key)


def _find(values: Sequence[float], wanted: float) -> int | None:
    """The position of ``wanted`` in ``values`` (compared at 4 decimals, as the spec rounds)."""
    for position, value in enumerate(values):
        if abs(float(value) - float(wanted)) < 5e-5:
            return position
    return None


def _method_names(spec: StudySpec) -> list[str]:
    return [method.name for method in spec.methods]


def _groups(spec: StudySpec) -> Iterable[tuple[str, str]]:
    for model in spec.models:
        for method in _method_names(spec):
            yield model, method


# --------------------------------------------------------------------------- resampling


def _bilinear_axis(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of a 1-D bilinear resampling with half-pixel centres."""
    scale = size_in / size_out
    source = (np.arange(size_out, dtype=np.float64) + 0.5) * scale - 0.5
    source = np.maximum(source, 0.0)
    lower = np.minimum(np.floor(source).astype(np.int64), size_in - 1)
    upper = np.minimum(lower + 1, size_in - 1)
    weight = source - lower
    return lower, upper, weight


def resize_bilinear(grid: Any, height: int, width: int) -> np.ndarray:
    """``grid`` (h x w) resampled to ``height x width`` like ``F.interpolate(mode="bilinear",
    align_corners=False)`` (no antialiasing), in float64."""
    values = np.asarray(grid, dtype=np.float64)
    if values.ndim != 2 or values.size == 0:
        raise ValueError("a map grid is a non-empty 2-D list")
    y0, y1, wy = _bilinear_axis(values.shape[0], height)
    x0, x1, wx = _bilinear_axis(values.shape[1], width)
    rows = values[y0] * (1.0 - wy)[:, None] + values[y1] * wy[:, None]
    return rows[:, x0] * (1.0 - wx)[None, :] + rows[:, x1] * wx[None, :]


def _resize_nearest(mask: Any, height: int, width: int) -> np.ndarray:
    values = np.asarray(mask).astype(bool)
    if values.ndim != 2 or values.size == 0:
        raise ValueError("a region mask is a non-empty 2-D array")
    rows = np.minimum(((np.arange(height) + 0.5) * values.shape[0] / height).astype(np.int64),
                      values.shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * values.shape[1] / width).astype(np.int64),
                      values.shape[1] - 1)
    return values[rows][:, cols]


def _working_size(image_size: Sequence[int]) -> tuple[int, int, float, float]:
    """(width, height, x scale, y scale) of the working resolution."""
    width, height = max(1, int(image_size[0])), max(1, int(image_size[1]))
    shrink = min(1.0, WORK_SIDE / max(width, height))
    work_w, work_h = max(1, round(width * shrink)), max(1, round(height * shrink))
    return work_w, work_h, work_w / width, work_h / height


def _span(low: float, high: float, scale: float) -> tuple[int, int]:
    """The pixels (``[start, stop)``, not clipped) whose centres lie in ``[low, high)`` once scaled;
    at least one pixel."""
    start = math.ceil(low * scale - 0.5)
    stop = math.ceil(high * scale - 0.5)
    return start, max(stop, start + 1)


def _clip(start: int, stop: int, limit: int) -> tuple[int, int]:
    return min(max(start, 0), limit), min(max(stop, 0), limit)


def _placed_map(grid: Any, box: Sequence[float], work_w: int, work_h: int,
                sx: float, sy: float) -> np.ndarray:
    canvas = np.zeros((work_h, work_w), dtype=np.float64)
    xs, xe = _span(box[0], box[2], sx)
    ys, ye = _span(box[1], box[3], sy)
    inner = resize_bilinear(grid, ye - ys, xe - xs)
    cxs, cxe = _clip(xs, xe, work_w)
    cys, cye = _clip(ys, ye, work_h)
    if cxe > cxs and cye > cys:
        canvas[cys:cye, cxs:cxe] = inner[cys - ys:cye - ys, cxs - xs:cxe - xs]
    return canvas


def _region_mask(region: dict, work_w: int, work_h: int, sx: float, sy: float) -> np.ndarray:
    if region.get("mask") is not None:
        return _resize_nearest(region["mask"], work_h, work_w)
    box = region.get("box")
    if box is None:
        raise ValueError("a region has a box or a mask")
    inside = np.zeros((work_h, work_w), dtype=bool)
    xs, xe = _clip(*_span(box[0], box[2], sx), work_w)
    ys, ye = _clip(*_span(box[1], box[3], sy), work_h)
    inside[ys:ye, xs:xe] = True
    return inside


def region_scores(grid: list[list[float]], box: list[float], image_size: tuple[int, int],
                  region: dict) -> tuple[float, bool]:
    """(share of saliency mass inside the region, pointing-game hit: the map's maximum lies inside).

    The map (``grid``, high = important) covers ``box`` (image pixels) and is zero outside it.
    Both are taken to the working resolution (the image scaled so that its long side is at most
    :data:`WORK_SIDE`; boxes scaled alike, a mask resized nearest-neighbour): the grid is resampled
    bilinearly with half-pixel centres onto the box's pixels. Share = mass inside / total mass
    (0.0 for an all-zero map; negative values count as zero); hit = the first maximum in raster
    order lies inside (never for an all-zero map).
    """
    work_w, work_h, sx, sy = _working_size(image_size)
    saliency = _placed_map(grid, box, work_w, work_h, sx, sy)
    inside = _region_mask(region, work_w, work_h, sx, sy)
    mass = np.maximum(saliency, 0.0)
    total = float(mass.sum())
    if total <= 0.0:
        return 0.0, False
    share = float(mass[inside].sum()) / total
    peak = int(np.argmax(saliency))
    hit = bool(inside.reshape(-1)[peak])
    return min(max(share, 0.0), 1.0), hit


# --------------------------------------------------------------------------- rank correlation


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given the mean of the ranks they span."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts).astype(np.float64)
    return (ends - (counts - 1) / 2.0)[inverse.reshape(-1)]


def spearman(a: Any, b: Any) -> float:
    """Spearman's rank correlation of two equally long samples (average ranks for ties);
    0.0 when either is constant."""
    x = np.asarray(a, dtype=np.float64).reshape(-1)
    y = np.asarray(b, dtype=np.float64).reshape(-1)
    if x.size != y.size:
        raise ValueError("spearman needs samples of the same length")
    if x.size < 2:
        return 0.0
    rx = _average_ranks(x)
    ry = _average_ranks(y)
    rx -= rx.mean()
    ry -= ry.mean()
    denominator = math.sqrt(float(np.dot(rx, rx)) * float(np.dot(ry, ry)))
    if denominator == 0.0:
        return 0.0
    return float(min(1.0, max(-1.0, float(np.dot(rx, ry)) / denominator)))


# --------------------------------------------------------------------------- which method is which


def _has_maps(items: list[dict], method: str) -> bool:
    return any(item.get("method") == method and _part(item, "map") is not None for item in items)


def map_methods(items: list[dict], spec: StudySpec) -> list[str]:
    """The spec's methods (in order) whose items carry saliency maps."""
    return [name for name in _method_names(spec) if _has_maps(items, name)]


def crosstest_source(items: list[dict], spec: StudySpec) -> str | None:
    """The method whose maps give the crosstest regions: the spec's choice, else the first map method."""
    options = spec.analyses.crosstest
    if options is None:
        return None
    if options.method:
        return options.method
    methods = map_methods(items, spec)
    return methods[0] if methods else None


def subexplanation_method(items: list[dict], spec: StudySpec) -> str | None:
    """The first spec method whose items carry sub-explanations (SAG's)."""
    for name in _method_names(spec):
        if any(item.get("method") == name and _part(item, "subexplanations") is not None
               for item in items):
            return name
    return None


def _crosstest_items(items: list[dict], source: str | None) -> list[dict]:
    if source is None:
        return []
    return [item for item in items
            if item.get("method") == source and _part(item, "crosstest") is not None]


def crosstest_measure(items: list[dict], spec: StudySpec) -> str:
    """``accuracy`` when every counted item of the source method has a label, else ``retention``."""
    counted = _crosstest_items(items, crosstest_source(items, spec))
    if counted and all(item.get("label") is not None for item in counted):
        return "accuracy"
    return "retention"


# --------------------------------------------------------------------------- rows


def _subexpl_values(subexpl: dict, thresholds: Sequence[float]) -> dict[str, float | None]:
    item_thresholds = subexpl.get("thresholds") or []
    mses = subexpl.get("mses") or []
    values: dict[str, float | None] = {}
    for threshold in thresholds:
        position = _find(item_thresholds, threshold)
        counts = [] if position is None else [
            float(mse["counts"][position]) for mse in mses
            if position < len(mse.get("counts") or [])]
        values[subexpl_column(threshold)] = _mean(counts)
    return values


def _crosstest_values(crosstest: dict | None, spec: StudySpec, accuracy: bool) -> dict[str, Any]:
    options = spec.analyses.crosstest
    assert options is not None
    viewers = (crosstest or {}).get("viewers") or {}
    budgets = (crosstest or {}).get("budgets") or []
    values: dict[str, Any] = {}
    for viewer in spec.models:
        entry = viewers.get(viewer)
        for budget in options.budgets:
            value: Any = None
            position = _find(budgets, budget)
            if entry is not None and position is not None:
                if accuracy:
                    correct = (entry.get("correct") or [])
                    if position < len(correct) and correct[position] is not None:
                        value = 1 if correct[position] else 0
                else:
                    retention = entry.get("retention") or []
                    if position < len(retention) and retention[position] is not None:
                        value = _round(retention[position])
            values[crosstest_column(viewer, budget)] = value
    return values


def item_rows(items: list[dict], spec: StudySpec) -> list[dict[str, Any]]:
    """One row per item (same order): :data:`CSV_FIXED_COLUMNS`, then index, status, error_code,
    cached, label, top1, correct, region_kind, suspicion, mse_count, mse_size_mean, ``subexpl_<t>``
    per sub-explanation threshold (mean count per MSE) and, for the crosstest source method's
    items, ``crosstest_<viewer>_<budget>`` (1/0 correct when the measure is accuracy, else the
    retention). Every row has every column; ``None`` where not computed; floats rounded to 6
    decimals.

    ``region_share`` / ``pointing_hit`` / ``suspicion`` only when the spec asks for the regions
    analysis and the succeeded item has a region and a map; suspicion is ``1 - share`` for an
    expected region and ``share`` for a forbidden one.
    """
    analyses = spec.analyses
    thresholds = list(analyses.subexplanations.thresholds) if analyses.subexplanations else []
    source = crosstest_source(items, spec)
    accuracy = analyses.crosstest is not None and crosstest_measure(items, spec) == "accuracy"
    rows: list[dict[str, Any]] = []
    for item in items:
        result = _result(item)
        target = (result or {}).get("target") or {}
        faithfulness = (result or {}).get("faithfulness")
        saliency = (result or {}).get("map")
        region = item.get("region")
        label = item.get("label")
        top1 = (result or {}).get("top1")
        error = item.get("error") or {}
        row: dict[str, Any] = {
            "path": item.get("path"),
            "model": item.get("model"),
            "method": item.get("method"),
            "target": target.get("index"),
            "score": _round(target.get("score")),
            "deletion_auc": _round(faithfulness.get("deletion_auc")) if faithfulness else None,
            "insertion_auc": _round(faithfulness.get("insertion_auc")) if faithfulness else None,
            "region_share": None,
            "pointing_hit": None,
        }
        suspicion = None
        if analyses.regions is not None and region and saliency:
            image_size = item.get("image_size") or [saliency["box"][2], saliency["box"][3]]
            box = saliency.get("box") or [0, 0, image_size[0], image_size[1]]
            share, hit = region_scores(saliency["grid"], box, tuple(image_size), region)
            share = _round(share)  # suspicion from the rounded share: the CSV gives both alike
            row["region_share"] = share
            row["pointing_hit"] = hit
            suspicion = _round(share if region.get("kind") == "forbidden" else 1.0 - share)
        subexpl = (result or {}).get("subexplanations")
        mses = (subexpl or {}).get("mses") or []
        row.update({
            "index": item.get("index"),
            "status": item.get("status"),
            "error_code": error.get("code"),
            "cached": bool(result["cached"]) if result is not None and "cached" in result else None,
            "label": label,
            "top1": top1,
            "correct": (top1 == label) if (label is not None and top1 is not None) else None,
            "region_kind": region.get("kind") if region else None,
            "suspicion": suspicion,
            "mse_count": len(mses) if subexpl is not None else None,
            "mse_size_mean": _mean([float(len(mse.get("patches") or [])) for mse in mses])
            if subexpl is not None else None,
        })
        for threshold in thresholds:
            row[subexpl_column(threshold)] = None
        if subexpl is not None and thresholds:
            row.update(_subexpl_values(subexpl, thresholds))
        if analyses.crosstest is not None and source is not None:
            crosstest = (result or {}).get("crosstest") if item.get("method") == source else None
            row.update(_crosstest_values(crosstest, spec, accuracy))
        rows.append(row)
    return rows


def _csv_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "1" if value else "0"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    return str(value)


def items_csv(rows: list[dict[str, Any]]) -> str:
    """CSV text: header = union of the rows' keys in first-seen order; None -> empty, bools -> 1/0,
    floats in their shortest round-trip form (``repr``)."""
    header: dict[str, None] = {}
    for row in rows:
        for key in row:
            header.setdefault(key, None)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(list(header))
    for row in rows:
        writer.writerow([_csv_text(row.get(key)) for key in header])
    return buffer.getvalue()


# --------------------------------------------------------------------------- summary parts


def bootstrap_ci(values: Sequence[float], resamples: int, seed: int = 0) -> list[float]:
    """Percentile 95 % interval of the mean from ``resamples`` resamples with replacement
    (``numpy.random.default_rng(seed)``, fresh per call); ``[x, x]`` for a single value."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return [None, None]  # type: ignore[list-item]
    if data.size == 1:
        return [_round(data[0]), _round(data[0])]  # type: ignore[list-item]
    rng = np.random.default_rng(seed)
    chunk = max(1, min(resamples, 2_000_000 // data.size))
    means = np.empty(resamples, dtype=np.float64)
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        picks = rng.integers(0, data.size, size=(stop - start, data.size))
        means[start:stop] = data[picks].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return [_round(low), _round(high)]  # type: ignore[list-item]


def _item_counts(items: list[dict]) -> dict[str, int]:
    statuses = [item.get("status") for item in items]
    return {
        "total": len(items),
        "succeeded": statuses.count("succeeded"),
        "failed": statuses.count("failed"),
        "canceled": statuses.count("canceled"),
        "cached": sum(1 for item in items if (_result(item) or {}).get("cached")),
    }


def _faithfulness(items: list[dict], spec: StudySpec, rows: list[dict]) -> dict[str, Any]:
    options = spec.analyses.faithfulness
    assert options is not None
    protocol = next((_part(item, "faithfulness")["protocol"] for item in items
                     if (_part(item, "faithfulness") or {}).get("protocol") is not None), None)
    per = []
    for model, method in _groups(spec):
        group = [row for row in rows if row["model"] == model and row["method"] == method
                 and row["deletion_auc"] is not None and row["insertion_auc"] is not None]
        if not group:
            continue
        entry: dict[str, Any] = {"model": model, "method": method, "n": len(group)}
        for name, column in (("deletion", "deletion_auc"), ("insertion", "insertion_auc")):
            values = [row[column] for row in group]
            entry[name] = {"mean": _mean(values), "median": _median(values),
                           "ci95": bootstrap_ci(values, options.bootstrap)}
        per.append(entry)
    return {"protocol": protocol, "lower_deletion_is_better": True, "per": per}


def _histogram(values: Sequence[int]) -> dict[str, list[int]]:
    """Integer bins 0, 1, ... up to max + 1; coarser integer widths beyond :data:`HISTOGRAM_BINS` bins."""
    if not values:
        return {"edges": [0, 1], "counts": [0]}
    top = int(max(values)) + 1
    width = max(1, math.ceil(top / HISTOGRAM_BINS))
    bins = math.ceil(top / width)
    counts = np.bincount(np.asarray(values, dtype=np.int64) // width, minlength=bins)
    return {"edges": [k * width for k in range(bins + 1)], "counts": [int(c) for c in counts[:bins]]}


def _subexplanations(items: list[dict], spec: StudySpec, rows: list[dict]) -> dict[str, Any]:
    """Per model, over the sub-explanation method's images: MSEs per image (from the rows'
    ``mse_count``), MSE sizes and per-MSE sub-explanation counts (from the items: no column holds
    them per MSE).

    The reading (our rule): the *most compositional* model has the highest mean sub-explanation
    count per MSE at the lowest threshold (its evidence combines many parts whose subsets still
    carry the class); the *most disjunctive* model has the highest ratio of mean MSEs per image to
    mean MSE size (several small, independent sufficient parts). Ties go to the model listed first.
    It takes two models: with fewer, both are None.
    """
    options = spec.analyses.subexplanations
    assert options is not None
    thresholds = list(options.thresholds)
    method = subexplanation_method(items, spec)
    per_model: list[dict[str, Any]] = []
    for model in spec.models:
        chosen = [(row, item) for row, item in zip(rows, items)
                  if method is not None and row["model"] == model and row["method"] == method
                  and row["mse_count"] is not None]
        if not chosen:
            continue
        per_image = [float(row["mse_count"]) for row, _ in chosen]
        mses = [mse for _, item in chosen for mse in (_part(item, "subexplanations").get("mses") or [])]
        sizes = [float(len(mse.get("patches") or [])) for mse in mses]
        counts = []
        for threshold in thresholds:
            values: list[int] = []
            for _, item in chosen:
                subexpl = _part(item, "subexplanations")
                position = _find(subexpl.get("thresholds") or [], threshold)
                if position is None:
                    continue
                values.extend(int(mse["counts"][position]) for mse in subexpl.get("mses") or []
                              if position < len(mse.get("counts") or []))
            counts.append({"threshold": threshold, "mean": _mean([float(v) for v in values]),
                           "median": _median(values), "histogram": _histogram(values)})
        per_model.append({
            "model": model, "images": len(chosen),
            "mses_per_image": {"mean": _mean(per_image), "median": _median(per_image)},
            "mse_size": {"mean": _mean(sizes), "median": _median(sizes)},
            "counts": counts,
        })
    return {"method": method, "thresholds": thresholds, "per_model": per_model,
            "reading": _reading(per_model, thresholds)}


def _reading(per_model: list[dict[str, Any]], thresholds: list[float]) -> dict[str, Any]:
    if len(per_model) < 2:
        return {"most_compositional": None, "most_disjunctive": None,
                "text": "Comparing how compositional or disjunctive the models' evidence is takes "
                        "at least two models with sub-explanations."}
    lowest = _number_name(thresholds[0])
    compositional = [(entry["model"], entry["counts"][0]["mean"]) for entry in per_model
                     if entry["counts"][0]["mean"] is not None]
    disjunctive = []
    for entry in per_model:
        per_image, size = entry["mses_per_image"]["mean"], entry["mse_size"]["mean"]
        if per_image is not None and size:
            disjunctive.append((entry["model"], _round(per_image / size), per_image, size))
    best_c = max(compositional, key=lambda pair: pair[1]) if compositional else None
    best_d = max(disjunctive, key=lambda entry: entry[1]) if disjunctive else None
    parts = []
    if best_c is not None:
        others = ", ".join(f"{model} {value:g}" for model, value in compositional if model != best_c[0])
        parts.append(f"Most compositional: {best_c[0]} ({best_c[1]:g} sub-explanations per MSE at "
                     f"threshold {lowest}; {others}).")
    if best_d is not None:
        others = ", ".join(f"{model} {score:g}" for model, score, _, _ in disjunctive if model != best_d[0])
        parts.append(f"Most disjunctive: {best_d[0]} ({best_d[2]:g} MSEs per image of {best_d[3]:g} "
                     f"patches on average, ratio {best_d[1]:g}; {others}).")
    return {"most_compositional": best_c[0] if best_c else None,
            "most_disjunctive": best_d[0] if best_d else None,
            "text": " ".join(parts) or "No model has sub-explanation counts."}


def _crosstest(items: list[dict], spec: StudySpec, rows: list[dict]) -> dict[str, Any]:
    options = spec.analyses.crosstest
    assert options is not None
    source = crosstest_source(items, spec)
    budgets = list(options.budgets)
    matrix = []
    if source is not None:
        for model_a in spec.models:
            group = [row for row in rows if row["model"] == model_a and row["method"] == source]
            for model_b in spec.models:
                columns = [crosstest_column(model_b, budget) for budget in budgets]
                values = [_mean([float(row[c]) for row in group if row.get(c) is not None])
                          for c in columns]
                n = sum(1 for row in group if any(row.get(c) is not None for c in columns))
                matrix.append({"source": model_a, "viewer": model_b, "n": n, "values": values})
    return {"method": source, "fill": options.fill, "budgets": budgets,
            "measure": crosstest_measure(items, spec), "models": list(spec.models),
            "matrix": matrix}


def _rates(rows: list[dict]) -> dict[str, Any]:
    return {"n": len(rows),
            "mean_share": _mean([row["region_share"] for row in rows]),
            "pointing_rate": _mean([1.0 if row["pointing_hit"] else 0.0 for row in rows])}


def _regions(spec: StudySpec, rows: list[dict]) -> dict[str, Any]:
    options = spec.analyses.regions
    assert options is not None
    scored = [row for row in rows if row["region_share"] is not None]
    per = []
    for model, method in _groups(spec):
        group = [row for row in scored if row["model"] == model and row["method"] == method]
        if not group:
            continue
        entry = {"model": model, "method": method, **_rates(group)}
        for kind in ("expected", "forbidden"):
            entry[kind] = _rates([row for row in group if row["region_kind"] == kind])
        per.append(entry)
    ranked = sorted((row for row in scored if row["suspicion"] is not None),
                    key=lambda row: (-row["suspicion"], row["index"]))
    keys = ("index", "path", "model", "method", "region_kind", "suspicion", "region_share",
            "pointing_hit")
    return {"per": per, "ranked": [{key: row[key] for key in keys} for row in ranked[:options.gallery]]}


def _agreement(items: list[dict], spec: StudySpec) -> dict[str, Any]:
    options = spec.analyses.agreement
    assert options is not None
    side = options.grid
    methods = map_methods(items, spec)
    per_model = []
    for model in spec.models:
        # the k-th item of a method for a path is paired with the k-th item of the other method
        # for the same model and path (a path may appear on several manifest rows)
        occurrences: dict[str, dict[tuple[str, int], dict]] = {}
        for method in methods:
            seen: dict[str, int] = {}
            keyed: dict[tuple[str, int], dict] = {}
            for item in items:
                if item.get("model") != model or item.get("method") != method:
                    continue
                path = item.get("path")
                k = seen.get(path, 0)
                seen[path] = k + 1
                keyed[(path, k)] = item
            occurrences[method] = keyed
        pairs = []
        for i, method_a in enumerate(methods):
            for method_b in methods[i + 1:]:
                correlations = []
                for key, item_a in occurrences[method_a].items():
                    item_b = occurrences[method_b].get(key)
                    map_a = _part(item_a, "map")
                    map_b = None if item_b is None else _part(item_b, "map")
                    if map_a is None or map_b is None:
                        continue
                    grid_a = np.round(resize_bilinear(map_a["grid"], side, side), 10)
                    grid_b = np.round(resize_bilinear(map_b["grid"], side, side), 10)
                    correlations.append(spearman(grid_a, grid_b))
                if correlations:
                    pairs.append({"a": method_a, "b": method_b, "n": len(correlations),
                                  "spearman": {"mean": _mean(correlations),
                                               "median": _median(correlations)}})
        if pairs:
            per_model.append({"model": model, "pairs": pairs})
    return {"grid": side, "per_model": per_model}


def summarise(items: list[dict], spec: StudySpec, rows: list[dict] | None = None) -> dict[str, Any]:
    """The study summary: ``items`` counts plus the analyses the spec asks for.

    Every number that has a column in ``items.csv`` comes from ``rows`` (``item_rows(items, spec)``
    when None), so recomputing it from the CSV gives the same value; the maps of the agreement
    analysis and the per-MSE numbers of the sub-explanations come from ``items``.
    """
    if rows is None:
        rows = item_rows(items, spec)
    if len(rows) != len(items):
        raise ValueError("rows and items must correspond one to one")
    analyses = spec.analyses
    summary: dict[str, Any] = {"items": _item_counts(items)}
    if analyses.faithfulness is not None:
        summary["faithfulness"] = _faithfulness(items, spec, rows)
    if analyses.subexplanations is not None:
        summary["subexplanations"] = _subexplanations(items, spec, rows)
    if analyses.crosstest is not None:
        summary["crosstest"] = _crosstest(items, spec, rows)
    if analyses.regions is not None:
        summary["regions"] = _regions(spec, rows)
    if analyses.agreement is not None:
        summary["agreement"] = _agreement(items, spec)
    return summary
