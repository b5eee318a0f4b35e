// Model Gateway dashboard: login, then a poll of the public JSON API every 2 s while the tab is
// visible, rendered into the tables of index.html.
//
// Security rule of this file: text from the API is only ever put into the page as text nodes
// (textContent, or strings passed to append()), never parsed as markup, and never used as a
// URL, an event handler or a style. The CSP of /ui backs this up (no inline script at all).

import { api, ApiError, login, session } from "./api.js";

const POLL_MS = 2000;
const AUTOSWITCH_RECHECK_MS = 30000; // after a 404: the endpoint is not built/enabled; ask rarely
const JOBS_LIMIT = 20;
const CRASHES_LIMIT = 20;
const DECISIONS_LIMIT = 20;
const PAUSED = "paused while the tab is hidden";

const $ = (selector) => document.querySelector(selector);

let timer = null;
let polling = false; // a refresh is in flight
let again = false; // a refresh was asked for while one was in flight: run it right after
let active = false; // logged in and showing the dashboard
let adminDenied = false; // the token's role got 403 from /admin: stop asking until a new login
let autoswitchRetryAt = 0;
let pollProblems = [];
let actionProblem = null;
const busyModels = new Set();
const modelRows = new Map();
const queueRows = new Map();
const crashItems = new Map();

// -- small helpers ------------------------------------------------------------------------

/** createElement with text-only content; `props` names come from this file, never from data. */
function h(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "text") node.textContent = String(value);
    else if (key === "class") node.className = value;
    else if (key === "testid") node.dataset.testid = String(value);
    else if (key === "onclick") node.addEventListener("click", value);
    else node.setAttribute(key, String(value));
  }
  node.append(...children.filter((c) => c !== null && c !== undefined).map((c) => (c instanceof Node ? c : String(c))));
  return node;
}

function num(value, fallback = 0) {
  const n = Number(value);
  return Number.isFinite(n) ? n : fallback;
}

function dash(value) {
  return value === null || value === undefined || value === "" ? "—" : String(value);
}

/** A state name reduced to a safe class suffix (class names only select styles). */
function stateClass(state) {
  return `state state-${String(state).toLowerCase().replace(/[^a-z]/g, "")}`;
}

function fmtTime(iso) {
  if (!iso) return "—";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? String(iso) : date.toLocaleString();
}

function fmtDuration(seconds) {
  let s = Math.max(0, Math.floor(num(seconds)));
  const d = Math.floor(s / 86400);
  s -= d * 86400;
  const hr = Math.floor(s / 3600);
  s -= hr * 3600;
  const min = Math.floor(s / 60);
  s -= min * 60;
  if (d) return `${d} d ${hr} h`;
  if (hr) return `${hr} h ${min} min`;
  if (min) return `${min} min ${s} s`;
  return `${s} s`;
}

/** Keep `node` at position `index` of `parent` without touching it when it is already there. */
function place(parent, node, index) {
  if (parent.children[index] !== node) parent.insertBefore(node, parent.children[index] ?? null);
}

function dropMissing(map, keep) {
  for (const [key, entry] of map) {
    if (!keep.has(key)) {
      entry.root.remove();
      map.delete(key);
    }
  }
}

// -- views --------------------------------------------------------------------------------

function showLogin(message = "") {
  active = false;
  clearTimeout(timer);
  timer = null;
  $("#dashboard-view").hidden = true;
  $("#session").hidden = true;
  $("#banner").hidden = true;
  $("#login-view").hidden = false;
  const error = $("#login-error");
  error.textContent = message;
  error.hidden = !message;
  $("#username").focus();
}

/** Empty every table, so one user's data is never shown under another's login. */
function resetViews() {
  for (const map of [modelRows, queueRows, crashItems]) map.clear();
  $("#models tbody").replaceChildren();
  $("#queues").replaceChildren();
  $("#crashes").replaceChildren();
  $("#jobs tbody").replaceChildren();
  $("#autoswitch-decisions").replaceChildren();
  $("#autoswitch-panel").hidden = true;
}

function showDashboard() {
  const user = session.user || {};
  resetViews();
  $("#login-view").hidden = true;
  $("#dashboard-view").hidden = false;
  $("#session").hidden = false;
  $("#who").textContent = `${dash(user.username)} (${dash(user.role)})`;
  active = true;
  adminDenied = false;
  autoswitchRetryAt = 0;
  pollProblems = [];
  actionProblem = null;
  setForbidden(false);
  renderBanner();
  refreshNow();
}

/** A 401 anywhere: the token is gone, expired or its user was disabled. Back to the form. */
function sessionEnded(err) {
  session.clear();
  showLogin(`Your session has ended (${err.message}). Sign in again.`);
}

