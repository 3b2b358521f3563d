// Presence and join/leave between two users with the unmodified centrifuge SDK: both
// listed by presence(), counted by presenceStats(), B's subscribe is a `join` for A and
// B's unsubscribe a `leave`.
// Usage: node presence.mjs URL SECRET
import { client, subscribe, run, connected, subscribed, until, check, same, token } from './lib.mjs';

const [url, secret] = process.argv.slice(2);
const CHANNEL = 'room:presence';

run(async (step) => {
  const a = client('alice', url, { token: token(secret, 'alice') });
  const b = client('bob', url, { token: token(secret, 'bob') });
  const subA = subscribe('subA', a, CHANNEL, { joinLeave: true });
  const subB = subscribe('subB', b, CHANNEL, { joinLeave: true });
  let idA, idB;

  await step('alice subscribes, then bob: alice gets bob\'s join', async () => {
    a.connect();
    subA.subscribe();
    await subscribed(subA);
    idA = a.log.connected[0].client;
    b.connect();
    subB.subscribe();
    await subscribed(subB);
    idB = b.log.connected[0].client;
    const join = await until('bob\'s join at alice', () => subA.rec.joins.find((i) => i.user === 'bob'));
    check(join.client === idB, `join of client ${join.client}, bob is ${idB}`);
  });

  await step('presence() lists both clients', async () => {
    const p = await until('presence of 2', async () => {
      const r = await subA.presence();
      return Object.keys(r.clients).length >= 2 ? r : null;
    });
    const rows = Object.entries(p.clients).map(([k, v]) => [k, v.client, v.user]).sort((x, y) => x[2].localeCompare(y[2]));
    same(rows, [[idA, idA, 'alice'], [idB, idB, 'bob']], 'presence');
    const fromB = await subB.presence();
    same(Object.keys(fromB.clients).sort(), [idA, idB].sort(), 'presence seen by bob');
  });

  await step('presenceStats() counts 2 clients, 2 users', async () => {
    const s = await subA.presenceStats();
    same({ clients: s.numClients, users: s.numUsers }, { clients: 2, users: 2 }, 'presence stats');
  });

  await step('bob unsubscribes: alice gets bob\'s leave', async () => {
    subB.unsubscribe();
    const leave = await until('bob\'s leave at alice', () => subA.rec.leaves.find((i) => i.user === 'bob'));
    check(leave.client === idB, `leave of client ${leave.client}, bob is ${idB}`);
    const s = await until('presence stats of 1', async () => {
      const r = await subA.presenceStats();
      return r.numClients === 1 ? r : null;
    });
    same({ clients: s.numClients, users: s.numUsers }, { clients: 1, users: 1 }, 'presence stats after the leave');
    check(!subA.rec.leaves.some((i) => i.user === 'alice'), 'alice saw her own leave');
  });
});
