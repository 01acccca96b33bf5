// The dashboard's "Studies" list (under the job cards): the caller's latest studies from
// GET /v1/studies?limit=10, each a link to its page (/dashboard/studies/{id}) with its status and
// progress. It stays hidden when there is none, and when the API cannot list them (no queue: a
// 503; a key without the jobs scope: a 403): the job cards already say why.

import { requestJson } from "./api.js";
import { el, percent, show } from "./dom.js";

const LIMIT = 10;
const REFRESH_MS = 5000; // while a listed study runs
const RUNNING = new Set(["running", "canceling"]);
const STATUS_TEXT = { running: "Running", canceling: "Canceling", succeeded: "Finished", canceled: "Canceled" };

export function getStudies(limit = LIMIT, signal) {
  return requestJson(`/v1/studies?limit=${limit}`, { signal });
}

export function studyPageUrl(study) {
  return study.links?.page ?? `/dashboard/studies/${encodeURIComponent(study.id)}`;
}

function studyItem(study) {
  const progress = study.progress ?? {};
  const total = progress.total ?? 0;
  const done = progress.done ?? 0;
  const name = study.name || `Study ${String(study.id).slice(0, 8)}…`;
  const status = STATUS_TEXT[study.status] ?? study.status;
  const counts = `${done} / ${total} items${total ? ` (${percent(done / total, 0)})` : ""}`
    + `${progress.failed ? ` · ${progress.failed} failed` : ""}`;
  return el("li", { class: "study-item", dataset: { study: study.id, status: study.status } },
    el("a", { href: studyPageUrl(study), class: "study-link" }, name),
    el("span", { class: "study-item-status" }, status),
    el("progress", { max: Math.max(total, 1), value: total ? done : 1, "aria-label": `${name}: ${counts}` }),
    el("span", { class: "hint study-item-counts" }, counts));
}

/** Fill ROOT's list (``#studies-list`` inside it) and keep it fresh while a study runs. */
export async function mountStudyList(root = document.getElementById("studies")) {
  const list = root?.querySelector("#studies-list");
  if (!list) return;
  let answer;
  try {
    answer = await getStudies();
  } catch {
    show(root, false); // no queue, no scope, server away: nothing to list, and not this list's to say
    return;
  }
  const studies = Array.isArray(answer?.studies) ? answer.studies : [];
  // Redraw only what changed, so a link that has focus keeps it.
  const fresh = studies.map(studyItem);
  const same = fresh.length === list.children.length
    && fresh.every((item, i) => item.isEqualNode(list.children[i]));
  if (!same) list.replaceChildren(...fresh);
  show(root, studies.length > 0);
  if (studies.some((study) => RUNNING.has(study.status))) window.setTimeout(() => mountStudyList(root), REFRESH_MS);
}
