"""Structured Attention Graphs as pictures: an SVG of the graph and a PNG of the roots.

The SVG lays the graph out in levels (roots on the top row; a node of ``s`` patches sits
``largest root size - s`` rows down), orders each row by the mean position of its parents,
and draws every node as a thumbnail of the image the model saw with only the node's patches
visible (the rest shows the baseline), its probability and its share of the full image's
probability. Edges get wider and brighter with the drop in probability that removing their
patch causes. The patches are drawn with exactly the crisp geometry used for masking, mapped
from the model input onto the picture. Pure Pillow + NumPy: no system packages.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from explainers.colormaps import lookup_table
from explainers.render import encode_png, fit_within
from explainers.sag import SAGNode, SAGResult

ROOT_COLOURS = ((46, 204, 113), (52, 152, 219), (241, 196, 15), (231, 76, 60), (155, 89, 182),
                (26, 188, 156), (230, 126, 34), (236, 240, 241))
THUMB_SIDE = 96
DIM = 0.3  # brightness of the parts outside the roots in the overlay


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


def layout(nodes: list[SAGNode], parents: dict[int, list[int]]) -> dict[int, tuple[int, int]]:
    """``(row, column)`` per node id: rows are levels, a row ordered by its parents' mean column."""
    rows: dict[int, list[SAGNode]] = {}
    for node in nodes:
        rows.setdefault(node.level, []).append(node)
    placed: dict[int, tuple[int, int]] = {}
    for level in sorted(rows):
        members = rows[level]
        if level > 0:
            def centre(node: SAGNode) -> float:
                cols = [placed[p][1] for p in parents.get(node.id, []) if p in placed]
                return sum(cols) / len(cols) if cols else float("inf")
            members = sorted(members, key=lambda n: (centre(n), -n.score, n.id))
        for column, node in enumerate(members):
            placed[node.id] = (level, column)
    return placed


def render_svg(result: SAGResult, image: Image.Image, box: tuple[float, float, float, float],
               input_size: tuple[int, int], labels: tuple[str, ...] | None = None,
               thumb_side: int = THUMB_SIDE) -> str:
    """The SAG as an SVG document (one ``<g class="node">`` per node, one ``<line class="edge">``
    per edge), thumbnails embedded as base64 JPEG."""
    region = model_region(image, box, thumb_side)
    picture = np.asarray(region)
    thumb_h, thumb_w = picture.shape[:2]
    index_map = patch_index_map(result, thumb_w, thumb_h, input_size)
    hidden = baseline_picture(picture, str(result.details.get("baseline", "black")))

    parents: dict[int, list[int]] = {}
    for edge in result.edges:
        parents.setdefault(edge.target, []).append(edge.source)
    positions = layout(result.nodes, parents)
    row_sizes: dict[int, int] = {}
    for row, column in positions.values():
        row_sizes[row] = max(row_sizes.get(row, 0), column + 1)
    rows = sorted(row_sizes)
    row_index = {row: i for i, row in enumerate(rows)}
    gap_x, gap_y, text_h, margin, header = 16, 56, 30, 20, 44
    cell_w, cell_h = thumb_w + gap_x, thumb_h + text_h + gap_y
    widest = max(row_sizes.values(), default=1)
    full = max(result.full_score, 1e-12)
    table = lookup_table("inferno")
    label = labels[result.target] if labels and 0 <= result.target < len(labels) else f"class {result.target}"
    title = f"Structured attention graph: {label} (p = {result.full_score:.3f} on the full image)"
    subtitle = (f"{result.grid}x{result.grid} patches, {result.details.get('baseline', 'black')} baseline; roots on "
                f"top; edge width and colour = drop in probability when the patch is removed")
    width = max(2 * margin + widest * cell_w, 2 * margin + 8.5 * len(title), 2 * margin + 6 * len(subtitle))
    height = 2 * margin + header + max(1, len(rows)) * cell_h

    def corner(node_id: int) -> tuple[float, float]:
        row, column = positions[node_id]
        offset = (width - 2 * margin - row_sizes[row] * cell_w) / 2
        return margin + offset + column * cell_w + gap_x / 2, margin + header + row_index[row] * cell_h

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
           f'width="{width:.0f}" height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" '
           f'font-family="sans-serif" class="sag">',
           '<rect width="100%" height="100%" fill="#ffffff"/>',
           f'<text x="{margin}" y="{margin + 14}" font-size="14" font-weight="bold">{_escape(title)}</text>',
           f'<text x="{margin}" y="{margin + 32}" font-size="11" fill="#555">{_escape(subtitle)}</text>',
           '<g class="edges">']
    for edge in result.edges:
        sx, sy = corner(edge.source)
        tx, ty = corner(edge.target)
        share = float(np.clip(edge.drop / full, 0.0, 1.0))
        colour = _hex(table[int(round(40 + 180 * share))])
        out.append(f'<line class="edge" x1="{sx + thumb_w / 2:.1f}" y1="{sy + thumb_h + text_h - 4:.1f}" '
                   f'x2="{tx + thumb_w / 2:.1f}" y2="{ty:.1f}" stroke="{colour}" '
                   f'stroke-width="{0.6 + 7 * share:.2f}" stroke-opacity="0.8" data-source="{edge.source}" '
                   f'data-target="{edge.target}" data-removed="{edge.removed}" data-drop="{edge.drop:.4f}">'
                   f'<title>remove patch {edge.removed}: {edge.drop:+.3f}</title></line>')
    out.append('</g><g class="nodes">')
    for node in result.nodes:
        x, y = corner(node.id)
        uri = _jpeg_data_uri(keep_patches(picture, hidden, index_map, node.patches))
        frame = _hex(ROOT_COLOURS[0]) if node.root else "#888888"
        patches = " ".join(str(p) for p in node.patches)
        out.append(f'<g class="node{" root" if node.root else ""}" id="node-{node.id}" data-patches="{patches}" '
                   f'data-score="{node.score:.6f}">'
                   f'<image x="{x:.1f}" y="{y:.1f}" width="{thumb_w}" height="{thumb_h}" href="{uri}" xlink:href="{uri}"/>'
                   f'<rect x="{x:.1f}" y="{y:.1f}" width="{thumb_w}" height="{thumb_h}" fill="none" '
                   f'stroke="{frame}" stroke-width="{3 if node.root else 1}"/>'
                   f'<text x="{x + thumb_w / 2:.1f}" y="{y + thumb_h + 13:.1f}" font-size="11" text-anchor="middle">'
                   f'{node.score:.3f} ({node.score / full:.0%})</text>'
                   f'<title>{len(node.patches)} patches: {patches}</title></g>')
    out.append("</g></svg>")
    return "\n".join(out)


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
