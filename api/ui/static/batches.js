// The batches view: a JSONL file of requests (OpenAI's batch input, as `vllm run-batch`
// reads it) uploaded and started, its progress live, its output and errors downloaded.

import { api, download } from "./api.js";
import { $, config, el, notice, when } from "./ui.js";

const POLL_MS = 1000;
const ACTIVE = new Set(["validating", "in_progress", "finalizing", "cancelling"]);
let timer = null;

async function start(event) {
  event.preventDefault();
  const input = $("#batch-file");
  const file = input.files[0];
  error("");
  if (!file) return error("Choose a JSONL file first.");
  const button = $("#batch-start");
  button.disabled = true;
  try {
    const endpoint = await check(file);
    const form = new FormData();
    form.append("purpose", "batch");
    form.append("file", file, file.name);
    const uploaded = await api("/v1/files", { method: "POST", body: form });
    await api("/v1/batches", {
      method: "POST",
      json: { input_file_id: uploaded.id, endpoint, completion_window: "24h" },
    });
    input.value = "";
    await load();
  } catch (problem) {
    // The file stays chosen, to fix and start again.
    error(problem.message);
  } finally {
    button.disabled = false;
  }
}

// A file that is not JSONL is refused here, before any upload. Lines that are JSON but
// not a valid request are the API's to judge: they go to the batch's error file, each with
// its line number. Resolves with the endpoint the lines call.
async function check(file) {
  const limit = config().batch_max_file_bytes;
  if (file.size > limit) throw new Error(`${file.name} is larger than the ${limit}-byte limit.`);
  const lines = (await file.text()).split("\n");
  let endpoint = null;
  let count = 0;
  for (const [index, raw] of lines.entries()) {
    if (!raw.trim()) continue;
    const where = `${file.name}, line ${index + 1}`;
    let line;
    try {
      line = JSON.parse(raw);
    } catch (problem) {
      throw new Error(
        `${where} is not JSON (${problem.message}). A batch file is JSONL: one JSON request per line.`,
      );
    }
    if (typeof line !== "object" || line === null || Array.isArray(line)) {
      throw new Error(`${where} is not a JSON object: a batch file has one request object per line.`);
    }
    endpoint = endpoint || (typeof line.url === "string" ? line.url : null);
    count += 1;
  }
  if (!count) throw new Error(`${file.name} has no requests.`);
  if (!endpoint) throw new Error(`${file.name}: no line names the "url" it calls.`);
  return endpoint;
}

async function load() {
  let page;
  try {
    page = await api("/v1/batches?limit=20");
  } catch (problem) {
    notice(problem.message);
    return;
  }
  $("#batches").replaceChildren(...page.data.map(item));
  clearTimeout(timer);
  if (page.data.some((batch) => ACTIVE.has(batch.status))) timer = setTimeout(load, POLL_MS);
}

function item(batch) {
  const counts = batch.request_counts || { total: 0, completed: 0, failed: 0 };
  const done = counts.completed + counts.failed;
  const percent = counts.total ? Math.round((100 * done) / counts.total) : 0;
  const label = `Batch ${batch.id} progress`;
  const actions = el("div", { class: "actions" });
  if (batch.output_file_id) {
    actions.append(downloadButton("Download output", batch.output_file_id, `${batch.id}-output.jsonl`));
  }
  if (batch.error_file_id) {
    actions.append(downloadButton("Download errors", batch.error_file_id, `${batch.id}-errors.jsonl`));
  }
  if (ACTIVE.has(batch.status) && batch.status !== "cancelling") {
    const cancel = el("button", { type: "button", class: "quiet" }, "Cancel batch");
    cancel.addEventListener("click", async () => {
      try {
        await api(`/v1/batches/${encodeURIComponent(batch.id)}/cancel`, { method: "POST" });
      } catch (problem) {
        notice(problem.message);
      }
      load();
    });
    actions.append(cancel);
  }
  return el(
    "li",
    { class: "batch", "data-batch-id": batch.id, "data-status": batch.status },
    el("div", { class: "row" },
      el("span", { class: "mono" }, batch.id),
      el("span", { class: `badge ${batch.status}` }, batch.status),
      el("span", { class: "meta" }, when(batch.created_at))),
    el("progress", { max: String(counts.total || 1), value: String(done), "aria-label": label }),
    el("p", { class: "meta counts" },
      `${percent}% · ${counts.completed} completed, ${counts.failed} failed of ${counts.total}`),
    actions,
  );
}

function downloadButton(text, fileId, filename) {
  const button = el("button", { type: "button" }, text);
  button.addEventListener("click", () =>
    download(`/v1/files/${encodeURIComponent(fileId)}/content`, filename).catch((problem) =>
      notice(problem.message),
    ),
  );
  return button;
}

function error(text) {
  const box = $("#batch-error");
  box.textContent = text;
  box.hidden = !text;
}

export const batchesView = {
  init() {
    $("#batch-form").addEventListener("submit", start);
  },
  enter() {
    load();
  },
  leave() {
    clearTimeout(timer);
    timer = null;
  },
};
