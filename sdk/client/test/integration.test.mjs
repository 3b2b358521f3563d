// Integration tests against real switchyard routers started here (standalone mode):
// recovery across a restart, recoveryFailed after the data is wiped, backward history
// (reverse, before, limit 0), publishes resent across a crash, token refresh, refused
// refresh and UnauthorizedError. Every process is killed in `after`; every wait is a
// poll with a deadline.

import { test, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { rm } from 'node:fs/promises';
import { Switchyard, UnauthorizedError, tokenExpiryMs } from '../dist/index.js';
import { Node, freePort, jwtConfig, killAll, token, waitFor } from './harness.mjs';

const clients = [];
afterEach(() => {
  for (const c of clients.splice(0)) c.disconnect();
});
after(killAll);

/** A client with short backoff, closed after the test. */
function client(urls, opts = {}) {
  const c = new Switchyard(urls, { minBackoffMs: 50, maxBackoffMs: 400, ...opts });
  clients.push(c);
  return c;
}

const range = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => from + i);
const urlsOf = (...ports) => ports.map((p) => `ws://127.0.0.1:${p}/ws`);

test('a restart on the same data dir: every offset exactly once, recovered: true', { timeout: 60000 }, async () => {
  const [p1, p2] = [await freePort(), await freePort()];
  const node = await Node.start({ port: p1 });
  const urls = urlsOf(p1, p2);
  const subscriber = client(urls, { batch: true });
  const publisher = client(urls);
  await Promise.all([subscriber.connect(), publisher.connect()]);

  const sub = subscriber.subscription('chat:restart');
  const seen = [];
  const subscribed = [];
  let failures = 0;
  sub.on('message', (m) => seen.push(m.offset));
  sub.on('subscribed', (e) => subscribed.push(e));
  sub.on('recoveryFailed', () => failures++);
  await sub.subscribe();

  await Promise.all(range(1, 20).map((i) => publisher.publish('chat:restart', { i })));
  await waitFor('20 messages', () => seen.length >= 20);

  assert.equal(await node.stop('SIGTERM'), 0, 'graceful exit');
  await waitFor('both clients notice', () => subscriber.state === 'connecting' && publisher.state === 'connecting');
  const whileDown = range(21, 30).map((i) => publisher.publish('chat:restart', { i }));
  await node.start(p2);
  await Promise.all(whileDown);
  for (const i of range(31, 40)) await publisher.publish('chat:restart', { i });

  await waitFor('40 messages', () => seen.length >= 40);
  assert.deepEqual(seen, range(1, 40));
  assert.equal(failures, 0);
  assert.deepEqual(subscribed.map((s) => s.recovered), [false, true]);
  const all = await publisher.historyAll('chat:restart', { limit: 7 });
  assert.deepEqual(all.messages.map((m) => m.data.i), range(1, 40), 'stored once each, in order');
});

test('history backwards: reverse, before, limit 0 and before without reverse', { timeout: 60000 }, async () => {
  const node = await Node.start();
  const c = client([node.url]);
  await c.connect();
  for (const i of range(1, 25)) await c.publish('chat:back', { i });

  const newest = await c.history('chat:back', { reverse: true, limit: 10 });
  assert.deepEqual(newest.messages.map((m) => m.offset), range(16, 25).reverse(), 'the newest 10, newest first');
  assert.equal(newest.offset, 25);
  const older = await c.history('chat:back', { reverse: true, before: 16, limit: 10 });
  assert.deepEqual(older.messages.map((m) => m.offset), range(6, 15).reverse());

  const back = await c.historyAll('chat:back', { reverse: true, limit: 7 });
  assert.deepEqual(back.messages.map((m) => m.data.i), range(1, 25).reverse(), 'every message once, newest first');
  const fwd = await c.historyAll('chat:back', { limit: 7 });
  assert.deepEqual(fwd.messages.map((m) => m.data.i), range(1, 25), 'forward paging is unchanged');

  const pos = await c.history('chat:back', { limit: 0 });
  assert.deepEqual(pos, { epoch: newest.epoch, offset: 25, messages: [] }, 'limit 0: the position only');
  await assert.rejects(c.history('chat:back', { before: 10 }), (e) => e.code === 'bad_request');
});

