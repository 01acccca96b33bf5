// "Compare methods": every method on the chosen image and class in one grid, each cell with its
// overlay, deletion / insertion AUCs and time. The synchronous methods are asked one after the
// other (POST /v1/explain with metrics); the deep ones run as the job cards' jobs, with the
// parameters in their cards, and fill in as they finish. The grid downloads as one PNG.

import { ApiError, explain, getSynchronousMethods } from "./api.js";
import { el, percent, pngDataUrl, seconds, show, showError, stem } from "./dom.js";
import { METHOD_TITLES } from "./jobs.js";

// The seed article's figure first (Grad-CAM, Score-CAM, I-GOS, I-GOS++, SAG), then the others.
const FIRST = ["gradcam", "scorecam", "igos", "igos++", "sag"];
const FIGURE_COLUMNS = 5;
const FIGURE_CELL = 240; // CSS pixels of a cell's picture width in the downloaded figure
const DEEP_TITLES = { igos: "I-GOS", "igos++": "I-GOS++", sag: "SAG" };

function title(method) {
  return METHOD_TITLES[method] ?? DEEP_TITLES[method] ?? method;
}

function aucText(metrics) {
  if (!metrics || typeof metrics.deletion_auc !== "number") return null;
  return `deletion ${metrics.deletion_auc.toFixed(3)} · insertion ${metrics.insertion_auc.toFixed(3)}`;
}

/** One method's cell: title, picture, AUCs, time; data-state pending | running | done | error. */
class Cell {
  constructor(method, baseUrl) {
    this.method = method;
    this.title = title(method);
    this.overlay = el("img", { class: "stack-overlay", alt: "", hidden: true, "data-role": "overlay" });
    this.base = el("img", { class: "stack-base", alt: "", src: baseUrl });
    this.aucs = el("p", { class: "compare-aucs", "data-role": "aucs" }, "");
    this.time = el("p", { class: "hint", "data-role": "time" }, "Waiting…");
    this.node = el("figure", { class: "compare-cell", "data-method": method, "data-state": "pending" },
      el("figcaption", {}, el("strong", {}, this.title)),
      el("div", { class: "stack" }, this.base, this.overlay),
      this.aucs, this.time);
  }

  get state() {
    return this.node.dataset.state;
  }

  running(text) {
    this.node.dataset.state = "running";
    this.time.textContent = text;
  }

  /** A result: PNG (base64) shown over the image (or instead of it when WHOLE), its lines;
   * TIMING is the result's timing_ms: the explanation's own time is shown, not the scoring's. */
  done(png, whole, aucs, timing, label, note = "") {
    const timeMs = timing?.explain ?? timing?.optimise ?? timing?.total;
    this.overlay.src = pngDataUrl(png);
    this.overlay.alt = `${this.title} for ${label}`;
    this.overlay.classList.toggle("is-whole", whole);
    show(this.overlay, true);
    this.aucs.textContent = aucs;
    this.time.textContent = typeof timeMs === "number" ? `explained in ${seconds(timeMs)}${note}` : note.trim();
    this.node.dataset.state = "done";
  }

  failed(text) {
    this.node.dataset.state = "error";
    show(this.overlay, false);
    this.aucs.textContent = text;
    this.time.textContent = "";
  }
}

export class CompareGrid {
  /**
   * @param getInput () => {file, model, target, targetLabel} or null, as the job cards use
   * @param cards the job cards, by method; the deep methods of the grid are theirs
   */
  constructor(getInput, cards) {
    this.getInput = getInput;
    this.cards = cards;
    this.syncMethods = [];
    this.cells = new Map();
    this.run = 0;
    this.grid = document.getElementById("compare-grid");
    this.status = document.getElementById("compare-status");
    this.error = document.getElementById("compare-error");
    this.startButton = document.getElementById("compare-start");
    this.downloadButton = document.getElementById("compare-download");
    this.startButton.addEventListener("click", () => this.start());
    this.downloadButton.addEventListener("click", () => this.download());
    for (const card of cards) card.onChange((job) => this.jobChanged(card, job));
  }

  /** A new image: the old grid no longer describes it. */
  reset() {
    this.run += 1;
    this.cells.clear();
    this.grid.replaceChildren();
    if (this.baseUrl) URL.revokeObjectURL(this.baseUrl); // the cells that showed it are gone
    this.baseUrl = null;
    this.downloadButton.disabled = true;
    this.status.textContent = "Ready: compare every method on this image.";
    showError(this.error, null);
  }

  methods() {
    const deep = this.cards.filter((card) => card.available !== false).map((card) => card.spec.method);
    const all = [...new Set([...this.syncMethods, ...deep])];
    const rank = (m) => (FIRST.includes(m) ? FIRST.indexOf(m) : FIRST.length + Object.keys(METHOD_TITLES).indexOf(m));
    return all.sort((a, b) => rank(a) - rank(b));
  }

  async start() {
    showError(this.error, null);
    const input = this.getInput();
    if (!input?.file || input.target === null || input.target === undefined) {
      showError(this.error, "Choose an image first (step 1) and wait for its predictions.");
      return;
    }
    if (!this.syncMethods.length) {
      try {
        this.syncMethods = await getSynchronousMethods(); // the /v1/explain method enum
      } catch (error) {
        showError(this.error, error);
        return;
      }
    }
    this.reset();
    const run = this.run;
    this.input = input;
    this.baseUrl = URL.createObjectURL(input.file);
    this.label = input.targetLabel ?? `class ${input.target}`;
    for (const method of this.methods()) {
      const cell = new Cell(method, this.baseUrl);
      this.cells.set(method, cell);
      this.grid.append(cell.node);
    }
    this.startButton.disabled = true;
    this.grid.dataset.run = String(run);
    // The queue works while the synchronous methods are asked: start the jobs first.
    for (const card of this.cards) {
      if (!this.cells.has(card.spec.method)) continue;
      this.cells.get(card.spec.method).running("Submitting the job…");
      card.start();
    }
    for (const method of this.syncMethods) {
      if (run !== this.run) return;
      await this.explainOne(method, run);
    }
    this.startButton.disabled = false;
    this.update();
  }

