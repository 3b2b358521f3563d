// Recovery with the unmodified centrifuge SDK: a network cut (the Rust test's proxy drops
// the connection and refuses new ones) while natively published messages arrive, then a
// client-side disconnect()/connect(); each time every missed publication must arrive
// exactly once, in order, with `recovered: true, wasRecovering: true`.
// Usage: node recovery.mjs URL SECRET
import { ask, client, subscribe, run, connected, subscribed, until, check, exactlyOnceInOrder, token } from './lib.mjs';

const [url, secret] = process.argv.slice(2);
const CHANNEL = 'room:recovery';
const range = (a, b) => Array.from({ length: b - a + 1 }, (_, k) => a + k);

run(async (step) => {
  const c = client('alice', url, { token: token(secret, 'alice') });
  const sub = subscribe('sub', c, CHANNEL, { recoverable: true });

  await step('subscribe, receive 3 native publications live', async () => {
    c.connect();
    sub.subscribe();
    await subscribed(sub);
    await ask('publish', CHANNEL, 1, 3);
    await until('3 publications', () => sub.rec.pubs.length >= 3);
    exactlyOnceInOrder(sub.rec.pubs, range(1, 3), 'live');
  });

  await step('network cut: 10 published meanwhile are recovered once, in order', async () => {
    const before = c.log.connecting;
    await ask('cut');
    await until('the client to notice the cut', () => c.state === 'connecting' && c.log.connecting > before);
    await ask('publish', CHANNEL, 4, 10);
    await ask('restore');
    await subscribed(sub, 2);
    const ctx = sub.rec.subscribed[1];
    check(ctx.wasRecovering === true && ctx.recovered === true, `resubscribe after the cut: ${JSON.stringify(ctx)}`);
    await until('13 publications', () => sub.rec.pubs.length >= 13);
    exactlyOnceInOrder(sub.rec.pubs, range(1, 13), 'after the cut');
  });

  await step('client.disconnect() + connect(): 7 published meanwhile are recovered', async () => {
    c.disconnect();
    await until('disconnected', () => c.state === 'disconnected');
    await ask('publish', CHANNEL, 14, 7);
    c.connect();
    await connected(c);
    await subscribed(sub, 3);
    const ctx = sub.rec.subscribed[2];
    check(ctx.wasRecovering === true && ctx.recovered === true, `resubscribe after connect(): ${JSON.stringify(ctx)}`);
    await until('20 publications', () => sub.rec.pubs.length >= 20);
    exactlyOnceInOrder(sub.rec.pubs, range(1, 20), 'after disconnect/connect');
  });

  await step('live again: a publication through the subscription arrives once', async () => {
    await sub.publish({ i: 21 });
    await until('21 publications', () => sub.rec.pubs.length >= 21);
    exactlyOnceInOrder(sub.rec.pubs, range(1, 21), 'live after recovery');
  });
});
