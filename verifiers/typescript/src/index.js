// Countersign call binding, version 1: the verifier core (docs/call-binding.md).
// It checks, in the contract's order, that an access token was issued for
// exactly the request being served, and answers either the accepted claims or
// the refusal (status, application/problem+json body, headers). It needs no
// web framework; see ./express.js and ./fastify.js for the adapters.
//
// Never put a token, a proof or a body in a problem's detail or in a log.

import { createHash } from 'node:crypto';
import { isDeepStrictEqual } from 'node:util';

import {
  EmbeddedJWK,
  calculateJwkThumbprint,
  compactVerify,
  createRemoteJWKSet,
  decodeProtectedHeader,
  errors as joseErrors,
  jwtVerify,
} from 'jose';

import { ReplayCache } from './replay.js';

/** Asymmetric JWS algorithms only (RS/PS/ES, EdDSA). */
export const ALGORITHMS = Object.freeze([
  'RS256', 'RS384', 'RS512',
  'PS256', 'PS384', 'PS512',
  'ES256', 'ES384', 'ES512',
  'EdDSA', 'Ed25519',
]);

/** Leeway on the access token's `exp` and `nbf`, in seconds (contract, check 2). */
export const CLOCK_TOLERANCE_SECONDS = 30;

const TITLES = Object.freeze({
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
});

const STATUS = Object.freeze({
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
  // answered by the Express and Fastify adapters, which buffer the body
  body_too_large: 413,
});

/** The refusal codes of call binding v1, with their HTTP status. */
export const CODES = STATUS;

// "Bearer <token68>" or "DPoP <token68>" (scheme case-insensitive, RFC 9110 §11.1).
const CREDENTIALS = /^(Bearer|DPoP) +([A-Za-z0-9\-._~+/]+=*) *$/i;

const DEFAULT_MAX_BODY_BYTES = 1024 * 1024;

export function b64urlSha256(bytes) {
  return createHash('sha256').update(bytes).digest('base64url');
}

/** The digest of an empty body: `47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU`. */
export const EMPTY_BODY_SHA256 = b64urlSha256(new Uint8Array(0));

/**
 * Builds a refusal: status, problem (RFC 9457) and headers (WWW-Authenticate on 401s).
 * `scheme` is the WWW-Authenticate scheme (`Bearer` or `DPoP`).
 */
export function refusal(code, detail, { field, scheme = 'Bearer' } = {}) {
  const status = STATUS[code];
  if (!status) throw new Error(`unknown countersign problem code ${code}`);
  const problem = {
    type: `urn:countersign:problem:${code}`,
    title: TITLES[code],
    status,
    code,
    detail,
  };
  if (field !== undefined) problem.field = field;
  const headers = { 'content-type': 'application/problem+json' };
  if (status === 401) {
    const dpopProof = code.startsWith('dpop_');
    headers['www-authenticate'] = dpopProof
      ? 'DPoP error="invalid_dpop_proof"'
      : `${scheme} error="invalid_token"`;
  }
  return { ok: false, status, problem, headers };
}

function isWhatwgHeaders(headers) {
  return typeof headers.get === 'function' && typeof headers.has === 'function';
}

// All values of a header, from a plain object (Node's headers or headersDistinct:
// string | string[]), a WHATWG Headers, or a flat [name, value, ...] raw list.
function headerValues(headers, name) {
  if (headers && isWhatwgHeaders(headers)) {
    // WHATWG Headers join repeated fields with ", "; split them back
    // (JWTs, the only values we read this way, never hold a comma).
    return headerFields(headers, name).flatMap((value) => value.split(',').map((v) => v.trim()));
  }
  return headerFields(headers, name);
}

// The header's field values as received, not split on commas. A WHATWG Headers
// has already joined repeated fields into one: it yields at most one.
function headerFields(headers, name) {
  if (!headers) return [];
  if (isWhatwgHeaders(headers)) {
    const value = headers.get(name);
    return value === null ? [] : [value];
  }
  if (Array.isArray(headers)) {
    const out = [];
    for (let i = 0; i + 1 < headers.length; i += 2) {
      if (String(headers[i]).toLowerCase() === name) out.push(String(headers[i + 1]));
    }
    return out;
  }
  const out = [];
  for (const [key, value] of Object.entries(headers)) {
    if (key.toLowerCase() !== name || value === undefined || value === null) continue;
    if (Array.isArray(value)) out.push(...value.map(String));
    else out.push(String(value));
  }
  return out;
}

