// A study's page (/dashboard/studies/{id}): GET /v1/studies/{id}, polled while the study runs
// (as often as its Retry-After header says), with a progress bar and a Cancel button; once it
// has ended, its summary drawn section by section. Every number shown comes from the API.

import { ApiError, apiFetch, getBlob, heldKey } from "./api.js";
import { mountKeyForm } from "./auth.js";
import { UrlBag, downloadLink, el, percent, role, show, showError } from "./dom.js";
import { JOB_METHODS, METHOD_TITLES } from "./jobs.js";

const $ = (id) => document.getElementById(id);
const SVG_NS = "http://www.w3.org/2000/svg";

const RUNNING = new Set(["running", "canceling"]);
const DEFAULT_POLL_S = 2;
const MAX_POLL_S = 60;
const MAX_FAILURES = 6; // transient failures (network, 503) in a row before the page gives up
const PICTURES_AT_ONCE = 4; // gallery pictures fetched in parallel

const state = {
  id: studyIdFromPath(window.location.pathname),
  view: null,
  timer: null,
  failures: 0,
  summaryDrawn: false,
  cancelRequested: false,
  urls: new UrlBag(), // the gallery's pictures
};

/** The id in /dashboard/studies/{id} (a trailing slash tolerated); "" when there is none. */
function studyIdFromPath(pathname) {
  const parts = pathname.split("/").filter(Boolean);
  const at = parts.indexOf("studies");
  const raw = at >= 0 ? parts[at + 1] : undefined;
  try {
    return raw ? decodeURIComponent(raw) : "";
  } catch {
    return raw;
  }
}

function studyUrl(suffix = "") {
  return `/v1/studies/${encodeURIComponent(state.id)}${suffix}`;
}

// ---------------------------------------------------------------- formatting

function methodTitle(name) {
  return METHOD_TITLES[name] ?? JOB_METHODS.find((spec) => spec.method === name)?.title ?? name;
}

function fixed(value, digits = 3) {
  return typeof value === "number" && Number.isFinite(value) ? value.toFixed(digits) : "–";
}

function share(value, digits = 1) {
  return typeof value === "number" && Number.isFinite(value) ? percent(value, digits) : "–";
}

/** 0.05 -> "5 %", 0.125 -> "12.5 %": a budget or threshold as a share. */
function shareLabel(value) {
  return `${Number((100 * value).toFixed(2))} %`;
}

function plural(count, noun, nouns = `${noun}s`) {
  return `${count} ${count === 1 ? noun : nouns}`;
}

function timeElement(iso) {
  if (!iso) return "–";
  const moment = new Date(iso);
  const text = Number.isNaN(moment.getTime()) ? iso : moment.toLocaleString();
  return el("time", { datetime: iso }, text);
}

function duration(fromIso, toIso) {
  const ms = new Date(toIso).getTime() - new Date(fromIso).getTime();
  if (!Number.isFinite(ms) || ms < 0) return null;
  const s = Math.round(ms / 1000);
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${s % 60} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

// ---------------------------------------------------------------- SVG

function svg(tag, attributes = {}, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (value !== undefined && value !== null) node.setAttribute(key, String(value));
  }
  if (text !== undefined) node.textContent = text;
  return node;
}

/** An <svg role=img> with a label for screen readers (and a <title> for a mouse hover). */
function chartRoot(width, height, label, className = "") {
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: `chart study-chart ${className}`.trim(),
    role: "img", "aria-label": label });
  root.append(svg("title", {}, label));
  return root;
}

/** A round step for axis ticks: about COUNT ticks up to MAX. */
function tickStep(max, count = 4) {
  const raw = max / count;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((f) => f * magnitude).find((s) => s >= raw);
  return step ?? raw;
}

// ---------------------------------------------------------------- loading and polling

async function fetchStudy() {
  const response = await apiFetch(studyUrl(), { headers: { Accept: "application/json" } });
  const retry = Number.parseFloat(response.headers.get("Retry-After") ?? "");
  return { view: await response.json(), retryAfter: Number.isFinite(retry) && retry >= 0 ? retry : null };
}

function schedule(seconds) {
  window.clearTimeout(state.timer);
  const delay = Math.min(Math.max(seconds, 0.5), MAX_POLL_S);
  state.timer = window.setTimeout(refresh, delay * 1000);
}

