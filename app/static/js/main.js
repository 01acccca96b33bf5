// The dashboard's entry module: image intake, model choice, predictions, the Grad-CAM and
// Score-CAM panels, a panel for the server's other synchronous methods, the job cards and the
// "Compare methods" grid.
// Every number shown comes from the public API.

import { ApiError, explain, getJobMethods, getModels, getReady, getSynchronousMethods, predict } from "./api.js";
import { mountKeyForm } from "./auth.js";
import {
  UrlBag, base64ToBlob, downloadLink, el, jsonBlob, percent, pngDataUrl, role, seconds, show, showError, stem,
} from "./dom.js";
import { JOB_METHODS, JobCard, METHOD_TITLES, extraMethodSpec } from "./jobs.js";
import { CompareGrid } from "./compare.js";
import { mountStudyList } from "./studies.js";

const TOP_K = 5;
const MODEL_LOADING_RETRIES = 10;

const $ = (id) => document.getElementById(id);

const state = {
  file: null, // the uploaded File (or sample) as sent to the API
  fileUrl: null, // an object URL of it for the <img> elements
  model: "",
  predictions: [],
  target: null, // the class index explained (null before the first prediction)
  generation: 0, // bumps on every new request set; stale answers are dropped
  controller: null, // aborts the requests of the previous generation
  compare: null, // the "Compare methods" grid, once the job cards exist
};

const panels = [...document.querySelectorAll(".panel[data-method]")].map((node) => ({
  method: node.dataset.method,
  node,
  base: role(node, "base"),
  overlay: role(node, "overlay"),
  empty: role(node, "empty"),
  error: role(node, "error"),
  downloads: role(node, "downloads"),
  meta: role(node, "meta"),
  option: role(node, "option"), // Score-CAM's channel count, sent as a form field
  chooser: role(node, "method"), // the "more heat maps" panel: its method is chosen here
  desc: role(node, "desc"),
  controller: null,
  urls: new UrlBag(),
}));

// ---------------------------------------------------------------- server and models

async function watchReadiness() {
  const pill = $("server-status");
  for (let attempt = 0; ; attempt += 1) {
    try {
      const { ok, body } = await getReady();
      pill.dataset.state = ok ? (body.status === "degraded" ? "loading" : "ready") : "loading";
      pill.textContent = ok ? (body.status === "degraded" ? "Ready · job queue down" : "Ready") : "Loading models…";
      describeQueue(body.queue);
      if (ok) return;
    } catch {
      pill.dataset.state = "down";
      pill.textContent = "Server unreachable";
    }
    await sleep(Math.min(2000 * (attempt + 1), 10000));
  }
}

/** A note over the job cards when /readyz says the queue is missing or unreachable. */
function describeQueue(queue) {
  const note = $("queue-note");
  const text = {
    not_configured: ["This server runs without a job queue, so the methods below cannot start. Run ",
      el("code", {}, "unbox serve"), " (API, embedded Redis and a worker) or set ", el("code", {}, "UNBOX_REDIS_URL"), "."],
    unreachable: ["The job queue (Redis) is unreachable right now; jobs cannot start until it returns."],
  }[queue?.status];
  note.replaceChildren(...(text ?? []));
  show(note, Boolean(text));
}

async function loadModels() {
  const select = $("model-select");
  const hint = $("model-hint");
  try {
    const catalogue = await getModels();
    select.replaceChildren(...catalogue.models.map((m) => el("option", {
      value: m.name, selected: m.name === catalogue.default,
    }, m.name + (m.error ? " (unavailable)" : m.loaded ? "" : " (loads on first use)"))));
    state.model = select.value;
    const describe = () => {
      const spec = catalogue.models.find((m) => m.name === select.value);
      hint.textContent = spec ? [spec.description, spec.error && `Cannot load: ${spec.error}`]
        .filter(Boolean).join(" ") : "";
    };
    describe();
    select.addEventListener("change", () => {
      state.model = select.value;
      describe();
      if (state.file) analyse();
    });
  } catch (error) {
    select.replaceChildren(el("option", { value: "" }, "Server default"));
    hint.textContent = error instanceof ApiError ? error.readable : String(error);
  }
}

// ---------------------------------------------------------------- image intake

