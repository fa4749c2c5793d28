// End to end, for Express and Fastify alike: real tokens from the real authorization
// server (tests/peer, oidc-provider), real servers on ephemeral ports, real HTTP requests.
// Each case asserts what an API owner sees: status, problem code and field,
// WWW-Authenticate, and whether the handler ran.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';

import {
  AUDIENCE,
  callEntry,
  claimsOf,
  dpopProof,
  frameworkWorld,
  frameworks,
  send,
} from './helpers.mjs';

const BODY = JSON.stringify({ product: 'XYZ phone', qty: 2 });
const JSON_TYPE = { 'content-type': 'application/json' };
const BEARER_401 = 'Bearer error="invalid_token"';
const DPOP_401 = 'DPoP error="invalid_dpop_proof"';

const world = frameworkWorld({
  build: async (start, { peer, local, key, otherKey, want }) => {
    const options = { issuer: peer.issuer, audience: AUDIENCE, jwksUri: peer.jwksUri, requiredScopes: ['product:buy'] };
    const s = {
      key,
      otherKey,
      main: await start(options),
      wrongIssuer: await start({ ...options, issuer: `${peer.issuer}/other` }),
      wrongAudience: await start({ ...options, audience: 'https://other.example/api' }),
      requireDpop: await start({ ...options, requireDpop: true }),
      local: await start({ ...options, issuer: local.issuer, jwksUri: local.jwksUri }),
      small: await start({ ...options, maxBodyBytes: 64 }),
    };
    const host = `127.0.0.1:${s.main.port}`;
    s.entries = {
      main: callEntry({ target: '/shop?ref=agent', host, body: BODY }),
      raw: callEntry({ method: 'PUT', target: '/shop/%7Eitem?q=a%20b&to=%2Fx', host: `localhost:${s.main.port}`, body: BODY }),
      get: callEntry({ method: 'GET', target: '/items', host }),
      text: callEntry({ target: '/notes', host, body: 'plain words' }),
      badJson: callEntry({ target: '/shop', host, body: '{"qty":' }),
      v2: callEntry({ target: '/shop', host, body: BODY, version: '2' }),
      dpop: callEntry({ target: '/orders?n=1', host, body: BODY }),
      dpopRequired: callEntry({ target: '/orders', host: `127.0.0.1:${s.requireDpop.port}`, body: BODY }),
    };
    const e = s.entries;
    s.t = {
      main: want({ details: [e.main] }),
      raw: want({ details: [e.raw] }),
      get: want({ details: [{ type: 'product_purchase', item: 'phone' }, e.get] }),
      text: want({ details: [e.text] }),
      badJson: want({ details: [e.badJson] }),
      v2: want({ details: [e.v2] }),
      none: want({}),
      productOnly: want({ details: [{ type: 'product_purchase', item: 'phone' }] }),
      two: want({ details: [e.main, { ...e.main, approval: `${e.main.approval}-2` }] }),
      readOnly: want({ scope: 'openid product:buy product:read', approveScope: 'product:read', details: [e.main] }),
      dpop: want({ details: [e.dpop], dpopKey: key }),
      dpopRequired: want({ details: [e.dpopRequired], dpopKey: key }),
    };
    return s;
  },
});
const { setups } = world;

/** Sends the request and asserts a refusal that never reached the handler. */
async function refused(server, request, { status, code, field, www }) {
  const before = server.calls.length;
  const res = await send({ port: server.port, ...request });
  assert.equal(res.status, status, `status (${res.text})`);
  assert.match(res.headers['content-type'], /^application\/problem\+json/);
  assert.equal(res.json.type, `urn:countersign:problem:${code}`);
  assert.equal(res.json.code, code);
  assert.equal(res.json.status, status);
  assert.equal(typeof res.json.title, 'string');
  assert.equal(typeof res.json.detail, 'string');
  assert.equal(res.json.field, field);
  assert.equal(res.headers['www-authenticate'], www);
  assert.equal(server.calls.length, before, 'the handler must not run');
  return res;
}

/** Sends the request and asserts the handler ran with the verified call. */
async function accepted(server, request, { approval, subject = 'alice' }) {
  const before = server.calls.length;
  const res = await send({ port: server.port, ...request });
  assert.equal(res.status, 200, res.text);
  assert.equal(server.calls.length, before + 1, 'the handler runs once');
  const call = server.calls.at(-1);
  assert.equal(call.subject, subject);
  assert.equal(call.approval, approval);
  return { res, call };
}

