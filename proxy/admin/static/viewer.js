// The audit trail viewer: events (/fhir/AuditEvent, with their signals, and the activity
// chart from /api/activity), the patient access and user activity reports (/api/reports),
// and the queue strip (/api/queue). Everything the page shows is in its URL, so a view can
// be shared and bookmarked; paging follows the server's keyset links.
"use strict";

const LIVE_POLL_MS = 2000;
const HEALTH_POLL_MS = 5000;
const FILTERS = ["patient", "agent", "action", "outcome", "subtype", "resource-type", "request-id", "signal"];
const DAY_S = 86400;

let pageLinks = {};
let shown = new Map();   // id -> { event, signals } on screen
let newest = null;       // the newest recorded time shown: live mode searches from it

function view() {
  const v = pageParams().get("view");
  return v === "patient" || v === "user" ? v : "events";
}

function navigate(params) {
  history.pushState(null, "", "?" + params.toString());
  route();
}

function showError(err) {
  if (err instanceof ApiError && err.status === 401) {
    $("login").hidden = false;
    $("login-why").textContent = err.message;
    $("token").focus();
    $("status").textContent = "";
  } else {
    $("status").textContent = err.message;
  }
}

// --- the events -----------------------------------------------------------------------------

function pageSize() {
  const n = Number(pageParams().get("count"));
  return [20, 50, 100, 200].includes(n) ? n : 20;
}

// The search the page URL describes, as /fhir/AuditEvent parameters (no paging).
function searchParams(params, { signals = true } = {}) {
  const q = new URLSearchParams();
  for (const name of FILTERS) {
    if (name === "signal" && !signals) continue;
    if (params.get(name)) q.set(name, params.get(name));
  }
  if (params.get("from")) q.append("date", "ge" + params.get("from"));
  if (params.get("to")) q.append("date", "lt" + params.get("to"));
  if (params.get("admin") !== "1") q.set("_tag:not", ADMIN_TAG);
  return q;
}

function searchUrl(params) {
  const q = searchParams(params);
  q.set("with-signals", "true");
  if (params.get("cursor")) q.set("_cursor", params.get("cursor"));
  q.set("_count", String(pageSize()));
  return "/fhir/AuditEvent?" + q.toString();
}

function signalsOf(entry) {
  return ((entry.search && entry.search.extension) || [])
    .filter((x) => x.url === SIGNAL_EXT).map((x) => x.valueCode);
}

function row(event, signals, isNew) {
  const d = describe(event);
  const tr = document.createElement("tr");
  tr.dataset.id = event.id;
  if (isNew) tr.classList.add("new");
  if (d.ingested) tr.classList.add("ingested");
  const first = document.createElement("td");
  const open = document.createElement("button");
  open.type = "button";
  open.className = "open";
  open.textContent = showTime(d.time);
  open.setAttribute("aria-label", `open the event of ${showTime(d.time)}`);
  open.addEventListener("click", () => showDetail(event.id));
  first.appendChild(open);
  if (d.ingested) first.title = `received ${d.time}; recorded ${d.claimed} as its submitter claims`;
  tr.appendChild(first);
  const badges = document.createElement("td");
  if (d.adminAccess) badges.appendChild(adminBadge());
  signals.forEach((s) => badges.appendChild(signalBadge(s)));
  tr.appendChild(badges);
  cell(tr, d.action);
  cell(tr, d.interaction + (d.profile ? " · " + d.profile : ""), d.interaction.endsWith("not a FHIR interaction") ? "muted" : "");
  cell(tr, d.user);
  cell(tr, d.client);
  cell(tr, d.patients.join(" "));
  cell(tr, d.outcome ? `${d.outcome} ${d.outcomeWords}` : "", d.outcome && d.outcome !== "0" ? "fail" : "");
  cell(tr, d.address);
  cell(tr, d.requestId);
  tr.addEventListener("click", (e) => { if (e.target === tr || e.target.tagName === "TD") showDetail(event.id); });
  return tr;
}

