// Unit tests of the built client (dist/): backoff, frame splitting, token expiry, and the
// client and subscription state machines driven through a fake WebSocket. No server, no
// network; waits are polls with deadlines.

import { test, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { Switchyard, SwitchyardError, UnauthorizedError, backoffDelay, parseFrame, tokenExpiryMs } from '../dist/index.js';
import { FakeWebSocket, waitFor } from './fake-ws.mjs';

const clients = [];
afterEach(() => {
  for (const c of clients.splice(0)) c.disconnect();
  FakeWebSocket.reset();
});

function client(urls = ['ws://a/ws', 'ws://b/ws'], opts = {}) {
  const c = new Switchyard(urls, { WebSocket: FakeWebSocket, random: () => 0, minBackoffMs: 10, maxBackoffMs: 100, ...opts });
  clients.push(c);
  return c;
}

/** Waits for socket number `n` (0-based), opens it and answers its connect. */
async function serve(n, info = { client: '1', node: 'n1', version: '1' }) {
  const ws = await waitFor(`socket ${n}`, () => FakeWebSocket.sockets[n]);
  ws.open();
  const connect = ws.reply('connect', info);
  return { ws, connect };
}

function fakeJwt(claims) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  return `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}.sig`;
}

const msg = (offset, epoch = 'E1', channel = 'chat:x') => ({ push: 'message', channel, offset, epoch, ts: 1, data: { n: offset } });

// --- pure functions ---

test('backoff: full jitter between 0 and min(max, min * 2^attempt)', () => {
  const top = (attempt) => backoffDelay(attempt, 500, 20000, () => 0.999999);
  assert.equal(backoffDelay(0, 500, 20000, () => 0), 0);
  assert.deepEqual([0, 1, 2, 3, 4, 5].map(top), [499, 999, 1999, 3999, 7999, 15999]);
  assert.equal(top(6), 19999, 'capped at max');
  assert.equal(top(60), 19999, 'huge attempts stay capped');
  assert.equal(backoffDelay(3, 500, 20000, () => 0.5), 2000, 'the random draw scales the ceiling');
  for (let i = 0; i < 200; i++) {
    const d = backoffDelay(i % 10, 500, 20000);
    assert.ok(d >= 0 && d < Math.min(20000, 500 * 2 ** (i % 10)), `${d} in bounds`);
  }
});

test('frames: JSON lines are split, blank lines skipped, a bad line does not hide the others', () => {
  const bad = [];
  const out = parseFrame('{"a":1}\n\n{"b":2}\nnot json\n[1]\n{"c":3}\n', (line) => bad.push(line));
  assert.deepEqual(out, [{ a: 1 }, { b: 2 }, { c: 3 }]);
  assert.deepEqual(bad, ['not json', '[1]']);
  assert.deepEqual(parseFrame('{"id":1,"ok":{}}', () => assert.fail()), [{ id: 1, ok: {} }]);
});

test('jwt: exp is read without verifying; garbage has none', () => {
  assert.equal(tokenExpiryMs(fakeJwt({ sub: 'ü-user', exp: 1700000000 })), 1700000000000);
  assert.equal(tokenExpiryMs(fakeJwt({ sub: 'a' })), undefined);
  assert.equal(tokenExpiryMs('not-a-jwt'), undefined);
});

// --- client state machine ---

test('connect: states, connect fields, batch flag, URL rotation and reconnect', async () => {
  const c = client(undefined, { name: 'unit', batch: true });
  const states = [];
  c.on('state', (s) => states.push(s));
  assert.equal(c.state, 'disconnected');
  const connected = c.connect();
  assert.equal(c.state, 'connecting');
  const { ws, connect } = await serve(0);
  await connected;
  assert.equal(ws.url, 'ws://a/ws');
  assert.equal(ws.protocols, 'switchyard.v1');
  assert.equal(connect.name, 'unit');
  assert.equal(connect.batch, true);
  assert.equal(connect.token, undefined);
  assert.equal(c.state, 'connected');

  ws.serverClose(4100, 'shutting down');
  assert.equal(c.state, 'connecting');
  const second = await serve(1);
  assert.equal(second.ws.url, 'ws://b/ws', 'the next attempt uses the next URL');
  await waitFor('connected again', () => c.state === 'connected');
  second.ws.serverClose(1006);
  const third = await waitFor('third socket', () => FakeWebSocket.sockets[2]);
  assert.equal(third.url, 'ws://a/ws', 'rotation wraps around');
  c.disconnect();
  assert.equal(c.state, 'disconnected');
  assert.deepEqual(states, ['connecting', 'connected', 'connecting', 'connected', 'connecting', 'disconnected']);
});

