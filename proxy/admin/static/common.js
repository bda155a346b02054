// What the viewer (viewer.js) and the printable report (report.js) share: the admin API
// with the token kept in sessionStorage, times shown in the zone the user chose, and the
// reading of a stored AuditEvent (R4 BALP, or R5) in words.
"use strict";

const $ = (id) => document.getElementById(id);

function token() { return sessionStorage.getItem("adminToken"); }

// An error the page shows; `login` when the token is missing or was not accepted.
class ApiError extends Error {
  constructor(message, status) { super(message); this.status = status; }
}

async function apiFetch(url, options = {}) {
  const headers = Object.assign({ Accept: "application/fhir+json, application/json" }, options.headers || {});
  if (token()) headers.Authorization = "Bearer " + token();
  const response = await fetch(url, Object.assign({}, options, { headers }));
  if (!response.ok) {
    let text = "HTTP " + response.status;
    try {
      const body = await response.json();
      const issue = body.issue && body.issue[0];
      if (issue && issue.diagnostics) text = issue.diagnostics;
    } catch (err) { /* not JSON: keep the status */ }
    if (response.status === 401) {
      // No token and a wrong token are different mistakes: say which.
      text = token()
        ? "That token was not accepted (" + text.replace(/^the bearer token was not accepted ?/, "").replace(/^\(|\)$/g, "") + "). Check it and enter it again."
        : "The admin API needs a token. Enter it to see the audit trail.";
      text = text.replace(" ()", "");
    } else if (response.status === 403) {
      text = "This token may not do that: " + text;
    }
    throw new ApiError(text, response.status);
  }
  return response;
}

async function api(url, options = {}) {
  return (await apiFetch(url, options)).json();
}

// A link the API gave (absolute, on its public address) as a path on this page's origin,
// where the page's token is sent.
function onThisOrigin(link) {
  const url = new URL(link, location.href);
  return url.pathname + url.search;
}

// Every event of a report's pages from `link` on (each page's `next` followed).
async function followPages(link) {
  const items = [];
  while (link) {
    const page = await api(onThisOrigin(link));
    items.push(...page.items);
    link = page.next;
  }
  return items;
}

