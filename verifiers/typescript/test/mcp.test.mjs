// The example MCP server (tests/mcp/server.mjs) with MCP_VERIFY_BINDING=1 checks its
// buy_product calls with this package. Needs `npm ci --prefix tests/mcp` (skipped otherwise).

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { once } from 'node:events';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { after, before, describe, it } from 'node:test';

import { callEntry, dpopKeyPair, dpopProof, issueTokens, send, startPeer } from './helpers.mjs';

const SERVER = fileURLToPath(new URL('../../../tests/mcp/server.mjs', import.meta.url));
const SDK = fileURLToPath(new URL('../../../tests/mcp/node_modules/@modelcontextprotocol/sdk', import.meta.url));
const skip = existsSync(SDK) ? false : 'tests/mcp is not installed (npm ci --prefix tests/mcp)';

const ACCEPT = 'application/json, text/event-stream';
const buy = (id) =>
  JSON.stringify({ jsonrpc: '2.0', id, method: 'tools/call', params: { name: 'buy_product', arguments: { product: 'XYZ phone', qty: 2 } } });

let peer;
let server;
let port;
let base;
let key;
const tokens = {};
const entries = {};

before(async () => {
  if (skip) return;
  peer = await startPeer();
  server = spawn(process.execPath, [SERVER], {
    env: { ...process.env, MCP_ISSUER: peer.issuer, MCP_VERIFY_BINDING: '1', MCP_PORT: '0' },
    stdio: ['pipe', 'pipe', 'inherit'],
  });
  const [line] = await once(createInterface({ input: server.stdout }), 'line');
  port = JSON.parse(line).port;
  const host = `127.0.0.1:${port}`;
  const init = await send({
    port,
    path: '/mcp',
    headers: { 'content-type': 'application/json', accept: ACCEPT },
    body: JSON.stringify({
      jsonrpc: '2.0',
      id: 1,
      method: 'initialize',
      params: { protocolVersion: '2025-06-18', capabilities: {}, clientInfo: { name: 'verify-tests', version: '1' } },
    }),
  });
  base = { 'content-type': 'application/json', accept: ACCEPT, 'mcp-session-id': init.headers['mcp-session-id'] };
  await send({ port, path: '/mcp', headers: base, body: JSON.stringify({ jsonrpc: '2.0', method: 'notifications/initialized' }) });
  key = await dpopKeyPair();
  entries.bearer = callEntry({ target: '/mcp', host, body: buy(2), tool: 'buy_product' });
  entries.dpop = callEntry({ target: '/mcp', host, body: buy(3), tool: 'buy_product' });
  [tokens.bearer, tokens.dpop, tokens.unbound] = await issueTokens(peer, [
    { details: [entries.bearer] },
    { details: [entries.dpop], dpopKey: key },
    {},
  ]);
});

after(async () => {
  if (server) {
    server.stdin.end();
    if (server.exitCode === null) await once(server, 'exit');
  }
  await peer?.stop();
});

describe('example MCP server with MCP_VERIFY_BINDING=1', { skip }, () => {
  const bindings = async () => (await send({ port, method: 'GET', path: '/control/bindings' })).json;
  const calls = async () => (await send({ port, method: 'GET', path: '/control/calls' })).json;

  it('runs buy_product only for the approved call, once', async () => {
    const headers = { ...base, authorization: `Bearer ${tokens.bearer}` };
    for (const [request, code, field] of [
      [{ headers, body: buy(9) }, 'binding_mismatch', 'body'],
      [{ headers: { ...base, authorization: `Bearer ${tokens.unbound}` }, body: buy(2) }, 'binding_missing', undefined],
      [{ headers: base, body: buy(2) }, 'token_missing', undefined],
    ]) {
      const res = await send({ port, path: '/mcp', ...request });
      assert.equal(res.json?.code, code);
      assert.equal(res.json?.field, field);
    }
    assert.equal((await calls()).length, 0);
    const ok = await send({ port, path: '/mcp', headers, body: buy(2) });
    assert.equal(ok.status, 200);
    assert.match(ok.text, /Bought 2 XYZ phone for alice/);
    const again = await send({ port, path: '/mcp', headers, body: buy(2) });
    assert.equal(again.status, 403);
    assert.equal(again.json.code, 'approval_replayed');
    assert.equal((await calls()).length, 1);
    const seen = await bindings();
    assert.deepEqual(seen.at(-2), { tool: 'buy_product', accepted: true, approval: entries.bearer.approval, subject: 'alice' });
    assert.deepEqual(seen.at(-1), { tool: 'buy_product', accepted: false, status: 403, code: 'approval_replayed' });
  });

  it('accepts a DPoP-bound token with its proof, refuses it without', async () => {
    const htu = `http://127.0.0.1:${port}/mcp`;
    const missing = await send({ port, path: '/mcp', headers: { ...base, authorization: `DPoP ${tokens.dpop}` }, body: buy(3) });
    assert.equal(missing.status, 401);
    assert.equal(missing.json.code, 'dpop_proof_missing');
    const proof = await dpopProof({ key, htm: 'POST', htu, token: tokens.dpop });
    const ok = await send({ port, path: '/mcp', headers: { ...base, authorization: `DPoP ${tokens.dpop}`, dpop: proof }, body: buy(3) });
    assert.equal(ok.status, 200);
    assert.match(ok.text, /Bought 2 XYZ phone for alice/);
  });

  it('leaves tools that need no approval alone', async () => {
    const list = JSON.stringify({ jsonrpc: '2.0', id: 7, method: 'tools/call', params: { name: 'list_products', arguments: {} } });
    const res = await send({ port, path: '/mcp', headers: base, body: list });
    assert.equal(res.status, 200);
    assert.match(res.text, /XYZ phone, ABC laptop, Cable/);
  });
});
