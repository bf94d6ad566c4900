// The live feed (GET /admin/live): a snapshot, then updates that carry only what changed.
// Keeps the state the page draws from and tells listeners after each message.

import { readEvents, request } from "./api.js";

export const state = {
  pools: new Map(),     // device -> {device, num_blocks, block_size, units: Map(id -> row)}
  models: {},           // resident models: id -> {device, bytes, pinned, base, running, waiting}
  host: null,
  numbers: {},
  events: [],           // newest last, at most MAX_EVENTS
  store: [],            // the store's models, from /v1/models: [{id, parent}]
};
const MAX_EVENTS = 200;
const listeners = [];

export function onChange(fn) {
  listeners.push(fn);
}

function setPool(p) {
  const units = new Map();
  for (const row of p.units) units.set(row[0], row);
  state.pools.set(p.device, { ...p, units });
}

function applyDiff(d) {
  if (d.full) return setPool(d);
  const pool = state.pools.get(d.device);
  if (!pool) return;
  for (const id of d.drop) pool.units.delete(id);
  for (const row of d.set) pool.units.set(row[0], row);
}

function take(body, snapshot) {
  if (snapshot) {
    state.pools.clear();
    state.events = [];
    for (const p of body.pools) setPool(p);
  } else {
    for (const d of body.pools || []) applyDiff(d);
  }
  for (const name of ["models", "host", "numbers"]) {
    if (name in body) state[name] = body[name];
  }
  if (body.events) {
    state.events.push(...body.events);
    state.events.splice(0, Math.max(0, state.events.length - MAX_EVENTS));
  }
  const changed = { snapshot, pools: snapshot || Boolean(body.pools),
    models: snapshot || "models" in body, events: body.events || [] };
  for (const fn of listeners) fn(changed);
}

function status(text, ok) {
  const el = document.getElementById("conn");
  el.textContent = text;
  el.classList.toggle("ok", ok);
}

// Connects, and reconnects after a pause whenever the stream ends.
export async function connect() {
  for (let pause = 500; ; pause = Math.min(pause * 2, 8000)) {
    try {
      const resp = await request("/admin/live");
      if (resp.ok) {
        status("live", true);
        pause = 500;
        await readEvents(resp, (name, data) => take(JSON.parse(data), name === "snapshot"));
      }
    } catch (e) {
      // the server went away; try again
    }
    status("reconnecting…", false);
    await new Promise((r) => setTimeout(r, pause));
  }
}
