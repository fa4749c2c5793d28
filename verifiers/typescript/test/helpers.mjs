// Test support: the real authorization server (tests/peer/server.mjs, oidc-provider),
// real CIBA flows for tokens, DPoP proofs, raw HTTP requests, and the Express and
// Fastify servers under test. Tokens and bodies are never printed.

import { spawn } from 'node:child_process';
import { createHash, randomUUID } from 'node:crypto';
import http from 'node:http';
import { once } from 'node:events';
import { fileURLToPath } from 'node:url';
import { createInterface } from 'node:readline';
import { after, before } from 'node:test';

import { SignJWT, calculateJwkThumbprint, exportJWK, generateKeyPair } from 'jose';
import express from 'express';
import Fastify from 'fastify';

import { countersign as countersignExpress } from '../src/express.js';
import { countersign as countersignFastify } from '../src/fastify.js';

export const AUDIENCE = 'https://shop.example/api';
const PEER = fileURLToPath(new URL('../../../tests/peer/server.mjs', import.meta.url));

export const sha256 = (bytes) => createHash('sha256').update(bytes).digest('base64url');
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Starts the peer; resolves {issuer, jwksUri, tokenEndpoint, stop}. */
export async function startPeer() {
  const child = spawn(process.execPath, [PEER], {
    env: { ...process.env, PEER_PORT: '0' },
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  let stderr = '';
  child.stderr.on('data', (chunk) => {
    stderr = (stderr + chunk).slice(-4000);
  });
  const lines = createInterface({ input: child.stdout });
  let timer;
  const first = await Promise.race([
    once(lines, 'line').then(([line]) => line),
    once(child, 'exit').then(() => {
      throw new Error(`peer exited before listening: ${stderr}`);
    }),
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`peer did not start in 20 s: ${stderr}`)), 20000);
    }),
  ]).finally(() => clearTimeout(timer));
  const { issuer } = JSON.parse(first);
  const discovery = await (await fetch(`${issuer}/.well-known/openid-configuration`)).json();
  return {
    issuer,
    jwksUri: discovery.jwks_uri,
    tokenEndpoint: discovery.token_endpoint,
    backchannelEndpoint: discovery.backchannel_authentication_endpoint,
    async stop() {
      child.stdin.end();
      child.kill('SIGTERM');
      if (child.exitCode === null) await once(child, 'exit');
    },
  };
}

/** A countersign_call entry for a request (fields overridable). */
export function callEntry({ method = 'POST', target, host, body = '', ...rest }) {
  return {
    type: 'countersign_call',
    version: '1',
    approval: randomUUID(),
    method,
    target,
    host,
    body_sha256: sha256(Buffer.from(body)),
    ...rest,
  };
}

const form = (fields) => new URLSearchParams(fields).toString();
const CLIENT = { client_id: 'countersign-post', client_secret: 'countersign-secret' };

/**
 * Gets real tokens from the peer, all flows at once (each must wait the 1 s interval).
 * spec: {details?: array, scope?: string, approveScope?: string, dpopKey?: {privateKey, publicJwk},
 *        user?: 'alice' | 'bob' | 'carol' (who is asked; default alice)}
 * Resolves the access tokens (strings), in order.
 */
