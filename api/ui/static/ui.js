// Small DOM helpers shared by the views. Text always goes in as text nodes.

export const $ = (selector) => document.querySelector(selector);

// `el("button", {type: "button"}, "Send")`: attributes set as attributes, children as
// nodes or text (never parsed as HTML).
export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value !== null && value !== undefined && value !== false) node.setAttribute(name, value);
  }
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

let settings = {
  auth: "on",
  image_max_bytes: 10 * 1024 * 1024,
  image_max_per_request: 8,
  max_request_bytes: 16 * 1024 * 1024,
  batch_max_file_bytes: 200 * 1024 * 1024,
};

// The deployment's limits, as /ui/config.json gives them (so the page refuses what the
// API would, before uploading it).
export async function loadConfig() {
  try {
    const response = await fetch("config.json", { cache: "no-store" });
    if (response.ok) settings = { ...settings, ...(await response.json()) };
  } catch {
    // The defaults above; the API still checks every request.
  }
  return settings;
}

export const config = () => settings;

// `fn` wrapped to run at most once per animation frame, however often it is called: a
// stream's events re-render a whole reply, and a frame is as often as anyone sees it.
export function onceAFrame(fn) {
  let pending = false;
  return () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      fn();
    });
  };
}

let noticeTimer = null;
export function notice(text) {
  const box = $("#notice");
  box.textContent = text;
  box.hidden = !text;
  clearTimeout(noticeTimer);
  if (text) noticeTimer = setTimeout(() => (box.hidden = true), 10_000);
}

export function seconds(value) {
  if (value === null || value === undefined) return "–";
  return value < 10 ? `${value.toFixed(2)} s` : `${value.toFixed(1)} s`;
}

export function when(epochSeconds) {
  if (!epochSeconds) return "–";
  return new Date(epochSeconds * 1000).toLocaleString();
}
