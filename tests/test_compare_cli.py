"""`unbox compare`: several methods on the same photos, one figure, a table or a JSON summary.

One in-process run (real efficientnet_lite0, small parameters so that it stays quick on a
CPU) serves most checks: the figure's geometry against its layout, the scores, the targets,
what the cells say and where the heat lies; the error paths are separate, cheap runs.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from app.cli import main
from app.compare import METRIC_STEPS
from explainers.compare_figure import Cell, FigureRow, compose_figure
from explainers.metrics import DEFAULT_STEPS
from tests.conftest import CAT_CLASSES, CUP, ESPRESSO, REPO

SAMPLES = REPO / "app" / "static" / "samples"
METHODS = ["gradcam", "scorecam", "igos", "sag", "rollout"]  # rollout refuses a CNN: an error cell
QUICK = ["--metric-steps", "8",
         "--params", 'scorecam={"channels": 4}',
         "--params", 'igos={"mask_size": 7, "iterations": 1, "steps": 1, "max_trials": 2}',
         "--params", 'sag={"grid": 3, "beam_width": 1, "successors": 3, "max_roots": 1, "ordering": "gradcam"}']


def run(*args: str) -> tuple[int, str, str]:
    """``unbox ARGS`` in this process: exit code, stdout, stderr (usage errors exit 2)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("compare")
    for name in ("chelsea.jpg", "coffee.jpg"):
        shutil.copy(SAMPLES / name, folder / name)
    figure = folder / "figure.png"
    code, out, err = run("compare", str(folder / "chelsea.jpg"), str(folder / "coffee.jpg"), "-o", str(figure),
                         "--methods", ",".join(METHODS), "--preset", "cpu", "--json", *QUICK)
    return {"code": code, "summary": json.loads(out), "stderr": err, "figure": Image.open(figure).convert("RGB")}


def test_the_figure_is_tiled_by_its_cells(compared) -> None:
    """One header row and a row per image, one column per method after the originals; the PNG
    is exactly the layout's size and the header and cell boxes cover it once each."""
    summary, figure = compared["summary"], compared["figure"]
    assert figure.size == (summary["figure"]["width"], summary["figure"]["height"])
    header = summary["figure"]["header"]
    assert summary["figure"]["columns"] == ["image", "Grad-CAM", "Score-CAM", "I-GOS", "SAG", "Attention rollout"]
    rows = [[image["box"]] + [method["box"] for method in image["methods"]] for image in summary["images"]]
    assert len(header) == 1 + len(METHODS) and [len(row) for row in rows] == [1 + len(METHODS)] * 2
    assert len({tuple(box[2:]) for row in rows for box in row}) == 1  # every cell the same size
    coverage = np.zeros((figure.height, figure.width), dtype=np.int32)
    for x, y, w, h in header + [box for row in rows for box in row]:
        coverage[y:y + h, x:x + w] += 1
    assert (coverage == 1).all()
    columns = {tuple(box[0] for box in row) for row in rows}
    assert len(columns) == 1 and list(next(iter(columns))) == sorted(next(iter(columns)))


