// The Switchyard client: one WebSocket at a time, kept alive and authenticated.
//
// It owns the connection state machine (disconnected -> connecting -> connected, back to
// connecting on any loss, with full-jitter backoff and rotation through the URL list), the
// liveness watchdog (server pings or any frame; a `ping` op when idle), token refresh
// before expiry, and routing replies and pushes to their requests and subscriptions (the
// resending of publishes, history and commits is `RequestQueue`'s). It must never hand a
// reply to the wrong request (ids are per client and replies of a dead socket are
// dropped), and never send a command other than `connect` before the connect reply.

import { backoffDelay } from './backoff.js';
import { Emitter } from './events.js';
import { SwitchyardError, UnauthorizedError } from './errors.js';
import { RequestQueue } from './requests.js';
import type { RequestHost } from './requests.js';
import { parseFrame } from './frames.js';
import { refreshDelayMs, tokenExpiryMs } from './jwt.js';
import type {
  ConnectInfo,
  HistoryPage,
  Message,
  PresenceEntry,
  PresencePush,
  PresenceStats,
  PublishResult,
  UnsubscribedPush,
} from './protocol.js';
import { OPEN, resolveWebSocket } from './socket.js';
import type { WebSocketConstructor, WebSocketLike } from './socket.js';
import { Subscription } from './subscription.js';
import type { SubscriptionHost, SubscriptionOptions } from './subscription.js';

export type ClientState = 'disconnected' | 'connecting' | 'connected';

export interface ClientOptions {
  /** Returns a JWT for `connect` and for each refresh; throw `UnauthorizedError` to give up. */
  getToken?: () => Promise<string>;
  /** `name` sent with `connect`. */
  name?: string;
  /** Ask the server to pack several pushes per frame (JSON lines). Default false. */
  batch?: boolean;
  /** Backoff floor in ms (default 500). */
  minBackoffMs?: number;
  /** Backoff cap in ms (default 20000). */
  maxBackoffMs?: number;
  /**
   * Reconnect when nothing (no server ping, no frame) arrived for this long. Default
   * 62500: 2.5 times the server's default `sessions.ping_interval` (25 s). When idle for
   * half of it the client sends a `ping` op, which is what keeps browsers (which cannot
   * see WebSocket pings) alive.
   */
  pingTimeoutMs?: number;
  /** Time allowed to open the socket and get the `connect` reply (default 10000). */
  connectTimeoutMs?: number;
  /**
   * Deadline of a publish, resends included (default 60000). Keep it below the server's
   * `publish.idempotency_window` (2 min) so that a resend is always deduplicated.
   */
  publishTimeoutMs?: number;
  /** Deadline of `history` and `commit`, resends included (default 30000). */
  requestTimeoutMs?: number;
  /** A WebSocket class to use instead of `globalThis.WebSocket` or the `ws` package. */
  WebSocket?: WebSocketConstructor;
  /** Source of randomness for the backoff jitter (tests inject one). */
  random?: () => number;
}

export interface PublishOptions {
  key?: string;
  /** Default: a fresh random UUID. The same key is used for every resend. */
  idempotencyKey?: string;
  timeoutMs?: number;
}

export interface HistoryOptions {
  /** Messages with offset above this (default 0: from the start). */
  since?: number;
  /**
   * Messages with offset below this (exclusive): pages backwards. Only with `reverse`
   * (the server answers `bad_request` otherwise); default: from the channel's top.
   */
  before?: number;
  /**
   * At most this many per page (server default 100, max 1000). 0 returns no messages,
   * only the position (`epoch` and the top `offset`).
   */
  limit?: number;
  /** Newest first: the newest messages of the range instead of the oldest. */
  reverse?: boolean;
}