function transient(error) {
  return error instanceof ApiError && (error.status === 0 || (error.status === 503 && error.code !== "queue_not_configured"));
}

async function refresh() {
  state.timer = null;
  let answer;
  try {
    answer = await fetchStudy();
  } catch (error) {
    if (error.name === "AbortError") return;
    state.failures += 1;
    if (transient(error) && state.failures < MAX_FAILURES) {
      const wait = Number(error.retryAfter) || DEFAULT_POLL_S * 2 ** state.failures;
      showFailure(error, ` Retrying in ${Math.round(Math.min(wait, MAX_POLL_S))} s…`);
      schedule(wait);
    } else {
      showFailure(error);
    }
    markReady();
    return;
  }
  state.failures = 0;
  showError($("study-error"), null);
  showError($("study-progress-error"), null);
  render(answer.view);
  markReady();
  if (RUNNING.has(answer.view.status)) schedule(answer.retryAfter ?? DEFAULT_POLL_S);
}

/** An error: in the progress card while a study is on screen, else in the page's head. */
function showFailure(error, tail = "") {
  const text = `${error instanceof ApiError ? error.readable : (error.message ?? String(error))}${tail}`;
  if (state.view) {
    showError($("study-progress-error"), text);
    return;
  }
  showError($("study-error"), text);
  const badge = $("study-status");
  badge.dataset.status = "error";
  badge.textContent = error instanceof ApiError && error.status === 404 ? "Not found" : "Unavailable";
  if (error instanceof ApiError && error.status === 404) $("h-study").textContent = "Study not found";
}

function markReady() {
  document.documentElement.dataset.ready = "true"; // the first answer (or error) is on screen
}

async function cancel() {
  const button = $("study-cancel");
  state.cancelRequested = true;
  $("study-progress-text").textContent = "Canceling…";
  $("study-progress-text").focus(); // the button is disabled, then goes: focus stays on the news
  button.disabled = true;
  try {
    const view = await (await apiFetch(studyUrl(), { method: "DELETE", headers: { Accept: "application/json" } })).json();
    render(view);
  } catch (error) {
    // 409: it finished meanwhile; the next poll shows how.
    if (!(error instanceof ApiError && error.status === 409)) {
      showError($("study-progress-error"), error);
      state.cancelRequested = false;
      button.disabled = false;
    }
  }
  if (state.timer === null && RUNNING.has(state.view?.status)) schedule(DEFAULT_POLL_S);
}

// ---------------------------------------------------------------- the head and the progress

function render(view) {
  state.view = view;
  renderHead(view);
  renderProgress(view);
  if (!RUNNING.has(view.status) && !state.summaryDrawn && view.summary) {
    state.summaryDrawn = true;
    renderSummary(view.summary, view);
  }
}

function renderHead(view) {
  const title = view.name || `Study ${view.id}`;
  $("h-study").textContent = title;
  document.title = `${title} · study · Unbox`;
  const badge = $("study-status");
  badge.dataset.status = view.status;
  badge.textContent = { running: "Running", canceling: "Canceling", succeeded: "Finished", canceled: "Canceled" }[view.status]
    ?? view.status;
  const spec = view.spec ?? {};
  const models = spec.models ?? [];
  const methods = (spec.methods ?? []).map((m) => m.name);
  const took = view.ended_at ? duration(view.created_at, view.ended_at) : null;
  const rows = [
    ["Study", el("code", {}, view.id)],
    ["Models × methods", `${plural(models.length, "model")} × ${plural(methods.length, "method")}: `
      + `${models.join(", ") || "–"} × ${methods.map(methodTitle).join(", ") || "–"}`],
    ["Images", `${view.images ?? "–"} (${plural(view.progress?.total ?? 0, "item")})`],
    ["Created", timeElement(view.created_at)],
    ["Ended", view.ended_at ? [timeElement(view.ended_at), took ? ` (after ${took})` : ""] : "not yet"],
  ];
  $("study-meta").replaceChildren(...rows.flatMap(([term, value]) => [
    el("div", { class: "study-meta-row" }, el("dt", {}, term), el("dd", {}, value))]));
  const downloads = $("study-downloads");
  if (!downloads.childElementCount) downloads.append(csvLink(view));
}