function setImage(file) {
  if (!file) return;
  if (state.fileUrl) URL.revokeObjectURL(state.fileUrl);
  state.file = file;
  state.fileUrl = URL.createObjectURL(file);
  state.target = null;
  const img = $("original-img");
  img.alt = `The uploaded image, ${file.name || "pasted"}`;
  img.src = state.fileUrl;
  img.decode().then(() => {
    document.documentElement.style.setProperty("--image-ratio", `${img.naturalWidth} / ${img.naturalHeight}`);
  }).catch(() => {});
  show(img, true);
  show($("original-empty"), false);
  $("original-caption").textContent = `${file.name || "pasted image"} · ${(file.size / 1024).toFixed(0)} KB`;
  state.compare?.imageChanged();
  analyse();
}

function wireIntake() {
  const input = $("file-input");
  const zone = $("dropzone");
  input.addEventListener("change", () => {
    if (input.files?.length) setImage(input.files[0]);
    input.value = ""; // choosing the same file again still triggers a change
  });
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (event) => {
      event.preventDefault();
      zone.classList.add("is-dragging");
    });
  }
  for (const type of ["dragleave", "dragend"]) zone.addEventListener(type, () => zone.classList.remove("is-dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("is-dragging");
    const file = event.dataTransfer?.files?.[0];
    if (file) setImage(file);
  });
  // Dropping outside the zone must not navigate away from the page.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());
  document.addEventListener("paste", (event) => {
    const file = [...(event.clipboardData?.files ?? [])][0];
    if (file) setImage(file);
  });
  for (const button of document.querySelectorAll("button[data-sample]")) {
    button.addEventListener("click", () => loadSample(button));
  }
  const original = $("original-img");
  original.addEventListener("error", () => {
    if (!state.file) return;
    show(original, false);
    const empty = $("original-empty");
    empty.textContent = "No preview: the browser cannot display this file";
    show(empty, true);
  });
}

async function loadSample(button) {
  const name = button.dataset.sample;
  button.disabled = true;
  try {
    const response = await fetch(`/static/samples/${name}`);
    if (!response.ok) throw new ApiError(response.status, "sample_missing", `sample ${name} is missing`);
    const blob = await response.blob();
    setImage(new File([blob], name, { type: blob.type || "image/jpeg" }));
  } catch (error) {
    showError($("intake-error"), error);
  } finally {
    button.disabled = false;
  }
}

// ---------------------------------------------------------------- predictions

function newGeneration() {
  state.controller?.abort();
  state.controller = new AbortController();
  state.generation += 1;
  return { generation: state.generation, signal: state.controller.signal };
}

async function analyse() {
  const { generation, signal } = newGeneration();
  showError($("intake-error"), null);
  state.predictions = [];
  renderPredictions();
  $("predictions-status").textContent = "Classifying…";
  for (const panel of panels) {
    panel.controller?.abort();
    setPanelBusy(panel, "Waiting for the prediction…");
  }
  let answer;
  for (let attempt = 0; ; attempt += 1) {
    try {
      answer = await predict({ image: state.file, model: state.model, topK: TOP_K, signal });
      break;
    } catch (error) {
      if (error.name === "AbortError" || generation !== state.generation) return;
      if (error instanceof ApiError && error.code === "model_loading" && attempt < MODEL_LOADING_RETRIES) {
        $("predictions-status").textContent = "The model is still loading; retrying…";
        await sleep(1000 * Number(error.retryAfter || 2));
        if (generation !== state.generation) return;
        continue;
      }
      showError($("intake-error"), error);
      const why = [400, 413, 415].includes(error.status) ? "the image was not accepted" : "the request failed";
      $("predictions-status").textContent = `No predictions: ${why}.`;
      for (const panel of panels) setPanelIdle(panel, `No heat map: ${why}.`);
      return;
    }
  }
  if (generation !== state.generation) return;
  state.predictions = answer.predictions;
  state.target = answer.predictions[0]?.index ?? null;
  $("predictions-status").textContent = `${answer.model} · ${seconds(answer.timing_ms?.total ?? 0)}`;
  renderPredictions();
  explainAll();
}

function renderPredictions() {
  const list = $("predictions");
  list.replaceChildren(...state.predictions.map((p, rank) => el("li", {},
    el("button", {
      type: "button",
      class: "prediction",
      "aria-pressed": String(p.index === state.target),
      "data-index": p.index,
      title: `Explain ${p.label}`,
      onclick: () => chooseTarget(p.index),
    },
    el("span", { class: "prediction-rank", "aria-hidden": "true" }, rank + 1),
    el("span", { class: "prediction-label" }, p.label),
    el("span", { class: "prediction-index" }, `#${p.index}`),
    el("span", { class: "prediction-score" }, percent(p.score)),
    el("span", { class: "prediction-bar", "aria-hidden": "true" },
      el("span", { style: `width: ${Math.max(1, 100 * p.score).toFixed(1)}%` }))))));
}

