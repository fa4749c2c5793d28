// The core verifier without a web framework: options, the input shapes it accepts,
// the configured host and external URL (behind another proxy), the problem's exact shape.
// Tokens are real ones from the peer.

import assert from 'node:assert/strict';
import http from 'node:http';
import { once } from 'node:events';
import { after, before, describe, it } from 'node:test';

import { CODES, EMPTY_BODY_SHA256, createVerifier, refusal } from '../src/index.js';
import { ReplayCache } from '../src/replay.js';
import { AUDIENCE, callEntry, dpopKeyPair, dpopProof, issueTokens, sha256, startPeer } from './helpers.mjs';

const BODY = Buffer.from('{"qty":2}');
let peer;
let options;
let key;
const entries = {};
const tokens = {};

before(async () => {
  peer = await startPeer();
  options = { issuer: peer.issuer, audience: AUDIENCE, jwksUri: peer.jwksUri, requiredScopes: ['product:buy'] };
  key = await dpopKeyPair();
  entries.behindProxy = callEntry({ target: '/v1/shop?x=1', host: 'shop.internal', body: BODY });
  entries.htu = callEntry({ target: '/orders?n=1', host: 'api.example', body: BODY });
  entries.external = callEntry({ target: '/orders', host: 'api.internal:8080', body: BODY });
  entries.unbound = callEntry({ target: '/orders', host: 'api.example', body: BODY });
  const [behindProxy, htu, external, unbound] = await issueTokens(peer, [
    { details: [entries.behindProxy] },
    { details: [entries.htu], dpopKey: key },
    { details: [entries.external], dpopKey: key },
    { details: [entries.unbound] },
  ]);
  Object.assign(tokens, { behindProxy, htu, external, unbound });
});

after(async () => {
  await peer?.stop();
});