/** items.csv. A plain link cannot carry the API key: with a key held, a click fetches the file
 * with it and saves it from an object URL. */
function csvLink(view) {
  const href = view.links?.items_csv ?? studyUrl("/items.csv");
  const filename = `study-${view.id}-items.csv`;
  const link = downloadLink(href, filename, "items.csv (one row per image, model and method)");
  link.id = "study-items-csv";
  link.addEventListener("click", async (event) => {
    if (!heldKey()) return; // no key (auth off): the server answers the link itself
    event.preventDefault();
    if (link.dataset.state === "loading") return;
    link.dataset.state = "loading";
    link.setAttribute("aria-disabled", "true");
    try {
      const url = URL.createObjectURL(await getBlob(href));
      const save = el("a", { href: url, download: filename, hidden: true });
      document.body.append(save);
      save.click();
      save.remove();
      window.setTimeout(() => URL.revokeObjectURL(url), 60_000);
      showError($("study-error"), null);
    } catch (error) {
      showError($("study-error"), error);
    } finally {
      delete link.dataset.state;
      link.removeAttribute("aria-disabled");
    }
  });
  return link;
}

function renderProgress(view) {
  const section = $("study-progress");
  const progress = view.progress ?? {};
  const total = progress.total ?? 0;
  const done = progress.done ?? 0;
  section.dataset.status = view.status;
  show(section, true);
  const bar = $("study-bar");
  bar.max = Math.max(total, 1);
  bar.value = total ? done : (RUNNING.has(view.status) ? 0 : 1);
  const fraction = total ? done / total : 1;
  const text = {
    running: `Running · ${done} of ${plural(total, "item")} ended (${percent(fraction, 0)})`,
    canceling: `Canceling · ${done} of ${plural(total, "item")} ended; the running ones are stopping`,
    succeeded: `Finished · all ${plural(total, "item")} ended`,
    canceled: `Canceled · ${done} of ${plural(total, "item")} ended`,
  }[view.status] ?? `${view.status} · ${done} of ${total}`;
  $("study-progress-text").textContent = text;
  const counts = [["succeeded", "Succeeded"], ["failed", "Failed"], ["canceled", "Canceled"], ["cached", "From earlier results"]];
  $("study-counts").replaceChildren(...counts.map(([key, label]) => el("li", { dataset: { count: key } },
    el("span", { class: "study-count-dot", "aria-hidden": "true" }), `${label} `, el("strong", {}, progress[key] ?? 0))));
  const button = $("study-cancel");
  const running = RUNNING.has(view.status);
  if (!running && button.contains(document.activeElement)) $("study-progress-text").focus();
  show(button, running);
  button.disabled = view.status !== "running" || state.cancelRequested;
  section.setAttribute("aria-busy", String(running));
}

// ---------------------------------------------------------------- the summary

function sectionParts(name) {
  const node = $(`study-${name}`);
  return { node, body: role(node, "body") };
}

function renderSummary(summary, view) {
  const drawers = [
    ["faithfulness", renderFaithfulness],
    ["subexplanations", renderSubexplanations],
    ["crosstest", renderCrosstest],
    ["regions", renderRegions],
    ["agreement", renderAgreement],
  ];
  for (const [name, draw] of drawers) {
    if (!summary[name]) continue;
    try {
      draw(summary[name], view);
    } catch (error) {
      // one odd section must not take the others with it
      const { node, body } = sectionParts(name);
      body.replaceChildren(el("p", { class: "alert", role: "alert" }, `This section could not be drawn: ${error.message}`));
      show(node, true);
    }
  }
}

function tableScroll(table, label) {
  return el("div", { class: "table-scroll", role: "region", tabindex: "0", "aria-label": label }, table);
}

// ----- faithfulness

