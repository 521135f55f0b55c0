// The API from the page: the key in the Authorization header (never in an address), and
// every failure turned into one readable message.

const KEY_ITEM = "ferry.apiKey";

export class ApiError extends Error {
  constructor(status, message, retryAfter = null) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

export const session = {
  get key() {
    return sessionStorage.getItem(KEY_ITEM);
  },
  set key(value) {
    if (value) sessionStorage.setItem(KEY_ITEM, value);
    else sessionStorage.removeItem(KEY_ITEM);
  },
  // Set when the API answered without a key: authentication is off.
  open: false,
};

// Listeners for a 401 on a signed-in page (a key revoked or mistyped).
const unauthorized = new Set();
export function onUnauthorized(listener) {
  unauthorized.add(listener);
}

export function headers(extra = {}) {
  const all = { ...extra };
  if (session.key) all.Authorization = `Bearer ${session.key}`;
  return all;
}

// A fetch of the API: JSON in and out unless told otherwise. Throws ApiError.
export async function api(path, { method = "GET", json, body, signal, raw = false, key } = {}) {
  const init = { method, signal, headers: headers() };
  if (key !== undefined) {
    if (key) init.headers.Authorization = `Bearer ${key}`;
    else delete init.headers.Authorization;
  }
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (body !== undefined) {
    init.body = body;
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "Ferry cannot be reached: check the connection and try again.");
  }
  if (!response.ok) throw await errorOf(response, key === undefined);
  if (raw) return response;
  if (response.status === 204) return null;
  return response.json();
}

export async function errorOf(response, signedIn = true) {
  let message = "";
  try {
    const body = await response.json();
    message = body?.error?.message || body?.detail || "";
  } catch {
    // Not JSON: a proxy's page, say. The status says enough.
  }
  const retryAfter = response.headers.get("Retry-After");
  const status = response.status;
  let text;
  if (status === 401) {
    text = "The API key was not accepted (401). Sign in again with a valid key.";
    if (signedIn) for (const listener of unauthorized) listener();
  } else if (status === 413) {
    text = `Too large for Ferry (413): ${message || "the request is over the size limit."}`;
  } else if (status === 429) {
    text = `Too many requests (429)${retryAfter ? `: try again in ${retryAfter} s` : ""}. ${message}`;
  } else if (status >= 500) {
    text = `Ferry had a problem (${status})${retryAfter ? `, try again in ${retryAfter} s` : ""}: ${message || response.statusText}`;
  } else {
    text = `${message || response.statusText} (${status})`;
  }
  return new ApiError(status, text.trim(), retryAfter);
}

// Bytes the API serves behind the key (stored images, batch files) as a blob: URL, which
// an <img> or a download link can use without sending the key itself.
const blobUrls = new Map();
export async function blobUrl(path) {
  if (blobUrls.has(path)) return blobUrls.get(path);
  const response = await api(path, { raw: true });
  const url = URL.createObjectURL(await response.blob());
  blobUrls.set(path, url);
  return url;
}

export async function download(path, filename) {
  const response = await api(path, { raw: true });
  const url = URL.createObjectURL(await response.blob());
  const link = document.createElement("a");
  link.href = url;
  link.download = filename;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

// `https://host/v1/images/abc` (as the API writes image links) -> `/v1/images/abc`: the
// page fetches from its own origin whatever host the API saw.
export function localPath(url) {
  try {
    const parsed = new URL(url, location.origin);
    return parsed.pathname + parsed.search;
  } catch {
    return url;
  }
}
