// The audit trail viewer: reads /fhir/AuditEvent and /api/queue on this admin listener.
// Filters live in the page URL, so a view can be shared and bookmarked; paging follows the
// server's keyset links. The admin token, when one is needed, stays in sessionStorage.
"use strict";

const PAGE_SIZE = 20;
const LIVE_POLL_MS = 2000;
const HEALTH_POLL_MS = 5000;
const FILTERS = ["patient", "agent", "from", "to", "action", "outcome", "subtype",
  "resource-type", "request-id"];
const $ = (id) => document.getElementById(id);
const PROXY_TAGS = "urn:fhir-audit-proxy:tag";

let liveUrl = null;      // the top page's "previous" link: where newer events appear
let pageLinks = {};
let shown = new Map();   // id -> AuditEvent on screen

function token() { return sessionStorage.getItem("adminToken"); }

async function api(url, options = {}) {
  const headers = Object.assign({ Accept: "application/fhir+json" }, options.headers || {});
  if (token()) headers.Authorization = "Bearer " + token();
  const response = await fetch(url, Object.assign({}, options, { headers }));
  if (response.status === 401) {
    $("login").hidden = false;
    $("token").focus();
    throw new Error("the admin API needs a token");
  }
  const body = await response.json();
  if (!response.ok) {
    const issue = body.issue && body.issue[0];
    throw new Error((issue && issue.diagnostics) || ("HTTP " + response.status));
  }
  return body;
}

function pageParams() { return new URLSearchParams(location.search); }

function searchUrl(params) {
  const q = new URLSearchParams();
  const v = (name) => params.get(name);
  if (v("patient")) q.set("patient", v("patient"));
  if (v("agent")) q.set("agent", v("agent"));
  if (v("from")) q.append("date", "ge" + new Date(v("from")).toISOString());
  if (v("to")) q.append("date", "lt" + new Date(v("to")).toISOString());
  for (const name of ["action", "outcome", "subtype", "resource-type", "request-id"]) {
    if (v(name)) q.set(name, v(name));
  }
  if (v("cursor")) q.set("_cursor", v("cursor"));
  q.set("_count", String(PAGE_SIZE));
  return "/fhir/AuditEvent?" + q.toString();
}

// --- reading an AuditEvent (R4 BALP, or R5) ----------------------------------------------

function codes(value) {
  if (!value) return [];
  if (value.code) return [value.code];
  return (value.coding || []).map((c) => c.code);
}
function whoOf(agent) {
  const who = agent.who || {};
  return (who.identifier && who.identifier.value) || who.reference || who.display || agent.altId || "";
}
function describe(event) {
  const agents = event.agent || [];
  const user = agents.find((a) => a.requestor);
  const client = agents.find((a) => !a.requestor && codes(a.type).includes("110150") && a.who && a.who.identifier);
  const peer = agents.find((a) => (a.network && a.network.type === "2") || a.networkString);
  const patients = (event.entity || [])
    .filter((e) => codes(e.role).includes("1") && e.what && e.what.reference)
    .map((e) => e.what.reference);
  if (event.patient && event.patient.reference && !patients.includes(event.patient.reference)) {
    patients.push(event.patient.reference);
  }
  const requestId = (event.entity || []).find((e) => codes(e.type).includes("XrequestId"));
  const subtypes = (event.subtype || (event.code && event.code.coding) || []).map((c) => c.code);
  const profile = ((event.meta && event.meta.profile) || [])[0] || "";
  const outcome = typeof event.outcome === "object" ? codes(event.outcome.code)[0] : event.outcome;
  const meta = event.meta || {};
  // Submitted through the admin API: it sits in the trail at the time it was received
  // (meta.lastUpdated); its recorded is what the submitter claimed.
  const ingested = (meta.tag || []).some((t) => t.system === PROXY_TAGS && t.code === "ingested");
  return {
    time: (ingested ? meta.lastUpdated : event.recorded) || "",
    claimed: ingested ? (event.recorded || "") : "",
    ingested,
    action: event.action || "",
    interaction: (ingested ? "ingested · " : "") + subtypes.join(", ")
      + (profile ? " · " + profile.split("IHE.BasicAudit.")[1] : ""),
    user: user ? whoOf(user) : "",
    client: client ? client.who.identifier.value : "",
    patients,
    outcome: outcome || "",
    address: peer ? ((peer.network && peer.network.address) || peer.networkString) : "",
    requestId: requestId ? requestId.what.identifier.value : "",
  };
}

// --- the table ------------------------------------------------------------------------------

function row(event, isNew) {
  const d = describe(event);
  const tr = document.createElement("tr");
  tr.dataset.id = event.id;
  if (isNew) tr.classList.add("new");
  if (d.ingested) tr.classList.add("ingested");
  const cells = [d.time.replace("T", " ").slice(0, 23), d.action, d.interaction, d.user,
    d.client, d.patients.join(" "), d.outcome, d.address, d.requestId];
  cells.forEach((text, i) => {
    const td = document.createElement("td");
    td.textContent = text;
    td.title = text;
    if (i === 6 && text && text !== "0") td.className = "fail";
    tr.appendChild(td);
  });
  if (d.ingested) {
    tr.cells[0].title = "received " + d.time + "; recorded " + d.claimed + " as its submitter claims";
  }
  tr.addEventListener("click", () => showDetail(event.id));
  return tr;
}

function links(bundle) {
  const out = {};
  for (const link of bundle.link || []) out[link.relation] = link.url;
  return out;
}

// A live poll needs the new events, not a count of every match (one index walk less).
function pollUrl(url) {
  const u = new URL(url);
  u.searchParams.set("_total", "none");
  return u.pathname + u.search;
}

