// The Switchyard chat page, built on the client SDK (@switchyard/client).
//
// It owns the page: login (dev tokens when GET /api/v1/auth offers them, else a pasted
// token), rooms, direct messages (dialog:{a}:{b}, announced through the peer's user:{id}
// inbox so the peer's page opens it), the last SHOWN messages of a conversation and paging
// back, the visible connection state, and the cluster picture (cluster.ts). The SDK owns
// the connection: reconnects, recovery from the last delivered {offset, epoch}, dropping
// duplicates, resending publishes with their idempotency key, and token refresh through
// getToken. The page must never keep a second copy of that logic; it only shows what the
// SDK reports, and says so plainly when recovery failed.
//
// Built by scripts/build-web.sh into router/server/web/chat.js (committed).

import { Switchyard, SwitchyardError, UnauthorizedError, tokenExpiryMs } from '../../../sdk/client/src/index.ts';
import type { Message, RecoveryFailed, Subscription } from '../../../sdk/client/src/index.ts';
import { ClusterView } from './cluster.ts';

const $ = (id: string): HTMLElement => {
  const e = document.getElementById(id);
  if (!e) throw new Error(`#${id} missing`);
  return e;
};
const input = (id: string): HTMLInputElement => $(id) as HTMLInputElement;

/** Messages loaded when a conversation opens, and per "load older" page. */
const SHOWN = 50;
const DEFAULT_ROOMS = ['room:lobby'];
/** How often the cluster picture polls /api/v1/cluster. */
const CLUSTER_POLL_MS = 2000;

type Kind = 'room' | 'inbox' | 'dm';

interface Channel {
  name: string;
  kind: Kind;
  title: string;
  sub: Subscription | undefined;
  /** Epoch of the messages shown. */
  epoch: string | undefined;
  msgs: Map<number, Message>;
  unread: number;
  /** The dialog was announced in the peer's inbox. */
  knocked: boolean;
  /** Why the channel cannot be read (forbidden, bad name, ...). */
  error: string | undefined;
}

/** The last connection events (time, what), for diagnostics and tests. */
const log: string[] = [];
function note(what: string): void {
  log.push(`${new Date().toISOString().slice(11, 23)} ${what}`);
  if (log.length > 50) log.shift();
}

/** Counters for the status line and for tests. */
const stats = { connects: 0, disconnects: 0, refreshes: 0, recovered: 0, recoveryFailed: 0, pending: 0, lastClose: '' };

const state = {
  mode: 'off',
  devTokens: false,
  user: undefined as string | undefined,
  client: undefined as Switchyard | undefined,
  channels: new Map<string, Channel>(),
  active: undefined as string | undefined,
  everConnected: false,
  tokenExp: undefined as number | undefined,
};

// === status ===

function setStatus(s: string, detail?: string): void {
  const e = $('status');
  e.dataset.state = s;
  e.textContent = detail ? `${s} (${detail})` : s;
}

function notice(text: string): void {
  $('notice').textContent = text;
}

function renderConnInfo(): void {
  const bits: string[] = [];
  if (stats.pending) bits.push(`${stats.pending} sending`);
  if (state.tokenExp) bits.push(`token until ${new Date(state.tokenExp).toLocaleTimeString()}`);
  if (stats.refreshes) bits.push(`refreshed ×${stats.refreshes}`);
  if (stats.disconnects) bits.push(`reconnects ${stats.disconnects}${stats.lastClose ? ` (last: ${stats.lastClose})` : ''}`);
  $('conn-info').textContent = bits.join(' · ');
}

/** The explicit notice when a channel could not be recovered. */
function recoveryNotice(ch: Channel, info: RecoveryFailed): void {
  const banner = $('recovery');
  banner.hidden = false;
  banner.dataset.channel = ch.name;
  const why = info.previous.epoch !== info.epoch ? `its epoch changed (${info.previous.epoch} → ${info.epoch})` : 'the missed messages were trimmed';
  $('recovery-text').textContent =
    `Recovery failed for ${ch.title}: ${why}. Messages after #${info.previous.offset} up to #${info.offset} may be missing; ` +
    `the latest ones (up to ${SHOWN}) were reloaded.`;
}

// === login and the client ===

interface DevToken {
  token: string;
  user: string;
  exp: number;
}

/** `?ttl=10s` on the page's URL asks for dev tokens of that lifetime (tests use it). */
function devTtl(): string | undefined {
  return new URLSearchParams(location.search).get('ttl') ?? undefined;
}