function setForbidden(denied) {
  $("#forbidden").hidden = !denied;
  for (const section of document.querySelectorAll(".admin-only")) {
    if (denied) section.hidden = true;
    else if (section.id !== "autoswitch-panel") section.hidden = false;
  }
}

function renderBanner() {
  const banner = $("#banner");
  const lines = [];
  if (actionProblem) lines.push(actionProblem);
  lines.push(...pollProblems);
  if (!lines.length) {
    banner.hidden = true;
    banner.replaceChildren();
    return;
  }
  const items = lines.map((line) => h("div", { text: line }));
  if (actionProblem) {
    items.push(
      h("button", {
        type: "button",
        class: "secondary",
        text: "Dismiss",
        onclick: () => {
          actionProblem = null;
          renderBanner();
        },
      }),
    );
  }
  banner.replaceChildren(...items);
  banner.hidden = false;
}

function setRefreshState(text) {
  $("#refresh-state").textContent = text;
}

// -- polling ------------------------------------------------------------------------------

function schedule() {
  clearTimeout(timer);
  timer = null;
  if (active && !document.hidden) timer = setTimeout(tick, POLL_MS);
}

async function tick() {
  if (polling || !active) return;
  polling = true;
  try {
    await refresh();
  } finally {
    polling = false;
    if (again && active) {
      again = false;
      clearTimeout(timer);
      timer = setTimeout(tick, 0);
    } else {
      schedule();
    }
  }
}

function refreshNow() {
  if (polling) {
    again = true;
    return;
  }
  clearTimeout(timer);
  tick();
}

document.addEventListener("visibilitychange", () => {
  if (!active) return;
  if (document.hidden) {
    clearTimeout(timer);
    timer = null;
    setRefreshState(PAUSED);
  } else {
    refreshNow();
  }
});

async function refresh() {
  const problems = [];
  const guarded = async (what, load) => {
    try {
      await load();
    } catch (err) {
      problems.push({ what, err: err instanceof ApiError ? err : new ApiError(0, "client_error", String(err)) });
    }
  };
  const loads = [guarded("jobs", loadJobs)];
  if (!adminDenied) {
    loads.push(guarded("models", loadModels), guarded("crashes", loadCrashes), guarded("auto-switch", loadAutoswitch));
  }
  await Promise.all(loads);
  if (!active) return;

  const unauthorized = problems.find((p) => p.err.status === 401);
  if (unauthorized) {
    sessionEnded(unauthorized.err);
    return;
  }
  if (problems.some((p) => p.err.status === 403)) adminDenied = true;
  setForbidden(adminDenied);
  pollProblems = problems.filter((p) => p.err.status !== 403).map((p) => `${p.what}: ${p.err.message}`);
  renderBanner();
  setRefreshState(document.hidden ? PAUSED : `updated ${new Date().toLocaleTimeString()}`);
}

// -- models and queues --------------------------------------------------------------------

async function loadModels() {
  const models = (await api("/admin/models")) || {};
  const names = Object.keys(models).sort();
  const queues = await Promise.all(
    names.map((name) =>
      api(`/admin/queue/${encodeURIComponent(name)}`).catch((err) => {
        if (err.status === 401 || err.status === 403) throw err;
        return { unavailable: err.message };
      }),
    ),
  );
  renderModels(names, models);
  renderQueues(names, models, queues);
}

function modelRow(name) {
  const enc = encodeURIComponent(name);
  const row = {
    state: h("span", { testid: `state-${name}` }),
    reason: h("span", { class: "sub", testid: `reason-${name}` }),
    progress: h("progress", { hidden: "" }),
    loading: h("span", { testid: `loading-${name}` }),
    port: h("td"),
    pid: h("td"),
    gpus: h("td"),
    uptime: h("td", { testid: `uptime-${name}` }),
    jobs: h("td"),
    kind: h("span", { class: "sub" }),
    start: h("button", { type: "button", testid: `start-${name}`, text: "Start" }),
    stop: h("button", { type: "button", class: "secondary", testid: `stop-${name}`, text: "Stop" }),
  };
  row.start.addEventListener("click", () => act(name, "start", `/admin/models/${enc}/start`));
  row.stop.addEventListener("click", () => act(name, "stop", `/admin/models/${enc}/stop`));
  row.root = h(
    "tr",
    { testid: `model-${name}` },
    h("td", {}, h("strong", { text: name }), row.kind),
    h("td", { class: "wrap" }, row.state, row.reason),
    h("td", {}, row.progress, " ", row.loading),
    row.port,
    row.pid,
    row.gpus,
    row.uptime,
    row.jobs,
    h("td", {}, h("div", { class: "actions" }, row.start, row.stop)),
  );
  return row;
}