export type ClientEvents = {
  state: ClientState;
  connecting: { url: string; attempt: number };
  connected: ConnectInfo & { url: string };
  /** A connection ended; `reconnect` false means for good (disconnect(), UnauthorizedError). */
  disconnected: { code: number; reason: string; reconnect: boolean; error?: Error };
  /** The connection's token was replaced by `refresh`. */
  refreshed: { expiresAt: number | undefined };
  /** Failures that do not end the client: a refused refresh, an unreadable frame. */
  error: Error;
};

/** One socket and what belongs to it alone. */
interface Connection {
  ws: WebSocketLike;
  url: string;
  token: string | undefined;
  ready: boolean;
  pending: Map<number, { onOk: (ok: Record<string, unknown>) => void; onErr: (e: SwitchyardError) => void }>;
  lastSeen: number;
  pingOut: boolean;
  timers: ReturnType<typeof setTimeout>[];
  /** The server's `disconnect` push, reported with the close. */
  serverReason: { code: number; reason: string } | undefined;
}

/** Close code the client uses when it drops a socket itself (timeouts). */
const CLOSE_CLIENT = 4000;

export class Switchyard extends Emitter<ClientEvents> {
  private readonly urls: string[];
  private readonly opts: ClientOptions & {
    minBackoffMs: number;
    maxBackoffMs: number;
    pingTimeoutMs: number;
    connectTimeoutMs: number;
    publishTimeoutMs: number;
    requestTimeoutMs: number;
    random: () => number;
  };
  private current: ClientState = 'disconnected';
  private conn: Connection | undefined;
  /** Bumped by each open and by disconnect(): a stale open gives up. */
  private gen = 0;
  private attempt = 0;
  private urlIndex = 0;
  private nextId = 0;
  private reconnectTimer: ReturnType<typeof setTimeout> | undefined;
  private readonly subs = new Map<string, Subscription>();
  /** What subscriptions and the request queue use to send. */
  private readonly host: SubscriptionHost & RequestHost;
  private readonly queue: RequestQueue;
  private readonly onOnline = (): void => {
    if (this.current === 'connecting' && this.reconnectTimer !== undefined) {
      clearTimeout(this.reconnectTimer);
      this.reconnectTimer = undefined;
      this.attempt = 0;
      void this.open();
    }
  };

  constructor(urls: string | string[], opts: ClientOptions = {}) {
    super();
    this.urls = typeof urls === 'string' ? [urls] : [...urls];
    if (this.urls.length === 0) throw new Error('Switchyard: at least one URL is needed');
    this.opts = {
      ...opts,
      minBackoffMs: opts.minBackoffMs ?? 500,
      maxBackoffMs: opts.maxBackoffMs ?? 20000,
      pingTimeoutMs: opts.pingTimeoutMs ?? 62500,
      connectTimeoutMs: opts.connectTimeoutMs ?? 10000,
      publishTimeoutMs: opts.publishTimeoutMs ?? 60000,
      requestTimeoutMs: opts.requestTimeoutMs ?? 30000,
      random: opts.random ?? Math.random,
    };
    this.host = {
      connected: () => this.current === 'connected',
      command: (op, fields, onOk, onErr) => this.command(op, fields, onOk, onErr),
      retryDelay: (attempt) => this.delay(attempt),
    };
    this.queue = new RequestQueue(this.host);
  }

  get state(): ClientState {
    return this.current;
  }

  /**
   * Starts connecting (and reconnecting). Resolves once connected; rejects if the client
   * stops for good first (disconnect(), or `UnauthorizedError` from `getToken`).
   */
  connect(): Promise<void> {
    if (this.current === 'disconnected') {
      this.attempt = 0;
      this.setState('connecting');
      const w = globalThis as { window?: { addEventListener?: (t: string, f: () => void) => void } };
      w.window?.addEventListener?.('online', this.onOnline);
      void this.open();
    }
    return this.connected();
  }

  /** Closes the connection for good: no reconnect; waiting requests fail with `cancelled`. */
  disconnect(): void {
    this.stop({ code: 1000, reason: 'disconnect() was called' });
  }

