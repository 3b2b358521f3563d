// One channel subscription: its state machine, its stream position and its events.
//
// It owns what the subscriber sees: the position (epoch + last offset delivered), the
// recovery decision on every (re)subscribe, dropping duplicates (offset <= last delivered
// in the same epoch), holding pushes back while the `getState` hook runs, and resubscribing
// after the server ends the subscription with 4100 (moved) or 4008 (history trimmed). It
// must never talk to the socket itself (only through its `SubscriptionHost`), never
// deliver a message twice or out of order within an epoch, and never report
// `recovered: true` unless the server did.

import { Emitter } from './events.js';
import { SwitchyardError } from './errors.js';
import { CLOSE_SHUTTING_DOWN, CLOSE_SLOW_CONSUMER } from './protocol.js';
import type { From, Message, Position, PresenceEntry, PresencePush, SubscribeReply, UnsubscribedPush } from './protocol.js';

export type SubscriptionState = 'unsubscribed' | 'subscribing' | 'subscribed';

export interface SubscriptionOptions {
  /** Where a first subscribe starts (default `latest`). A `{offset, epoch}` resumes a stream saved earlier. */
  from?: From;
  /** A durable consumer: a first subscribe starts after its committed offset. */
  consumer?: string;
  /**
   * Called when recovery fails (the epoch changed, or the missed messages are gone), after
   * the `recoveryFailed` event and before any further message is delivered: reload the
   * application's state here (for example with `client.historyAll`).
   */
  getState?: (info: RecoveryFailed) => Promise<void>;
}

/** The `subscribed` event: the server accepted the subscription. */
export interface Subscribed {
  /** True when a held position was recovered: every missed message follows, in order. */
  recovered: boolean;
  epoch: string;
  /** The channel's top offset when the server answered. */
  offset: number;
}

/** The `recoveryFailed` event: messages between `previous` and the new position may be lost. */
export interface RecoveryFailed {
  previous: Position;
  epoch: string;
  offset: number;
}

export type SubscriptionEvents = {
  state: SubscriptionState;
  message: Message;
  subscribed: Subscribed;
  recoveryFailed: RecoveryFailed;
  unsubscribed: { code?: number; reason: string };
  /** A client joined the channel's presence (namespaces with `join_leave`). */
  join: PresenceEntry;
  /** A client left the channel's presence. */
  leave: PresenceEntry;
  error: Error;
};

/** What a subscription needs from its client. */
export interface SubscriptionHost {
  connected(): boolean;
  command(op: string, fields: Record<string, unknown>, onOk: (ok: Record<string, unknown>) => void, onErr: (err: SwitchyardError) => void): void;
  retryDelay(attempt: number): number;
}

/** Server error codes after which subscribing again later may succeed. */
const RETRYABLE = new Set(['unavailable', 'rate_limited']);

export class Subscription extends Emitter<SubscriptionEvents> {
  readonly channel: string;
  private readonly opts: SubscriptionOptions;
  private readonly host: SubscriptionHost;
  private current: SubscriptionState = 'unsubscribed';
  private wanted = false;
  private pos: Position | undefined;
  /** Bumped by every subscribe sent and every teardown: stale replies and pushes are ignored. */
  private gen = 0;
  /** Pushes held back while `getState` runs. */
  private held: Message[] | undefined;
  private retries = 0;
  private retryTimer: ReturnType<typeof setTimeout> | undefined;
  /** The latest `subscribed` event, for `subscribe()` calls on an active subscription. */
  private last: Subscribed | undefined;
  private waiters: { resolve: (s: Subscribed) => void; reject: (e: Error) => void }[] = [];

  /** @internal Created by `Switchyard.subscription`. */
  constructor(channel: string, opts: SubscriptionOptions, host: SubscriptionHost) {
    super();
    this.channel = channel;
    this.opts = opts;
    this.host = host;
    if (opts.from !== undefined && typeof opts.from === 'object') this.pos = { ...opts.from };
  }

  get state(): SubscriptionState {
    return this.current;
  }

  /** The last delivered position (epoch and offset), to save and resume from later. */
  get position(): Position | undefined {
    return this.pos ? { ...this.pos } : undefined;
  }

  /**
   * Subscribes (now, or as soon as the client is connected) and keeps the subscription up
   * across reconnects. Resolves on the server's acceptance; rejects on a refusal
   * (`forbidden`, `bad_request`, ...) or when `unsubscribe()` is called first.
   */
  subscribe(): Promise<Subscribed> {
    if (this.current === 'subscribed' && this.last) return Promise.resolve(this.last);
    const done = new Promise<Subscribed>((resolve, reject) => this.waiters.push({ resolve, reject }));
    if (!this.wanted) {
      this.wanted = true;
      this.retries = 0;
      this.setState('subscribing');
      if (this.host.connected()) this.send();
    }
    return done;
  }

  /** Ends the subscription. The position is kept: a later `subscribe()` resumes from it. */
  unsubscribe(): void {
    if (!this.wanted) return;
    const wasUp = this.current !== 'unsubscribed';
    this.teardown();
    this.wanted = false;
    if (wasUp && this.host.connected()) this.host.command('unsubscribe', { channel: this.channel }, () => {}, () => {});
    this.end(new SwitchyardError('cancelled', 'unsubscribe() was called'), { reason: 'unsubscribe() was called' });
  }

