// Queued explanations (I-GOS, I-GOS++, SAG): one card per method that submits a job, polls
// GET /v1/jobs/{id} for live progress (as often as its Retry-After says), shows the queue
// position and the parameters the job runs with, cancels with DELETE and draws the result.

import { ApiError, cancelJob, getBlob, getJob, heldKey, jobPictureUrl, submitJob } from "./api.js";
import {
  UrlBag, base64ToBlob, downloadLink, el, jsonBlob, percent, pngDataUrl, role, seconds, show, showError, stem,
} from "./dom.js";
import { graphViewer } from "./graph_view.js";
import { curvesFigure, rootPatches, rootScore, safeSvg } from "./results.js";

// Parameter presets: "Paper settings" sends nothing (the server's defaults); the others trade
// fidelity for speed on a CPU-only machine. The API rejects unknown names with a 422.
const IGOS_PRESETS = [
  { label: "Paper settings", params: {} },
  { label: "CPU preset", params: { preset: "cpu" } },
  { label: "Quick look", params: { preset: "cpu", mask_size: 14, iterations: 4, steps: 4 } },
];

export const JOB_METHODS = [
  {
    method: "igos",
    title: "I-GOS",
    desc: "The smallest, smoothest mask whose removal destroys the model's confidence, found with integrated gradients.",
    kind: "mask",
    presets: IGOS_PRESETS,
  },
  {
    method: "igos++",
    title: "I-GOS++",
    desc: "Deletion and insertion masks optimised together; scored with deletion and insertion curves.",
    kind: "mask",
    presets: IGOS_PRESETS,
  },
  {
    method: "sag",
    title: "Structured Attention Graph",
    desc: "Several minimal sets of patches that each keep the model confident, and how confidence falls as patches go.",
    kind: "graph",
    presets: [
      { label: "Paper settings", params: {} },
      { label: "Quick (coarser)", params: { grid: 5, beam_width: 2, successors: 6, max_roots: 4 } },
    ],
  },
];

// Readable titles of the heat-map methods (the synchronous ones, also offered as jobs beyond the
// three above); a method missing here is shown by its API name.
export const METHOD_TITLES = {
  gradcam: "Grad-CAM",
  scorecam: "Score-CAM",
  cam: "CAM",
  "gradcam++": "Grad-CAM++",
  xgradcam: "XGrad-CAM",
  layercam: "LayerCAM",
  hirescam: "HiResCAM",
  eigencam: "Eigen-CAM",
  rollout: "Attention rollout",
};

/** A card spec for a job method the page has no special drawing for (a heat-map result). */
export function extraMethodSpec(info) {
  return {
    method: info.name,
    title: `${METHOD_TITLES[info.name] ?? info.name} (as a job)`,
    desc: info.description || "A heat-map method run on the queue.",
    kind: "mask",
    noun: "heat map",
    curvesExpected: false,
    presets: [],
  };
}

/** "name = default" for each parameter of a JSON schema, for the hint under the editor. */
function describeParams(schema) {
  const properties = schema?.properties ?? {};
  return Object.entries(properties).map(([name, p]) => {
    const fallback = p.default === undefined ? "" : ` = ${JSON.stringify(p.default)}`;
    return `${name}${fallback}`;
  }).join(", ");
}

const TERMINAL = new Set(["succeeded", "failed", "canceled"]);
const POLL_MS = 1000; // when the server sends no Retry-After
const MIN_POLL_MS = 250;
const MAX_POLL_FAILURES = 8;

function jobErrorText(error) {
  if (!error) return "The job failed without a message.";
  if (typeof error === "string") return `The job failed: ${error}`;
  const code = error.code ? ` (${error.code})` : "";
  return `The job failed: ${error.message ?? JSON.stringify(error)}${code}`;
}