function renderFaithfulness(data) {
  const { node, body } = sectionParts("faithfulness");
  const per = Array.isArray(data.per) ? data.per : [];
  const parts = [];
  const protocol = describeProtocol(data.protocol);
  if (protocol) parts.push(el("p", { class: "hint" }, `Measured with ${protocol}.`));
  if (!per.length) {
    parts.push(el("p", { class: "muted" }, "No item has both AUCs (its method makes no map, or it failed)."));
  } else {
    const highs = per.flatMap((e) => ["deletion", "insertion"].flatMap((k) => [e[k]?.mean, e[k]?.ci95?.[1]]));
    const yMax = Math.max(1, ...highs.filter(Number.isFinite));
    parts.push(el("div", { class: "study-charts" }, per.map((entry) => faithfulnessFigure(entry, yMax))));
    parts.push(el("ul", { class: "legend" },
      el("li", { class: "legend-deletion" }, el("span", { class: "swatch" }), "Deletion AUC (lower is better)"),
      el("li", { class: "legend-insertion" }, el("span", { class: "swatch" }), "Insertion AUC (higher is better)"),
      el("li", {}, el("span", { class: "swatch swatch-whisker" }), "95 % bootstrap interval of the mean")));
    parts.push(tableScroll(faithfulnessTable(per), "Faithfulness table"));
  }
  body.replaceChildren(...parts);
  show(node, true);
}

function describeProtocol(protocol) {
  if (!protocol || typeof protocol !== "object") return typeof protocol === "string" ? protocol : null;
  const bits = [];
  if (protocol.steps !== undefined) bits.push(`${protocol.steps} steps`);
  if (protocol.unit) bits.push(`${protocol.unit} units`);
  for (const [key, value] of Object.entries(protocol)) {
    if (["steps", "unit", "method"].includes(key) || value === null || typeof value === "object") continue;
    bits.push(`${key.replace(/_/g, " ")} ${value}`);
  }
  return bits.length ? bits.join(", ") : null;
}

function faithfulnessFigure(entry, yMax) {
  const width = 240, height = 190;
  const m = { top: 18, right: 10, bottom: 28, left: 38 };
  const plotW = width - m.left - m.right, plotH = height - m.top - m.bottom;
  const sy = (y) => m.top + plotH - (Math.min(Math.max(y, 0), yMax) / yMax) * plotH;
  const describe = (kind) => {
    const part = entry[kind] ?? {};
    const ci = part.ci95 ?? [];
    return `${kind} AUC mean ${fixed(part.mean)} (95 % interval ${fixed(ci[0])} to ${fixed(ci[1])})`;
  };
  const label = `${entry.model} · ${methodTitle(entry.method)}: ${describe("deletion")}, ${describe("insertion")}, n = ${entry.n}`;
  const root = chartRoot(width, height, label, "faithfulness-chart");
  const grid = svg("g", { class: "chart-grid" });
  const step = tickStep(yMax);
  for (let y = 0; y <= yMax + 1e-9; y += step) {
    grid.append(svg("line", { x1: m.left, x2: m.left + plotW, y1: sy(y), y2: sy(y) }));
    grid.append(svg("text", { x: m.left - 6, y: sy(y) + 4, "text-anchor": "end", class: "chart-tick" }, Number(y.toFixed(2))));
  }
  root.append(grid);
  root.append(svg("text", { x: 11, y: m.top + plotH / 2, "text-anchor": "middle", class: "chart-label",
    transform: `rotate(-90 11 ${m.top + plotH / 2})` }, "AUC"));
  const slot = plotW / 2;
  const barW = Math.min(56, slot * 0.55);
  ["deletion", "insertion"].forEach((kind, i) => {
    const part = entry[kind] ?? {};
    const mean = Number.isFinite(part.mean) ? part.mean : 0;
    const x = m.left + slot * i + (slot - barW) / 2;
    const cx = x + barW / 2;
    root.append(svg("rect", {
      x, y: sy(mean), width: barW, height: Math.max(sy(0) - sy(mean), 0), rx: 2,
      class: `bar bar-${kind}`, "data-kind": kind, "data-model": entry.model, "data-method": entry.method,
      "data-value": part.mean,
    }));
    const [low, high] = part.ci95 ?? [];
    if (Number.isFinite(low) && Number.isFinite(high)) {
      const whisker = svg("g", { class: "whisker" });
      whisker.append(svg("line", { x1: cx, x2: cx, y1: sy(low), y2: sy(high) }));
      for (const end of [low, high]) whisker.append(svg("line", { x1: cx - 7, x2: cx + 7, y1: sy(end), y2: sy(end) }));
      root.append(whisker);
    }
    const top = Math.min(sy(mean), Number.isFinite(high) ? sy(high) : sy(mean));
    root.append(svg("text", { x: cx, y: Math.max(top - 5, 10), "text-anchor": "middle", class: "chart-value" }, fixed(part.mean)));
    root.append(svg("text", { x: cx, y: m.top + plotH + 17, "text-anchor": "middle", class: "chart-tick" },
      kind === "deletion" ? "Deletion ↓" : "Insertion ↑"));
  });
  return el("figure", { class: "study-figure", dataset: { model: entry.model, method: entry.method } },
    el("figcaption", {}, el("strong", {}, entry.model), ` · ${methodTitle(entry.method)}`,
      el("span", { class: "study-n" }, `n = ${entry.n}`)),
    root);
}