  async explainOne(method, run) {
    const cell = this.cells.get(method);
    cell.running("Computing…");
    this.update();
    try {
      const result = await explain({ image: this.input.file, method, model: this.input.model, target: this.input.target,
        topK: 1, extra: { metrics: "true" } });
      if (run !== this.run) return;
      const mode = result.details?.mode ? ` (${result.details.mode}${result.details.channels
        ? `, ${result.details.channels} channels` : ""})` : ""; // Score-CAM: exact, or fast on N channels
      cell.done(result.heatmap.overlay_png, false, aucText(result.metrics) ?? "", result.timing_ms, this.label, mode);
    } catch (error) {
      if (run !== this.run) return;
      const unsupported = error instanceof ApiError && error.status === 422;
      cell.failed(unsupported ? `Not for this model: ${error.message}` : (error.readable ?? String(error)));
    }
    this.update();
  }

  /** A job card's job changed: its cell follows it while this grid waits for it. */
  jobChanged(card, job) {
    const cell = this.cells.get(card.spec.method);
    if (!cell || cell.state === "done" || cell.state === "error" || !this.input) return;
    const result = job.result;
    if (job.status === "succeeded" && result) {
      const isGraph = !result.heatmap && result.picture_png;
      const png = result.heatmap?.overlay_png ?? result.picture_png;
      const roots = Array.isArray(result.roots) ? result.roots : [];
      const best = roots.length ? Math.max(...roots.map((r) => r.relative ?? 0)) : null;
      const lines = isGraph
        ? `not a heat map: ${roots.length} root${roots.length === 1 ? "" : "s"}${best !== null
          ? `, the best keeps ${percent(best, 0)} of p` : ""}`
        : (aucText(result.metrics) ?? "");
      if (png) cell.done(png, isGraph, lines, result.timing_ms, this.label);
      else cell.failed("The result has no picture.");
    } else if (job.status === "failed" || job.status === "canceled") {
      const why = job.error?.readable ?? job.error?.message ?? job.status;
      cell.failed(`The job ${job.status === "canceled" ? "was canceled" : `failed: ${why}`}`);
    } else if (job.status === "queued") {
      cell.running(typeof job.queue_position === "number" ? `Queued (${job.queue_position} ahead)` : "Queued");
    } else if (job.status === "running") {
      cell.running(`Running · ${percent(job.progress ?? 0, 0)}`);
    }
    this.update();
  }

  update() {
    const cells = [...this.cells.values()];
    const ended = cells.filter((c) => c.state === "done" || c.state === "error").length;
    const done = cells.filter((c) => c.state === "done").length;
    this.status.textContent = ended === cells.length
      ? `All ${cells.length} methods ended: ${done} drawn${done < cells.length ? `, ${cells.length - done} not` : ""}.`
      : `${ended} of ${cells.length} methods ended; the rest fill in as they finish.`;
    this.grid.dataset.complete = String(ended === cells.length);
    this.downloadButton.disabled = done === 0;
  }

  /** The grid as one PNG: the original, then every drawn method, FIGURE_COLUMNS per row. */
  async download() {
    const original = el("img", { src: this.baseUrl });
    await original.decode();
    const ratio = original.naturalHeight / Math.max(original.naturalWidth, 1);
    const pictureH = Math.round(FIGURE_CELL * ratio);
    const drawn = [...this.cells.values()].filter((c) => c.state === "done");
    const entries = [{ title: "Image", lines: [this.label], picture: original }, ...drawn.map((c) => ({
      title: c.title, lines: [c.aucs.textContent, c.time.textContent].filter(Boolean), picture: c.overlay }))];
    const pad = 12;
    const cellW = FIGURE_CELL + pad;
    const cellH = 22 + pictureH + 2 * 16 + pad;
    const columns = Math.min(FIGURE_COLUMNS, entries.length);
    const rows = Math.ceil(entries.length / columns);
    const header = 34;
    const canvas = el("canvas", { width: String(pad + columns * cellW), height: String(header + rows * cellH + pad) });
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    ctx.fillStyle = "#111";
    ctx.font = "bold 16px sans-serif";
    ctx.fillText(`${this.input.file.name || "image"} · ${this.input.model || "default model"} · ${this.label}`, pad, 22);
    for (const [i, entry] of entries.entries()) {
      const x = pad + (i % columns) * cellW;
      const y = header + Math.floor(i / columns) * cellH;
      ctx.fillStyle = "#111";
      ctx.font = "bold 14px sans-serif";
      ctx.fillText(entry.title, x, y + 15, FIGURE_CELL);
      if (entry.picture !== original) ctx.drawImage(original, x, y + 22, FIGURE_CELL, pictureH);
      ctx.drawImage(entry.picture, x, y + 22, FIGURE_CELL, pictureH);
      ctx.font = "12px sans-serif";
      ctx.fillStyle = "#333";
      entry.lines.forEach((line, k) => ctx.fillText(line, x, y + 22 + pictureH + 15 + 16 * k, FIGURE_CELL));
    }
    const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
    const url = URL.createObjectURL(blob);
    const link = el("a", { href: url, download: `${stem(this.input.file.name)}-compare.png` });
    document.body.append(link);
    link.click();
    link.remove();
    window.setTimeout(() => URL.revokeObjectURL(url), 10_000);
  }
}
