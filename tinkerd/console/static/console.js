// tinkerd web console: plain JS, no build step, no external assets (docs/console.md).
// The API key lives in sessionStorage and goes out as X-API-Key on every call.
"use strict";

const KEY = "tinkerd.apiKey";
const $ = (sel) => document.querySelector(sel);
const state = { tab: "runs", run: null, chat: [] };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined) node.setAttribute(k, v);
  }
  for (const c of children.flat()) node.append(c instanceof Node ? c : String(c ?? ""));
  return node;
}

function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "";
}

async function api(path, options = {}) {
  const headers = { "X-API-Key": sessionStorage.getItem(KEY) || "", ...(options.headers || {}) };
  if (options.json !== undefined) {
    headers["Content-Type"] = "application/json";
    options = { ...options, body: JSON.stringify(options.json) };
  }
  const resp = await fetch(path, { ...options, headers });
  const text = await resp.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch { body = text; }
  if (!resp.ok) {
    let detail = body && body.detail !== undefined ? body.detail : body;
    if (body && body.error) detail = body.error.message || body.error;
    if (typeof detail !== "string") detail = JSON.stringify(detail);
    const err = new Error(`${resp.status}: ${detail}`);
    err.status = resp.status;
    throw err;
  }
  return body;
}

// -- sign in -------------------------------------------------------------------------------

async function signIn(key) {
  sessionStorage.setItem(KEY, key);
  try {
    const status = await api("/api/v1/console/status");
    $("#who").textContent = `user ${status.user}`;
  } catch (err) {
    sessionStorage.removeItem(KEY);
    $("#signin-error").textContent = `Sign-in failed: ${err.message}`;
    return;
  }
  $("#signin-error").textContent = "";
  $("#signin").hidden = true;
  $("#tabs").hidden = false;
  $("#signout").hidden = false;
  show(state.tab);
}

function signOut() {
  sessionStorage.removeItem(KEY);
  location.reload();
}

// -- tabs ----------------------------------------------------------------------------------

const loaders = {
  runs: loadRuns,
  checkpoints: loadCheckpoints,
  sessions: loadSessions,
  samplers: loadSamplers,
  status: loadStatus,
  playground: loadPlayground,
};

function show(tab) {
  state.tab = tab;
  for (const b of document.querySelectorAll("#tabs button")) {
    b.classList.toggle("active", b.dataset.tab === tab);
  }
  for (const s of document.querySelectorAll(".tab")) s.hidden = s.id !== `tab-${tab}`;
  loaders[tab]().catch(reportError);
}

function reportError(err) {
  const section = document.querySelector(`#tab-${state.tab}`);
  let box = section.querySelector(".load-error");
  if (!box) { box = el("p", { class: "error load-error" }); section.prepend(box); }
  box.textContent = err.message;
}

// -- SVG plotter ---------------------------------------------------------------------------

const SVG = "http://www.w3.org/2000/svg";

