"""The README's pictures render from the repository: every image it shows is a file committed
under ``docs/images``, a valid PNG or a self-contained SVG (no external URL anywhere), and
``scripts/readme_pictures.py`` is what makes each of them."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SCRIPT = REPO / "scripts" / "readme_pictures.py"
IMAGE_LINK = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
HTML_IMAGE = re.compile(r"<img\b[^>]*\bsrc=[\"']([^\"']+)", re.IGNORECASE)
EXPECTED = {"dashboard.png", "compare.png", "gradcam-cat.png", "sag-espresso.svg"}  # what the issue asks for


def readme_pictures() -> list[tuple[str, str]]:
    text = README.read_text(encoding="utf-8")
    return IMAGE_LINK.findall(text) + [("", src) for src in HTML_IMAGE.findall(text)]


def test_every_readme_picture_is_a_committed_local_file() -> None:
    pictures = readme_pictures()
    names = {Path(target).name for _, target in pictures}
    assert EXPECTED <= names, f"the README lacks {EXPECTED - names}"
    for alt, target in pictures:
        assert not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE), f"an external picture: {target}"
        path = (README.parent / target).resolve()
        assert path.is_relative_to(REPO / "docs" / "images") and path.is_file(), target
        assert alt.strip(), f"{target} has no alt text"
        assert path.stat().st_size < 400_000, f"{target} is not small: {path.stat().st_size} bytes"


def test_pngs_decode_and_svgs_are_self_contained() -> None:
    for _, target in readme_pictures():
        path = README.parent / target
        if path.suffix == ".png":
            with Image.open(path) as picture:
                picture.verify()
            with Image.open(path) as picture:
                assert picture.width >= 300 and picture.height >= 200, (target, picture.size)
            continue
        assert path.suffix == ".svg", target
        root = ET.parse(path).getroot()
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
        assert float(root.get("width")) <= 2400 and float(root.get("height")) <= 2400
        for element in root.iter():
            assert not element.tag.endswith(("script", "foreignObject")), (target, element.tag)
            for name, value in element.attrib.items():
                if name.endswith("href"):
                    assert value.startswith("data:image/"), (target, name, value[:60])
        thumbnails = [e for e in root.iter("{http://www.w3.org/2000/svg}image")]
        assert thumbnails, f"{target} shows no node"


def test_the_script_makes_every_readme_picture() -> None:
    """A picture the script does not make would go stale: each README picture's name is one the
    script writes."""
    source = SCRIPT.read_text(encoding="utf-8")
    for _, target in readme_pictures():
        if Path(target).name == "study-page.png":
            continue  # docs/studies.md's screenshot comes from the study page test
        assert f'"{Path(target).name}"' in source, f"scripts/readme_pictures.py does not write {target}"