  /** The subscription of `channel`: the same object on every call (options of later calls are ignored). */
  subscription(channel: string, opts: SubscriptionOptions = {}): Subscription {
    let sub = this.subs.get(channel);
    if (!sub) {
      sub = new Subscription(channel, opts, this.host);
      this.subs.set(channel, sub);
    }
    return sub;
  }

  /** Publishes once: resent with the same idempotency key after reconnects until acknowledged or the deadline. */
  async publish(channel: string, data: unknown, opts: PublishOptions = {}): Promise<PublishResult> {
    const fields: Record<string, unknown> = { channel, data, idempotency_key: opts.idempotencyKey ?? newKey() };
    if (opts.key !== undefined) fields.key = opts.key;
    const ok = await this.queue.request('publish', fields, opts.timeoutMs ?? this.opts.publishTimeoutMs);
    return ok as unknown as PublishResult;
  }

  /** Every client in the channel's presence (`limit_exceeded` past the namespace's `presence_max_list`). */
  async presence(channel: string): Promise<PresenceEntry[]> {
    const ok = await this.queue.request('presence', { channel }, this.opts.requestTimeoutMs);
    return (ok as unknown as { clients: PresenceEntry[] }).clients;
  }

  /** How many clients and distinct users are in the channel's presence. */
  async presenceStats(channel: string): Promise<PresenceStats> {
    const ok = await this.queue.request('presence_stats', { channel }, this.opts.requestTimeoutMs);
    return ok as unknown as PresenceStats;
  }

  /**
   * One page of history and the channel's top offset: messages with `since < offset <
   * before`, oldest first, or with `reverse` newest first (the newest of the range).
   */
  async history(channel: string, opts: HistoryOptions = {}): Promise<HistoryPage> {
    const fields: Record<string, unknown> = { channel };
    if (opts.since !== undefined) fields.since = opts.since;
    if (opts.before !== undefined) fields.before = opts.before;
    if (opts.limit !== undefined) fields.limit = opts.limit;
    if (opts.reverse !== undefined) fields.reverse = opts.reverse;
    const ok = await this.queue.request('history', fields, this.opts.requestTimeoutMs);
    return ok as unknown as HistoryPage;
  }

  /**
   * Pages through history from `since` up to the top offset of the first page (a short
   * page is legal: it pages on from its last offset). With `reverse`, pages backwards
   * instead, newest first, from `before` (or the top) down to `since`, each page asking
   * `before` its last offset. Yields the first page always, then every further page.
   * Throws `epoch_changed` if the channel's epoch changes meanwhile.
   */
  async *historyPages(channel: string, opts: HistoryOptions = {}): AsyncGenerator<HistoryPage> {
    const first = await this.history(channel, opts);
    yield first;
    let page = first;
    for (;;) {
      const last = page.messages[page.messages.length - 1];
      if (!last) return;
      if (opts.reverse) {
        if (last.offset <= (opts.since ?? 0) + 1) return;
        page = await this.history(channel, { ...opts, before: last.offset });
      } else {
        if (last.offset >= first.offset) return;
        page = await this.history(channel, { ...opts, since: last.offset });
      }
      if (page.epoch !== first.epoch) {
        throw new SwitchyardError('epoch_changed', `${channel}: epoch ${first.epoch} became ${page.epoch} while paging`);
      }
      if (page.messages.length === 0) return;
      yield page;
    }
  }

  /**
   * Every message above `since` up to the top at the first page, in offset order (with
   * `reverse`: below `before`, newest first).
   */
  async historyAll(channel: string, opts: HistoryOptions = {}): Promise<HistoryPage> {
    let result: HistoryPage | undefined;
    const messages: Message[] = [];
    for await (const page of this.historyPages(channel, { limit: 1000, ...opts })) {
      result ??= page;
      messages.push(...page.messages);
    }
    return { epoch: result!.epoch, offset: result!.offset, messages };
  }