describe('core', () => {
  it('names the empty-body digest of the contract', () => {
    assert.equal(EMPTY_BODY_SHA256, '47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU');
    assert.equal(sha256(Buffer.alloc(0)), EMPTY_BODY_SHA256);
  });

  it('has the contract\'s codes and statuses', () => {
    assert.deepEqual({ ...CODES }, {
      token_missing: 401,
      token_invalid: 401,
      insufficient_scope: 403,
      dpop_proof_missing: 401,
      dpop_proof_invalid: 401,
      dpop_proof_replayed: 401,
      binding_missing: 403,
      binding_mismatch: 403,
      approval_replayed: 403,
      countersign_missing: 403,
      countersign_invalid: 403,
      countersign_insufficient: 403,
      body_too_large: 413,
    });
  });

  it('uses exactly the contract\'s title for each code', () => {
    const titles = {
      token_missing: 'Access token missing',
      token_invalid: 'Access token invalid',
      insufficient_scope: 'Insufficient scope',
      dpop_proof_missing: 'DPoP proof missing',
      dpop_proof_invalid: 'DPoP proof invalid',
      dpop_proof_replayed: 'DPoP proof replayed',
      binding_missing: 'Call binding missing',
      binding_mismatch: 'Call binding mismatch',
      approval_replayed: 'Approval replayed',
      countersign_missing: 'Countersignatures missing',
      countersign_invalid: 'Countersignature invalid',
      countersign_insufficient: 'Too few countersigners',
      body_too_large: 'Request body too large',
    };
    assert.deepEqual(Object.keys(CODES).sort(), Object.keys(titles).sort());
    for (const [code, title] of Object.entries(titles)) {
      const { problem } = refusal(code, 'd');
      assert.equal(problem.title, title, code);
      assert.equal(problem.type, `urn:countersign:problem:${code}`);
    }
  });

  it('answers token_invalid, saying so, when the signing keys cannot be fetched', async (t) => {
    // a port where nothing listens, and a JWKS endpoint that answers 500
    const closed = http.createServer();
    closed.listen(0, '127.0.0.1');
    await once(closed, 'listening');
    const deadPort = closed.address().port;
    await new Promise((resolve) => closed.close(resolve));
    const failing = http.createServer((req, res) => {
      res.writeHead(500, { 'content-type': 'text/plain' });
      res.end('down');
    });
    failing.listen(0, '127.0.0.1');
    await once(failing, 'listening');
    t.after(() => new Promise((resolve) => failing.close(resolve)));
    for (const jwksUri of [`http://127.0.0.1:${deadPort}/jwks.json`, `http://127.0.0.1:${failing.address().port}/jwks.json`]) {
      const verifier = createVerifier({ ...options, jwksUri });
      const result = await verifier.verify({
        method: 'POST',
        target: '/orders',
        host: 'api.example',
        headers: { authorization: `Bearer ${tokens.unbound}` },
        body: BODY,
      });
      assert.equal(result.status, 401, jwksUri);
      assert.equal(result.problem.code, 'token_invalid');
      assert.equal(result.problem.title, 'Access token invalid');
      assert.match(result.problem.detail, /keys could not be fetched/);
      assert.equal(result.headers['www-authenticate'], 'Bearer error="invalid_token"');
    }
  });

  it('refuses incomplete options', () => {
    assert.throws(() => createVerifier({}), /issuer/);
    assert.throws(() => createVerifier({ ...options, audience: '' }), /audience/);
    assert.throws(() => createVerifier({ ...options, jwksUri: undefined }), /jwksUri/);
    assert.throws(() => createVerifier({ ...options, requiredScopes: ['a b'] }), /requiredScopes/);
    assert.throws(() => createVerifier({ ...options, externalUrl: 'not a url' }), /externalUrl/);
    assert.throws(() => createVerifier({ ...options, dpopWindowSeconds: 0 }), /dpopWindowSeconds/);
    assert.throws(() => createVerifier({ ...options, requiredCountersigners: -1 }), /requiredCountersigners/);
    assert.throws(() => createVerifier({ ...options, requiredCountersigners: 1.5 }), /requiredCountersigners/);
  });

  it('answers a problem of exactly the contract\'s shape', async () => {
    const verifier = createVerifier(options);
    const result = await verifier.verify({ method: 'GET', target: '/', host: 'x', headers: {}, body: new Uint8Array() });
    assert.deepEqual(result, {
      ok: false,
      status: 401,
      problem: {
        type: 'urn:countersign:problem:token_missing',
        title: 'Access token missing',
        status: 401,
        code: 'token_missing',
        detail: 'The request has no Authorization header.',
      },
      headers: { 'content-type': 'application/problem+json', 'www-authenticate': 'Bearer error="invalid_token"' },
    });
  });

  it('checks the configured host instead of the Host header (behind another proxy), and takes WHATWG Headers', async () => {
    const request = (host) => ({
      method: 'POST',
      target: '/v1/shop?x=1',
      headers: new Headers({ authorization: `Bearer ${tokens.behindProxy}`, host }),
      body: new Uint8Array(BODY),
    });
    const plain = createVerifier(options);
    const refused = await plain.verify(request('127.0.0.1:9999'));
    assert.equal(refused.problem.field, 'host');
    const configured = createVerifier({ ...options, host: 'SHOP.internal' });
    const result = await configured.verify(request('127.0.0.1:9999'));
    assert.equal(result.ok, true, JSON.stringify(result.problem));
    assert.equal(result.subject, 'alice');
    assert.equal(result.approval, entries.behindProxy.approval);
    assert.deepEqual(result.binding, entries.behindProxy);
    assert.equal(result.claims.aud, AUDIENCE);
    // the approval is remembered per verifier
    assert.equal((await configured.verify(request('x'))).problem.code, 'approval_replayed');
  });

  it('DPoP: htu ignores query and fragment, compares scheme and host case-insensitively, drops the default port', async () => {
    const verifier = createVerifier(options);
    const request = async (htu) => ({
      method: 'POST',
      target: '/orders?n=1',
      host: 'api.example',
      url: 'http://api.example/orders?n=1',
      headers: { authorization: `DPoP ${tokens.htu}`, dpop: await dpopProof({ key, htm: 'POST', htu, token: tokens.htu }) },
      body: BODY,
    });
    for (const htu of ['https://api.example/orders', 'http://api.example:8080/orders', 'http://api.example/orders/', 'api.example/orders']) {
      const result = await verifier.verify(await request(htu));
      assert.equal(result.problem?.field, 'htu', htu);
    }
    const result = await verifier.verify(await request('HTTP://API.Example:80/orders#frag'));
    assert.equal(result.ok, true, JSON.stringify(result.problem));
  });

  it('DPoP: htu is the configured external URL followed by the path, behind another proxy', async () => {
    const verifier = createVerifier({ ...options, externalUrl: 'https://api.example.com/shop-api/' });
    const request = async (htu) => ({
      method: 'POST',
      target: '/orders',
      host: 'api.internal:8080',
      url: 'http://api.internal:8080/orders',
      headers: { authorization: `DPoP ${tokens.external}`, dpop: await dpopProof({ key, htm: 'POST', htu, token: tokens.external }) },
      body: BODY,
    });
    assert.equal((await verifier.verify(await request('http://api.internal:8080/orders'))).problem.field, 'htu');
    const result = await verifier.verify(await request('https://api.example.com:443/shop-api/orders'));
    assert.equal(result.ok, true, JSON.stringify(result.problem));
  });

  it('DPoP: the iat window is configurable', async () => {
    const verifier = createVerifier({ ...options, dpopWindowSeconds: 5 });
    const iat = Math.floor(Date.now() / 1000) - 20;
    const result = await verifier.verify({
      method: 'POST',
      target: '/orders?n=1',
      host: 'api.example',
      url: 'http://api.example/orders?n=1',
      headers: {
        authorization: `DPoP ${tokens.htu}`,
        dpop: await dpopProof({ key, htm: 'POST', htu: 'http://api.example/orders', token: tokens.htu, claims: { iat } }),
      },
      body: BODY,
    });
    assert.equal(result.problem.code, 'dpop_proof_invalid');
    assert.equal(result.problem.field, 'iat');
  });

  it('DPoP: a token that is not key-bound, sent with the DPoP scheme and a proof, is refused (key)', async () => {
    const verifier = createVerifier(options);
    const result = await verifier.verify({
      method: 'POST',
      target: '/orders',
      host: 'api.example',
      url: 'http://api.example/orders',
      headers: {
        authorization: `DPoP ${tokens.unbound}`,
        dpop: await dpopProof({ key, htm: 'POST', htu: 'http://api.example/orders', token: tokens.unbound }),
      },
      body: BODY,
    });
    assert.equal(result.status, 401);
    assert.equal(result.problem.code, 'dpop_proof_invalid');
    assert.equal(result.problem.field, 'key');
    assert.equal(result.headers['www-authenticate'], 'DPoP error="invalid_dpop_proof"');
  });

  it('forgets replay entries once they expire', () => {
    const cache = new ReplayCache();
    assert.equal(cache.remember('a', 100, 50), true);
    assert.equal(cache.remember('a', 100, 60), false);
    assert.equal(cache.remember('a', 200, 101), true);
    assert.equal(cache.remember('b', 300, 201), true);
    assert.equal(cache.size, 1, 'the sweep dropped the expired entry');
  });
});
