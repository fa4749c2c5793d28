// Countersigned calls (four eyes, checks C1-C5), for Express and Fastify alike: an API that
// requires countersigners serves a call only when Countersign-Tokens carries valid tokens of
// enough distinct others, for the same call and key; the handler learns who they were. An API
// that requires none ignores the header. Real tokens of alice, bob and carol come from the peer;
// the ones no authorization server issues on demand (expired, another entry, ...) are signed
// by a local key trusted next to the peer's.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';

import {
  AUDIENCE,
  callEntry,
  dpopProof,
  frameworkWorld,
  frameworks,
  send,
  sha256,
} from './helpers.mjs';

const BODY = JSON.stringify({ product: 'XYZ phone', qty: 2 });
const TARGET = '/shop?ref=agent';
const JSON_TYPE = { 'content-type': 'application/json' };

const world = frameworkWorld({
  // Signs in the peer's name, and its JWKS lists the peer's keys too.
  localIssuer: async (peer) => {
    const { keys: peerKeys } = await (await fetch(peer.jwksUri)).json();
    return { issuer: peer.issuer, alsoTrust: peerKeys };
  },
  build: async (start, { peer, local, key, otherKey, want }) => {
    const options = { issuer: peer.issuer, audience: AUDIENCE, jwksUri: local.jwksUri, requiredScopes: ['product:buy'] };
    const s = {
      key,
      api: await start({ ...options, requiredCountersigners: 2 }),
      lenient: await start(options),
    };
    const entry = (server) => callEntry({ target: TARGET, host: `127.0.0.1:${server.port}`, body: BODY });
    s.entries = { main: entry(s.api), dpop: entry(s.api), lenient: entry(s.lenient) };
    const { main, dpop, lenient } = s.entries;
    s.t = {
      alice: want({ details: [main] }),
      bob: want({ details: [main], user: 'bob' }),
      carol: want({ details: [main], user: 'carol' }),
      aliceDpop: want({ details: [dpop], dpopKey: key }),
      bobDpop: want({ details: [dpop], dpopKey: key, user: 'bob' }),
      carolDpop: want({ details: [dpop], dpopKey: key, user: 'carol' }),
      bobOtherKey: want({ details: [dpop], dpopKey: otherKey, user: 'bob' }),
      aliceLenient: want({ details: [lenient] }),
    };
    return s;
  },
});
const { setups } = world;

/** Sends the call and asserts a refusal that never reached the handler. */
async function refused(server, headers, code, field) {
  const before = server.calls.length;
  const res = await send({ port: server.port, path: TARGET, headers: { ...JSON_TYPE, ...headers }, body: BODY });
  assert.equal(res.status, 403, `status (${res.text})`);
  assert.match(res.headers['content-type'], /^application\/problem\+json/);
  assert.equal(res.json.type, `urn:countersign:problem:${code}`);
  assert.equal(res.json.code, code);
  assert.equal(res.json.field, field);
  assert.equal(res.headers['www-authenticate'], undefined);
  assert.equal(server.calls.length, before, 'the handler must not run');
  return res.json;
}

/** Sends the call and asserts the handler ran once; resolves what it saw. */
async function accepted(server, headers, approval) {
  const before = server.calls.length;
  const res = await send({ port: server.port, path: TARGET, headers: { ...JSON_TYPE, ...headers }, body: BODY });
  assert.equal(res.status, 200, res.text);
  assert.equal(server.calls.length, before + 1, 'the handler runs once');
  const call = server.calls.at(-1);
  assert.equal(call.subject, 'alice');
  assert.equal(call.approval, approval);
  return call;
}