// Scheme, host (lowercase) and port (default dropped) and path of a URL,
// query and fragment ignored; null when it does not parse as an absolute URL.
function htuKey(value) {
  if (typeof value !== 'string') return null;
  let url;
  try {
    url = new URL(value);
  } catch {
    return null;
  }
  // WHATWG URL lowercases the scheme and host, drops the scheme's default port
  // and normalises the path (dot segments, percent-encoding) the same way on both sides.
  return `${url.protocol}//${url.host}${url.pathname}`;
}

function targetPath(target) {
  const cut = target.search(/[?#]/);
  return cut === -1 ? target : target.slice(0, cut);
}

function requireString(options, name) {
  const value = options[name];
  if (typeof value !== 'string' || value === '') {
    throw new TypeError(`countersign: option ${name} is required (a non-empty string)`);
  }
  return value;
}

/**
 * Creates a verifier. See index.d.ts and the README for the options.
 */
export function createVerifier(options = {}) {
  const issuer = requireString(options, 'issuer');
  const audience = requireString(options, 'audience');
  const jwksUri = requireString(options, 'jwksUri');
  const requiredScopes = [...(options.requiredScopes ?? [])];
  if (!requiredScopes.every((s) => typeof s === 'string' && s && !/\s/.test(s))) {
    throw new TypeError('countersign: requiredScopes must be scope strings');
  }
  const expectedHost = options.host === undefined ? undefined : requireString(options, 'host');
  const externalUrl =
    options.externalUrl === undefined ? undefined : requireString(options, 'externalUrl').replace(/\/+$/, '');
  if (externalUrl !== undefined && htuKey(`${externalUrl}/`) === null) {
    throw new TypeError('countersign: externalUrl must be an absolute URL');
  }
  const requireDpop = Boolean(options.requireDpop);
  const dpopWindowSeconds = options.dpopWindowSeconds ?? 60;
  const maxBodyBytes = options.maxBodyBytes ?? DEFAULT_MAX_BODY_BYTES;
  if (!(dpopWindowSeconds > 0) || !(maxBodyBytes >= 0)) {
    throw new TypeError('countersign: dpopWindowSeconds must be > 0 and maxBodyBytes >= 0');
  }
  const requiredCountersigners = options.requiredCountersigners ?? 0;
  if (!Number.isSafeInteger(requiredCountersigners) || requiredCountersigners < 0) {
    throw new TypeError('countersign: requiredCountersigners must be a whole number >= 0');
  }

  const remoteJwks = createRemoteJWKSet(new URL(jwksUri));
  // jose's key lookup, with every failure to obtain the key set (unreachable,
  // timeout, not 200, not a JWKS) told apart from a token signed by no key of it.
  async function jwks(protectedHeader, token) {
    try {
      return await remoteJwks(protectedHeader, token);
    } catch (error) {
      if (
        error instanceof joseErrors.JWKSNoMatchingKey ||
        error instanceof joseErrors.JWKSMultipleMatchingKeys ||
        error instanceof joseErrors.JOSENotSupported ||
        error instanceof joseErrors.JWKInvalid
      ) {
        throw error;
      }
      throw new KeysUnavailable({ cause: error });
    }
  }
  const approvals = new ReplayCache();
  const proofs = new ReplayCache();

  async function verify(request) {
    const { method, target, headers, body = new Uint8Array(0) } = request;
    if (typeof method !== 'string' || typeof target !== 'string') {
      throw new TypeError('countersign: verify needs the request method and target');
    }
    const hostHeader = request.host ?? headerValues(headers, 'host')[0];
    const now = Date.now() / 1000;

    // 1. exactly one Authorization: Bearer|DPoP <jwt>
    const authorizations = headerValues(headers, 'authorization');
    const wwwScheme = requireDpop ? 'DPoP' : 'Bearer';
    if (authorizations.length !== 1) {
      return refusal(
        'token_missing',
        authorizations.length === 0
          ? 'The request has no Authorization header.'
          : 'The request has more than one Authorization header.',
        { scheme: wwwScheme },
      );
    }
    const credentials = CREDENTIALS.exec(authorizations[0]);
    if (!credentials) {
      return refusal('token_missing', 'The Authorization header does not hold a Bearer or DPoP token.', {
        scheme: wwwScheme,
      });
    }
    const authScheme = credentials[1].toLowerCase() === 'dpop' ? 'DPoP' : 'Bearer';
    const token = credentials[2];
    const scheme = authScheme === 'DPoP' || requireDpop ? 'DPoP' : 'Bearer';

    // 2. signature, iss, aud, exp (30 s leeway), nbf
    const verified = await verifyToken(token);
    if (verified.invalid) return refusal('token_invalid', verified.invalid, { scheme });
    const { claims } = verified;

    // 3. scopes
    const lacking = lackingScopes(claims);
    if (lacking.length > 0) {
      return refusal('insufficient_scope', `The token lacks the scope ${lacking.join(' ')}.`);
    }

    // 4. DPoP
    const jkt = boundKey(claims);
    if (jkt !== undefined || requireDpop || authScheme === 'DPoP') {
      const dpop = await checkDpop({ request, method, target, hostHeader, headers, token, authScheme, jkt, now });
      if (dpop) return dpop;
    }

    // 5. exactly one countersign_call entry
    const entries = callEntries(claims);
    if (entries.length !== 1) {
      return refusal(
        'binding_missing',
        entries.length === 0
          ? 'The token names no call (no countersign_call authorization detail).'
          : 'The token holds more than one countersign_call authorization detail.',
      );
    }
    const entry = entries[0];
    if (typeof entry.approval !== 'string' || entry.approval === '') {
      // Without the approval id the binding is unusable (contract: binding_missing).
      return refusal('binding_missing', 'The token\'s countersign_call entry names no approval.');
    }

    // 6-10. the entry names this call (a field missing or not a string differs)
    if (entry.version !== '1') {
      return mismatch('version', 'The token\'s call binding is not version "1".');
    }
    if (entry.method !== method) {
      return mismatch('method', 'The token was issued for a call with another method.');
    }
    if (entry.target !== target) {
      return mismatch('target', 'The token was issued for a call to another target.');
    }
    const host = expectedHost ?? hostHeader;
    if (typeof entry.host !== 'string' || typeof host !== 'string' || entry.host.toLowerCase() !== host.toLowerCase()) {
      return mismatch('host', 'The token was issued for a call to another host.');
    }
    if (entry.body_sha256 !== b64urlSha256(body)) {
      return mismatch('body', 'The token was issued for a call with another body.');
    }

    // C1-C5. four eyes: enough others approved this very call. Before the
    // replay check, so a call refused here does not use up the approval.
    const countersigned = await checkCountersigners(headers, claims, entry);
    if (!countersigned.ok) return countersigned;

    // 11. the approval is accepted once (only the person's approval id)
    const keepUntil = claims.exp + CLOCK_TOLERANCE_SECONDS;
    if (!approvals.remember(entry.approval, keepUntil, now)) {
      return refusal('approval_replayed', 'This approved call was already accepted once.');
    }

    return {
      ok: true,
      subject: claims.sub,
      approval: entry.approval,
      claims,
      binding: entry,
      countersigners: countersigned.countersigners,
    };
  }

  // Check 2 (and C2): {claims}, or {invalid: the refusal's detail}.
  async function verifyToken(token) {
    let claims;
    try {
      ({ payload: claims } = await jwtVerify(token, jwks, {
        issuer,
        audience,
        algorithms: [...ALGORITHMS],
        clockTolerance: CLOCK_TOLERANCE_SECONDS,
        requiredClaims: ['exp'],
      }));
    } catch (error) {
      return { invalid: tokenInvalidDetail(error) };
    }
    if (typeof claims.sub !== 'string') {
      return { invalid: 'The access token has no subject (a string sub).' };
    }
    return { claims };
  }

  // Check 3 (and C2): the required scopes the space-separated `scope` claim lacks.
  function lackingScopes(claims) {
    const granted = new Set(typeof claims.scope === 'string' ? claims.scope.split(' ') : []);
    return requiredScopes.filter((s) => !granted.has(s));
  }

  // C1-C5 for the person's token's `claims` and binding `entry`: {ok: true,
  // countersigners} (the distinct subs besides the person's, in header order)
  // or a refusal. Nothing is required, or read, when requiredCountersigners is 0.
  async function checkCountersigners(headers, claims, entry) {
    if (requiredCountersigners === 0) return { ok: true, countersigners: [] };
    const tokens = countersignTokens(headers);
    if (!Array.isArray(tokens)) return tokens;
    // Each check on every token before the next check: the contract's order.
    const all = [];
    for (const [index, token] of tokens.entries()) {
      const verified = await verifyToken(token);
      if (verified.invalid) return countersignInvalid('token', index, verified.invalid);
      const lacking = lackingScopes(verified.claims);
      if (lacking.length > 0) {
        return countersignInvalid('token', index, `The token lacks the scope ${lacking.join(' ')}.`);
      }
      all.push(verified.claims);
    }
    for (const [index, countersign] of all.entries()) {
      const own = callEntries(countersign);
      if (own.length !== 1 || !isDeepStrictEqual(own[0], entry)) {
        return countersignInvalid('binding', index, 'Its countersign_call entry is not the approved call\'s.');
      }
    }
    for (const [index, countersign] of all.entries()) {
      // No DPoP proof of its own: bound to the person's key, which check 4 proved.
      if (!isDeepStrictEqual(boundKey(countersign), boundKey(claims))) {
        return countersignInvalid('key', index, 'Its cnf.jkt is not the approver\'s token\'s.');
      }
    }
    return enoughCountersigners(all, claims.sub, requiredCountersigners);
  }

  async function checkDpop({ request, method, target, hostHeader, headers, token, authScheme, jkt, now }) {
    const proofs_ = headerValues(headers, 'dpop');
    if (authScheme !== 'DPoP') {
      return refusal(
        'dpop_proof_missing',
        jkt === undefined
          ? 'This API requires DPoP: the token must be sent with the DPoP scheme and a proof.'
          : 'The token is DPoP-bound but was sent with the Bearer scheme.',
      );
    }
    if (proofs_.length !== 1 || proofs_[0] === '') {
      return refusal(
        'dpop_proof_missing',
        proofs_.length > 1 ? 'The request has more than one DPoP header.' : 'The request has no DPoP proof.',
      );
    }
    if (jkt === undefined && requireDpop) {
      return refusal('dpop_proof_missing', 'This API requires DPoP-bound tokens; the token is not bound to a key.');
    }
    const proof = proofs_[0];
    const invalid = (field, detail) => refusal('dpop_proof_invalid', detail, { field });

    let header;
    let payload;
    try {
      header = decodeProtectedHeader(proof);
      if (header.typ !== 'dpop+jwt') return invalid('proof', 'The DPoP proof\'s typ is not dpop+jwt.');
      const verified = await compactVerify(proof, EmbeddedJWK, { algorithms: [...ALGORITHMS] });
      payload = JSON.parse(new TextDecoder().decode(verified.payload));
    } catch {
      return invalid('proof', 'The DPoP proof is not a JWT signed by the public key in its header.');
    }
    if (!payload || typeof payload !== 'object' || Array.isArray(payload) || typeof payload.jti !== 'string' || payload.jti === '') {
      return invalid('proof', 'The DPoP proof has no jti.');
    }
    if (payload.htm !== method) {
      return invalid('htm', 'The DPoP proof was made for another method.');
    }
    const expectedUrl = externalUrl !== undefined
      ? `${externalUrl}${targetPath(target)}`
      : request.url ?? `http://${hostHeader}${target}`;
    const expectedHtu = htuKey(expectedUrl);
    if (expectedHtu === null || htuKey(payload.htu) !== expectedHtu) {
      return invalid('htu', 'The DPoP proof was made for another URL.');
    }
    if (typeof payload.iat !== 'number' || Math.abs(now - payload.iat) > dpopWindowSeconds) {
      return invalid('iat', 'The DPoP proof\'s iat is outside the accepted window.');
    }
    if (payload.ath !== b64urlSha256(Buffer.from(token, 'ascii'))) {
      return invalid('ath', 'The DPoP proof was made for another access token.');
    }
    let thumbprint;
    try {
      thumbprint = await calculateJwkThumbprint(header.jwk, 'sha256');
    } catch {
      return invalid('proof', 'The DPoP proof\'s jwk has no thumbprint.');
    }
    if (jkt === undefined || thumbprint !== jkt) {
      return invalid('key', 'The DPoP proof was signed by a key the token is not bound to.');
    }
    if (!proofs.remember(`${thumbprint}:${payload.jti}`, payload.iat + dpopWindowSeconds, now)) {
      return refusal('dpop_proof_replayed', 'This DPoP proof was already presented.');
    }
    return null;
  }

  return {
    verify,
    options: Object.freeze({
      issuer,
      audience,
      jwksUri,
      requiredScopes: Object.freeze(requiredScopes),
      host: expectedHost,
      externalUrl,
      requireDpop,
      dpopWindowSeconds,
      maxBodyBytes,
      requiredCountersigners,
    }),
  };
}

// C1: the tokens of the one Countersign-Tokens field (a refusal otherwise).
// Empty list elements are ignored (RFC 9110 §5.6.1).
function countersignTokens(headers) {
  const fields = headerFields(headers, 'countersign-tokens');
  if (fields.length !== 1) {
    return refusal(
      'countersign_missing',
      fields.length === 0
        ? 'This API requires countersigned calls: the request has no Countersign-Tokens header.'
        : 'The request has more than one Countersign-Tokens header.',
    );
  }
  const tokens = fields[0].split(',').map((t) => t.trim()).filter((t) => t !== '');
  if (tokens.length === 0) return refusal('countersign_missing', 'The Countersign-Tokens header holds no token.');
  return tokens;
}

// C5: at least `required` distinct subs besides the person's.
function enoughCountersigners(all, person, required) {
  const others = [...new Set(all.map((c) => c.sub))].filter((sub) => sub !== person);
  if (others.length < required) {
    const noun = required === 1 ? 'countersigner' : 'countersigners';
    const verb = required === 1 ? 'is' : 'are';
    return refusal(
      'countersign_insufficient',
      `${required} distinct ${noun} besides ${person} ${verb} required; the call carries ${others.length}.`,
    );
  }
  return { ok: true, countersigners: others };
}

// A countersign_invalid on `field`, naming the token by its position; `why`
// is a sentence of its own, continued after a colon.
function countersignInvalid(field, index, why) {
  const continued = why.charAt(0).toLowerCase() + why.slice(1);
  return refusal('countersign_invalid', `The ${ordinal(index + 1)} countersign token: ${continued}`, { field });
}

// `1st`, `2nd`, `3rd`, `4th`, ..., `11th`, `12th`, `13th`, `21st`, ...
function ordinal(n) {
  const suffix = n % 100 >= 11 && n % 100 <= 13 ? 'th' : { 1: 'st', 2: 'nd', 3: 'rd' }[n % 10] ?? 'th';
  return `${n}${suffix}`;
}

// Check 5 (and C3): the token's countersign_call entries; exactly one is a binding.
function callEntries(claims) {
  const details = Array.isArray(claims.authorization_details) ? claims.authorization_details : [];
  return details.filter((d) => d && typeof d === 'object' && d.type === 'countersign_call');
}

// Check 4 (and C4): the cnf.jkt the token is bound to, if any.
function boundKey(claims) {
  return claims.cnf && typeof claims.cnf === 'object' ? claims.cnf.jkt : undefined;
}

function mismatch(field, detail) {
  return refusal('binding_mismatch', detail, { field });
}

/** The authorization server's key set could not be obtained. */
class KeysUnavailable extends Error {
  constructor(options) {
    super('the JWKS could not be fetched', options);
  }
}

function tokenInvalidDetail(error) {
  if (error instanceof KeysUnavailable) {
    return 'The authorization server\'s keys could not be fetched to verify the access token.';
  }
  if (error instanceof joseErrors.JWTExpired) return 'The access token has expired.';
  if (error instanceof joseErrors.JWTClaimValidationFailed) {
    if (error.claim === 'iss') return 'The access token was not issued by the expected issuer.';
    if (error.claim === 'aud') return 'The access token is not meant for this API (audience).';
    if (error.claim === 'nbf') return 'The access token is not valid yet (nbf).';
    if (error.claim === 'exp') return 'The access token has no expiry (exp).';
    return 'The access token\'s claims are not valid.';
  }
  if (error instanceof joseErrors.JWSSignatureVerificationFailed) {
    return 'The access token\'s signature does not verify.';
  }
  if (error instanceof joseErrors.JWKSNoMatchingKey) {
    return 'The access token is not signed by a key of the authorization server.';
  }
  if (error instanceof joseErrors.JOSEAlgNotAllowed) {
    return 'The access token is not signed with an accepted (asymmetric) algorithm.';
  }
  return 'The access token is not a valid JWT.';
}