test('connect: batch is not sent unless asked', async () => {
  const c = client();
  c.connect();
  const { connect } = await serve(0);
  assert.equal('batch' in connect, false);
});

test('no commands go out before the connect reply', async () => {
  const c = client();
  c.connect();
  c.subscription('chat:x').subscribe();
  const p = c.publish('chat:x', 1);
  const ws = await waitFor('socket', () => FakeWebSocket.sockets[0]);
  ws.open();
  assert.deepEqual(ws.sent.map((s) => s.op), ['connect']);
  ws.reply('connect', { client: '1', node: 'n', version: '1' });
  assert.deepEqual(ws.sent.map((s) => s.op), ['connect', 'subscribe', 'publish'], 'subscribe first, then the queue');
  ws.reply('publish', { offset: 1, epoch: 'E1' });
  assert.deepEqual(await p, { offset: 1, epoch: 'E1' });
});

test('subscription(): the same object per channel', () => {
  const c = client();
  assert.equal(c.subscription('chat:x'), c.subscription('chat:x'));
  assert.notEqual(c.subscription('chat:x'), c.subscription('chat:y'));
});

test('subscription: duplicates are dropped; recovery after a reconnect uses the last position', async () => {
  const c = client();
  c.connect();
  const { ws } = await serve(0);
  const sub = c.subscription('chat:x');
  const got = [];
  const subscribed = [];
  sub.on('message', (m) => got.push(`${m.epoch}/${m.offset}`));
  sub.on('subscribed', (e) => subscribed.push(e));
  const done = sub.subscribe();
  assert.equal(sub.state, 'subscribing');
  assert.equal(ws.lastSent('subscribe').from, undefined, 'latest by default');
  // The reply and pushes in one frame (batch mode): the pushes must not be lost.
  ws.frame({ id: ws.lastSent('subscribe').id, ok: { channel: 'chat:x', epoch: 'E1', offset: 0 } }, msg(1), msg(2), msg(2), msg(1), msg(3));
  await done;
  assert.equal(sub.state, 'subscribed');
  assert.deepEqual(got, ['E1/1', 'E1/2', 'E1/3']);

  ws.serverClose(1006);
  assert.equal(sub.state, 'subscribing');
  const { ws: ws2 } = await serve(1);
  const again = ws2.lastSent('subscribe');
  assert.deepEqual(again.from, { offset: 3, epoch: 'E1' });
  ws2.frame({ id: again.id, ok: { channel: 'chat:x', epoch: 'E1', offset: 5, recovered: true } }, msg(3), msg(4), msg(5));
  assert.deepEqual(got, ['E1/1', 'E1/2', 'E1/3', 'E1/4', 'E1/5']);
  assert.deepEqual(subscribed.map((s) => s.recovered), [false, true]);
  assert.deepEqual(sub.position, { epoch: 'E1', offset: 5 });
});

test('subscription: recoveryFailed, getState runs before further messages', async () => {
  let release;
  const calls = [];
  const c = client();
  c.connect();
  const { ws } = await serve(0);
  const sub = c.subscription('chat:x', {
    from: { offset: 7, epoch: 'OLD' },
    getState: (info) => {
      calls.push(info);
      return new Promise((r) => (release = r));
    },
  });
  const got = [];
  const failed = [];
  sub.on('message', (m) => got.push(m.offset));
  sub.on('recoveryFailed', (e) => failed.push(e));
  sub.subscribe();
  const cmd = ws.lastSent('subscribe');
  assert.deepEqual(cmd.from, { offset: 7, epoch: 'OLD' });
  ws.frame({ id: cmd.id, ok: { channel: 'chat:x', epoch: 'NEW', offset: 2, recovered: false } }, msg(3, 'NEW'));
  assert.deepEqual(failed, [{ previous: { offset: 7, epoch: 'OLD' }, epoch: 'NEW', offset: 2 }]);
  assert.equal(calls.length, 1);
  ws.frame(msg(4, 'NEW'));
  assert.deepEqual(got, [], 'held while getState runs');
  release();
  await waitFor('held messages', () => got.length === 2);
  assert.deepEqual(got, [3, 4]);
});

