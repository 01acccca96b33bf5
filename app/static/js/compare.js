// "Compare methods": every method on the chosen image and class in one row of cells, each with
// its overlay, deletion / insertion AUCs and time; a few images, one row each. The synchronous
// methods are asked one after the other (POST /v1/explain with metrics); the deep ones run as the
// job cards' jobs, with the parameters in their cards, and fill in as they finish. The rows
// download as one PNG.

import { ApiError, explain, getSynchronousMethods } from "./api.js";
import { el, percent, pngDataUrl, seconds, show, showError, stem } from "./dom.js";
import { METHOD_TITLES } from "./jobs.js";

// The seed article's figure first (Grad-CAM, Score-CAM, I-GOS, I-GOS++, SAG), then the others.
const FIRST = ["gradcam", "scorecam", "igos", "igos++", "sag"];
const MAX_ROWS = 4; // images compared at once; adding one more drops the oldest
const FIGURE_CELL = 200; // pixels of a cell's picture width in the downloaded figure
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

/** One compared image: its input, its base picture and one cell per method. */
class Row {
  constructor(input, methods, run) {
    this.input = input;
    this.run = run;
    this.label = input.targetLabel ?? `class ${input.target}`;
    this.baseUrl = URL.createObjectURL(input.file);
    this.cells = new Map(methods.map((method) => [method, new Cell(method, this.baseUrl)]));
    this.node = el("section", { class: "compare-row", "data-run": String(run) },
      el("h3", {}, `${input.file.name || "image"} · ${this.label}`),
      el("div", { class: "compare-cells" }, [...this.cells.values()].map((cell) => cell.node)));
  }

  get ended() {
    return [...this.cells.values()].every((c) => c.state === "done" || c.state === "error");
  }

  release() {
    URL.revokeObjectURL(this.baseUrl);
    this.node.remove();
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
    this.rows = [];
    this.run = 0;
    this.grid = document.getElementById("compare-grid");
    this.status = document.getElementById("compare-status");
    this.error = document.getElementById("compare-error");
    this.startButton = document.getElementById("compare-start");
    this.clearButton = document.getElementById("compare-clear");
    this.downloadButton = document.getElementById("compare-download");
    this.startButton.addEventListener("click", () => this.start());
    this.clearButton.addEventListener("click", () => this.clear());
    this.downloadButton.addEventListener("click", () => this.download());
    for (const card of cards) card.onChange((job) => this.jobChanged(card, job));
  }

  /** The latest row: the one the job cards' jobs belong to. */
  get current() {
    return this.rows.at(-1) ?? null;
  }

  /** A new image or class was chosen: the rows stay (they name their image); the next
   * comparison adds a row for it. */
  imageChanged() {
    this.status.textContent = this.rows.length
      ? "Add this image to the comparison, or clear it." : "Ready: compare every method on this image.";
  }

  clear() {
    this.run += 1;
    for (const row of this.rows) row.release();
    this.rows = [];
    this.grid.dataset.complete = "false";
    this.downloadButton.disabled = true;
    this.clearButton.disabled = true;
    this.startButton.disabled = false;
    this.imageChanged();
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
    // The deep cells of an unfinished row would wait for jobs the cards are about to replace.
    const previous = this.current;
    if (previous) {
      for (const card of this.cards) {
        const cell = previous.cells.get(card.spec.method);
        if (cell && cell.state !== "done" && cell.state !== "error") cell.failed("Not finished: the next image's job replaced it.");
      }
    }
    // The same image and class again replaces its row; beyond MAX_ROWS the oldest goes.
    for (const row of this.rows.filter((r) => r.input.file === input.file && r.input.target === input.target
        && r.input.model === input.model)) row.release();
    this.rows = this.rows.filter((r) => r.node.isConnected);
    while (this.rows.length >= MAX_ROWS) this.rows.shift().release();
    this.run += 1;
    const run = this.run;
    const row = new Row(input, this.methods(), run);
    this.rows.push(row);
    this.grid.append(row.node);
    this.startButton.disabled = true;
    this.clearButton.disabled = false;
    this.grid.dataset.run = String(run);
    this.update();
    // The queue works while the synchronous methods are asked: start the jobs first.
    for (const card of this.cards) {
      if (!row.cells.has(card.spec.method)) continue;
      row.cells.get(card.spec.method).running("Submitting the job…");
      card.start();
    }
    for (const method of this.syncMethods) {
      if (run !== this.run) return;
      await this.explainOne(row, method);
    }
    if (run === this.run) this.startButton.disabled = false;
    this.update();
  }