/** Mark the explained class without rebuilding the list (the focused button keeps its focus). */
function markTarget() {
  for (const button of document.querySelectorAll("#predictions .prediction")) {
    button.setAttribute("aria-pressed", String(Number(button.dataset.index) === state.target));
  }
}

function chooseTarget(index) {
  if (index === state.target) return;
  state.target = index;
  markTarget();
  state.compare?.imageChanged();
  explainAll();
}

function targetLabel() {
  const p = state.predictions.find((q) => q.index === state.target);
  return p ? `${p.label} (class ${p.index})` : null;
}

// ---------------------------------------------------------------- heat map panels

function setPanelBusy(panel, text) {
  panel.node.setAttribute("aria-busy", "true");
  panel.node.dataset.state = "busy";
  showError(panel.error, null);
  panel.empty.textContent = text;
  show(panel.empty, true);
  show(panel.overlay, false);
  show(panel.base, false);
  panel.overlay.removeAttribute("src");
  panel.meta.textContent = "";
  panel.urls.clear();
  panel.downloads.replaceChildren();
}

function setPanelIdle(panel, text) {
  setPanelBusy(panel, text);
  panel.node.setAttribute("aria-busy", "false");
  panel.node.dataset.state = "idle";
}

async function explainAll() {
  newGeneration();
  const generation = state.generation;
  const label = targetLabel();
  $("explain-target").textContent = label ? `Explaining ${label}.` : "Explaining the top class.";
  for (const panel of panels) {
    panel.controller?.abort();
    setPanelBusy(panel, "Queued behind the other heat map…");
  }
  // One after the other, cheapest first: a server with one inference slot answers Grad-CAM at
  // once instead of after Score-CAM.
  for (const panel of panels) {
    if (generation !== state.generation) return;
    if (panelMethod(panel)) await explainPanel(panel);
  }
}

/** The method a panel explains with: its own, or the one chosen in its method list. */
function panelMethod(panel) {
  return panel.chooser ? (panel.node.hidden ? "" : panel.chooser.value) : panel.method;
}

/** Explain the current image and target with the panel's method; a newer call supersedes it. */
async function explainPanel(panel) {
  panel.controller?.abort();
  const controller = new AbortController();
  panel.controller = controller;
  const generation = state.generation;
  const current = () => panel.controller === controller && generation === state.generation;
  const method = panelMethod(panel);
  const title = METHOD_TITLES[method] ?? method;
  setPanelBusy(panel, `Computing ${title}…`);
  const started = performance.now();
  let result;
  try {
    result = await explain({ image: state.file, method, model: state.model, target: state.target,
      topK: TOP_K, signal: controller.signal, extra: panel.option ? { [panel.option.name]: panel.option.value } : {} });
  } catch (error) {
    if (error.name === "AbortError" || !current()) return;
    setPanelIdle(panel, `No ${title} heat map.`);
    panel.node.dataset.state = "error";
    showError(panel.error, error);
    return;
  }
  if (!current()) return;
  const name = `${stem(state.file.name)}-${method}-${result.target.index}`;
  panel.base.src = state.fileUrl;
  panel.overlay.src = pngDataUrl(result.heatmap.overlay_png);
  panel.overlay.alt = `${title} heat map for ${result.target.label} over the image`;
  show(panel.base, true);
  show(panel.overlay, true);
  show(panel.empty, false);
  const elapsed = result.timing_ms?.total ?? performance.now() - started;
  const layer = role(panel.node, "layer");
  if (layer && result.layer) layer.textContent = result.layer;
  const details = result.details ?? {};
  const channels = details.mode ? ` · ${details.mode}${details.channels ? `, ${details.channels} channels` : ""}` : "";
  panel.meta.textContent = `${result.target.label} · ${percent(result.target.score)} · ${seconds(elapsed)}${channels}`;
  panel.downloads.replaceChildren(
    downloadLink(panel.urls.add(base64ToBlob(result.heatmap.overlay_png)), `${name}-overlay.png`, "Overlay PNG"),
    downloadLink(panel.urls.add(base64ToBlob(result.heatmap.png)), `${name}-map.png`, "Heat map PNG"),
    downloadLink(panel.urls.add(jsonBlob(result)), `${name}.json`, "JSON"),
  );
  panel.node.setAttribute("aria-busy", "false");
  panel.node.dataset.state = "done";
}

