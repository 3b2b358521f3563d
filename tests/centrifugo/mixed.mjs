// A centrifuge client and a native Switchyard client (docs/protocol.md, over `ws`) in one
// room see each other's messages, in the same order, with the same offsets.
// Usage: node mixed.mjs URL ADDR SECRET   (ADDR: the router's HOST:PORT, for /ws)
import { client, subscribe, run, subscribed, until, check, same, exactlyOnceInOrder, indexes, nativeClient, token, describe } from './lib.mjs';

const [url, addr, secret] = process.argv.slice(2);
const CHANNEL = 'room:mixed';

run(async (step) => {
  const c = client('alice', url, { token: token(secret, 'alice') });
  const sub = subscribe('sub', c, CHANNEL, { recoverable: true });
  let native;

  await step('both subscribe', async () => {
    c.connect();
    sub.subscribe();
    await subscribed(sub);
    native = await nativeClient(addr, token(secret, 'bob'));
    await native.cmd('subscribe', { channel: CHANNEL });
    describe.set('native', () => ({ pushes: native.pushes.slice(-5), count: native.pushes.length }));
  });

  await step('each publishes 5, alternating; both see all 10 in one order', async () => {
    const acks = new Map();
    for (let i = 1; i <= 10; i++) {
      if (i % 2) {
        await sub.publish({ i });
      } else {
        const ok = await native.cmd('publish', { channel: CHANNEL, data: { i } });
        acks.set(i, ok.offset);
      }
    }
    await until('10 at the centrifuge client', () => sub.rec.pubs.length >= 10);
    await until('10 at the native client', () => native.pushes.filter((p) => p.push === 'message').length >= 10);
    const msgs = native.pushes.filter((p) => p.push === 'message');
    exactlyOnceInOrder(sub.rec.pubs, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 'centrifuge client');
    same(msgs.map((m) => m.data.i), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 'native client');
    same(sub.rec.pubs.map((p) => p.offset), msgs.map((m) => m.offset), 'offsets seen by each');
    for (const [i, offset] of acks) {
      const p = sub.rec.pubs.find((x) => x.data.i === i);
      check(p.offset === offset, `native publish of ${i} acknowledged at ${offset}, delivered at ${p.offset}`);
    }
    console.log(`     publisher of native messages as the centrifuge client sees it: ${JSON.stringify(sub.rec.pubs[1].user)}`);
  });

  await step('history is the same through both protocols', async () => {
    const h = await sub.history({ limit: 100 });
    const nh = await native.cmd('history', { channel: CHANNEL, limit: 100 });
    same(indexes(h.publications), nh.messages.map((m) => m.data.i), 'history');
    same(h.publications.map((p) => p.offset), nh.messages.map((m) => m.offset), 'history offsets');
    check(h.epoch === nh.epoch, `epochs differ: centrifuge ${h.epoch}, native ${nh.epoch}`);
    native.close();
  });
});
