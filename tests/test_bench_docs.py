"""Benchmarks write their figures into the part of docs/benchmarks.md for the device that ran them."""

from __future__ import annotations

from pathlib import Path

from bench.common import record_section

LAYOUT = """# Benchmarks

intro

# On the 2-core CPU (AMD EPYC, no GPU)

## an older CPU run

A

# On an NVIDIA H200 (lent GPU machine)

## an older GPU run

B

# Reading these figures

notes
"""


def test_sections_go_to_the_end_of_their_devices_part(tmp_path: Path) -> None:
    docs = tmp_path / "benchmarks.md"
    docs.write_text(LAYOUT)
    record_section("## a new CPU run\n\nC\n", "cpu", docs)
    record_section("\n## a new GPU run\n\nD\n\n", "cuda", docs)
    text = docs.read_text()
    order = ["# On the 2-core CPU", "## an older CPU run", "## a new CPU run", "# On an NVIDIA",
             "## an older GPU run", "## a new GPU run", "# Reading these figures", "notes"]
    positions = [text.index(marker) for marker in order]
    assert positions == sorted(positions), text
    assert "\n\n\n" not in text and text.endswith("notes\n")


def test_a_file_without_parts_gets_the_section_at_its_end(tmp_path: Path) -> None:
    docs = tmp_path / "docs" / "benchmarks.md"
    record_section("## first\n\nE\n", "cpu", docs)
    record_section("## second\n\nF\n", "cuda", docs)
    text = docs.read_text()
    assert text.startswith("# Benchmarks\n") and text.index("## first") < text.index("## second")
    assert text.endswith("F\n")
