// The Structured Attention Graph viewer: the server's SVG (one panel per root) fitted to the
// card's width, with pan (drag, arrow keys) and zoom (Ctrl + wheel or pinch, +/-, buttons) done on its viewBox,
// and a click on a node drawing that node's patches large from the uploaded image.

import { el, percent } from "./dom.js";

const MAX_ZOOM = 8;
const STEP = 1.4; // zoom factor of one button press, key press or wheel notch
const DRAG_SLOP_PX = 4; // a pointer that moved less than this clicked
const DETAIL_SIDE = 360; // CSS pixels of the longer side of the large node picture

/** The viewBox of SVG as {x, y, w, h} (its width and height attributes when it has none). */
function readViewBox(svg) {
  const box = (svg.getAttribute("viewBox") ?? "").trim().split(/[\s,]+/).map(Number);
  if (box.length === 4 && box.every(Number.isFinite) && box[2] > 0 && box[3] > 0) {
    return { x: box[0], y: box[1], w: box[2], h: box[3] };
  }
  return { x: 0, y: 0, w: Number(svg.getAttribute("width")) || 1, h: Number(svg.getAttribute("height")) || 1 };
}

/** Pan and zoom of one SVG on its viewBox; the full drawing is zoom 1. */
class ViewBox {
  constructor(svg) {
    this.svg = svg;
    this.full = readViewBox(svg);
    this.view = { ...this.full };
  }

  get zoom() {
    return this.full.w / this.view.w;
  }

  apply() {
    const { x, y, w, h } = this.view;
    this.svg.setAttribute("viewBox", `${x.toFixed(2)} ${y.toFixed(2)} ${w.toFixed(2)} ${h.toFixed(2)}`);
    this.svg.dataset.zoom = this.zoom.toFixed(3);
  }

  /** Keep the view inside the drawing. */
  clamp() {
    const { full, view } = this;
    view.x = Math.min(Math.max(view.x, full.x), full.x + full.w - view.w);
    view.y = Math.min(Math.max(view.y, full.y), full.y + full.h - view.h);
  }

  /** Zoom by FACTOR (> 1 = closer) keeping the drawing point (cx, cy) where it is. */
  zoomBy(factor, cx = this.view.x + this.view.w / 2, cy = this.view.y + this.view.h / 2) {
    const zoom = Math.min(Math.max(this.zoom * factor, 1), MAX_ZOOM);
    const w = this.full.w / zoom;
    const h = this.full.h / zoom;
    this.view = { x: cx - (cx - this.view.x) * (w / this.view.w), y: cy - (cy - this.view.y) * (h / this.view.h), w, h };
    this.clamp();
    this.apply();
  }

  /** Move the view by (dx, dy) drawing units. */
  panBy(dx, dy) {
    this.view.x += dx;
    this.view.y += dy;
    this.clamp();
    this.apply();
  }

  reset() {
    this.view = { ...this.full };
    this.apply();
  }

  /** The drawing point under the client point (px, py). */
  toDrawing(px, py) {
    const rect = this.svg.getBoundingClientRect();
    return {
      x: this.view.x + ((px - rect.left) / Math.max(rect.width, 1)) * this.view.w,
      y: this.view.y + ((py - rect.top) / Math.max(rect.height, 1)) * this.view.h,
    };
  }

  /** Drawing units per client pixel. */
  get unitsPerPixel() {
    return this.view.w / Math.max(this.svg.getBoundingClientRect().width, 1);
  }
}

function patchesOf(node) {
  return (node.getAttribute("data-patches") ?? "").split(/[\s,]+/).filter(Boolean).map(Number);
}

/** A canvas with the model's view of the uploaded image, only PATCHES visible (the rest shows
 * the result's baseline: black, or the picture blurred), the visible patches outlined. */
