// An MCP server built with the official TypeScript SDK, exposing the shop's
// `buy_product` (which needs an access token for the shop's API) and
// `list_products` (which does not), over Streamable HTTP at /mcp with
// sessions. Countersign's example MCP upstream and its test peer.
//
//   MCP_ISSUER=<authorization server> node tests/mcp/server.mjs
//
// It verifies the bearer token a call of buy_product carries (signature by
// the issuer's JWKS, issuer, audience, scope product:buy) and records every
// tool call it ran: GET /control/calls (tool, arguments, whether a token came
// and what it said; never the token itself), and GET /control/methods the
// HTTP requests on /mcp by method. Like the SDK's backwards-compatible
// server example, it also speaks the deprecated HTTP+SSE transport
// (revision 2024-11-05): GET /sse opens a stream whose first event names
// the endpoint (/messages?sessionId=...) that messages are POSTed to.
// Once it listens it prints one
// line to stdout: {"url":"http://127.0.0.1:<port>/mcp","port":<port>}.
// It exits when stdin closes (the parent test died) unless MCP_IGNORE_STDIN=1.
//
// With MCP_VERIFY_BINDING=1 (and MCP_ISSUER), a tools/call of buy_product is
// also checked, before the MCP SDK sees it, by @countersign/verify (the
// TypeScript verifier of docs/call-binding.md, verifiers/typescript; its
// dependencies must be installed: npm ci --prefix verifiers/typescript): the
// token must name exactly this HTTP request (method, raw target, Host, body
// digest) in a countersign_call entry, be for MCP_AUDIENCE with scope
// product:buy, and (if DPoP-bound) come with a valid DPoP proof. A refused call
// gets the contract's application/problem+json answer (401/403) and never runs;
// GET /control/bindings lists every check, accepted or refused (tool, accepted,
// approval and subject, or status, code and field). Further switches:
// MCP_BINDING_HOST (the host the binding must name instead of the Host header),
// MCP_EXTERNAL_URL (the URL clients reach the server at, for DPoP htu),
// MCP_REQUIRE_DPOP=1 (refuse tokens that are not DPoP-bound),
// MCP_BINDING_TOOLS (comma-separated tools checked; default buy_product).

import { randomUUID } from 'node:crypto';
import http from 'node:http';

import { McpServer } from '@modelcontextprotocol/sdk/server/mcp.js';
import { SSEServerTransport } from '@modelcontextprotocol/sdk/server/sse.js';
import { StreamableHTTPServerTransport } from '@modelcontextprotocol/sdk/server/streamableHttp.js';
import { isInitializeRequest } from '@modelcontextprotocol/sdk/types.js';
import { createRemoteJWKSet, jwtVerify } from 'jose';
import { z } from 'zod';

const issuer = process.env.MCP_ISSUER;
const audience = process.env.MCP_AUDIENCE ?? 'https://shop.example/api';
const port = Number(process.env.MCP_PORT ?? 0);
const jwksUri = process.env.MCP_JWKS_URI ?? (issuer ? `${issuer}/.well-known/jwks.json` : undefined);
const jwks = issuer ? createRemoteJWKSet(new URL(jwksUri)) : null;

// Call binding (MCP_VERIFY_BINDING=1): the verifier, and every check it made.
const boundTools = new Set((process.env.MCP_BINDING_TOOLS ?? 'buy_product').split(',').filter(Boolean));
const bindings = [];
const binding = process.env.MCP_VERIFY_BINDING === '1' ? await bindingVerifier() : null;

async function bindingVerifier() {
  if (!issuer) {
    console.error('MCP_VERIFY_BINDING=1 needs MCP_ISSUER (the authorization server)');
    process.exit(2);
  }
  let createVerifier;
  try {
    // imported only when asked for, so that the server runs without the verifier's dependencies
    ({ createVerifier } = await import('@countersign/verify'));
  } catch (error) {
    console.error(
      `MCP_VERIFY_BINDING=1: cannot load @countersign/verify (${error.code ?? error.message}); ` +
        'run npm ci --prefix verifiers/typescript and npm ci --prefix tests/mcp',
    );
    process.exit(2);
  }
  return createVerifier({
    issuer,
    audience,
    jwksUri,
    requiredScopes: ['product:buy'],
    host: process.env.MCP_BINDING_HOST || undefined,
    externalUrl: process.env.MCP_EXTERNAL_URL || undefined,
    requireDpop: process.env.MCP_REQUIRE_DPOP === '1',
  });
}