function renderModels(names, models) {
  const tbody = $("#models tbody");
  dropMissing(modelRows, new Set(names));
  names.forEach((name, index) => {
    let row = modelRows.get(name);
    if (!row) {
      row = modelRow(name);
      modelRows.set(name, row);
    }
    updateModelRow(row, name, models[name] || {});
    place(tbody, row.root, index);
  });
}

function updateModelRow(row, name, m) {
  row.last = m;
  const state = String(m.state ?? m.status ?? "unknown");
  row.state.textContent = state;
  row.state.className = stateClass(state);
  const reason = m.reason || (m.last_error ? `last error: ${m.last_error}` : "");
  row.reason.textContent = reason;
  row.reason.hidden = !reason;
  const aliases = Array.isArray(m.aliases) && m.aliases.length ? ` · aka ${m.aliases.join(", ")}` : "";
  row.kind.textContent = `${dash(m.kind)}${m.on_demand ? " · on demand" : ""}${aliases}`;

  if (state === "starting") {
    // Progress against the previous load time when there is one (an estimate), else indeterminate.
    const seconds = num(m.loading_seconds);
    const previous = num(m.load_seconds, 0);
    row.progress.hidden = false;
    if (previous > 0) {
      row.progress.max = previous;
      row.progress.value = Math.min(seconds, previous);
      row.loading.textContent = `loading ${seconds.toFixed(1)} s (last load ${previous.toFixed(1)} s)`;
    } else {
      row.progress.removeAttribute("value");
      row.loading.textContent = `loading ${seconds.toFixed(1)} s`;
    }
  } else {
    row.progress.hidden = true;
    row.loading.textContent = m.load_seconds ? `loaded in ${num(m.load_seconds).toFixed(1)} s` : "—";
  }
  row.port.textContent = m.pid ? dash(m.port) : "—"; // the API keeps the last port after a stop
  row.pid.textContent = dash(m.pid);
  row.gpus.textContent = Array.isArray(m.gpus) && m.gpus.length ? m.gpus.join(", ") : "—";
  row.uptime.textContent = state === "ready" ? fmtDuration(m.uptime_seconds) : "—";
  row.jobs.textContent = `${num(m.processing)} running · ${num(m.waiting)} waiting`;
  const busy = busyModels.has(name);
  row.start.disabled = busy || ["ready", "starting", "stopping"].includes(state);
  row.stop.disabled = busy || ["stopped", "stopping"].includes(state);
}

/** Start or stop; a stop of a busy model (409 model_busy) offers a graceful stop instead. */
async function act(name, action, path) {
  busyModels.add(name);
  const row = modelRows.get(name);
  if (row) row.start.disabled = row.stop.disabled = true;
  try {
    try {
      await api(path, { method: "POST" });
    } catch (err) {
      const graceful =
        action === "stop" &&
        err.status === 409 &&
        err.code === "model_busy" &&
        window.confirm(`${name} has running or waiting jobs.\n\nOK: stop gracefully (they finish first, new requests are refused).\nCancel: leave it running.`);
      if (!graceful) throw err;
      await api(`${path}?graceful=true`, { method: "POST" });
    }
    actionProblem = null;
  } catch (err) {
    if (err.status === 401) {
      sessionEnded(err);
      return;
    }
    actionProblem = `${action} ${name}: ${err.message}`;
  } finally {
    busyModels.delete(name);
    if (row?.last) updateModelRow(row, name, row.last); // buttons back at once, not at the next poll
  }
  renderBanner();
  refreshNow();
}

function queueRow(name) {
  const row = {
    processing: h("div", { class: "processing", testid: `queue-processing-${name}` }),
    waiting: h("div", { class: "waiting", testid: `queue-waiting-${name}` }),
    counts: h("div", { class: "counts", testid: `queue-counts-${name}` }),
  };
  row.bar = h("div", { class: "bar", role: "img" }, row.processing, row.waiting);
  row.root = h("div", { class: "queue", testid: `queue-${name}` }, h("div", { class: "name", text: name }), row.bar, row.counts);
  return row;
}

