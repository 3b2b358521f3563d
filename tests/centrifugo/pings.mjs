// The server's `{}` pings keep the unmodified centrifuge SDK connected while publications
// flow: the router pings every 2 s (`sessions.ping_interval`), the client allows 1.5 s
// past that (`maxServerPingDelay`), and publishes for 8 s; it must never reconnect.
// Usage: node pings.mjs URL SECRET
import { client, subscribe, run, subscribed, until, check, exactlyOnceInOrder, token, frames } from './lib.mjs';

const [url, secret] = process.argv.slice(2);
const SECONDS = 8;

run(async (step) => {
  const c = client('alice', url, { token: token(secret, 'alice'), maxServerPingDelay: 1500 });
  const sub = subscribe('sub', c, 'room:pings', { recoverable: true });

  await step('connect: the reply advertises a 2 s ping', async () => {
    c.connect();
    sub.subscribe();
    await subscribed(sub);
    const reply = frames.find((f) => f.startsWith('< ') && f.includes('"connect":{'));
    check(reply && reply.includes('"ping":2,'), `connect reply: ${reply}`);
  });

  await step(`publish every 200 ms for ${SECONDS} s: no reconnect`, async () => {
    const until_ = Date.now() + SECONDS * 1000;
    let i = 0;
    while (Date.now() < until_) {
      await sub.publish({ i: ++i });
      await new Promise((r) => setTimeout(r, 200));
    }
    await until(`${i} publications`, () => sub.rec.pubs.length >= i);
    exactlyOnceInOrder(sub.rec.pubs, Array.from({ length: i }, (_, k) => k + 1), 'publications');
    check(c.log.connecting === 1, `the client reconnected: ${c.log.connecting} connecting events, last ${JSON.stringify(c.log.lastConnecting)}`);
  });
});