function faithfulnessTable(per) {
  const cells = (part) => [el("td", {}, fixed(part?.mean)), el("td", {}, fixed(part?.median)),
    el("td", { class: "interval" }, `${fixed(part?.ci95?.[0])} – ${fixed(part?.ci95?.[1])}`)];
  return el("table", { class: "study-table" },
    el("caption", {}, "Deletion and insertion AUC per model and method: mean, median and the 95 % bootstrap interval of the mean"),
    el("thead", {},
      el("tr", {}, el("th", { scope: "col", rowspan: 2, class: "text" }, "Model"),
        el("th", { scope: "col", rowspan: 2, class: "text" }, "Method"),
        el("th", { scope: "col", rowspan: 2 }, "n"), el("th", { scope: "colgroup", colspan: 3 }, "Deletion (lower is better)"),
        el("th", { scope: "colgroup", colspan: 3 }, "Insertion (higher is better)")),
      el("tr", {}, ["Mean", "Median", "95 % interval", "Mean", "Median", "95 % interval"].map((t) => el("th", { scope: "col" }, t)))),
    el("tbody", {}, per.map((e) => el("tr", {}, el("th", { scope: "row" }, e.model), el("td", {}, methodTitle(e.method)),
      el("td", {}, e.n), cells(e.deletion), cells(e.insertion)))));
}

// ----- sub-explanations

function renderSubexplanations(data) {
  const { node, body } = sectionParts("subexplanations");
  const thresholds = Array.isArray(data.thresholds) ? data.thresholds : [];
  const perModel = Array.isArray(data.per_model) ? data.per_model : [];
  const select = $("subexpl-threshold");
  select.replaceChildren(...thresholds.map((t, i) => el("option", { value: i, selected: i === 0 }, `${t} of the full score`)));
  show(select.closest(".study-control"), thresholds.length > 1);
  const grid = el("div", { class: "study-models" });
  const draw = () => {
    const position = Number(select.value) || 0;
    grid.replaceChildren(...perModel.map((entry) => subexplanationCard(entry, position, thresholds[position])));
  };
  const parts = [];
  if (data.reading?.text) parts.push(el("p", { class: "study-reading" }, data.reading.text));
  parts.push(el("p", { class: "hint" }, `Minimal sufficient explanations (MSEs) found by ${methodTitle(data.method ?? "sag")}; `
    + "a sub-explanation is a subset of an MSE's patches that still keeps the threshold's share of the full-image score."));
  if (perModel.length) {
    draw();
    parts.push(grid);
  } else {
    parts.push(el("p", { class: "muted" }, "No image has sub-explanation counts (the method's items failed)."));
  }
  select.onchange = draw;
  body.replaceChildren(...parts);
  show(node, true);
}

function subexplanationCard(entry, position, threshold) {
  const counts = entry.counts?.[position] ?? entry.counts?.find((c) => c.threshold === threshold) ?? {};
  const stats = [
    ["Images", entry.images],
    ["MSEs per image", `${fixed(entry.mses_per_image?.mean, 2)} (median ${fixed(entry.mses_per_image?.median, 1)})`],
    ["MSE size", `${fixed(entry.mse_size?.mean, 2)} patches (median ${fixed(entry.mse_size?.median, 1)})`],
    [`Sub-explanations per MSE at ${threshold}`, `${fixed(counts.mean, 2)} (median ${fixed(counts.median, 1)})`],
  ];
  return el("article", { class: "study-model", dataset: { model: entry.model } },
    el("h3", {}, entry.model),
    el("dl", { class: "study-stats" }, stats.map(([term, value]) => el("div", {}, el("dt", {}, term), el("dd", {}, value)))),
    histogram(counts.histogram ?? { edges: [0, 1], counts: [0] }, entry.model, threshold));
}