function renderQueues(names, models, queues) {
  const container = $("#queues");
  dropMissing(queueRows, new Set(names));
  names.forEach((name, index) => {
    let row = queueRows.get(name);
    if (!row) {
      row = queueRow(name);
      queueRows.set(name, row);
    }
    const fromQueue = queues[index] && !queues[index].unavailable ? queues[index] : null;
    const q = fromQueue || models[name] || {}; // /admin/models carries the same four numbers
    const processing = num(q.processing);
    const waiting = num(q.waiting);
    const maxConcurrent = num(q.max_concurrent);
    const maxWaiting = num(q.max_waiting);
    const capacity = Math.max(maxConcurrent + maxWaiting, processing + waiting, 1);
    // Widths through the CSSOM: allowed by the CSP, unlike style="" attributes.
    row.processing.style.width = `${(100 * processing) / capacity}%`;
    row.waiting.style.width = `${(100 * waiting) / capacity}%`;
    row.processing.dataset.count = String(processing);
    row.waiting.dataset.count = String(waiting);
    const summary = `${processing} processing · ${waiting} waiting · capacity ${capacity} (${maxConcurrent} concurrent + ${maxWaiting} waiting)`;
    row.bar.setAttribute("aria-label", summary);
    let text = summary;
    if (fromQueue) {
      text += ` · ${num(q.total_processed)} done, ${num(q.total_failed)} failed, ${num(q.total_timeout)} timed out`;
      // who holds the queue (fair shares): each client's running + waiting jobs, largest first
      const holders = Array.isArray(q.clients) ? q.clients : [];
      if (holders.length) {
        text += ` · held by ${holders.map((c) => `${c.client_id} ${num(c.processing)}+${num(c.waiting)}`).join(", ")}`;
      }
    } else if (queues[index]?.unavailable) {
      text += ` · queue details unavailable: ${queues[index].unavailable}`;
    }
    row.counts.textContent = text;
    place(container, row.root, index);
  });
}

// -- jobs ---------------------------------------------------------------------------------

async function loadJobs() {
  const body = await api(`/api/jobs?limit=${JOBS_LIMIT}`);
  const jobs = Array.isArray(body?.data) ? body.data : Array.isArray(body) ? body : [];
  const rows = jobs.map((job) => {
    const state = String(job?.state ?? job?.status ?? "unknown");
    const timings = job?.timings || {};
    const error = job?.error?.message ?? job?.last_error?.message ?? "";
    return h(
      "tr",
      { testid: "job" },
      h("td", { text: fmtTime(job?.created_at) }),
      h("td", { text: dash(job?.id) }),
      h("td", { text: dash(job?.model) }),
      h("td", {}, h("span", { class: stateClass(state), text: state })),
      h("td", { text: dash(job?.priority) }),
      h("td", { text: dash(job?.client_id) }),
      h("td", { text: dash(job?.attempts) }),
      h("td", { text: dash(timings.queue_ms) }),
      h("td", { text: dash(timings.engine_ms) }),
      h("td", { class: "wrap", text: error }),
    );
  });
  $("#jobs tbody").replaceChildren(...rows);
  $("#jobs-empty").hidden = rows.length > 0;
}

// -- crashes ------------------------------------------------------------------------------

async function loadCrashes() {
  const body = await api(`/admin/crashes?limit=${CRASHES_LIMIT}`);
  const crashes = Array.isArray(body) ? body : [];
  const container = $("#crashes");
  const keys = crashes.map((c, i) => String(c?.id ?? `${c?.timestamp}-${c?.model}-${i}`));
  dropMissing(crashItems, new Set(keys));
  crashes.forEach((crash, index) => {
    const key = keys[index];
    let item = crashItems.get(key);
    if (!item) {
      // Crash records never change, so each is built once (its <details> stays open across polls).
      const how = crash?.signal != null ? `signal ${crash.signal}` : crash?.exit_code != null ? `exit code ${crash.exit_code}` : "";
      const jobs = Array.isArray(crash?.jobs_affected) && crash.jobs_affected.length ? `jobs: ${crash.jobs_affected.join(", ")}` : "";
      const summary = [fmtTime(crash?.timestamp), dash(crash?.model), dash(crash?.error), how, dash(crash?.restart), jobs]
        .filter((part) => part && part !== "—")
        .join(" · ");
      item = {
        root: h(
          "details",
          { class: "crash", testid: "crash" },
          h("summary", { text: summary }),
          h("pre", { text: crash?.stack_trace ? String(crash.stack_trace) : "(no log lines)" }),
        ),
      };
      crashItems.set(key, item);
    }
    place(container, item.root, index);
  });
  $("#crashes-empty").hidden = crashes.length > 0;
}

// -- auto-switch --------------------------------------------------------------------------

function describeAction(action) {
  if (action === null || action === undefined) return "";
  if (typeof action !== "object") return String(action);
  const what = [action.kind ?? action.action ?? action.type, action.model].filter(Boolean).join(" ");
  const reason = action.reason ?? action.why;
  if (what || reason) return `${what}${what && reason ? ": " : ""}${reason ?? ""}`;
  return JSON.stringify(action);
}