async function mintDevToken(user: string): Promise<DevToken> {
  const ttl = devTtl();
  const r = await fetch('/api/v1/dev/token', {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(ttl ? { user, ttl } : { user }),
  });
  const body = (await r.json().catch(() => ({}))) as Partial<DevToken> & { error?: { message?: string } };
  const why = body.error?.message ?? `HTTP ${r.status}`;
  // Refusals (dev tokens off, a bad name) will not get better by retrying.
  if (r.status === 400 || r.status === 401 || r.status === 403) throw new UnauthorizedError(why);
  if (!r.ok || !body.token) throw new Error(`dev token: ${why}`);
  return body as DevToken;
}

function payloadOf(token: string): { sub?: string } {
  try {
    const b64 = token.split('.')[1]!.replace(/-/g, '+').replace(/_/g, '/');
    return JSON.parse(atob(b64 + '='.repeat((4 - (b64.length % 4)) % 4))) as { sub?: string };
  } catch {
    return {};
  }
}

function start(getToken: (() => Promise<string>) | undefined, user: string | undefined): void {
  state.user = user;
  $('login').hidden = true;
  $('app').hidden = false;
  const url = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/ws';
  const client = new Switchyard(url, getToken ? { getToken, name: 'chat', maxBackoffMs: 5000 } : { name: 'chat', maxBackoffMs: 5000 });
  state.client = client;
  client.on('connecting', (c) => note(`connecting ${c.url} attempt ${c.attempt}`));
  client.on('state', (s) => {
    note(`state ${s}`);
    if (s === 'connected') setStatus('connected');
    else if (s === 'connecting') setStatus(state.everConnected ? 'reconnecting' : 'connecting', stats.lastClose || undefined);
    else setStatus('signed-out');
  });
  client.on('connected', (info) => {
    state.everConnected = true;
    stats.connects++;
    if (info.user) state.user = info.user;
    $('me').textContent = state.user ? `signed in as ${state.user} · node ${info.node}` : `anonymous · node ${info.node}`;
    renderConnInfo();
  });
  client.on('disconnected', (e) => {
    note(`disconnected ${e.code} ${e.reason}${e.reconnect ? '' : ' (for good)'}`);
    stats.disconnects++;
    stats.lastClose = `${e.code}${e.reason ? ` ${e.reason}` : ''}`;
    if (e.code === 4009) notice('too many open sessions for this user; retrying');
    if (!e.reconnect) {
      if (e.error) showLogin(`signed out: ${e.error.message}`);
      return;
    }
    setStatus('reconnecting', stats.lastClose);
    renderConnInfo();
  });
  client.on('refreshed', (r) => {
    stats.refreshes++;
    state.tokenExp = r.expiresAt;
    renderConnInfo();
  });
  client.on('error', (e) => {
    note(`error ${describe(e)}`);
    console.warn('switchyard:', e);
  });
  if (user) channel(`user:${user}`, 'inbox', 'Inbox');
  for (const r of DEFAULT_ROOMS) channel(r, 'room');
  if (!state.active) select(DEFAULT_ROOMS[0]!);
  void client.connect().catch(() => {});
}

function showLogin(error?: string): void {
  const client = state.client;
  state.client = undefined;
  client?.disconnect();
  state.channels.clear();
  state.active = undefined;
  state.everConnected = false;
  $('login').hidden = false;
  $('app').hidden = true;
  $('login-error').textContent = error ?? '';
  setStatus('signed-out');
}

// === channels ===

function channel(name: string, kind: Kind, title?: string): Channel {
  let ch = state.channels.get(name);
  if (!ch) {
    ch = { name, kind, title: title ?? name, sub: undefined, epoch: undefined, msgs: new Map(), unread: 0, knocked: false, error: undefined };
    state.channels.set(name, ch);
    void open(ch);
    renderNav();
  }
  return ch;
}

/**
 * Opens a channel on its newest page (the newest SHOWN messages, read backwards), then
 * subscribes from the top that page was read at, so live messages follow it with no gap.
 * From then on the SDK keeps it up: every resubscribe recovers from the last message
 * delivered.
 */
async function open(ch: Channel): Promise<void> {
  const client = state.client;
  if (!client) return;
  try {
    const newest = await client.history(ch.name, { reverse: true, limit: SHOWN });
    if (state.client !== client) return;
    for (const m of newest.messages) onMessage(ch, m, false);
    const sub = client.subscription(ch.name, {
      from: newest.offset,
      getState: (info) => reload(ch, info),
    });
    ch.sub = sub;
    sub.on('message', (m) => onMessage(ch, m, true));
    sub.on('recoveryFailed', (info) => {
      stats.recoveryFailed++;
      recoveryNotice(ch, info);
    });
    sub.on('subscribed', (e) => {
      if (e.recovered) stats.recovered++;
    });
    sub.on('state', () => renderNav());
    sub.on('unsubscribed', (e) => {
      if (e.code !== undefined) ch.error = `${e.code} ${e.reason}`;
      render();
    });
    const ok = await sub.subscribe();
    ch.epoch ??= ok.epoch;
  } catch (e) {
    ch.error = describe(e);
    notice(`${ch.title}: ${ch.error}`);
  }
  render();
}