// The bound tools a JSON-RPC message (or batch) calls.
function boundToolsCalled(body) {
  const messages = Array.isArray(body) ? body : [body];
  return messages
    .filter((m) => m && m.method === 'tools/call' && boundTools.has(m.params?.name))
    .map((m) => m.params.name);
}

// Checks the call binding of a tools/call of a bound tool; answers the refusal
// itself and returns false when the call must not run.
async function bindingAllows(req, res, raw, body) {
  if (!binding) return true;
  const tools = boundToolsCalled(body);
  if (tools.length === 0) return true;
  const host = req.headers.host;
  const result = await binding.verify({
    method: req.method,
    target: req.url, // the request-target as received
    host,
    headers: req.headersDistinct,
    body: raw,
    url: `http://${host}${req.url}`,
  });
  const tool = tools.join(',');
  if (result.ok) {
    bindings.push({ tool, accepted: true, approval: result.approval, subject: result.subject });
    return true;
  }
  const { status, code, field } = result.problem;
  bindings.push({ tool, accepted: false, status, code, ...(field ? { field } : {}) });
  res.writeHead(status, result.headers);
  res.end(JSON.stringify(result.problem));
  return false;
}

const products = ['XYZ phone', 'ABC laptop', 'Cable'];
const calls = [];
// HTTP requests on /mcp by method, to show what passed through a gateway.
const methods = {};

async function verify(authorization) {
  const token = /^(?:Bearer|DPoP) (.+)$/i.exec(authorization ?? '')?.[1];
  if (!token) return { token: false };
  if (!jwks) return { token: true, valid: false, reason: 'no MCP_ISSUER to verify against' };
  try {
    const { payload } = await jwtVerify(token, jwks, { issuer, audience });
    const scopes = String(payload.scope ?? '').split(' ');
    if (!scopes.includes('product:buy')) {
      return { token: true, valid: false, reason: 'no product:buy scope' };
    }
    return { token: true, valid: true, sub: payload.sub, scope: payload.scope, aud: payload.aud };
  } catch (error) {
    return { token: true, valid: false, reason: String(error.code ?? error.message) };
  }
}

function newServer() {
  const server = new McpServer(
    { name: 'shop-mcp', version: '1.0.0' },
    { capabilities: { logging: {} } },
  );
  server.registerTool(
    'buy_product',
    {
      description: 'Buy a quantity of a product from the shop. Needs the approval of the user.',
      inputSchema: { product: z.string(), qty: z.number().int().positive() },
      outputSchema: { order: z.string(), product: z.string(), qty: z.number(), buyer: z.string() },
    },
    async ({ product, qty }, extra) => {
      const auth = await verify(extra.requestInfo?.headers?.authorization);
      calls.push({ tool: 'buy_product', arguments: { product, qty }, ...auth });
      if (!auth.valid) {
        return {
          isError: true,
          content: [{ type: 'text', text: `The shop refused: ${auth.reason ?? 'no access token'}.` }],
        };
      }
      // A notification in the call's stream before the result: a gateway
      // must relay the server's events, not only its response.
      await extra.sendNotification({
        method: 'notifications/message',
        params: { level: 'info', data: `charging ${auth.sub} for ${qty} ${product}` },
      });
      const order = { order: randomUUID(), product, qty, buyer: auth.sub };
      return {
        content: [{ type: 'text', text: `Bought ${qty} ${product} for ${auth.sub} (order ${order.order}).` }],
        structuredContent: order,
      };
    },
  );
  server.registerTool(
    'list_products',
    { description: 'The products the shop sells.', inputSchema: {} },
    async (_args, extra) => {
      const token = Boolean(extra.requestInfo?.headers?.authorization);
      calls.push({ tool: 'list_products', arguments: {}, token });
      return { content: [{ type: 'text', text: products.join(', ') }] };
    },
  );
  return server;
}

