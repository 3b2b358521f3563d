// Connection tokens with the unmodified centrifuge SDK.
//   refresh: tokens that expire a few seconds ahead and a getToken callback that mints new
//            ones; the connection stays up (one `connecting` event, no reconnect) across
//            several expiries, and the subscription keeps working.
//   forged:  a token signed with the wrong secret stops the client for good: state
//            `disconnected` and no further connection attempt (counted by the client and
//            by the test's proxy) for a few seconds.
// Usage: node token.mjs URL SECRET refresh|forged
import { ask, client, subscribe, run, connected, subscribed, until, check, quiet, exactlyOnceInOrder, token } from './lib.mjs';

const [url, secret, mode] = process.argv.slice(2);
const TTL = 3;
const REFRESHES = 3;

run(async (step) => {
  if (mode === 'refresh') {
    let minted = 0;
    const c = client('alice', url, {
      token: token(secret, 'alice', TTL),
      getToken: async () => {
        minted++;
        return token(secret, 'alice', TTL);
      },
    });
    const sub = subscribe('sub', c, 'room:refresh', { recoverable: true });

    await step(`connect with a token that expires in ${TTL} s`, async () => {
      c.connect();
      sub.subscribe();
      await subscribed(sub);
      await sub.publish({ i: 1 });
      await until('publication 1', () => sub.rec.pubs.length >= 1);
    });

    await step(`${REFRESHES} expiries: getToken is called, the connection stays up`, async () => {
      await until(`${REFRESHES} refreshes`, () => minted >= REFRESHES, (TTL + 3) * (REFRESHES + 1) * 1000);
      check(c.state === 'connected', `state ${c.state}`);
      check(c.log.connecting === 1, `the client reconnected: ${c.log.connecting} connecting events, disconnects ${JSON.stringify(c.log.disconnected)}`);
      check(sub.rec.subscribed.length === 1, `the subscription resubscribed ${sub.rec.subscribed.length - 1} times`);
      check(c.log.errors.length === 0, `errors: ${JSON.stringify(c.log.errors)}`);
    });

    await step('the subscription still works after the refreshes', async () => {
      await sub.publish({ i: 2 });
      await until('publication 2', () => sub.rec.pubs.length >= 2);
      exactlyOnceInOrder(sub.rec.pubs, [1, 2], 'after the refreshes');
      check(c.log.connecting === 1, `the client reconnected: ${c.log.connecting} connecting events`);
    });
  } else if (mode === 'forged') {
    const c = client('mallory', url, { token: token('not-the-secret-0123456789', 'mallory') });

    await step('a forged token: the client ends disconnected', async () => {
      c.connect();
      await until('state disconnected after a refused connect', () => c.state === 'disconnected' && c.log.disconnected.length > 0);
      const ctx = c.log.disconnected[c.log.disconnected.length - 1];
      console.log(`     disconnected with ${JSON.stringify(ctx)}; errors ${JSON.stringify(c.log.errors)}`);
    });

    await step('and makes no further connection attempt', async () => {
      const seen = c.log.connecting;
      const before = await ask('connections');
      await quiet(3000);
      const after = await ask('connections');
      check(c.state === 'disconnected', `state ${c.state}`);
      check(c.log.connecting === seen, `connecting events went ${seen} -> ${c.log.connecting}`);
      check(after.accepted === before.accepted, `TCP connections to the router went ${before.accepted} -> ${after.accepted}`);
    });
  } else {
    throw new Error(`unknown mode ${mode}`);
  }
});
