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
const jwks = issuer
  ? createRemoteJWKSet(new URL(process.env.MCP_JWKS_URI ?? `${issuer}/.well-known/jwks.json`))
  : null;

const products = ['XYZ phone', 'ABC laptop', 'Cable'];
const calls = [];
// HTTP requests on /mcp by method, to show what passed through a gateway.
const methods = {};

async function verify(authorization) {
  const token = /^Bearer (.+)$/i.exec(authorization ?? '')?.[1];
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

async function readJson(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  const text = Buffer.concat(chunks).toString('utf8');
  return text ? JSON.parse(text) : undefined;
}

async function handleMcp(req, res) {
  const sessionId = req.headers['mcp-session-id'];
  if (req.method === 'POST') {
    let body;
    try {
      body = await readJson(req);
    } catch {
      res.writeHead(400, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ jsonrpc: '2.0', id: null, error: { code: -32700, message: 'Parse error' } }));
      return;
    }
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
  return transport.handlePostMessage(req, res);
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