test('subscription: 4100 unsubscribed push resubscribes with the position; forbidden ends it', async () => {
  const c = client();
  c.connect();
  const { ws } = await serve(0);
  const sub = c.subscription('chat:x');
  sub.subscribe();
  ws.frame({ id: ws.lastSent('subscribe').id, ok: { channel: 'chat:x', epoch: 'E1', offset: 4 } });
  ws.frame({ push: 'unsubscribed', channel: 'chat:x', code: 4100, reason: 'partition moved' });
  assert.equal(sub.state, 'subscribing');
  assert.deepEqual(ws.lastSent('subscribe').from, { offset: 4, epoch: 'E1' });

  const other = c.subscription('chat:secret');
  const errors = [];
  other.on('error', (e) => errors.push(e.code));
  const refused = other.subscribe();
  ws.frame({ id: ws.lastSent('subscribe').id, error: { code: 'forbidden', message: 'no' } });
  await assert.rejects(refused, (e) => e instanceof SwitchyardError && e.code === 'forbidden');
  assert.equal(other.state, 'unsubscribed');
  assert.deepEqual(errors, ['forbidden']);
});

test('publish: queued while disconnected, resent with the same idempotency key until acknowledged', async () => {
  const c = client();
  const p = c.publish('chat:x', { t: 1 }, { key: 'k' });
  c.connect();
  const { ws } = await serve(0);
  const first = ws.lastSent('publish');
  assert.equal(typeof first.idempotency_key, 'string');
  assert.ok(first.idempotency_key.length >= 16);
  assert.equal(first.key, 'k');
  ws.serverClose(1006); // the ack was lost with the socket
  const { ws: ws2 } = await serve(1);
  const resent = ws2.lastSent('publish');
  assert.equal(resent.idempotency_key, first.idempotency_key);
  ws2.frame({ id: resent.id, error: { code: 'unavailable', message: 'handover' } });
  const third = await waitFor('retry after unavailable', () => ws2.sent.filter((s) => s.op === 'publish')[1]);
  assert.equal(third.idempotency_key, first.idempotency_key);
  ws2.frame({ id: third.id, ok: { offset: 9, epoch: 'E' } });
  assert.deepEqual(await p, { offset: 9, epoch: 'E' });
});

test('publish: a refusal rejects with SwitchyardError; a deadline rejects with timeout', async () => {
  const c = client();
  c.connect();
  const { ws } = await serve(0);
  const refused = c.publish('chat:x', 1);
  ws.frame({ id: ws.lastSent('publish').id, error: { code: 'forbidden', message: 'not yours' } });
  await assert.rejects(refused, (e) => e instanceof SwitchyardError && e.code === 'forbidden' && e.message.includes('not yours'));
  await assert.rejects(c.publish('chat:x', 2, { timeoutMs: 30 }), (e) => e.code === 'timeout');
});

test('history paging: a short page pages on from its last offset up to the first top', async () => {
  const c = client();
  c.connect();
  const { ws } = await serve(0);
  const all = c.historyAll('chat:x', { limit: 2 });
  const page = (since, offsets) => {
    const cmd = ws.lastSent('history');
    assert.equal(cmd.since, since);
    ws.frame({ id: cmd.id, ok: { epoch: 'E', offset: 5, messages: offsets.map((o) => ({ ...msg(o, 'E'), push: undefined })) } });
  };
  await waitFor('page 1', () => ws.lastSent('history'));
  page(undefined, [1, 2]);
  await waitFor('page 2', () => ws.lastSent('history').since === 2);
  page(2, [4]); // 3 compacted away: short page
  await waitFor('page 3', () => ws.lastSent('history').since === 4);
  page(4, [5]);
  const result = await all;
  assert.deepEqual(result.messages.map((m) => m.offset), [1, 2, 4, 5]);
  assert.equal(result.offset, 5);
});

test('history paging backwards: reverse pages ask before their last offset, down to the start', async () => {
  const c = client();
  c.connect();
  const { ws } = await serve(0);
  const all = c.historyAll('chat:x', { limit: 2, reverse: true });
  const page = (before, offsets) => {
    const cmd = ws.lastSent('history');
    assert.equal(cmd.before, before);
    assert.equal(cmd.reverse, true);
    ws.frame({ id: cmd.id, ok: { epoch: 'E', offset: 6, messages: offsets.map((o) => ({ ...msg(o, 'E'), push: undefined })) } });
  };
  await waitFor('page 1', () => ws.lastSent('history'));
  page(undefined, [6, 5]);
  await waitFor('page 2', () => ws.lastSent('history').before === 5);
  page(5, [4, 2]); // 3 compacted away
  await waitFor('page 3', () => ws.lastSent('history').before === 2);
  page(2, [1]); // offset 1: nothing can be below it, so no further page is asked for
  const result = await all;
  assert.deepEqual(result.messages.map((m) => m.offset), [6, 5, 4, 2, 1]);
  assert.equal(result.offset, 6);

  // limit 0: the position only, one request, the fields sent as given.
  const pos = c.history('chat:x', { limit: 0 });
  await waitFor('position', () => ws.lastSent('history').limit === 0);
  const cmd = ws.lastSent('history');
  assert.equal(cmd.reverse, undefined);
  ws.frame({ id: cmd.id, ok: { epoch: 'E', offset: 6, messages: [] } });
  assert.deepEqual(await pos, { epoch: 'E', offset: 6, messages: [] });
});

