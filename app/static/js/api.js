// The public HTTP API, as any client sees it: fetch wrappers that turn every failure into an
// ApiError carrying the server's {"error": {"code", "message"}} and a sentence for people.
// When the server has API keys on, every call carries "Authorization: Bearer KEY" (see below).

/** An API failure: HTTP status (0 when the server could not be reached), code and message. */
export class ApiError extends Error {
  constructor(status, code, message, retryAfter = null, scope = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
    this.scope = scope; // on a 403 insufficient_scope: the scope the key lacks, when known
  }

  /** A readable sentence for the page: what went wrong, then the server's own words. */
  get readable() {
    const lead = {
      0: "Cannot reach the Unbox server.",
      400: "The image could not be read.",
      401: "This server needs an API key.",
      403: this.scope ? `This API key lacks the "${this.scope}" scope; ask an operator for a key with it.`
        : "This API key is not allowed to do that.",
      404: "Not found.",
      413: "The image is too large.",
      415: "That file is not a supported image.",
      422: "The request was rejected.",
      429: this.retryAfter ? `Rate limited, retry in ${this.retryAfter} s.` : "Rate limited, retry shortly.",
      503: "The service is temporarily unavailable.",
    }[this.status] ?? `The server answered with an error (${this.status}).`;
    // 429's lead already says when to retry
    const retry = this.retryAfter && this.status !== 429 ? ` Try again in ${this.retryAfter} s.` : "";
    const detail = this.message && this.message !== lead ? ` ${capitalise(this.message)}` : "";
    return `${lead}${detail}${terminate(detail)}${retry}`;
  }
}

function capitalise(text) {
  return text.charAt(0).toUpperCase() + text.slice(1);
}

function terminate(text) {
  return text && !/[.!?]$/.test(text) ? "." : "";
}

// The scope each route family needs, for a 403 whose answer does not name it.
const ROUTE_SCOPES = [[/^\/v1\/predict/, "predict"], [/^\/v1\/explain/, "explain"], [/^\/v1\/jobs/, "jobs"]];

/** The scope a 403 names: a field of the error, the WWW-Authenticate scope, else the route's. */
function missingScope(error, response, url) {
  const named = error?.scope ?? error?.required_scope ?? error?.missing_scope;
  if (named) return Array.isArray(named) ? named.join(", ") : String(named);
  const header = /scope="([^"]+)"/.exec(response.headers.get("WWW-Authenticate") ?? "");
  if (header) return header[1];
  const path = new URL(url, window.location.href).pathname;
  return ROUTE_SCOPES.find(([pattern]) => pattern.test(path))?.[1] ?? null;
}

async function errorFrom(response, url) {
  let code = "http_error";
  let message = response.statusText || "";
  let error = null;
  try {
    const body = await response.json();
    if (body && body.error) {
      error = body.error;
      code = error.code ?? code;
      message = error.message ?? message;
    } else if (body && typeof body.detail === "string") {
      message = body.detail;
    }
  } catch {
    // not JSON (a proxy's HTML page, say): keep the status text
  }
  const scope = response.status === 403 ? missingScope(error, response, url) : null;
  return new ApiError(response.status, code, message, response.headers.get("Retry-After"), scope);
}

// ---------------------------------------------------------------- the API key
// The key lives in sessionStorage only: it lasts as long as the tab and never reaches
// localStorage, a cookie or a URL. A call that answers 401 waits for the page's key prompt
// (setKeyPrompt) and is then sent again with the new key.

const KEY_ITEM = "unbox.apiKey";
const keyListeners = new Set();
let memoryKey = null; // where the key lives when the browser refuses sessionStorage
let keyPrompt = null; // ({refused, message}) => Promise that resolves once a new key is held
let pendingPrompt = null; // the prompt on screen, shared by every call waiting for a key

function session() {
  try {
    return window.sessionStorage;
  } catch {
    return null; // storage disabled: the key stays in this page's memory instead
  }
}

/** The key this tab holds, or null. */
export function heldKey() {
  const store = session();
  return (store ? store.getItem(KEY_ITEM) : memoryKey) || null;
}

/** Keep KEY for this tab's session; null forgets it. */
export function holdKey(key) {
  const store = session();
  if (store && key) store.setItem(KEY_ITEM, key);
  else store?.removeItem(KEY_ITEM);
  memoryKey = store ? null : key || null;
  for (const listener of keyListeners) listener(heldKey());
}

export function forgetKey() {
  holdKey(null);
}

/** Call LISTENER(key or null) whenever the held key changes. */
export function onKeyChange(listener) {
  keyListeners.add(listener);
}

/** Install the page's key prompt; without one a 401 is thrown like any other error. */
export function setKeyPrompt(prompt) {
  keyPrompt = prompt;
}

