// The HTTP API as the page uses it. Relative URLs only (the page may sit behind a path prefix).

let apiKey = "";

/** The key sent as X-API-Key when the server asks for one ("" sends none). */
export function setApiKey(key) { apiKey = key.trim(); }

/** A request the server (or the network) refused; `message` is the server's own words when it sent any. */
export class ApiError extends Error {
  constructor(status, code, message, retryAfter = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter; // seconds, from Retry-After on 503
  }
}

/** What to tell the user about a failed request: the server's message as it is. */
export function errorText(file, err) {
  const who = file?.name ? `${file.name}: ` : "";
  return err instanceof ApiError ? `${who}${err.message}` : `${who}unexpected error: ${err.message || err}`;
}

function headers() { return apiKey ? { "X-API-Key": apiKey } : {}; }

async function errorFrom(res) {
  let body = null;
  try { body = await res.json(); } catch { /* not our JSON envelope (a proxy's page?) */ }
  const message = body && body.message ? body.message : `the server answered ${res.status} ${res.statusText}`;
  const retry = Number.parseInt(res.headers.get("Retry-After") || "", 10);
  return new ApiError(res.status, body ? body.code : 0, message, Number.isNaN(retry) ? null : retry);
}

async function request(path, init) {
  let res;
  try {
    res = await fetch(path, { ...init, headers: { ...headers(), ...(init.headers || {}) } });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, 0, `cannot reach the server (${err.message})`);
  }
  if (!res.ok) {
    // A missing or wrong key: the page shows its key field (app.js listens).
    if (res.status === 401) window.dispatchEvent(new CustomEvent("m2fp:unauthorized"));
    throw await errorFrom(res);
  }
  return res;
}

/** True when the server answered from its result cache (Server-Timing: cache;desc="hit"). */
export function cacheHit(res) {
  return /(^|,)\s*cache;\s*desc="?hit/.test(res.headers.get("Server-Timing") || "");
}

export async function getInfo() {
  const res = await request("api/info", { cache: "no-store" });
  return res.json();
}

/**
 * POST api/parse. Returns {data, bytes (JSON size), cached, seconds (round trip)}.
 * @param {File} file the photo
 * @param {{outputs: string[], labels: string, signal?: AbortSignal}} options
 */
export async function parsePhoto(file, { outputs, labels, signal }) {
  const form = new FormData();
  form.append("image", file);
  const query = new URLSearchParams({ outputs: outputs.join(","), labels });
  const started = performance.now();
  const res = await request(`api/parse?${query}`, { method: "POST", body: form, signal });
  const text = await res.text();
  const body = JSON.parse(text);
  if (body.code !== 0) throw new ApiError(res.status, body.code, body.message);
  return { data: body.data, bytes: text.length, cached: cacheHit(res), seconds: (performance.now() - started) / 1000 };
}

/**
 * POST api/background. Returns {blob, people (X-People), cached, seconds}.
 * @param {File} file the photo
 * @param {Record<string, string>} params BackgroundParams as strings
 * @param {File|null} backdrop the `background` picture for mode=image
 * @param {AbortSignal} signal
 */
export async function composePhoto(file, params, backdrop, signal) {
  const form = new FormData();
  form.append("image", file);
  if (backdrop) form.append("background", backdrop);
  for (const [name, value] of Object.entries(params)) form.append(name, value);
  const started = performance.now();
  const res = await request("api/background", { method: "POST", body: form, signal });
  const blob = await res.blob();
  const people = Number.parseInt(res.headers.get("X-People") || "", 10);
  return { blob, people: Number.isNaN(people) ? null : people, cached: cacheHit(res),
           seconds: (performance.now() - started) / 1000 };
}
