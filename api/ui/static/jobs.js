// The jobs view: this key's jobs sent to the API (batch lines are under Batches), each
// opened to watch its stream or read its result, and cancelled.

import { api } from "./api.js";
import { renderMarkdown } from "./markdown.js";
import { followJob } from "./sse.js";
import { $, el, notice, onceAFrame, seconds, when } from "./ui.js";

const REFRESH_MS = 3000;
const OPEN = new Set(["queued", "running"]);
let timer = null;
let after = null;
let pages = 0;
let watching = null; // {id, controller}

async function load(more = false) {
  const query = new URLSearchParams({ lane: "interactive", limit: "25" });
  if (more && after) query.set("after", after);
  let page;
  try {
    page = await api(`/v1/jobs?${query}`);
  } catch (error) {
    notice(error.message);
    return;
  }
  const body = $("#jobs-table tbody");
  if (!more) body.replaceChildren();
  for (const job of page.data) body.append(row(job));
  after = page.last_id;
  pages = more ? pages + 1 : 1;
  $("#jobs-more").hidden = !page.has_more;
}

function row(job) {
  const open = el("button", { type: "button", class: "quiet" }, "Open");
  open.addEventListener("click", () => openJob(job.id));
  const actions = el("td", {}, open);
  if (OPEN.has(job.status)) {
    const cancel = el("button", { type: "button", class: "quiet" }, "Cancel");
    cancel.addEventListener("click", () => cancelJob(job.id));
    actions.append(cancel);
  }
  return el(
    "tr",
    { "data-job-id": job.id },
    el("td", { class: "mono" }, job.id),
    el("td", {}, el("span", { class: `badge ${job.status}` }, job.status)),
    el("td", {}, job.model),
    el("td", {}, when(job.created_at)),
    el("td", {}, seconds(job.timings.queue_seconds)),
    el("td", {}, seconds(job.timings.ttft_seconds)),
    el("td", {}, seconds(job.timings.total_seconds)),
    actions,
  );
}

async function cancelJob(id) {
  try {
    await api(`/v1/jobs/${encodeURIComponent(id)}/cancel`, { method: "POST" });
  } catch (error) {
    notice(error.message);
  }
  load();
}

async function openJob(id) {
  watching?.controller.abort();
  const section = $("#job-detail");
  section.hidden = false;
  $("#job-detail-title").textContent = `Job ${id}`;
  const output = $("#job-detail-body");
  output.replaceChildren();
  let job;
  try {
    job = await api(`/v1/jobs/${encodeURIComponent(id)}`);
  } catch (error) {
    notice(error.message);
    return;
  }
  describe(job);
  const cancel = $("#job-detail-cancel");
  cancel.hidden = !OPEN.has(job.status);
  cancel.onclick = () => cancelJob(id);
  if (!OPEN.has(job.status)) {
    showResult(job);
    return;
  }
  // Still going: its events from the start, as they come.
  const controller = new AbortController();
  watching = { id, controller };
  let text = "";
  const render = onceAFrame(() => controller.signal.aborted || renderMarkdown(output, text));
  const end = await followJob(id, {
    signal: controller.signal,
    onEvent: (type, data) => {
      if (type === "delta") text += data.text;
      else if (type === "retry") text = "";
      render();
    },
  }).catch((error) => notice(error.message));
  if (controller.signal.aborted || !end) return;
  watching = null;
  const finished = await api(`/v1/jobs/${encodeURIComponent(id)}`).catch(() => null);
  if (finished) {
    describe(finished);
    showResult(finished);
  }
  cancel.hidden = true;
  load();
}

function describe(job) {
  const parts = [job.status, job.model, `created ${when(job.created_at)}`];
  if (job.usage) parts.push(`${job.usage.completion_tokens} tokens`);
  if (job.timings.total_seconds != null) parts.push(`total ${seconds(job.timings.total_seconds)}`);
  $("#job-detail-meta").textContent = parts.join(" · ");
}

function showResult(job) {
  const output = $("#job-detail-body");
  if (job.result) renderMarkdown(output, job.result.text);
  else if (job.error) output.replaceChildren(el("p", { class: "error" }, job.error.message));
  else output.replaceChildren(el("p", { class: "meta" }, `No result (${job.status}).`));
}

export const jobsView = {
  init() {
    $("#jobs-refresh").addEventListener("click", () => load());
    $("#jobs-more").addEventListener("click", () => load(true));
  },
  enter() {
    load();
    timer = setInterval(() => {
      // Only the first page refreshes on its own; a longer list stays as the person left it.
      if (pages <= 1) load();
    }, REFRESH_MS);
  },
  leave() {
    clearInterval(timer);
    timer = null;
    watching?.controller.abort();
    watching = null;
  },
};