def test_every_method_explains_each_images_top1_and_scores_it(compared) -> None:
    """The same class for every method of an image (its top-1); AUCs in [0, 1] for the maps and
    masks, none for SAG, whose caption says why; times are measured; on the coffee photo
    Grad-CAM's insertion beats its deletion."""
    summary = compared["summary"]
    assert summary["preset"] == "cpu" and summary["methods"] == METHODS
    chelsea, coffee = summary["images"]
    assert chelsea["name"] == "chelsea.jpg" and chelsea["target"]["index"] in CAT_CLASSES
    assert coffee["name"] == "coffee.jpg" and coffee["target"]["index"] in (ESPRESSO, CUP)
    assert coffee["caption"][1].startswith(f"{coffee['target']['label']} ({coffee['target']['index']}) p=")
    for image in summary["images"]:
        methods = {m["method"]: m for m in image["methods"]}
        assert list(methods) == METHODS
        for name in ("gradcam", "scorecam", "igos"):
            method = methods[name]
            assert method["error"] is None and method["target"] == image["target"]["index"]
            assert 0 <= method["deletion_auc"] <= 1 and 0 <= method["insertion_auc"] <= 1
            assert method["caption"][0] == (f"deletion {method['deletion_auc']:.3f} · "
                                            f"insertion {method['insertion_auc']:.3f}")
            assert method["seconds"] > 0 and method["timing_ms"]["total"] > 0
        assert methods["igos"]["params"]["preset"] == "cpu" and methods["igos"]["params"]["mask_size"] == 7
        assert methods["igos"]["params"]["metric_steps"] == 8  # the figure's steps reach the masks too
        sag = methods["sag"]
        assert sag["deletion_auc"] is None and sag["roots"] >= 1 and sag["picture"] is not None
        assert sag["caption"][0].startswith("not a heat map: ") and "root" in sag["caption"][0]
        assert sag["target"] == image["target"]["index"]
    gradcam = coffee["methods"][0]
    assert gradcam["insertion_auc"] > gradcam["deletion_auc"] + 0.2, gradcam


def test_a_method_that_refuses_the_model_is_an_error_cell(compared) -> None:
    """Attention rollout needs a Vision Transformer: its cells say so, draw no picture, and the
    run exits 1 while every other cell is drawn."""
    assert compared["code"] == 1, compared["stderr"]
    for image in compared["summary"]["images"]:
        rollout = image["methods"][-1]
        assert rollout["method"] == "rollout" and rollout["picture"] is None
        assert "Vision Transformer" in rollout["error"] and rollout["caption"][0].startswith("failed: ")
        assert all(m["picture"] is not None for m in image["methods"][:-1])
    assert "Traceback" not in compared["stderr"]


def heat(figure: Image.Image, overlay: list[int], original: list[int]) -> np.ndarray:
    """The heat colour's brightness per pixel: the overlay is half photo, half colour map
    (inferno, brighter = hotter), so ``2 * overlay - photo`` is the colour map alone."""
    def crop(box: list[int]) -> np.ndarray:
        x, y, w, h = box
        return np.asarray(figure.crop((x, y, x + w, y + h)), dtype=np.float64)

    colour = np.clip(2 * crop(overlay) - crop(original), 0, 255)
    return colour.mean(axis=2)


def test_grad_cam_is_hot_on_the_cup(compared) -> None:
    """In the figure, Grad-CAM's picture of the coffee photo is hotter over the espresso cup
    (the middle of the photo) than over the table in the corners of the model's view."""
    coffee = compared["summary"]["images"][1]
    gradcam = coffee["methods"][0]
    levels = heat(compared["figure"], gradcam["picture"], coffee["picture"])
    height, width = levels.shape  # the photo is 600 x 400; the cup spans about x 170-410, y 20-280
    cup = levels[int(0.15 * height):int(0.55 * height), int(0.35 * width):int(0.62 * width)].mean()
    # corners of the centre square the model sees (x 125-475, y 25-375), mostly table and saucer rim
    corners = [levels[int(y0 * height):int(y1 * height), int(x0 * width):int(x1 * width)].mean()
               for (x0, x1) in ((0.21, 0.29), (0.71, 0.79)) for (y0, y1) in ((0.07, 0.19), (0.81, 0.93))]
    assert cup > 1.5 * max(corners), (cup, corners)


