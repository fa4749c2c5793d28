// Countersign test peer: a real OpenID CIBA (poll mode) authorization server built on the
// OpenID Certified `oidc-provider` package, plus a small control API for integration tests.
//
// Usage: node tests/peer/server.mjs   (see README.md for the environment variables)
// stdout carries exactly one JSON line ({"issuer":...,"port":...}) once listening; all logs go
// to stderr. The process exits when stdin closes or on SIGTERM/SIGINT.

import * as fs from 'node:fs';
import * as crypto from 'node:crypto';
import * as http from 'node:http';
import * as querystring from 'node:querystring';

// oidc-provider prints notices with console.info (stdout). stdout is reserved for the single
// JSON line, so route every console method to stderr before the package is loaded.
for (const method of ['log', 'info', 'debug', 'trace']) {
  console[method] = (...args) => console.error(...args);
}
const log = (...args) => console.error('[peer]', ...args);

const { default: Provider, errors } = await import('oidc-provider');

// ---------------------------------------------------------------------------------------------
// configuration
// ---------------------------------------------------------------------------------------------

function envNumber(name, fallback) {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return fallback;
  const value = Number(raw);
  if (!Number.isFinite(value) || value < 0) {
    log(`invalid ${name}=${raw}`);
    process.exit(2);
  }
  return value;
}

const PORT = envNumber('PEER_PORT', 0);
const INTERVAL = envNumber('PEER_INTERVAL', 1);
const DEFAULT_EXPIRY = envNumber('PEER_DEFAULT_EXPIRY', 600);
const MAX_EXPIRY = envNumber('PEER_MAX_EXPIRY', 600);
const EXPIRED_RETENTION = envNumber('PEER_EXPIRED_RETENTION', 300);
const SLOW_DOWN_INCREMENT = 5;
const POLL_TOLERANCE_MS = 200;
const API_AUDIENCE = process.env.PEER_API_AUDIENCE || 'https://shop.example/api';
const API_SCOPES = (process.env.PEER_API_SCOPES || 'product:buy product:read payments:transfer').split(' ').filter(Boolean);
const RAR_TYPES = (process.env.PEER_RAR_TYPES
  || 'product_purchase,urn:auth0:schemas:authorization-details:v1:product_purchase,countersign_call')
  .split(',').map((s) => s.trim()).filter(Boolean);
const CIBA_GRANT = 'urn:openid:params:grant-type:ciba';
// Ping mode: oidc-provider requires an https notification endpoint, so the ping client registers
// this placeholder and the peer delivers its pings to PEER_PING_URL (a loopback http URL) instead.
const PING_ENDPOINT = 'https://countersign-ping.invalid/ciba/notification';
const PING_URL = process.env.PEER_PING_URL;
const OIDC_SCOPES = ['openid', 'profile', 'email', 'offline_access'];

let CLIENT_JWKS;
if (process.env.PEER_CLIENT_JWKS) {
  try {
    CLIENT_JWKS = JSON.parse(process.env.PEER_CLIENT_JWKS);
    if (!Array.isArray(CLIENT_JWKS?.keys)) throw new Error('no "keys" array');
  } catch (err) {
    log(`invalid PEER_CLIENT_JWKS: ${err.message}`);
    process.exit(2);
  }
}

const ROUTES = {
  backchannel_authentication: '/bc-authorize',
  token: '/oauth/token',
  jwks: '/.well-known/jwks.json',
  userinfo: '/userinfo',
};

const USERS = {
  alice: { name: 'Alice Example', email: 'alice@example.com' },
  bob: { name: 'Bob Example', email: 'bob@example.com' },
  carol: { name: 'Carol Example', email: 'carol@example.com' },
  'finance-lead': { name: 'Finance Lead', email: 'finance-lead@example.com' },
  // A second countersigner (tests/faults: two of three countersign).
  dave: { name: 'Dave Example', email: 'dave@example.com' },
};

