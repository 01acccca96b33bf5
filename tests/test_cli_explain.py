"""`unbox explain` over several images: the real command, the default model, Grad-CAM."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from PIL import Image

from tests.conftest import ESPRESSO, REPO

SAMPLES = REPO / "app" / "static" / "samples"
TABBY = 281


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env=os.environ.copy(), timeout=300)


def test_several_images_with_a_target_each_and_a_corrupt_one_among_them(tmp_path: Path) -> None:
    """One run, two batches (``--batch-size 2``): each image gets its own target, the corrupt file
    is reported with its path and skipped (its target too), the others are still explained and
    written as ``<name>.overlay.png`` / ``<name>.map.png``, and the exit code says one failed."""
    for name in ("chelsea.jpg", "coffee.jpg", "astronaut.jpg"):
        shutil.copy(SAMPLES / name, tmp_path / name)
    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00 not really a jpeg " * 50)
    images = [tmp_path / "chelsea.jpg", corrupt, tmp_path / "coffee.jpg", tmp_path / "astronaut.jpg"]
    out, maps = tmp_path / "out", tmp_path / "maps"
    done = run_cli("explain", *map(str, images), "--target", str(TABBY), "--target", "0", "--target", str(ESPRESSO),
                   "--target", "1", "--batch-size", "2", "-o", str(out), "--map", str(maps), "--json", "--top-k", "3")
    assert done.returncode == 1, done.stderr
    assert f"error: {corrupt}: " in done.stderr and "corrupt" in done.stderr
    assert "Traceback" not in done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["image"] for r in records] == [str(images[0]), str(images[2]), str(images[3])]
    chelsea, coffee, astronaut = records
    assert chelsea["target"]["index"] == TABBY and chelsea["target"]["label"] == "tabby"
    assert coffee["target"] == {**coffee["target"], "index": ESPRESSO, "label": "espresso"}
    assert coffee["predictions"][0]["label"] == "espresso"  # its top-1 too
    assert astronaut["target"]["index"] == 1 and astronaut["model"] == "efficientnet_lite0"
    for record, image in zip(records, (images[0], images[2], images[3])):
        assert record["method"] == "gradcam" and len(record["predictions"]) == 3
        assert record["overlay"] == str(out / f"{image.stem}.overlay.png")
        assert record["map"] == str(maps / f"{image.stem}.map.png")
        assert Image.open(record["overlay"]).size == Image.open(image).size
        assert Image.open(record["map"]).mode == "L"
    assert sorted(p.name for p in out.iterdir()) == ["astronaut.overlay.png", "chelsea.overlay.png",
                                                    "coffee.overlay.png"]


def test_the_number_of_targets_must_match_the_images(tmp_path: Path) -> None:
    """Neither one for all nor one per image: a usage error (exit 2) before any model loads."""
    images = [str(SAMPLES / name) for name in ("chelsea.jpg", "coffee.jpg", "astronaut.jpg")]
    done = run_cli("explain", *images, "--target", str(TABBY), "--target", str(ESPRESSO), "-o", str(tmp_path / "o"))
    assert done.returncode == 2
    assert "usage: unbox explain" in done.stderr
    assert "--target: give one for every image or one per image (3 images), not 2" in done.stderr
    assert not (tmp_path / "o").exists() and done.stdout == ""
