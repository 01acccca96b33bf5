"""Structured Attention Graphs as pictures: an SVG of the graph and a PNG of the roots.

The SVG draws the graph the way the SAG paper draws its figures: one panel per graph root,
panels side by side (a new row of panels after ``PANELS_PER_ROW``), each with the root on top
framed in that root's colour. Below it, level by level, the panel shows the children of the
nodes shown one level up (a child = its parent minus one patch), ranked by the largest drop in
probability, at most ``children`` of them; the rest are folded into a "+ N more" mark, so the
drawing stays small however large the graph is (the full graph is in the job's JSON). A node
is a thumbnail of the image the model saw with only the node's patches visible (the rest shows
the baseline), its probability and its share of the full image's probability. An edge is the
removed patch: outlined on the child's thumbnail, and the line's width and colour grow with the
drop it causes. The patches are drawn with exactly the crisp geometry used for masking, mapped
from the model input onto the picture. Pure Pillow + NumPy: no system packages.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from explainers.colormaps import lookup_table
from explainers.render import encode_png, fit_within
from explainers.sag import SAGEdge, SAGResult

ROOT_COLOURS = ((46, 204, 113), (52, 152, 219), (241, 196, 15), (231, 76, 60), (155, 89, 182),
                (26, 188, 156), (230, 126, 34), (236, 240, 241))
THUMB_SIDE = 96
DIM = 0.3  # brightness of the parts outside the roots in the overlay
CHILDREN = 3  # children drawn per level of a panel
LEVELS = 3  # levels drawn below a panel's root
PANELS_PER_ROW = 3  # panels side by side before a new row of panels
MAX_WIDTH = 2400  # panels wrap earlier when a row of them would be wider; header text never widens past it
TEXT_WIDTH = 960  # the header may widen a narrow drawing up to this, then its text wraps or is cut

# layout, in SVG pixels
MARGIN, GAP_X, GAP_Y, TEXT_H = 20, 16, 44, 18
PANEL_PAD, PANEL_GAP, HEADING_H, MORE_W, MORE_H = 10, 24, 26, 64, 26
TITLE_SIZE, SMALL_SIZE, LINE_H = 15, 11, 15


def model_region(image: Image.Image, box: tuple[float, float, float, float], max_side: int) -> Image.Image:
    """The part of ``image`` the model saw (``box`` in image pixels), longer side ``max_side``."""
    left, top, right, bottom = box
    scale = max_side / max(right - left, bottom - top)
    width, height = max(1, round((right - left) * scale)), max(1, round((bottom - top) * scale))
    return image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR, box=box)


def patch_index_map(result: SAGResult, width: int, height: int, input_size: tuple[int, int]) -> np.ndarray:
    """``height x width`` patch index per pixel of a picture of the model's region.

    The model input's patch edges are scaled to the picture; each pixel takes the patch its
    centre falls in, so the drawn squares are the masked squares.
    """
    input_h, input_w = input_size
    ys = (np.arange(height) + 0.5) * input_h / height
    xs = (np.arange(width) + 0.5) * input_w / width
    rows = np.searchsorted(np.asarray(result.edges_y[1:-1]), ys, side="right")
    cols = np.searchsorted(np.asarray(result.edges_x[1:-1]), xs, side="right")
    return rows[:, None] * result.grid + cols[None, :]


def patch_pixel_edges(edges: tuple[int, ...], pixels: int, input_pixels: int) -> list[int]:
    """The picture's pixel edges of the patches along one axis, as :func:`patch_index_map`
    assigns them: a pixel belongs to the patch its centre falls in, so patch ``i`` covers pixels
    ``[out[i], out[i + 1])``."""
    out = [min(pixels, max(0, math.ceil(e * pixels / input_pixels - 0.5))) for e in edges]
    out[0], out[-1] = 0, pixels
    return out


def baseline_picture(picture: np.ndarray, kind: str) -> np.ndarray:
    """What hidden patches show in a drawing: black, or the picture blurred like the baseline."""
    if kind == "blur":
        radius = 50.0 / 224 * max(picture.shape[:2])
        return np.asarray(Image.fromarray(picture).filter(ImageFilter.GaussianBlur(radius)))
    return np.zeros_like(picture)


def keep_patches(picture: np.ndarray, hidden: np.ndarray, index_map: np.ndarray, patches: tuple[int, ...]) -> np.ndarray:
    """``picture`` where a pixel's patch is in ``patches``, else ``hidden``."""
    visible = np.isin(index_map, np.asarray(patches, dtype=np.int64))
    return np.where(visible[..., None], picture, hidden)