/** The SDK's getState hook after a failed recovery: the shown messages start over. */
async function reload(ch: Channel, info: RecoveryFailed): Promise<void> {
  ch.msgs.clear();
  ch.epoch = info.epoch;
  if (info.offset > 0 && state.client) {
    // The newest SHOWN up to the position the subscription resumes from.
    const page = await state.client.history(ch.name, { reverse: true, before: info.offset + 1, limit: SHOWN });
    if (page.epoch === info.epoch) for (const m of page.messages) onMessage(ch, m, false);
  }
  render();
}

async function loadOlder(ch: Channel): Promise<void> {
  const client = state.client;
  const lowest = Math.min(...ch.msgs.keys());
  if (!client || !Number.isFinite(lowest) || lowest <= 1) return;
  // The SHOWN messages just below the oldest one shown, whatever gaps retention left.
  const page = await client.history(ch.name, { reverse: true, before: lowest, limit: SHOWN });
  if (page.epoch !== ch.epoch) return;
  for (const m of page.messages) onMessage(ch, m, false);
  render();
}

function onMessage(ch: Channel, m: Message, live: boolean): void {
  if (m.epoch !== ch.epoch) {
    ch.msgs.clear();
    ch.epoch = m.epoch;
  }
  if (ch.msgs.has(m.offset)) return;
  ch.msgs.set(m.offset, m);
  const d = m.data as { dialog?: unknown } | null;
  if (ch.kind === 'inbox' && d && typeof d.dialog === 'string' && m.from) openDialog(m.from);
  if (live && state.active !== ch.name) ch.unread++;
  render();
}

function dialogName(a: string, b: string): string {
  return a < b ? `dialog:${a}:${b}` : `dialog:${b}:${a}`;
}

function openDialog(peer: string): Channel | undefined {
  if (!state.user || !peer || peer === state.user) return undefined;
  return channel(dialogName(state.user, peer), 'dm', peer);
}

function describe(e: unknown): string {
  if (e instanceof SwitchyardError) return `${e.code}: ${e.message}`;
  return e instanceof Error ? e.message : String(e);
}

// === sending: the SDK resends an unacknowledged publish with the same idempotency key ===

function publish(channelName: string, data: unknown): void {
  const client = state.client;
  if (!client) return;
  stats.pending++;
  renderConnInfo();
  client
    .publish(channelName, data)
    .catch((e: unknown) => notice(`not sent to ${channelName}: ${describe(e)}`))
    .finally(() => {
      stats.pending--;
      renderConnInfo();
    });
}

function sendText(text: string): void {
  const ch = state.active ? state.channels.get(state.active) : undefined;
  if (!ch || !text) return;
  if (ch.kind === 'dm' && !ch.knocked) {
    ch.knocked = true; // tell the peer's page which dialog to open
    publish(`user:${ch.title}`, { dialog: ch.name });
  }
  publish(ch.name, { text });
}

// === rendering ===

function renderNav(): void {
  const item = (ch: Channel): HTMLLIElement => {
    const li = document.createElement('li');
    li.dataset.channel = ch.name;
    li.dataset.sub = ch.sub?.state ?? 'unsubscribed';
    li.textContent = ch.title;
    if (ch.unread) {
      const u = document.createElement('span');
      u.className = 'unread';
      u.textContent = String(ch.unread);
      li.appendChild(u);
    }
    if (ch.name === state.active) li.className = 'active';
    li.onclick = () => select(ch.name);
    return li;
  };
  const rooms = $('rooms');
  const dms = $('dms');
  rooms.replaceChildren();
  dms.replaceChildren();
  for (const ch of state.channels.values()) (ch.kind === 'dm' ? dms : rooms).appendChild(item(ch));
}

function messageText(d: unknown): string {
  const o = d as { text?: unknown; dialog?: unknown } | null;
  if (o && typeof o.text === 'string') return o.text;
  if (o && typeof o.dialog === 'string') return `opened ${o.dialog}`;
  return JSON.stringify(d);
}

