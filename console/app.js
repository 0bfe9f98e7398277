// kubetx console: plain DOM code, no framework. Every value from the API goes into the page as
// text (textContent), never as markup. The token lives in sessionStorage (this tab only) and is
// sent as `Authorization: Bearer`; without a valid one the page shows the login and no data.
"use strict";

const TOKEN_KEY = "kubetx.token";
const PAGE = 50;
const $ = (id) => document.getElementById(id);

const state = { view: "list", cursors: [""], gid: null, authNeeded: false };

class AuthError extends Error {}

async function api(method, path) {
  const headers = { Accept: "application/json" };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = "Bearer " + token;
  const response = await fetch("/api/admin/" + path, { method, headers });
  if (response.status === 401) throw new AuthError("a valid token is required");
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.message || "HTTP " + response.status);
  return body;
}

function say(text, isError) {
  const status = $("status");
  status.textContent = text;
  status.className = isError ? "error" : "";
}

function show(section) {
  for (const id of ["login", "list", "detail"]) $(id).hidden = id !== section;
  const signedIn = section !== "login";
  $("nav").hidden = !signedIn;
  $("logout").hidden = !signedIn || !state.authNeeded;
  if (!signedIn) $("summary").textContent = "";
}

function showLogin(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  state.authNeeded = true;
  show("login");
  $("login-error").textContent = message || "";
  say("");
  $("token").focus();
}

function when(text) {
  if (!text) return "";
  return text.replace("T", " ").replace("Z", " UTC");
}

function age(ms) {
  if (ms == null) return "none";
  const s = Math.round(ms / 1000);
  if (s < 120) return s + " s";
  if (s < 7200) return Math.round(s / 60) + " min";
  return Math.round(s / 3600) + " h";
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text == null ? "" : String(text);
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

async function refreshSummary() {
  const s = await api("GET", "summary");
  const u = s.unfinished;
  $("summary").textContent =
    `Unfinished: ${u.prepared} prepared, ${u.submitted} submitted, ${u.aborting} aborting. ` +
    (s.oldest_due_age_ms > 0 ? `Oldest due: ${age(s.oldest_due_age_ms)} overdue.` : "Nothing overdue.");
}

function listQuery() {
  const form = $("filters");
  const params = new URLSearchParams({ limit: String(PAGE) });
  for (const name of ["status", "mode", "gid"]) {
    const value = form.elements[name].value.trim();
    if (value) params.set(name, value);
  }
  for (const name of ["from", "to"]) {
    const value = form.elements[name].value;
    if (value) params.set(name, String(Date.parse(value + "Z")));
  }
  return params;
}

async function renderList() {
  const due = state.view === "due";
  $("list-title").textContent = due ? "Unfinished transactions, oldest due first" : "Transactions";
  $("filters").hidden = due;
  $("list-caption").textContent = due ? "Earliest next try first" : "Newest first";
  const params = due ? new URLSearchParams({ limit: String(PAGE) }) : listQuery();
  const cursor = state.cursors[state.cursors.length - 1];
  if (cursor) params.set(due ? "after" : "before", cursor);
  const page = await api("GET", (due ? "due?" : "transactions?") + params.toString());
  const body = $("list-table").tBodies[0];
  body.replaceChildren();
  for (const t of page.transactions) {
    const row = document.createElement("tr");
    const link = document.createElement("a");
    link.href = "#/tx/" + encodeURIComponent(t.gid);
    link.textContent = t.gid;
    const gidCell = cell(row, "");
    gidCell.appendChild(link);
    if (t.resource) {
      const r = document.createElement("div");
      r.className = "resource";
      r.textContent = `${t.resource.kind} ${t.resource.namespace}/${t.resource.name}`;
      gidCell.appendChild(r);
    }
    cell(row, t.trans_type);
    cell(row, t.status, "st-" + t.status);
    cell(row, when(t.create_time));
    const finished = t.status === "succeed" || t.status === "failed";
    cell(row, finished ? "" : when(t.next_cron_time) + (t.overdue_ms > 0 ? ` (due ${age(t.overdue_ms)} ago)` : ""));
    cell(row, t.rollback_reason || "", "error-text");
    body.appendChild(row);
  }
  state.next = page.next;
  $("next-page").disabled = !page.next;
  $("first-page").disabled = state.cursors.length <= 1;
  say(`${page.transactions.length} shown, page ${state.cursors.length}${page.next ? "" : " (last)"}.`);
  show("list");
}

// The phase `kubectl get` shows for a resource in this status (the operator's mapping).
function phaseOf(t) {
  const phases = { submitted: "Running", aborting: "Compensating", succeed: "Succeeded", failed: "Failed" };
  if (t.status === "prepared") return t.trans_type === "tcc" ? "Trying" : "Prepared";
  return phases[t.status] || "";
}

function resourceText(t) {
  const r = t.resource;
  if (!r) return "";
  return `${r.kind} ${r.namespace}/${r.name}, phase ${phaseOf(t)} ` +
    `(kubectl -n ${r.namespace} get ${r.kind.toLowerCase()} ${r.name})`;
}

function definitions(list, pairs) {
  list.replaceChildren();
  for (const [name, value] of pairs) {
    if (value === undefined || value === null || value === "") continue;
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = typeof value === "object" ? JSON.stringify(value) : String(value);
    if (name === "status") dd.className = "st-" + value;
    list.append(dt, dd);
  }
}

async function renderDetail(gid) {
  const detail = await api("GET", "transactions/" + encodeURIComponent(gid));
  const t = detail.transaction;
  state.gid = gid;
  $("detail-title").textContent = `Transaction ${t.gid}`;
  definitions($("global"), [
    ["gid", t.gid], ["mode", t.trans_type], ["status", t.status],
    ["created", when(t.create_time)], ["updated", when(t.update_time)],
    ["finished", when(t.finish_time)], ["rolled back", when(t.rollback_time)],
    ["next try", t.status === "succeed" || t.status === "failed" ? "" : when(t.next_cron_time)],
    ["retry interval (s)", t.next_cron_interval], ["held by", t.owner],
    ["rollback reason", t.rollback_reason], ["query prepared", t.query_prepared],
    ["Kubernetes resource", resourceText(t)],
  ]);
  let options = {};
  try { options = JSON.parse(t.options || "{}"); } catch (_) { options = {}; }
  definitions($("options"), Object.entries(options));
  const body = $("branches").tBodies[0];
  body.replaceChildren();
  for (const b of detail.branches) {
    const row = document.createElement("tr");
    cell(row, b.branch_id);
    cell(row, b.op);
    cell(row, b.status, "st-" + b.status);
    cell(row, b.attempts ?? "");
    cell(row, b.last_error || "", "error-text");
    cell(row, b.url, "error-text");
    cell(row, when(b.create_time));
    cell(row, when(b.finish_time || b.rollback_time));
    body.appendChild(row);
  }
  $("raw-json").textContent = JSON.stringify(detail, null, 2);
  $("act-retry-now").hidden = !detail.actions.retry_now;
  $("act-force-stop").hidden = !detail.actions.force_stop;
  $("act-retry-compensation").hidden = !detail.actions.retry_compensation;
  say("");
  show("detail");
}

const ACTION_TEXT = {
  "retry-now": "Make this transaction due now? Its next try runs at once instead of after its backoff.",
  "force-stop": "Force stop this transaction? It becomes failed at once and NO compensation runs.",
  "retry-compensation": "Run this saga's compensations again? It goes back to aborting until they succeed.",
};

function confirmAction(action) {
  const dialog = $("confirm");
  $("confirm-text").textContent = ACTION_TEXT[action];
  $("confirm-title").textContent = $("act-" + action).textContent + "?";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.showModal();
    $("confirm-cancel").focus();
  });
}