/** One method's card: start / cancel buttons, progress bar, status line, error and result. */
export class JobCard {
  /**
   * @param spec one of JOB_METHODS
   * @param template the <template> holding the card's markup
   * @param getInput () => {file, model, target, targetLabel} for the image and class chosen above
   */
  constructor(spec, template, getInput) {
    this.spec = spec;
    this.getInput = getInput;
    this.urls = new UrlBag();
    this.job = null;
    this.timer = null;
    this.failures = 0;
    this.node = template.content.firstElementChild.cloneNode(true);
    this.node.dataset.method = spec.method;
    this.node.id = `job-${spec.method.replace(/\+/g, "p").replace(/\W/g, "-")}`; // igos++ -> job-igospp
    const titleId = `${this.node.id}-title`;
    const title = role(this.node, "title");
    title.textContent = spec.title;
    title.id = titleId;
    this.node.setAttribute("aria-labelledby", titleId);
    role(this.node, "desc").textContent = spec.desc;
    this.startButton = role(this.node, "start");
    this.cancelButton = role(this.node, "cancel");
    this.startButton.setAttribute("aria-label", `Start ${spec.title}`);
    this.cancelButton.setAttribute("aria-label", `Cancel ${spec.title}`);
    this.progress = role(this.node, "progress");
    this.progress.setAttribute("aria-label", `${spec.title} progress`);
    this.status = role(this.node, "status");
    this.error = role(this.node, "error");
    this.result = role(this.node, "result");
    this.downloads = role(this.node, "downloads");
    this.params = role(this.node, "params");
    const paramsId = `${this.node.id}-params`;
    this.params.id = paramsId;
    role(this.node, "params-label").setAttribute("for", paramsId);
    this.paramsHint = role(this.node, "params-hint");
    this.paramsUsed = role(this.node, "params-used");
    this.listeners = new Set();
    this.params.setAttribute("aria-describedby", `${paramsId}-hint`);
    this.paramsHint.id = `${paramsId}-hint`;
    this.renderPresets(role(this.node, "presets"));
    this.startButton.addEventListener("click", () => this.start());
    this.cancelButton.addEventListener("click", () => this.cancel());
  }

  renderPresets(container) {
    if (this.spec.presets.length < 2) return;
    container.append(el("span", { class: "field-label" }, "Presets"));
    for (const preset of this.spec.presets) {
      container.append(el("button", {
        type: "button", class: "chip",
        onclick: () => { this.params.value = JSON.stringify(preset.params); },
      }, preset.label));
    }
  }

  /** Apply what GET /v1/jobs/methods says about this method (null: the server lacks it). */
  setMethodInfo(info) {
    this.available = info !== null;
    if (!this.available) {
      this.startButton.disabled = true;
      this.status.textContent = "Not available on this server yet.";
      this.node.dataset.state = "unavailable";
      return;
    }
    const names = describeParams(info.params);
    this.paramsHint.textContent = names ? `Parameters and their defaults: ${names}.` : "This method takes no parameters.";
    if (info.timeout_s) this.paramsHint.textContent += ` Time limit ${info.timeout_s} s.`;
  }

  readParams() {
    const text = this.params.value.trim();
    if (!text) return {};
    let value;
    try {
      value = JSON.parse(text);
    } catch (error) {
      throw new Error(`The parameters are not valid JSON: ${error.message}`);
    }
    if (value === null || typeof value !== "object" || Array.isArray(value)) {
      throw new Error("The parameters must be a JSON object, like {\"iterations\": 10}.");
    }
    return value;
  }

  /** Call LISTENER(job) whenever this card's job changes (submitted, polled, ended). */
  onChange(listener) {
    this.listeners.add(listener);
  }

  setRunning(running) {
    this.startButton.disabled = running || this.available === false;
    this.cancelButton.disabled = !running;
    this.node.setAttribute("aria-busy", String(running));
    this.node.dataset.state = running ? "running" : (this.job?.status ?? "idle");
  }