const transports = new Map();

async function readRaw(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return Buffer.concat(chunks);
}

function parseJson(raw) {
  const text = raw.toString('utf8');
  return text ? JSON.parse(text) : undefined;
}

const parseError = (res) => {
  res.writeHead(400, { 'content-type': 'application/json' });
  res.end(JSON.stringify({ jsonrpc: '2.0', id: null, error: { code: -32700, message: 'Parse error' } }));
};

// The request's bytes and the JSON-RPC message they hold; undefined once a
// body that is not JSON has been answered with a parse error.
async function readMessage(req, res) {
  const raw = await readRaw(req);
  try {
    return { raw, body: parseJson(raw) };
  } catch {
    parseError(res);
    return undefined;
  }
}

async function handleMcp(req, res) {
  const sessionId = req.headers['mcp-session-id'];
  if (req.method === 'POST') {
    const message = await readMessage(req, res);
    if (!message) return;
    const { raw, body } = message;
    if (!(await bindingAllows(req, res, raw, body))) return;
    let transport = sessionId ? transports.get(sessionId) : undefined;
    if (!transport && !sessionId && isInitializeRequest(body)) {
      transport = new StreamableHTTPServerTransport({
        sessionIdGenerator: () => randomUUID(),
        onsessioninitialized: (id) => transports.set(id, transport),
      });
      transport.onclose = () => transport.sessionId && transports.delete(transport.sessionId);
      await newServer().connect(transport);
    }
    if (!transport) {
      res.writeHead(sessionId ? 404 : 400, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ jsonrpc: '2.0', id: null, error: { code: -32000, message: 'No valid session' } }));
      return;
    }
    await transport.handleRequest(req, res, body);
    return;
  }
  const transport = sessionId && transports.get(sessionId);
  if (!transport) {
    res.writeHead(400).end('No valid session');
    return;
  }
  await transport.handleRequest(req, res);
}

// The deprecated HTTP+SSE transport's sessions, by id.
const sseTransports = new Map();

function handleLegacySse(req, res, url) {
  if (url.pathname === '/sse' && req.method === 'GET') {
    const transport = new SSEServerTransport('/messages', res);
    sseTransports.set(transport.sessionId, transport);
    res.on('close', () => sseTransports.delete(transport.sessionId));
    return newServer().connect(transport);
  }
  const transport = sseTransports.get(url.searchParams.get('sessionId'));
  if (!transport) {
    res.writeHead(400).end('No valid session');
    return Promise.resolve();
  }
  if (!binding) return transport.handlePostMessage(req, res);
  return (async () => {
    const message = await readMessage(req, res);
    if (!message) return;
    const { raw, body } = message;
    if (await bindingAllows(req, res, raw, body)) await transport.handlePostMessage(req, res, body);
  })();
}

const httpServer = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://x');
  const path = url.pathname;
  if (path === '/sse' || path === '/messages') {
    handleLegacySse(req, res, url).catch((error) => {
      console.error(error);
      if (!res.headersSent) res.writeHead(500).end();
    });
    return;
  }
  if (path === '/control/calls' && req.method === 'GET') {
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify(calls));
    return;
  }
  if (path === '/control/bindings' && req.method === 'GET') {
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify(bindings));
    return;
  }
  if (path === '/control/methods' && req.method === 'GET') {
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify(methods));
    return;
  }
  if (path === '/mcp') {
    methods[req.method] = (methods[req.method] ?? 0) + 1;
    handleMcp(req, res).catch((error) => {
      console.error(error);
      if (!res.headersSent) res.writeHead(500).end();
    });
    return;
  }
  res.writeHead(404).end();
});

httpServer.listen(port, '127.0.0.1', () => {
  const { port } = httpServer.address();
  process.stdout.write(`${JSON.stringify({ url: `http://127.0.0.1:${port}/mcp`, port })}\n`);
});

if (process.env.MCP_IGNORE_STDIN !== '1') {
  process.stdin.on('end', () => process.exit(0));
  process.stdin.on('close', () => process.exit(0));
  process.stdin.resume();
}
for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => process.exit(0));
