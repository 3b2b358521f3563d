// A 3-node cluster on real etcd: centrifuge clients on the two nodes that do not own the
// channel publish, subscribe and read history; the Rust test kills -9 the channel's leader
// mid-stream. Every acknowledged publication must reach both subscribers exactly once, in
// order (an unacknowledged one at most once), and be in history once.
// Usage: node cluster.mjs URL_A URL_B SECRET CHANNEL
import { ask, client, subscribe, run, subscribed, until, check, indexes, token } from './lib.mjs';

const [urlA, urlB, secret, CHANNEL] = process.argv.slice(2);
const BEFORE = 20;
const AFTER = 20;

/** Checks `pubs` against the acknowledged and attempted indexes. */
function checkStream(pubs, acked, what) {
  const got = indexes(pubs);
  const seen = new Map();
  for (const v of got) seen.set(v, (seen.get(v) || 0) + 1);
  const dup = [...seen].filter(([, n]) => n > 1).map(([v]) => v);
  check(dup.length === 0, () => `${what}: delivered more than once: ${JSON.stringify(dup.slice(0, 10))}`);
  const missing = acked.filter((i) => !seen.has(i));
  check(missing.length === 0, () => `${what}: acknowledged but missing: ${JSON.stringify(missing.slice(0, 20))} (of ${acked.length})`);
  for (let k = 1; k < pubs.length; k++) {
    check(pubs[k].offset > pubs[k - 1].offset, () => `${what}: offsets not increasing at ${k}: ${pubs[k - 1].offset} then ${pubs[k].offset}`);
    check(got[k] > got[k - 1], () => `${what}: out of order at ${k}: ${got[k - 1]} then ${got[k]}`);
  }
}

run(async (step) => {
  const a = client('alice (gateway node A)', urlA, { token: token(secret, 'alice') });
  const b = client('bob (gateway node B)', urlB, { token: token(secret, 'bob') });
  const subA = subscribe('subA', a, CHANNEL, { recoverable: true });
  const subB = subscribe('subB', b, CHANNEL, { recoverable: true });
  const acked = [];
  const failed = [];
  let stop = false;
  let publisher;

  await step('subscribe on two non-owner nodes; publish and receive through them', async () => {
    a.connect();
    b.connect();
    subA.subscribe();
    subB.subscribe();
    await subscribed(subA);
    await subscribed(subB);
    for (let i = 1; i <= 5; i++) {
      await subA.publish({ i });
      acked.push(i);
    }
    await until('5 at A', () => subA.rec.pubs.length >= 5);
    await until('5 at B', () => subB.rec.pubs.length >= 5);
    checkStream(subA.rec.pubs, acked, 'A');
    checkStream(subB.rec.pubs, acked, 'B');
    const h = await subB.history({ limit: 100 });
    checkStream(h.publications, acked, 'history through B');
  });

  await step(`kill -9 the leader mid-stream (${BEFORE} acks before, ${AFTER} after)`, async () => {
    let next = 6;
    publisher = (async () => {
      while (!stop) {
        const i = next++;
        try {
          await subA.publish({ i });
          acked.push(i);
        } catch (e) {
          failed.push({ i, code: e?.code, message: e?.message });
          await new Promise((r) => setTimeout(r, 100));
        }
      }
    })();
    await until(`${BEFORE} acks before the kill`, () => acked.length >= 5 + BEFORE);
    const killed = await ask('kill-leader');
    console.log(`     killed ${killed.killed}; the channel is led by ${killed.leader} now`);
    const mark = acked.length;
    await until(`${AFTER} acks after the failover`, () => acked.length >= mark + AFTER, 45_000);
    stop = true;
    await publisher;
    console.log(`     ${acked.length} acknowledged, ${failed.length} failed: ${JSON.stringify(failed.slice(0, 5))}`);
  });

  await step('both subscribers got every acknowledged publication once, in order', async () => {
    const last = acked[acked.length - 1];
    await until(`A to receive ${last}`, () => indexes(subA.rec.pubs).includes(last), 30_000);
    await until(`B to receive ${last}`, () => indexes(subB.rec.pubs).includes(last), 30_000);
    checkStream(subA.rec.pubs, acked, 'A');
    checkStream(subB.rec.pubs, acked, 'B');
    const delivered = new Set(indexes(subA.rec.pubs));
    console.log(`     of the ${failed.length} publishes with an unknown outcome, ${failed.filter((f) => delivered.has(f.i)).length} were stored (delivered once)`);
  });

  await step('history has every acknowledged publication once', async () => {
    const h = await subA.history({ limit: 1000 });
    checkStream(h.publications, acked, 'history');
  });
});