async function act(action) {
  const gid = state.gid;
  if (!(await confirmAction(action))) return;
  try {
    await api("POST", `transactions/${encodeURIComponent(gid)}/${action}`);
    await renderDetail(gid);
    await refreshSummary();
    say(`${$("act-" + action).textContent}: done for ${gid}.`);
  } catch (error) {
    handle(error);
  }
}

function handle(error) {
  if (error instanceof AuthError) showLogin(state.authNeeded ? "The token was refused." : "");
  else say(error.message, true);
}

async function route() {
  const hash = location.hash || "#/";
  for (const [id, target] of [["nav-list", "#/"], ["nav-due", "#/due"]]) {
    if (hash === target) $(id).setAttribute("aria-current", "page");
    else $(id).removeAttribute("aria-current");
  }
  try {
    await refreshSummary();
    if (hash.startsWith("#/tx/")) {
      await renderDetail(decodeURIComponent(hash.slice(5)));
    } else {
      const view = hash === "#/due" ? "due" : "list";
      if (view !== state.view) state.cursors = [""];
      state.view = view;
      await renderList();
    }
    $("main").focus();
  } catch (error) {
    handle(error);
  }
}

function wire() {
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    route();
  });
  $("logout").addEventListener("click", () => showLogin("Signed out."));
  $("filters").addEventListener("submit", (event) => {
    event.preventDefault();
    state.cursors = [""];
    if (location.hash !== "#/" && location.hash !== "") location.hash = "#/";
    else route();
  });
  $("filters").addEventListener("reset", () => setTimeout(() => { state.cursors = [""]; route(); }));
  $("next-page").addEventListener("click", () => { state.cursors.push(state.next); renderList().catch(handle); });
  $("first-page").addEventListener("click", () => { state.cursors = [""]; renderList().catch(handle); });
  $("refresh").addEventListener("click", () => Promise.all([renderDetail(state.gid), refreshSummary()]).catch(handle));
  for (const button of document.querySelectorAll("[data-action]")) {
    button.addEventListener("click", () => act(button.dataset.action));
  }
  window.addEventListener("hashchange", route);
}

async function start() {
  wire();
  // Whether this API wants a token at all: ask without one (an open API answers).
  if (!sessionStorage.getItem(TOKEN_KEY)) {
    try {
      await api("GET", "summary");
    } catch (error) {
      if (error instanceof AuthError) return showLogin("");
    }
  } else {
    state.authNeeded = true;
  }
  route();
}

start();