  /** @internal The client's connection became ready. */
  onConnected(): void {
    if (this.wanted && this.current === 'subscribing') this.send();
  }

  /** @internal The client's connection ended; a wanted subscription waits for the next one. */
  onDisconnected(): void {
    this.teardown();
    if (this.wanted) this.setState('subscribing');
  }

  /** @internal A `message` push for this channel. */
  onMessage(msg: Message): void {
    if (this.current !== 'subscribed') return; // a stale subscription's push: recovery covers it
    if (this.held) this.held.push(msg);
    else this.deliver(msg);
  }

  /** @internal A `join` or `leave` push for this channel. */
  onPresence(push: PresencePush): void {
    if (this.current !== 'subscribed') return;
    this.emit(push.push, push.info);
  }

  /** @internal An `unsubscribed` push for this channel. */
  onUnsubscribed(push: UnsubscribedPush): void {
    if (!this.wanted) return;
    this.teardown();
    if (push.code === CLOSE_SHUTTING_DOWN || push.code === CLOSE_SLOW_CONSUMER) {
      this.setState('subscribing');
      if (this.host.connected()) this.send();
      return;
    }
    this.wanted = false;
    this.end(new SwitchyardError('unsubscribed', `${push.code} ${push.reason}`), { code: push.code, reason: push.reason });
  }

  private send(): void {
    const gen = ++this.gen;
    const held = this.pos;
    const fields: Record<string, unknown> = { channel: this.channel };
    if (held) {
      fields.from = { offset: held.offset, epoch: held.epoch };
    } else {
      if (this.opts.from !== undefined) fields.from = this.opts.from;
      if (this.opts.consumer !== undefined) fields.consumer = this.opts.consumer;
    }
    this.host.command(
      'subscribe',
      fields,
      (ok) => {
        if (gen === this.gen) this.accepted(gen, ok as unknown as SubscribeReply, held);
      },
      (err) => {
        if (gen === this.gen) this.refused(err);
      },
    );
  }

  private accepted(gen: number, reply: SubscribeReply, held: Position | undefined): void {
    this.retries = 0;
    this.setState('subscribed');
    const recovered = held !== undefined && reply.recovered === true;
    // A channel that was empty and still is lost nothing, whatever epoch it now reports.
    const nothingLost = held !== undefined && held.offset === 0 && reply.offset === 0;
    if (held && !recovered && nothingLost) {
      this.pos = { epoch: reply.epoch, offset: 0 };
    } else if (held && !recovered) {
      this.pos = { epoch: reply.epoch, offset: reply.offset };
      const info: RecoveryFailed = { previous: held, epoch: reply.epoch, offset: reply.offset };
      this.emit('recoveryFailed', info);
      if (this.opts.getState) {
        this.held = [];
        this.opts.getState(info).then(
          () => this.release(gen),
          (err: unknown) => {
            this.emit('error', err instanceof Error ? err : new Error(String(err)));
            this.release(gen);
          },
        );
      }
    } else if (!held && this.opts.consumer === undefined && (this.opts.from === undefined || this.opts.from === 'latest')) {
      // Live only: everything after the reply's offset is what this subscriber asked for.
      this.pos = { epoch: reply.epoch, offset: reply.offset };
    } else if (!held && typeof this.opts.from === 'number') {
      this.pos = { epoch: reply.epoch, offset: this.opts.from };
    }
    const event: Subscribed = { recovered, epoch: reply.epoch, offset: reply.offset };
    this.last = event;
    this.emit('subscribed', event);
    for (const w of this.waiters.splice(0)) w.resolve(event);
  }

  private release(gen: number): void {
    if (gen !== this.gen) return; // torn down meanwhile: the position recovers the rest
    const held = this.held ?? [];
    this.held = undefined;
    for (const msg of held) this.deliver(msg);
  }

  private refused(err: SwitchyardError): void {
    if (err.code === 'disconnected') return; // resent when the client is connected again
    if (RETRYABLE.has(err.code)) {
      this.emit('error', err);
      this.retryTimer = setTimeout(() => {
        this.retryTimer = undefined;
        if (this.wanted && this.current === 'subscribing' && this.host.connected()) this.send();
      }, this.host.retryDelay(this.retries++));
      return;
    }
    this.wanted = false;
    this.teardown();
    this.end(err, { reason: err.message });
  }

  private deliver(msg: Message): void {
    const pos = this.pos;
    if (pos && msg.epoch === pos.epoch && msg.offset <= pos.offset) return; // a duplicate
    this.pos = { epoch: msg.epoch, offset: msg.offset };
    this.emit('message', msg);
  }

  /** Forgets the in-flight subscribe, held pushes and retry timer. */
  private teardown(): void {
    this.gen++;
    this.held = undefined;
    if (this.retryTimer !== undefined) clearTimeout(this.retryTimer);
    this.retryTimer = undefined;
  }

  private end(err: Error, event: { code?: number; reason: string }): void {
    this.setState('unsubscribed');
    if (!(err instanceof SwitchyardError && err.code === 'cancelled')) this.emit('error', err);
    this.emit('unsubscribed', event);
    for (const w of this.waiters.splice(0)) w.reject(err);
  }

  private setState(next: SubscriptionState): void {
    if (next === this.current) return;
    this.current = next;
    this.emit('state', next);
  }
}
