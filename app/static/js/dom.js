// Small DOM helpers shared by the dashboard's modules: element creation, download links and
// formatting. No framework: the page is plain HTML enhanced by these modules.

/** Create an element with attributes (class, dataset, on* listeners) and children. */
export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on") && typeof value === "function") node.addEventListener(key.slice(2), value);
    else if (value === true) node.setAttribute(key, "");
    else node.setAttribute(key, String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** The element with data-role=ROLE inside ROOT. */
export function role(root, name) {
  return root.querySelector(`[data-role="${name}"]`);
}

export function show(node, visible = true) {
  node.hidden = !visible;
}

/** Show ERROR's readable text (or a plain string) in an alert element; null hides it. */
export function showError(node, error) {
  if (!error) {
    node.hidden = true;
    node.textContent = "";
    return;
  }
  node.textContent = typeof error === "string" ? error : (error.readable ?? error.message ?? String(error));
  node.hidden = false;
}

export function pngDataUrl(base64) {
  return `data:image/png;base64,${base64}`;
}

/** Object URLs owned by a part of the page, revoked together when that part is redrawn. */
export class UrlBag {
  constructor() {
    this.urls = [];
  }

  add(blob) {
    const url = URL.createObjectURL(blob);
    this.urls.push(url);
    return url;
  }

  clear() {
    for (const url of this.urls) URL.revokeObjectURL(url);
    this.urls = [];
  }
}

export function base64ToBlob(base64, type = "image/png") {
  const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  return new Blob([bytes], { type });
}

export function jsonBlob(value) {
  return new Blob([JSON.stringify(value, null, 2)], { type: "application/json" });
}

/** A download link (a real <a download>, so it works from the keyboard and with "save as"). */
export function downloadLink(href, filename, text) {
  return el("a", { class: "download", href, download: filename },
    el("span", { "aria-hidden": "true", class: "download-icon" }, "↓"), text);
}

export function percent(value, digits = 1) {
  return `${(100 * value).toFixed(digits)}%`;
}

export function seconds(ms) {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(1)} s`;
}

/** "cat.jpg" -> "cat": the stem used to name downloads. */
export function stem(filename) {
  const base = (filename || "image").split(/[\\/]/).pop();
  const dot = base.lastIndexOf(".");
  return (dot > 0 ? base.slice(0, dot) : base).replace(/[^\w.-]+/g, "_") || "image";
}