async function load() {
  $("status").textContent = "";
  const params = pageParams();
  FILTERS.forEach((name) => { $("filters").elements[name].value = params.get(name) || ""; });
  let bundle;
  try {
    bundle = await api(searchUrl(params));
  } catch (err) { $("status").textContent = err.message; return; }
  $("login").hidden = true;
  const body = $("events").tBodies[0];
  body.replaceChildren();
  shown = new Map();
  for (const entry of bundle.entry || []) {
    shown.set(entry.resource.id, entry.resource);
    body.appendChild(row(entry.resource, false));
  }
  pageLinks = links(bundle);
  liveUrl = params.get("cursor") ? null : (pageLinks.previous ? pollUrl(pageLinks.previous) : null);
  $("newer").disabled = !params.get("cursor") || !pageLinks.previous;
  $("older").disabled = !pageLinks.next;
  $("total").textContent = bundle.total !== undefined ? bundle.total + " events" : "";
  if (!bundle.entry || !bundle.entry.length) $("status").textContent = "no events match";
}

async function poll() {
  if (!$("live").checked || !liveUrl) return;
  let bundle;
  try { bundle = await api(liveUrl); } catch (err) { $("status").textContent = err.message; return; }
  const entries = bundle.entry || [];
  if (!entries.length) return;
  const body = $("events").tBodies[0];
  for (const entry of entries.slice().reverse()) {
    if (shown.has(entry.resource.id)) continue;
    shown.set(entry.resource.id, entry.resource);
    body.insertBefore(row(entry.resource, true), body.firstChild);
  }
  const next = links(bundle).previous;
  if (next) liveUrl = pollUrl(next);
  while (body.rows.length > PAGE_SIZE * 5) body.deleteRow(-1);
}

// --- detail ---------------------------------------------------------------------------------

function showDetail(id) {
  const event = shown.get(id);
  if (!event) return;
  for (const tr of $("events").tBodies[0].rows) tr.classList.toggle("selected", tr.dataset.id === id);
  const d = describe(event);
  $("detail").hidden = false;
  $("detail-title").textContent = "AuditEvent/" + id;
  $("detail-json").textContent = JSON.stringify(event, null, 2);
  const box = $("detail-links");
  box.replaceChildren();
  const add = (label, name, value) => {
    const a = document.createElement("a");
    const q = new URLSearchParams();
    q.set(name, value);
    a.href = "?" + q.toString();
    a.textContent = label;
    box.appendChild(a);
  };
  d.patients.forEach((p) => add("other events of " + p, "patient", p));
  if (d.user) add("other events of user " + d.user, "agent", d.user);
}

async function copyJson() {
  const text = $("detail-json").textContent;
  try {
    await navigator.clipboard.writeText(text);
    $("copy").textContent = "copied";
  } catch (err) {
    const range = document.createRange();
    range.selectNodeContents($("detail-json"));
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    $("copy").textContent = "selected: press Ctrl+C";
  }
  setTimeout(() => { $("copy").textContent = "copy JSON"; }, 2000);
}

// --- queue health ---------------------------------------------------------------------------

function age(seconds) {
  if (seconds === null || seconds === undefined) return "none";
  if (seconds < 90) return Math.round(seconds) + " s";
  if (seconds < 5400) return Math.round(seconds / 60) + " min";
  return Math.round(seconds / 3600) + " h";
}

async function health() {
  try {
    const q = await api("/api/queue");
    $("q-pending").textContent = q.pending;
    $("q-age").textContent = age(q.oldestPendingAgeS);
    $("q-age").classList.toggle("warn", (q.oldestPendingAgeS || 0) > 60);
    $("q-dead").textContent = q.dead;
    $("q-dead").classList.toggle("warn", q.dead > 0);
    $("q-retry").hidden = q.dead === 0;
  } catch (err) { /* the table reports errors; the strip just keeps its last values */ }
}

async function retryDead() {
  try {
    const r = await api("/dlq/retry", { method: "POST", headers: { "Content-Type": "application/json" }, body: "{}" });
    $("q-note").textContent = "requeued " + r.requeued;
  } catch (err) { $("q-note").textContent = err.message; }
  health();
}

// --- navigation -----------------------------------------------------------------------------

function navigate(params) {
  history.pushState(null, "", "?" + params.toString());
  load();
}

$("filters").addEventListener("submit", (e) => {
  e.preventDefault();
  const params = new URLSearchParams();
  for (const name of FILTERS) {
    const value = $("filters").elements[name].value.trim();
    if (value) params.set(name, value);
  }
  navigate(params);
});
$("clear").addEventListener("click", () => navigate(new URLSearchParams()));
$("older").addEventListener("click", () => {
  const params = pageParams();
  params.set("cursor", new URL(pageLinks.next).searchParams.get("_cursor"));
  navigate(params);
});
$("newer").addEventListener("click", () => {
  const params = pageParams();
  params.set("cursor", new URL(pageLinks.previous).searchParams.get("_cursor"));
  navigate(params);
});
$("login-form").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem("adminToken", $("token").value);
  $("token").value = "";
  load();
  health();
});
$("copy").addEventListener("click", copyJson);
$("close").addEventListener("click", () => { $("detail").hidden = true; });
$("q-retry").addEventListener("click", retryDead);
$("live").addEventListener("change", () => {
  const params = pageParams();
  if ($("live").checked && params.get("cursor")) { params.delete("cursor"); navigate(params); }
});
window.addEventListener("popstate", load);

load();
health();
setInterval(poll, LIVE_POLL_MS);
setInterval(health, HEALTH_POLL_MS);