function links(bundle) {
  const out = {};
  for (const link of bundle.link || []) out[link.relation] = link.url;
  return out;
}

function syncForm(form, params) {
  for (const input of form.elements) {
    if (!input.name) continue;
    if (input.type === "checkbox") input.checked = params.get(input.name) === "1";
    else if (input.type === "datetime-local") input.value = toInput(params.get(input.name));
    else if (input.name === "count") input.value = String(pageSize());
    else input.value = params.get(input.name) || "";
  }
}

function formParams(form, keep) {
  const params = new URLSearchParams();
  for (const name of keep) if (pageParams().get(name)) params.set(name, pageParams().get(name));
  for (const input of form.elements) {
    if (!input.name) continue;
    let value = input.type === "checkbox" ? (input.checked ? "1" : "") : input.value.trim();
    if (input.type === "datetime-local") value = fromInput(value);
    if (value && !(input.name === "count" && value === "20")) params.set(input.name, value);
  }
  return params;
}

async function loadEvents() {
  const params = pageParams();
  syncForm($("filters"), params);
  $("live").checked = params.get("live") === "1" && !params.get("cursor");
  let bundle;
  try {
    bundle = await api(searchUrl(params));
  } catch (err) { showError(err); return; }
  $("login").hidden = true;
  const body = $("events").tBodies[0];
  body.replaceChildren();
  shown = new Map();
  newest = null;
  const notes = [];
  for (const entry of bundle.entry || []) {
    if (entry.search && entry.search.mode === "outcome") {
      notes.push(entry.resource.issue.map((i) => i.diagnostics).join(" "));
      continue;
    }
    const signals = signalsOf(entry);
    shown.set(entry.resource.id, { event: entry.resource, signals });
    body.appendChild(row(entry.resource, signals, false));
    if (!newest || entry.resource.recorded > newest) newest = entry.resource.recorded;
  }
  pageLinks = links(bundle);
  $("newer").disabled = !pageLinks.previous;
  $("older").disabled = !pageLinks.next;
  const n = shown.size;
  $("total").textContent = bundle.total !== undefined ? `${bundle.total} events` : `${n} shown`;
  $("status").textContent = notes.join(" ") || (n ? "" : "no events match");
  $("detail").hidden = true;
  loadChart(params);
}

async function loadChart(params) {
  const q = searchParams(params, { signals: false });
  q.set("tz", zone());
  q.set("bucket", "auto");
  let data;
  try { data = await api("/api/activity?" + q.toString()); } catch (err) { return; }
  const caption = `${data.events} events per ${data.bucket} (${zoneLabel()})` +
    (params.get("signal") ? ", all events of the filter: the chart does not apply the signal" : "") +
    ". Choose a bar to show only its " + data.bucket + ".";
  $("activity-caption").textContent = caption;
  drawChart($("chart"), data, $("split").value, (bucket) => {
    const next = pageParams();
    next.set("from", new Date(bucket.start).toISOString());
    next.set("to", new Date(bucket.end).toISOString());
    next.delete("cursor");
    navigate(next);
  });
}

async function poll() {
  if (view() !== "events" || !$("live").checked || pageParams().get("cursor")) return;
  const q = searchParams(pageParams());
  q.set("with-signals", "true");
  if (newest) q.append("date", "ge" + newest);
  q.set("_sort", "date");
  q.set("_total", "none");
  q.set("_count", "100");
  let bundle;
  try { bundle = await api("/fhir/AuditEvent?" + q.toString()); } catch (err) { showError(err); return; }
  const body = $("events").tBodies[0];
  for (const entry of bundle.entry || []) {
    if (!entry.resource || entry.resource.resourceType !== "AuditEvent" || shown.has(entry.resource.id)) continue;
    const signals = signalsOf(entry);
    shown.set(entry.resource.id, { event: entry.resource, signals });
    body.insertBefore(row(entry.resource, signals, true), body.firstChild);
    if (!newest || entry.resource.recorded > newest) newest = entry.resource.recorded;
  }
  while (body.rows.length > pageSize() * 5) body.deleteRow(-1);
}

