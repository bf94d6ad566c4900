// The pool map: one canvas per device, a cell per block (or per group of blocks on big
// pools), coloured by the kind of unit in it and shaded by model; retained (unpinned)
// units are pale and striped, shared ones carry a dot. Hover shows the unit.

import { formatBytes, json } from "./api.js";
import { state } from "./live.js";

export const HUES = { weight: 212, task_block: 275, expert: 28, kv: 150 };
const SHADES = [40, 62, 30, 52, 70, 46];     // lightness per model, in turn
const MAX_HEIGHT = 190;
const FREE = "#e6e9ef";
const canvases = new Map();     // device -> {canvas, cells: unit id per cell, per, cell, cols}

// A model's shade: its place among every model seen, so that it keeps it while it comes
// and goes.
export function modelIndex() {
  const names = new Set([...state.store.map((m) => m.id), ...Object.keys(state.models)]);
  for (const pool of state.pools.values()) {
    for (const row of pool.units.values()) for (const m of row[5]) names.add(m);
  }
  return new Map([...names].sort().map((m, i) => [m, i]));
}

// Pinned: the model's shade of the kind's hue. Retained: pale, striped in that shade.
export function colour(kind, model, pinned, index) {
  const hue = HUES[kind] ?? 0;
  const light = SHADES[(index.get(model) ?? 0) % SHADES.length];
  return pinned ? `hsl(${hue} 62% ${light}%)` : `hsl(${hue} 35% 89%)`;
}

function layout(n, width) {
  for (const cell of [14, 12, 10, 8, 6, 5, 4]) {
    const cols = Math.max(1, Math.floor(width / cell));
    if (Math.ceil(n / cols) * cell <= MAX_HEIGHT) return { cell, cols, per: 1 };
  }
  const cell = 4;
  const cols = Math.max(1, Math.floor(width / cell));
  return { cell, cols, per: Math.ceil(n / (cols * Math.floor(MAX_HEIGHT / cell))) };
}

// The unit id shown in each cell: the one holding most of the cell's blocks (0: free).
function cellUnits(pool, per) {
  const owner = new Int32Array(pool.num_blocks);
  for (const [id, start, nblocks] of pool.units.values()) owner.fill(id, start, start + nblocks);
  const cells = new Int32Array(Math.ceil(pool.num_blocks / per));
  for (let c = 0; c < cells.length; c++) {
    if (per === 1) { cells[c] = owner[c]; continue; }
    const counts = new Map();
    for (let b = c * per; b < Math.min((c + 1) * per, owner.length); b++) {
      counts.set(owner[b], (counts.get(owner[b]) || 0) + 1);
    }
    cells[c] = [...counts.entries()].sort((a, b) => b[1] - a[1])[0][0];
  }
  return cells;
}

function card(device) {
  const el = document.createElement("div");
  el.className = "device";
  el.innerHTML = `<div class="device-head"><b></b><span class="muted"></span></div>
    <canvas role="img"></canvas>`;
  el.querySelector("b").textContent = device;
  el.querySelector("canvas").setAttribute("aria-label", `pool map of ${device}`);
  el.dataset.device = device;
  document.getElementById("devices").append(el);
  const entry = { el, canvas: el.querySelector("canvas"), cells: new Int32Array(0) };
  entry.canvas.addEventListener("mousemove", (e) => hover(device, entry, e));
  entry.canvas.addEventListener("mouseleave", () => hideTip());
  canvases.set(device, entry);
  return entry;
}

export function drawPools() {
  const index = modelIndex();
  for (const [device, pool] of state.pools) {
    const entry = canvases.get(device) || card(device);
    draw(entry, pool, index);
  }
  drawHost();
}

function draw(entry, pool, index) {
  const { canvas } = entry;
  const width = canvas.parentElement.clientWidth;
  const { cell, cols, per } = layout(pool.num_blocks, width);
  const cells = cellUnits(pool, per);
  const rows = Math.ceil(cells.length / cols);
  const dpr = window.devicePixelRatio || 1;
  canvas.style.width = `${cols * cell}px`;
  canvas.style.height = `${rows * cell}px`;
  canvas.width = cols * cell * dpr;
  canvas.height = rows * cell * dpr;
  const g = canvas.getContext("2d");
  g.scale(dpr, dpr);
  const gap = cell >= 8 ? 2 : 1;
  const size = cell - gap;
  for (let c = 0; c < cells.length; c++) {
    const x = (c % cols) * cell;
    const y = Math.floor(c / cols) * cell;
    const row = cells[c] ? pool.units.get(cells[c]) : null;
    if (!row) {
      g.fillStyle = FREE;
      g.fillRect(x, y, size, size);
      continue;
    }
    const [, , , kind, pins, models] = row;
    g.fillStyle = colour(kind, models[0], pins > 0, index);
    g.fillRect(x, y, size, size);
    if (pins === 0 && size >= 5) stripe(g, x, y, size, colour(kind, models[0], true, index));
    if (models.length > 1 && size >= 7) dot(g, x, y, size);
  }
  Object.assign(entry, { cells, per, cell, cols });
  summarise(canvas, pool);
  const used = [...pool.units.values()].reduce((s, r) => s + r[2], 0);
  const note = per > 1 ? ` · one cell = ${per} blocks` : "";
  entry.el.querySelector(".muted").textContent =
    ` ${formatBytes(pool.num_blocks * pool.block_size)} in ${pool.num_blocks} blocks of ` +
    `${formatBytes(pool.block_size)} · ${formatBytes(used * pool.block_size)} used${note}`;
}