  async start() {
    showError(this.error, null);
    const input = this.getInput();
    if (!input?.file) {
      showError(this.error, "Choose an image first (step 1).");
      return;
    }
    let params;
    try {
      params = this.readParams();
    } catch (error) {
      showError(this.error, error.message);
      this.params.closest("details").open = true;
      this.params.focus();
      return;
    }
    this.stopPolling();
    // A new start replaces the card's job: one still queued or running would only hold a worker.
    const previous = this.job;
    if (previous?.id && !TERMINAL.has(previous.status)) cancelJob(previous.id).catch(() => {});
    this.clearResult();
    this.cancelRequested = false;
    this.input = input;
    this.started = performance.now();
    this.job = { status: "submitting" };
    this.setRunning(true);
    this.cancelButton.disabled = true; // nothing to cancel until the job has an id
    this.progress.removeAttribute("value"); // indeterminate until the worker reports
    this.status.textContent = "Submitting…";
    try {
      this.job = await submitJob({ image: input.file, method: this.spec.method, model: input.model,
        target: input.target, params });
    } catch (error) {
      this.job = null;
      this.fail(error);
      return;
    }
    this.failures = 0;
    this.render(this.job);
    this.schedulePoll(0);
  }

  /** The parameters the job runs with (the server's view: defaults and preset applied; a result
   * lists them as used), else none yet. */
  showParamsUsed(job) {
    const used = job.result?.params ?? job.params;
    if (!used || typeof used !== "object" || !Object.keys(used).length) {
      show(this.paramsUsed, false);
      return;
    }
    const text = Object.entries(used).map(([name, value]) => `${name} = ${JSON.stringify(value)}`).join(", ");
    this.paramsUsed.textContent = `${job.result?.params ? "Ran" : "Runs"} with: ${text}.`;
    show(this.paramsUsed, true);
  }

  async cancel() {
    if (!this.job?.id) return;
    this.cancelRequested = true;
    this.cancelButton.disabled = true;
    this.status.textContent = "Cancelling…";
    try {
      const answer = await cancelJob(this.job.id);
      if (answer?.status) this.render({ ...this.job, ...answer });
    } catch (error) {
      // 409: it ended meanwhile; the next poll shows how.
      if (!(error instanceof ApiError && error.status === 409)) showError(this.error, error);
    }
  }

  schedulePoll(delay = POLL_MS) {
    this.timer = window.setTimeout(() => this.poll(), delay);
  }

  stopPolling() {
    if (this.timer !== null) window.clearTimeout(this.timer);
    this.timer = null;
  }

  async poll() {
    this.timer = null;
    const id = this.job?.id;
    if (!id) return;
    let job;
    let retryAfter;
    try {
      ({ job, retryAfter } = await getJob(id));
    } catch (error) {
      if (this.job?.id !== id) return; // a newer job replaced it meanwhile
      const transient = error instanceof ApiError && (error.status === 0 || error.status === 503);
      this.failures += 1;
      if (transient && this.failures < MAX_POLL_FAILURES) {
        showError(this.error, `${error.readable} Retrying…`);
        this.schedulePoll(POLL_MS * 2 ** Math.min(this.failures, 4));
      } else {
        this.fail(error);
      }
      return;
    }
    if (this.job?.id !== id) return;
    this.failures = 0;
    showError(this.error, null);
    this.render(job);
    if (!TERMINAL.has(job.status)) this.schedulePoll(retryAfter === null ? POLL_MS : Math.max(MIN_POLL_MS, 1000 * retryAfter));
  }

  fail(error) {
    this.stopPolling();
    for (const listener of this.listeners) listener({ ...(this.job ?? {}), status: "failed", error });
    this.setRunning(false);
    this.progress.value = 0;
    this.status.textContent = "Not running";
    showError(this.error, error);
    this.node.dataset.state = "error";
  }

  render(job) {
    this.job = { ...this.job, ...job };
    const { status } = this.job;
    const fraction = typeof job.progress === "number" ? Math.min(Math.max(job.progress, 0), 1) : null;
    if (status === "succeeded") this.progress.value = 1;
    else if (fraction !== null && status === "running") this.progress.value = fraction;
    else if (status === "queued") this.progress.removeAttribute("value");
    const elapsed = seconds(performance.now() - this.started);
    const stage = job.stage && job.stage !== status && job.stage !== "done" ? ` · ${job.stage}` : "";
    const position = this.job.queue_position;
    const waiting = typeof position === "number"
      ? (position === 0 ? "next in the queue" : `${position} job${position === 1 ? "" : "s"} ahead in the queue`)
      : "waiting for a worker";
    const text = {
      queued: `Queued${stage} · ${waiting}`,
      running: `Running${stage} · ${percent(fraction ?? 0, 0)} · ${elapsed}`,
      succeeded: `Finished in ${elapsed}`,
      failed: "Failed",
      canceled: "Canceled",
    }[status] ?? status;
    this.node.dataset.status = status;
    this.showParamsUsed(this.job);
    for (const listener of this.listeners) listener(this.job);
    if (!TERMINAL.has(status)) {
      this.status.textContent = this.cancelRequested ? `${text} · cancelling…` : text;
      this.setRunning(true);
      this.cancelButton.disabled = Boolean(this.cancelRequested);
      return;
    }
    this.status.textContent = text;
    this.stopPolling();
    this.setRunning(false);
    if (status === "failed") showError(this.error, jobErrorText(job.error));
    if (status === "canceled") this.progress.value = 0;
    if (status === "succeeded") this.showResult(this.job);
  }

