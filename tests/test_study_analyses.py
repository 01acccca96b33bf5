"""The study analyses on synthetic items: rows, CSV, summary (no model, no queue)."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics

import numpy as np
import pytest

from workers.study_analyses import (
    CSV_FIXED_COLUMNS,
    bootstrap_ci,
    item_rows,
    items_csv,
    region_scores,
    resize_bilinear,
    spearman,
    summarise,
)
from workers.study_spec import StudySpec

MODELS = ["resnet", "vit"]
METHODS = ["gradcam", "igos", "sag"]
THRESHOLDS = [0.5, 0.6, 0.7, 0.8]
BUDGETS = [0.05, 0.1, 0.2]
PATHS = ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "c.jpg", "e.jpg"]  # c.jpg on two manifest rows
IMAGE_SIZE = [320, 240]
MAP_BOX = [40.0, 0.0, 280.0, 240.0]  # a centre crop: the map covers only this box


def full_spec(**analyses) -> StudySpec:
    return StudySpec.model_validate({
        "models": MODELS,
        "methods": [{"name": name} for name in METHODS],
        "analyses": analyses or {
            "faithfulness": {"bootstrap": 200},
            "subexplanations": {"thresholds": THRESHOLDS},
            "crosstest": {"budgets": BUDGETS},
            "regions": {"gallery": 5},
            "agreement": {"grid": 8},
        },
    })


def region_for(row: int) -> dict | None:
    if row == 5:
        return None
    kind = "expected" if row % 2 == 0 else "forbidden"
    if row == 3:
        mask = np.zeros((IMAGE_SIZE[1], IMAGE_SIZE[0]), dtype=bool)
        mask[60:180, 100:220] = True
        return {"kind": kind, "mask": mask}
    x0 = 40 * row
    return {"kind": kind, "box": [x0, 20, x0 + 120, 200]}


def sag_result(model: str, rng: np.random.Generator) -> dict:
    if model == "resnet":  # few, large MSEs with many sub-explanations: compositional
        mses = [{"patches": list(range(int(rng.integers(3, 5)))), "score": 0.9,
                 "counts": [int(rng.integers(5, 9)), 4, 2, 1]}
                for _ in range(int(rng.integers(1, 3)))]
    else:  # several small MSEs with hardly any sub-explanations: disjunctive
        mses = [{"patches": list(range(int(rng.integers(1, 3)))), "score": 0.8,
                 "counts": [int(rng.integers(0, 2)), 0, 0, 0]}
                for _ in range(int(rng.integers(3, 5)))]
    return {"thresholds": THRESHOLDS, "full_score": 0.7, "mses": mses}


def make_items(labels: list[int | None] | None = None) -> list[dict]:
    rng = np.random.default_rng(7)
    labels = labels if labels is not None else [1, 2, 3, 4, 3, 5]
    items = []
    base_maps = {(row, model): rng.random((7, 7)) for row in range(len(PATHS)) for model in MODELS}
    for row, path in enumerate(PATHS):
        for model in MODELS:
            for method in METHODS:
                index = len(items)
                status, error = "succeeded", None
                if (row, model, method) == (1, "vit", "igos"):
                    status, error = "failed", {"code": "model_error", "message": "boom"}
                if (row, model, method) == (5, "resnet", "gradcam"):
                    status = "canceled"
                item = {"index": index, "path": path, "model": model, "method": method,
                        "status": status, "error": error, "label": labels[row],
                        "region": region_for(row), "image_size": IMAGE_SIZE, "result": None}
                if status == "succeeded":
                    top1 = labels[row] if (labels[row] is not None and rng.random() < 0.6) else 999
                    result = {"target": {"index": top1, "label": f"class {top1}",
                                         "score": float(rng.random())},
                              "top1": top1, "cached": bool(index % 4 == 0), "map": None,
                              "faithfulness": None, "crosstest": None, "subexplanations": None,
                              "timing_ms": {"total": 12.0}}
                    if method == "sag":
                        result["subexplanations"] = sag_result(model, rng)
                    else:
                        grid = base_maps[(row, model)]
                        if method == "igos":
                            grid = np.clip(resize_bilinear(grid, 14, 14)
                                           + 0.2 * rng.standard_normal((14, 14)), 0, 1)
                        result["map"] = {"size": list(grid.shape), "grid": grid.tolist(), "box": MAP_BOX}
                        result["faithfulness"] = {
                            "deletion_auc": float(rng.random() * 0.5),
                            "insertion_auc": float(0.5 + rng.random() * 0.5),
                            "protocol": {"steps": 50, "unit": "pixel", "method": method}}
                    if method == "gradcam":
                        result["crosstest"] = {"budgets": BUDGETS, "viewers": {
                            viewer: {"full_score": 0.8,
                                     "scores": [float(s) for s in rng.random(3)],
                                     "retention": [float(s) for s in rng.random(3) * 1.2],
                                     "correct": [None if labels[row] is None else bool(c)
                                                 for c in rng.random(3) < 0.5]}
                            for viewer in MODELS}}
                    item["result"] = result
                items.append(item)
    return items


def parse_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def number(text: str) -> float | None:
    return None if text == "" else float(text)


def fmean6(values: list[float]) -> float:
    return round(statistics.fmean(values), 6)


# --------------------------------------------------------------------------- region_scores


def test_region_share_left_half_of_a_two_by_two_map():
    grid = [[1.0, 0.0], [1.0, 0.0]]
    share, hit = region_scores(grid, [0, 0, 100, 100], (100, 100), {"kind": "expected", "box": [0, 0, 50, 100]})
    # bilinear with half-pixel centres: 25 px of 1, then a ramp 1 -> 0 over the middle 50 px
    assert share == pytest.approx(0.875, abs=1e-12)
    assert hit
    share, hit = region_scores(grid, [0, 0, 100, 100], (100, 100), {"kind": "expected", "box": [50, 0, 100, 100]})
    assert share == pytest.approx(0.125, abs=1e-12)
    assert not hit
    finer = [[1.0, 1.0, 0.0, 0.0]] * 4
    share, hit = region_scores(finer, [0, 0, 100, 100], (100, 100), {"kind": "expected", "box": [0, 0, 50, 100]})
    assert share > 0.9 and hit


def test_region_mask_matches_the_equivalent_box_and_is_resized():
    grid = np.random.default_rng(1).random((7, 7)).tolist()
    mask = np.zeros((600, 1000), dtype=bool)  # image 1000 x 600: working size 256 x 154
    mask[100:400, 200:700] = True
    by_mask = region_scores(grid, [0, 0, 1000, 600], (1000, 600), {"kind": "forbidden", "mask": mask})
    by_box = region_scores(grid, [0, 0, 1000, 600], (1000, 600), {"kind": "forbidden", "box": [200, 100, 700, 400]})
    assert by_mask[0] == pytest.approx(by_box[0], abs=0.02)
    assert by_mask[1] == by_box[1]


def test_region_share_with_a_crop_box():
    uniform = [[1.0] * 3] * 3
    # image 1000 x 500 -> working 256 x 128; the map covers only the centre [250, 750)
    size = (1000, 500)
    box = [250, 0, 750, 500]
    assert region_scores(uniform, box, size, {"kind": "expected", "box": [0, 0, 500, 500]}) == (0.5, True)
    assert region_scores(uniform, box, size, {"kind": "expected", "box": [250, 0, 750, 500]}) == (1.0, True)
    share, hit = region_scores(uniform, box, size, {"kind": "expected", "box": [0, 0, 250, 500]})
    assert share == 0.0 and not hit
    assert region_scores([[0.0]], box, size, {"kind": "expected", "box": [0, 0, 1000, 500]}) == (0.0, False)


def test_resize_bilinear_matches_half_pixel_centres():
    grid = [[0.0, 1.0]]
    out = resize_bilinear(grid, 1, 4)
    assert out.tolist() == [[0.0, 0.25, 0.75, 1.0]]


# --------------------------------------------------------------------------- rows and CSV


def test_item_rows_columns_and_rounding():
    items = make_items()
    spec = full_spec()
    rows = item_rows(items, spec)
    assert len(rows) == len(items)
    columns = list(rows[0])
    assert tuple(columns[:9]) == CSV_FIXED_COLUMNS
    assert columns[9:20] == ["index", "status", "error_code", "cached", "label", "top1", "correct",
                             "region_kind", "suspicion", "mse_count", "mse_size_mean"]
    assert columns[20:24] == ["subexpl_0.5", "subexpl_0.6", "subexpl_0.7", "subexpl_0.8"]
    assert columns[24:] == [f"crosstest_{v}_{b}" for v in MODELS for b in ("0.05", "0.1", "0.2")]
    assert all(list(row) == columns for row in rows)
    for row in rows:
        for value in row.values():
            if isinstance(value, float):
                assert round(value, 6) == value
    failed = rows[[item["status"] for item in items].index("failed")]
    assert failed["error_code"] == "model_error" and failed["score"] is None and failed["region_share"] is None
    sag = next(row for row, item in zip(rows, items) if item["method"] == "sag" and item["status"] == "succeeded")
    mses = items[sag["index"]]["result"]["subexplanations"]["mses"]
    assert sag["mse_count"] == len(mses)
    assert sag["subexpl_0.5"] == round(statistics.fmean(m["counts"][0] for m in mses), 6)
    assert sag["region_share"] is None and sag["deletion_auc"] is None
    grad = next(row for row, item in zip(rows, items) if item["method"] == "gradcam" and item["result"])
    assert grad["crosstest_vit_0.1"] in (0, 1)  # every source item has a label: 1/0 correct
    assert grad["correct"] == (grad["top1"] == grad["label"])
    igos = next(row for row in rows if row["method"] == "igos" and row["region_share"] is not None)
    kind = igos["region_kind"]
    expected = 1 - igos["region_share"] if kind == "expected" else igos["region_share"]
    assert igos["suspicion"] == round(expected, 6)
    assert igos["crosstest_vit_0.1"] is None


def test_no_regions_analysis_no_region_columns():
    rows = item_rows(make_items(), full_spec(faithfulness={}))
    assert all(row["region_share"] is None and row["pointing_hit"] is None for row in rows)
    assert not any(key.startswith(("crosstest_", "subexpl_")) for key in rows[0])


def test_csv_round_trip_recomputes_the_summary():
    items = make_items()
    spec = full_spec()
    rows = item_rows(items, spec)
    summary = summarise(items, spec, rows)
    parsed = parse_csv(items_csv(rows))
    assert len(parsed) == len(rows)
    assert list(parsed[0]) == list(rows[0])
    for row, back in zip(rows, parsed):
        for key, value in row.items():
            if value is None:
                assert back[key] == ""
            elif isinstance(value, bool):
                assert back[key] == ("1" if value else "0")
            elif isinstance(value, float):
                assert float(back[key]) == value
            else:
                assert back[key] == str(value)

    # faithfulness
    for entry in summary["faithfulness"]["per"]:
        group = [r for r in parsed if r["model"] == entry["model"] and r["method"] == entry["method"]
                 and r["deletion_auc"] != ""]
        assert entry["n"] == len(group)
        for name, column in (("deletion", "deletion_auc"), ("insertion", "insertion_auc")):
            values = [float(r[column]) for r in group]
            assert entry[name]["mean"] == fmean6(values)
            assert entry[name]["median"] == round(statistics.median(values), 6)
    assert {(e["model"], e["method"]) for e in summary["faithfulness"]["per"]} == {
        (m, k) for m in MODELS for k in ("gradcam", "igos")}

    # crosstest
    crosstest = summary["crosstest"]
    assert crosstest["method"] == "gradcam" and crosstest["measure"] == "accuracy"
    assert crosstest["fill"] == "blur" and crosstest["budgets"] == BUDGETS
    assert len(crosstest["matrix"]) == len(MODELS) ** 2
    for entry in crosstest["matrix"]:
        group = [r for r in parsed if r["model"] == entry["source"] and r["method"] == "gradcam"]
        for budget, value in zip(("0.05", "0.1", "0.2"), entry["values"]):
            values = [float(r[f"crosstest_{entry['viewer']}_{budget}"]) for r in group
                      if r[f"crosstest_{entry['viewer']}_{budget}"] != ""]
            assert value == fmean6(values)

    # regions
    for entry in summary["regions"]["per"]:
        group = [r for r in parsed if r["model"] == entry["model"] and r["method"] == entry["method"]
                 and r["region_share"] != ""]
        assert entry["n"] == len(group) > 0
        assert entry["mean_share"] == fmean6([float(r["region_share"]) for r in group])
        assert entry["pointing_rate"] == fmean6([float(r["pointing_hit"]) for r in group])
        for kind in ("expected", "forbidden"):
            sub = [r for r in group if r["region_kind"] == kind]
            assert entry[kind]["n"] == len(sub)
            if sub:
                assert entry[kind]["mean_share"] == fmean6([float(r["region_share"]) for r in sub])
    assert all(entry["method"] != "sag" for entry in summary["regions"]["per"])

    # sub-explanations: images per model and MSEs per image from the CSV
    for entry in summary["subexplanations"]["per_model"]:
        group = [r for r in parsed if r["model"] == entry["model"] and r["method"] == "sag" and r["mse_count"] != ""]
        assert entry["images"] == len(group)
        assert entry["mses_per_image"]["mean"] == fmean6([float(r["mse_count"]) for r in group])


def test_summary_items_and_json():
    items = make_items()
    summary = summarise(items, full_spec())
    counts = summary["items"]
    assert counts["total"] == len(items) == len(PATHS) * len(MODELS) * len(METHODS)
    assert counts["failed"] == 1 and counts["canceled"] == 1
    assert counts["succeeded"] == len(items) - 2
    assert counts["cached"] == sum(1 for i in items if i["result"] and i["result"]["cached"])
    assert summary["faithfulness"]["protocol"] == items[0]["result"]["faithfulness"]["protocol"]
    assert summary["faithfulness"]["lower_deletion_is_better"] is True
    text = json.dumps(summary, allow_nan=False)
    assert json.loads(text) == summary
    only = summarise(items, full_spec(regions={}))
    assert set(only) == {"items", "regions"}


def test_bootstrap_is_deterministic_and_contains_the_mean():
    items = make_items()
    spec = full_spec()
    first, second = summarise(items, spec), summarise(items, spec)
    assert first == second
    for entry in first["faithfulness"]["per"]:
        for name in ("deletion", "insertion"):
            low, high = entry[name]["ci95"]
            assert low <= entry[name]["mean"] <= high
            assert low < high
    values = [0.1, 0.4, 0.35, 0.2, 0.9]
    assert bootstrap_ci(values, 500) == bootstrap_ci(values, 500)
    assert bootstrap_ci([0.25], 500) == [0.25, 0.25]


def test_crosstest_retention_when_a_label_is_missing():
    items = make_items(labels=[1, None, 3, 4, 3, 5])
    spec = full_spec()
    rows = item_rows(items, spec)
    summary = summarise(items, spec, rows)
    assert summary["crosstest"]["measure"] == "retention"
    item = next(i for i in items if i["method"] == "gradcam" and i["result"] and i["label"] is not None)
    row = rows[item["index"]]
    retention = item["result"]["crosstest"]["viewers"]["vit"]["retention"]
    assert row["crosstest_vit_0.2"] == round(retention[2], 6)


def test_crosstest_with_an_explicit_method():
    spec = full_spec(crosstest={"method": "igos", "budgets": BUDGETS})
    summary = summarise(make_items(), spec)
    assert summary["crosstest"]["method"] == "igos"
    assert all(value is None for entry in summary["crosstest"]["matrix"] for value in entry["values"])


# --------------------------------------------------------------------------- ranking


def test_ranking_puts_the_most_suspicious_first():
    left = [[1.0, 1.0, 0.0, 0.0]] * 4  # mass in the left half
    def item(index, kind, box):
        return {"index": index, "path": f"{index}.jpg", "model": "resnet", "method": "gradcam",
                "status": "succeeded", "error": None, "label": None, "image_size": [100, 100],
                "region": {"kind": kind, "box": box},
                "result": {"target": {"index": 1, "label": "x", "score": 0.5}, "top1": 1, "cached": False,
                           "map": {"size": [4, 4], "grid": left, "box": [0, 0, 100, 100]},
                           "faithfulness": None, "crosstest": None, "subexplanations": None,
                           "timing_ms": {}}}
    items = [
        item(0, "expected", [0, 0, 50, 100]),    # expected, high share: not suspicious
        item(1, "forbidden", [50, 0, 100, 100]),  # forbidden, low share: hardly suspicious
        item(2, "expected", [50, 0, 100, 100]),   # expected, low share: suspicious
        item(3, "forbidden", [0, 0, 50, 100]),    # forbidden, high share: suspicious
    ]
    spec = StudySpec.model_validate({"models": ["resnet"], "methods": [{"name": "gradcam"}],
                                     "analyses": {"regions": {"gallery": 3}}})
    ranked = summarise(items, spec)["regions"]["ranked"]
    assert [entry["index"] for entry in ranked] == [2, 3, 0]  # ties by index
    assert ranked[0]["suspicion"] == ranked[1]["suspicion"] > 0.9
    assert ranked[1]["region_kind"] == "forbidden" and ranked[1]["pointing_hit"] is True


def test_ranking_of_the_synthetic_study_is_sorted():
    ranked = summarise(make_items(), full_spec())["regions"]["ranked"]
    assert len(ranked) == 5
    keys = [(-entry["suspicion"], entry["index"]) for entry in ranked]
    assert keys == sorted(keys)


# --------------------------------------------------------------------------- agreement


def test_spearman():
    a = np.random.default_rng(3).random(50)
    assert spearman(a, a) == pytest.approx(1.0)
    assert spearman(a, 1 - a) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)
    assert spearman([5, 5, 5], [1, 2, 3]) == 0.0


def test_agreement_pairs_by_path_occurrence():
    items = make_items()
    summary = summarise(items, full_spec())
    agreement = summary["agreement"]
    assert agreement["grid"] == 8
    by_model = {entry["model"]: entry["pairs"] for entry in agreement["per_model"]}
    assert set(by_model) == set(MODELS)
    for model, pairs in by_model.items():
        assert [(p["a"], p["b"]) for p in pairs] == [("gradcam", "igos")]
        # resnet: row 5's gradcam is canceled; vit: row 1's igos failed
        assert pairs[0]["n"] == len(PATHS) - 1
        assert -1.0 <= pairs[0]["spearman"]["median"] <= 1.0
        assert pairs[0]["spearman"]["mean"] > 0.3  # igos maps are noisy copies of the gradcam maps
    # identical maps agree perfectly; inverted maps disagree perfectly
    for item in items:
        if item["method"] == "igos" and item["result"]:
            twin = next(i for i in items if i["method"] == "gradcam" and i["model"] == item["model"]
                        and i["index"] == item["index"] - 1)
            if twin["result"] is None:
                continue
            grid = np.asarray(twin["result"]["map"]["grid"])
            item["result"]["map"]["grid"] = (grid if item["model"] == "resnet" else 1 - grid).tolist()
    pairs = {entry["model"]: entry["pairs"][0] for entry in summarise(items, full_spec())["agreement"]["per_model"]}
    assert pairs["resnet"]["spearman"]["mean"] == 1.0
    assert pairs["vit"]["spearman"]["mean"] == -1.0


# --------------------------------------------------------------------------- sub-explanations


def test_subexplanation_reading_and_histograms():
    items = make_items()
    summary = summarise(items, full_spec())["subexplanations"]
    assert summary["method"] == "sag" and summary["thresholds"] == THRESHOLDS
    per = {entry["model"]: entry for entry in summary["per_model"]}
    assert set(per) == set(MODELS)
    resnet_mses = [m for i in items if i["model"] == "resnet" and i["method"] == "sag" and i["result"]
                   for m in i["result"]["subexplanations"]["mses"]]
    assert per["resnet"]["mse_size"]["mean"] == fmean6([len(m["patches"]) for m in resnet_mses])
    first = per["resnet"]["counts"][0]
    assert first["threshold"] == 0.5
    assert first["mean"] == fmean6([m["counts"][0] for m in resnet_mses])
    histogram = first["histogram"]
    assert histogram["edges"] == list(range(max(m["counts"][0] for m in resnet_mses) + 2))
    assert sum(histogram["counts"]) == len(resnet_mses)
    reading = summary["reading"]
    assert reading["most_compositional"] == "resnet"
    assert reading["most_disjunctive"] == "vit"
    assert "resnet" in reading["text"] and "vit" in reading["text"]


def test_subexplanation_reading_needs_two_models_and_coarse_bins():
    items = [i for i in make_items() if i["model"] == "resnet"]
    for item in items:
        if item["method"] == "sag" and item["result"]:
            for k, mse in enumerate(item["result"]["subexplanations"]["mses"]):
                mse["counts"] = [100 + k, 1, 0, 0]
    spec = StudySpec.model_validate({"models": ["resnet"], "methods": [{"name": name} for name in METHODS],
                                     "analyses": {"subexplanations": {}}})
    summary = summarise(items, spec)["subexplanations"]
    assert summary["reading"]["most_compositional"] is None
    assert summary["reading"]["most_disjunctive"] is None
    assert "two models" in summary["reading"]["text"]
    histogram = summary["per_model"][0]["counts"][0]["histogram"]
    assert len(histogram["counts"]) <= 30
    assert histogram["edges"][-1] >= 101 + 1 and histogram["edges"][1] > 1
    assert sum(histogram["counts"]) == sum(len(i["result"]["subexplanations"]["mses"])
                                           for i in items if i["method"] == "sag" and i["result"])
