// The printable report: the patient access or user activity report as a document a privacy
// officer can print or save as PDF (the browser's own print, with the print style sheet),
// and hand to the patient who asked who has seen their record.
"use strict";

const KINDS = {
  patient: { api: "/api/reports/patient-access", subject: "patient", title: "Record access report" },
  user: { api: "/api/reports/user-activity", subject: "user", title: "User activity report" },
};

function table(node, columns, rows) {
  node.replaceChildren();
  tableHead(node, columns);
  const body = node.createTBody();
  for (const values of rows) {
    const tr = body.insertRow();
    values.forEach((v) => cell(tr, v));
  }
}

function meta(term, value) {
  const dt = document.createElement("dt");
  dt.textContent = term;
  const dd = document.createElement("dd");
  dd.textContent = value;
  $("meta").append(dt, dd);
}

// What was accessed, without the version a read happened to return.
function what(item) {
  return `${item.interaction} ${item.resource.split("/_history/")[0]}`;
}

function outcome(item) {
  return item.outcomeWords + (item.httpStatus ? ` (HTTP ${item.httpStatus})` : "");
}

async function load() {
  const params = pageParams();
  const kind = KINDS[params.get("kind")] ? params.get("kind") : "patient";
  const k = KINDS[kind];
  const back = new URLSearchParams(params);
  back.delete("kind");
  back.set("view", kind);
  $("back").href = "./?" + back.toString();
  const q = new URLSearchParams();
  q.set(k.subject, params.get(k.subject) || "");
  for (const name of ["from", "to"]) if (params.get(name)) q.set(name, params.get(name));
  q.set("tz", zone());
  let report;
  try {
    report = await api(k.api + "?" + q.toString());
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      $("login").hidden = false;
      $("login-why").textContent = err.message;
      $("token").focus();
    } else {
      $("status").textContent = err.message;
    }
    return;
  }
  $("login").hidden = true;
  const subject = kind === "patient" ? report.patient : report.user;
  document.title = `${k.title}: ${subject}`;
  $("title").textContent = k.title;
  $("meta").replaceChildren();
  meta(kind === "patient" ? "patient" : "user", subject + (kind === "user" && report.names.length ? ` (${report.names.join(", ")})` : ""));
  meta("period", `${report.period.start ? showTime(report.period.start, false) : "start of the retained trail"} to ${report.period.end ? showTime(report.period.end, false) : showTime(report.generated, false)}`);
  meta("times shown in", zoneLabel());
  meta("prepared", showTime(report.generated, false));
  // Every event: the report lists a page of each group; a longer report is read whole.
  let all = report.groups.flatMap((g) => g.items);
  if (report.groups.some((g) => g.next)) {
    const every = new URLSearchParams();
    for (const name of [k.subject, "from", "to"]) if (q.get(name)) every.set(name, q.get(name));
    every.set("count", "1000");
    try {
      all = await followPages(k.api + "/events?" + every.toString());
    } catch (err) {
      $("status").textContent = err.message;
      return;
    }
  }
  all.sort((a, b) => (a.recorded < b.recorded ? -1 : 1));
  if (kind === "patient") {
    $("intro").textContent = `This report lists every recorded access to the health record of ${subject} in the period above: `
      + `${report.events} accesses by ${report.users} people or systems. Each access was recorded by the audit trail when it happened, `
      + "including attempts that were refused.";
    table($("summary"), ["who", "name", "role", "application", "accesses", "first", "last", "what"],
      report.groups.map((g) => [g.user, g.names.join(", "), g.roles.join(", "), g.clients.join(", "), String(g.events),
        showTime(g.first, false), showTime(g.last, false), counts(g.interactions)]));
    table($("list"), ["time", "who", "application", "what", "outcome"],
      all.map((i) => [showTime(i.recorded, false), i.user + (i.userName ? ` (${i.userName})` : ""), i.client,
        what(i), outcome(i)]));
  } else {
    $("intro").textContent = `This report lists what ${subject} did in the period above: ${report.events} recorded events `
      + `touching ${report.patients} patients.`;
    table($("summary"), ["patient", "events", "first", "last", "what", "outcomes", "signals"],
      report.groups.map((g) => [g.patient, String(g.events), showTime(g.first, false), showTime(g.last, false),
        counts(g.interactions), counts(g.outcomes), counts(g.signals)]));
    table($("list"), ["time", "patient(s)", "what", "outcome", "signals", "from"],
      all.map((i) => [showTime(i.recorded, false), i.patients.join(" "), what(i), outcome(i),
        i.signals.map((s) => (SIGNAL_WORDS[s] || [s])[0]).join(", "), i.address]));
  }
  $("footer").textContent = report.truncated
    ? "More events matched than one report lists: this report is cut; ask for a shorter period."
    : `${report.events} events. Prepared by fhir-audit-proxy from its audit trail (IHE BALP AuditEvents).`;
}


$("print").addEventListener("click", () => window.print());
$("login-form").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem("adminToken", $("token").value);
  $("token").value = "";
  load();
});
load();