// Auth0's documented binding_message alphabet, plus space (used in all of Auth0's examples).
const BINDING_MESSAGE = /^[A-Za-z0-9 +\-_.,:#]{1,64}$/;

// ---------------------------------------------------------------------------------------------
// in-memory state
// ---------------------------------------------------------------------------------------------

/** auth_req_id -> record (see toJson for the public shape) */
const requests = new Map();
/** forced token-endpoint unavailability; `retryAfter` is the header value (or undefined: none),
 * `retryAfterSeconds` what the discipline check requires */
const unavailable = { count: 0, status: 503, retryAfter: '1', retryAfterSeconds: 1 };
/** forced token-endpoint misbehaviour (see the control API in README.md) */
const misbehaviour = { mode: undefined, count: 0, tokenType: undefined, redirects: 0, followed: 0 };
const MISBEHAVIOURS = ['redirect', 'drop', 'truncate', 'garbage', 'oversize', 'token_type'];

const nowSec = () => Math.floor(Date.now() / 1000);

function statusOf(rec) {
  if (rec.redeemed) return 'redeemed';
  if (rec.decision === 'denied') return 'denied';
  if (Date.now() >= rec.expires_at_ms) return 'expired';
  if (rec.decision === 'approved') return 'approved';
  return 'pending';
}

function toJson(rec) {
  return {
    auth_req_id: rec.auth_req_id,
    client_id: rec.client_id,
    sub: rec.sub,
    binding_message: rec.binding_message,
    scope: rec.scope,
    resource: rec.resource,
    audience: rec.audience,
    authorization_details: rec.authorization_details,
    requested_expiry: rec.requested_expiry,
    client_notification_token: rec.client_notification_token,
    pings: rec.pings,
    expires_in: rec.expires_in,
    expires_at_ms: rec.expires_at_ms,
    status: statusOf(rec),
    granted_scope: rec.granted_scope,
    interval: rec.interval,
    polls: rec.polls,
    slow_downs: rec.slow_downs,
    created_at_ms: rec.created_at_ms,
    last_poll_at_ms: rec.last_poll_at_ms,
    poll_times_ms: rec.poll_times_ms,
    poll_results: rec.poll_results,
  };
}

// Storage adapter: like oidc-provider's MemoryAdapter, but keeps expired entries for
// PEER_EXPIRED_RETENTION seconds so that polling an expired auth_req_id answers `expired_token`
// (oidc-provider's own memory adapter drops it at expiry, which yields `invalid_grant`).
const store = new Map();
const grantIndex = new Map();

class PeerAdapter {
  constructor(model) {
    this.model = model;
  }

  key(id) {
    return `${this.model}:${id}`;
  }

  get(key) {
    const entry = store.get(key);
    if (!entry) return undefined;
    if (entry.expiresAt <= Date.now()) {
      store.delete(key);
      return undefined;
    }
    return entry.value;
  }

  async upsert(id, payload, expiresIn) {
    const expiresAt = typeof expiresIn === 'number'
      ? Date.now() + (Math.max(expiresIn, 0) + EXPIRED_RETENTION) * 1000
      : Infinity;
    const key = this.key(id);
    store.set(key, { value: payload, expiresAt });
    if (payload.grantId) {
      if (!grantIndex.has(payload.grantId)) grantIndex.set(payload.grantId, new Set());
      grantIndex.get(payload.grantId).add(key);
    }
    if (this.model === 'Session' && payload.uid) {
      store.set(`sessionUid:${payload.uid}`, { value: id, expiresAt });
    }
    if (payload.userCode) {
      store.set(`userCode:${payload.userCode}`, { value: id, expiresAt });
    }
  }

  async find(id) {
    return this.get(this.key(id));
  }

  async findByUid(uid) {
    const id = this.get(`sessionUid:${uid}`);
    return id ? this.find(id) : undefined;
  }

  async findByUserCode(userCode) {
    const id = this.get(`userCode:${userCode}`);
    return id ? this.find(id) : undefined;
  }

  async consume(id) {
    const value = this.get(this.key(id));
    if (value) value.consumed = nowSec();
  }

  async destroy(id) {
    store.delete(this.key(id));
  }

  async revokeByGrantId(grantId) {
    for (const key of grantIndex.get(grantId) ?? []) store.delete(key);
    grantIndex.delete(grantId);
  }
}

// ---------------------------------------------------------------------------------------------
// provider configuration
// ---------------------------------------------------------------------------------------------

function buildProvider(issuer) {
  // A fixed, test-only key read from a file. Generating one at start
  // (generateKeyPairSync + export as JWK) intermittently deadlocks Node 20:
  // a GC inside KeyObjectHandle::ExportJWK runs a KeyGenJob destructor that
  // takes a mutex ExportJWK already holds (seen in a CI run, gdb backtrace).
  const signingKey = JSON.parse(
    fs.readFileSync(new URL('./signing-key.json', import.meta.url), 'utf8'),
  );

  const cibaClient = {
    grant_types: [CIBA_GRANT],
    response_types: [],
    redirect_uris: [],
    backchannel_token_delivery_mode: 'poll',
    authorization_details_types: RAR_TYPES,
  };
  const clients = [
    {
      ...cibaClient,
      client_id: 'countersign-post',
      client_secret: 'countersign-secret',
      token_endpoint_auth_method: 'client_secret_post',
    },
    {
      ...cibaClient,
      client_id: 'countersign-basic',
      client_secret: 'countersign-secret',
      token_endpoint_auth_method: 'client_secret_basic',
    },
  ];
  // Ping mode (client_secret_post): notifications go to PEER_PING_URL.
  clients.push({
    ...cibaClient,
    client_id: 'countersign-ping',
    client_secret: 'countersign-secret',
    token_endpoint_auth_method: 'client_secret_post',
    backchannel_token_delivery_mode: 'ping',
    backchannel_client_notification_endpoint: PING_ENDPOINT,
  });
  if (CLIENT_JWKS) {
    clients.push({
      ...cibaClient,
      client_id: 'countersign-jwt',
      token_endpoint_auth_method: 'private_key_jwt',
      jwks: CLIENT_JWKS,
    });
  }

  const configuration = {
    adapter: PeerAdapter,
    clients,
    jwks: { keys: [signingKey] },
    cookies: { keys: [crypto.randomBytes(32).toString('hex')] },
    routes: ROUTES,
    scopes: OIDC_SCOPES,
    claims: {
      openid: ['sub'],
      profile: ['name'],
      email: ['email', 'email_verified'],
    },
    async findAccount(_ctx, id) {
      if (!Object.hasOwn(USERS, id)) return undefined;
      return {
        accountId: id,
        async claims() {
          return { sub: id, ...USERS[id], email_verified: true };
        },
      };
    },
    ttl: {
      // requested_expiry (seconds) is honoured, capped at PEER_MAX_EXPIRY. oidc-provider's
      // expiry is whole-second (exp <= floor(now)), so a request could die up to 1 s early; the
      // stored lifetime gets 1 s of slack and the peer enforces the advertised expires_in to the
      // millisecond itself (see tokenMiddleware).
      BackchannelAuthenticationRequest(ctx) {
        return advertisedExpiry(ctx?.oidc?.params?.requested_expiry) + 1;
      },
      AccessToken: 3600,
      IdToken: 3600,
      Grant: 3600,
      Session: 3600,
      Interaction: 600,
    },
    features: {
      devInteractions: { enabled: false },
      // DPoP (RFC 9449) on the token endpoint: a poll with a DPoP proof gets a token bound to
      // its key (token_type DPoP, cnf.jkt). PEER_DPOP_NONCE=1 makes every proof carry a
      // server-provided nonce (the first proof is answered use_dpop_nonce with DPoP-Nonce).
      dPoP: {
        enabled: true,
        ...(process.env.PEER_DPOP_NONCE === '1'
          ? { nonceSecret: crypto.randomBytes(32), requireNonce: () => true }
          : {}),
      },
      ciba: {
        enabled: true,
        deliveryModes: ['poll', 'ping'],
        async processLoginHint(ctx, loginHint) {
          return processLoginHint(ctx, loginHint);
        },
        async processLoginHintToken() {
          throw new errors.InvalidRequest('login_hint_token is not supported, use login_hint');
        },
        async validateBindingMessage(_ctx, bindingMessage) {
          if (typeof bindingMessage !== 'string' || !BINDING_MESSAGE.test(bindingMessage)) {
            throw new errors.InvalidBindingMessage(
              'binding_message is required, at most 64 characters, letters, digits, space and + - _ . , : # only',
            );
          }
        },
        async validateRequestContext() {},
        async verifyUserCode() {},
        async triggerAuthenticationDevice(ctx, request, account, client) {
          recordRequest(ctx, request, account, client);
        },
      },
      resourceIndicators: {
        enabled: true,
        async defaultResource(_ctx, _client, oneOf) {
          return oneOf;
        },
        // always issue the access token for the resource requested at bc-authorize (even with
        // openid in scope, where oidc-provider would otherwise issue an opaque userinfo token)
        async useGrantedResource() {
          return true;
        },
        async getResourceServerInfo(_ctx, resourceIndicator) {
          if (resourceIndicator !== API_AUDIENCE) {
            throw new errors.InvalidTarget(`unknown resource ${resourceIndicator}`);
          }
          return {
            audience: API_AUDIENCE,
            scope: API_SCOPES.join(' '),
            accessTokenTTL: 3600,
            accessTokenFormat: 'jwt',
            jwt: { sign: { alg: 'RS256' } },
          };
        },
      },
      richAuthorizationRequests: {
        enabled: true,
        types: Object.fromEntries(RAR_TYPES.map((type) => [type, { validate() {} }])),
        authorizationDetailsForGrantSource(ctx) {
          const raw = ctx.oidc.params.authorization_details;
          return raw ? JSON.parse(raw) : undefined;
        },
        authorizationDetailsForAccessToken(_ctx, _token, source) {
          return tamperedDetails(source?.rar);
        },
        authorizationDetailsForIntrospection(_ctx, token) {
          return token.rar;
        },
      },
    },
  };

  return new Provider(issuer, configuration);
}

function advertisedExpiry(requested) {
  if (requested) return Math.max(1, Math.min(MAX_EXPIRY, Math.floor(+requested)));
  return DEFAULT_EXPIRY;
}

function processLoginHint(ctx, loginHint) {
  let sub = loginHint;
  if (loginHint.trimStart().startsWith('{')) {
    let hint;
    try {
      hint = JSON.parse(loginHint);
    } catch {
      throw new errors.InvalidRequest('login_hint is not valid JSON');
    }
    if (hint?.format !== 'iss_sub' || typeof hint.sub !== 'string' || typeof hint.iss !== 'string') {
      throw new errors.InvalidRequest('login_hint JSON must be {"format":"iss_sub","iss":...,"sub":...}');
    }
    const strip = (s) => s.replace(/\/+$/, '');
    if (strip(hint.iss) !== strip(ctx.oidc.issuer)) {
      throw new errors.UnknownUserId(`login_hint iss must be ${ctx.oidc.issuer}`);
    }
    sub = hint.sub;
  }
  if (!Object.hasOwn(USERS, sub)) {
    throw new errors.UnknownUserId('could not identify end-user');
  }
  return sub;
}

function recordRequest(ctx, request, account, client) {
  const { params } = ctx.oidc;
  const now = Date.now();
  let authorizationDetails;
  if (params.authorization_details) {
    try {
      authorizationDetails = JSON.parse(params.authorization_details);
    } catch {}
  }
  const rec = {
    auth_req_id: request.jti,
    client_id: client.clientId,
    sub: account.accountId,
    binding_message: params.binding_message,
    scope: request.scope,
    resource: request.resource,
    audience: ctx.state.peerAudience,
    authorization_details: authorizationDetails,
    requested_expiry: params.requested_expiry !== undefined ? +params.requested_expiry : undefined,
    // Test-only: the bearer token of this request's ping, for forged/replayed notification tests.
    client_notification_token: params.client_notification_token,
    pings: [],
    expires_in: advertisedExpiry(params.requested_expiry),
    expires_at_ms: undefined,
    decision: undefined,
    granted_scope: undefined,
    redeemed: false,
    final: false,
    interval: INTERVAL,
    requiredGapMs: INTERVAL * 1000,
    forceSlowDown: false,
    polls: 0,
    slow_downs: 0,
    created_at_ms: now,
    last_poll_at_ms: null,
    poll_times_ms: [],
    poll_results: [],
  };
  rec.expires_at_ms = now + rec.expires_in * 1000;
  requests.set(rec.auth_req_id, rec);
  log(`bc-authorize ${rec.auth_req_id} sub=${rec.sub} client=${rec.client_id} scope="${rec.scope}"`
    + ` binding_message="${rec.binding_message}" expires_in=${rec.expires_in}`);
}

// ---------------------------------------------------------------------------------------------
// HTTP helpers and middleware
// ---------------------------------------------------------------------------------------------

// Reads a form body once and hands it on to oidc-provider via req.body (its documented
// fallback for pre-parsed bodies). Returns the parsed form.
async function readForm(ctx) {
  if (ctx.method !== 'POST' || !ctx.is('application/x-www-form-urlencoded')) return undefined;
  const chunks = [];
  for await (const chunk of ctx.req) chunks.push(chunk);
  const raw = Buffer.concat(chunks).toString('utf8');
  ctx.req.body = raw;
  return { raw, form: querystring.parse(raw) };
}

async function readJson(ctx) {
  const chunks = [];
  for await (const chunk of ctx.req) chunks.push(chunk);
  const raw = Buffer.concat(chunks).toString('utf8').trim();
  if (!raw) return {};
  return JSON.parse(raw);
}

// `value` if it is a whole number, else `fallback`.
function intOr(value, fallback) {
  return Number.isInteger(value) ? value : fallback;
}

// A control call's JSON body; undefined once a body that is not JSON has
// been answered with 400 invalid_request.
async function controlJson(ctx) {
  try {
    return await readJson(ctx);
  } catch {
    jsonError(ctx, 400, 'invalid_request', 'body must be JSON');
    return undefined;
  }
}

function jsonError(ctx, status, error, description, extraHeaders = {}) {
  ctx.status = status;
  ctx.set('Cache-Control', 'no-store');
  for (const [k, v] of Object.entries(extraHeaders)) ctx.set(k, v);
  ctx.body = { error, error_description: description };
}

async function backchannelMiddleware(ctx, next) {
  const parsed = await readForm(ctx);
  if (parsed) {
    const { form } = parsed;
    if (form.audience !== undefined) ctx.state.peerAudience = form.audience;
    // Auth0 style `audience` -> RFC 8707 `resource` when no resource is given
    if (form.audience !== undefined && form.resource === undefined) {
      form.resource = form.audience;
      delete form.audience;
      ctx.req.body = querystring.stringify(form);
    }
  }
  await next();
  if (ctx.status === 200 && ctx.body && typeof ctx.body === 'object' && ctx.body.auth_req_id) {
    // oidc-provider 9 does not send `interval`
    ctx.body.interval = INTERVAL;
    const rec = requests.get(ctx.body.auth_req_id);
    if (rec) ctx.body.expires_in = rec.expires_in;
    // The request is on the person's phone; its answer is late (a client
    // that dies meanwhile never learns the auth_req_id).
    if (authorizeDelay.count > 0) {
      authorizeDelay.count -= 1;
      log(`bc-authorize ${ctx.body.auth_req_id}: answer held ${authorizeDelay.ms} ms`);
      await new Promise((resolve) => setTimeout(resolve, authorizeDelay.ms));
    }
  } else if (ctx.body?.error) {
    log(`bc-authorize rejected: ${ctx.status} ${ctx.body.error} (${ctx.body.error_description ?? ''})`);
  }
}

// POST /control/bc-authorize-delay { count, ms }: the next `count` bc-authorize
// requests are recorded (the person is asked) but answered `ms` late.
const authorizeDelay = { count: 0, ms: 0 };

// POST /control/access-token-details { mode, count }: the next `count` access tokens issued with
// authorization_details carry them `drop`ped (no claim at all) or `alter`ed (every
// countersign_call entry's body_sha256 changed), as a provider that does not keep them would.
const detailsTamper = { mode: undefined, count: 0 };

function tamperedDetails(details) {
  if (!details || detailsTamper.count <= 0) return details;
  detailsTamper.count -= 1;
  log(`access token: authorization_details ${detailsTamper.mode} (forced)`);
  if (detailsTamper.mode === 'drop') return undefined;
  return details.map((entry) => (entry?.type === 'countersign_call'
    ? { ...entry, body_sha256: 'AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA' }
    : entry));
}

function slowDown(ctx, rec, why) {
  rec.interval += SLOW_DOWN_INCREMENT;
  rec.requiredGapMs = rec.interval * 1000;
  rec.slow_downs += 1;
  rec.poll_results.push('slow_down');
  log(`poll ${rec.auth_req_id}: slow_down (${why}); interval now ${rec.interval}s`);
  jsonError(ctx, 400, 'slow_down', `${why}; poll no faster than every ${rec.interval} seconds`);
}

// Takes one forced misbehaviour of `mode`, if one is due.
function takeMisbehaviour(mode) {
  if (misbehaviour.mode !== mode || misbehaviour.count <= 0) return false;
  misbehaviour.count -= 1;
  return true;
}

// Replaces a token response (a poll that just redeemed the grant) as misbehaviour says.
function misbehaveTokenResponse(ctx, rec) {
  const mode = misbehaviour.mode;
  if (!['truncate', 'garbage', 'oversize', 'token_type'].includes(mode) || !takeMisbehaviour(mode)) return;
  log(`poll ${rec.auth_req_id}: forced ${mode} token response`);
  rec.poll_results.push(`token_${mode}`);
  if (mode === 'truncate') {
    // Headers promise the whole body; half of it comes, then the connection dies.
    const text = JSON.stringify(ctx.body);
    ctx.respond = false;
    ctx.res.writeHead(200, {
      'content-type': 'application/json',
      'content-length': Buffer.byteLength(text),
      'cache-control': 'no-store',
    });
    ctx.res.write(text.slice(0, Math.floor(text.length / 2)), () => ctx.res.socket?.destroy());
  } else if (mode === 'garbage') {
    ctx.type = 'application/json';
    ctx.body = '{"access_token": "not json after all';
  } else if (mode === 'oversize') {
    ctx.body = { ...ctx.body, padding: 'x'.repeat(100 * 1024) };
  } else {
    ctx.body = { ...ctx.body, token_type: misbehaviour.tokenType };
  }
}

async function tokenMiddleware(ctx, next) {
  const parsed = await readForm(ctx);
  const form = parsed?.form;
  if (!form || form.grant_type !== CIBA_GRANT || typeof form.auth_req_id !== 'string') {
    return next();
  }
  if (ctx.query.redirected !== undefined) {
    misbehaviour.followed += 1;
    log(`poll ${form.auth_req_id}: a redirect was followed`);
  } else if (takeMisbehaviour('redirect')) {
    // Not counted as a poll: a client that follows it polls once, here.
    misbehaviour.redirects += 1;
    log(`poll ${form.auth_req_id}: forced 307 redirect`);
    ctx.status = 307;
    ctx.set('Location', `${ROUTES.token}?redirected=1`);
    return undefined;
  }
  if (takeMisbehaviour('drop')) {
    log(`poll ${form.auth_req_id}: forced connection drop`);
    ctx.respond = false;
    ctx.req.socket.destroy();
    return undefined;
  }

  const now = Date.now();
  const rec = requests.get(form.auth_req_id);
  let requiredGapMs;
  let since;
  if (rec) {
    since = now - (rec.last_poll_at_ms ?? rec.created_at_ms);
    requiredGapMs = rec.requiredGapMs;
    rec.polls += 1;
    rec.poll_times_ms.push(now);
    rec.last_poll_at_ms = now;
    rec.requiredGapMs = rec.interval * 1000;
  }

  if (rec && !rec.final && rec.forceSlowDown) {
    rec.forceSlowDown = false;
    return slowDown(ctx, rec, 'forced slow_down');
  }

  if (unavailable.count > 0) {
    unavailable.count -= 1;
    if (rec) {
      rec.poll_results.push('temporarily_unavailable');
      rec.requiredGapMs = Math.max(rec.interval, unavailable.retryAfterSeconds) * 1000;
    }
    log(`poll ${form.auth_req_id}: forced ${unavailable.status} temporarily_unavailable`);
    const { retryAfter } = unavailable;
    const headers = retryAfter === undefined ? {}
      : { 'Retry-After': typeof retryAfter === 'function' ? retryAfter() : retryAfter };
    return jsonError(ctx, unavailable.status, 'temporarily_unavailable', 'forced by the test control API', headers);
  }

  // Ping mode: the token request answering a ping is not a poll; it may come at once.
  const answersPing = rec && rec.decision !== undefined && rec.pings?.length > 0;
  if (rec && !rec.final && !answersPing && since < requiredGapMs - POLL_TOLERANCE_MS) {
    return slowDown(ctx, rec, `polled ${since} ms after the previous poll, interval is ${requiredGapMs / 1000} s`);
  }

  if (rec && !rec.redeemed && now >= rec.expires_at_ms) {
    rec.final = true;
    rec.poll_results.push('expired_token');
    log(`poll ${rec.auth_req_id}: expired_token`);
    return jsonError(ctx, 400, 'expired_token', 'backchannel authentication request is expired');
  }

  await next();

  if (rec) {
    const body = ctx.body && typeof ctx.body === 'object' ? ctx.body : {};
    if (ctx.status === 200 && body.access_token) {
      rec.redeemed = true;
      rec.final = true;
      rec.poll_results.push('token');
      misbehaveTokenResponse(ctx, rec);
    } else {
      const error = body.error ?? `http_${ctx.status}`;
      rec.poll_results.push(error);
      if (['access_denied', 'expired_token', 'invalid_grant'].includes(error)) rec.final = true;
    }
    log(`poll ${rec.auth_req_id}: ${ctx.status} ${rec.poll_results.at(-1)}`);
  }
  return undefined;
}

async function findBackchannelRequest(provider, id) {
  return provider.BackchannelAuthenticationRequest.find(id, { ignoreExpiration: true });
}

async function controlMiddleware(provider, ctx) {
  const remote = ctx.req.socket.remoteAddress ?? '';
  if (!['127.0.0.1', '::1', '::ffff:127.0.0.1'].includes(remote)) {
    return jsonError(ctx, 403, 'forbidden', 'control API is loopback only');
  }
  ctx.set('Cache-Control', 'no-store');
  const parts = ctx.path.split('/').filter(Boolean); // ['control', ...]
  // The control call POSTed to /control/<name>, if that is what this is.
  const posted = ctx.method === 'POST' && parts.length === 2 ? parts[1] : undefined;

  if (ctx.method === 'GET' && parts.length === 2 && parts[1] === 'health') {
    ctx.body = { ok: true };
    return undefined;
  }

  if (ctx.method === 'GET' && parts.length === 2 && parts[1] === 'requests') {
    const { sub, status, client_id: clientId, binding_message: bindingMessage } = ctx.query;
    ctx.body = [...requests.values()].map(toJson).filter((r) => (
      (sub === undefined || r.sub === sub)
      && (status === undefined || r.status === status)
      && (clientId === undefined || r.client_id === clientId)
      && (bindingMessage === undefined || r.binding_message === bindingMessage)
    ));
    return undefined;
  }

  if (parts.length >= 3 && parts[1] === 'requests') {
    const id = decodeURIComponent(parts[2]);
    const rec = requests.get(id);
    if (!rec) return jsonError(ctx, 404, 'not_found', `unknown auth_req_id ${id}`);

    if (ctx.method === 'GET' && parts.length === 3) {
      ctx.body = toJson(rec);
      return undefined;
    }
    if (ctx.method !== 'POST' || parts.length !== 4) {
      return jsonError(ctx, 404, 'not_found', 'no such control endpoint');
    }
    const action = parts[3];

    if (action === 'slow-down') {
      rec.forceSlowDown = true;
      ctx.body = toJson(rec);
      return undefined;
    }

    if (action === 'approve' || action === 'deny') {
      const current = statusOf(rec);
      if (current !== 'pending') {
        return jsonError(ctx, 409, 'conflict', `request is ${current}`);
      }
      const body = await controlJson(ctx);
      if (body === undefined) return undefined;
      const request = await findBackchannelRequest(provider, id);
      if (!request) return jsonError(ctx, 404, 'not_found', 'request no longer stored');

      // Recorded before backchannelResult: in ping mode it sends the ping and awaits its answer,
      // and the client's token request answering that ping may arrive before it resolves (it must
      // then be read as answering the ping, not as a poll faster than the interval).
      rec.decision = action === 'deny' ? 'denied' : 'approved';
      if (action === 'deny') {
        const description = 'end-user denied the authorization request';
        // oidc-provider 9 stores `error_description` but reads back `errorDescription`: set it
        // here, so that the one save in backchannelResult (before its ping) stores both.
        request.errorDescription = description;
        await provider.backchannelResult(request, new errors.AccessDenied(description));
        log(`control: denied ${id}`);
        ctx.body = toJson(rec);
        return undefined;
      }

      // approve: grant the requested OIDC scopes and the requested API scopes (optionally
      // narrowed by {"scope": "..."} in the body) for the requested resource.
      const requested = new Set(request.scope?.split(' ').filter(Boolean));
      const allowed = typeof body.scope === 'string' ? new Set(body.scope.split(' ')) : undefined;
      const oidcScopes = [...requested].filter((s) => OIDC_SCOPES.includes(s));
      const grant = new provider.Grant({ accountId: request.accountId, clientId: request.clientId });
      if (oidcScopes.length) grant.addOIDCScope(oidcScopes.join(' '));
      const resources = [request.resource].flat().filter(Boolean);
      let apiScopes = [];
      for (const resource of resources) {
        apiScopes = [...requested].filter((s) => (
          !OIDC_SCOPES.includes(s) && API_SCOPES.includes(s) && (!allowed || allowed.has(s))
        ));
        if (apiScopes.length) grant.addResourceScope(resource, apiScopes.join(' '));
      }
      const claimNames = Object.keys(request.claims?.id_token ?? {});
      if (claimNames.length) grant.addOIDCClaims(claimNames);
      await grant.save();
      await provider.backchannelResult(request, grant, {
        acr: 'urn:countersign:peer:approved',
        amr: ['user'],
        authTime: nowSec(),
        rar: rec.authorization_details,
      });
      rec.granted_scope = [...oidcScopes, ...apiScopes].join(' ');
      log(`control: approved ${id} scope="${rec.granted_scope}"`);
      ctx.body = toJson(rec);
      return undefined;
    }
    return jsonError(ctx, 404, 'not_found', 'no such control endpoint');
  }

  if (posted === 'access-token-details') {
    const body = await controlJson(ctx);
    if (body === undefined) return undefined;
    if (body.mode !== 'drop' && body.mode !== 'alter') {
      return jsonError(ctx, 400, 'invalid_request', 'mode must be drop or alter');
    }
    detailsTamper.mode = body.mode;
    detailsTamper.count = intOr(body.count, 1);
    ctx.body = { mode: detailsTamper.mode, count: detailsTamper.count };
    return undefined;
  }

  if (posted === 'bc-authorize-delay') {
    const body = await controlJson(ctx);
    if (body === undefined) return undefined;
    authorizeDelay.count = intOr(body.count, 1);
    authorizeDelay.ms = intOr(body.ms, 3000);
    log(`control: next ${authorizeDelay.count} bc-authorize answers held ${authorizeDelay.ms} ms`);
    ctx.body = { count: authorizeDelay.count, ms: authorizeDelay.ms };
    return undefined;
  }

  if (posted === 'token-unavailable') {
    const body = await controlJson(ctx);
    if (body === undefined) return undefined;
    unavailable.count = intOr(body.count, 1);
    unavailable.status = intOr(body.status, 503);
    // retry_after: seconds (number), a raw header value (string), or null for no header;
    // retry_after_date_in: an HTTP date that many seconds from now.
    if (Number.isInteger(body.retry_after_date_in)) {
      const seconds = body.retry_after_date_in;
      // Made when the answer is sent.
      unavailable.retryAfter = () => new Date(Date.now() + seconds * 1000).toUTCString();
      unavailable.retryAfterSeconds = seconds - 1;
    } else if (body.retry_after === null) {
      unavailable.retryAfter = undefined;
      unavailable.retryAfterSeconds = 0;
    } else if (typeof body.retry_after === 'string') {
      unavailable.retryAfter = body.retry_after;
      unavailable.retryAfterSeconds = Number(body.retry_after) || 0;
    } else {
      const seconds = intOr(body.retry_after, 1);
      unavailable.retryAfter = String(seconds);
      unavailable.retryAfterSeconds = seconds;
    }
    log(`control: next ${unavailable.count} CIBA polls answer ${unavailable.status}`);
    const retryAfter = typeof unavailable.retryAfter === 'function' ? unavailable.retryAfter() : unavailable.retryAfter;
    ctx.body = { count: unavailable.count, status: unavailable.status, retry_after: retryAfter ?? null };
    return undefined;
  }

  if (ctx.method === 'GET' && parts.length === 2 && parts[1] === 'token-misbehave') {
    ctx.body = {
      mode: misbehaviour.mode ?? null,
      count: misbehaviour.count,
      redirects: misbehaviour.redirects,
      followed: misbehaviour.followed,
    };
    return undefined;
  }

  if (posted === 'token-misbehave') {
    const body = await controlJson(ctx);
    if (body === undefined) return undefined;
    if (!MISBEHAVIOURS.includes(body.mode)) {
      return jsonError(ctx, 400, 'invalid_request', `mode must be one of ${MISBEHAVIOURS.join(', ')}`);
    }
    misbehaviour.mode = body.mode;
    misbehaviour.count = intOr(body.count, 1);
    misbehaviour.tokenType = typeof body.token_type === 'string' ? body.token_type : 'DPoP';
    log(`control: next ${misbehaviour.count} token answers misbehave: ${misbehaviour.mode}`);
    ctx.body = { mode: misbehaviour.mode, count: misbehaviour.count };
    return undefined;
  }

  return jsonError(ctx, 404, 'not_found', 'no such control endpoint');
}

// ---------------------------------------------------------------------------------------------
// start-up
// ---------------------------------------------------------------------------------------------

let handler;
const server = http.createServer((req, res) => {
  if (handler) return handler(req, res);
  res.writeHead(503).end();
  return undefined;
});

function shutdown(reason) {
  log(`exiting: ${reason}`);
  server.close();
  process.exit(0);
}

process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));
if (process.env.PEER_IGNORE_STDIN !== '1') {
  process.stdin.on('end', () => shutdown('stdin closed'));
  process.stdin.on('close', () => shutdown('stdin closed'));
  process.stdin.on('error', () => shutdown('stdin error'));
  process.stdin.resume();
}

