"""A comparison figure: one row per image, one column per method, the original image first.

Pure Pillow composition of pictures and caption lines the caller has already made (overlays,
AUC and time captions), so the CLI and scripts that draw README pictures share one layout.
Every cell has the same size; a header row names the columns. Besides the PNG it returns the
pixel box of every cell and of the picture drawn in it, so that callers (and tests) can point
at a method's picture in the figure.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageDraw, ImageFont

Box = tuple[int, int, int, int]  # x, y, width, height in figure pixels

BACKGROUND = (255, 255, 255)
TEXT = (30, 30, 30)
ERROR_TEXT = (170, 25, 25)
RULE = (215, 215, 215)
EMPTY = (240, 240, 240)
MUTED = (150, 150, 150)
PAD = 8
TITLE_PX = 16
CAPTION_PX = 13
LINE_SPACING = 1.35
MAX_CAPTION_LINES = 4  # a long error message is wrapped to this many lines, the rest elided


@dataclass
class Cell:
    """One picture with its column title and caption lines; ``picture`` None draws an empty
    square (a method that failed), ``failed`` draws the caption as an error."""

    title: str
    picture: Image.Image | None
    lines: list[str] = field(default_factory=list)
    failed: bool = False


@dataclass
class FigureRow:
    """One image: its own cell (the original, named and labelled) and one cell per method."""

    image: Cell
    cells: list[Cell]


@dataclass(frozen=True)
class CellBox:
    """Where a cell lies in the figure, and where its picture was drawn (None: no picture)."""

    box: Box
    picture: Box | None

    def as_json(self) -> dict[str, Any]:
        return {"box": list(self.box), "picture": list(self.picture) if self.picture else None}


@dataclass(frozen=True)
class FigureLayout:
    """The figure's size, the header boxes (one per column) and ``cells[row][column]``, column
    0 being each row's original image. The header and cell boxes tile the figure exactly."""

    width: int
    height: int
    header: list[Box]
    cells: list[list[CellBox]]

    def as_json(self) -> dict[str, Any]:
        return {"width": self.width, "height": self.height, "header": [list(box) for box in self.header],
                "cells": [[cell.as_json() for cell in row] for row in self.cells]}


def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font at ``size`` px (older Pillow: its fixed bitmap font)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _line_height(size: int) -> int:
    return int(round(size * LINE_SPACING))