/** Wait for the (one, shared) key prompt; rejects with an AbortError when SIGNAL aborts first. */
function waitForKey(details, signal) {
  pendingPrompt ??= Promise.resolve(keyPrompt(details)).finally(() => { pendingPrompt = null; });
  if (!signal) return pendingPrompt;
  return new Promise((resolve, reject) => {
    const abort = () => reject(new DOMException("The request was aborted.", "AbortError"));
    if (signal.aborted) abort();
    signal.addEventListener("abort", abort, { once: true });
    pendingPrompt.then(resolve, reject).finally(() => signal.removeEventListener("abort", abort));
  });
}

/** HEADERS plus the Authorization header when a key is held. */
function withKey(headers, key) {
  return key ? { ...headers, Authorization: `Bearer ${key}` } : { ...headers };
}

/** fetch() with the held key: resolves to an ok Response or throws ApiError. On a 401 it asks
 * for a key and sends the call again (bodies are FormData or strings, so they can be resent). */
export async function apiFetch(url, options = {}) {
  for (;;) {
    const key = heldKey();
    let response;
    try {
      response = await fetch(url, { ...options, headers: withKey(options.headers, key) });
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new ApiError(0, "network_error", "Check that it is running and reachable.");
    }
    if (response.ok) return response;
    const error = await errorFrom(response, url);
    if (response.status !== 401 || !keyPrompt) throw error;
    if (heldKey() !== key) continue; // another call brought a new key meanwhile: try that one
    if (key !== null) forgetKey(); // refused: of no further use, and the page no longer shows it in use
    await waitForKey({ refused: key !== null, message: error.message }, options.signal);
  }
}

/** fetch() that resolves to parsed JSON or throws ApiError; AbortError passes through. */
export async function requestJson(url, options = {}) {
  const response = await apiFetch(url, { ...options, headers: { Accept: "application/json", ...options.headers } });
  if (response.status === 204) return null;
  return response.json();
}

/** An API resource (a picture) as a Blob, fetched with the key that a plain link cannot send. */
export async function getBlob(url, signal) {
  return (await apiFetch(url, { signal })).blob();
}

function form(fields) {
  const body = new FormData();
  for (const [key, value] of Object.entries(fields)) {
    if (value === undefined || value === null || value === "") continue;
    if (value instanceof Blob) body.append(key, value, value.name || "image");
    else body.append(key, String(value));
  }
  return body;
}

export function getModels(signal) {
  return requestJson("/v1/models", { signal });
}

export function getReady(signal) {
  // /readyz answers 503 with a useful body while models load: read it either way.
  return fetch("/readyz", { signal, headers: { Accept: "application/json" } })
    .then(async (response) => ({ ok: response.ok, body: await response.json().catch(() => ({})) }));
}

export function predict({ image, model, topK = 5, signal }) {
  return requestJson("/v1/predict", { method: "POST", body: form({ image, model, top_k: topK }), signal });
}

/** POST /v1/explain; EXTRA holds method-specific form fields (Score-CAM's ``channels``). */
export function explain({ image, method, model, target, topK = 5, signal, extra = {} }) {
  return requestJson("/v1/explain", {
    method: "POST", body: form({ ...extra, image, method, model, target, top_k: topK }), signal,
  });
}

/** The methods POST /v1/explain answers: the enum of its ``method`` field in the server's OpenAPI
 * document (public, like /docs), so the page offers exactly what this server registered. */
export async function getSynchronousMethods(signal) {
  const document = await requestJson("/openapi.json", { signal });
  const schemas = document?.components?.schemas ?? {};
  let body = document?.paths?.["/v1/explain"]?.post?.requestBody?.content?.["multipart/form-data"]?.schema ?? {};
  if (body.$ref) body = schemas[body.$ref.split("/").pop()] ?? {};
  return body.properties?.method?.enum ?? [];
}

export function submitJob({ image, method, model, target, params, signal }) {
  return requestJson("/v1/jobs", {
    method: "POST",
    body: form({ image, method, model, target, params: params ? JSON.stringify(params) : undefined }),
    signal,
  });
}

/** The job methods the server accepts, with their parameters' JSON schema. */
export function getJobMethods(signal) {
  return requestJson("/v1/jobs/methods", { signal });
}

/** GET /v1/jobs/{id} with its pictures inline (the few large pictures a result keeps beside it
 * come back in this one answer), and the server's Retry-After (seconds; null when absent), which
 * says when to ask again while the job is queued or running. */
export async function getJob(id, signal) {
  const response = await apiFetch(`/v1/jobs/${encodeURIComponent(id)}?pictures=inline`,
    { signal, headers: { Accept: "application/json" } });
  const retryAfter = Number.parseFloat(response.headers.get("Retry-After") ?? "");
  return { job: await response.json(), retryAfter: Number.isFinite(retryAfter) && retryAfter >= 0 ? retryAfter : null };
}

export function cancelJob(id) {
  return requestJson(`/v1/jobs/${encodeURIComponent(id)}`, { method: "DELETE" });
}

export function jobPictureUrl(job) {
  return job?.links?.result_png ?? job?.links?.picture ?? `/v1/jobs/${encodeURIComponent(job.id)}/result.png`;
}