  /** Stores the durable consumer's offset (a lower one than stored is a no-op). */
  async commit(channel: string, consumer: string, offset: number): Promise<void> {
    await this.queue.request('commit', { channel, consumer, offset }, this.opts.requestTimeoutMs);
  }

  // === connection ===

  private connected(): Promise<void> {
    if (this.current === 'connected') return Promise.resolve();
    const p = new Promise<void>((resolve, reject) => {
      const offs = [
        this.on('connected', () => {
          offs.forEach((f) => f());
          resolve();
        }),
        this.on('disconnected', (e) => {
          if (e.reconnect) return;
          offs.forEach((f) => f());
          reject(e.error ?? new SwitchyardError('cancelled', e.reason));
        }),
      ];
    });
    // connect() may be called without awaiting it: the `disconnected` event reports the
    // failure too, so an unawaited rejection must not crash the process.
    p.catch(() => {});
    return p;
  }

  private async open(): Promise<void> {
    this.reconnectTimer = undefined;
    const gen = ++this.gen;
    const url = this.urls[this.urlIndex++ % this.urls.length]!;
    this.emit('connecting', { url, attempt: this.attempt });
    let ws: WebSocketLike;
    let token: string | undefined;
    try {
      const Ctor = await resolveWebSocket(this.opts.WebSocket);
      if (this.opts.getToken) token = await within(this.opts.getToken(), this.opts.connectTimeoutMs, 'getToken');
      if (gen !== this.gen) return;
      ws = new Ctor(url, 'switchyard.v1');
    } catch (err) {
      if (gen !== this.gen) return;
      if (err instanceof UnauthorizedError) return this.stop({ code: 4001, reason: err.message }, err);
      this.emit('error', asError(err));
      return this.scheduleReconnect();
    }
    const conn: Connection = {
      ws,
      url,
      token,
      ready: false,
      pending: new Map(),
      lastSeen: Date.now(),
      pingOut: false,
      timers: [],
      serverReason: undefined,
    };
    this.conn = conn;
    conn.timers.push(setTimeout(() => this.drop(conn, 'connect timeout'), this.opts.connectTimeoutMs));
    ws.onopen = () => this.handshake(conn);
    ws.onmessage = (ev) => this.receive(conn, ev.data);
    ws.onclose = (ev) => this.closed(conn, ev.code, ev.reason);
    ws.onerror = () => {}; // a close event follows
    ws.on?.('ping', () => {
      conn.lastSeen = Date.now();
    });
  }

  private handshake(conn: Connection): void {
    const fields: Record<string, unknown> = {};
    if (conn.token !== undefined) fields.token = conn.token;
    if (this.opts.name !== undefined) fields.name = this.opts.name;
    if (this.opts.batch) fields.batch = true;
    this.send(
      conn,
      'connect',
      fields,
      (ok) => this.ready(conn, ok as unknown as ConnectInfo),
      (err) => {
        if (err.code === 'disconnected') return; // the close is handled already
        this.emit('error', err);
        this.drop(conn, `connect refused: ${err.message}`);
      },
    );
  }

  private ready(conn: Connection, info: ConnectInfo): void {
    if (this.conn !== conn) return;
    conn.ready = true;
    conn.timers.forEach(clearTimeout);
    conn.timers = [];
    conn.lastSeen = Date.now();
    const tick = Math.max(10, Math.floor(this.opts.pingTimeoutMs / 4));
    conn.timers.push(setInterval(() => this.watch(conn), tick));
    this.attempt = 0;
    this.setState('connected');
    this.emit('connected', { ...info, url: conn.url });
    this.scheduleRefresh(conn);
    for (const sub of this.subs.values()) sub.onConnected();
    this.queue.flush();
  }

  /** Liveness: drop a silent socket; send a `ping` op when idle for half the window. */
  private watch(conn: Connection): void {
    const idle = Date.now() - conn.lastSeen;
    if (idle >= this.opts.pingTimeoutMs) return this.drop(conn, 'ping timeout');
    if (idle >= this.opts.pingTimeoutMs / 2 && !conn.pingOut) {
      conn.pingOut = true;
      const done = (): void => {
        conn.pingOut = false;
      };
      this.send(conn, 'ping', {}, done, done);
    }
  }

