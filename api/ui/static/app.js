// The page's start: sign in (or not, when the API runs without keys), then the views.

import { api, ApiError, onUnauthorized, session } from "./api.js";
import { batchesView } from "./batches.js";
import { initChat, startChat, stopFollowing } from "./chat.js";
import { jobsView } from "./jobs.js";
import { $, loadConfig } from "./ui.js";

const views = { chat: null, jobs: jobsView, batches: batchesView };
let current = "chat";

async function boot() {
  const config = await loadConfig();
  initChat();
  jobsView.init();
  batchesView.init();
  for (const tab of document.querySelectorAll(".tab")) {
    tab.addEventListener("click", () => show(tab.dataset.view));
  }
  $("#signin-form").addEventListener("submit", (event) => {
    event.preventDefault();
    signIn($("#api-key").value.trim());
  });
  $("#sign-out").addEventListener("click", signOut);
  onUnauthorized(() => {
    if (!session.open) signOut("The API key was not accepted (401). Sign in again.");
  });
  if (config.auth === "off") {
    session.open = true;
    session.key = null;
    return enter("Authentication is off");
  }
  if (session.key) return signIn(session.key);
  showSignIn();
}

async function signIn(key) {
  const error = $("#signin-error");
  error.hidden = true;
  if (!key) return showSignIn();
  try {
    await api("/v1/models", { key });
  } catch (problem) {
    session.key = null;
    showSignIn(
      problem instanceof ApiError && problem.status === 401
        ? "That API key was not accepted (401). Check it and try again."
        : problem.message,
    );
    return;
  }
  session.key = key;
  $("#api-key").value = "";
  enter("Signed in");
}

async function enter(who) {
  $("#signin").hidden = true;
  $(".tabs").hidden = false;
  $("#who").hidden = false;
  $("#who").textContent = who;
  $("#sign-out").hidden = session.open;
  show(current);
  if (current === "chat") $("#message").focus();
  try {
    await startChat();
  } catch (error) {
    $("#notice").textContent = error.message;
    $("#notice").hidden = false;
  }
}

function signOut(message) {
  stopFollowing();
  for (const view of Object.values(views)) view?.leave();
  session.key = null;
  sessionStorage.clear();
  $(".tabs").hidden = true;
  $("#who").hidden = true;
  $("#sign-out").hidden = true;
  for (const view of document.querySelectorAll(".view")) view.hidden = true;
  showSignIn(typeof message === "string" ? message : "");
}

function showSignIn(message = "") {
  $("#signin").hidden = false;
  const error = $("#signin-error");
  error.textContent = message;
  error.hidden = !message;
  $("#api-key").focus();
}

function show(name) {
  views[current]?.leave();
  current = name;
  for (const tab of document.querySelectorAll(".tab")) {
    if (tab.dataset.view === name) tab.setAttribute("aria-current", "page");
    else tab.removeAttribute("aria-current");
  }
  for (const key of Object.keys(views)) $(`#view-${key}`).hidden = key !== name;
  views[name]?.enter();
}

boot();
