// Helpers shared by the Centrifugo SDK scenarios (run by tests/tests/centrifugo_sdk.rs):
// the unmodified `centrifuge` client over `ws` (Node 20 has no global WebSocket), HS256
// tokens minted with node:crypto, the `@@` conversation with the Rust test (it owns the
// routers, the TCP proxy in front of them and the native publishers), named steps, polling
// with a deadline, and a ring of the last frames the server sent, printed when a step fails.
// Everything connects to 127.0.0.1 only.
import crypto from 'node:crypto';
import readline from 'node:readline';
import WebSocket from 'ws';
import { Centrifuge } from 'centrifuge';

export { Centrifuge };

/** Per-wait deadline: a condition that takes longer fails the step. */
export const STEP_TIMEOUT = 20_000;

// === tokens ===

const b64url = (buf) => Buffer.from(buf).toString('base64url');

/** An HS256 JWT of `claims` signed with `secret`. */
export function hs256(secret, claims) {
  const head = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const body = b64url(JSON.stringify(claims));
  const sig = crypto.createHmac('sha256', secret).update(`${head}.${body}`).digest('base64url');
  return `${head}.${body}.${sig}`;
}

/** `{sub, exp: now + ttlSecs, ...extra}` signed with `secret`. */
export function token(secret, sub, ttlSecs = 3600, extra = {}) {
  return hs256(secret, { sub, exp: Math.floor(Date.now() / 1000) + ttlSecs, ...extra });
}

// === the conversation with the Rust test ===

const lines = [];
const waiters = [];
const input = readline.createInterface({ input: process.stdin });
input.on('line', (line) => {
  const w = waiters.shift();
  if (w) w(line);
  else lines.push(line);
});

function nextLine(timeoutMs) {
  if (lines.length) return Promise.resolve(lines.shift());
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      const i = waiters.indexOf(done);
      if (i >= 0) waiters.splice(i, 1);
      reject(new Error(`no answer from the test within ${timeoutMs} ms`));
    }, timeoutMs);
    const done = (line) => {
      clearTimeout(timer);
      resolve(line);
    };
    waiters.push(done);
  });
}

/**
 * Asks the Rust test to act: prints `@@VERB ARGS...` and waits for its answer, `@@ok JSON`
 * (returned parsed) or `@@err MESSAGE` (thrown).
 */
export async function ask(verb, ...args) {
  console.log(`@@${[verb, ...args].join(' ')}`);
  const line = await nextLine(60_000);
  if (line.startsWith('@@ok')) {
    const rest = line.slice(4).trim();
    return rest ? JSON.parse(rest) : null;
  }
  throw new Error(`the test could not ${verb}: ${line}`);
}

// === steps ===

/** Frames received from the server, newest last (at most 40, each cut at 400 characters). */
export const frames = [];

function remember(dir, data) {
  const text = typeof data === 'string' ? data : Buffer.from(data).toString();
  frames.push(`${dir} ${text.length > 400 ? text.slice(0, 400) + '...' : text}`);
  if (frames.length > 40) frames.shift();
}

/** `ws`'s WebSocket, remembering every frame in [`frames`]. */
export class RecordingWebSocket extends WebSocket {
  constructor(...args) {
    super(...args);
    this.addEventListener('message', (e) => remember('<', e.data));
    this.addEventListener('close', (e) => remember('x', `close ${e.code} ${JSON.stringify(e.reason)} clean=${e.wasClean}`));
    this.addEventListener('error', (e) => remember('x', `error ${e.message}`));
    const send = this.send.bind(this);
    this.send = (data, ...rest) => {
      remember('>', data);
      return send(data, ...rest);
    };
  }
}

/** Things to describe when a step fails: name -> () => value. */
export const describe = new Map();

/**
 * Runs `main(step)` and exits: `step(name, fn)` prints `ok   NAME (ms)` per step and the
 * summary `centrifugo: N passed, 0 failed` the Rust test checks. A failure prints the
 * error, what `describe` knows, and the last frames.
 */