for (const name of Object.keys(frameworks)) {
  describe(name, () => {
    const s = () => setups[name];
    // The person's token as Bearer, the countersign tokens as one header field.
    const bearer = (...countersign) => ({
      authorization: `Bearer ${s().t.alice}`,
      'countersign-tokens': countersign.join(', '),
    });
    // Dave's token for the main call, signed by the local key, changed by `edit`.
    const dave = (edit = (c) => c) =>
      world.local.sign(edit({ sub: 'dave', authorization_details: [{ ...s().entries.main }] }));

    it('refuses a call without countersign tokens: countersign_missing', async (t) => {
      const { api } = s();
      const { alice, bob, carol } = s().t;
      await t.test('no header', () => refused(api, { authorization: `Bearer ${alice}` }, 'countersign_missing'));
      await t.test('an empty list', () => refused(api, bearer(' ', ''), 'countersign_missing'));
      await t.test('two header fields', () =>
        refused(api, { authorization: `Bearer ${alice}`, 'countersign-tokens': [bob, carol] }, 'countersign_missing'));
    });

    it('refuses a countersign token that is not a valid token for this API: countersign_invalid token', async (t) => {
      const { api } = s();
      const { bob } = s().t;
      const expired = await dave((c) => ({ ...c, exp: Math.floor(Date.now() / 1000) - 120 }));
      const problem = await refused(api, bearer(bob, expired), 'countersign_invalid', 'token');
      assert.equal(problem.title, 'Countersignature invalid');
      assert.equal(problem.detail, 'The 2nd countersign token: the access token has expired.');
      const unknownKey = await world.local.forge({
        iss: world.peer.issuer, aud: AUDIENCE, sub: 'dave', scope: 'product:buy',
        exp: Math.floor(Date.now() / 1000) + 300, authorization_details: [s().entries.main],
      });
      await t.test('signed by a key the JWKS does not hold', () => refused(api, bearer(unknownKey, bob), 'countersign_invalid', 'token'));
      await t.test('not a JWT', () => refused(api, bearer(bob, 'garbage'), 'countersign_invalid', 'token'));
      const readOnly = await dave((c) => ({ ...c, scope: 'product:read' }));
      await t.test('lacking a required scope', () => refused(api, bearer(bob, readOnly), 'countersign_invalid', 'token'));
    });

    it('refuses a countersign token for another call: countersign_invalid binding', async (t) => {
      const { api } = s();
      const { bob, carol } = s().t;
      const otherBody = await dave((c) => ({ ...c, authorization_details: [{ ...s().entries.main, body_sha256: sha256('{}') }] }));
      const otherApproval = await dave((c) => ({ ...c, authorization_details: [{ ...s().entries.main, approval: 'another' }] }));
      const withTool = await dave((c) => ({ ...c, authorization_details: [{ ...s().entries.main, tool: 'buy' }] }));
      await t.test('another body', () => refused(api, bearer(bob, otherBody), 'countersign_invalid', 'binding'));
      await t.test('another approval', () => refused(api, bearer(otherApproval, carol), 'countersign_invalid', 'binding'));
      await t.test('a field added', () => refused(api, bearer(bob, withTool), 'countersign_invalid', 'binding'));
      const expired = await dave((c) => ({ ...c, exp: Math.floor(Date.now() / 1000) - 120 }));
      await t.test('every token is verified before any binding is compared', () =>
        refused(api, bearer(otherBody, expired), 'countersign_invalid', 'token'));
    });

    it('refuses a countersign token bound to another key: countersign_invalid key', async (t) => {
      const { api, key } = s();
      const { bob, aliceDpop, bobDpop, carolDpop, bobOtherKey } = s().t;
      const bound = await dave((c) => ({ ...c, cnf: { jkt: key.jkt } }));
      await t.test('bound, the approver\'s token unbound', () => refused(api, bearer(bob, bound), 'countersign_invalid', 'key'));
      const dpop = async (...countersign) => ({
        authorization: `DPoP ${aliceDpop}`,
        dpop: await dpopProof({ key, htm: 'POST', htu: `http://127.0.0.1:${api.port}/shop`, token: aliceDpop }),
        'countersign-tokens': countersign.join(','),
      });
      await t.test('bound to another key', async () => refused(api, await dpop(bobDpop, bobOtherKey), 'countersign_invalid', 'key'));
      const unbound = await dave((c) => ({ ...c, authorization_details: [s().entries.dpop] }));
      await t.test('unbound, the approver\'s token bound', async () => refused(api, await dpop(bobDpop, unbound), 'countersign_invalid', 'key'));
      // The approver's own token and a repeat besides: still two others.
      const call = await accepted(api, await dpop(carolDpop, aliceDpop, bobDpop, carolDpop), s().entries.dpop.approval);
      assert.deepEqual(call.countersigners, ['carol', 'bob']);
    });

    it('counts distinct countersigners besides the approver: countersign_insufficient', async (t) => {
      const { api } = s();
      const { alice, bob } = s().t;
      const own = await refused(api, bearer(alice, bob), 'countersign_insufficient');
      assert.equal(own.title, 'Too few countersigners');
      assert.equal(own.detail, '2 distinct countersigners besides alice are required; the call carries 1.');
      await t.test('the same countersigner twice counts once', () => refused(api, bearer(bob, bob), 'countersign_insufficient'));
    });

    it('serves a call two others countersigned, once, and tells the handler who they were', async () => {
      const { api } = s();
      const { bob, carol } = s().t;
      const call = await accepted(api, bearer(bob, carol), s().entries.main.approval);
      assert.deepEqual(call.countersigners, ['bob', 'carol']);
      await refused(api, bearer(bob, carol), 'approval_replayed');
    });

    it('ignores Countersign-Tokens entirely when no countersigner is required', async () => {
      const { lenient } = s();
      const headers = { authorization: `Bearer ${s().t.aliceLenient}`, 'countersign-tokens': ['garbage, ,', 'more'] };
      const call = await accepted(lenient, headers, s().entries.lenient.approval);
      assert.deepEqual(call.countersigners, []);
    });
  });
}
