// The error classes the SDK throws or emits.
//
// It owns their names and fields. `SwitchyardError.code` is either a server error code
// from docs/protocol.md (`bad_request`, `forbidden`, `unavailable`, ...) or one of the client's
// own: `disconnected` (the connection ended before the reply), `timeout` (a request's
// deadline passed), `cancelled` (unsubscribe() or disconnect() called while waiting),
// `unsubscribed` (the server ended a subscription for good), `epoch_changed` (history
// paging crossed an epoch change), `bad_frame` (an unreadable frame from the server).
// It must never invent other codes silently: new ones are listed here.

/** An error reply from the server, or a client-side failure of a request. */
export class SwitchyardError extends Error {
  readonly code: string;

  constructor(code: string, message: string) {
    super(`${code}: ${message}`);
    this.name = 'SwitchyardError';
    this.code = code;
  }
}

/**
 * Thrown by a `getToken` callback to say the user can no longer get a token (signed out,
 * banned). The client then disconnects for good instead of retrying.
 */
export class UnauthorizedError extends Error {
  constructor(message = 'unauthorized') {
    super(message);
    this.name = 'UnauthorizedError';
  }
}