test('tokens: refresh is sent before expiry; UnauthorizedError stops the client for good', async () => {
  let n = 0;
  const c = client(['ws://a/ws'], {
    getToken: async () => {
      n++;
      if (n >= 3) throw new UnauthorizedError('signed out');
      return fakeJwt({ sub: 'alice', exp: Math.floor(Date.now() / 1000) + 1 });
    },
  });
  const ends = [];
  c.on('disconnected', (e) => ends.push(e));
  c.connect();
  const { ws, connect } = await serve(0);
  assert.equal(typeof connect.token, 'string');
  const refresh = await waitFor('refresh', () => ws.lastSent('refresh'), 3000);
  ws.frame({ id: refresh.id, ok: {} });
  await waitFor('stopped', () => c.state === 'disconnected', 3000);
  assert.equal(ends.length, 1);
  assert.equal(ends[0].reconnect, false);
  assert.ok(ends[0].error instanceof UnauthorizedError);
  assert.equal(ws.closedWith.code, 1000);
});

test('tokens: UnauthorizedError at connect rejects connect()', async () => {
  const c = client(['ws://a/ws'], { getToken: async () => { throw new UnauthorizedError('no session'); } });
  await assert.rejects(c.connect(), (e) => e instanceof UnauthorizedError);
  assert.equal(c.state, 'disconnected');
});

test('liveness: idle sends a ping op, silence reconnects', async () => {
  const c = client(['ws://a/ws'], { pingTimeoutMs: 200 });
  c.connect();
  const { ws } = await serve(0);
  const ping = await waitFor('ping op', () => ws.lastSent('ping'), 2000);
  ws.frame({ id: ping.id, ok: {} }); // any frame counts as liveness
  await waitFor('dropped', () => ws.closedWith, 2000);
  assert.equal(ws.closedWith.code, 4000);
  await waitFor('new socket', () => FakeWebSocket.sockets[1], 2000);
});

test('disconnect(): queued requests fail with cancelled; failed attempts are not disconnections', async () => {
  const c = client(['ws://a/ws']);
  const events = [];
  c.on('disconnected', (e) => events.push(e));
  c.connect();
  const ws = await waitFor('socket', () => FakeWebSocket.sockets[0]);
  ws.serverClose(1006); // refused before open: just another attempt
  await waitFor('second attempt', () => FakeWebSocket.sockets[1]);
  assert.deepEqual(events, []);
  const queued = c.publish('chat:x', 1);
  c.disconnect();
  await assert.rejects(queued, (e) => e.code === 'cancelled');
  assert.deepEqual(events.map((e) => [e.reconnect, 'error' in e]), [[false, false]]);
});

test('subscribe() on an active subscription resolves at once with its last acceptance', async () => {
  const c = client();
  c.connect();
  const { ws } = await serve(0);
  const sub = c.subscription('chat:x');
  const first = sub.subscribe();
  ws.reply('subscribe', { channel: 'chat:x', epoch: 'E1', offset: 2 });
  assert.deepEqual(await first, { recovered: false, epoch: 'E1', offset: 2 });
  assert.deepEqual(await sub.subscribe(), { recovered: false, epoch: 'E1', offset: 2 });
  assert.equal(ws.sent.filter((s) => s.op === 'subscribe').length, 1);
  sub.unsubscribe();
  assert.equal(sub.state, 'unsubscribed');
  assert.equal(ws.lastSent('unsubscribe').channel, 'chat:x');
});

test('subscription: an empty channel that is still empty is not a failed recovery', async () => {
  const c = client();
  c.connect();
  const { ws } = await serve(0);
  const sub = c.subscription('chat:x');
  const failed = [];
  sub.on('recoveryFailed', (e) => failed.push(e));
  sub.subscribe();
  ws.reply('subscribe', { channel: 'chat:x', epoch: 'RANDOM1', offset: 0 });
  ws.serverClose(1006);
  const { ws: ws2 } = await serve(1);
  assert.deepEqual(ws2.lastSent('subscribe').from, { offset: 0, epoch: 'RANDOM1' });
  ws2.reply('subscribe', { channel: 'chat:x', epoch: 'OTHER', offset: 0, recovered: false });
  ws2.frame(msg(1, 'OTHER'));
  assert.deepEqual(failed, []);
  assert.deepEqual(sub.position, { epoch: 'OTHER', offset: 1 });
});
