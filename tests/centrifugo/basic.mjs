// Connect with a JWT, subscribe, publish through the subscription, receive, and read
// history three ways (forward, reverse, position only) with the unmodified centrifuge SDK.
// Usage: node basic.mjs URL SECRET   (URL: ws://HOST:PORT/connection/websocket)
import { client, subscribe, run, connected, subscribed, until, check, same, indexes, exactlyOnceInOrder, token } from './lib.mjs';

const [url, secret] = process.argv.slice(2);
const CHANNEL = 'room:basic';

run(async (step) => {
  const c = client('alice', url, { token: token(secret, 'alice') });
  const sub = subscribe('sub', c, CHANNEL, { recoverable: true });
  let position;

  await step('connect with a JWT', async () => {
    c.connect();
    await connected(c);
    const ctx = c.log.connected[0];
    check(typeof ctx.client === 'string' && ctx.client.length > 0, `connected without a client id: ${JSON.stringify(ctx)}`);
    check(ctx.transport === 'websocket', `transport ${ctx.transport}`);
  });

  await step('subscribe (recoverable: the reply is positioned)', async () => {
    sub.subscribe();
    await subscribed(sub);
    const ctx = sub.rec.subscribed[0];
    check(ctx.recoverable === true, `subscribed without recoverable: ${JSON.stringify(ctx)}`);
    check(ctx.streamPosition && typeof ctx.streamPosition.epoch === 'string' && ctx.streamPosition.epoch.length > 0,
      `subscribed without a stream position: ${JSON.stringify(ctx)}`);
    check(ctx.wasRecovering === false, `a first subscribe is not recovering: ${JSON.stringify(ctx)}`);
    position = ctx.streamPosition;
  });

  await step('publish through the subscription, receive each once in order', async () => {
    for (let i = 1; i <= 5; i++) await sub.publish({ i, text: `hello ${i}` });
    await until('5 publications', () => sub.rec.pubs.length >= 5);
    exactlyOnceInOrder(sub.rec.pubs, [1, 2, 3, 4, 5], 'live publications');
    check(sub.rec.pubs[0].offset === Number(position.offset) + 1,
      `first offset ${sub.rec.pubs[0].offset} after position ${position.offset}`);
    same(sub.rec.pubs[2].data, { i: 3, text: 'hello 3' }, 'data round trip');
  });

  await step('history({limit: 10}): oldest first, with the stream position', async () => {
    const h = await sub.history({ limit: 10 });
    same(indexes(h.publications), [1, 2, 3, 4, 5], 'history');
    same(h.publications.map((p) => p.offset), sub.rec.pubs.map((p) => p.offset), 'history offsets');
    check(h.epoch === position.epoch, `history epoch ${h.epoch}, subscribe epoch ${position.epoch}`);
    check(h.offset === sub.rec.pubs[4].offset, `history top offset ${h.offset}, last ${sub.rec.pubs[4].offset}`);
  });

  await step('history({limit: 2, since}): the page after a position', async () => {
    const since = { offset: sub.rec.pubs[1].offset, epoch: position.epoch };
    const h = await sub.history({ limit: 2, since });
    same(indexes(h.publications), [3, 4], 'history since the 2nd publication');
  });

  await step('history({limit: 0}): the position only', async () => {
    const h = await sub.history({ limit: 0 });
    check(!h.publications || h.publications.length === 0, `limit 0 returned publications: ${JSON.stringify(h.publications)}`);
    check(h.epoch === position.epoch, `epoch ${h.epoch}, want ${position.epoch}`);
    check(h.offset === sub.rec.pubs[4].offset, `offset ${h.offset}, want ${sub.rec.pubs[4].offset}`);
  });

  await step('history({limit: 10, reverse: true}): newest first', async () => {
    const h = await sub.history({ limit: 10, reverse: true });
    same(indexes(h.publications), [5, 4, 3, 2, 1], 'reverse history');
    const h2 = await sub.history({ limit: 2, reverse: true });
    same(indexes(h2.publications), [5, 4], 'reverse history, limit 2');
  });

  await step('disconnect cleanly', async () => {
    c.disconnect();
    await until('disconnected', () => c.state === 'disconnected');
  });
});
