// The queue of requests that must reach the server: publish, history and commit.
//
// It owns each request's deadline, sending it when the client is connected, resending it
// after a reconnect (in the order the requests were made) or after a retryable refusal
// (`unavailable`, `rate_limited`, with backoff), and settling its promise exactly once.
// It must never change a request's fields between sends (a publish keeps its
// idempotency key, so a resend is stored once) and never send while disconnected.

import { SwitchyardError } from './errors.js';

type Ok = Record<string, unknown>;

/** What the queue needs from its client. */
export interface RequestHost {
  connected(): boolean;
  command(op: string, fields: Record<string, unknown>, onOk: (ok: Ok) => void, onErr: (err: SwitchyardError) => void): void;
  retryDelay(attempt: number): number;
}

interface Request {
  op: string;
  fields: Record<string, unknown>;
  resolve: (ok: Ok) => void;
  reject: (e: Error) => void;
  inFlight: boolean;
  attempt: number;
  deadline: ReturnType<typeof setTimeout>;
  retry: ReturnType<typeof setTimeout> | undefined;
}

/** Server error codes after which a request is sent again. */
const RETRYABLE = new Set(['unavailable', 'rate_limited']);

export class RequestQueue {
  private readonly queue: Request[] = [];

  constructor(private readonly host: RequestHost) {}

  /** Resolves with the reply's `ok`; rejects on a refusal or with `timeout` after `timeoutMs`. */
  request(op: string, fields: Record<string, unknown>, timeoutMs: number): Promise<Ok> {
    return new Promise((resolve, reject) => {
      const r: Request = {
        op,
        fields,
        resolve,
        reject,
        inFlight: false,
        attempt: 0,
        retry: undefined,
        deadline: setTimeout(() => this.settle(r, undefined, new SwitchyardError('timeout', `${op} not acknowledged within ${timeoutMs} ms`)), timeoutMs),
      };
      this.queue.push(r);
      if (this.host.connected()) this.send(r);
    });
  }

  /** Sends every request that is neither in flight nor waiting to retry, in order (after a connect). */
  flush(): void {
    for (const r of this.queue) if (!r.inFlight && r.retry === undefined) this.send(r);
  }

  /** Fails every waiting request with `err` (the client stopped for good). */
  failAll(err: Error): void {
    for (const r of [...this.queue]) this.settle(r, undefined, err);
  }

  private send(r: Request): void {
    r.inFlight = true;
    this.host.command(
      r.op,
      r.fields,
      (ok) => this.settle(r, ok, undefined),
      (err) => {
        r.inFlight = false;
        if (!this.queue.includes(r) || err.code === 'disconnected') return; // flush() resends it
        if (!RETRYABLE.has(err.code)) return this.settle(r, undefined, err);
        r.retry = setTimeout(() => {
          r.retry = undefined;
          if (this.host.connected() && !r.inFlight) this.send(r);
        }, this.host.retryDelay(r.attempt++));
      },
    );
  }

  private settle(r: Request, ok: Ok | undefined, err: Error | undefined): void {
    const i = this.queue.indexOf(r);
    if (i < 0) return;
    this.queue.splice(i, 1);
    clearTimeout(r.deadline);
    if (r.retry !== undefined) clearTimeout(r.retry);
    if (err) r.reject(err);
    else r.resolve(ok!);
  }
}
