import type { JWTPayload } from 'jose';

export interface VerifierOptions {
  /** The authorization server's issuer; the token's `iss` must equal it. */
  issuer: string;
  /** This API's audience; the token's `aud` must hold it. */
  audience: string;
  /** The authorization server's JWKS URL (fetched and cached by jose). */
  jwksUri: string;
  /** Scopes the token's space-separated `scope` claim must all hold (default none). */
  requiredScopes?: string[];
  /** The host the binding must name, instead of the Host header received (behind another proxy). */
  host?: string;
  /** The URL clients reach this API at (scheme, authority and any path prefix), for DPoP `htu`. */
  externalUrl?: string;
  /** Refuse tokens that are not DPoP-bound (`cnf.jkt`), with `dpop_proof_missing` (default false). */
  requireDpop?: boolean;
  /** Accepted DPoP `iat` distance from now, either way, in seconds (default 60). */
  dpopWindowSeconds?: number;
  /** Largest body the Express and Fastify adapters read (default 1 MiB); larger bodies get 413. */
  maxBodyBytes?: number;
  /**
   * Four eyes: how many people besides the approver must have countersigned the call, with their
   * tokens in the `Countersign-Tokens` header (checks C1-C5). Default 0: the header is ignored.
   */
  requiredCountersigners?: number;
}

export type HeaderInput =
  | Record<string, string | string[] | undefined>
  | Headers
  | string[];

export interface VerifyRequest {
  /** The request method, as received (`POST`). */
  method: string;
  /** The raw request-target (path and query exactly as on the wire). */
  target: string;
  /** The Host header received (taken from `headers` when absent). */
  host?: string;
  /**
   * The request headers; repeated fields must stay apart (Node: `req.headersDistinct`). A WHATWG
   * `Headers` has joined them: two `Countersign-Tokens` fields then read as one.
   */
  headers: HeaderInput;
  /** The exact body bytes received. */
  body?: Uint8Array;
  /** The full request URL, for DPoP `htu` (default `http://<host><target>`). */
  url?: string;
}

/** The `countersign_call` entry of the token's `authorization_details`. */
export interface CallBinding {
  type: 'countersign_call';
  version: '1';
  approval: string;
  method: string;
  target: string;
  host: string;
  body_sha256: string;
  tool?: string;
}

export interface Accepted {
  ok: true;
  /** The token's `sub` (a token without a string `sub` is refused, `token_invalid`). */
  subject: string;
  approval: string;
  claims: JWTPayload & { scope?: string; cnf?: { jkt?: string }; authorization_details?: unknown[] };
  binding: CallBinding;
  /**
   * The distinct `sub`s of the countersign tokens besides the approver's, in header order
   * (empty when `requiredCountersigners` is 0).
   */
  countersigners: string[];
}

/** What the Express and Fastify adapters set on an accepted request (`countersign`). */
export interface CountersignRequestInfo
  extends Pick<Accepted, 'subject' | 'approval' | 'claims' | 'binding' | 'countersigners'> {}

export type ProblemCode =
  | 'token_missing'
  | 'token_invalid'
  | 'insufficient_scope'
  | 'dpop_proof_missing'
  | 'dpop_proof_invalid'
  | 'dpop_proof_replayed'
  | 'binding_missing'
  | 'binding_mismatch'
  | 'approval_replayed'
  | 'countersign_missing'
  | 'countersign_invalid'
  | 'countersign_insufficient'
  /** Answered by the Express and Fastify adapters for a body over `maxBodyBytes` (413). */
  | 'body_too_large';

export interface Problem {
  type: `urn:countersign:problem:${ProblemCode}`;
  title: string;
  status: 401 | 403 | 413;
  code: ProblemCode;
  detail: string;
  /** `version` `method` `target` `host` `body` (binding_mismatch), `proof` `htm` `htu` `iat` `ath` `key` (dpop_proof_invalid), `token` `binding` `key` (countersign_invalid). */
  field?: string;
}

export interface Refused {
  ok: false;
  status: 401 | 403 | 413;
  problem: Problem;
  /** `content-type: application/problem+json`, and `www-authenticate` on 401s. */
  headers: Record<string, string>;
}

export interface Verifier {
  verify(request: VerifyRequest): Promise<Accepted | Refused>;
  readonly options: Readonly<Required<Omit<VerifierOptions, 'host' | 'externalUrl'>> & Pick<VerifierOptions, 'host' | 'externalUrl'>>;
}

export function createVerifier(options: VerifierOptions): Verifier;

/** Builds a refusal for `code`. */
export function refusal(code: ProblemCode, detail: string, options?: { field?: string; scheme?: 'Bearer' | 'DPoP' }): Refused;

/** base64url (no padding) of the SHA-256 of `bytes`. */
export function b64urlSha256(bytes: Uint8Array | string): string;

export const EMPTY_BODY_SHA256: string;
export const ALGORITHMS: readonly string[];
export const CLOCK_TOLERANCE_SECONDS: number;
export const CODES: Readonly<Record<ProblemCode, 401 | 403 | 413>>;