test('a wiped data dir: recoveryFailed, getState, then the new epoch', { timeout: 60000 }, async () => {
  const [p1, p2] = [await freePort(), await freePort()];
  const node = await Node.start({ port: p1 });
  const urls = urlsOf(p1, p2);
  const subscriber = client(urls);
  const publisher = client(urls);
  await Promise.all([subscriber.connect(), publisher.connect()]);

  const order = [];
  const sub = subscriber.subscription('chat:wiped', {
    getState: async (info) => {
      order.push(`getState ${info.previous.offset}`);
    },
  });
  const failed = [];
  sub.on('message', (m) => order.push(`${m.epoch === failed[0]?.epoch ? 'new' : 'old'} ${m.offset}`));
  sub.on('recoveryFailed', (e) => failed.push(e));
  await sub.subscribe();
  const first = await publisher.publish('chat:wiped', 'a');
  await publisher.publish('chat:wiped', 'b');
  await publisher.publish('chat:wiped', 'c');
  await waitFor('3 messages', () => order.length === 3);

  await node.stop('SIGTERM');
  await rm(node.dataDir, { recursive: true, force: true });
  await node.start(p2);
  await waitFor('recoveryFailed', () => failed.length === 1 && sub.state === 'subscribed');
  assert.deepEqual(failed[0].previous, { offset: 3, epoch: first.epoch });
  assert.notEqual(failed[0].epoch, first.epoch);

  const next = await publisher.publish('chat:wiped', 'd');
  assert.equal(next.offset, 1, 'the wiped channel starts over');
  await waitFor('the new message', () => order.length === 5);
  assert.deepEqual(order, ['old 1', 'old 2', 'old 3', 'getState 3', 'new 1']);
});

test('publishes survive a crash: all resolve after the restart, each stored exactly once', { timeout: 60000 }, async (t) => {
  const [p1, p2] = [await freePort(), await freePort()];
  const node = await Node.start({ port: p1 });
  const publisher = client(urlsOf(p1, p2));
  await publisher.connect();

  // A burst, then SIGKILL while some are in flight (acknowledged or not, stored or not).
  let acked = 0;
  const burst = range(1, 60).map((i) => publisher.publish('chat:resend', { i }).then((r) => (acked++, r)));
  await Promise.race(burst);
  await node.stop('SIGKILL');
  const ackedBeforeKill = acked;
  await waitFor('the client notices', () => publisher.state === 'connecting');
  // More while the node is down: queued.
  const queued = range(61, 70).map((i) => publisher.publish('chat:resend', { i }));
  await node.start(p2);
  const results = await Promise.all([...burst, ...queued]);
  t.diagnostic(`acked before the kill: ${ackedBeforeKill} of 60`);

  const all = await publisher.historyAll('chat:resend');
  const stored = all.messages.map((m) => m.data.i);
  assert.equal(new Set(stored).size, stored.length, `no duplicates: ${stored}`);
  assert.deepEqual([...stored].sort((a, b) => a - b), range(1, 70), 'nothing lost');
  assert.deepEqual(all.messages.map((m) => m.offset), range(1, 70), 'contiguous offsets');
  const byI = new Map(all.messages.map((m) => [m.data.i, m.offset]));
  results.forEach((r, k) => assert.equal(r.offset, byI.get(k + 1), `ack of ${k + 1} names its stored offset`));

  // The same idempotency key twice stores once.
  const a = await publisher.publish('chat:resend', 'x', { idempotencyKey: 'same-key' });
  const b = await publisher.publish('chat:resend', 'x', { idempotencyKey: 'same-key' });
  assert.deepEqual(a, b);
});

