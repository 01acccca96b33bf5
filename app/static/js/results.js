// Reading job results (I-GOS / I-GOS++ masks with their curves, SAG graphs) into page
// elements. Field names follow the job contract; missing fields are skipped, never fatal.

import { curveChart, toPoints } from "./charts.js";
import { el } from "./dom.js";

const CURVE_KINDS = ["deletion", "insertion"];

function firstArray(...values) {
  return values.find((v) => Array.isArray(v) && v.length > 0) ?? null;
}

function firstNumber(...values) {
  const found = values.find((v) => typeof v === "number" && Number.isFinite(v));
  return found ?? null;
}

/** One curve of kind KIND from a metrics-like object, whatever its exact shape. */
function readCurve(source, kind) {
  if (!source || typeof source !== "object") return null;
  const entry = source[kind];
  let ys = null, xs = null, auc = null;
  if (Array.isArray(entry)) {
    ys = entry;
  } else if (entry && typeof entry === "object") {
    ys = firstArray(entry.curve, entry.scores, entry.probabilities, entry.values, entry.y, entry.points);
    xs = firstArray(entry.fractions, entry.x, entry.fraction);
    auc = firstNumber(entry.auc, entry.AUC, entry.area);
  } else if (typeof entry === "number") {
    auc = entry;
  }
  ys = ys ?? firstArray(source[`${kind}_curve`], source.curves?.[kind]?.curve, source.curves?.[kind]);
  xs = xs ?? firstArray(source.fractions, source.fraction, source.x, source.curves?.fractions, source.curves?.fraction);
  auc = auc ?? firstNumber(source[`${kind}_auc`], source.auc?.[kind], source.aucs?.[kind], source.curves?.[kind]?.auc);
  if (!ys && auc === null) return null;
  const points = ys ? toPoints(ys, xs && xs.length === ys.length ? xs : null) : [];
  return { kind, label: kind === "deletion" ? "Deletion (lower is better)" : "Insertion (higher is better)", points, auc };
}

/** Deletion / insertion curves and the protocol they were measured under, from a result. */
export function readCurves(result) {
  const sources = [result?.metrics, result?.curves, result?.metrics?.curves, result?.faithfulness, result];
  const curves = [];
  for (const kind of CURVE_KINDS) {
    for (const source of sources) {
      const curve = readCurve(source, kind);
      if (curve) {
        curves.push(curve);
        break;
      }
    }
  }
  const protocol = result?.metrics?.protocol ?? result?.curves?.protocol ?? result?.protocol ?? null;
  return { curves, protocol };
}

function describeProtocol(protocol) {
  if (!protocol) return null;
  if (typeof protocol === "string") return protocol;
  const text = (v) => (Array.isArray(v) ? v.join(" x ") : v && typeof v === "object" ? (v.kind ?? null) : v);
  return Object.entries(protocol)
    .map(([k, v]) => [k, text(v)])
    .filter(([, v]) => v !== null && v !== undefined && v !== "")
    .map(([k, v]) => `${k.replaceAll("_", " ")}: ${v}`)
    .join(" · ");
}

/** The curves figure: chart, legend with AUCs and the protocol; null when there are none. */
export function curvesFigure(result) {
  const { curves, protocol } = readCurves(result);
  if (curves.length === 0) return null;
  const plotted = curves.filter((c) => c.points.length > 0);
  const legend = el("ul", { class: "legend" }, curves.map((c) => el("li", { class: `legend-${c.kind}` },
    el("span", { class: "swatch", "aria-hidden": "true" }),
    c.label, c.auc !== null ? el("strong", {}, ` AUC ${c.auc.toFixed(3)}`) : null)));
  const text = describeProtocol(protocol);
  return el("figure", { class: "curves" },
    plotted.length ? curveChart(plotted) : null,
    legend,
    text ? el("figcaption", { class: "hint" }, `Protocol: ${text}`) : null);
}

// Elements and attributes an inline SVG from the server may keep: drawing only, no scripts.
const SVG_FORBIDDEN = new Set(["script", "foreignobject", "iframe", "object", "embed"]);

/** Parse an SVG string into a detached, script-free <svg> element (null when unparsable). */
export function safeSvg(text) {
  if (typeof text !== "string" || !text.includes("<svg")) return null;
  const doc = new DOMParser().parseFromString(text, "image/svg+xml");
  const root = doc.documentElement;
  if (!root || root.nodeName.toLowerCase() !== "svg" || doc.querySelector("parsererror")) return null;
  for (const node of [root, ...root.querySelectorAll("*")]) {
    const name = node.nodeName.toLowerCase();
    if (SVG_FORBIDDEN.has(name)) {
      node.remove();
      continue;
    }
    if (name === "a" && node !== root) {
      node.replaceWith(...node.childNodes); // keep the drawing, drop the link
      continue;
    }
    for (const attribute of [...node.attributes]) {
      const name = attribute.name.toLowerCase();
      const value = attribute.value.trim().toLowerCase();
      if (name.startsWith("on") || ((name === "href" || name === "xlink:href") && !value.startsWith("data:image/")
          && !value.startsWith("#"))) {
        node.removeAttribute(attribute.name);
      }
    }
  }
  return document.importNode(root, true);
}

/** Patch indices of a root, whatever the root's shape ({patches}, {patch_set}, or a list). */
export function rootPatches(root) {
  if (Array.isArray(root)) return root;
  return firstArray(root?.patches, root?.patch_set, root?.cells, root?.key) ?? [];
}

export function rootScore(root) {
  return firstNumber(root?.score, root?.probability, root?.confidence, root?.relative_score);
}