async function drawPatches(imageUrl, result, patches) {
  const region = result.region;
  const edges = result.patch_edges;
  const grid = result.grid;
  if (!region?.box || !region?.input || !edges?.x || !edges?.y || !grid) return null;
  const image = new Image();
  image.src = imageUrl;
  await image.decode();
  const [left, top, right, bottom] = region.box;
  const [inputH, inputW] = region.input;
  const scale = DETAIL_SIDE / Math.max(inputW, inputH);
  const width = Math.round(inputW * scale);
  const height = Math.round(inputH * scale);
  const canvas = el("canvas", { width: String(width), height: String(height), class: "node-canvas" });
  const ctx = canvas.getContext("2d");
  const drawRegion = () => ctx.drawImage(image, left, top, right - left, bottom - top, 0, 0, width, height);
  const xs = edges.x.map((v) => v * (width / inputW));
  const ys = edges.y.map((v) => v * (height / inputH));
  const rect = (p) => {
    const row = Math.floor(p / grid);
    const col = p % grid;
    return [xs[col], ys[row], xs[col + 1] - xs[col], ys[row + 1] - ys[row]];
  };
  // the hidden parts first (the whole canvas), then the kept patches on top of them
  if (result.baseline === "blur") {
    ctx.filter = `blur(${((50 / 224) * Math.max(width, height)).toFixed(1)}px)`;
    drawRegion();
    ctx.filter = "none";
  } else {
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, width, height);
  }
  const kept = new Set(patches);
  for (const p of kept) {
    const [x, y, w, h] = rect(p);
    ctx.save();
    ctx.beginPath();
    ctx.rect(x, y, w, h);
    ctx.clip();
    drawRegion();
    ctx.restore();
  }
  ctx.strokeStyle = "rgba(255, 255, 255, 0.7)";
  ctx.lineWidth = 1;
  for (const p of kept) {
    const [x, y, w, h] = rect(p);
    ctx.strokeRect(x + 0.5, y + 0.5, w - 1, h - 1);
  }
  return canvas;
}

/**
 * The graph SVG inside a pan-and-zoom viewer with a node detail panel.
 * @param svg a safe, detached <svg> (results.safeSvg)
 * @param result the job's result (grid, patch_edges, region, baseline, full_score)
 * @param imageUrl an object URL of the uploaded image, for the large node picture
 * @param caption "Egyptian cat (class 285, 93.1%)", for labels
 */
