// The chat view: models, conversations kept in SQL, images, and replies that survive a
// reload. A reply is a job (POST /v1/jobs) followed over its event stream; what has
// arrived so far and the id of the last event are kept in session storage as each event
// lands, so after a reload the same reply carries on with Last-Event-ID, no gap and no
// token twice.

import { api, ApiError, blobUrl, localPath } from "./api.js";
import { renderMarkdown, splitThinking } from "./markdown.js";
import { followJob } from "./sse.js";
import { $, config, el, notice, onceAFrame, seconds } from "./ui.js";

const INFLIGHT_ITEM = "ferry.inflight";
const SETTINGS_ITEM = "ferry.chatSettings";
const TITLE_CHARS = 80;

let models = [];
let conversation = null; // {id, title}
let attachments = []; // {file, url}
let inflight = null; // see saveInflight
let controller = null; // aborts the stream being followed
let conversationsAfter = null;

export async function initChat() {
  $("#composer").addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  $("#message").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  $("#stop").addEventListener("click", stop);
  $("#new-chat").addEventListener("click", () => openConversation(null));
  $("#more-conversations").addEventListener("click", () => loadConversations(true));
  $("#attach").addEventListener("change", (event) => {
    addImages([...event.target.files]);
    event.target.value = "";
  });
  document.addEventListener("paste", (event) => {
    if ($("#view-chat").hidden) return;
    const files = [...(event.clipboardData?.files || [])];
    if (files.length) {
      event.preventDefault();
      addImages(files);
    }
  });
  const dropZone = $("#view-chat");
  dropZone.addEventListener("dragover", (event) => {
    if ([...event.dataTransfer.types].includes("Files")) {
      event.preventDefault();
      dropZone.classList.add("dropping");
    }
  });
  dropZone.addEventListener("dragleave", () => dropZone.classList.remove("dropping"));
  dropZone.addEventListener("drop", (event) => {
    event.preventDefault();
    dropZone.classList.remove("dropping");
    addImages([...event.dataTransfer.files]);
  });
  restoreSettings();
  for (const id of ["model", "temperature", "max-tokens", "thinking", "system-prompt"]) {
    $(`#${id}`).addEventListener("change", saveSettings);
  }
}

// After sign-in: models, the sidebar, and a reply that was streaming before a reload.
export async function startChat() {
  await Promise.all([loadModels(), loadConversations()]);
  const saved = sessionStorage.getItem(INFLIGHT_ITEM);
  if (saved) {
    const state = JSON.parse(saved);
    await openConversation(state.conversationId, { keepInflight: true });
    resume(state);
  }
}

// --- models and settings ---

async function loadModels() {
  const { data } = await api("/v1/models");
  models = data;
  const select = $("#model");
  const chosen = select.value || JSON.parse(sessionStorage.getItem(SETTINGS_ITEM) || "{}").model;
  select.replaceChildren(el("option", { value: "" }, "Automatic (the server's default)"));
  for (const model of models) {
    const label = model.supports_images ? `${model.id} (takes images)` : model.id;
    select.append(el("option", { value: model.id }, label));
  }
  if (chosen && models.some((m) => m.id === chosen)) select.value = chosen;
}

function saveSettings() {
  const settings = {
    model: $("#model").value,
    temperature: $("#temperature").value,
    maxTokens: $("#max-tokens").value,
    thinking: $("#thinking").value,
    system: $("#system-prompt").value,
  };
  sessionStorage.setItem(SETTINGS_ITEM, JSON.stringify(settings));
}

function restoreSettings() {
  const saved = JSON.parse(sessionStorage.getItem(SETTINGS_ITEM) || "null");
  if (!saved) return;
  $("#temperature").value = saved.temperature ?? $("#temperature").value;
  $("#max-tokens").value = saved.maxTokens ?? $("#max-tokens").value;
  $("#thinking").value = saved.thinking ?? "";
  $("#system-prompt").value = saved.system ?? "";
}

// --- conversations ---

export async function loadConversations(more = false) {
  const query = new URLSearchParams({ limit: "30" });
  if (more && conversationsAfter) query.set("after", conversationsAfter);
  const page = await api(`/v1/conversations?${query}`);
  const list = $("#conversations");
  if (!more) list.replaceChildren();
  for (const item of page.data) list.append(conversationItem(item));
  conversationsAfter = page.last_id;
  $("#more-conversations").hidden = !page.has_more;
  markCurrent();
}