  clearResult() {
    this.urls.clear();
    show(this.paramsUsed, false);
    this.result.replaceChildren();
    this.downloads.replaceChildren();
    show(this.result, false);
  }

  showResult(job) {
    const result = job.result ?? {};
    const name = `${stem(this.input.file.name)}-${this.spec.method.replace("+", "p")}`;
    const target = result.target ?? {};
    const caption = target.label !== undefined
      ? `${target.label} (class ${target.index}${typeof target.score === "number" ? `, ${percent(target.score)}` : ""})`
      : (this.input.targetLabel ?? "top class");
    const parts = [];
    const links = [downloadLink(this.urls.add(jsonBlob(job)), `${name}.json`, "Result JSON")];
    if (this.spec.kind === "mask") parts.push(...this.maskParts(result, caption, name, links));
    else parts.push(...this.graphParts(result, caption, name, links));
    links.push(this.pictureLink(job, name));
    const timing = result.timing_ms?.total ?? result.timing_ms?.explain;
    if (typeof timing === "number") parts.push(el("p", { class: "hint" }, `Computed in ${seconds(timing)} on the worker.`));
    this.result.replaceChildren(...parts);
    this.downloads.replaceChildren(...links);
    show(this.result, true);
  }

  /** The "Result picture" link. A plain link cannot send the API key, so with a key held the
   * picture is fetched with it and the link points at an object URL once it has arrived. */
  pictureLink(job, name) {
    const url = jobPictureUrl(job);
    const link = downloadLink(url, `${name}.png`, "Result picture");
    if (!heldKey()) return link; // no key (auth off): the server answers the link itself
    link.removeAttribute("href");
    link.setAttribute("aria-disabled", "true");
    link.dataset.state = "loading";
    getBlob(url).then((blob) => {
      if (!link.isConnected) return; // redrawn meanwhile: nothing to point at
      link.href = this.urls.add(blob);
      link.removeAttribute("aria-disabled");
      link.dataset.state = "ready";
    }).catch((error) => {
      const why = error.readable ?? String(error);
      if (link.isConnected) link.replaceWith(el("span", { class: "hint" }, `No result picture: ${why}`));
    });
    return link;
  }

  maskParts(result, caption, name, links) {
    const heatmap = result.heatmap;
    const noun = this.spec.noun ?? "mask";
    const parts = [];
    if (heatmap?.overlay_png) {
      const base = this.urls.add(this.input.file);
      parts.push(el("figure", { class: "job-figure" },
        el("div", { class: "stack" },
          el("img", { class: "stack-base", src: base, alt: "" }),
          el("img", { class: "stack-overlay", src: pngDataUrl(heatmap.overlay_png), "data-role": "job-overlay",
            alt: `${this.spec.title} ${noun} for ${caption}` })),
        el("figcaption", { class: "hint" }, `${this.spec.title} ${noun} for ${caption}`)));
      links.push(downloadLink(this.urls.add(base64ToBlob(heatmap.overlay_png)), `${name}-overlay.png`, "Overlay PNG"));
      if (heatmap.png) {
        const label = noun === "mask" ? "Mask PNG" : "Heat map PNG";
        links.push(downloadLink(this.urls.add(base64ToBlob(heatmap.png)), `${name}-${noun.replace(" ", "")}.png`, label));
      }
    }
    const curves = curvesFigure(result);
    if (curves) parts.push(curves);
    else if (this.spec.curvesExpected !== false) {
      parts.push(el("p", { class: "muted" }, "This result carries no deletion / insertion curves."));
    }
    return [el("div", { class: "job-result-grid" }, parts)];
  }