// What the canvas shows, in words: blocks per model, pinned or retained, and free.
function summarise(canvas, pool) {
  const by = {};
  let used = 0;
  for (const [, , nblocks, kind, pins, models] of pool.units.values()) {
    used += nblocks;
    const m = (by[models[0] || "(none)"] ||= { pinned: 0, retained: 0, kinds: {} });
    m[pins ? "pinned" : "retained"] += nblocks;
    m.kinds[kind] = (m.kinds[kind] || 0) + nblocks;
  }
  canvas.dataset.summary = JSON.stringify({ models: by, free: pool.num_blocks - used });
  const words = Object.entries(by).map(([m, c]) =>
    `${m}: ${c.pinned} blocks pinned, ${c.retained} retained`);
  canvas.setAttribute("aria-label", `pool map of ${pool.device}: ${words.join("; ")}; ` +
    `${pool.num_blocks - used} blocks free`);
}

function stripe(g, x, y, size, shade) {
  g.strokeStyle = shade;
  g.lineWidth = size >= 9 ? 2 : 1;
  g.beginPath();
  g.moveTo(x, y + size);
  g.lineTo(x + size, y);
  g.stroke();
}

function dot(g, x, y, size) {
  g.fillStyle = "rgba(255,255,255,0.9)";
  g.beginPath();
  g.arc(x + size / 2, y + size / 2, Math.max(1.5, size / 6), 0, 2 * Math.PI);
  g.fill();
}

function drawHost() {
  let el = document.getElementById("host");
  if (!state.host) return el?.remove();
  if (!el) {
    el = document.createElement("div");
    el.id = "host";
    el.className = "host";
    el.innerHTML = `<span class="label">host tier</span>
      <div class="bar"><div class="weights"></div><div class="kv"></div></div>
      <span class="muted"></span>`;
    document.getElementById("devices").after(el);
  }
  const { used_bytes: used, capacity_bytes: cap, units, kv_bytes: kv = 0 } = state.host;
  const share = (n) => `${cap ? (100 * n) / cap : 0}%`;
  el.querySelector(".bar .weights").style.width = share(used - kv);
  el.querySelector(".bar .kv").style.width = share(kv);
  el.querySelector(".muted").textContent =
    `${formatBytes(used)} of ${formatBytes(cap)} · ${units} unit${units === 1 ? "" : "s"}` +
    (kv ? ` · KV pages ${formatBytes(kv)}` : "");
}

// ---- hover ---------------------------------------------------------------------------
const tip = () => document.getElementById("tooltip");
let pending = null;

function hideTip() {
  tip().hidden = true;
  clearTimeout(pending);
}

function hover(device, entry, e) {
  const rect = entry.canvas.getBoundingClientRect();
  const col = Math.floor((e.clientX - rect.left) / entry.cell);
  const row = Math.floor((e.clientY - rect.top) / entry.cell);
  const id = entry.cells[row * entry.cols + col];
  const unit = id ? state.pools.get(device)?.units.get(id) : null;
  const el = tip();
  el.style.left = `${Math.min(e.clientX + 14, window.innerWidth - 330)}px`;
  el.style.top = `${e.clientY + 14}px`;
  el.hidden = false;
  if (!unit) {
    el.innerHTML = `<b>free</b><br>block ${(row * entry.cols + col) * entry.per}`;
    return;
  }
  const pool = state.pools.get(device);
  const [, start, nblocks, kind, pins, models] = unit;
  el.innerHTML = `<b>${esc(kind)}</b> unit ${id}<br>${esc(models.join(", ") || "(no model)")}<br>` +
    `blocks ${start}–${start + nblocks - 1} · ${formatBytes(nblocks * pool.block_size)}<br>` +
    `${pins ? `pinned ×${pins}` : "retained (unpinned)"}<div class="more muted">…</div>`;
  clearTimeout(pending);
  pending = setTimeout(() => detail(device, id), 120);
}

async function detail(device, id) {
  try {
    const d = await json(`/admin/units/${encodeURIComponent(device)}/${id}`);
    const more = tip().querySelector(".more");
    if (!more || tip().hidden) return;
    const value = d.eviction_value == null ? (d.pins ? "none while pinned" : "–")
      : d.eviction_value.toPrecision(2);
    const reload = d.reload_s == null ? "" :
      `<br>reload ${(d.reload_s * 1000).toPrecision(2)} ms from ${esc(d.comes_back_from)}` +
      ` · demand ${d.demand.toFixed(2)}`;
    more.innerHTML = `${d.names.length ? esc(d.names.join(", ")) + "<br>" : ""}` +
      `${formatBytes(d.bytes)} exactly · used ${d.uses}× · idle ${d.idle_s} s${reload}<br>` +
      `eviction value ${value} (${esc(d.policy)}: lowest goes first)` +
      `${d.in_host_tier ? "<br>also in the host tier" : ""}`;
  } catch (e) {
    const more = tip().querySelector(".more");
    if (more) more.textContent = "gone (evicted or released)";
  }
}

export function esc(s) {
  return String(s).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
}
