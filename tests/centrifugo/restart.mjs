// The router dies (kill -9) and comes back on the same data dir and port:
// the unmodified centrifuge SDK reconnects by itself and recovers everything acknowledged
// before the kill and published after the restart, once each, in order. Then the router
// is replaced by one on a fresh data dir (a new epoch) on the same port: the resubscribe says
// `recovered: false`, and the stream goes on under the new epoch.
// Usage: node restart.mjs URL SECRET
import { ask, client, subscribe, run, subscribed, until, check, same, indexes, exactlyOnceInOrder, token } from './lib.mjs';

const [url, secret] = process.argv.slice(2);
const CHANNEL = 'room:restart';
const range = (a, b) => Array.from({ length: b - a + 1 }, (_, k) => a + k);

run(async (step) => {
  const c = client('alice', url, { token: token(secret, 'alice') });
  const sub = subscribe('sub', c, CHANNEL, { recoverable: true });
  let epoch;

  await step('subscribe, publish 5 (acknowledged), receive them', async () => {
    c.connect();
    sub.subscribe();
    await subscribed(sub);
    epoch = sub.rec.subscribed[0].streamPosition?.epoch;
    for (let i = 1; i <= 5; i++) await sub.publish({ i });
    await until('5 publications', () => sub.rec.pubs.length >= 5);
    exactlyOnceInOrder(sub.rec.pubs, range(1, 5), 'live');
  });

  await step('kill -9 and restart on the same data: reconnect by itself, recover all', async () => {
    const before = c.log.connecting;
    // The test publishes 6..10 as soon as the router is back, before the client is.
    await ask('kill9-restart', CHANNEL, 6, 5);
    await subscribed(sub, 2);
    check(c.log.connecting > before, 'the client never reconnected');
    const ctx = sub.rec.subscribed[1];
    check(ctx.wasRecovering === true && ctx.recovered === true, `resubscribe after the restart: ${JSON.stringify(ctx)}`);
    check(ctx.streamPosition?.epoch === epoch, `epoch changed across a restart on the same data: ${epoch} -> ${ctx.streamPosition?.epoch}`);
    await until('10 publications', () => sub.rec.pubs.length >= 10);
    exactlyOnceInOrder(sub.rec.pubs, range(1, 10), 'after the restart');
    console.log(`     resubscribed with recovered publications in the reply: ${ctx.hasRecoveredPublications}`);
    const h = await sub.history({ limit: 100 });
    exactlyOnceInOrder(h.publications, range(1, 10), 'history after the restart');
  });

  await step('a fresh data dir (new epoch): recovered: false, then live under the new epoch', async () => {
    await ask('fresh-router');
    await subscribed(sub, 3);
    const ctx = sub.rec.subscribed[2];
    check(ctx.wasRecovering === true && ctx.recovered === false, `resubscribe after the epoch change: ${JSON.stringify(ctx)}`);
    check(ctx.streamPosition?.epoch && ctx.streamPosition.epoch !== epoch, `the epoch did not change: ${JSON.stringify(ctx)}`);
    await sub.publish({ i: 11 });
    await until('11 publications', () => sub.rec.pubs.length >= 11);
    // Offsets start again under the new epoch: only the order of `i` runs across it.
    same(indexes(sub.rec.pubs), range(1, 11), 'publications across the epoch change');
    exactlyOnceInOrder(sub.rec.pubs.slice(10), [11], 'under the new epoch');
    const h = await sub.history({ limit: 100 });
    exactlyOnceInOrder(h.publications, [11], 'history under the new epoch');
    check(h.epoch === ctx.streamPosition.epoch, `history epoch ${h.epoch}, subscribed ${ctx.streamPosition.epoch}`);
  });
});
