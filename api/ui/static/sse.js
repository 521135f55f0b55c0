// A job's Server-Sent Events, read with fetch and a streaming body reader: EventSource
// cannot send the Authorization header. The page does what EventSource would: remember the
// last event id and reconnect with Last-Event-ID, so nothing is missed or repeated.

import { errorOf, headers } from "./api.js";

export const TERMINAL = new Set(["done", "error", "cancelled", "expired"]);
const FIRST_DELAY_MS = 500;
const MAX_DELAY_MS = 5000;

// Follows job `jobId` from after `lastEventId` (null: from the start) until a terminal
// event, reconnecting after drops. `onEvent(type, data, id)` runs for each event in order;
// `onState("streaming" | "reconnecting", error?)` reports the connection. Resolves with the
// terminal event's type, or null when `signal` aborts. A 4xx other than 429 rejects.
export async function followJob(jobId, { lastEventId = null, onEvent, onState, signal }) {
  let last = lastEventId;
  let delay = FIRST_DELAY_MS;
  const path = `/v1/jobs/${encodeURIComponent(jobId)}/events`;
  while (!signal?.aborted) {
    const init = { headers: headers({ Accept: "text/event-stream" }), signal, cache: "no-store" };
    if (last) init.headers["Last-Event-ID"] = last;
    let response = null;
    try {
      response = await fetch(path, init);
    } catch {
      // Offline, or the API went away: try again below.
    }
    if (response && !response.ok) {
      const error = await errorOf(response);
      if (response.status < 500 && response.status !== 429) throw error;
      onState?.("reconnecting", error);
    } else if (response) {
      onState?.("streaming");
      delay = FIRST_DELAY_MS;
      try {
        for await (const event of readEvents(response.body)) {
          const data = event.data ? JSON.parse(event.data) : {};
          onEvent(event.type, data, event.id);
          if (event.id) last = event.id;
          if (TERMINAL.has(event.type)) return event.type;
        }
      } catch (error) {
        if (signal?.aborted) return null;
        if (error instanceof SyntaxError) throw error;
      }
      // Ended without a terminal event (a drop, or the API's stream time limit).
      onState?.("reconnecting");
    } else {
      onState?.("reconnecting");
    }
    if (!(await sleep(delay, signal))) return null;
    delay = Math.min(delay * 2, MAX_DELAY_MS);
  }
  return null;
}

// Events out of a text/event-stream body, as WHATWG's parser reads them.
export async function* readEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = { type: "message", data: [], id: null };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      const lines = buffer.split(/\r\n|\r|\n/);
      buffer = lines.pop();
      for (const line of lines) {
        if (line === "") {
          if (event.data.length) {
            yield { type: event.type, data: event.data.join("\n"), id: event.id };
          }
          event = { type: "message", data: [], id: null };
          continue;
        }
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "data") event.data.push(value);
        else if (field === "event") event.type = value;
        else if (field === "id") event.id = value;
      }
    }
  } finally {
    reader.releaseLock();
  }
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve(false);
    const timer = setTimeout(() => resolve(true), ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve(false);
    });
  });
}
