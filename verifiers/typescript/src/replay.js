// In-memory replay cache: remembers keys until their expiry (seconds since the
// epoch) and answers whether a key is new. Expired entries are swept at most
// every 10 s, on insertion, so memory stays proportional to the live entries.

const SWEEP_EVERY_SECONDS = 10;

export class ReplayCache {
  #entries = new Map();
  #nextSweep = 0;

  /** True (and remembered until `expiresAt`) if `key` was not seen; false if it is a replay. */
  remember(key, expiresAt, now = Date.now() / 1000) {
    if (now >= this.#nextSweep) {
      for (const [k, until] of this.#entries) if (until < now) this.#entries.delete(k);
      this.#nextSweep = now + SWEEP_EVERY_SECONDS;
    }
    const until = this.#entries.get(key);
    if (until !== undefined && until >= now) return false;
    this.#entries.set(key, expiresAt);
    return true;
  }

  get size() {
    return this.#entries.size;
  }
}