  private receive(conn: Connection, data: unknown): void {
    if (this.conn !== conn) return;
    conn.lastSeen = Date.now();
    if (typeof data !== 'string') return this.emit('error', new SwitchyardError('bad_frame', 'binary frame from the server'));
    const items = parseFrame(data, (line) => this.emit('error', new SwitchyardError('bad_frame', `unreadable line: ${line.slice(0, 200)}`)));
    for (const m of items) {
      if (this.conn !== conn) return; // a handler above dropped the socket
      this.dispatch(conn, m);
    }
  }

  private dispatch(conn: Connection, m: Record<string, unknown>): void {
    switch (m.push) {
      case 'message':
        this.subs.get(m.channel as string)?.onMessage(m as unknown as Message);
        return;
      case 'unsubscribed':
        this.subs.get(m.channel as string)?.onUnsubscribed(m as unknown as UnsubscribedPush);
        return;
      case 'join':
      case 'leave':
        this.subs.get(m.channel as string)?.onPresence(m as unknown as PresencePush);
        return;
      case 'disconnect':
        conn.serverReason = { code: Number(m.code), reason: String(m.reason ?? '') };
        return;
      case undefined:
        break;
      default:
        return; // a push kind this client does not know: ignored, as the protocol allows
    }
    const waiting = typeof m.id === 'number' ? conn.pending.get(m.id) : undefined;
    if (!waiting) {
      const e = m.error as { code?: string; message?: string } | undefined;
      if (e) this.emit('error', new SwitchyardError(e.code ?? 'internal', e.message ?? ''));
      return;
    }
    conn.pending.delete(m.id as number);
    if (m.error) {
      const e = m.error as { code?: string; message?: string };
      waiting.onErr(new SwitchyardError(e.code ?? 'internal', e.message ?? ''));
    } else {
      waiting.onOk((m.ok as Record<string, unknown>) ?? {});
    }
  }

  /** Closes a socket from this side and handles it as closed now. */
  private drop(conn: Connection, reason: string): void {
    try {
      conn.ws.close(CLOSE_CLIENT, reason.slice(0, 120));
    } catch {
      // already closing
    }
    this.closed(conn, CLOSE_CLIENT, reason);
  }

  private closed(conn: Connection, code: number, reason: string): void {
    if (this.conn !== conn) return;
    this.release(conn);
    const told = conn.serverReason;
    this.setState('connecting');
    // A failed attempt is not a disconnection: only a connection that was up reports one.
    if (conn.ready) this.emit('disconnected', { code: told?.code ?? code, reason: told?.reason ?? reason, reconnect: true });
    this.scheduleReconnect();
  }

  /** Forgets the socket: its timers, its waiting commands, and the subscriptions on it. */
  private release(conn: Connection): void {
    this.conn = undefined;
    conn.ws.onopen = conn.ws.onmessage = conn.ws.onclose = null;
    conn.timers.forEach((t) => {
      clearTimeout(t);
      clearInterval(t);
    });
    conn.timers = [];
    const pending = [...conn.pending.values()];
    conn.pending.clear();
    const gone = new SwitchyardError('disconnected', 'the connection closed before the reply');
    for (const p of pending) p.onErr(gone);
    for (const sub of this.subs.values()) sub.onDisconnected();
  }

  private scheduleReconnect(): void {
    this.reconnectTimer = setTimeout(() => void this.open(), this.delay(this.attempt++));
  }

  private delay(attempt: number): number {
    return backoffDelay(attempt, this.opts.minBackoffMs, this.opts.maxBackoffMs, this.opts.random);
  }

