// Reading a JWT's expiry and choosing when to refresh it.
//
// It owns decoding the payload (base64url JSON) without verifying it, and the refresh
// schedule: at REFRESH_AT of the remaining lifetime. It must never verify signatures or
// trust the token for anything but timing: the server is the authority.

/** Fraction of the remaining lifetime after which the token is refreshed. */
export const REFRESH_AT = 0.85;

/** The `exp` claim in ms since the Unix epoch, or undefined when absent or unreadable. */
export function tokenExpiryMs(token: string): number | undefined {
  const part = token.split('.')[1];
  if (!part) return undefined;
  try {
    const b64 = part.replace(/-/g, '+').replace(/_/g, '/');
    const padded = b64 + '='.repeat((4 - (b64.length % 4)) % 4);
    const bin = atob(padded);
    const bytes = Uint8Array.from(bin, (c) => c.charCodeAt(0));
    const payload: unknown = JSON.parse(new TextDecoder().decode(bytes));
    if (payload && typeof payload === 'object' && typeof (payload as { exp?: unknown }).exp === 'number') {
      return (payload as { exp: number }).exp * 1000;
    }
  } catch {
    // not a JWT: nothing to schedule
  }
  return undefined;
}

/** How long to wait before refreshing a token that expires at `expMs` (0 when overdue). */
export function refreshDelayMs(expMs: number, nowMs: number): number {
  return Math.max(0, Math.floor((expMs - nowMs) * REFRESH_AT));
}