function histogram({ edges, counts }, model, threshold) {
  const width = 360, height = 200;
  const m = { top: 14, right: 10, bottom: 40, left: 40 };
  const plotW = width - m.left - m.right, plotH = height - m.top - m.bottom;
  const binWidth = edges.length > 1 ? edges[1] - edges[0] : 1;
  const binLabel = (k) => (binWidth === 1 ? `${edges[k]}` : `${edges[k]}–${edges[k + 1] - 1}`);
  const yMax = Math.max(1, ...counts);
  const step = Math.max(1, Math.ceil(tickStep(yMax)));
  const top = Math.ceil(yMax / step) * step;
  const sy = (y) => m.top + plotH - (y / top) * plotH;
  const slot = plotW / Math.max(counts.length, 1);
  const spoken = counts.map((c, k) => `${binLabel(k)}: ${c}`).join(", ");
  const root = chartRoot(width, height,
    `Histogram of sub-explanation counts per MSE for ${model} at threshold ${threshold}: ${spoken}`, "histogram");
  const grid = svg("g", { class: "chart-grid" });
  for (let y = 0; y <= top; y += step) {
    grid.append(svg("line", { x1: m.left, x2: m.left + plotW, y1: sy(y), y2: sy(y) }));
    grid.append(svg("text", { x: m.left - 6, y: sy(y) + 4, "text-anchor": "end", class: "chart-tick" }, y));
  }
  root.append(grid);
  const every = Math.ceil(counts.length / 12); // at most about 12 labels under the bars
  counts.forEach((count, k) => {
    const x = m.left + k * slot;
    const bar = svg("rect", { x: x + slot * 0.1, y: sy(count), width: slot * 0.8, height: sy(0) - sy(count), rx: 1.5,
      class: "bar bar-histogram", "data-bin": binLabel(k), "data-value": count });
    bar.append(svg("title", {}, `${binLabel(k)} sub-explanations: ${plural(count, "MSE")}`));
    root.append(bar);
    if (k % every === 0) {
      root.append(svg("text", { x: x + slot / 2, y: m.top + plotH + 15, "text-anchor": "middle", class: "chart-tick" }, binLabel(k)));
    }
  });
  root.append(svg("text", { x: m.left + plotW / 2, y: height - 6, "text-anchor": "middle", class: "chart-label" },
    "sub-explanations per MSE"));
  root.append(svg("text", { x: 11, y: m.top + plotH / 2, "text-anchor": "middle", class: "chart-label",
    transform: `rotate(-90 11 ${m.top + plotH / 2})` }, "MSEs"));
  return root;
}

// ----- crosstest

const MEASURES = {
  accuracy: ["Accuracy", "the share of images whose top-1 class for the viewer is the true label"],
  retention: ["Confidence retention", "the viewer's score for its class on the region alone over its score on the full image"],
};

// A sequential scale (light to dark blue), readable on both themes: value 0..1 -> colour.
const HEAT_STOPS = [[247, 251, 255], [198, 219, 239], [107, 174, 214], [33, 113, 181], [8, 48, 107]];

function heatColour(value) {
  const v = Math.min(Math.max(value, 0), 1) * (HEAT_STOPS.length - 1);
  const i = Math.min(Math.floor(v), HEAT_STOPS.length - 2);
  const t = v - i;
  const [a, b] = [HEAT_STOPS[i], HEAT_STOPS[i + 1]];
  return `rgb(${a.map((c, k) => Math.round(c + (b[k] - c) * t)).join(", ")})`;
}

