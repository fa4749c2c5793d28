import type { IncomingMessage, ServerResponse } from 'node:http';
import type { CountersignRequestInfo, Verifier, VerifierOptions } from './index.js';

export type { CountersignRequestInfo };

declare global {
  namespace Express {
    interface Request {
      countersign?: CountersignRequestInfo;
      rawBody?: Buffer;
    }
  }
}

/** Express middleware: verifies the call, sets req.countersign, req.rawBody and (JSON) req.body. */
export function countersign(
  optionsOrVerifier: VerifierOptions | Verifier,
): (req: IncomingMessage & Record<string, any>, res: ServerResponse, next: (error?: unknown) => void) => void;

export default countersign;
