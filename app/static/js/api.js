// The public HTTP API, as any client sees it: fetch wrappers that turn every failure into an
// ApiError carrying the server's {"error": {"code", "message"}} and a sentence for people.

/** An API failure: HTTP status (0 when the server could not be reached), code and message. */
export class ApiError extends Error {
  constructor(status, code, message, retryAfter = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }

  /** A readable sentence for the page: what went wrong, then the server's own words. */
  get readable() {
    const lead = {
      0: "Cannot reach the Unbox server.",
      400: "The image could not be read.",
      404: "Not found.",
      413: "The image is too large.",
      415: "That file is not a supported image.",
      422: "The request was rejected.",
      429: "Too many requests.",
      503: "The service is temporarily unavailable.",
    }[this.status] ?? `The server answered with an error (${this.status}).`;
    const retry = this.retryAfter ? ` Try again in ${this.retryAfter} s.` : "";
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

async function errorFrom(response) {
  let code = "http_error";
  let message = response.statusText || "";
  try {
    const body = await response.json();
    if (body && body.error) {
      code = body.error.code ?? code;
      message = body.error.message ?? message;
    } else if (body && typeof body.detail === "string") {
      message = body.detail;
    }
  } catch {
    // not JSON (a proxy's HTML page, say): keep the status text
  }
  return new ApiError(response.status, code, message, response.headers.get("Retry-After"));
}

/** fetch() that resolves to parsed JSON or throws ApiError; AbortError passes through. */
export async function requestJson(url, options = {}) {
  let response;
  try {
    response = await fetch(url, { headers: { Accept: "application/json" }, ...options });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "network_error", "Check that it is running and reachable.");
  }
  if (!response.ok) throw await errorFrom(response);
  if (response.status === 204) return null;
  return response.json();
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

export function getJob(id, signal) {
  // pictures=inline: the few large pictures a result keeps beside it come back in this one answer
  return requestJson(`/v1/jobs/${encodeURIComponent(id)}?pictures=inline`, { signal });
}

export function cancelJob(id) {
  return requestJson(`/v1/jobs/${encodeURIComponent(id)}`, { method: "DELETE" });
}

export function jobPictureUrl(job) {
  return job?.links?.result_png ?? job?.links?.picture ?? `/v1/jobs/${encodeURIComponent(job.id)}/result.png`;
}