function renderCrosstest(data) {
  const { node, body } = sectionParts("crosstest");
  const budgets = Array.isArray(data.budgets) ? data.budgets : [];
  const models = Array.isArray(data.models) ? data.models : [];
  const matrix = Array.isArray(data.matrix) ? data.matrix : [];
  const [measure, meaning] = MEASURES[data.measure] ?? [data.measure ?? "Value", "the summary's measure"];
  const select = $("crosstest-budget");
  select.replaceChildren(...budgets.map((b, i) => el("option", { value: i, selected: i === 0 }, `${shareLabel(b)} of the image`)));
  show(select.closest(".study-control"), budgets.length > 1);
  const holder = el("div", { class: "heatmap-holder" });
  const draw = () => {
    const position = Number(select.value) || 0;
    holder.replaceChildren(tableScroll(crosstestTable(models, matrix, position, budgets[position], measure, data.method),
      "Crosstest matrix"));
  };
  draw();
  select.onchange = draw;
  const fill = data.fill === "black" ? "black" : "blurred";
  body.replaceChildren(
    el("p", { class: "hint" }, el("strong", {}, `${measure}: `), `${meaning}. Each row's model (the source) chose the `
      + `region, the most salient pixels of its ${methodTitle(data.method ?? "")} map; each column's model (the viewer) `
      + `saw only that region, the rest of the image ${fill}.`),
    holder,
    el("div", { class: "heat-legend", "aria-hidden": "true" },
      el("span", {}, "0"), el("span", { class: "heat-legend-bar" }), el("span", {}, "1"),
      el("span", { class: "hint" }, ` ${measure.toLowerCase()}`)));
  show(node, true);
}

function crosstestTable(models, matrix, position, budget, measure, method) {
  const find = (source, viewer) => matrix.find((e) => e.source === source && e.viewer === viewer);
  const caption = `${measure}, ${budget === undefined ? "the region" : `${shareLabel(budget)} of the image`} kept `
    + "(rows: source model, columns: viewer model)";
  return el("table", { class: "study-table heatmap", dataset: { budget: budget ?? "" } },
    el("caption", {}, caption),
    el("thead", {}, el("tr", {}, el("th", { scope: "col" }, el("span", { class: "visually-hidden" }, "Source model"),
      el("span", { "aria-hidden": "true" }, "source ↓ · viewer →")),
    models.map((viewer) => el("th", { scope: "col" }, viewer)))),
    el("tbody", {}, models.map((source) => el("tr", {}, el("th", { scope: "row" }, source), models.map((viewer) => {
      const entry = find(source, viewer);
      const value = entry?.values?.[position];
      const known = typeof value === "number" && Number.isFinite(value);
      return el("td", {
        class: "heat-cell",
        dataset: { source, viewer, value: known ? String(value) : "" },
        style: known ? `background: ${heatColour(value)}; color: ${value > 0.55 ? "#fff" : "#0b1a33"}` : null,
        title: `${source} regions shown to ${viewer}: ${known ? value.toFixed(4) : "no value"}, n = ${entry?.n ?? 0}`,
      }, known ? value.toFixed(2) : "–");
    })))));
}

// ----- regions and the gallery

function renderRegions(data) {
  const { node, body } = sectionParts("regions");
  const per = Array.isArray(data.per) ? data.per : [];
  const parts = [el("p", { class: "hint" }, "Share: the part of the map's mass inside the region. Pointing: how often "
    + "the map's peak lies inside. Both should be high for an expected region and low for a forbidden one.")];
  if (per.length) parts.push(tableScroll(regionsTable(per), "Regions table"));
  else parts.push(el("p", { class: "muted" }, "No item with a region has a map."));
  const ranked = Array.isArray(data.ranked) ? data.ranked : [];
  if (!ranked.length && per.length) parts.push(el("p", { class: "muted" }, "No item is ranked as suspicious."));
  body.replaceChildren(...parts);
  show(node, true);
  if (ranked.length) renderGallery(ranked);
}

function regionsTable(per) {
  const group = (rates) => [el("td", {}, rates?.n ?? 0), el("td", {}, share(rates?.mean_share)),
    el("td", {}, share(rates?.pointing_rate))];
  return el("table", { class: "study-table" },
    el("caption", {}, "Mean share of the map inside the region and pointing-game rate, per model and method"),
    el("thead", {},
      el("tr", {}, el("th", { scope: "col", rowspan: 2, class: "text" }, "Model"),
        el("th", { scope: "col", rowspan: 2, class: "text" }, "Method"),
        el("th", { scope: "colgroup", colspan: 3 }, "All regions"),
        el("th", { scope: "colgroup", colspan: 3 }, "Expected (high is good)"),
        el("th", { scope: "colgroup", colspan: 3 }, "Forbidden (low is good)")),
      el("tr", {}, [0, 1, 2].flatMap(() => ["n", "Share", "Pointing"]).map((t) => el("th", { scope: "col" }, t)))),
    el("tbody", {}, per.map((e) => el("tr", { dataset: { model: e.model, method: e.method } },
      el("th", { scope: "row" }, e.model), el("td", {}, methodTitle(e.method)),
      group(e), group(e.expected), group(e.forbidden)))));
}