export async function issueTokens(peer, specs) {
  return Promise.all(
    specs.map(async (spec) => {
      const fields = {
        ...CLIENT,
        scope: spec.scope ?? 'openid product:buy',
        login_hint: spec.user ?? 'alice',
        binding_message: 'Buy 2 phones',
        resource: AUDIENCE,
      };
      if (spec.details) fields.authorization_details = JSON.stringify(spec.details);
      const asked = await fetch(peer.backchannelEndpoint, {
        method: 'POST',
        headers: { 'content-type': 'application/x-www-form-urlencoded' },
        body: form(fields),
      });
      const { auth_req_id: id, interval } = await asked.json();
      // the peer times the interval from its own record of the request, made before it answered
      const started = Date.now();
      if (!id) throw new Error(`bc-authorize refused (${asked.status})`);
      const approved = await fetch(`${peer.issuer}/control/requests/${id}/approve`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: spec.approveScope ? JSON.stringify({ scope: spec.approveScope }) : '{}',
      });
      if (approved.status !== 200) throw new Error(`approve failed (${approved.status})`);
      await sleep(Math.max(0, started + interval * 1000 + 100 - Date.now()));
      const headers = { 'content-type': 'application/x-www-form-urlencoded' };
      if (spec.dpopKey) {
        headers.dpop = await dpopProof({ key: spec.dpopKey, htm: 'POST', htu: peer.tokenEndpoint });
      }
      const answer = await fetch(peer.tokenEndpoint, {
        method: 'POST',
        headers,
        body: form({ ...CLIENT, grant_type: 'urn:openid:params:grant-type:ciba', auth_req_id: id }),
      });
      const json = await answer.json();
      if (!json.access_token) throw new Error(`token request failed: ${answer.status} ${json.error}`);
      if (spec.dpopKey && json.token_type !== 'DPoP') throw new Error('token is not DPoP-bound');
      return json.access_token;
    }),
  );
}

/**
 * The tokens of several setups, issued at once: `want(spec)` records a spec (see issueTokens) and
 * stands for its token in a setup's `t`; `issue(peer, setups)` then puts the tokens themselves there.
 */
export function tokenPlan() {
  const specs = [];
  return {
    want: (spec) => specs.push(spec) - 1,
    async issue(peer, setups) {
      const tokens = await issueTokens(peer, specs);
      for (const s of Object.values(setups)) {
        for (const [k, index] of Object.entries(s.t)) s.t[k] = tokens[index];
      }
    },
  };
}

/**
 * The world the end-to-end files share, started before their tests: the peer, a local issuer
 * (`localIssuer(peer)` gives its options), two DPoP keys, and a setup per framework, which
 * `build(start, { peer, local, key, otherKey, want })` returns (its servers, `entries`, and in `t`
 * the tokens it `want`s, issued by the peer once all setups are built). After the tests every
 * server of a setup, the local issuer and the peer stop. The returned object holds `peer`,
 * `local` and `setups` (by framework name) once the tests run.
 */
export function frameworkWorld({ localIssuer = async () => ({}), build }) {
  const world = { setups: {} };
  before(async () => {
    world.peer = await startPeer();
    world.local = await startLocalIssuer(await localIssuer(world.peer));
    const key = await dpopKeyPair();
    const otherKey = await dpopKeyPair();
    const tokens = tokenPlan();
    const context = { peer: world.peer, local: world.local, key, otherKey, want: tokens.want };
    for (const [name, start] of Object.entries(frameworks)) world.setups[name] = await build(start, context);
    await tokens.issue(world.peer, world.setups);
  });
  after(async () => {
    for (const s of Object.values(world.setups)) {
      for (const server of Object.values(s)) if (server?.port && server.close) await server.close();
    }
    await world.local?.close();
    await world.peer?.stop();
  });
  return world;
}

/** A P-256 key for DPoP: {privateKey, publicJwk, jkt}. */
export async function dpopKeyPair() {
  const { privateKey, publicKey } = await generateKeyPair('ES256', { extractable: true });
  const publicJwk = await exportJWK(publicKey);
  return { privateKey, publicJwk, jkt: await calculateJwkThumbprint(publicJwk) };
}

/**
 * A DPoP proof. `token` adds ath; `claims` overrides/adds claims (undefined removes one);
 * `header` overrides header members; `signWith` signs with another private key.
 */
export async function dpopProof({ key, htm, htu, token, claims = {}, header = {}, signWith }) {
  const payload = { htm, htu, iat: Math.floor(Date.now() / 1000), jti: randomUUID() };
  if (token) payload.ath = sha256(Buffer.from(token, 'ascii'));
  Object.assign(payload, claims);
  for (const [k, v] of Object.entries(payload)) if (v === undefined) delete payload[k];
  const protectedHeader = { typ: 'dpop+jwt', alg: 'ES256', jwk: key.publicJwk, ...header };
  return new SignJWT(payload).setProtectedHeader(protectedHeader).sign(signWith ?? key.privateKey);
}