export function graphViewer(svg, result, imageUrl, caption) {
  svg.classList.add("sag-svg");
  svg.setAttribute("role", "group"); // its nodes are buttons, which an img role would hide
  svg.setAttribute("aria-label", `Structured attention graph for ${caption}`);
  const view = new ViewBox(svg);
  svg.dataset.width = String(view.full.w); // the drawing's own size, before it is fitted to the card
  svg.dataset.height = String(view.full.h);
  svg.removeAttribute("width");
  svg.removeAttribute("height");
  view.apply();

  const viewport = el("div", { class: "graph-viewport", tabindex: "0", "data-role": "graph-viewport",
    "aria-label": "Structured attention graph: drag or arrow keys to pan, + and - to zoom, 0 to fit" }, svg);
  const zoomLabel = el("output", { class: "hint", "data-role": "zoom-level" }, "100%");
  const showZoom = () => { zoomLabel.textContent = percent(view.zoom, 0); };
  const button = (label, text, action) => {
    const b = el("button", { type: "button", class: "chip", "aria-label": label, "data-role": label.toLowerCase()
      .replaceAll(" ", "-") }, text);
    b.addEventListener("click", () => { action(); showZoom(); });
    return b;
  };
  const toolbar = el("div", { class: "graph-controls" },
    button("Zoom in", "+", () => view.zoomBy(STEP)),
    button("Zoom out", "−", () => view.zoomBy(1 / STEP)),
    button("Fit", "Fit", () => view.reset()),
    zoomLabel);

  // Ctrl + wheel (and a trackpad's pinch, which arrives as one) zooms; a plain wheel scrolls the page.
  viewport.addEventListener("wheel", (event) => {
    if (!event.ctrlKey && !event.metaKey) return;
    event.preventDefault();
    const point = view.toDrawing(event.clientX, event.clientY);
    view.zoomBy(event.deltaY < 0 ? STEP : 1 / STEP, point.x, point.y);
    showZoom();
  }, { passive: false });

  let drag = null;
  viewport.addEventListener("pointerdown", (event) => {
    if (event.button !== 0) return;
    delete viewport.dataset.dragged;
    drag = { x: event.clientX, y: event.clientY, moved: false, id: event.pointerId };
  });
  viewport.addEventListener("pointermove", (event) => {
    if (!drag || drag.id !== event.pointerId) return;
    const dx = event.clientX - drag.x;
    const dy = event.clientY - drag.y;
    if (!drag.moved && Math.hypot(dx, dy) < DRAG_SLOP_PX) return;
    if (!drag.moved) viewport.setPointerCapture?.(event.pointerId);
    drag.moved = true;
    const units = view.unitsPerPixel;
    view.panBy(-dx * units, -dy * units);
    drag.x = event.clientX;
    drag.y = event.clientY;
    viewport.classList.add("is-dragging");
  });
  const endDrag = (event) => {
    if (drag?.moved) {
      event.preventDefault();
      viewport.dataset.dragged = "true"; // the click that follows a drag is not a node choice
    }
    drag = null;
    viewport.classList.remove("is-dragging");
  };
  viewport.addEventListener("pointerup", endDrag);
  viewport.addEventListener("pointercancel", endDrag);

  viewport.addEventListener("keydown", (event) => {
    const pan = view.view.w / 8;
    const keys = {
      "+": () => view.zoomBy(STEP), "=": () => view.zoomBy(STEP), "-": () => view.zoomBy(1 / STEP),
      0: () => view.reset(), ArrowLeft: () => view.panBy(-pan, 0), ArrowRight: () => view.panBy(pan, 0),
      ArrowUp: () => view.panBy(0, -pan), ArrowDown: () => view.panBy(0, pan),
    };
    const action = keys[event.key];
    if (!action || event.target !== viewport) return;
    event.preventDefault();
    action();
    showZoom();
  });

  const detail = el("figure", { class: "node-detail", "data-role": "node-detail", hidden: "" });
  let chosen = null;
  const choose = async (node) => {
    chosen?.classList.remove("is-chosen");
    chosen = node;
    node.classList.add("is-chosen");
    const patches = patchesOf(node);
    const score = Number(node.getAttribute("data-score"));
    const full = Number(result.full_score) || null;
    const relative = Number(node.getAttribute("data-relative")) || (full ? score / full : null);
    const grid = Number(result.grid) || null;
    const text = [
      `p = ${score.toFixed(3)}`,
      relative !== null ? `${percent(relative, 0)} of the full image's ${full !== null ? full.toFixed(3) : "score"}` : null,
      `${patches.length}${grid ? ` of ${grid * grid}` : ""} patches visible`,
    ].filter(Boolean).join(" · ");
    let picture = null;
    try {
      picture = await drawPatches(imageUrl, result, patches);
    } catch {
      picture = null; // the browser cannot decode the upload: the enlarged thumbnail instead
    }
    if (chosen !== node) return; // another node was chosen meanwhile
    if (!picture) {
      const href = node.querySelector("image")?.getAttribute("href");
      picture = href ? el("img", { src: href, alt: "", class: "node-canvas" }) : null;
    }
    detail.replaceChildren(...[picture,
      el("figcaption", {}, el("strong", { "data-role": "node-score" }, text),
        el("span", { class: "hint" }, ` Patches ${patches.join(", ")} (row-major, ${grid ?? "?"} per row).`))]
      .filter(Boolean));
    detail.dataset.node = node.getAttribute("data-node") ?? "";
    detail.hidden = false;
  };
  for (const node of svg.querySelectorAll("g.node")) {
    node.setAttribute("tabindex", "0");
    node.setAttribute("role", "button");
    node.setAttribute("aria-label", `Node: ${patchesOf(node).length} patches, p = ${Number(node.getAttribute("data-score")).toFixed(3)}`);
    node.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") {
        event.preventDefault();
        choose(node);
      }
    });
  }
  svg.addEventListener("click", (event) => {
    if (viewport.dataset.dragged === "true") {
      delete viewport.dataset.dragged;
      return;
    }
    const node = event.target.closest?.("g.node");
    if (node) choose(node);
  });

  const hint = el("p", { class: "hint" }, "Drag to pan; Ctrl + scroll, pinch or + / − to zoom; click a node to see "
    + "its patches large.");
  return el("div", { class: "graph-view", "data-role": "graph-view" }, toolbar, viewport, hint, detail);
}