test('token refresh before expiry keeps the connection past the first token', { timeout: 60000 }, async () => {
  const node = await Node.start({ config: jwtConfig });
  const tokens = [];
  const alice = client(node.url, {
    getToken: async () => {
      const t = token('alice', 3);
      tokens.push(t);
      return t;
    },
  });
  const drops = [];
  let refreshed = 0;
  alice.on('disconnected', (e) => drops.push(e));
  alice.on('refreshed', () => refreshed++);
  await alice.connect();
  const sub = alice.subscription('room:refresh');
  const got = [];
  sub.on('message', (m) => got.push(m.data));
  await sub.subscribe();

  const firstExpiry = tokenExpiryMs(tokens[0]);
  await waitFor('well past the first expiry', () => Date.now() > firstExpiry + 1500, 15000);
  assert.deepEqual(drops, [], 'never disconnected');
  assert.equal(alice.state, 'connected');
  assert.ok(refreshed >= 1, `refreshed ${refreshed} times`);

  const bob = client(node.url, { getToken: async () => token('bob', 3600) });
  await bob.connect();
  await bob.publish('room:refresh', 'after the first expiry');
  await waitFor('the message', () => got.length === 1);
  assert.deepEqual(got, ['after the first expiry']);
  assert.deepEqual(drops, []);
});

test('a refused refresh is an error event; UnauthorizedError ends the client', { timeout: 60000 }, async () => {
  const node = await Node.start({ config: jwtConfig });
  let calls = 0;
  const switching = client(node.url, { getToken: async () => (calls++ === 0 ? token('alice', 3) : token('bob', 3600)) });
  const errors = [];
  const users = [];
  switching.on('error', (e) => errors.push(e.code));
  switching.on('connected', (info) => users.push(info.user));
  await switching.connect();
  await waitFor('forbidden refresh', () => errors.includes('forbidden'), 10000);
  // The old token expires (close 4001); the next connect uses the new user's token.
  await waitFor('reconnected as bob', () => users.length === 2, 15000);
  assert.deepEqual(users, ['alice', 'bob']);

  let n = 0;
  const ending = client(node.url, {
    getToken: async () => {
      if (n++ === 0) return token('carol', 2);
      throw new UnauthorizedError('carol signed out');
    },
  });
  const ends = [];
  ending.on('disconnected', (e) => ends.push(e));
  await ending.connect();
  await waitFor('stopped for good', () => ending.state === 'disconnected', 10000);
  assert.equal(ends.length, 1);
  assert.equal(ends[0].reconnect, false);
  assert.ok(ends[0].error instanceof UnauthorizedError);
});

test('presence: two clients see each other, join and leave events, stats', { timeout: 60000 }, async () => {
  const node = await Node.start({ config: '[namespaces.chat]\npresence = true\njoin_leave = true\n' });
  const urls = [node.url];
  const a = client(urls);
  const b = client(urls);
  const connected = (c) => new Promise((resolve) => c.on('connected', resolve));
  const [infoA, infoB] = await Promise.all([connected(a), connected(b), a.connect(), b.connect()]);
  const joins = [];
  const leaves = [];
  const subA = a.subscription('chat:presence');
  subA.on('join', (e) => joins.push(e.client));
  subA.on('leave', (e) => leaves.push(e.client));
  await subA.subscribe();
  const subB = b.subscription('chat:presence');
  await subB.subscribe();
  await waitFor('both joins', () => joins.includes(infoA.client) && joins.includes(infoB.client));
  const present = (await a.presence('chat:presence')).map((e) => e.client).sort();
  assert.deepEqual(present, [infoA.client, infoB.client].sort());
  assert.deepEqual(await b.presenceStats('chat:presence'), { num_clients: 2, num_users: 1 });
  subB.unsubscribe();
  await waitFor('the leave', () => leaves.includes(infoB.client));
  assert.deepEqual(await a.presenceStats('chat:presence'), { num_clients: 1, num_users: 1 });
});