// Save what `url` answers as a file (the token goes in a header, so a plain link cannot).
async function download(url, filename) {
  const blob = await (await apiFetch(url, { headers: { Accept: "text/csv" } })).blob();
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = filename;
  document.body.appendChild(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

// --- time, in the browser's zone or UTC ------------------------------------------------------

function pageParams() { return new URLSearchParams(location.search); }

function browserZone() { return Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC"; }

// The IANA zone times are shown and typed in: `tz=utc` in the page URL, else the browser's.
function zone() { return pageParams().get("tz") === "utc" ? "UTC" : browserZone(); }

function zoneLabel(date = new Date()) {
  if (zone() === "UTC") return "UTC";
  const part = new Intl.DateTimeFormat("en-US", { timeZone: zone(), timeZoneName: "shortOffset" })
    .formatToParts(date).find((p) => p.type === "timeZoneName");
  if (!part) return zone();
  return part.value === "GMT" ? "UTC" : part.value;  // a zone at offset zero is UTC's time
}

function parts(date) {
  const out = {};
  const format = new Intl.DateTimeFormat("en-CA", {
    timeZone: zone(), year: "numeric", month: "2-digit", day: "2-digit",
    hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23",
  });
  for (const p of format.formatToParts(date)) out[p.type] = p.value;
  return out;
}

// "2026-12-05 14:03:07.123 GMT+1": always with the zone it is in.
function showTime(value, withMs = true) {
  if (!value) return "";
  const date = new Date(value);
  if (isNaN(date)) return String(value);
  const p = parts(date);
  const ms = withMs ? "." + String(date.getUTCMilliseconds()).padStart(3, "0") : "";
  return `${p.year}-${p.month}-${p.day} ${p.hour}:${p.minute}:${p.second}${ms} ${zoneLabel(date)}`;
}

function showDay(value) {
  const p = parts(new Date(value));
  return `${p.year}-${p.month}-${p.day}`;
}

// An instant as a datetime-local input shows it, in the chosen zone.
function toInput(iso) {
  if (!iso) return "";
  const date = new Date(iso);
  if (isNaN(date)) return "";
  const p = parts(date);
  return `${p.year}-${p.month}-${p.day}T${p.hour}:${p.minute}:${p.second}`;
}

// What a datetime-local input says, in the chosen zone, as an instant (ISO, UTC).
function fromInput(value) {
  if (!value) return "";
  const [day, time = "00:00:00"] = value.split("T");
  const [y, m, d] = day.split("-").map(Number);
  const [hh, mm, ss = 0] = time.split(":").map(Number);
  const wall = Date.UTC(y, m - 1, d, hh, mm, Math.floor(ss));
  if (zone() === "UTC") return new Date(wall).toISOString();
  // The zone's offset at that wall time (twice: the offset may differ across it).
  let guess = wall;
  for (let i = 0; i < 2; i++) {
    const p = parts(new Date(guess));
    const asUtc = Date.UTC(+p.year, +p.month - 1, +p.day, +p.hour, +p.minute, +p.second);
    guess = wall - (asUtc - guess);
  }
  return new Date(guess).toISOString();
}

// --- an AuditEvent in words ------------------------------------------------------------------

const OUTCOME_WORDS = { "0": "success", "4": "minor failure", "8": "serious failure", "12": "major failure" };
const SIGNAL_WORDS = {
  "first-access": ["first access", "the first access by this user to this patient in the retained trail"],
  "many-patients": ["many patients", "this user touched more patients than configured within the hour up to this access"],
  "after-hours": ["after hours", "recorded outside the configured working hours"],
  "denied": ["denied", "the server refused the request (HTTP 401 or 403)"],
  "failed": ["failed", "the request failed"],
  "break-glass": ["break-glass", "the token claimed emergency access (purpose of use ETREAT or BTG)"],
};
const SIGNAL_EXT = "urn:fhir-audit-proxy:extension:signal";
const PROXY_TAGS = "urn:fhir-audit-proxy:tag";
const ADMIN_TAG = PROXY_TAGS + "|admin-access";

function codes(value) {
  if (!value) return [];
  if (value.code) return [value.code];
  return (value.coding || []).map((c) => c.code);
}

function whoOf(agent) {
  const who = agent.who || {};
  return (who.identifier && who.identifier.value) || who.reference || who.display || agent.altId || "";
}

function requestTarget(query) {
  try { return atob(query).split("\r\n")[0].split(" ")[1] || ""; } catch (err) { return ""; }
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
    patients.unshift(event.patient.reference);
  }
  const isRequestId = (e) => codes(e.type).includes("XrequestId") || (e.role && e.role.text === "X-Request-Id");
  const requestId = (event.entity || []).find(isRequestId);
  const main = (event.entity || []).find((e) => !isRequestId(e) && !codes(e.role).includes("1"));
  let subtypes = (event.subtype || (event.code && event.code.coding) || []).map((c) => c.code);
  if (!event.subtype && subtypes.join() === "rest") subtypes = [];
  const profile = (((event.meta && event.meta.profile) || [])[0] || "").split("IHE.BasicAudit.")[1] || "";
  const outcome = typeof event.outcome === "object" ? codes(event.outcome.code)[0] : event.outcome;
  const outcomeDesc = typeof event.outcome === "object"
    ? ((event.outcome.detail || [])[0] || {}).text || "" : event.outcomeDesc || "";
  const status = /\bHTTP (\d{3})\b/.exec(outcomeDesc);
  const purposes = user ? (user.purposeOfUse || user.authorization || []).flatMap(codes) : [];
  const meta = event.meta || {};
  const tags = meta.tag || [];
  // Submitted through the admin API: it sits in the trail at the time it was received
  // (meta.lastUpdated); its recorded is what the submitter claimed.
  const ingested = tags.some((t) => t.system === PROXY_TAGS && t.code === "ingested");
  return {
    id: event.id,
    time: (ingested ? meta.lastUpdated : event.recorded) || "",
    claimed: ingested ? (event.recorded || "") : "",
    ingested,
    action: event.action || "",
    interaction: (ingested ? "ingested · " : "") + (subtypes.join(", ") || "not a FHIR interaction"),
    profile,
    resource: main ? ((main.what && main.what.reference) || main.description || (main.query ? requestTarget(main.query) : "")) : (patients[0] || ""),
    user: user ? whoOf(user) : "",
    userName: user ? ((user.who && user.who.display) || user.name || "") : "",
    roles: user ? (user.role || []).map((r) => r.text || codes(r)[0]).filter(Boolean) : [],
    purposes,
    client: client ? client.who.identifier.value : "",
    patients,
    outcome: outcome || "",
    outcomeWords: OUTCOME_WORDS[outcome] || outcome || "",
    outcomeDesc,
    httpStatus: status ? Number(status[1]) : null,
    address: peer ? ((peer.network && peer.network.address) || peer.networkString) : "",
    requestId: requestId ? requestId.what.identifier.value : "",
    adminAccess: tags.some((t) => t.system + "|" + t.code === ADMIN_TAG),
  };
}

function signalBadge(signal) {
  const span = document.createElement("span");
  const [word, why] = SIGNAL_WORDS[signal] || [signal, signal];
  span.className = "badge sig-" + signal;
  span.textContent = word;
  span.title = why;
  return span;
}

function adminBadge() {
  const span = document.createElement("span");
  span.className = "badge admin";
  span.textContent = "admin read";
  span.title = "a read of the audit trail through the admin API";
  return span;
}

function cell(tr, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (text) td.title = text;
  if (className) td.className = className;
  tr.appendChild(td);
  return td;
}

function counts(obj) {
  return Object.entries(obj || {}).map(([k, n]) => `${k} ${n}`).join(", ");
}

// The header row of `table`: a column header for each name.
function tableHead(table, columns) {
  const head = table.createTHead().insertRow();
  for (const name of columns) {
    const th = document.createElement("th");
    th.scope = "col";
    th.textContent = name;
    head.appendChild(th);
  }
}