  async explainOne(row, method) {
    const cell = row.cells.get(method);
    cell.running("Computing…");
    this.update();
    try {
      const result = await explain({ image: row.input.file, method, model: row.input.model, target: row.input.target,
        topK: 1, extra: { metrics: "true" } });
      if (!row.node.isConnected) return;
      const mode = result.details?.mode ? ` (${result.details.mode}${result.details.channels
        ? `, ${result.details.channels} channels` : ""})` : ""; // Score-CAM: exact, or fast on N channels
      cell.done(result.heatmap.overlay_png, false, aucText(result.metrics) ?? "", result.timing_ms, row.label, mode);
    } catch (error) {
      if (!row.node.isConnected) return;
      const unsupported = error instanceof ApiError && error.status === 422;
      cell.failed(unsupported ? `Not for this model: ${error.message}` : (error.readable ?? String(error)));
    }
    this.update();
  }

  /** A job card's job changed: the latest row's cell follows it while it waits for it. */
  jobChanged(card, job) {
    const row = this.current;
    const cell = row?.cells.get(card.spec.method);
    if (!cell || cell.state === "done" || cell.state === "error") return;
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
      if (png) cell.done(png, isGraph, lines, result.timing_ms, row.label);
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
    const row = this.current;
    if (!row) return;
    const cells = [...row.cells.values()];
    const ended = cells.filter((c) => c.state === "done" || c.state === "error").length;
    const done = cells.filter((c) => c.state === "done").length;
    const images = this.rows.length > 1 ? ` (${this.rows.length} images compared)` : "";
    this.status.textContent = ended === cells.length
      ? `All ${cells.length} methods ended: ${done} drawn${done < cells.length ? `, ${cells.length - done} not` : ""}${images}.`
      : `${ended} of ${cells.length} methods ended; the rest fill in as they finish${images}.`;
    this.grid.dataset.complete = String(row.ended);
    this.downloadButton.disabled = !this.rows.some((r) => [...r.cells.values()].some((c) => c.state === "done"));
  }

  /** Every row as one PNG: a header of method titles, then per image its picture and each
   * method's cell (a method that did not draw leaves its reason). */
  async download() {
    const methods = [...new Set(this.rows.flatMap((r) => [...r.cells.keys()]))];
    const originals = await Promise.all(this.rows.map(async (row) => {
      const image = el("img", { src: row.baseUrl });
      await image.decode();
      return image;
    }));
    const ratio = Math.max(...originals.map((o) => o.naturalHeight / Math.max(o.naturalWidth, 1)));
    const pictureH = Math.round(FIGURE_CELL * ratio);
    const pad = 10;
    const cellW = FIGURE_CELL + pad;
    const cellH = pictureH + 2 * 16 + 2 * pad;
    const header = 28;
    const canvas = el("canvas", { width: String(pad + (1 + methods.length) * cellW),
      height: String(header + this.rows.length * cellH + pad) });
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    ctx.fillStyle = "#111";
    ctx.font = "bold 15px sans-serif";
    ["Image", ...methods.map(title)].forEach((text, column) => ctx.fillText(text, pad + column * cellW, 19, FIGURE_CELL));
    this.rows.forEach((row, r) => {
      const y = header + r * cellH;
      const original = originals[r];
      const height = Math.round(FIGURE_CELL * (original.naturalHeight / Math.max(original.naturalWidth, 1)));
      const entries = [{ picture: original, lines: [row.input.file.name || "image", row.label] },
        ...methods.map((method) => {
          const cell = row.cells.get(method);
          return { picture: cell?.state === "done" ? cell.overlay : null,
            lines: cell ? [cell.aucs.textContent, cell.time.textContent].filter(Boolean) : ["not compared"] };
        })];
      entries.forEach((entry, column) => {
        const x = pad + column * cellW;
        if (entry.picture) {
          if (entry.picture !== original) ctx.drawImage(original, x, y, FIGURE_CELL, height);
          ctx.drawImage(entry.picture, x, y, FIGURE_CELL, height);
        }
        ctx.font = "12px sans-serif";
        ctx.fillStyle = entry.picture ? "#333" : "#b42318";
        entry.lines.forEach((line, k) => ctx.fillText(line, x, y + pictureH + 14 + 16 * k, FIGURE_CELL));
      });
    });
    const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
    const url = URL.createObjectURL(blob);
    const first = this.rows[0]?.input.file.name;
    const link = el("a", { href: url, download: `${stem(first)}${this.rows.length > 1 ? `-and-${this.rows.length - 1}-more` : ""}-compare.png` });
    document.body.append(link);
    link.click();
    link.remove();
    window.setTimeout(() => URL.revokeObjectURL(url), 10_000);
  }
}
