// specserve cluster UI: plain JS over the /v2 REST API (session cookie auth).
"use strict";
const $ = (sel) => document.querySelector(sel);
let logsAbort = null;

async function api(method, path, body) {
  const r = await fetch(path, {
    method, credentials: "same-origin",
    headers: body ? { "content-type": "application/json" } : {},
    body: body ? JSON.stringify(body) : undefined,
  });
  if (r.status === 401) { showLogin(); throw new Error("not signed in"); }
  const data = r.status === 204 ? null : await r.json();
  if (!r.ok) throw new Error(data && data.error ? data.error.message : r.statusText);
  return data;
}

function cell(text, cls) {
  const td = document.createElement("td");
  if (cls) { const s = document.createElement("span"); s.className = cls; s.textContent = text; td.appendChild(s); }
  else td.textContent = text == null ? "" : String(text);
  return td;
}

function fill(table, rows, render) {
  const tbody = $(table + " tbody");
  tbody.replaceChildren(...rows.map((row) => {
    const tr = document.createElement("tr");
    render(row).forEach((td) => tr.appendChild(td));
    return tr;
  }));
}

const gib = (n) => (n / 2 ** 30).toFixed(1) + " GiB";

function button(label, onclick) {
  const td = document.createElement("td");
  const b = document.createElement("button");
  b.textContent = label; b.onclick = onclick; td.appendChild(b);
  return td;
}

async function refresh() {
  try {
    const all = async (path) => (await api("GET", path + "?page=-1")).items;  // GPUStack-style pages
    const [models, instances, workers, backends, keys] = await Promise.all([
      all("/v2/models"), all("/v2/model-instances"), all("/v2/workers"),
      all("/v2/inference-backends"), all("/v2/api-keys")]);
    fill("#deployments", models, (m) => [cell(m.name), cell(m.backend + (m.backend_version ? ":" + m.backend_version : "")),
      cell(m.local_path || m.huggingface_repo_id || m.model_scope_model_id), cell(m.replicas), cell(m.ready_replicas + "/" + m.replicas),
      button("Delete", async () => { if (confirm("Delete " + m.name + "?")) { await api("DELETE", "/v2/models/" + m.id); refresh(); } })]);
    fill("#instances", instances, (i) => [cell(i.name), cell(i.model_name), cell(i.state, "state " + i.state),
      cell(i.worker_name), cell(i.port), cell(i.restart_count), cell(i.state_message),
      button("Logs", () => showLogs(i))]);
    fill("#workers", workers, (w) => [cell(w.name), cell(w.ip), cell(w.state, "state " + w.state),
      cell(w.status.cpu.total + " cores, " + Math.round(w.status.cpu.utilization_rate) + "%"),
      cell(gib(w.status.memory.used) + " / " + gib(w.status.memory.total)),
      cell(w.status.gpu_devices.map((g) => g.name + " " + gib(g.memory.total)).join(", ") || "none"),
      cell(Object.entries(w.labels).map(([k, v]) => k + "=" + v).join(" ")),
      cell(new Date(w.heartbeat_time + "Z").toLocaleTimeString())]);
    const versions = backends.flatMap((b) => Object.entries(b.version_configs).map(([v, spec]) => ({ b, v, spec })));
    fill("#backends", versions, ({ b, v, spec }) => [cell(b.backend_name + (b.is_built_in ? " (built in)" : "")), cell(v),
      cell(spec.custom_framework || "cpu"), cell(spec.entrypoint || b.default_entrypoint || spec.image_name),
      cell(spec.run_command || b.default_run_command)]);
    fill("#keys", keys, (k) => [cell(k.name), cell(k.access_key), cell(k.scope.join(", ")), cell(k.last_used_at || "never")]);
    syncSelect("#deploy-backend", backends.map((b) => b.backend_name));
    syncSelect("#pg-model", models.filter((m) => m.ready_replicas > 0).map((m) => m.name));
  } catch (e) { console.warn(e); }
}

function syncSelect(sel, names) {
  const el = $(sel);
  const current = el.value;
  if ([...el.options].map((o) => o.value).join() === names.join()) return;
  el.replaceChildren(...names.map((n) => new Option(n, n)));
  if (names.includes(current)) el.value = current;
}

async function showLogs(inst) {
  if (logsAbort) logsAbort.abort();
  logsAbort = new AbortController();
  $("#logs-title").textContent = "Logs: " + inst.name;
  const pre = $("#logs");
  pre.textContent = "";
  try {
    const r = await fetch(`/v2/model-instances/${inst.id}/logs?follow=true&tail=200`, { signal: logsAbort.signal });
    if (!r.ok) { pre.textContent = (await r.json()).error.message; return; }
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      pre.textContent += dec.decode(value, { stream: true });
      pre.scrollTop = pre.scrollHeight;
    }
  } catch (e) { if (e.name !== "AbortError") pre.textContent += "\n" + e.message; }
}

async function playground() {
  const out = $("#pg-output");
  out.textContent = "";
  const r = await fetch("/v1/chat/completions", {
    method: "POST", headers: { "content-type": "application/json" }, credentials: "same-origin",
    body: JSON.stringify({ model: $("#pg-model").value, stream: true,
      messages: [{ role: "user", content: $("#pg-prompt").value }] }),
  });
  if (!r.ok) { out.textContent = (await r.json()).error.message; return; }
  const reader = r.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    const lines = buf.split("\n"); buf = lines.pop();
    for (const line of lines) {
      if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
      const delta = JSON.parse(line.slice(6)).choices[0].delta;
      out.textContent += delta.content || "";
    }
  }
}

function showLogin() { $("#login").hidden = false; $("#app").hidden = true; }

async function start() {
  try { const me = await api("GET", "/auth/me"); $("#who").textContent = me.username; }
  catch (e) { return; }
  $("#login").hidden = true; $("#app").hidden = false;
  refresh();
  setInterval(refresh, 2000);
}

$("#login-form").onsubmit = async (ev) => {
  ev.preventDefault();
  const r = await fetch("/auth/login", { method: "POST", headers: { "content-type": "application/json" },
    body: JSON.stringify({ username: $("#username").value, password: $("#password").value }) });
  if (!r.ok) { $("#login-error").textContent = (await r.json()).error.message; return; }
  start();
};

$("#deploy-form").onsubmit = async (ev) => {
  ev.preventDefault();
  const f = new FormData(ev.target);
  try {
    await api("POST", "/v2/models", { name: f.get("name"), local_path: f.get("local_path"),
      backend: f.get("backend"), backend_parameters: f.get("backend_parameters"), replicas: Number(f.get("replicas")) });
    $("#deploy-error").textContent = ""; ev.target.reset(); refresh();
  } catch (e) { $("#deploy-error").textContent = e.message; }
};

$("#key-form").onsubmit = async (ev) => {
  ev.preventDefault();
  const k = await api("POST", "/v2/api-keys", { name: new FormData(ev.target).get("name"), scope: ["inference"] });
  const pre = $("#new-key"); pre.hidden = false;
  pre.textContent = "Copy this key now, it is not shown again:\n" + k.value;
  ev.target.reset(); refresh();
};

$("#pg-send").onclick = playground;
document.querySelectorAll("nav button").forEach((b) => b.onclick = () => {
  document.querySelectorAll("nav button").forEach((x) => x.classList.toggle("active", x === b));
  document.querySelectorAll(".tab").forEach((t) => t.hidden = t.id !== "tab-" + b.dataset.tab);
});
start();
