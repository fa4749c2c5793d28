import type { CountersignRequestInfo, Verifier, VerifierOptions } from './index.js';

export type { CountersignRequestInfo };

declare module 'fastify' {
  interface FastifyRequest {
    countersign: CountersignRequestInfo | null;
    rawBody: Buffer | null;
  }
}

/** A preParsing hook for one route: `{ preParsing: countersignHook(options) }`. */
export function countersignHook(
  optionsOrVerifier: VerifierOptions | Verifier,
): (request: any, reply: any, payload: NodeJS.ReadableStream) => Promise<NodeJS.ReadableStream | undefined>;

/** Fastify plugin guarding every route of the context it is registered in. */
export function countersign(
  fastify: any,
  options: VerifierOptions | { verifier: Verifier },
  done: (error?: Error) => void,
): void;

export default countersign;
