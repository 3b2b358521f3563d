// Failover across a URL list in a real two-node cluster (real etcd, `cluster.secret`,
// `replicas = 2`): the node the clients use is SIGKILLed; subscribers on several channels
// (so that some live on the dead node's partitions) must see every offset exactly once
// with `recovered: true`, and every publish must resolve and be stored once. Skipped when
// etcd is not installed. Every process is killed in `after`.

import { test, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { Switchyard } from '../dist/index.js';
import { Node, freePort, haveEtcd, killAll, startEtcd, waitFor } from './harness.mjs';

const clients = [];
afterEach(() => {
  for (const c of clients.splice(0)) c.disconnect();
});
after(killAll);

const range = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => from + i);

function nodeConfig(etcd, id) {
  return `node_id = "${id}"\npartitions = 8\n[cluster]\netcd = ["${etcd}"]\nname = "sdk"\nlease_ttl = "2s"\n` +
    `coordination_interval = "1s"\nload_interval = "500ms"\netcd_timeout = "1s"\nsecret = "sdk-cluster-secret-0123456789"\n`;
}

async function clusterView(node) {
  const r = await fetch(`${node.http}/api/v1/cluster`);
  return r.json();
}

test('SIGKILL of the node in use: failover to the next URL, nothing lost or repeated', { timeout: 90000, skip: !haveEtcd() && 'etcd is not installed' }, async () => {
  const etcd = await startEtcd();
  const ports = [await freePort(), await freePort()];
  const nodes = [];
  for (const [k, port] of ports.entries()) nodes.push(await Node.start({ config: nodeConfig(etcd.endpoint, `n${k + 1}`), port }));
  await waitFor('both nodes own partitions and every partition has two in-sync replicas', async () => {
    const views = await Promise.all(nodes.map(clusterView));
    const [v] = views;
    return views.every((x) => x.epoch === v.epoch) && v.owners.includes('n1') && v.owners.includes('n2') && v.isr.every((r) => r.length === 2);
  }, 30000);

  const urls = ports.map((p) => `ws://127.0.0.1:${p}/ws`);
  const opts = { minBackoffMs: 50, maxBackoffMs: 500 };
  const subscriber = new Switchyard(urls, opts);
  const publisher = new Switchyard(urls, opts);
  clients.push(subscriber, publisher);
  const connectedTo = [];
  subscriber.on('connected', (info) => connectedTo.push(info.node));
  await Promise.all([subscriber.connect(), publisher.connect()]);
  assert.deepEqual(connectedTo, ['n1']);

  const channels = range(1, 6).map((i) => `chat:failover-${i}`);
  const seen = new Map(channels.map((c) => [c, []]));
  const recovered = new Map(channels.map((c) => [c, []]));
  let failures = 0;
  for (const ch of channels) {
    const sub = subscriber.subscription(ch);
    sub.on('message', (m) => seen.get(ch).push(m.offset));
    sub.on('subscribed', (e) => recovered.get(ch).push(e.recovered));
    sub.on('recoveryFailed', () => failures++);
    await sub.subscribe();
  }
  const publishRound = (i) => Promise.all(channels.map((ch) => publisher.publish(ch, { i })));
  for (const i of range(1, 5)) await publishRound(i);
  await waitFor('5 messages per channel', () => channels.every((c) => seen.get(c).length >= 5));

  await nodes[0].stop('SIGKILL');
  const during = range(6, 10).map((i) => publishRound(i));
  await Promise.all(during);
  for (const i of range(11, 15)) await publishRound(i);
  await waitFor('15 messages per channel', () => channels.every((c) => seen.get(c).length >= 15), 30000);

  assert.deepEqual(connectedTo, ['n1', 'n2']);
  assert.equal(failures, 0, 'epochs survive the failover');
  for (const ch of channels) {
    assert.deepEqual(seen.get(ch), range(1, 15), `${ch}: every offset once`);
    assert.deepEqual(recovered.get(ch), [false, true], `${ch}: recovered after the failover`);
    const all = await publisher.historyAll(ch);
    // Concurrent publishes retried after `unavailable` may be stored in another order.
    assert.deepEqual(all.messages.map((m) => m.data.i).sort((a, b) => a - b), range(1, 15), `${ch}: stored once each`);
    assert.deepEqual(all.messages.map((m) => m.offset), range(1, 15));
  }
});