/**
 * A raw HTTP request: `path` goes on the wire as given. headers may hold arrays (repeated fields).
 * Resolves {status, headers, text, json}.
 */
export function send({ port, method = 'POST', path, headers = {}, body }) {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port, method, path, headers, agent: false }, (res) => {
      const chunks = [];
      res.on('data', (chunk) => chunks.push(chunk));
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString('utf8');
        let json;
        try {
          json = JSON.parse(text);
        } catch {}
        resolve({ status: res.statusCode, headers: res.headers, text, json });
      });
    });
    req.on('error', reject);
    if (body !== undefined) req.end(body);
    else req.end();
  });
}

function record(calls, countersign, rawBody, body) {
  calls.push({
    subject: countersign?.subject,
    approval: countersign?.approval,
    countersigners: countersign?.countersigners,
    scope: countersign?.claims?.scope,
    rawLength: rawBody?.length,
    body,
  });
  return { ok: true, subject: countersign?.subject, approval: countersign?.approval, body: body ?? null };
}

async function listen(server) {
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return server.address().port;
}

/** An Express app: the middleware, then express.json() (must be skipped) and a catch-all handler. */
export async function startExpress(options) {
  const calls = [];
  const app = express();
  app.set('env', 'test');
  app.use(countersignExpress(options));
  app.use(express.json());
  app.use((req, res) => {
    res.json(record(calls, req.countersign, req.rawBody, req.body));
  });
  const server = http.createServer(app);
  const port = await listen(server);
  return {
    name: 'express',
    port,
    calls,
    close: () => new Promise((resolve) => server.close(resolve)),
  };
}

/** A Fastify app with the plugin registered on the root context and a catch-all route. */
export async function startFastify(options) {
  const calls = [];
  const app = Fastify({ logger: false });
  await app.register(countersignFastify, options);
  app.all('/*', async (request) => record(calls, request.countersign, request.rawBody, request.body));
  await app.listen({ port: 0, host: '127.0.0.1' });
  return {
    name: 'fastify',
    port: app.server.address().port,
    calls,
    close: () => app.close(),
  };
}

export const frameworks = { express: startExpress, fastify: startFastify };

/**
 * A local issuer for tokens the peer cannot make (expired, not yet valid, no exp):
 * a test RSA key whose public JWKS a local server serves. sign(claims) makes an at+jwt.
 * With `issuer` and `alsoTrust` (the peer's issuer and keys) it signs in the peer's name,
 * and its JWKS lists the peer's keys too, so real and crafted tokens verify side by side.
 */
export async function startLocalIssuer({ issuer = 'https://issuer.test.example', alsoTrust = [] } = {}) {
  const { privateKey, publicKey } = await generateKeyPair('RS256', { extractable: true });
  const jwk = { ...(await exportJWK(publicKey)), kid: 'local-test-key', alg: 'RS256', use: 'sig' };
  const server = http.createServer((req, res) => {
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ keys: [...alsoTrust, jwk] }));
  });
  const port = await listen(server);
  return {
    issuer,
    jwksUri: `http://127.0.0.1:${port}/jwks.json`,
    sign(claims) {
      const now = Math.floor(Date.now() / 1000);
      const payload = { iss: issuer, aud: AUDIENCE, sub: 'bob', scope: 'product:buy', iat: now, exp: now + 300, ...claims };
      for (const [k, v] of Object.entries(payload)) if (v === undefined) delete payload[k];
      return new SignJWT(payload).setProtectedHeader({ alg: 'RS256', typ: 'at+jwt', kid: 'local-test-key' }).sign(privateKey);
    },
    /** Signed by a key that is not in any JWKS, with the peer's kid. */
    async forge(claims) {
      const other = await generateKeyPair('RS256');
      return new SignJWT(claims).setProtectedHeader({ alg: 'RS256', typ: 'at+jwt', kid: 'peer-test-key' }).sign(other.privateKey);
    },
    close: () => new Promise((resolve) => server.close(resolve)),
  };
}

/** The claims of a JWT, without verifying it (tests only). */
export function claimsOf(token) {
  return JSON.parse(Buffer.from(token.split('.')[1], 'base64url').toString('utf8'));
}