/** How an applied action went, when the record says (`ok`, `error`). */
function outcome(applied) {
  if (!applied || typeof applied !== "object" || applied.ok === undefined) return "";
  return applied.ok ? " (done)" : ` (failed${applied.error ? `: ${applied.error}` : ""})`;
}

function asList(value) {
  if (Array.isArray(value)) return value;
  return value === null || value === undefined || value === "" ? [] : [value];
}

async function loadAutoswitch() {
  const panel = $("#autoswitch-panel");
  if (Date.now() < autoswitchRetryAt) return;
  let body;
  try {
    body = await api("/admin/autoswitch");
  } catch (err) {
    if (err.status === 404) {
      panel.hidden = true; // not available on this gateway (yet)
      autoswitchRetryAt = Date.now() + AUTOSWITCH_RECHECK_MS;
      return;
    }
    throw err;
  }
  body = body && typeof body === "object" ? body : {};
  panel.hidden = false;
  const parts = [body.enabled === undefined ? "state unknown" : body.enabled ? "enabled" : "disabled"];
  if (body.mode) parts.push(`mode ${body.mode}`);
  if (body.last_run) parts.push(`last run ${fmtTime(body.last_run)}`);
  if (body.next_run) parts.push(`next run ${fmtTime(body.next_run)}`);
  $("#autoswitch-status").textContent = parts.join(" · ");
  const toggle = $("#autoswitch-toggle");
  toggle.hidden = typeof body.enabled !== "boolean";
  toggle.dataset.enabled = String(body.enabled === true);
  toggle.textContent = body.enabled === true ? "Disable" : "Enable";

  const decisions = asList(body.decisions).slice(0, DECISIONS_LIMIT);
  const items = decisions.map((decision) => {
    const d = decision && typeof decision === "object" ? decision : { summary: decision };
    const details = [
      ...asList(d.actions).map((a) => `action: ${describeAction(a)}`),
      ...asList(d.applied).map((a) => `applied: ${describeAction(a)}${outcome(a)}`),
      ...asList(d.deferred).map((a) => `deferred: ${describeAction(a)}`),
      ...asList(d.reasons).map((r) => `reason: ${describeAction(r)}`),
      ...asList(d.reason).map((r) => `reason: ${describeAction(r)}`),
      ...asList(d.notes).map((n) => `note: ${describeAction(n)}`),
    ];
    const head = [fmtTime(d.at), d.mode, d.summary].filter(Boolean).map(String).join(" · ");
    return h(
      "li",
      { testid: "decision" },
      h("span", { text: head || "decision" }),
      details.length ? h("ul", {}, ...details.map((text) => h("li", { text }))) : null,
    );
  });
  if (!items.length) items.push(h("li", { class: "muted", text: "No decisions yet." }));
  $("#autoswitch-decisions").replaceChildren(...items);
}

// -- start --------------------------------------------------------------------------------

$("#login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const username = $("#username").value.trim();
  const password = $("#password").value;
  if (!username || !password) {
    showLogin("Enter a username and a password.");
    return;
  }
  const submit = $("#login-submit");
  submit.disabled = true;
  try {
    const answer = await login(username, password);
    if (!answer || typeof answer.access_token !== "string") throw new ApiError(0, "bad_answer", "the gateway sent no token");
    session.save(answer.access_token, {
      username,
      role: answer.role ?? "unknown",
      expiresAt: Date.now() + num(answer.expires_in) * 1000,
    });
    $("#password").value = "";
    showDashboard();
  } catch (err) {
    showLogin(`Sign-in failed: ${err.message}`);
    $("#password").value = "";
    $("#password").focus();
  } finally {
    submit.disabled = false;
  }
});

$("#autoswitch-toggle").addEventListener("click", async (event) => {
  const toggle = event.currentTarget;
  const enabled = toggle.dataset.enabled !== "true";
  toggle.disabled = true;
  try {
    await api("/admin/autoswitch", { method: "POST", json: { enabled } });
    actionProblem = null;
  } catch (err) {
    if (err.status === 401) {
      sessionEnded(err);
      return;
    }
    actionProblem = `${enabled ? "enable" : "disable"} auto-switch: ${err.message}`;
  } finally {
    toggle.disabled = false;
  }
  renderBanner();
  refreshNow();
});

$("#logout").addEventListener("click", () => {
  session.clear();
  resetViews();
  showLogin();
});

if (session.token) showDashboard();
else showLogin();
