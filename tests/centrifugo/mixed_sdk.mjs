// A centrifuge client and an @switchyard/client client (sdk/client, built into its dist/)
// in one room with presence: each sees the other's messages with the same offsets, both
// list both in presence, and each sees the other join and leave.
// Usage: node mixed_sdk.mjs URL ADDR SECRET   (URL: /connection/websocket; ADDR: HOST:PORT)
import WebSocket from 'ws';
import { client, subscribe, run, subscribed, until, check, same, indexes, token, describe } from './lib.mjs';

const [url, addr, secret] = process.argv.slice(2);
const CHANNEL = 'room:sdk-mixed';
const { Switchyard } = await import('../../sdk/client/dist/index.js');

run(async (step) => {
  const alice = client('alice', url, { token: token(secret, 'alice') });
  const sub = subscribe('sub', alice, CHANNEL, { recoverable: true, joinLeave: true });
  const bob = new Switchyard([`ws://${addr}/ws`], { getToken: async () => token(secret, 'bob'), WebSocket });
  const room = bob.subscription(CHANNEL);
  const seen = { messages: [], joins: [], leaves: [] };
  room.on('message', (m) => seen.messages.push(m));
  room.on('join', (e) => seen.joins.push(e));
  room.on('leave', (e) => seen.leaves.push(e));
  describe.set('bob', () => ({ messages: seen.messages.length, joins: seen.joins, leaves: seen.leaves }));
  let aliceId;

  await step('both subscribe; each sees the other join', async () => {
    alice.connect();
    sub.subscribe();
    await subscribed(sub);
    aliceId = alice.log.connected[0].client;
    await bob.connect();
    await room.subscribe();
    await until('alice sees bob join', () => sub.rec.joins.some((i) => i.user === 'bob'));
    // Bob subscribed after alice: alice's join was before his time, so ask presence.
    const listed = await bob.presence(CHANNEL);
    same(listed.map((e) => e.user).sort(), ['alice', 'bob'], 'presence through the native protocol');
    check(listed.some((e) => e.client === aliceId), `alice's client id ${aliceId} in ${JSON.stringify(listed)}`);
    const cf = await sub.presence();
    same(Object.values(cf.clients).map((i) => i.user).sort(), ['alice', 'bob'], 'presence through Centrifugo');
    const stats = await sub.presenceStats();
    same([stats.numClients, stats.numUsers], [2, 2], 'presence stats');
  });

  await step('each publishes; both see all in one order with the same offsets', async () => {
    for (let i = 1; i <= 6; i++) {
      if (i % 2) await sub.publish({ i });
      else await bob.publish(CHANNEL, { i });
    }
    await until('6 at alice', () => sub.rec.pubs.length >= 6);
    await until('6 at bob', () => seen.messages.length >= 6);
    same(indexes(sub.rec.pubs), [1, 2, 3, 4, 5, 6], 'alice (centrifuge)');
    same(seen.messages.map((m) => m.data.i), [1, 2, 3, 4, 5, 6], 'bob (@switchyard/client)');
    same(sub.rec.pubs.map((p) => p.offset), seen.messages.map((m) => m.offset), 'offsets');
  });

  await step('alice leaves: bob sees it; bob leaves: alice sees it', async () => {
    sub.unsubscribe();
    await until('bob sees alice leave', () => seen.leaves.some((e) => e.client === aliceId));
    sub.subscribe();
    await subscribed(sub, 2);
    await until('bob sees alice join again', () => seen.joins.some((e) => e.client === aliceId));
    await room.unsubscribe();
    await until('alice sees bob leave', () => sub.rec.leaves.some((i) => i.user === 'bob'));
    bob.disconnect();
    alice.disconnect();
  });
});