function conversationItem(item) {
  const title = item.title || "Untitled";
  const open = el("button", { type: "button", class: "open" }, title);
  open.addEventListener("click", () => openConversation(item.id));
  const remove = el(
    "button",
    { type: "button", class: "delete quiet", "aria-label": `Delete conversation ${title}` },
    "Delete",
  );
  remove.addEventListener("click", () => deleteConversation(item, remove));
  return el("li", { "data-id": item.id }, open, remove);
}

function markCurrent() {
  for (const li of $("#conversations").children) {
    const open = li.querySelector(".open");
    if (conversation && li.dataset.id === conversation.id) open.setAttribute("aria-current", "true");
    else open.removeAttribute("aria-current");
  }
}

// A second click within a few seconds deletes: no confirm() dialog, and the keyboard works.
async function deleteConversation(item, button) {
  if (button.dataset.armed !== "1") {
    button.dataset.armed = "1";
    button.textContent = "Confirm delete";
    setTimeout(() => {
      button.dataset.armed = "";
      button.textContent = "Delete";
    }, 4000);
    return;
  }
  try {
    await api(`/v1/conversations/${encodeURIComponent(item.id)}`, { method: "DELETE" });
  } catch (error) {
    notice(error.message);
    return;
  }
  if (conversation?.id === item.id) openConversation(null);
  button.closest("li").remove();
}

export async function openConversation(id, { keepInflight = false } = {}) {
  if (!keepInflight && inflight) stopFollowing();
  $("#messages").replaceChildren();
  if (!id) {
    conversation = null;
    $("#chat-title").textContent = "New chat";
    markCurrent();
    $("#message").focus();
    return;
  }
  let data;
  try {
    data = await api(`/v1/conversations/${encodeURIComponent(id)}`);
  } catch (error) {
    notice(error.message);
    conversation = null;
    return;
  }
  conversation = { id: data.id, title: data.title };
  $("#chat-title").textContent = data.title || "Untitled";
  markCurrent();
  for (const message of data.messages || []) {
    if (message.role === "user") {
      appendUser(message.content, message.images.map((image) => ({ path: localPath(image.url) })));
    } else if (message.role === "assistant") {
      const reply = appendAssistant(message.job_id);
      showReply(reply, message.content, message.reasoning_content || "");
      if (message.job_id) showUsage(reply, message.job_id);
    }
  }
}

// Leaves a streaming reply to the server (it still finishes and lands in the
// conversation) when the person opens another conversation or signs out.
export function stopFollowing() {
  controller?.abort();
  controller = null;
  inflight = null;
  sessionStorage.removeItem(INFLIGHT_ITEM);
  setBusy(false);
}

// --- images ---

function addImages(files) {
  const problems = [];
  const limits = config();
  for (const file of files) {
    if (!file.type.startsWith("image/")) {
      problems.push(`"${file.name}" is not an image.`);
    } else if (file.size > limits.image_max_bytes) {
      problems.push(`"${file.name}" is larger than ${mb(limits.image_max_bytes)}.`);
    } else if (attachments.length >= limits.image_max_per_request) {
      problems.push(`At most ${limits.image_max_per_request} images per message.`);
      break;
    } else {
      attachments.push({ file, url: URL.createObjectURL(file) });
    }
  }
  composerError(problems.join(" "));
  renderAttachments();
}

function renderAttachments() {
  const box = $("#attachments");
  box.replaceChildren(
    ...attachments.map((item, index) => {
      const remove = el(
        "button",
        { type: "button", class: "remove", "aria-label": `Remove ${item.file.name}` },
        "×",
      );
      remove.addEventListener("click", () => {
        URL.revokeObjectURL(item.url);
        attachments.splice(index, 1);
        renderAttachments();
      });
      return el(
        "figure",
        { class: "thumb" },
        el("img", { src: item.url, alt: item.file.name }),
        remove,
      );
    }),
  );
}

function readDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new ApiError(0, `"${file.name}" could not be read.`));
    reader.readAsDataURL(file);
  });
}

// --- sending ---