function render(): void {
  renderNav();
  const ch = state.active ? state.channels.get(state.active) : undefined;
  const list = $('messages');
  if (!ch) {
    list.replaceChildren();
    $('title').textContent = '';
    return;
  }
  $('title').textContent = ch.kind === 'dm' ? `Dialog with ${ch.title}` : ch.title;
  const offsets = [...ch.msgs.keys()].sort((a, b) => a - b);
  const items: HTMLLIElement[] = [];
  if (ch.error) {
    const li = document.createElement('li');
    li.className = 'err';
    li.textContent = ch.error;
    items.push(li);
  }
  if (offsets.length && offsets[0]! > 1) {
    const li = document.createElement('li');
    const b = document.createElement('button');
    b.textContent = 'load older';
    b.id = 'older';
    b.onclick = () => loadOlder(ch).catch((e: unknown) => notice(describe(e)));
    li.appendChild(b);
    items.push(li);
  }
  for (const o of offsets) {
    const m = ch.msgs.get(o)!;
    const li = document.createElement('li');
    li.dataset.offset = String(m.offset);
    li.dataset.from = m.from ?? '';
    const from = document.createElement('span');
    from.className = 'from';
    from.textContent = m.from ?? 'anonymous';
    const text = document.createElement('span');
    text.className = 'text';
    text.textContent = messageText(m.data);
    const meta = document.createElement('span');
    meta.className = 'meta';
    meta.textContent = `#${m.offset} ${new Date(m.ts).toLocaleTimeString()}`;
    li.append(from, text, meta);
    items.push(li);
  }
  const atBottom = list.scrollTop + list.clientHeight >= list.scrollHeight - 4;
  list.replaceChildren(...items);
  if (atBottom) list.scrollTop = list.scrollHeight;
}

function select(name: string): void {
  state.active = name;
  const ch = state.channels.get(name);
  if (ch) ch.unread = 0;
  render();
}

// === wiring ===

async function init(): Promise<void> {
  window.addEventListener('hashchange', () => location.reload());
  if (location.hash === '#cluster') {
    // The cluster picture alone, page-wide (no sign-in needed).
    document.body.classList.add('cluster-only');
    $('app').hidden = false;
    setStatus('cluster view');
    cluster.start(CLUSTER_POLL_MS);
    document.body.dataset.ready = 'true';
    return;
  }
  $('dev-login').onsubmit = async (e) => {
    e.preventDefault();
    const user = input('user').value.trim();
    try {
      // The first token checks the name; later ones (reconnects, refreshes) are fresh.
      let first: string | undefined = (await mintDevToken(user)).token;
      start(async () => {
        const t = first;
        first = undefined;
        return t ?? (await mintDevToken(user)).token;
      }, user);
    } catch (err) {
      $('login-error').textContent = describe(err);
    }
  };
  $('token-login').onsubmit = (e) => {
    e.preventDefault();
    const token = input('token').value.trim();
    if (!token) return;
    start(async () => {
      const exp = tokenExpiryMs(token);
      if (exp !== undefined && exp <= Date.now()) throw new UnauthorizedError('the token expired: paste a new one');
      return token;
    }, payloadOf(token).sub);
  };
  $('anon-login').onsubmit = (e) => {
    e.preventDefault();
    start(undefined, undefined);
  };
  $('join-form').onsubmit = (e) => {
    e.preventDefault();
    const name = input('room-input').value.trim();
    if (!name) return;
    channel(name, 'room');
    select(name);
    input('room-input').value = '';
  };
  $('dm-form').onsubmit = (e) => {
    e.preventDefault();
    const ch = openDialog(input('dm-input').value.trim());
    if (!ch) return notice('sign in as a user to open a dialog with someone else');
    select(ch.name);
    input('dm-input').value = '';
  };
  $('send-form').onsubmit = (e) => {
    e.preventDefault();
    sendText(input('text').value);
    input('text').value = '';
  };
  $('recovery-dismiss').onclick = () => {
    $('recovery').hidden = true;
  };
  cluster.start(CLUSTER_POLL_MS);
  // The forms work from here on (a submit before this line would reload the page); what
  // follows only tunes which login is offered.
  try {
    const info = (await (await fetch('/api/v1/auth')).json()) as { mode?: string; dev_tokens?: boolean };
    state.mode = info.mode ?? 'off';
    state.devTokens = info.dev_tokens === true;
  } catch {
    // keep the defaults: paste a token
  }
  $('dev-hint').textContent = state.devTokens
    ? `dev tokens are on (auth mode: ${state.mode})`
    : 'dev tokens are off on this server: paste a token';
  $('dev-login').hidden = !state.devTokens;
  $('anon-login').hidden = state.mode !== 'off';
  document.body.dataset.ready = 'true';
}

const cluster = new ClusterView($('cluster'));

// Read-only hooks for tests and debugging.
(window as unknown as { chatDebug: unknown }).chatDebug = {
  state,
  stats,
  log,
  cluster,
  channel: (name: string) => {
    const ch = state.channels.get(name);
    return ch && { subscribed: ch.sub?.state === 'subscribed', position: ch.sub?.position, offsets: [...ch.msgs.keys()].sort((a, b) => a - b) };
  },
};

void init();