function svgEl(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function fmt(v) {
  const a = Math.abs(v);
  if (a !== 0 && (a >= 1e4 || a < 1e-3)) return v.toExponential(2);
  return Number(v.toPrecision(4)).toString();
}

// A line chart of points [[x, y], ...]: one path with one vertex per point (data-points).
function plot(title, points, xLabel = "step") {
  const W = 360, H = 200, L = 52, R = 10, T = 10, B = 30;
  const svg = svgEl("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img" });
  svg.append(svgEl("title", {}, title));
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { const d = Math.abs(y0) * 0.1 || 1; y0 -= d; y1 += d; }
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  svg.append(svgEl("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }));
  svg.append(svgEl("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }));
  for (const y of [y0, (y0 + y1) / 2, y1]) {
    svg.append(svgEl("text", { x: L - 4, y: sy(y) + 3, "text-anchor": "end" }, fmt(y)));
  }
  for (const x of [x0, x1]) {
    svg.append(svgEl("text", { x: sx(x), y: H - B + 12, "text-anchor": "middle" }, fmt(x)));
  }
  svg.append(svgEl("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle" }, xLabel));
  const d = points.map((p, i) => `${i ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`);
  svg.append(svgEl("path", { class: "curve", d: d.join(" "), "data-points": points.length }));
  for (const [x, y] of points) {
    const dot = svgEl("circle", { class: "dot", cx: sx(x), cy: sy(y), r: 2 });
    dot.append(svgEl("title", {}, `${xLabel} ${x}: ${fmt(y)}`));
    svg.append(dot);
  }
  return el("div", { class: "chart", "data-metric": title }, el("div", { class: "title" }, title), svg);
}

// Per metric, the mean over each step's results (a step may have several forward_backwards).
function curves(points) {
  const sums = new Map();
  for (const p of points) {
    for (const [name, value] of Object.entries(p.metrics)) {
      if (!Number.isFinite(value)) continue;
      if (!sums.has(name)) sums.set(name, new Map());
      const bySteps = sums.get(name);
      const [s, n] = bySteps.get(p.step) || [0, 0];
      bySteps.set(p.step, [s + value, n + 1]);
    }
  }
  const order = (a) => (a.startsWith("loss") ? 0 : a === "grad_norm" ? 1 : 2);
  return [...sums.entries()]
    .sort((a, b) => order(a[0]) - order(b[0]) || a[0].localeCompare(b[0]))
    .map(([name, bySteps]) => [name, [...bySteps.entries()].sort((a, b) => a[0] - b[0])
      .map(([step, [s, n]]) => [step, s / n])]);
}

// -- training runs -------------------------------------------------------------------------

async function loadRuns() {
  const data = await api("/api/v1/training_runs?limit=1000");
  const tbody = $("#runs-table tbody");
  tbody.replaceChildren();
  if (!data.training_runs.length) {
    tbody.append(el("tr", {}, el("td", { colspan: 4, class: "muted" }, "No training runs yet.")));
  }
  for (const run of data.training_runs) {
    const row = el("tr", { class: "clickable", "data-run": run.training_run_id,
      onclick: () => showRun(run.training_run_id) },
    el("td", { class: "mono" }, run.training_run_id), el("td", {}, run.base_model),
    el("td", {}, run.lora_rank), el("td", {}, when(run.last_request_time)));
    tbody.append(row);
  }
  if (state.run) showRun(state.run).catch(reportError);
}

async function showRun(runId) {
  state.run = runId;
  for (const tr of document.querySelectorAll("#runs-table tr")) {
    tr.classList.toggle("selected", tr.dataset.run === runId);
  }
  const detail = $("#run-detail");
  const [metrics, ckpts] = await Promise.all([
    api(`/api/v1/console/training_runs/${encodeURIComponent(runId)}/metrics`),
    api(`/api/v1/training_runs/${encodeURIComponent(runId)}/checkpoints`),
  ]);
  const charts = el("div", { class: "charts" });
  for (const [name, pts] of curves(metrics.points)) charts.append(plot(name, pts));
  detail.replaceChildren(
    el("h2", {}, "Run ", el("span", { class: "mono" }, runId)),
    el("p", { class: "muted" }, `${metrics.base_model} · ${metrics.steps} optimizer steps · `
      + `${metrics.points.length} results`),
    metrics.points.length ? charts : el("p", { class: "muted" }, "No results stored yet."),
    el("h3", {}, "Checkpoints"),
    checkpointTable(ckpts.checkpoints, runId),
  );
}

// -- checkpoints ---------------------------------------------------------------------------

function runOf(path) {
  return path.slice("tinker://".length).split("/")[0];
}

function checkpointTable(list, runId) {
  const table = el("table", { class: "checkpoints" },
    el("thead", {}, el("tr", {}, ["Checkpoint", "Type", "Size", "Created", "Expires",
      "Public", ""].map((h) => el("th", {}, h)))));
  const tbody = el("tbody");
  if (!list.length) tbody.append(el("tr", {}, el("td", { colspan: 7, class: "muted" }, "None.")));
  for (const c of list) {
    const run = runId || runOf(c.tinker_path);
    const base = `/api/v1/training_runs/${encodeURIComponent(run)}/checkpoints/${c.checkpoint_id}`;
    const refresh = () => (state.tab === "runs" ? showRun(state.run) : loadCheckpoints());
    const act = (label, fn) => el("button", { type: "button", onclick: () =>
      fn().then(refresh).catch((e) => alert(e.message)) }, label);
    const links = el("div", { class: "links" });
    tbody.append(el("tr", { "data-path": c.tinker_path },
      el("td", { class: "mono" }, c.tinker_path), el("td", {}, c.checkpoint_type),
      el("td", {}, c.size_bytes == null ? "" : `${(c.size_bytes / 1024).toFixed(0)} KiB`),
      el("td", {}, when(c.time)), el("td", {}, c.expires_at ? when(c.expires_at) : "never"),
      el("td", {}, c.public ? "yes" : "no"),
      el("td", { class: "actions" },
        el("button", { type: "button", onclick: () => download(base, links).catch((e) =>
          alert(e.message)) }, "Download"),
        act(c.public ? "Unpublish" : "Publish", () =>
          api(`${base}/publish`, { method: c.public ? "DELETE" : "POST" })),
        act("TTL", async () => {
          const v = prompt("Expire after how many seconds? (empty: never)", "");
          if (v === null) return;
          await api(`${base}/ttl`, { method: "PUT", json: { ttl_seconds: v.trim() ? Number(v) : null } });
        }),
        act("Delete", async () => {
          if (confirm(`Delete ${c.tinker_path}?`)) await api(base, { method: "DELETE" });
        }),
        links)));
  }
  table.append(tbody);
  return table;
}

async function download(base, box) {
  const data = await api(`${base}/external_weights_urls`);
  box.replaceChildren(...Object.entries(data.urls).map(([name, url]) =>
    el("div", {}, el("a", { href: url, download: name }, name))));
}

async function loadCheckpoints() {
  const data = await api("/api/v1/checkpoints?limit=1000");
  $("#checkpoints-all").replaceChildren(checkpointTable(data.checkpoints, null));
}

// -- sessions, samplers, live state --------------------------------------------------------

async function loadSessions() {
  const data = await api("/api/v1/sessions?limit=100");
  const tbody = $("#sessions-table tbody");
  const rows = await Promise.all(data.sessions.map(async (id) => {
    const s = await api(`/api/v1/sessions/${encodeURIComponent(id)}`);
    return el("tr", {}, el("td", { class: "mono" }, id), el("td", {}, s.display_name || ""),
      el("td", { class: "mono" }, s.training_run_ids.join("\n")),
      el("td", { class: "mono" }, s.sampler_ids.join("\n")));
  }));
  tbody.replaceChildren(...rows);
  if (!rows.length) tbody.append(el("tr", {}, el("td", { colspan: 4, class: "muted" }, "None.")));
}

async function loadSamplers() {
  const data = await api("/api/v1/console/samplers");
  const tbody = $("#samplers-table tbody");
  tbody.replaceChildren(...data.samplers.map((s) => el("tr", {},
    el("td", { class: "mono" }, s.sampling_session_id), el("td", {}, s.base_model),
    el("td", { class: "mono" }, s.model_path || (s.snapshot_of ? `snapshot of ${s.snapshot_of}` : "base")),
    el("td", {}, when(s.time)))));
  if (!data.samplers.length) tbody.append(el("tr", {}, el("td", { colspan: 4, class: "muted" }, "None.")));
}

async function loadStatus() {
  const [data, workers] = await Promise.all([
    api("/api/v1/console/status"), api("/api/v1/tinkerd/replicas"),
  ]);
  $("#queue-table tbody").replaceChildren(...data.models.map((m) =>
    el("tr", {}, el("td", {}, m.model), el("td", {}, m.queue_depth))));
  $("#replicas-table tbody").replaceChildren(...workers.replicas.map((r) => el("tr", {},
    el("td", {}, r.model), el("td", {}, r.replica),
    el("td", { class: r.state === "ready" ? "" : "error" }, r.state),
    el("td", { class: "mono" }, r.pid ?? "-"), el("td", {}, r.node ?? "-"), el("td", {}, r.devices),
    el("td", {}, r.runs), el("td", {}, r.queue_depth),
    el("td", {}, r.memory_bytes == null ? "-" : `${Math.round(r.memory_bytes / 2 ** 20)} MiB`))));
  const errors = $("#errors-table tbody");
  errors.replaceChildren(...data.recent_errors.map((e) => el("tr", {},
    el("td", {}, when(e.time)), el("td", {}, e.kind),
    el("td", { class: "mono" }, `${e.model_id || ""}${e.seq_id != null ? ` #${e.seq_id}` : ""}`),
    el("td", {}, e.category || ""), el("td", { class: "error" }, e.error || ""))));
  if (!data.recent_errors.length) errors.append(el("tr", {}, el("td", { colspan: 5, class: "muted" }, "No failed requests.")));
}

// -- playground ----------------------------------------------------------------------------

async function loadPlayground() {
  const select = $("#pg-model");
  const previous = select.value;
  const [models, ckpts] = await Promise.all([
    api("/oai/api/v1/models"), api("/api/v1/checkpoints?limit=1000"),
  ]);
  const options = models.data.map((m) => el("option", { value: m.id }, `${m.id} (base)`));
  for (const c of ckpts.checkpoints) {
    if (c.checkpoint_type === "sampler") options.push(el("option", { value: c.tinker_path }, c.tinker_path));
  }
  select.replaceChildren(...options);
  if (previous && [...select.options].some((o) => o.value === previous)) select.value = previous;
}

function renderChat() {
  $("#chat").replaceChildren(...state.chat.map((m) =>
    el("div", { class: `msg ${m.role}` }, m.content)));
  $("#chat").scrollTop = $("#chat").scrollHeight;
}

async function send(event) {
  event.preventDefault();
  const input = $("#pg-input");
  const text = input.value.trim();
  if (!text) return;
  state.chat.push({ role: "user", content: text });
  input.value = "";
  renderChat();
  $("#pg-error").textContent = "";
  $("#pg-send").disabled = true;
  try {
    const out = await api("/oai/api/v1/chat/completions", { method: "POST", json: {
      model: $("#pg-model").value,
      messages: state.chat,
      temperature: Number($("#pg-temperature").value),
      max_tokens: Number($("#pg-max-tokens").value),
      top_p: Number($("#pg-top-p").value),
    } });
    state.chat.push({ role: "assistant", content: out.choices[0].message.content || "" });
    renderChat();
  } catch (err) {
    state.chat.pop();
    input.value = text;
    renderChat();
    $("#pg-error").textContent = err.message;
  } finally {
    $("#pg-send").disabled = false;
  }
}

// -- wiring --------------------------------------------------------------------------------

$("#signin-form").addEventListener("submit", (e) => {
  e.preventDefault();
  signIn($("#api-key").value.trim());
});
$("#signout").addEventListener("click", signOut);
for (const b of document.querySelectorAll("#tabs button")) {
  b.addEventListener("click", () => show(b.dataset.tab));
}
for (const b of document.querySelectorAll("button.refresh")) {
  b.addEventListener("click", () => loaders[b.dataset.refresh]().catch(reportError));
}
$("#pg-form").addEventListener("submit", send);
$("#pg-clear").addEventListener("click", () => { state.chat = []; renderChat(); });
if (sessionStorage.getItem(KEY)) signIn(sessionStorage.getItem(KEY));