export async function run(main) {
  let passed = 0;
  let current = '(setup)';
  const step = async (name, fn) => {
    current = name;
    const started = Date.now();
    await fn();
    passed++;
    console.log(`ok   ${name} (${Date.now() - started} ms)`);
  };
  const hardStop = setTimeout(() => {
    console.log(`FAIL ${current}: the script ran out of time`);
    dump();
    process.exit(1);
  }, Number(process.env.SCENARIO_TIMEOUT_MS || 140_000));
  hardStop.unref();
  try {
    await main(step);
    console.log(`centrifugo: ${passed} passed, 0 failed`);
    process.exit(0);
  } catch (e) {
    console.log(`FAIL ${current}: ${errorText(e)}`);
    dump();
    console.log(`centrifugo: ${passed} passed, 1 failed`);
    process.exit(1);
  }
}

/** An Error's stack, or the JSON of what the SDK rejected with (`{code, message}`). */
export function errorText(e) {
  if (e && e.stack) return e.stack;
  try {
    return `rejected with ${JSON.stringify(e)}`;
  } catch {
    return String(e);
  }
}

function dump() {
  for (const [name, fn] of describe) {
    let v;
    try {
      v = JSON.stringify(fn());
    } catch (e) {
      v = `(cannot describe: ${e.message})`;
    }
    console.log(`  ${name}: ${v && v.length > 2000 ? v.slice(0, 2000) + '...' : v}`);
  }
  console.log('  last frames (< from the server, > to it):');
  for (const f of frames) console.log(`    ${f}`);
}

