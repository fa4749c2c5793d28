// Helpers shared by the Express and Fastify adapters: read the raw body of a
// Node request (bounded), describe the request to the core, write a refusal.

import { refusal } from './index.js';

export class BodyTooLarge extends Error {
  constructor(limit) {
    super(`request body larger than ${limit} bytes`);
    this.limit = limit;
  }
}

/** Reads the whole stream into one Buffer, rejecting with BodyTooLarge past `limit` bytes. */
export function readRawBody(stream, limit, declaredLength) {
  if (declaredLength !== undefined && Number(declaredLength) > limit) {
    stream.resume();
    return Promise.reject(new BodyTooLarge(limit));
  }
  return new Promise((resolve, reject) => {
    const chunks = [];
    let length = 0;
    let done = false;
    const finish = (error, value) => {
      if (done) return;
      done = true;
      stream.off('data', onData);
      stream.off('end', onEnd);
      stream.off('error', onError);
      if (error) {
        // drop the rest of the body quietly
        stream.on('error', () => {});
        stream.resume();
        reject(error);
      } else {
        resolve(value);
      }
    };
    const onData = (chunk) => {
      const buffer = typeof chunk === 'string' ? Buffer.from(chunk) : chunk;
      length += buffer.length;
      if (length > limit) finish(new BodyTooLarge(limit));
      else chunks.push(buffer);
    };
    const onEnd = () => finish(null, Buffer.concat(chunks, length));
    const onError = (error) => finish(error);
    stream.on('data', onData);
    stream.on('end', onEnd);
    stream.on('error', onError);
  });
}

/** The core's input for a Node IncomingMessage and its raw body. */
// `target` is the request-target as received: not decoded, not re-encoded.
export function describe(req, body, target = req.url) {
  const host = req.headers.host;
  const scheme = req.socket?.encrypted ? 'https' : 'http';
  const url = /^[a-z][a-z0-9+.-]*:\/\//i.test(target) ? target : `${scheme}://${host}${target}`;
  return {
    method: req.method,
    target,
    host,
    // headersDistinct keeps repeated fields apart (Node keeps only the first Authorization).
    headers: req.headersDistinct ?? req.rawHeaders ?? req.headers,
    body,
    url,
  };
}

/** True when the content type is JSON (application/json or any +json). */
export function isJson(contentType) {
  if (typeof contentType !== 'string') return false;
  const type = contentType.split(';')[0].trim().toLowerCase();
  return type === 'application/json' || /^application\/[^/]+\+json$/.test(type);
}

/** The contract's 413 `body_too_large` refusal ({status, problem, headers}). */
export function tooLarge(limit) {
  const refused = refusal('body_too_large', `The request body is larger than ${limit} bytes.`);
  // the rest of the body is not read: do not keep the connection
  return { ...refused, headers: { ...refused.headers, connection: 'close' } };
}

/** What the adapters set on an accepted request (`countersign`). */
export function requestInfo(result) {
  const { subject, approval, claims, binding, countersigners } = result;
  return { subject, approval, claims, binding, countersigners };
}

export function writeProblem(res, status, problem, headers = {}) {
  const text = JSON.stringify(problem);
  res.statusCode = status;
  for (const [name, value] of Object.entries(headers)) res.setHeader(name, value);
  res.setHeader('content-type', 'application/problem+json');
  res.setHeader('content-length', Buffer.byteLength(text));
  res.end(text);
}