for (const name of Object.keys(frameworks)) {
  describe(name, () => {
    const s = () => setups[name];
    const bearer = (token, extra = {}) => ({ authorization: `Bearer ${token}`, ...JSON_TYPE, ...extra });

    it('refuses the approved token replayed with another body, target, method or host, accepts the approved call once', async (t) => {
      const { main } = s();
      const token = s().t.main;
      const call = { path: '/shop?ref=agent', headers: bearer(token), body: BODY };
      const cases = [
        ['another body', { ...call, body: BODY.replace('2', '20') }, 'body'],
        ['an empty body', { ...call, body: undefined }, 'body'],
        ['another query', { ...call, path: '/shop?ref=agent&qty=20' }, 'target'],
        ['no query', { ...call, path: '/shop' }, 'target'],
        ['another path', { ...call, path: '/admin?ref=agent' }, 'target'],
        ['another method', { ...call, method: 'PUT' }, 'method'],
        ['another host', { ...call, headers: bearer(token, { host: `localhost:${main.port}` }) }, 'host'],
      ];
      for (const [label, request, field] of cases) {
        await t.test(label, () => refused(main, request, { status: 403, code: 'binding_mismatch', field }));
      }
      const { call: seen } = await accepted(main, call, { approval: s().entries.main.approval });
      assert.deepEqual(seen.body, JSON.parse(BODY), 'a JSON handler gets the parsed body');
      assert.equal(seen.rawLength, Buffer.byteLength(BODY));
      assert.equal(seen.scope, 'product:buy');
      await refused(main, call, { status: 403, code: 'approval_replayed' });
    });

    it('compares the raw request-target byte for byte and the host case-insensitively', async () => {
      const { main } = s();
      const headers = bearer(s().t.raw, { host: `LocalHost:${main.port}` });
      const call = { method: 'PUT', path: '/shop/%7Eitem?q=a%20b&to=%2Fx', headers, body: BODY };
      await refused(main, { ...call, path: '/shop/~item?q=a%20b&to=%2Fx' }, { status: 403, code: 'binding_mismatch', field: 'target' });
      await refused(main, { ...call, path: '/shop/%7eitem?q=a%20b&to=%2Fx' }, { status: 403, code: 'binding_mismatch', field: 'target' });
      await refused(main, { ...call, path: '/shop/%7Eitem?q=a+b&to=/x' }, { status: 403, code: 'binding_mismatch', field: 'target' });
      await accepted(main, call, { approval: s().entries.raw.approval });
    });

    it('accepts a GET without a body (digest of zero bytes) next to other authorization details', async () => {
      const { main } = s();
      const { call } = await accepted(main, { method: 'GET', path: '/items', headers: { authorization: `Bearer ${s().t.get}` } }, {
        approval: s().entries.get.approval,
      });
      assert.equal(call.rawLength, 0);
    });

    it('hands a non-JSON body over raw (and as the framework parses it)', async () => {
      const { main } = s();
      const headers = { authorization: `Bearer ${s().t.text}`, 'content-type': 'text/plain' };
      const { call } = await accepted(main, { path: '/notes', headers, body: 'plain words' }, { approval: s().entries.text.approval });
      assert.equal(call.rawLength, 11);
      if (name === 'fastify') assert.equal(call.body, 'plain words');
      else assert.equal(call.body, undefined);
    });

    it('answers 400 for a bound body that is not valid JSON, without running the handler', async () => {
      const { main } = s();
      const before = main.calls.length;
      const res = await send({ port: main.port, path: '/shop', headers: bearer(s().t.badJson), body: '{"qty":' });
      assert.equal(res.status, 400);
      assert.equal(main.calls.length, before);
    });

    it('refuses a body over maxBodyBytes with 413 body_too_large before the handler', async () => {
      const { small } = s();
      const res = await refused(small, { path: '/shop', headers: bearer(s().t.main), body: 'x'.repeat(65) }, {
        status: 413,
        code: 'body_too_large',
      });
      assert.equal(res.json.title, 'Request body too large');
    });

    it('refuses a request without exactly one Bearer or DPoP token: token_missing', async (t) => {
      const { main } = s();
      const token = s().t.main;
      const cases = [
        ['no Authorization', {}],
        ['Basic credentials', { authorization: 'Basic YWxpY2U6c2VjcmV0' }],
        ['an empty Bearer', { authorization: 'Bearer ' }],
        ['two Authorization headers', { authorization: [`Bearer ${token}`, `Bearer ${token}`] }],
      ];
      for (const [label, headers] of cases) {
        await t.test(label, () =>
          refused(main, { path: '/shop?ref=agent', headers: { ...JSON_TYPE, ...headers }, body: BODY }, {
            status: 401,
            code: 'token_missing',
            www: BEARER_401,
          }),
        );
      }
    });

    it('refuses a token with a bad signature, another issuer or audience, or not a JWT: token_invalid', async (t) => {
      const { main, wrongIssuer, wrongAudience } = s();
      const token = s().t.main;
      const [h, p, sig] = token.split('.');
      const claims = claimsOf(token);
      const tampered = `${h}.${Buffer.from(JSON.stringify({ ...claims, scope: 'product:buy product:admin' })).toString('base64url')}.${sig}`;
      const forged = await world.local.forge(claims);
      const unsigned = `${Buffer.from('{"alg":"none","typ":"at+jwt"}').toString('base64url')}.${p}.`;
      const request = (tok) => ({ path: '/shop?ref=agent', headers: bearer(tok), body: BODY });
      const cases = [
        ['a tampered payload', main, tampered],
        ['a signature by another key (same kid)', main, forged],
        ['alg none', main, unsigned],
        ['not a JWT', main, 'abc.def.ghi'],
        ['another issuer', wrongIssuer, token],
        ['another audience', wrongAudience, token],
      ];
      for (const [label, server, tok] of cases) {
        await t.test(label, () => refused(server, request(tok), { status: 401, code: 'token_invalid', www: BEARER_401 }));
      }
    });

    it('checks exp with 30 s of leeway and nbf (tokens from a local test issuer)', async (t) => {
      const { local: server } = s();
      const now = Math.floor(Date.now() / 1000);
      const host = `127.0.0.1:${server.port}`;
      const call = (token) => ({ path: '/shop', headers: bearer(token), body: BODY });
      const signed = (claims) => {
        const entry = callEntry({ target: '/shop', host, body: BODY });
        return { entry, token: world.local.sign({ authorization_details: [entry], ...claims }) };
      };
      for (const [label, claims] of [
        ['expired 2 minutes ago', { exp: now - 120 }],
        ['valid from 2 minutes on', { nbf: now + 120 }],
        ['without exp', { exp: undefined }],
      ]) {
        const { token } = signed(claims);
        await t.test(label, async () => refused(server, call(await token), { status: 401, code: 'token_invalid', www: BEARER_401 }));
      }
      for (const claims of [{}, { exp: now - 10 }]) {
        const { entry, token } = signed(claims);
        const { call: seen } = await accepted(server, call(await token), { approval: entry.approval, subject: 'bob' });
        assert.equal(seen.approval, entry.approval);
      }
    });

    it('settled details: a string sub is required; an entry without a string approval is binding_missing, another field missing is binding_mismatch', async (t) => {
      const { local: server } = s();
      const host = `127.0.0.1:${server.port}`;
      const call = (token) => ({ path: '/shop', headers: bearer(token), body: BODY });
      const entry = (edit = {}) => {
        const e = { ...callEntry({ target: '/shop', host, body: BODY }), ...edit };
        for (const [k, v] of Object.entries(e)) if (v === undefined) delete e[k];
        return e;
      };
      const cases = [
        ['without sub', { sub: undefined }, { status: 401, code: 'token_invalid', www: BEARER_401 }],
        ['sub a number', { sub: 42 }, { status: 401, code: 'token_invalid', www: BEARER_401 }],
        ['entry without approval', { authorization_details: [entry({ approval: undefined })] }, { status: 403, code: 'binding_missing' }],
        ['approval a number', { authorization_details: [entry({ approval: 7 })] }, { status: 403, code: 'binding_missing' }],
        ['version 2 and no approval', { authorization_details: [entry({ version: '2', approval: undefined })] }, { status: 403, code: 'binding_missing' }],
        ['entry without method', { authorization_details: [entry({ method: undefined })] }, { status: 403, code: 'binding_mismatch', field: 'method' }],
        ['version a number', { authorization_details: [entry({ version: 1 })] }, { status: 403, code: 'binding_mismatch', field: 'version' }],
      ];
      for (const [label, claims, expected] of cases) {
        await t.test(label, async () => {
          const res = await refused(server, call(await world.local.sign({ authorization_details: [entry()], ...claims })), expected);
          assert.equal(res.json.title, expected.status === 401 ? 'Access token invalid' : expected.code === 'binding_missing' ? 'Call binding missing' : 'Call binding mismatch');
        });
      }
    });

    it('refuses a token without the required scope: insufficient_scope', async () => {
      assert.equal(claimsOf(s().t.readOnly).scope, 'product:read');
      await refused(s().main, { path: '/shop?ref=agent', headers: bearer(s().t.readOnly), body: BODY }, {
        status: 403,
        code: 'insufficient_scope',
      });
    });

    it('refuses a token without exactly one countersign_call entry: binding_missing; another version: binding_mismatch', async (t) => {
      const { main } = s();
      const request = (tok) => ({ path: '/shop?ref=agent', headers: bearer(tok), body: BODY });
      for (const [label, tok] of [
        ['no authorization_details', s().t.none],
        ['only a product_purchase entry', s().t.productOnly],
        ['two countersign_call entries', s().t.two],
      ]) {
        await t.test(label, () => refused(main, request(tok), { status: 403, code: 'binding_missing' }));
      }
      await refused(main, { path: '/shop', headers: bearer(s().t.v2), body: BODY }, {
        status: 403,
        code: 'binding_mismatch',
        field: 'version',
      });
    });

    it('DPoP: accepts the bound token with a fresh proof; refuses a missing, foreign, forged or replayed proof', async (t) => {
      const { main, key, otherKey } = s();
      const token = s().t.dpop;
      assert.equal(claimsOf(token).cnf.jkt, key.jkt);
      const htu = `http://127.0.0.1:${main.port}/orders`;
      const proof = (options = {}) => dpopProof({ key, htm: 'POST', htu, token, ...options });
      const call = async (headers) => ({ path: '/orders?n=1', headers: { ...JSON_TYPE, ...headers }, body: BODY });
      const dpop = async (p) => call({ authorization: `DPoP ${token}`, dpop: await p });
      const missing = { status: 401, code: 'dpop_proof_missing', www: DPOP_401 };
      const invalid = (field) => ({ status: 401, code: 'dpop_proof_invalid', field, www: DPOP_401 });
      const cases = [
        ['DPoP scheme without a proof', call({ authorization: `DPoP ${token}` }), missing],
        ['sent as Bearer with a proof', call({ authorization: `Bearer ${token}`, dpop: await proof() }), missing],
        ['sent as Bearer without a proof', call({ authorization: `Bearer ${token}` }), missing],
        ['two DPoP headers', call({ authorization: `DPoP ${token}`, dpop: [await proof(), await proof()] }), missing],
        ['a proof that is not a JWT', dpop('not-a-proof'), invalid('proof')],
        ['a proof with typ JWT', dpop(proof({ header: { typ: 'JWT' } })), invalid('proof')],
        ['a proof whose jwk did not sign it', dpop(proof({ signWith: otherKey.privateKey })), invalid('proof')],
        ['a proof for another method', dpop(proof({ htm: 'GET' })), invalid('htm')],
        ['a proof for another path', dpop(proof({ htu: `http://127.0.0.1:${main.port}/admin` })), invalid('htu')],
        ['a proof for another host', dpop(proof({ htu: `http://localhost:${main.port}/orders` })), invalid('htu')],
        ['a proof made 5 minutes ago', dpop(proof({ claims: { iat: Math.floor(Date.now() / 1000) - 300 } })), invalid('iat')],
        ['a proof for another token', dpop(proof({ token: s().t.main })), invalid('ath')],
        ['a proof without ath', dpop(proof({ token: undefined })), invalid('ath')],
        ['a proof by another key', dpop(dpopProof({ key: otherKey, htm: 'POST', htu, token })), invalid('key')],
      ];
      for (const [label, request, expected] of cases) {
        await t.test(label, async () => refused(main, await request, expected));
      }
      // DPoP passes, then the binding is checked as for Bearer tokens
      const wrongBody = { ...(await dpop(proof())), body: '{}' };
      await refused(main, wrongBody, { status: 403, code: 'binding_mismatch', field: 'body' });

      // the query is not part of htu; scheme and host compare case-insensitively
      const good = await dpop(proof({ htu: `HTTP://127.0.0.1:${main.port}/orders?ignored=1` }));
      await accepted(main, good, { approval: s().entries.dpop.approval });
      await refused(main, good, { status: 401, code: 'dpop_proof_replayed', www: DPOP_401 });
      await refused(main, await dpop(proof()), { status: 403, code: 'approval_replayed' });
    });

    it('DPoP required: refuses a token that is not key-bound, accepts a bound one', async () => {
      const { requireDpop, key } = s();
      await refused(requireDpop, { path: '/orders', headers: bearer(s().t.none), body: BODY }, {
        status: 401,
        code: 'dpop_proof_missing',
        www: DPOP_401,
      });
      await refused(requireDpop, { path: '/orders', headers: { ...JSON_TYPE }, body: BODY }, {
        status: 401,
        code: 'token_missing',
        www: 'DPoP error="invalid_token"',
      });
      const token = s().t.dpopRequired;
      const proof = await dpopProof({ key, htm: 'POST', htu: `http://127.0.0.1:${requireDpop.port}/orders`, token });
      await accepted(requireDpop, { path: '/orders', headers: { ...JSON_TYPE, authorization: `DPoP ${token}`, dpop: proof }, body: BODY }, {
        approval: s().entries.dpopRequired.approval,
      });
    });
  });
}