function renderGallery(ranked) {
  const { node, body } = sectionParts("gallery");
  state.urls.clear();
  node.dataset.state = "loading";
  const items = ranked.map((entry, rank) => {
    const img = el("img", { alt: `${methodTitle(entry.method)} map of ${entry.model} over ${entry.path}` });
    const kind = entry.region_kind === "forbidden" ? "forbidden" : "expected";
    const li = el("li", { class: "gallery-item", dataset: { index: entry.index, kind, state: "loading" } },
      el("figure", {},
        el("div", { class: "gallery-frame" }, img, el("span", { class: "gallery-rank", "aria-hidden": "true" }, rank + 1)),
        el("figcaption", {},
          el("span", { class: "gallery-path", title: entry.path }, entry.path),
          el("span", {}, `${entry.model} · ${methodTitle(entry.method)}`),
          el("span", {}, el("span", { class: `region-kind region-${kind}` }, `${kind} region`),
            ` · suspicion ${fixed(entry.suspicion, 2)} · share ${share(entry.region_share)}`
            + `${entry.pointing_hit === true ? " · peak inside" : entry.pointing_hit === false ? " · peak outside" : ""}`))));
    return { entry, img, li };
  });
  body.replaceChildren(el("ol", { class: "gallery", "aria-label": "Suspicious items, most suspicious first" },
    items.map((item) => item.li)));
  show(node, true);
  loadPictures(items).finally(() => { node.dataset.state = "ready"; });
}

/** The overlays, fetched with the key (an <img src> cannot send it), a few at a time. */
async function loadPictures(items) {
  const queue = [...items];
  const worker = async () => {
    for (let item = queue.shift(); item; item = queue.shift()) {
      try {
        const blob = await getBlob(studyUrl(`/items/${encodeURIComponent(item.entry.index)}/overlay.png`));
        item.img.src = state.urls.add(blob);
        await item.img.decode();
        item.li.dataset.state = "ready";
      } catch (error) {
        item.li.dataset.state = "error";
        const why = error instanceof ApiError ? error.readable : "The picture could not be shown.";
        item.img.replaceWith(el("p", { class: "empty" }, `No picture: ${why}`));
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(PICTURES_AT_ONCE, queue.length) }, worker));
}

// ----- agreement

function renderAgreement(data) {
  const { node, body } = sectionParts("agreement");
  const perModel = Array.isArray(data.per_model) ? data.per_model : [];
  const parts = [];
  if (data.grid) parts.push(el("p", { class: "hint" }, `Both maps are resampled to ${data.grid} × ${data.grid} before ranking.`));
  if (perModel.length) {
    parts.push(el("div", { class: "study-models" }, perModel.map((entry) => el("div", { class: "table-scroll" },
      el("table", { class: "study-table agreement-table", dataset: { model: entry.model } },
        el("caption", {}, entry.model),
        el("thead", {}, el("tr", {}, ["Methods", "n", "Mean", "Median"].map((t, i) => el("th", { scope: "col", class: i ? null : "text" }, t)))),
        el("tbody", {}, (entry.pairs ?? []).map((pair) => el("tr", {},
          el("th", { scope: "row" }, `${methodTitle(pair.a)} vs ${methodTitle(pair.b)}`), el("td", {}, pair.n),
          el("td", {}, fixed(pair.spearman?.mean, 3)), el("td", {}, fixed(pair.spearman?.median, 3))))))))));
  } else {
    parts.push(el("p", { class: "muted" }, "No image has maps of two methods to compare."));
  }
  body.replaceChildren(...parts);
  show(node, true);
}

// ---------------------------------------------------------------- start

mountKeyForm(); // first: the calls below may answer 401 and need its prompt
$("study-cancel").addEventListener("click", cancel);
$("study-progress-text").setAttribute("tabindex", "-1"); // focus lands here when Cancel disappears
if (state.id) {
  $("h-study").textContent = `Study ${state.id}`;
  refresh();
} else {
  showFailure(new ApiError(404, "study_not_found", "this address names no study"));
  markReady();
}
