// Deletion / insertion curves as an inline SVG line chart (no chart library, no build step).

const SVG_NS = "http://www.w3.org/2000/svg";

function svg(tag, attributes = {}, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

/** [[x, y], ...] from a list of y values (x spread evenly over 0..1) or from explicit pairs. */
export function toPoints(ys, xs = null) {
  if (!Array.isArray(ys) || ys.length === 0) return [];
  if (Array.isArray(ys[0])) return ys.map(([x, y]) => [Number(x), Number(y)]);
  const last = Math.max(ys.length - 1, 1);
  return ys.map((y, i) => [xs ? Number(xs[i]) : i / last, Number(y)]);
}

/**
 * A line chart of SERIES ({label, points, auc, kind: "deletion" | "insertion"}) with x and y in
 * [0, 1] (y grows to the largest value when a score exceeds 1). Returns an <svg> element whose
 * <title>/<desc> state the numbers for screen readers.
 */
export function curveChart(series, { xLabel = "fraction of the image removed / inserted", yLabel = "probability" } = {}) {
  const width = 360, height = 220;
  const m = { top: 14, right: 12, bottom: 40, left: 44 };
  const plotW = width - m.left - m.right, plotH = height - m.top - m.bottom;
  const yMax = Math.max(1, ...series.flatMap((s) => s.points.map(([, y]) => y)).filter(Number.isFinite));
  const sx = (x) => m.left + Math.min(Math.max(x, 0), 1) * plotW;
  const sy = (y) => m.top + plotH - (Math.max(y, 0) / yMax) * plotH;

  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img" });
  const summary = series.map((s) => `${s.label}${Number.isFinite(s.auc) ? ` AUC ${s.auc.toFixed(3)}` : ""}`).join(", ");
  root.append(svg("title", {}, "Deletion and insertion curves"), svg("desc", {}, summary));

  const grid = svg("g", { class: "chart-grid" });
  for (let i = 0; i <= 4; i += 1) {
    const y = (yMax * i) / 4, x = i / 4;
    grid.append(svg("line", { x1: m.left, x2: m.left + plotW, y1: sy(y), y2: sy(y) }));
    grid.append(svg("line", { x1: sx(x), x2: sx(x), y1: m.top, y2: m.top + plotH }));
    grid.append(svg("text", { x: m.left - 6, y: sy(y) + 4, "text-anchor": "end", class: "chart-tick" }, y.toFixed(2)));
    grid.append(svg("text", { x: sx(x), y: m.top + plotH + 16, "text-anchor": "middle", class: "chart-tick" }, x.toFixed(2)));
  }
  root.append(grid);
  root.append(svg("text", { x: m.left + plotW / 2, y: height - 6, "text-anchor": "middle", class: "chart-label" }, xLabel));
  root.append(svg("text", {
    x: 12, y: m.top + plotH / 2, "text-anchor": "middle", class: "chart-label",
    transform: `rotate(-90 12 ${m.top + plotH / 2})`,
  }, yLabel));

  for (const s of series) {
    if (s.points.length === 0) continue;
    const line = s.points.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" ");
    const area = `${sx(s.points[0][0]).toFixed(1)},${sy(0)} ${line} ${sx(s.points.at(-1)[0]).toFixed(1)},${sy(0)}`;
    root.append(svg("polygon", { points: area, class: `chart-area chart-${s.kind}` }));
    root.append(svg("polyline", { points: line, class: `chart-line chart-${s.kind}` }));
  }
  return root;
}
