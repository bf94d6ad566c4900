// The panels around the map: numbers, models (load / unload / pin), events, legend.

import { formatBytes, post } from "./api.js";
import { colour, esc, HUES, modelIndex } from "./poolmap.js";
import { state } from "./live.js";

export function setStoreModels(models) {
  state.store = models;
}

// ---- numbers -------------------------------------------------------------------------
const ms = (s) => (s == null ? "–" : s < 1 ? `${Math.round(s * 1000)} ms` : `${s.toFixed(2)} s`);
const pct = (x) => (x == null ? "–" : `${Math.round(x * 100)}%`);

export function drawNumbers() {
  const n = state.numbers;
  const tiles = [
    ["running", n.running ?? 0], ["waiting", n.waiting ?? 0],
    ["TTFT p50", ms(n.ttft_p50)], ["TTFT p95", ms(n.ttft_p95)],
    ["tokens/s", n.tokens_per_s == null ? "–" : n.tokens_per_s.toFixed(1)],
    ["loads", n.loads ?? 0], ["evictions", n.evictions ?? 0],
    ["prefix hits", pct(n.prefix_hit_rate)], ["expert hits", pct(n.expert_hit_rate)],
  ];
  document.getElementById("numbers").innerHTML = tiles.map(([label, value]) =>
    `<div class="tile"><span class="value">${esc(value)}</span>` +
    `<span class="label">${esc(label)}</span></div>`).join("");
}

// ---- legend --------------------------------------------------------------------------
export function drawLegend() {
  const index = new Map();
  const kinds = Object.keys(HUES).map((k) =>
    `<span><i style="background:${colour(k, "", true, index)}"></i>${k.replace("_", " ")}</span>`);
  document.getElementById("legend").innerHTML = [
    ...kinds,
    `<span><i class="free"></i>free</span>`,
    `<span><i class="retained"></i>retained (unpinned)</span>`,
    `<span><i class="shared"></i>shared by models</span>`,
    `<span class="muted">shade = model</span>`,
  ].join("");
}

// ---- models --------------------------------------------------------------------------
export function drawModels() {
  const index = modelIndex();
  const body = document.querySelector("#models tbody");
  const rows = state.store.map(({ id, parent }) => {
    const m = state.models[id];
    const swatch = `<i style="background:${colour("weight", id, true, index)}"></i>`;
    const where = m ? `${esc(m.device)} · ${formatBytes(m.bytes)}` +
      (m.running + m.waiting ? ` · ${m.running}+${m.waiting} req` : "") : "";
    const buttons = m
      ? `<button data-act="unload">Unload</button>` +
        `<button data-act="${m.pinned ? "unpin" : "pin"}" class="${m.pinned ? "on" : ""}">` +
        `${m.pinned ? "Pinned" : "Pin"}</button>`
      : `<button data-act="load">Load</button>`;
    return `<tr data-model="${esc(id)}" class="${m ? "resident" : ""}">` +
      `<td>${swatch}${esc(id)}${parent ? ` <span class="muted">↳ ${esc(parent)}</span>` : ""}</td>` +
      `<td class="muted">${where}</td><td class="actions">${buttons}</td></tr>`;
  });
  body.innerHTML = rows.join("");
}

export function wireModelButtons() {
  document.getElementById("models").addEventListener("click", async (e) => {
    const button = e.target.closest("button");
    if (!button) return;
    const id = button.closest("tr").dataset.model;
    button.disabled = true;
    button.textContent = "…";
    try {
      await post(`/admin/models/${encodeURIComponent(id)}/${button.dataset.act}`);
    } catch (err) {
      showError(err.message);
    } finally {
      button.disabled = false;
      drawModels();
    }
  });
}

export function showError(message) {
  addEvent({ kind: "error", time: Date.now() / 1000, message });
}

// ---- events --------------------------------------------------------------------------
function describe(e) {
  switch (e.kind) {
    case "load": {
      const from = [["resident", e.bytes_from_device], ["host", e.bytes_from_host],
        ["disk", e.bytes_from_disk]].filter(([, n]) => n > 0)
        .map(([tier, n]) => `${formatBytes(n)} ${tier}`);
      return `${e.seconds.toFixed(2)} s · ${formatBytes(e.bytes_total)} (${from.join(", ")})`;
    }
    case "unload":
      return e.retained ? "units retained" : "units released";
    case "evict":
      if (e.burst) return describeBurst(e);
      return `${e.unit_kind.replace("_", " ")} unit ${e.unit} · ${formatBytes(e.bytes)}`;
    case "demote":
      return `unit ${e.unit} → host tier · ${formatBytes(e.bytes)}`;
    case "error":
      return e.message;
    default:
      return Object.entries(e).filter(([k]) => !["seq", "time", "kind", "device", "model"]
        .includes(k)).map(([k, v]) => `${k} ${v}`).join(" · ");
  }
}

// A burst continuing the one on top of the list (same model, within seconds) joins it.
function merged(list, e) {
  const top = list.firstChild?.group;
  if (!e.burst || !top?.burst || top.model !== e.model || top.device !== e.device ||
      e.time - top.time > 5) return null;
  top.units += e.units;
  top.bytes += e.bytes;
  top.demoted += e.demoted;
  for (const [k, n] of Object.entries(e.kinds)) top.kinds[k] = (top.kinds[k] || 0) + n;
  return top;
}

export function addEvent(e) {
  const list = document.getElementById("events");
  const group = merged(list, e);
  if (group) {
    list.firstChild.lastChild.innerHTML = `<b>${esc(group.model)}</b> ${esc(describe(group))}`;
    return;
  }
  const li = document.createElement("li");
  li.group = e;
  li.className = `ev-${e.kind}`;
  const time = new Date(e.time * 1000).toLocaleTimeString([], { hour12: false });
  li.innerHTML = `<span class="muted">${time}</span><span class="kind">${esc(e.kind)}</span>` +
    `<span>${e.model ? `<b>${esc(e.model)}</b> ` : ""}${esc(describe(e))}</span>`;
  list.prepend(li);
  while (list.children.length > 200) list.lastChild.remove();
}

// A burst of evictions (and the demotions before them) reads as one line per model.
function coalesce(events) {
  const out = [];
  for (const e of events) {
    if (e.kind !== "evict" && e.kind !== "demote") {
      out.push(e);
      continue;
    }
    let group = out.at(-1);
    if (!group?.burst || group.model !== e.model || group.device !== e.device) {
      group = { kind: "evict", burst: true, model: e.model, device: e.device, time: e.time,
        units: 0, bytes: 0, demoted: 0, kinds: {} };
      out.push(group);
    }
    if (e.kind === "demote") {
      group.demoted += 1;
    } else {
      group.units += 1;
      group.bytes += e.bytes;
      group.kinds[e.unit_kind] = (group.kinds[e.unit_kind] || 0) + 1;
    }
  }
  return out;
}

function describeBurst(g) {
  const kinds = Object.entries(g.kinds).map(([k, n]) => `${n} ${k.replace("_", " ")}`);
  return `${g.units} unit${g.units === 1 ? "" : "s"} (${kinds.join(", ")}) · ` +
    `${formatBytes(g.bytes)}${g.demoted ? ` · ${g.demoted} kept in the host tier` : ""}`;
}

export function drawEvents(changed) {
  if (changed.snapshot) {
    document.getElementById("events").innerHTML = "";
    for (const e of coalesce(state.events)) addEvent(e);
  } else {
    for (const e of coalesce(changed.events)) addEvent(e);
  }
}
