// Express middleware: reads the raw body itself, verifies the call, and on
// success sets req.countersign = {subject, approval, claims, binding,
// countersigners}, req.rawBody (a Buffer) and, for a JSON content type,
// req.body (parsed), so JSON handlers work without express.json(). A refused call gets
// application/problem+json and never reaches the next handler.
//
// Mount it before any body parser (they would consume the body it must hash).

import { createVerifier } from './index.js';
import {
  BodyTooLarge, describe, isJson, readRawBody, requestInfo, tooLarge, writeProblem,
} from './node.js';

/** `countersign(options)` or `countersign(verifier)`: an Express middleware. */
export function countersign(optionsOrVerifier) {
  const verifier =
    typeof optionsOrVerifier?.verify === 'function' ? optionsOrVerifier : createVerifier(optionsOrVerifier);
  const { maxBodyBytes } = verifier.options;

  return function countersignMiddleware(req, res, next) {
    run(req, res).then(
      (proceed) => proceed && next(),
      (error) => next(error),
    );
  };

  async function run(req, res) {
    let body;
    if (Buffer.isBuffer(req.rawBody)) {
      body = req.rawBody;
    } else if (req._body || req.readableEnded) {
      throw new Error(
        'countersign: the request body was already read (mount the countersign middleware before body parsers)',
      );
    } else {
      try {
        body = await readRawBody(req, maxBodyBytes, req.headers['content-length']);
      } catch (error) {
        if (!(error instanceof BodyTooLarge)) throw error;
        const refused = tooLarge(maxBodyBytes);
        writeProblem(res, refused.status, refused.problem, refused.headers);
        return false;
      }
    }
    // Express's own router may have rewritten req.url; originalUrl is the target as received.
    const result = await verifier.verify(describe(req, body, req.originalUrl ?? req.url));
    if (!result.ok) {
      writeProblem(res, result.status, result.problem, result.headers);
      return false;
    }
    req.rawBody = body;
    req.countersign = requestInfo(result);
    // body-parser skips requests marked as parsed; the stream is spent anyway.
    req._body = true;
    const encoding = String(req.headers['content-encoding'] ?? 'identity').toLowerCase();
    if (isJson(req.headers['content-type']) && body.length > 0 && encoding === 'identity') {
      try {
        req.body = JSON.parse(body.toString('utf8'));
      } catch {
        const error = new SyntaxError('countersign: the request body is not valid JSON');
        error.status = 400;
        error.statusCode = 400;
        error.expose = true;
        error.type = 'entity.parse.failed';
        throw error;
      }
    }
    return true;
  }
}

export default countersign;