def _jpeg_data_uri(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _hex(colour: tuple[int, int, int] | np.ndarray) -> str:
    return "#" + "".join(f"{int(c):02x}" for c in colour)


# -- which nodes each panel shows ---------------------------------------------------------------
@dataclass
class Panel:
    """What one root's panel shows: node ids per level (row 0 = the root), how many children
    each row folded into "+ N more" (row 0: none) and the graph edges drawn between rows."""

    root: int
    rows: list[list[int]]
    folded: list[int]
    edges: list[SAGEdge] = field(default_factory=list)


def panel_layout(result: SAGResult, children: int = CHILDREN, levels: int = LEVELS) -> list[Panel]:
    """One :class:`Panel` per graph root, in the roots' order.

    Level ``L + 1`` of a panel takes the distinct children of the nodes shown at level ``L``,
    ranked by their largest drop from a shown parent (ties: the smaller node id), and shows the
    first ``children``; the others are counted as folded. When none of those has children of
    its own (large drops fall below ``graph_threshold``, where the graph stops expanding), the
    last place goes to the highest-ranked child that has, so the panel shows how the graph goes
    on. Every graph edge from a shown parent to a shown child is drawn. A panel stops after
    ``levels`` levels or when no child is left.
    """
    outgoing: dict[int, list[SAGEdge]] = {}
    for edge in result.edges:
        outgoing.setdefault(edge.source, []).append(edge)
    panels = []
    for root in result.graph_roots:
        panel = Panel(root.id, [[root.id]], [0])
        for _ in range(levels):
            best: dict[int, float] = {}
            for parent in panel.rows[-1]:
                for edge in outgoing.get(parent, []):
                    best[edge.target] = max(best.get(edge.target, -math.inf), edge.drop)
            if not best:
                break
            ranked = sorted(best, key=lambda target: (-best[target], target))
            shown = ranked[:children]
            if not any(target in outgoing for target in shown):
                # The largest drops are usually leaves (below graph_threshold, not expanded): the
                # last place goes to the largest-drop child the graph goes on from, if any.
                onward = next((target for target in ranked[children:] if target in outgoing), None)
                if onward is not None:
                    shown = shown[:children - 1] + [onward]
            chosen = set(shown)
            panel.edges.extend(edge for parent in panel.rows[-1] for edge in outgoing.get(parent, [])
                               if edge.target in chosen)
            panel.rows.append(shown)
            panel.folded.append(len(ranked) - len(shown))
        panels.append(panel)
    return panels


# -- text that must not widen the drawing --------------------------------------------------------
def _text_width(text: str, size: float, bold: bool = False) -> float:
    """A generous estimate of ``text``'s width in a sans-serif font of ``size`` px."""
    return len(text) * size * (0.66 if bold else 0.6)


def _fit(text: str, size: float, width: float, bold: bool = False) -> str:
    """``text`` cut (with an ellipsis) to fit ``width``."""
    if _text_width(text, size, bold) <= width:
        return text
    keep = max(0, int(width / (size * (0.66 if bold else 0.6))) - 1)
    return text[:keep].rstrip() + "…"


def _wrap(text: str, size: float, width: float) -> list[str]:
    """``text`` broken at spaces into lines that fit ``width`` (a too long word is cut)."""
    lines: list[str] = []
    for word in text.split():
        if lines and _text_width(f"{lines[-1]} {word}", size) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(_fit(word, size, width))
    return lines or [""]


# -- the SVG ------------------------------------------------------------------------------------
class _Canvas:
    """What every panel of one drawing shares: the nodes, the thumbnails (each encoded once),
    the patch geometry on a thumbnail and the edge colours."""

    def __init__(self, result: SAGResult, image: Image.Image, box: tuple[float, float, float, float],
                 input_size: tuple[int, int], thumb_side: int) -> None:
        picture = np.asarray(model_region(image, box, thumb_side))
        self.picture = picture
        self.thumb_h, self.thumb_w = picture.shape[:2]
        self.index_map = patch_index_map(result, self.thumb_w, self.thumb_h, input_size)
        self.hidden = baseline_picture(picture, str(result.details.get("baseline", "black")))
        self.pixel_x = patch_pixel_edges(tuple(result.edges_x), self.thumb_w, input_size[1])
        self.pixel_y = patch_pixel_edges(tuple(result.edges_y), self.thumb_h, input_size[0])
        self.grid = result.grid
        self.nodes = {node.id: node for node in result.nodes}
        self.full = max(result.full_score, 1e-12)
        self.table = lookup_table("inferno")
        self.cell_w = self.thumb_w + GAP_X
        self.node_h = self.thumb_h + TEXT_H
        self._uris: dict[int, str] = {}

    def thumbnail(self, node_id: int) -> str:
        """The node's thumbnail (only its patches visible) as a JPEG data URI."""
        if node_id not in self._uris:
            patches = self.nodes[node_id].patches
            self._uris[node_id] = _jpeg_data_uri(keep_patches(self.picture, self.hidden, self.index_map, patches))
        return self._uris[node_id]

    def edge_style(self, drop: float) -> tuple[str, float]:
        """Colour and line width of an edge: by the drop's share of the full score."""
        share = float(np.clip(drop / self.full, 0.0, 1.0))
        return _hex(self.table[int(round(40 + 180 * share))]), 0.6 + 7 * share

    def patch_box(self, patch: int) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` of ``patch`` on a thumbnail, in thumbnail pixels."""
        r, c = divmod(patch, self.grid)
        return self.pixel_x[c], self.pixel_y[r], self.pixel_x[c + 1], self.pixel_y[r + 1]

    def heading(self, index: int, panel: Panel) -> str:
        root = self.nodes[panel.root]
        count = len(root.patches)
        return f"Root {index + 1} · p = {root.score:.3f} ({root.score / self.full:.0%}) · {_count(count, 'patch')}"

    def row_width(self, panel: Panel, level: int) -> float:
        """Width of one row of a panel: its thumbnails and, when it folded some, the mark."""
        more = GAP_X + MORE_W if panel.folded[level] else 0
        return len(panel.rows[level]) * self.cell_w - GAP_X + more

    def panel_size(self, index: int, panel: Panel) -> tuple[float, float]:
        inner = max([self.row_width(panel, level) for level in range(len(panel.rows))]
                    + [16 + _text_width(self.heading(index, panel), 12, bold=True)])
        height = HEADING_H + len(panel.rows) * self.node_h + (len(panel.rows) - 1) * GAP_Y
        return 2 * PANEL_PAD + inner, 2 * PANEL_PAD + height

    def panel(self, index: int, panel: Panel, left: float, top: float, size: tuple[float, float]) -> list[str]:
        """The SVG lines of one root's panel: frame and heading, edges, nodes, the removed
        patches' outlines (over the thumbnails) and the "+ N more" marks."""
        panel_w, panel_h = size
        colour = _hex(ROOT_COLOURS[index % len(ROOT_COLOURS)])
        corners: dict[tuple[int, int], tuple[float, float]] = {}  # (level, node id) -> thumbnail corner
        marks: list[tuple[int, float, float]] = []
        for level, members in enumerate(panel.rows):
            x = left + (panel_w - self.row_width(panel, level)) / 2
            y = top + PANEL_PAD + HEADING_H + level * (self.node_h + GAP_Y)
            for node_id in members:
                corners[(level, node_id)] = (x, y)
                x += self.cell_w
            if panel.folded[level]:
                marks.append((level, x, y + (self.thumb_h - MORE_H) / 2))
        level_of = {node_id: level for level, members in enumerate(panel.rows) for node_id in members}

        out = [f'<g class="sag-panel" data-panel="{index}" data-root="{panel.root}">',
               f'<rect x="{left:.1f}" y="{top:.1f}" width="{panel_w:.1f}" height="{panel_h:.1f}" rx="6" '
               f'fill="#fafafa" stroke="#dddddd"/>',
               f'<rect x="{left + PANEL_PAD:.1f}" y="{top + PANEL_PAD + 3:.1f}" width="10" height="10" '
               f'fill="{colour}"/>',
               f'<text x="{left + PANEL_PAD + 16:.1f}" y="{top + PANEL_PAD + 12:.1f}" font-size="12" '
               f'font-weight="bold">{_escape(self.heading(index, panel))}</text>',
               '<g class="edges">']
        outlines = []
        for edge in panel.edges:
            level = level_of[edge.source]
            sx, sy = corners[(level, edge.source)]
            tx, ty = corners[(level + 1, edge.target)]
            stroke, stroke_w = self.edge_style(edge.drop)
            ids = (f'data-panel="{index}" data-source="{edge.source}" data-target="{edge.target}" '
                   f'data-removed="{edge.removed}"')
            out.append(f'<line class="edge" {ids} data-drop="{edge.drop:.4f}" x1="{sx + self.thumb_w / 2:.1f}" '
                       f'y1="{sy + self.node_h - 2:.1f}" x2="{tx + self.thumb_w / 2:.1f}" y2="{ty:.1f}" '
                       f'stroke="{stroke}" stroke-width="{stroke_w:.2f}" stroke-opacity="0.85">'
                       f'<title>remove patch {edge.removed}: {-edge.drop:+.3f}</title></line>')
            x0, y0, x1, y1 = self.patch_box(edge.removed)
            place = (f'x="{tx + x0 + 1:.2f}" y="{ty + y0 + 1:.2f}" width="{max(0.5, x1 - x0 - 2):.2f}" '
                     f'height="{max(0.5, y1 - y0 - 2):.2f}" fill="none"')
            # a light halo under the outline keeps a dark colour visible on a black baseline
            outlines.append(f'<rect class="removed-patch-halo" {place} stroke="#ffffff" stroke-opacity="0.8" '
                            f'stroke-width="3"/>')
            outlines.append(f'<rect class="removed-patch" {ids} {place} stroke="{stroke}" stroke-width="1.5">'
                            f'<title>patch {edge.removed} removed from node {edge.source}: {-edge.drop:+.3f}'
                            f'</title></rect>')
        out.append('</g><g class="nodes">')
        for (level, node_id), (x, y) in corners.items():
            out.append(self._node(index, level, node_id, x, y, colour))
        out.append('</g><g class="removed-patches">')
        out.extend(outlines)
        out.append("</g>")
        for level, x, y in marks:
            folded = panel.folded[level]
            out.append(f'<g class="more" data-panel="{index}" data-level="{level}" data-folded="{folded}">'
                       f'<rect x="{x:.1f}" y="{y:.1f}" width="{MORE_W}" height="{MORE_H}" rx="8" fill="#eeeeee" '
                       f'stroke="#aaaaaa"/>'
                       f'<text x="{x + MORE_W / 2:.1f}" y="{y + MORE_H / 2 + 4:.1f}" font-size="{SMALL_SIZE}" '
                       f'text-anchor="middle">+ {folded} more</text>'
                       f'<title>{folded} more children of the level above, not drawn (all are in the JSON)'
                       f'</title></g>')
        out.append("</g>")
        return out

    def _node(self, index: int, level: int, node_id: int, x: float, y: float, colour: str) -> str:
        """One ``<g class="node">``: thumbnail, frame (a root's in its colour), score and tooltip."""
        node = self.nodes[node_id]
        uri = self.thumbnail(node_id)
        root = level == 0
        patches = " ".join(str(p) for p in sorted(node.patches))
        frame, frame_w = (colour, 3) if root else ("#888888", 1)
        share = node.score / self.full
        return (f'<g class="node{" root" if root else ""}" id="p{index}-node-{node_id}" data-node="{node_id}" '
                f'data-panel="{index}" data-level="{level}" data-patches="{patches}" '
                f'data-score="{node.score:.6f}" data-relative="{share:.4f}">'
                f'<image x="{x:.1f}" y="{y:.1f}" width="{self.thumb_w}" height="{self.thumb_h}" href="{uri}" '
                f'xlink:href="{uri}"/>'
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{self.thumb_w}" height="{self.thumb_h}" fill="none" '
                f'stroke="{frame}" stroke-width="{frame_w}"/>'
                f'<text x="{x + self.thumb_w / 2:.1f}" y="{y + self.thumb_h + 13:.1f}" font-size="{SMALL_SIZE}" '
                f'text-anchor="middle">{node.score:.3f} ({share:.0%})</text>'
                f'<title>{f"root {index + 1}, " if root else ""}{len(node.patches)} patches: {patches}; '
                f'p = {node.score:.3f} ({share:.0%} of the full image)</title></g>')


def render_svg(result: SAGResult, image: Image.Image, box: tuple[float, float, float, float],
               input_size: tuple[int, int], labels: tuple[str, ...] | None = None,
               thumb_side: int = THUMB_SIDE, children: int = CHILDREN, levels: int = LEVELS) -> str:
    """The SAG as an SVG document: one ``<g class="sag-panel">`` per graph root drawing that
    root's :func:`panel_layout` (``<g class="node">`` thumbnails embedded as base64 JPEG, a
    ``<line class="edge">`` and a ``<rect class="removed-patch">`` per drawn edge, a
    ``<g class="more">`` per row that folded children). Its size follows ``children``,
    ``levels`` and the number of roots, not the graph's size."""
    canvas = _Canvas(result, image, box, input_size, thumb_side)
    panels = panel_layout(result, children, levels)

    # panels in rows of at most PANELS_PER_ROW, fewer when such a row would pass MAX_WIDTH
    sizes = [canvas.panel_size(index, panel) for index, panel in enumerate(panels)]
    widest = max((w for w, _ in sizes), default=0.0)
    per_row = max(1, min(PANELS_PER_ROW, int((MAX_WIDTH - 2 * MARGIN + PANEL_GAP) // (widest + PANEL_GAP))))
    panel_rows = [list(range(i, min(i + per_row, len(panels)))) for i in range(0, len(panels), per_row)]
    row_widths = [sum(sizes[i][0] for i in row) + PANEL_GAP * (len(row) - 1) for row in panel_rows]
    row_heights = [max(sizes[i][1] for i in row) for row in panel_rows]

    # the header may widen a narrow drawing up to TEXT_WIDTH; past that its text is cut or wrapped
    label = labels[result.target] if labels and 0 <= result.target < len(labels) else f"class {result.target}"
    title = f"Structured attention graph: {label} (p = {result.full_score:.3f} on the full image)"
    baseline = result.details.get("baseline", "black")
    if panels:
        subtitle = (f"{result.grid}x{result.grid} patches, {baseline} baseline. Per root, level by level: up to "
                    f"{children} children with the largest drops (or the child the graph goes on from), {levels} "
                    f"levels. The graph has "
                    f"{_count(len(result.nodes), 'node')} and {_count(len(result.edges), 'edge')}"
                    f"{' (truncated)' if result.truncated else ''}; all are in the JSON.")
    else:
        subtitle = f"{result.grid}x{result.grid} patches, {baseline} baseline. No graph: no sufficient patch set was found."
    legend = "edge = one patch removed (outlined on the child); width and colour = drop, as a share of the full p"
    swatches = 5 * 26
    wanted = max(_text_width(title, TITLE_SIZE, bold=True), swatches + 8 + _text_width(legend, SMALL_SIZE))
    width = max(max(row_widths, default=0.0), min(wanted, TEXT_WIDTH - 2 * MARGIN), 360.0)
    title = _fit(title, TITLE_SIZE, width, bold=True)
    sub_lines = _wrap(subtitle, SMALL_SIZE, width)
    legend = _fit(legend, SMALL_SIZE, width - swatches - 8)
    header_h = 22 + LINE_H * len(sub_lines) + 30
    total_w = math.ceil(2 * MARGIN + width)
    body_h = sum(row_heights) + PANEL_GAP * (len(panel_rows) - 1) if panels else 24  # or the note
    total_h = math.ceil(2 * MARGIN + header_h + body_h)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" class="sag" '
           f'width="{total_w}" height="{total_h}" viewBox="0 0 {total_w} {total_h}" font-family="sans-serif" '
           f'data-children="{children}" data-levels="{levels}">',
           '<rect width="100%" height="100%" fill="#ffffff"/>',
           f'<text class="title" x="{MARGIN}" y="{MARGIN + 15}" font-size="{TITLE_SIZE}" font-weight="bold">'
           f'{_escape(title)}</text>']
    y = MARGIN + 22
    for line in sub_lines:
        y += LINE_H
        out.append(f'<text class="subtitle" x="{MARGIN}" y="{y - 3}" font-size="{SMALL_SIZE}" fill="#555">'
                   f'{_escape(line)}</text>')
    y += 16
    out.append('<g class="legend">')
    for k, share in enumerate((0.0, 0.25, 0.5, 0.75, 1.0)):
        stroke, stroke_w = canvas.edge_style(share * canvas.full)
        out.append(f'<line x1="{MARGIN + 26 * k + 2}" y1="{y - 4}" x2="{MARGIN + 26 * k + 22}" y2="{y - 4}" '
                   f'stroke="{stroke}" stroke-width="{stroke_w:.2f}"/>')
    out.append(f'<text x="{MARGIN + swatches + 8}" y="{y}" font-size="{SMALL_SIZE}" fill="#555">'
               f'{_escape(legend)}</text></g>')
    if not panels:
        out.append(f'<text class="no-graph" x="{MARGIN}" y="{MARGIN + header_h + 14}" font-size="13" '
                   f'fill="#aa0000">no graph: the search found no root to draw</text>')
    top = MARGIN + header_h
    for row, row_w, row_h in zip(panel_rows, row_widths, row_heights):
        left = MARGIN + (width - row_w) / 2
        for index in row:
            out.extend(canvas.panel(index, panels[index], left, top, sizes[index]))
            left += sizes[index][0] + PANEL_GAP
        top += row_h + PANEL_GAP
    out.append("</svg>")
    return "\n".join(out)


def _count(n: int, noun: str) -> str:
    """``"1 node"``, ``"2 nodes"``, ``"2 patches"``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}{'es' if noun.endswith('ch') else 's'}"


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def roots_overlay(result: SAGResult, image: Image.Image, box: tuple[float, float, float, float],
                  input_size: tuple[int, int], max_side: int, roots: list[tuple[int, ...]] | None = None) -> bytes:
    """PNG of the uploaded image (capped at ``max_side``) with the parts outside the graph's
    roots dimmed and each root's patches outlined in its own colour (root 1 = first colour)."""
    chosen = roots if roots is not None else [node.patches for node in result.graph_roots]
    width, height = fit_within(image.width, image.height, max_side)
    picture = image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
    sx, sy = width / image.width, height / image.height
    left, top, right, bottom = box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy
    input_h, input_w = input_size
    xs = [left + e / input_w * (right - left) for e in result.edges_x]
    ys = [top + e / input_h * (bottom - top) for e in result.edges_y]

    array = np.asarray(picture).astype(np.float32)
    lit = np.zeros((height, width), dtype=bool)
    for patches in chosen:
        for p in patches:
            r, c = divmod(p, result.grid)
            lit[round(ys[r]):round(ys[r + 1]), round(xs[c]):round(xs[c + 1])] = True
    dimmed = np.where(lit[..., None], array, array * DIM)
    canvas = Image.fromarray(np.clip(dimmed + 0.5, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    line = max(1, round(max(width, height) / 250))
    for index, patches in enumerate(chosen):
        colour = ROOT_COLOURS[index % len(ROOT_COLOURS)]
        for p in patches:
            r, c = divmod(p, result.grid)
            inset = index * line  # overlapping roots stay distinguishable
            draw.rectangle((round(xs[c]) + inset, round(ys[r]) + inset, round(xs[c + 1]) - 1 - inset,
                            round(ys[r + 1]) - 1 - inset), outline=colour, width=line)
        if patches:
            r, c = divmod(patches[0], result.grid)
            draw.text((round(xs[c]) + 3 * line, round(ys[r]) + 2 * line), str(index + 1), fill=colour,
                      font=_font(max(10, round((ys[r + 1] - ys[r]) / 3))))
    return encode_png(np.asarray(canvas))


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font at ``size`` px (older Pillow: its fixed bitmap font)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def root_pictures(result: SAGResult, image: Image.Image, box: tuple[float, float, float, float],
                  input_size: tuple[int, int], max_side: int) -> list[dict[str, Any]]:
    """One overlay PNG per found root (its patches lit, the rest dimmed)."""
    return [{"patches": list(root.patches),
             "png": roots_overlay(result, image, box, input_size, max_side, [root.patches])}
            for root in result.roots]
