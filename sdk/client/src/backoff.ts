// The reconnect and retry delay: exponential backoff with full jitter.
//
// It owns the formula delay = random(0, min(max, min * 2^attempt)) and nothing else. It
// must never keep state or read a clock: callers count attempts and inject `random` (tests
// pass a fixed one).

/** Full-jitter delay in ms for retry number `attempt` (0 for the first retry). */
export function backoffDelay(attempt: number, minMs: number, maxMs: number, random: () => number = Math.random): number {
  const ceiling = Math.min(maxMs, minMs * 2 ** Math.min(Math.max(attempt, 0), 30));
  return Math.floor(random() * ceiling);
}