async function send() {
  const box = $("#message");
  const text = box.value.trim();
  if (inflight || (!text && !attachments.length)) return;
  composerError("");
  setBusy(true, "Sending…");
  let job;
  let created = null;
  try {
    const images = await Promise.all(attachments.map((item) => readDataUrl(item.file)));
    const body = requestBody(text, images);
    if (!conversation) {
      // Titled by its first question, as the API would title it once the reply is in.
      const title = text.split("\n")[0].slice(0, TITLE_CHARS) || null;
      created = await api("/v1/conversations", { method: "POST", json: { title } });
    }
    body.conversation_id = (created || conversation).id;
    job = await api("/v1/jobs", { method: "POST", json: body });
  } catch (error) {
    // Nothing is left half-sent: the conversation made for this message goes again, and
    // the input stays for a retry.
    if (created) {
      api(`/v1/conversations/${encodeURIComponent(created.id)}`, { method: "DELETE" }).catch(() => {});
    }
    setBusy(false);
    composerError(error.message);
    return;
  }
  if (created) {
    conversation = { id: created.id, title: created.title };
    $("#chat-title").textContent = created.title || "Untitled";
  }
  const shown = attachments.map((item) => ({ url: item.url }));
  attachments = [];
  renderAttachments();
  box.value = "";
  appendUser(text, shown);
  const state = {
    jobId: job.id,
    conversationId: conversation.id,
    model: job.model,
    user: text,
    images: shown.length,
    text: "",
    lastEventId: null,
  };
  saveInflight(state);
  follow(state, appendAssistant(job.id));
  loadConversations();
}

function requestBody(text, images) {
  const settings = {
    model: $("#model").value,
    temperature: parseFloat($("#temperature").value),
    maxTokens: parseInt($("#max-tokens").value, 10),
    thinking: $("#thinking").value,
    system: $("#system-prompt").value.trim(),
  };
  const messages = [];
  if (settings.system) messages.push({ role: "system", content: settings.system });
  if (images.length) {
    const parts = images.map((url) => ({ type: "image_url", image_url: { url } }));
    if (text) parts.push({ type: "text", text });
    messages.push({ role: "user", content: parts });
  } else {
    messages.push({ role: "user", content: text });
  }
  const body = { messages };
  let model = settings.model;
  const takesImages = (id) => models.find((m) => m.id === id)?.supports_images;
  if (images.length && model && !takesImages(model)) {
    // The chosen model takes no images: leave the choice to the server, which sends
    // a request with images to a model that takes them.
    model = "";
  }
  if (model) body.model = model;
  if (Number.isFinite(settings.temperature)) body.temperature = settings.temperature;
  if (Number.isFinite(settings.maxTokens)) body.max_tokens = settings.maxTokens;
  if (settings.thinking) {
    body.chat_template_kwargs = { enable_thinking: settings.thinking === "on" };
  }
  return body;
}

async function stop() {
  if (!inflight) return;
  $("#stop").disabled = true;
  try {
    await api(`/v1/jobs/${encodeURIComponent(inflight.jobId)}/cancel`, { method: "POST" });
  } catch (error) {
    // 409: it ended meanwhile; its stream says how.
    if (error.status !== 409) {
      notice(error.message);
      $("#stop").disabled = false;
    }
  }
}

// --- following a reply ---

function saveInflight(state) {
  inflight = state;
  sessionStorage.setItem(INFLIGHT_ITEM, JSON.stringify(state));
}

function resume(state) {
  appendUser(state.user, state.images ? [{ note: `${state.images} image(s)` }] : []);
  const reply = appendAssistant(state.jobId);
  showReply(reply, state.text, "");
  saveInflight(state);
  follow(state, reply);
}

