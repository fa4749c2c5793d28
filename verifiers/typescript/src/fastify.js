// Fastify plugin and hook: a preParsing hook reads the raw body, verifies the
// call and either refuses it (application/problem+json; the handler never
// runs) or sets request.countersign = {subject, approval, claims, binding,
// countersigners} and request.rawBody, then hands the same bytes on to Fastify's content-type
// parsers (so request.body is parsed as usual).
//
//   app.register(countersign, { issuer, audience, jwksUri, requiredScopes })
//
// guards every route of the context it is registered in (and its children),
// like a plugin wrapped with fastify-plugin. For one route only:
//
//   app.post('/shop', { preParsing: countersignHook(options) }, handler)

import { Readable } from 'node:stream';

import { createVerifier } from './index.js';
import { BodyTooLarge, describe, readRawBody, requestInfo, tooLarge } from './node.js';

/** A Fastify preParsing hook verifying the call (`options` or a verifier from createVerifier). */
export function countersignHook(optionsOrVerifier) {
  const verifier =
    typeof optionsOrVerifier?.verify === 'function' ? optionsOrVerifier : createVerifier(optionsOrVerifier);
  const { maxBodyBytes } = verifier.options;

  async function refuse(reply, status, problem, headers) {
    reply.code(status).headers(headers).type('application/problem+json').send(JSON.stringify(problem));
    await reply; // resolves once the answer is written (Reply is thenable)
    if (!reply.sent) {
      // the connection died first: make sure the handler still never runs
      const error = new Error('countersign: call refused');
      error.statusCode = status;
      throw error;
    }
    return undefined;
  }

  return async function countersignPreParsing(request, reply, payload) {
    let body;
    try {
      body = await readRawBody(payload, maxBodyBytes, request.headers['content-length']);
    } catch (error) {
      if (!(error instanceof BodyTooLarge)) throw error;
      const refused = tooLarge(maxBodyBytes);
      return refuse(reply, refused.status, refused.problem, refused.headers);
    }
    // request.raw.url: the request-target as received (request.url may be rewritten)
    const result = await verifier.verify(describe(request.raw, body, request.raw.url));
    if (!result.ok) return refuse(reply, result.status, result.problem, result.headers);
    request.rawBody = body;
    request.countersign = requestInfo(result);
    const stream = Readable.from(body.length > 0 ? [body] : []);
    stream.receivedEncodedLength = body.length;
    return stream;
  };
}

/** Fastify plugin: guards every route of the context it is registered in. */
export function countersign(fastify, options, done) {
  const { verifier, ...verifierOptions } = options ?? {};
  const hook = countersignHook(verifier ?? verifierOptions);
  if (!fastify.hasRequestDecorator('countersign')) fastify.decorateRequest('countersign', null);
  if (!fastify.hasRequestDecorator('rawBody')) fastify.decorateRequest('rawBody', null);
  fastify.addHook('preParsing', hook);
  done();
}

// Like fastify-plugin: apply to the context that registers the plugin, not to a child of it.
countersign[Symbol.for('skip-override')] = true;
countersign[Symbol.for('fastify.display-name')] = '@countersign/verify';

export default countersign;