/** Polls `check` (sync or async; truthy when done) until it is or `timeoutMs` passes. */
export async function until(what, check, timeoutMs = STEP_TIMEOUT) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await check();
    if (v) return v;
    if (Date.now() >= deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** Resolves after `ms` (only where a test must show that nothing happens for a while). */
export const quiet = (ms) => new Promise((r) => setTimeout(r, ms));

/** Fails unless `cond`, with `msg` (a string or a function making one). */
export function check(cond, msg) {
  if (!cond) throw new Error(typeof msg === 'function' ? msg() : msg);
}

/** Deep equality through JSON, failing with both values. */
export function same(got, want, what) {
  const g = JSON.stringify(got);
  const w = JSON.stringify(want);
  if (g !== w) throw new Error(`${what}: got ${g}, want ${w}`);
}

// === clients ===

/**
 * A `Centrifuge` client on `url` (…/connection/websocket) with quick reconnects, and a
 * record of its events: `log.connecting` (count), `log.connected`, `log.disconnected`,
 * `log.errors`, `log.states`.
 */
export function client(name, url, options = {}) {
  const c = new Centrifuge(url, {
    websocket: RecordingWebSocket,
    minReconnectDelay: 100,
    maxReconnectDelay: 1000,
    timeout: 5000,
    ...options,
  });
  const log = { connecting: 0, connected: [], disconnected: [], errors: [], states: [] };
  c.on('state', (ctx) => log.states.push(ctx.newState));
  c.on('connecting', (ctx) => {
    log.connecting++;
    log.lastConnecting = ctx;
  });
  c.on('connected', (ctx) => log.connected.push(ctx));
  c.on('disconnected', (ctx) => log.disconnected.push(ctx));
  c.on('error', (ctx) => log.errors.push({ type: ctx.type, code: ctx.error?.code, message: ctx.error?.message }));
  c.log = log;
  describe.set(name, () => ({ state: c.state, ...log, states: log.states.slice(-10), errors: log.errors.slice(-5) }));
  return c;
}

/**
 * A subscription of `c` to `channel` with a record of what it saw: `rec.pubs` (channel,
 * offset, data), `rec.subscribed` (contexts), `rec.unsubscribed`, `rec.errors`,
 * `rec.joins`, `rec.leaves`.
 */
export function subscribe(name, c, channel, options = {}) {
  const sub = c.newSubscription(channel, options);
  const rec = { pubs: [], subscribed: [], subscribing: [], unsubscribed: [], errors: [], joins: [], leaves: [] };
  sub.on('publication', (ctx) => rec.pubs.push({ offset: ctx.offset, data: ctx.data, user: ctx.info?.user }));
  sub.on('subscribed', (ctx) => rec.subscribed.push(ctx));
  sub.on('subscribing', (ctx) => rec.subscribing.push(ctx));
  sub.on('unsubscribed', (ctx) => rec.unsubscribed.push(ctx));
  sub.on('error', (ctx) => rec.errors.push({ type: ctx.type, code: ctx.error?.code, message: ctx.error?.message }));
  sub.on('join', (ctx) => rec.joins.push(ctx.info));
  sub.on('leave', (ctx) => rec.leaves.push(ctx.info));
  sub.rec = rec;
  describe.set(name, () => ({
    state: sub.state,
    pubs: rec.pubs.length,
    lastPubs: rec.pubs.slice(-3),
    subscribed: rec.subscribed.slice(-3),
    subscribing: rec.subscribing.slice(-3),
    unsubscribed: rec.unsubscribed,
    errors: rec.errors.slice(-5),
    joins: rec.joins,
    leaves: rec.leaves,
  }));
  return sub;
}

/** Waits until `c` is connected. */
export async function connected(c, what = 'the client to connect') {
  await until(what, () => c.state === 'connected');
}

/** Waits until `sub` is subscribed, with at least `n` subscribed events in total. */
export async function subscribed(sub, n = 1) {
  await until(`${sub.channel} subscribed (event #${n})`, () => sub.state === 'subscribed' && sub.rec.subscribed.length >= n);
}

/** The `i` fields of recorded publications (the scenarios publish `{i}`). */
export const indexes = (pubs) => pubs.map((p) => p.data?.i);

/**
 * Checks that `pubs` carry exactly `want` (a list of `i`), in order, once each, with
 * strictly increasing offsets.
 */
export function exactlyOnceInOrder(pubs, want, what) {
  const got = indexes(pubs);
  if (got.length !== want.length || got.some((v, k) => v !== want[k])) {
    const seen = new Map();
    for (const v of got) seen.set(v, (seen.get(v) || 0) + 1);
    const dup = [...seen].filter(([, n]) => n > 1).map(([v]) => v).slice(0, 10);
    const missing = want.filter((v) => !seen.has(v)).slice(0, 10);
    throw new Error(
      `${what}: got ${got.length} publications, want ${want.length}; duplicates ${JSON.stringify(dup)}, ` +
        `missing ${JSON.stringify(missing)}, first ${JSON.stringify(got.slice(0, 5))}, last ${JSON.stringify(got.slice(-5))}`,
    );
  }
  for (let k = 1; k < pubs.length; k++) {
    check(pubs[k].offset > pubs[k - 1].offset, () => `${what}: offsets not increasing at ${k}: ${pubs[k - 1].offset} then ${pubs[k].offset}`);
  }
}

// === a native Switchyard client (docs/protocol.md), for the mixed scenario ===

/** Connects to `ws://ADDR/ws` and sends `connect` with `tok`. */
export async function nativeClient(addr, tok) {
  const ws = new WebSocket(`ws://${addr}/ws`);
  await new Promise((resolve, reject) => {
    ws.once('open', resolve);
    ws.once('error', reject);
  });
  let nextId = 1;
  const pending = new Map();
  const pushes = [];
  ws.on('message', (raw) => {
    for (const text of raw.toString().split('\n')) {
      if (!text) continue;
      const f = JSON.parse(text);
      if (f.push) pushes.push(f);
      else if (pending.has(f.id)) {
        pending.get(f.id)(f);
        pending.delete(f.id);
      }
    }
  });
  const cmd = (op, fields = {}) =>
    new Promise((resolve, reject) => {
      const id = nextId++;
      const timer = setTimeout(() => reject(new Error(`native ${op}: no reply within 10 s`)), 10_000);
      pending.set(id, (f) => {
        clearTimeout(timer);
        if (f.error) reject(new Error(`native ${op}: ${JSON.stringify(f.error)}`));
        else resolve(f.ok);
      });
      ws.send(JSON.stringify({ id, op, ...fields }));
    });
  const ok = await cmd('connect', { token: tok });
  return { ws, cmd, pushes, connect: ok, close: () => ws.close() };
}