server.on('error', (err) => {
  log(`server error: ${err.message}`);
  process.exit(1);
});

server.listen(PORT, '127.0.0.1', () => {
  const { port } = server.address();
  const issuer = `http://127.0.0.1:${port}`;
  const provider = buildProvider(issuer);

  // private_key_jwt: oidc-provider accepts the issuer, the token endpoint URL and the URL of the
  // endpoint being called as client assertion `aud`; also accept `<issuer>/` (Auth0 documents
  // its audience as https://{domain}/ with a trailing slash).
  const contextProto = provider.OIDCContext.prototype;
  const expectedAudience = contextProto.clientJwtAuthExpectedAudience;
  contextProto.clientJwtAuthExpectedAudience = function clientJwtAuthExpectedAudience() {
    return expectedAudience.call(this).add(`${this.issuer}/`);
  };

  // Ping delivery to PEER_PING_URL (see PING_ENDPOINT), recording when and how it was answered.
  provider.Client.prototype.backchannelPing = async function backchannelPing(request) {
    const rec = requests.get(request.jti);
    const token = request.params.client_notification_token;
    if (!PING_URL || !token) throw new TypeError('no ping target or token');
    const ping = { sent_at_ms: Date.now(), status: null };
    rec?.pings.push(ping);
    const response = await fetch(PING_URL, {
      method: 'POST',
      redirect: 'manual',
      headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
      body: JSON.stringify({ auth_req_id: request.jti }),
    });
    ping.status = response.status;
    log(`ping ${request.jti} -> ${response.status}`);
    if (response.status !== 204 && response.status !== 200) {
      throw new Error(`expected 204 No Content from the notification endpoint, got ${response.status}`);
    }
  };

  provider.on('server_error', (_ctx, err) => log('server_error', err));
  provider.on('grant.error', (_ctx, err) => log(`grant.error ${err.error ?? ''} ${err.error_description ?? err.message}`));

  // request log
  provider.use(async (ctx, next) => {
    const started = Date.now();
    await next();
    log(`${ctx.method} ${ctx.path} -> ${ctx.status} (${Date.now() - started} ms)`);
  });
  provider.use(async (ctx, next) => {
    if (ctx.path === '/control' || ctx.path.startsWith('/control/')) {
      return controlMiddleware(provider, ctx);
    }
    if (ctx.path === ROUTES.backchannel_authentication) return backchannelMiddleware(ctx, next);
    if (ctx.path === ROUTES.token) return tokenMiddleware(ctx, next);
    return next();
  });

  handler = provider.callback();
  process.stdout.write(`${JSON.stringify({ issuer, port })}\n`);
  log(`listening on ${issuer} (interval ${INTERVAL}s, clients: countersign-post, countersign-basic, countersign-ping${CLIENT_JWKS ? ', countersign-jwt' : ''})`);
});
