// Requests to the server, with the API key when one is set. A 401 asks for the key once
// (a dialog), then retries; the key is kept in the browser's local storage.

const KEY = "edgeserve.key";
let waiting = null;     // the open key prompt, shared by every request that got a 401

export function key() {
  return localStorage.getItem(KEY) || "";
}

function headers(extra = {}) {
  const h = { ...extra };
  if (key()) h.Authorization = `Bearer ${key()}`;
  return h;
}

export class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// fetch with the key; a 401 prompts for a key and tries again with it.
export async function request(path, options = {}) {
  for (;;) {
    const resp = await fetch(path, { ...options, headers: headers(options.headers) });
    if (resp.status !== 401) return resp;
    await askKey(Boolean(key()));
  }
}

export async function json(path, options = {}) {
  const resp = await request(path, options);
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) {
    const message = body?.error?.message || `${resp.status} ${resp.statusText}`;
    throw new HttpError(resp.status, message);
  }
  return body;
}

export function post(path, body) {
  return json(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
}

export function askKey(refused = false) {
  if (waiting) return waiting;
  const dialog = document.getElementById("key-dialog");
  const input = document.getElementById("key-input");
  document.getElementById("key-error").hidden = !refused;
  waiting = new Promise((resolve) => {
    document.getElementById("key-form").onsubmit = () => {
      localStorage.setItem(KEY, input.value.trim());
      input.value = "";
      waiting = null;
      resolve();
    };
  });
  if (!dialog.open) dialog.showModal();
  document.getElementById("key-button").hidden = false;
  return waiting;
}

// Reads a text/event-stream response: calls onEvent(name, data) for each event.
export async function readEvents(resp, onEvent, signal) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    if (signal?.aborted) break;
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("data: ")) data.push(line.slice(6));
      }
      if (data.length) onEvent(name, data.join("\n"));
    }
  }
}

export function formatBytes(n) {
  if (n == null) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${n.toFixed(i && n < 10 ? 1 : 0)} ${units[i]}`;
}
