// 5,000 publications missed during a network cut are recovered exactly once, in order,
// by the unmodified centrifuge SDK when it reconnects.
// Usage: node missed.mjs URL SECRET [COUNT]
import { ask, client, subscribe, run, subscribed, until, check, exactlyOnceInOrder, token } from './lib.mjs';

const [url, secret, countArg] = process.argv.slice(2);
const COUNT = Number(countArg || 5000);
const CHANNEL = 'room:missed';
const range = (a, b) => Array.from({ length: b - a + 1 }, (_, k) => a + k);

run(async (step) => {
  const c = client('alice', url, { token: token(secret, 'alice') });
  const sub = subscribe('sub', c, CHANNEL, { recoverable: true });

  await step('subscribe and receive one publication', async () => {
    c.connect();
    sub.subscribe();
    await subscribed(sub);
    await sub.publish({ i: 0 });
    await until('the first publication', () => sub.rec.pubs.length >= 1);
  });

  await step(`cut, ${COUNT} published meanwhile, reconnect: each recovered once, in order`, async () => {
    await ask('cut');
    await until('the client to notice the cut', () => c.state === 'connecting');
    const published = await ask('publish', CHANNEL, 1, COUNT);
    await ask('restore');
    await subscribed(sub, 2);
    const ctx = sub.rec.subscribed[1];
    check(ctx.wasRecovering === true && ctx.recovered === true, `resubscribe: ${JSON.stringify(ctx)}`);
    await until(`${COUNT + 1} publications`, () => sub.rec.pubs.length >= COUNT + 1, 30_000);
    exactlyOnceInOrder(sub.rec.pubs, range(0, COUNT), 'recovered');
    check(sub.rec.pubs[COUNT].offset === published.last, `last offset ${sub.rec.pubs[COUNT].offset}, published ${published.last}`);
  });
});