// ---------------------------------------------------------------- opacity and jobs

function wirePanelOptions() {
  for (const panel of panels) {
    panel.option?.addEventListener("change", () => {
      if (state.file && state.predictions.length) explainPanel(panel);
    });
    panel.chooser?.addEventListener("change", () => {
      describeChosen(panel);
      if (state.file && state.predictions.length) explainPanel(panel);
    });
  }
}

// The job listing (GET /v1/jobs/methods), asked for once: job cards and method descriptions.
let jobMethodListing = null;
function jobMethodList() {
  jobMethodListing ??= getJobMethods();
  return jobMethodListing;
}

/** Fill the "more heat maps" panel with every synchronous method the server answers that has no
 * panel of its own (the /v1/explain method enum), under readable titles; Grad-CAM++ first shown. */
async function mountMorePanel() {
  const panel = panels.find((p) => p.chooser);
  if (!panel) return;
  let names;
  try {
    names = await getSynchronousMethods();
  } catch {
    return; // no document: the panel stays hidden
  }
  const own = new Set(panels.filter((p) => !p.chooser).map((p) => p.method));
  const known = Object.keys(METHOD_TITLES);
  const rank = (name) => (known.includes(name) ? known.indexOf(name) : known.length);
  const others = names.filter((name) => !own.has(name)).sort((a, b) => rank(a) - rank(b) || a.localeCompare(b));
  if (!others.length) return;
  panel.chooser.replaceChildren(...others.map((name) => el("option", {
    value: name, selected: name === "gradcam++",
  }, METHOD_TITLES[name] ?? name)));
  try {
    const { methods } = await jobMethodList();
    panel.descriptions = new Map(methods.map((m) => [m.name, m.description]));
  } catch {
    panel.descriptions = new Map(); // no listing: the generic description stays
  }
  describeChosen(panel);
  show(panel.node, true);
  if (state.file && state.predictions.length) explainPanel(panel);
}

/** The chosen method's description (from the server) and picture label in its panel. */
function describeChosen(panel) {
  const method = panel.chooser.value;
  const title = METHOD_TITLES[method] ?? method;
  const description = panel.descriptions?.get(method);
  if (description) panel.desc.textContent = /[.!?]$/.test(description) ? description : `${description}.`;
  panel.overlay.alt = `${title} heat map over the image`;
  panel.downloads.setAttribute("aria-label", `${title} downloads`);
}

function wireOpacity() {
  const slider = $("opacity");
  const output = $("opacity-value");
  const apply = () => {
    document.documentElement.style.setProperty("--overlay-opacity", String(slider.value / 100));
    output.textContent = `${slider.value}%`;
  };
  slider.addEventListener("input", apply);
  apply();
}

async function mountJobs() {
  const template = $("job-template");
  const getInput = () => (state.file
    ? { file: state.file, model: state.model, target: state.target, targetLabel: targetLabel() } : null);
  const cards = JOB_METHODS.map((spec) => new JobCard(spec, template, getInput));
  $("jobs").append(...cards.map((card) => card.node));
  state.compare = new CompareGrid(getInput, cards);
  let methods;
  try {
    ({ methods } = await jobMethodList());
  } catch {
    return; // an older server without the listing: every card stays enabled
  }
  const byName = new Map(methods.map((m) => [m.name, m]));
  for (const card of cards) card.setMethodInfo(byName.get(card.spec.method) ?? null);
  const known = new Set(JOB_METHODS.map((spec) => spec.method));
  const extras = methods.filter((m) => !known.has(m.name)).map((info) => {
    const card = new JobCard(extraMethodSpec(info), template, getInput);
    card.setMethodInfo(info);
    return card;
  });
  $("more-jobs-list").append(...extras.map((card) => card.node));
  show($("more-jobs"), extras.length > 0);
}

function sleep(ms) {
  return new Promise((resolve) => window.setTimeout(resolve, ms));
}

mountKeyForm(); // first: the calls below may answer 401 and need its prompt
wireIntake();
wireOpacity();
wirePanelOptions();
mountJobs();
mountMorePanel();
mountStudyList(); // the caller's studies under the job cards, linking to their pages
loadModels();
watchReadiness();
document.documentElement.dataset.ready = "true"; // the modules have run (used by the browser test)