  /** Stops for good; `error` says why when it was not disconnect(). */
  private stop(event: { code: number; reason: string }, error?: Error): void {
    if (this.current === 'disconnected') return;
    this.gen++;
    if (this.reconnectTimer !== undefined) clearTimeout(this.reconnectTimer);
    this.reconnectTimer = undefined;
    const w = globalThis as { window?: { removeEventListener?: (t: string, f: () => void) => void } };
    w.window?.removeEventListener?.('online', this.onOnline);
    const conn = this.conn;
    if (conn) {
      this.release(conn);
      try {
        conn.ws.close(1000, 'bye');
      } catch {
        // already closing
      }
    }
    const failure = error ?? new SwitchyardError('cancelled', event.reason);
    this.queue.failAll(failure);
    this.setState('disconnected');
    this.emit('disconnected', error ? { ...event, reconnect: false, error } : { ...event, reconnect: false });
  }

  // === tokens ===

  private scheduleRefresh(conn: Connection, failures = 0): void {
    if (!this.opts.getToken || conn.token === undefined) return;
    const exp = tokenExpiryMs(conn.token);
    const now = Date.now();
    // Past expiry there is nothing to refresh: the server closes with 4001 and the next
    // connect gets a fresh token.
    if (exp === undefined || exp <= now) return;
    const wait = failures === 0 ? refreshDelayMs(exp, now) : Math.min(this.delay(failures - 1), Math.max(0, (exp - now) / 2));
    conn.timers.push(setTimeout(() => void this.refresh(conn, failures), wait));
  }

  private async refresh(conn: Connection, failures: number): Promise<void> {
    let token: string;
    try {
      token = await this.opts.getToken!();
    } catch (err) {
      if (this.conn !== conn) return;
      if (err instanceof UnauthorizedError) return this.stop({ code: 4001, reason: err.message }, err);
      this.emit('error', asError(err));
      return this.scheduleRefresh(conn, failures + 1);
    }
    if (this.conn !== conn) return;
    this.send(
      conn,
      'refresh',
      { token },
      () => {
        conn.token = token;
        this.emit('refreshed', { expiresAt: tokenExpiryMs(token) });
        this.scheduleRefresh(conn);
      },
      (err) => {
        if (err.code === 'disconnected') return; // the next connect gets a fresh token
        this.emit('error', err);
        this.scheduleRefresh(conn, failures + 1);
      },
    );
  }

  // === commands ===

  /** Sends on the ready connection, or fails at once with `disconnected`. */
  private command(op: string, fields: Record<string, unknown>, onOk: (ok: Record<string, unknown>) => void, onErr: (e: SwitchyardError) => void): void {
    const conn = this.conn;
    if (!conn || !conn.ready) return onErr(new SwitchyardError('disconnected', 'not connected'));
    this.send(conn, op, fields, onOk, onErr);
  }

  private send(conn: Connection, op: string, fields: Record<string, unknown>, onOk: (ok: Record<string, unknown>) => void, onErr: (e: SwitchyardError) => void): void {
    const id = ++this.nextId;
    if (conn.ws.readyState !== OPEN) return onErr(new SwitchyardError('disconnected', 'the socket is not open'));
    conn.pending.set(id, { onOk, onErr });
    conn.ws.send(JSON.stringify({ id, op, ...fields }));
  }

  private setState(next: ClientState): void {
    if (next === this.current) return;
    this.current = next;
    this.emit('state', next);
  }
}

/** `promise`, or a `timeout` SwitchyardError after `ms`. */
function within<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new SwitchyardError('timeout', `${what} took longer than ${ms} ms`)), ms);
  });
  return Promise.race([promise, late]).finally(() => clearTimeout(timer));
}

function asError(err: unknown): Error {
  return err instanceof Error ? err : new Error(String(err));
}

/** A random idempotency key: a UUID where `crypto.randomUUID` exists (secure contexts, Node). */
function newKey(): string {
  const c = globalThis.crypto;
  if (typeof c.randomUUID === 'function') return c.randomUUID();
  return Array.from(c.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, '0')).join('');
}
