// Chat: a model picker over the store, streamed replies with a stop button, per-reply
// figures (TTFT, tokens/s, cached prompt tokens, the load if there was one), and
// conversations kept in the browser's local storage.

import { post, readEvents, request } from "./api.js";
import { state } from "./live.js";
import { esc } from "./poolmap.js";
import { showError } from "./panels.js";

const STORE = "edgeserve.conversations";
const $ = (id) => document.getElementById(id);
let conversations = JSON.parse(localStorage.getItem(STORE) || "[]");
let current = null;
let aborter = null;

function save() {
  localStorage.setItem(STORE, JSON.stringify(conversations.slice(-50)));
}

function newConversation() {
  current = { id: Date.now().toString(36), title: "New conversation", messages: [] };
  conversations.push(current);
  drawConversations();
  drawMessages();
}

function drawConversations() {
  $("conversation").innerHTML = [...conversations].reverse().map((c) =>
    `<option value="${esc(c.id)}" ${c === current ? "selected" : ""}>${esc(c.title)}</option>`).join("");
}

export function fillModelPicker() {
  // Group by base: a task or a tagged variant (NAME:tag) sits under its base.
  const groups = new Map();
  for (const { id, parent } of state.store) {
    const base = parent || id.split(":")[0];
    if (!groups.has(base)) groups.set(base, []);
    groups.get(base).push(id);
  }
  const picked = $("model").value || localStorage.getItem("edgeserve.model");
  $("model").innerHTML = [...groups].map(([base, ids]) => ids.length === 1 && ids[0] === base
    ? `<option>${esc(base)}</option>`
    : `<optgroup label="${esc(base)}">${ids.map((i) => `<option>${esc(i)}</option>`).join("")}</optgroup>`,
  ).join("");
  if (picked && state.store.some((m) => m.id === picked)) $("model").value = picked;
}

function bubble(message) {
  const div = document.createElement("div");
  div.className = `msg ${message.role}`;
  div.innerHTML = `<div class="text"></div><div class="meta muted"></div>`;
  div.querySelector(".text").textContent = message.content;
  div.querySelector(".meta").textContent = message.meta || "";
  $("messages").append(div);
  return div;
}

function drawMessages() {
  $("messages").innerHTML = "";
  for (const m of current.messages) bubble(m);
  $("messages").scrollTop = $("messages").scrollHeight;
}

function settings() {
  const num = (id) => ($(id).value === "" ? undefined : Number($(id).value));
  return { temperature: num("temperature"), top_p: num("top_p"),
    max_tokens: num("max_tokens"), seed: num("seed") };
}

async function ensureLoaded(model) {
  if (state.models[model]) return "";
  const r = await post(`/admin/models/${encodeURIComponent(model)}/load`);
  return `load ${r.seconds.toFixed(2)} s (${(r.bytes_from_disk / 1e6).toFixed(1)} MB disk, ` +
    `${(r.bytes_from_host / 1e6).toFixed(1)} MB host, ` +
    `${(r.bytes_from_device / 1e6).toFixed(1)} MB already resident)`;
}

function figures(t0, tFirst, tEnd, usage, load) {
  const parts = [];
  if (load) parts.push(load);
  if (tFirst) parts.push(`TTFT ${Math.round(tFirst - t0)} ms`);
  if (usage && tFirst && tEnd > tFirst && usage.completion_tokens > 1) {
    parts.push(`${((usage.completion_tokens - 1) / ((tEnd - tFirst) / 1000)).toFixed(1)} tok/s`);
  }
  if (usage) {
    parts.push(`${usage.prompt_tokens} prompt + ${usage.completion_tokens} tokens`);
    const cached = usage.prompt_tokens_details?.cached_tokens;
    if (cached) parts.push(`${cached} cached`);
  }
  return parts.join(" · ");
}

async function send(text) {
  const model = $("model").value;
  localStorage.setItem("edgeserve.model", model);
  const user = { role: "user", content: text };
  current.messages.push(user);
  if (current.messages.length === 1) current.title = text.slice(0, 40);
  bubble(user);
  const reply = { role: "assistant", content: "", model };
  const div = bubble(reply);
  div.classList.add("streaming");
  busy(true);
  aborter = new AbortController();
  let tFirst = 0;
  let usage = null;
  let load = "";
  try {
    load = await ensureLoaded(model);
    const system = $("system").value.trim();
    const messages = [...(system ? [{ role: "system", content: system }] : []),
      ...current.messages.filter((m) => m !== reply).map(({ role, content }) => ({ role, content }))];
    const tRequest = performance.now();
    const resp = await request("/v1/chat/completions", {
      method: "POST", signal: aborter.signal, headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model, messages, stream: true,
        stream_options: { include_usage: true }, ...settings() }),
    });
    if (!resp.ok) throw new Error((await resp.json()).error?.message || resp.statusText);
    await readEvents(resp, (_, data) => {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      const delta = chunk.choices?.[0]?.delta?.content;
      if (delta) {
        tFirst = tFirst || performance.now();
        reply.content += delta;
        div.querySelector(".text").textContent = reply.content;
        $("messages").scrollTop = $("messages").scrollHeight;
      }
    }, aborter.signal);
    reply.meta = figures(tRequest, tFirst, performance.now(), usage, load);
  } catch (e) {
    reply.meta = e.name === "AbortError" ? "stopped" : `error: ${e.message}`;
    if (e.name !== "AbortError") showError(e.message);
  } finally {
    current.messages.push(reply);
    div.classList.remove("streaming");
    div.querySelector(".meta").textContent = reply.meta;
    busy(false);
    save();
    drawConversations();
  }
}

function busy(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
}

export function initChat() {
  current = conversations.at(-1) || null;
  if (!current) newConversation();
  drawConversations();
  drawMessages();
  $("new-chat").onclick = newConversation;
  $("delete-chat").onclick = () => {
    conversations = conversations.filter((c) => c !== current);
    save();
    current = conversations.at(-1) || null;
    if (!current) newConversation();
    drawConversations();
    drawMessages();
  };
  $("conversation").onchange = (e) => {
    current = conversations.find((c) => c.id === e.target.value) || current;
    drawMessages();
  };
  $("composer").onsubmit = (e) => {
    e.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || !$("stop").hidden) return;      // one reply at a time
    $("prompt").value = "";
    send(text);
  };
  $("prompt").onkeydown = (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  };
  $("stop").onclick = () => aborter?.abort();
}