async function follow(state, reply) {
  controller?.abort();
  controller = new AbortController();
  const signal = controller.signal;
  setBusy(true, "Waiting for the model…");
  let ended = false;
  const render = () => {
    // The text and the id of the event that made it, saved together once per frame: a
    // reload resumes after that id, so a frame not yet saved is fetched again, not lost.
    if (!ended) saveInflight(state);
    const { reasoning, content } = splitThinking(state.text);
    showReply(reply, content, reasoning);
  };
  const renderSoon = onceAFrame(render);
  let end;
  try {
    end = await followJob(state.jobId, {
      lastEventId: state.lastEventId,
      signal,
      onState: (connection, error) => {
        if (connection === "reconnecting") {
          status(error ? `${error.message} Reconnecting…` : "Connection lost, reconnecting…");
        } else status("Streaming…");
      },
      onEvent: (type, data, id) => {
        if (type === "delta") state.text += data.text;
        else if (type === "retry") state.text = "";
        else if (type === "error") reply.dataset.error = data.message || "The job failed.";
        else if (type === "expired") reply.dataset.error = data.message || "The job expired unrun.";
        if (id) state.lastEventId = id;
        renderSoon();
      },
    });
  } catch (error) {
    end = "error";
    reply.dataset.error = error.message;
  }
  if (signal.aborted) return;
  ended = true;
  render();
  sessionStorage.removeItem(INFLIGHT_ITEM);
  inflight = null;
  controller = null;
  setBusy(false);
  reply.dataset.state = end;
  if (end === "error" || end === "expired") {
    reply.append(el("p", { class: "error", role: "alert" }, reply.dataset.error || "Failed."));
  } else if (end === "cancelled") {
    reply.append(el("p", { class: "meta" }, "Stopped."));
  }
  await showUsage(reply, state.jobId);
  // A first reply gives the conversation its title (the start of the question).
  await loadConversations().catch(() => {});
  const entry = document.querySelector(`#conversations li[data-id="${state.conversationId}"] .open`);
  if (entry && conversation?.id === state.conversationId) $("#chat-title").textContent = entry.textContent;
}

async function showUsage(reply, jobId) {
  let job;
  try {
    job = await api(`/v1/jobs/${encodeURIComponent(jobId)}`);
  } catch {
    return;
  }
  const parts = [job.model];
  if (job.usage) parts.push(`${job.usage.prompt_tokens} + ${job.usage.completion_tokens} tokens`);
  if (job.timings?.ttft_seconds != null) parts.push(`first token ${seconds(job.timings.ttft_seconds)}`);
  const generating = job.finished_at && job.first_token_at ? job.finished_at - job.first_token_at : 0;
  if (job.usage && generating > 0) {
    parts.push(`${(job.usage.completion_tokens / generating).toFixed(1)} tokens/s`);
  }
  reply.querySelector(".usage").textContent = parts.join(" · ");
}

// --- rendering ---

function appendUser(text, images) {
  const item = el("li", { "data-role": "user", class: "turn user" });
  if (images.length) {
    const row = el("div", { class: "images" });
    for (const image of images) {
      if (image.note) {
        row.append(el("span", { class: "meta" }, image.note));
        continue;
      }
      const img = el("img", { alt: "Sent image", class: "sent" });
      row.append(img);
      if (image.url) img.src = image.url;
      else blobUrl(image.path).then((url) => (img.src = url), () => (img.alt = "Image not found"));
    }
    item.append(row);
  }
  // Plain text: what was typed, never markup.
  if (text) item.append(el("div", { class: "bubble" }, text));
  $("#messages").append(item);
  item.scrollIntoView({ block: "end" });
  return item;
}

function appendAssistant(jobId) {
  const reasoning = el(
    "details",
    { class: "reasoning", hidden: "" },
    el("summary", {}, "Reasoning"),
    el("div", { class: "reasoning-text" }),
  );
  const item = el(
    "li",
    { "data-role": "assistant", class: "turn assistant", "data-job-id": jobId || "" },
    reasoning,
    el("div", { class: "content" }),
    el("p", { class: "usage meta" }),
  );
  $("#messages").append(item);
  return item;
}

function showReply(reply, content, reasoning) {
  // The reply's text as it arrived (also what "copy" would take); the view is its Markdown.
  reply.dataset.text = content;
  renderMarkdown(reply.querySelector(".content"), content);
  const box = reply.querySelector(".reasoning");
  box.hidden = !reasoning;
  if (reasoning) box.querySelector(".reasoning-text").textContent = reasoning;
  const list = $("#messages");
  if (list.scrollHeight - list.scrollTop - list.clientHeight < 120) reply.scrollIntoView({ block: "end" });
}

function setBusy(busy, text = "") {
  $("#send").disabled = busy;
  $("#stop").disabled = !busy;
  status(text);
}

function status(text) {
  $("#stream-status").textContent = text;
}

function composerError(text) {
  const box = $("#composer-error");
  box.textContent = text;
  box.hidden = !text;
}

function mb(bytes) {
  return `${(bytes / (1024 * 1024)).toFixed(0)} MB`;
}