  graphParts(result, caption, name, links) {
    const parts = [];
    const roots = Array.isArray(result.roots) ? result.roots : [];
    const graph = safeSvg(result.svg);
    const counts = [
      Array.isArray(result.nodes) ? `${result.nodes.length} nodes` : null,
      Array.isArray(result.edges) ? `${result.edges.length} edges` : null,
      typeof result.forward_passes?.images === "number" ? `${result.forward_passes.images} images scored` : null,
      result.truncated ? "graph truncated at its node limit" : null,
    ].filter(Boolean).join(" · ");
    if (graph) {
      const folded = [...graph.querySelectorAll("g.more")].reduce((n, g) => n + Number(g.dataset.folded || 0), 0);
      const drawn = graph.querySelectorAll("g.node").length;
      parts.push(el("p", { class: "hint" }, `Graph for ${caption}${counts ? ` · ${counts}` : ""}. One panel per root, `
        + `${drawn} nodes drawn${folded ? `, ${folded} more folded` : ""}: below each root, the removals that `
        + "lower the score most; the removed patch is outlined on the child. The full graph is in the result JSON."));
      parts.push(graphViewer(graph, result, this.urls.add(this.input.file), caption));
      links.push(downloadLink(this.urls.add(new Blob([result.svg], { type: "image/svg+xml" })), `${name}.svg`, "Graph SVG"));
    } else {
      parts.push(el("p", { class: "muted" }, "This result carries no graph drawing."));
    }
    if (roots.length === 0 && Array.isArray(result.roots)) {
      parts.push(el("p", { class: "muted" }, "The search found no minimal sufficient explanation within its limits "
        + "(try a larger root size or a lower threshold)."));
    }
    if (roots.length) {
      parts.push(el("h4", {}, `Roots: ${roots.length} minimal sufficient explanation${roots.length === 1 ? "" : "s"}`));
      parts.push(el("ol", { class: "roots" }, roots.map((root, i) => this.rootItem(root, i, graph))));
      roots.forEach((root, i) => {
        const picture = root.png ?? root.overlay_png ?? root.picture_png;
        if (picture) links.push(downloadLink(this.urls.add(base64ToBlob(picture)), `${name}-root${i + 1}.png`, `Root ${i + 1} PNG`));
      });
    }
    return parts;
  }

  /** One root: its picture, size and score; a button that points it out in the graph. */
  rootItem(root, i, graph) {
    const patches = rootPatches(root);
    const score = rootScore(root);
    const picture = root.png ?? root.overlay_png ?? root.picture_png;
    const key = [...patches].map(Number).sort((a, b) => a - b).join(",");
    const nodes = graph ? [...graph.querySelectorAll("[data-patches]")].filter((node) => node.getAttribute("data-patches")
      .split(/[\s,;]+/).filter(Boolean).map(Number).sort((a, b) => a - b).join(",") === key) : [];
    const inGraph = nodes.length > 0;
    const text = [
      `Root ${i + 1}: ${patches.length} patch${patches.length === 1 ? "" : "es"}`,
      score !== null ? `p = ${score.toFixed(3)}` : null,
      typeof root.relative === "number" ? `${percent(root.relative, 0)} of the full image` : null,
    ].filter(Boolean).join(" · ");
    const body = [
      picture ? el("img", { src: pngDataUrl(picture), alt: "" }) : null,
      el("span", {}, text, inGraph ? null : el("span", { class: "hint" }, " (not drawn in the graph)")),
    ];
    if (!inGraph) return el("li", { class: "root-item" }, body);
    const button = el("button", { type: "button", class: "root-item", "aria-pressed": "false",
      title: "Point this root out in the graph" }, body);
    button.addEventListener("click", () => {
      const on = button.getAttribute("aria-pressed") !== "true";
      button.setAttribute("aria-pressed", String(on));
      for (const node of nodes) node.classList.toggle("is-focus", on);
    });
    return el("li", {}, button);
  }
}
