// The HTTP API as the page uses it: JSON calls, Server-Sent Events over POST, and errors as the API words them.
// Every failure becomes an ApiError carrying the server's {code, message, param} and any Retry-After.

const KEY_STORE = "dcar.apiKey";
// An `error` event arrives inside a 200 stream; its code says what the status would have been.
const STREAM_ERROR_STATUS = { deadline_exceeded: 504, shutting_down: 503, engine_failed: 503, cancelled: 499 };

export class ApiError extends Error {
  constructor(status, code, message, param = null, retryAfter = null, requestId = null) {
    super(message);
    this.status = status; // HTTP status; 0 when the request never got an answer
    this.code = code;
    this.param = param;
    this.retryAfter = retryAfter; // seconds, from the Retry-After header
    this.requestId = requestId;
  }

  get retryable() {
    return this.status === 429 || this.status >= 500 || ["network_error", "stream_ended"].includes(this.code);
  }
}

export function apiKey() {
  return sessionStorage.getItem(KEY_STORE) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_STORE, key);
  else sessionStorage.removeItem(KEY_STORE);
}

function headers(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

function retryAfterOf(response) {
  const value = response.headers.get("Retry-After");
  if (value === null) return null;
  const seconds = Number.parseInt(value, 10);
  return Number.isFinite(seconds) && seconds >= 0 ? seconds : null;
}

// A non-2xx response -> ApiError with the server's own words (or the status line if the body is not ours).
async function errorOf(response) {
  const requestId = response.headers.get("X-Request-Id");
  let code = "http_error";
  let message = `${response.status} ${response.statusText}`.trim();
  let param = null;
  try {
    const body = await response.json();
    if (body && body.error && typeof body.error.message === "string") {
      code = String(body.error.code || code);
      message = body.error.message;
      param = body.error.param ?? null;
    }
  } catch {
    // not JSON (a proxy's error page, say): keep the status line
  }
  return new ApiError(response.status, code, message, param, retryAfterOf(response), requestId);
}

async function send(path, init) {
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    if (e.name === "AbortError") throw new ApiError(0, "cancelled", "stopped");
    throw new ApiError(0, "network_error", `could not reach the server (${e.message})`);
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

export async function getJSON(path) {
  const response = await send(path, { headers: headers({ Accept: "application/json" }), cache: "no-store" });
  return response.json();
}

// Split an event-stream chunk buffer into complete events; returns [events, rest].
function parseEvents(buffer) {
  const events = [];
  const blocks = buffer.replace(/\r\n/g, "\n").split("\n\n");
  const rest = blocks.pop();
  for (const block of blocks) {
    let event = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith("event:")) event = line.slice(6).trim();
      else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
    }
    if (data.length) events.push({ event, data: data.join("\n") });
  }
  return [events, rest];
}

// POST with stream=true: calls on.queued(event) while the request waits in the server's queue (its place,
// again whenever it changes), on.progress(event) per unmasking step, and resolves with the `images` body.
// `body` is a plain object (sent as JSON) or a FormData (multipart). `signal` aborts (the server then drops
// the rows at its next step).
export async function streamImages(path, body, on, signal) {
  const isForm = body instanceof FormData;
  const init = {
    method: "POST",
    signal,
    headers: headers(isForm ? { Accept: "text/event-stream" }
                            : { Accept: "text/event-stream", "Content-Type": "application/json" }),
    body: isForm ? body : JSON.stringify(body),
  };
  const response = await send(path, init);
  const type = response.headers.get("Content-Type") || "";
  if (!type.startsWith("text/event-stream")) return response.json();
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      let chunk;
      try {
        chunk = await reader.read();
      } catch (e) {
        if (e.name === "AbortError") throw new ApiError(0, "cancelled", "stopped");
        throw new ApiError(0, "network_error", `the connection broke during generation (${e.message})`);
      }
      if (chunk.done) break;
      buffer += decoder.decode(chunk.value, { stream: true });
      let events;
      [events, buffer] = parseEvents(buffer);
      for (const { event, data } of events) {
        const payload = JSON.parse(data);
        if (event === "progress") on.progress(payload);
        else if (event === "queued") on.queued?.(payload);
        else if (event === "images") return payload;
        else if (event === "error") {
          const err = payload.error || {};
          const code = String(err.code || "internal_error");
          throw new ApiError(STREAM_ERROR_STATUS[code] || 500, code, String(err.message || "error"),
                             err.param ?? null, null, err.request_id ?? null);
        }
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
  throw new ApiError(0, "stream_ended", "the event stream ended before the result arrived");
}