// --- the detail panel ------------------------------------------------------------------------

function fact(list, term, value) {
  const dt = document.createElement("dt");
  dt.textContent = term;
  const dd = document.createElement("dd");
  if (value instanceof Node) dd.appendChild(value); else dd.textContent = value || "—";
  list.append(dt, dd);
}

function showDetail(id) {
  const item = shown.get(id);
  if (!item) return;
  const { event, signals } = item;
  for (const tr of $("events").tBodies[0].rows) tr.classList.toggle("selected", tr.dataset.id === id);
  const d = describe(event);
  $("detail").hidden = false;
  $("detail-title").textContent = `${d.interaction} · ${d.outcomeWords || "no outcome"}`;
  const facts = $("detail-facts");
  facts.replaceChildren();
  fact(facts, "when", showTime(d.time) + (d.ingested ? ` (received; its submitter says ${showTime(d.claimed)})` : ""));
  fact(facts, "who", [d.user, d.userName && d.userName !== d.user ? `(${d.userName})` : "",
    d.roles.length ? "· role " + d.roles.join(", ") : ""].filter(Boolean).join(" ") || "anonymous");
  fact(facts, "client", d.client);
  fact(facts, "from", d.address);
  fact(facts, "what", `${d.action} ${d.interaction}${d.resource ? " of " + d.resource : ""}`);
  fact(facts, "patient(s)", d.patients.join(", "));
  fact(facts, "outcome", `${d.outcomeWords || "not recorded"} (code ${d.outcome || "none"})` + (d.outcomeDesc ? `: ${d.outcomeDesc}` : ""));
  fact(facts, "HTTP status", d.httpStatus ? String(d.httpStatus)
    : d.outcome === "0" ? "2xx (a success; the exact code is not recorded)" : "not recorded");
  fact(facts, "purpose of use", d.purposes.join(", "));
  fact(facts, "request id", d.requestId);
  fact(facts, "BALP profile", d.profile || "none (failures and unclassified requests claim none)");
  const badges = document.createElement("span");
  if (d.adminAccess) badges.appendChild(adminBadge());
  signals.forEach((s) => {
    badges.appendChild(signalBadge(s));
    badges.append(" ");
  });
  fact(facts, "signals", badges.childNodes.length ? badges : "none");
  $("detail-json").textContent = JSON.stringify(event, null, 2);
  $("detail-raw").open = false;
  const box = $("detail-links");
  box.replaceChildren();
  const add = (label, params) => {
    const a = document.createElement("a");
    a.href = "?" + new URLSearchParams(params).toString();
    a.textContent = label;
    box.appendChild(a);
  };
  d.patients.forEach((p) => {
    add(`other events of ${p}`, { patient: p });
    add(`who accessed ${p}`, { view: "patient", patient: p });
  });
  if (d.user) {
    add(`other events of user ${d.user}`, { agent: d.user });
    add(`what ${d.user} did`, { view: "user", user: d.user });
  }
  $("close").focus();
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

// --- the reports -----------------------------------------------------------------------------

const REPORTS = {
  patient: { form: "patient-form", box: "patient-report", subject: "patient", api: "/api/reports/patient-access", group: "user" },
  user: { form: "user-form", box: "user-report", subject: "user", api: "/api/reports/user-activity", group: "patient" },
};

function reportQuery(kind, params) {
  const q = new URLSearchParams();
  const r = REPORTS[kind];
  q.set(r.subject, params.get(r.subject) || "");
  if (params.get("from")) q.set("from", params.get("from"));
  if (params.get("to")) q.set("to", params.get("to"));
  q.set("tz", zone());
  return q;
}

function period(report) {
  const start = report.period.start ? showTime(report.period.start, false) : "the start of the retained trail";
  const end = report.period.end ? showTime(report.period.end, false) : "now";
  return `from ${start} to ${end}`;
}

function eventsTable(items, kind) {
  const table = document.createElement("table");
  table.className = "items";
  const columns = ["time", "signals", kind === "patient" ? "interaction" : "patient(s)", "resource", "outcome", "client", "source address"];
  tableHead(table, columns);
  table.createTBody();
  addEventRows(table, items, kind);
  return table;
}

function addEventRows(table, items, kind) {
  const body = table.tBodies[0];
  for (const item of items) {
    const tr = body.insertRow();
    cell(tr, showTime(item.recorded));
    const badges = document.createElement("td");
    item.signals.forEach((s) => badges.appendChild(signalBadge(s)));
    tr.appendChild(badges);
    cell(tr, kind === "patient" ? `${item.action} ${item.interaction}` : item.patients.join(" "));
    cell(tr, item.resource);
    cell(tr, `${item.outcomeWords}${item.httpStatus ? " (HTTP " + item.httpStatus + ")" : ""}`, item.outcome !== "0" ? "fail" : "");
    cell(tr, item.client);
    cell(tr, item.address);
  }
}

// A group's events: the page the report listed, then a page more each time asked (the
// first page fetched when the group is opened and the report listed none of it).
function groupEvents(group, kind) {
  const holder = document.createElement("div");
  const table = eventsTable(group.items, kind);
  let shown = group.items.length;
  let next = group.next;
  const more = document.createElement("button");
  more.type = "button";
  more.className = "more-events";
  const status = document.createElement("span");
  status.setAttribute("role", "status");
  const update = () => {
    more.hidden = !next;
    more.textContent = `show more (${shown} of ${group.events} shown)`;
  };
  const load = async () => {
    more.disabled = true;
    try {
      const page = await api(onThisOrigin(next));
      addEventRows(table, page.items, kind);
      shown += page.items.length;
      next = page.next;
      status.textContent = "";
    } catch (err) {
      status.textContent = err.message;
    }
    more.disabled = false;
    update();
  };
  more.addEventListener("click", load);
  update();
  holder.append(table, more, status);
  return { node: holder, opened: () => { if (!shown && next) load(); } };
}

function renderReport(kind, report) {
  const r = REPORTS[kind];
  const box = $(r.box);
  box.replaceChildren();
  const summary = document.createElement("p");
  summary.className = "summary";
  summary.textContent = kind === "patient"
    ? `${report.events} accesses to ${report.patient} by ${report.users} users, ${period(report)}.`
    : `${report.events} events by ${report.user}${report.names.length ? " (" + report.names.join(", ") + ")" : ""}, touching ${report.patients} patients, ${period(report)}.`;
  box.appendChild(summary);
  if (report.truncated) {
    const warn = document.createElement("p");
    warn.className = "fail";
    warn.textContent = "More events match than one report lists: narrow the period.";
    box.appendChild(warn);
  }
  if (Object.keys(report.signals).length) {
    const p = document.createElement("p");
    p.append("signals: ");
    for (const [s, n] of Object.entries(report.signals)) { p.append(signalBadge(s), ` ${n}  `); }
    box.appendChild(p);
  }
  if (kind === "user" && report.days.length) {
    const days = document.createElement("table");
    days.className = "days";
    const caption = days.createCaption();
    caption.textContent = `by day (${report.zone})`;
    tableHead(days, ["day", "events", "patients"]);
    const body = days.createTBody();
    for (const day of report.days) {
      const tr = body.insertRow();
      cell(tr, day.date);
      cell(tr, String(day.events));
      cell(tr, String(day.patients));
    }
    box.appendChild(days);
  }
  const table = document.createElement("table");
  table.className = "groups";
  const caption = table.createCaption();
  caption.textContent = kind === "patient" ? "accesses by user, most recent first" : "patients touched, most recent first";
  const columns = kind === "patient"
    ? ["user", "name", "role", "client", "accesses", "first", "last", "interactions", "outcomes", "signals"]
    : ["patient", "client", "events", "first", "last", "interactions", "outcomes", "signals"];
  tableHead(table, columns);
  const body = table.createTBody();
  report.groups.forEach((group, n) => {
    const tr = body.insertRow();
    const first = document.createElement("th");
    first.scope = "row";
    const toggle = document.createElement("button");
    toggle.type = "button";
    toggle.className = "expand";
    toggle.textContent = group[r.group];
    toggle.setAttribute("aria-expanded", "false");
    toggle.setAttribute("aria-controls", `${kind}-group-${n}`);
    first.appendChild(toggle);
    tr.appendChild(first);
    if (kind === "patient") {
      cell(tr, group.names.join(", "));
      cell(tr, group.roles.join(", "));
    }
    cell(tr, group.clients.join(", "));
    cell(tr, String(group.events), "num");
    cell(tr, showTime(group.first, false));
    cell(tr, showTime(group.last, false));
    cell(tr, counts(group.interactions));
    cell(tr, counts(group.outcomes));
    const badges = document.createElement("td");
    for (const [s, k] of Object.entries(group.signals)) { badges.append(signalBadge(s), k > 1 ? ` ×${k} ` : " "); }
    tr.appendChild(badges);
    const more = body.insertRow();
    more.id = `${kind}-group-${n}`;
    more.hidden = true;
    more.className = "group-items";
    const holder = document.createElement("td");
    holder.colSpan = columns.length;
    const events = groupEvents(group, kind);
    holder.appendChild(events.node);
    more.appendChild(holder);
    toggle.addEventListener("click", () => {
      more.hidden = !more.hidden;
      toggle.setAttribute("aria-expanded", String(!more.hidden));
      if (!more.hidden) events.opened();
    });
  });
  box.appendChild(table);
}

async function loadReport(kind) {
  const r = REPORTS[kind];
  const params = pageParams();
  syncForm($(r.form), params);
  $(r.box).replaceChildren();
  if (!params.get(r.subject)) { $("status").textContent = ""; return; }
  try {
    const report = await api(r.api + "?" + reportQuery(kind, params).toString());
    $("login").hidden = true;
    $("status").textContent = "";
    renderReport(kind, report);
  } catch (err) { showError(err); }
}

// --- queue health ----------------------------------------------------------------------------

function age(seconds) {
  if (seconds === null || seconds === undefined) return "none";
  if (seconds < 90) return Math.round(seconds) + " s";
  if (seconds < 5400) return Math.round(seconds / 60) + " min";
  return Math.round(seconds / 3600) + " h";
}

async function health() {
  try {
    const q = await api("/api/queue");
    $("login").hidden = true;
    $("q-pending").textContent = q.pending;
    $("q-age").textContent = age(q.oldestPendingAgeS);
    $("q-age").classList.toggle("warn", (q.oldestPendingAgeS || 0) > 60);
    $("q-dead").textContent = q.dead;
    $("q-dead").classList.toggle("warn", q.dead > 0);
    $("q-retry").hidden = q.dead === 0;
  } catch (err) {
    // A missing or refused token is asked for on every view; other errors the views
    // report, and the strip keeps its last values.
    if (err instanceof ApiError && err.status === 401) showError(err);
  }
}

async function retryDead() {
  try {
    const r = await api("/dlq/retry", { method: "POST", headers: { "Content-Type": "application/json" }, body: "{}" });
    $("q-note").textContent = "requeued " + r.requeued;
  } catch (err) { $("q-note").textContent = err.message; }
  health();
}

// --- routing and controls --------------------------------------------------------------------

function route() {
  const v = view();
  for (const name of ["events", "patient", "user"]) $("view-" + name).hidden = name !== v;
  for (const a of $("views").querySelectorAll("a")) {
    if (a.dataset.view === v) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  $("tz").value = pageParams().get("tz") === "utc" ? "utc" : "";
  for (const span of document.querySelectorAll(".zone-name")) span.textContent = `(${zoneLabel()})`;
  $("zone-now").textContent = `now ${showTime(new Date().toISOString(), false)}`;
  $("status").textContent = "";
  if (v === "events") loadEvents(); else loadReport(v);
}

function quickRanges(form, onPick) {
  for (const button of form.querySelectorAll("[data-range]")) {
    button.addEventListener("click", () => {
      const now = Date.now();
      form.elements.from.value = toInput(new Date(now - Number(button.dataset.range) * 1000).toISOString());
      form.elements.to.value = "";
      onPick();
    });
  }
}

function keep() { return ["view", "tz"].filter((k) => pageParams().get(k)); }

$("filters").addEventListener("submit", (e) => {
  e.preventDefault();
  const params = formParams($("filters"), keep());
  if ($("live").checked) params.set("live", "1");
  navigate(params);
});
quickRanges($("filters"), () => $("filters").requestSubmit());
$("clear").addEventListener("click", () => {
  const params = new URLSearchParams();
  for (const k of keep()) params.set(k, pageParams().get(k));
  navigate(params);
});
$("export").addEventListener("click", async () => {
  const q = searchParams(pageParams());
  q.set("tz", zone());
  try { await download("/api/export.csv?" + q.toString(), "audit-events.csv"); } catch (err) { showError(err); }
});
$("older").addEventListener("click", () => {
  const params = pageParams();
  params.set("cursor", new URL(pageLinks.next).searchParams.get("_cursor"));
  params.delete("live");
  navigate(params);
});
$("newer").addEventListener("click", () => {
  const params = pageParams();
  params.set("cursor", new URL(pageLinks.previous).searchParams.get("_cursor"));
  navigate(params);
});
$("live").addEventListener("change", () => {
  const params = pageParams();
  if ($("live").checked) params.set("live", "1"); else params.delete("live");
  if ($("live").checked && params.get("cursor")) params.delete("cursor");
  navigate(params);
});
$("split").addEventListener("change", () => loadChart(pageParams()));

for (const kind of ["patient", "user"]) {
  const r = REPORTS[kind];
  const form = $(r.form);
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    navigate(formParams(form, keep()));
  });
  quickRanges(form, () => form.requestSubmit());
  form.querySelector(".csv").addEventListener("click", async () => {
    const params = formParams(form, keep());
    if (!params.get(r.subject)) { form.reportValidity(); return; }
    const q = reportQuery(kind, params);
    q.set("format", "csv");
    try { await download(r.api + "?" + q.toString(), `${kind}-report.csv`); } catch (err) { showError(err); }
  });
  form.querySelector(".print").addEventListener("click", () => {
    const params = formParams(form, keep());
    if (!params.get(r.subject)) { form.reportValidity(); return; }
    params.set("kind", kind);
    params.delete("view");
    location.href = "report.html?" + params.toString();
  });
}

for (const a of $("views").querySelectorAll("a")) {
  a.addEventListener("click", (e) => {
    e.preventDefault();
    const params = new URLSearchParams();
    params.set("view", a.dataset.view);
    if (pageParams().get("tz")) params.set("tz", pageParams().get("tz"));
    navigate(params);
  });
}
$("tz").addEventListener("change", () => {
  const params = pageParams();
  if ($("tz").value) params.set("tz", $("tz").value); else params.delete("tz");
  navigate(params);
});
$("login-form").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem("adminToken", $("token").value);
  $("token").value = "";
  route();
  health();
});
$("copy").addEventListener("click", copyJson);
$("close").addEventListener("click", () => {
  $("detail").hidden = true;
  const selected = $("events").querySelector("tr.selected button.open");
  if (selected) selected.focus();
});
$("q-retry").addEventListener("click", retryDead);
window.addEventListener("popstate", route);

route();
health();
setInterval(poll, LIVE_POLL_MS);
setInterval(health, HEALTH_POLL_MS);