def wrap(draw: ImageDraw.ImageDraw, text: str, typeface: Any, width: int, max_lines: int) -> list[str]:
    """``text`` broken at spaces (inside over-long words if need be) into lines at most
    ``width`` px wide; past ``max_lines`` the last line ends with an ellipsis."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if draw.textlength(candidate, font=typeface) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = word
        while draw.textlength(current, font=typeface) > width and len(current) > 1:
            cut = len(current) - 1
            while cut > 1 and draw.textlength(current[:cut], font=typeface) > width:
                cut -= 1
            lines.append(current[:cut])
            current = current[cut:]
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and draw.textlength(last + "…", font=typeface) > width:
            last = last[:-1]
        lines = lines[:max_lines - 1] + [last + "…"]
    return lines


def fitted_size(width: int, height: int, side: int) -> tuple[int, int]:
    """``width`` x ``height`` scaled (up or down) so that the longer side is ``side``."""
    scale = side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _fit(picture: Image.Image, side: int) -> Image.Image:
    size = fitted_size(picture.width, picture.height, side)
    rgb = picture.convert("RGB")
    return rgb.resize(size, Image.Resampling.LANCZOS) if size != rgb.size else rgb


def compose_figure(rows: list[FigureRow], side: int = 224, image_title: str = "image") -> tuple[bytes, FigureLayout]:
    """The PNG of ``rows`` and its layout. Column titles come from the first row's cells (and
    ``image_title`` for the originals). Pictures are fitted into ``side`` x ``side``; the
    picture area is as tall as the tallest fitted picture (landscape photos leave no gap)."""
    if not rows:
        raise ValueError("a figure needs at least one row")
    columns = 1 + len(rows[0].cells)
    if any(len(row.cells) != columns - 1 for row in rows):
        raise ValueError("every row needs the same number of cells")
    title_font, caption_font = font(TITLE_PX), font(CAPTION_PX)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = side
    captions = [[wrap_lines(measure, cell, caption_font, text_width) for cell in (row.image, *row.cells)]
                for row in rows]
    caption_lines = max(len(lines) for row in captions for lines in row)
    pictures = [cell.picture for row in rows for cell in (row.image, *row.cells) if cell.picture is not None]
    area = max((fitted_size(p.width, p.height, side)[1] for p in pictures), default=side)
    cell_width = side + 2 * PAD
    header_height = 2 * PAD + _line_height(TITLE_PX)
    cell_height = PAD + area + PAD // 2 + caption_lines * _line_height(CAPTION_PX) + PAD
    width, height = columns * cell_width, header_height + len(rows) * cell_height

    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    titles = [image_title, *(cell.title for cell in rows[0].cells)]
    header = [(c * cell_width, 0, cell_width, header_height) for c in range(columns)]
    for (x, y, w, h), title in zip(header, titles):
        shown = wrap(measure, title, title_font, text_width, 1)[0] if title else ""
        left = x + (w - draw.textlength(shown, font=title_font)) / 2
        draw.text((left, y + PAD), shown, fill=TEXT, font=title_font)
    draw.line([(0, header_height - 1), (width, header_height - 1)], fill=RULE)

    layout_cells: list[list[CellBox]] = []
    for r, (row, row_captions) in enumerate(zip(rows, captions)):
        top = header_height + r * cell_height
        boxes = []
        for c, (cell, lines) in enumerate(zip((row.image, *row.cells), row_captions)):
            box = (c * cell_width, top, cell_width, cell_height)
            picture_box = _draw_picture(canvas, draw, cell.picture, box[0] + PAD, top + PAD, side, area,
                                        caption_font)
            y = top + PAD + area + PAD // 2
            for line in lines:
                draw.text((box[0] + PAD, y), line, fill=ERROR_TEXT if cell.failed else TEXT, font=caption_font)
                y += _line_height(CAPTION_PX)
            boxes.append(CellBox(box, picture_box))
        layout_cells.append(boxes)
        if r + 1 < len(rows):
            draw.line([(0, top + cell_height - 1), (width, top + cell_height - 1)], fill=RULE)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue(), FigureLayout(width, height, header, layout_cells)


def wrap_lines(draw: ImageDraw.ImageDraw, cell: Cell, typeface: Any, width: int) -> list[str]:
    """The cell's caption as drawn: every line wrapped to ``width``, at most
    ``MAX_CAPTION_LINES`` in all."""
    lines = [part for line in cell.lines for part in wrap(draw, line, typeface, width, MAX_CAPTION_LINES)]
    if len(lines) > MAX_CAPTION_LINES:
        lines = wrap(draw, " ".join(lines), typeface, width, MAX_CAPTION_LINES)
    return lines


def _draw_picture(canvas: Image.Image, draw: ImageDraw.ImageDraw, picture: Image.Image | None, x: int, y: int,
                  side: int, area: int, typeface: Any) -> Box | None:
    """Paste ``picture`` fitted into ``side`` and centred in the ``side`` x ``area`` box at
    (x, y); None: that box grey, marked "no picture"."""
    if picture is None:
        draw.rectangle([x, y, x + side - 1, y + area - 1], fill=EMPTY)
        mark = "no picture"
        draw.text((x + (side - draw.textlength(mark, font=typeface)) / 2, y + area / 2 - CAPTION_PX / 2), mark,
                  fill=MUTED, font=typeface)
        return None
    fitted = _fit(picture, side)
    left, top = x + (side - fitted.width) // 2, y + (area - fitted.height) // 2
    canvas.paste(fitted, (left, top))
    return (left, top, fitted.width, fitted.height)


__all__ = ["Box", "Cell", "CellBox", "FigureLayout", "FigureRow", "compose_figure", "fitted_size", "font", "wrap"]