def test_compose_figure_fits_every_picture_in_equal_cells() -> None:
    """Portrait and landscape pictures, a missing one and a long caption: equal cells that tile
    the figure, each picture inside its cell at most ``side`` long, the missing one None."""
    side = 100
    portrait, landscape = Image.new("RGB", (60, 120), (200, 0, 0)), Image.new("RGB", (300, 150), (0, 0, 200))
    long = "failed: " + "a very long error message " * 12
    rows = [FigureRow(Cell("tall.png", portrait, ["tall.png"]), [Cell("A", portrait, ["x"]), Cell("B", None, [long],
                                                                                                   failed=True)]),
            FigureRow(Cell("wide.png", landscape, ["wide.png"]), [Cell("A", landscape, []), Cell("B", landscape, [])])]
    png, layout = compose_figure(rows, side=side)
    figure = Image.open(io.BytesIO(png))
    assert figure.size == (layout.width, layout.height) and len(layout.header) == 3
    coverage = np.zeros((layout.height, layout.width), dtype=np.int32)
    for x, y, w, h in layout.header + [cell.box for row in layout.cells for cell in row]:
        coverage[y:y + h, x:x + w] += 1
    assert (coverage == 1).all()
    assert layout.cells[0][2].picture is None
    for row in layout.cells:
        for cell in row:
            if cell.picture is None:
                continue
            (x, y, w, h), (px, py, pw, ph) = cell.box, cell.picture
            assert x <= px and px + pw <= x + w and y <= py and py + ph <= y + h and max(pw, ph) == side
    x, y, w, h = layout.cells[1][1].picture
    assert (w, h) == (100, 50) and figure.getpixel((x + w // 2, y + h // 2)) == (0, 0, 200)


def test_the_figure_uses_the_metrics_default_steps() -> None:
    assert METRIC_STEPS == DEFAULT_STEPS


def test_the_table_reports_a_corrupt_image_and_compares_the_rest(tmp_path: Path, monkeypatch) -> None:
    """Without --json: a line per image x method and where the figure went; a corrupt file is
    named on stderr, left out of the figure, and the run exits 1. (PyTorch's forwards: this
    checks the output, and skips ONNX Runtime's export for a second model load.)"""
    monkeypatch.setenv("UNBOX_CPU_RUNTIME", "torch")
    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00 not really a jpeg " * 50)
    figure = tmp_path / "table.png"
    code, out, err = run("compare", str(corrupt), str(SAMPLES / "coffee.jpg"), "-o", str(figure),
                         "--methods", "gradcam", "--metric-steps", "4")
    assert code == 1, err
    assert f"error: {corrupt}: " in err and "Traceback" not in err
    lines = out.splitlines()
    assert lines[0].split()[:6] == ["image", "class", "method", "deletion", "insertion", "seconds"]
    assert len(lines) == 3 and lines[1].startswith("coffee.jpg") and "Grad-CAM" in lines[1]
    deletion, insertion, seconds = (float(v) for v in lines[1].split()[-3:])
    assert 0 <= deletion < insertion <= 1 and seconds > 0
    width, height = Image.open(figure).size
    assert lines[2] == f"figure written to {figure} ({width} x {height} px)"


def test_only_corrupt_images_is_an_error_before_any_model_loads(tmp_path: Path) -> None:
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    code, out, err = run("compare", str(corrupt), "-o", str(tmp_path / "f.png"))
    assert code == 2 and out == "" and f"error: {corrupt}: " in err
    assert not (tmp_path / "f.png").exists()


@pytest.mark.parametrize("args, message", [
    (["--methods", "gradcam,nosuch"], "unknown method 'nosuch'; known: "),
    (["--methods", "gradcam", "--params", "igos={}"], "--params names 'igos', which is not among --methods"),
    (["--methods", "igos", "--params", "igos=[1]"], "--params igos: expected a JSON object"),
    (["--methods", "igos", "--params", "igos"], "--params: expected METHOD=JSON"),
])
def test_usage_errors_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    code, _, err = run("compare", str(SAMPLES / "coffee.jpg"), "-o", str(tmp_path / "f.png"), *args)
    assert code == 2 and message in err, err
    if "known: " in message:
        assert all(name in err for name in ("gradcam", "scorecam", "igos", "igos++", "sag"))


def test_bad_params_are_refused_before_any_image_is_explained(tmp_path: Path) -> None:
    code, out, err = run("compare", str(SAMPLES / "coffee.jpg"), "-o", str(tmp_path / "f.png"),
                         "--methods", "igos", "--params", 'igos={"iterations": 0}')
    assert code == 2 and out == "" and "error: igos params: " in err and "iterations" in err, err
