//! Cross-node routing under change (issue #5): partitions that move while publishers run,
//! a drained node, a rolling restart, a crashed owner and a cut peer link. Real etcd, real
//! router processes; publishers retry with idempotency keys (as a client library would),
//! followers recover after `unsubscribed` or a close.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use switchyard_proto::partition::partition_of;
use switchyard_tests::etcd::{cluster_view, node_config, wait_converged, wait_in_sync, Etcd};
use switchyard_tests::serde_json::{json, Value};
use switchyard_tests::*;
use tokio::sync::watch;
use tokio::time::Instant;

const P: u32 = 16;
const SECRET: &str = "correct-horse-battery-staple";

fn config(etcd: &Etcd, cluster: &str, id: &str, extra_cluster: &str) -> String {
    format!("{}secret = \"{SECRET}\"\n{extra_cluster}", node_config(etcd, cluster, id, P, ""))
}

fn start(etcd: &Etcd, cluster: &str, id: &str) -> Node {
    Node::start(&config(etcd, cluster, id, ""))
}

/// The addresses clients may connect to; tests update it as nodes restart.
type Addrs = Arc<Mutex<Vec<SocketAddr>>>;

fn addrs(nodes: &[&Node]) -> Addrs {
    Arc::new(Mutex::new(nodes.iter().map(|n| n.addr()).collect()))
}

/// Connects to the first address in `addrs` (from `from` on, round robin) that answers.
async fn connect_any(addrs: &Addrs, from: usize) -> Result<(Client, SocketAddr)> {
    let deadline = Instant::now() + DEADLINE;
    let mut i = from;
    loop {
        let list = addrs.lock().unwrap().clone();
        let addr = list[i % list.len()];
        // A frozen node (SIGSTOP) accepts TCP but never answers the upgrade.
        if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_secs(2), Client::connect_to(addr)).await {
            return Ok((c, addr));
        }
        ensure!(Instant::now() < deadline, "no node accepted a connection within {DEADLINE:?}");
        i += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One acknowledged publish.
#[derive(Debug, Clone)]
struct Acked {
    n: u64,
    offset: u64,
    epoch: String,
}

/// Publishes `{"n": i}` to `channel` until told to stop, each with idempotency key
/// `{tag}-{i}`, retrying a failed publish (same key) and reconnecting when the connection
/// ends. Every reply must come within `answer_within`.
fn steady_publisher(
    addrs: Addrs,
    home: usize,
    channel: String,
    tag: String,
    answer_within: Duration,
    stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<Result<(Vec<Acked>, usize)>> {
    steady_publisher_with(addrs, home, channel, tag, answer_within, false, stop)
}

/// [`steady_publisher`]; with `reconnect_on_silence`, a publish unanswered within
/// `answer_within` is retried on another node instead of failing the test.
fn steady_publisher_with(
    addrs: Addrs,
    home: usize,
    channel: String,
    tag: String,
    answer_within: Duration,
    reconnect_on_silence: bool,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<Result<(Vec<Acked>, usize)>> {
    tokio::spawn(async move {
        let (mut client, _) = connect_any(&addrs, home).await?;
        let mut acked = Vec::new();
        let mut errors = 0;
        let mut n = 0u64;
        while !*stop.borrow_and_update() {
            let give_up = Instant::now() + DEADLINE * 2;
            loop {
                ensure!(Instant::now() < give_up, "publish {tag}-{n} to {channel} never succeeded");
                let fields = json!({"channel": channel, "data": {"n": n}, "idempotency_key": format!("{tag}-{n}")});
                let sent = Instant::now();
                let reply = match client.send_cmd("publish", fields).await {
                    Ok(id) => tokio::time::timeout(answer_within, client.wait_reply(id)).await,
                    Err(e) => Ok(Err(e)),
                };
                match reply {
                    // A frozen node (SIGSTOP) answers nothing: a client gives up on it and
                    // retries elsewhere with the same key.
                    Err(_) if reconnect_on_silence => {
                        errors += 1;
                        (client, _) = connect_any(&addrs, home + 1 + errors).await?;
                    }
                    Err(_) => bail!("publish {tag}-{n} got no answer within {answer_within:?}"),
                    Ok(Ok(r)) if r.get("ok").is_some() => {
                        let ok = &r["ok"];
                        acked.push(Acked { n, offset: u64_field(ok, "offset")?, epoch: str_field(ok, "epoch")? });
                        break;
                    }
                    Ok(Ok(r)) => {
                        // A definite error (unavailable while the partition moves): retry.
                        errors += 1;
                        ensure!(sent.elapsed() <= answer_within, "late error reply: {r}");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Ok(Err(_)) => {
                        // The connection ended (the node drained or died): reconnect.
                        errors += 1;
                        (client, _) = connect_any(&addrs, home + 1 + errors).await?;
                    }
                }
            }
            n += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok((acked, errors))
    })
}

/// What a follower saw.
#[derive(Debug, Default)]
struct Followed {
    /// `(offset, epoch, n)` of every message push, in order.
    messages: Vec<(u64, String, u64)>,
    /// `recovered` of every resubscription.
    recoveries: Vec<bool>,
    /// Reconnections after the connection ended.
    reconnects: usize,
}

/// Follows `channel` from the node at `addrs[home]` (live from its current top) until it
/// has received `until`: after an `unsubscribed` push it resubscribes with `recover` from
/// the last message; after a close it reconnects to another node and recovers there.
fn follower(
    addrs: Addrs,
    home: usize,
    channel: String,
    until: watch::Receiver<Option<(u64, String)>>,
    ready: tokio::sync::mpsc::Sender<()>,
) -> tokio::task::JoinHandle<Result<Followed>> {
    tokio::spawn(async move {
        let mut seen = Followed::default();
        let (mut client, _) = connect_any(&addrs, home).await?;
        let ok = client.subscribe(&channel, json!({})).await?;
        let _ = ready.send(()).await;
        let mut position = (u64_field(&ok, "offset")?, str_field(&ok, "epoch")?);
        let mut pending = client.take_pushes();
        let mut give_up: Option<Instant> = None;
        loop {
            if let Some(target) = until.borrow().clone() {
                if position == target || (position.1 == target.1 && position.0 >= target.0) {
                    return Ok(seen);
                }
                let at = *give_up.get_or_insert_with(|| Instant::now() + DEADLINE * 2);
                ensure!(Instant::now() < at, "follower of {channel} stuck at {position:?}, wanted {target:?}");
            }
            let event = match pending.is_empty() {
                false => Some(Event::Push(pending.remove(0))),
                true => client.next_event(Instant::now() + Duration::from_millis(200)).await,
            };
            let resubscribe = match event {
                None | Some(Event::Reply(_)) => continue,
                Some(Event::Push(p)) if p["push"] == "message" => {
                    let (offset, epoch) = (u64_field(&p, "offset")?, str_field(&p, "epoch")?);
                    seen.messages.push((offset, epoch.clone(), p["data"]["n"].as_u64().unwrap_or(u64::MAX)));
                    position = (offset, epoch);
                    continue;
                }
                Some(Event::Push(p)) if p["push"] == "unsubscribed" => false,
                Some(Event::Push(p)) if p["push"] == "disconnect" => continue,
                Some(Event::Push(p)) => bail!("unexpected push {p}"),
                Some(Event::Other(t)) => bail!("unexpected frame {t}"),
                Some(Event::Close(_) | Event::Ended(_)) => true,
            };
            if resubscribe {
                seen.reconnects += 1;
                (client, _) = connect_any(&addrs, home + seen.reconnects).await?;
            }
            // Resubscribe (retrying while the partition is still moving) and recover.
            let from = json!({"from": {"offset": position.0, "epoch": position.1}});
            let ok = loop {
                let r = client.cmd("subscribe", merge_into(json!({"channel": channel}), from.clone())).await;
                match r {
                    Ok(r) if r.get("ok").is_some() => break r["ok"].clone(),
                    Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    Err(_) => {
                        seen.reconnects += 1;
                        (client, _) = connect_any(&addrs, home + seen.reconnects).await?;
                    }
                }
            };
            let recovered = ok["recovered"].as_bool().unwrap_or(false);
            seen.recoveries.push(recovered);
            if !recovered {
                position = (u64_field(&ok, "offset")?, str_field(&ok, "epoch")?);
            }
            pending = client.take_pushes();
        }
    })
}

fn merge_into(mut a: Value, b: Value) -> Value {
    merge(&mut a, b);
    a
}

/// One channel in each partition.
fn channel_per_partition() -> Vec<String> {
    (0..P).map(|p| (0..).map(|i| format!("room:{i}")).find(|c| partition_of(c, P) == p).expect("a channel")).collect()
}

fn owner_of(map: &Value, channel: &str) -> String {
    map["owners"][partition_of(channel, P) as usize].as_str().unwrap_or_default().to_string()
}

/// Checks one channel after the run: every acknowledged publish is in `history` exactly
/// once, history is contiguous under one epoch, and every follower's stream is contiguous
/// with no duplicate and ends at the top.
fn check_channel(channel: &str, acked: &[Acked], history: &History, followers: &[Followed]) -> Result<()> {
    let epochs: std::collections::BTreeSet<&str> = acked.iter().map(|a| a.epoch.as_str()).collect();
    ensure!(epochs.len() == 1, "{channel}: acks under several epochs {epochs:?}");
    ensure!(epochs.contains(history.epoch.as_str()), "{channel}: history epoch {} differs", history.epoch);
    assert_contiguous(&history.offsets(), 1).with_context(|| format!("{channel}: history"))?;
    let ns: Vec<u64> = history.messages.iter().map(|m| m["data"]["n"].as_u64().unwrap_or(u64::MAX)).collect();
    let distinct: std::collections::BTreeSet<u64> = ns.iter().copied().collect();
    ensure!(distinct.len() == ns.len(), "{channel}: a message is stored twice");
    for a in acked {
        let at = history.messages.iter().find(|m| m["offset"] == json!(a.offset));
        ensure!(
            at.is_some_and(|m| m["data"]["n"] == json!(a.n)),
            "{channel}: acknowledged n={} at offset {} missing from history",
            a.n,
            a.offset
        );
    }
    let top = history.offset;
    for (i, f) in followers.iter().enumerate() {
        let offsets: Vec<u64> = f.messages.iter().map(|m| m.0).collect();
        let Some(&first) = offsets.first() else {
            bail!("{channel}: follower {i} got nothing (recoveries {:?}, reconnects {})", f.recoveries, f.reconnects)
        };
        assert_contiguous(&offsets, first).with_context(|| format!("{channel}: follower {i}"))?;
        ensure!(offsets.last() == Some(&top), "{channel}: follower {i} ended at {:?}, top {top}", offsets.last());
        ensure!(f.recoveries.iter().all(|r| *r), "{channel}: follower {i} recovered: {:?}", f.recoveries);
    }
    Ok(())
}

/// Publishers and followers over `channels`, started together and stopped together.
#[allow(clippy::type_complexity)]
struct Load {
    channels: Vec<String>,
    stop: watch::Sender<bool>,
    publishers: Vec<tokio::task::JoinHandle<Result<(Vec<Acked>, usize)>>>,
    until: Vec<watch::Sender<Option<(u64, String)>>>,
    followers: Vec<Vec<tokio::task::JoinHandle<Result<Followed>>>>,
}

impl Load {
    /// Starts the followers, and once every one is subscribed, the publishers.
    async fn start(addrs: &Addrs, channels: Vec<String>, followers_per_channel: usize) -> Result<Load> {
        Self::start_with(addrs, channels, followers_per_channel, None).await
    }

    /// [`Load::start`]; with `give_up_after`, a publisher whose node stays silent that long
    /// moves to another node (for frozen nodes).
    async fn start_with(
        addrs: &Addrs,
        channels: Vec<String>,
        followers_per_channel: usize,
        give_up_after: Option<Duration>,
    ) -> Result<Load> {
        let (stop, stopped) = watch::channel(false);
        let (ready, mut subscribed) = tokio::sync::mpsc::channel(channels.len() * followers_per_channel + 1);
        let nodes = addrs.lock().unwrap().len();
        let mut load = Load { channels, stop, publishers: Vec::new(), until: Vec::new(), followers: Vec::new() };
        for (i, ch) in load.channels.clone().iter().enumerate() {
            let (until, target) = watch::channel(None);
            let followers = (0..followers_per_channel)
                .map(|k| follower(addrs.clone(), i + k, ch.clone(), target.clone(), ready.clone()))
                .collect();
            load.until.push(until);
            load.followers.push(followers);
        }
        for _ in 0..load.channels.len() * followers_per_channel {
            tokio::time::timeout(DEADLINE, subscribed.recv()).await.context("followers subscribe")?;
        }
        for (i, ch) in load.channels.clone().iter().enumerate() {
            let tag = format!("p{i}");
            let answer = give_up_after.unwrap_or(DEADLINE);
            let home = i % nodes;
            let publisher = steady_publisher_with(
                addrs.clone(),
                home,
                ch.clone(),
                tag,
                answer,
                give_up_after.is_some(),
                stopped.clone(),
            );
            load.publishers.push(publisher);
        }
        Ok(load)
    }

    /// Waits until every channel's history top (read on `node`) has grown by `n`.
    async fn progress(&self, node: &Node, n: u64) -> Result<()> {
        let mut c = node.client().await;
        let mut base = Vec::new();
        for ch in &self.channels {
            base.push(c.history(ch, None, Some(1)).await.map(|h| h.offset).unwrap_or(0));
        }
        wait_until("publishers make progress", DEADLINE * 2, async || {
            for (ch, b) in self.channels.iter().zip(&base) {
                let Ok(h) = c.history(ch, None, Some(1)).await else { return Ok(false) };
                if h.offset < b + n {
                    return Ok(false);
                }
            }
            Ok(true)
        })
        .await
    }

    /// Stops publishing, waits for the followers to reach each channel's top and checks
    /// every channel against `node`'s history.
    async fn finish(self, node: &Node) -> Result<Vec<Vec<Followed>>> {
        let _ = self.stop.send(true);
        let mut acked = Vec::new();
        for p in self.publishers {
            let (a, _errors) = p.await??;
            acked.push(a);
        }
        let mut c = node.client().await;
        let mut all = Vec::new();
        for (i, ch) in self.channels.iter().enumerate() {
            let h = c.history_all(ch).await?;
            let _ = self.until[i].send(Some((h.offset, h.epoch.clone())));
            all.push((ch.clone(), h));
        }
        let mut results = Vec::new();
        for ((i, (ch, h)), fs) in all.into_iter().enumerate().zip(self.followers) {
            let mut followed = Vec::new();
            for f in fs {
                followed.push(f.await??);
            }
            check_channel(&ch, &acked[i], &h, &followed)?;
            results.push(followed);
        }
        Ok(results)
    }
}

/// Partitions move under load when a fourth node joins: without replication by handover
/// (the new owner pulls each partition from the old), with `replicas = 2` as replica moves
/// (the new node follows first and leads once in sync; nothing is handed over).
#[tokio::test]
async fn partitions_move_under_load_without_gap_loss_or_duplicate() -> Result<()> {
    for (cluster, extra, handovers) in [("m1", "replicas = 1\n", true), ("m2", "", false)] {
        let etcd = Etcd::start().await;
        let node = |id: &str| Node::start(&config(&etcd, cluster, id, extra));
        let (n1, n2, n3) = (node("n1"), node("n2"), node("n3"));
        let before = wait_converged(&etcd, cluster, &[&n1, &n2, &n3], &["n1", "n2", "n3"]).await?;
        let addrs = addrs(&[&n1, &n2, &n3]);
        let load = Load::start(&addrs, channel_per_partition(), 3).await?;
        load.progress(&n1, 20).await?;

        // A fourth node joins: the leader moves a share of the partitions to it while every
        // channel is being published to and followed from all three nodes.
        let n4 = node("n4");
        let after = wait_converged(&etcd, cluster, &[&n1, &n2, &n3, &n4], &["n1", "n2", "n3", "n4"]).await?;
        let moved = load.channels.iter().filter(|c| owner_of(&before, c) != owner_of(&after, c)).count();
        ensure!(moved >= 3, "{cluster}: the join moved only {moved} partitions");
        load.progress(&n1, 20).await?;
        load.finish(&n2).await?;

        let pulled = metrics(&n4).await?.value("switchyard_handovers_total", &[("result", "ok")]).unwrap_or(0.0);
        if handovers {
            ensure!(pulled >= moved as f64, "{cluster}: {pulled} handovers for {moved} moves");
        } else {
            ensure!(pulled == 0.0, "{cluster}: {pulled} handovers, where replica moves were due");
        }
    }
    Ok(())
}

#[tokio::test]
async fn a_drained_node_hands_over_and_a_rolling_restart_loses_nothing() -> Result<()> {
    let etcd = Etcd::start().await;
    let mut nodes = [start(&etcd, "d", "n1"), start(&etcd, "d", "n2"), start(&etcd, "d", "n3")];
    let ids = ["n1", "n2", "n3"];
    {
        let refs: Vec<&Node> = nodes.iter().collect();
        wait_converged(&etcd, "d", &refs, &ids).await?;
    }
    let addrs = addrs(&nodes.iter().collect::<Vec<_>>());
    let load = Load::start(&addrs, channel_per_partition(), 2).await?;
    load.progress(&nodes[0], 10).await?;

    // Restart every node in turn: SIGTERM drains it (its partitions move to their new
    // replicas once those are in sync, and its clients are closed with 4100), then it comes
    // back and gets a share again.
    for i in [2, 0, 1] {
        let started = Instant::now();
        nodes[i].sigterm();
        let status = nodes[i].wait_exit(DEADLINE * 3);
        ensure!(status.success(), "n{} exited with {status}", i + 1);
        eprintln!("n{} drained and exited in {:?}", i + 1, started.elapsed());
        load.progress(&nodes[(i + 1) % 3], 10).await?;
        nodes[i].restart();
        addrs.lock().unwrap()[i] = nodes[i].addr();
        let refs: Vec<&Node> = nodes.iter().collect();
        wait_converged(&etcd, "d", &refs, &ids).await?;
        load.progress(&nodes[(i + 1) % 3], 10).await?;
    }
    let followed = load.finish(&nodes[0]).await?;
    let reconnected: usize = followed.iter().flatten().map(|f| f.reconnects).sum();
    ensure!(reconnected > 0, "no follower was moved by the drains");
    Ok(())
}

/// Replication (issue #13): a drain is a replica move. Each partition of the draining node
/// first gains the replicas of its new placement as followers, and its leadership and
/// replicas move only once those are in sync: nothing is handed over, and no map while the
/// drain runs gives any partition fewer than two in-sync replicas. Nothing acknowledged is
/// lost, and the channels keep their epochs.
#[tokio::test]
async fn a_drain_moves_replicas_and_never_runs_under_replicated() -> Result<()> {
    let etcd = Etcd::start().await;
    let mut nodes = [start(&etcd, "r", "n1"), start(&etcd, "r", "n2"), start(&etcd, "r", "n3")];
    wait_converged(&etcd, "r", &[&nodes[0], &nodes[1], &nodes[2]], &["n1", "n2", "n3"]).await?;
    for p in 0..P as usize {
        wait_in_sync(&etcd, "r", p, 2).await?;
    }
    let channels = channel_per_partition();
    let load = Load::start(&addrs(&[&nodes[1], &nodes[2]]), channels.clone(), 2).await?;
    load.progress(&nodes[1], 10).await?;
    let mut c = nodes[1].client().await;
    let mut epochs = Vec::new();
    for ch in &channels {
        epochs.push(c.history(ch, None, Some(1)).await?.epoch);
    }

    nodes[0].sigterm();
    let mut thin = Vec::new();
    wait_until("the drained node holds no replica", DEADLINE * 2, async || {
        let Some(m) = etcd.map("r")? else { return Ok(false) };
        for (p, isr) in m["isr"].as_array().into_iter().flatten().enumerate() {
            if isr.as_array().map_or(0, Vec::len) < 2 {
                thin.push((m["epoch"].clone(), p, isr.clone()));
            }
        }
        let lists = m["replicas"].as_array().cloned().unwrap_or_default();
        Ok(!lists.is_empty() && lists.iter().all(|r| !r.as_array().into_iter().flatten().any(|n| n == "n1")))
    })
    .await?;
    ensure!(thin.is_empty(), "maps with fewer than two in-sync replicas: {thin:?}");
    let status = nodes[0].wait_exit(DEADLINE);
    ensure!(status.success(), "n1 exited with {status}");
    load.progress(&nodes[1], 10).await?;
    for n in &nodes[1..] {
        ensure!(!n.stderr().contains("partition handed over"), "a partition was handed over");
    }
    for (ch, epoch) in channels.iter().zip(&epochs) {
        let now = c.history(ch, None, Some(1)).await?.epoch;
        ensure!(&now == epoch, "{ch}: the channel epoch changed: {epoch} -> {now}");
    }
    load.finish(&nodes[1]).await?;
    Ok(())
}

#[tokio::test]
async fn a_crashed_owner_gives_every_client_a_definite_answer() -> Result<()> {
    // Without replication (replicas = 1): the crash loses the partition, and says so.
    let etcd = Etcd::start().await;
    let one = |id: &str| Node::start(&config(&etcd, "c", id, "replicas = 1\n"));
    let (n1, mut n2, n3) = (one("n1"), one("n2"), one("n3"));
    let map = wait_converged(&etcd, "c", &[&n1, &n2, &n3], &["n1", "n2", "n3"]).await?;
    let channel = channel_per_partition().into_iter().find(|c| owner_of(&map, c) == "n2").expect("n2 owns one");
    let addrs = addrs(&[&n1, &n3]);
    let mut c = n1.client().await;
    let (_, old_epoch) = c.publish(&channel, json!({"n": "before"})).await?;
    let (until, target) = watch::channel(None);
    let (ready, mut subscribed) = tokio::sync::mpsc::channel(2);
    let followers = vec![
        follower(addrs.clone(), 0, channel.clone(), target.clone(), ready.clone()),
        follower(addrs.clone(), 1, channel.clone(), target.clone(), ready),
    ];
    for _ in 0..2 {
        tokio::time::timeout(DEADLINE, subscribed.recv()).await.context("followers subscribe")?;
    }
    let (stop, stopped) = watch::channel(false);
    // Every publish must be answered (ok or error) within 8 s even while the owner is dead.
    let publisher = steady_publisher(addrs.clone(), 0, channel.clone(), "x".into(), Duration::from_secs(8), stopped);
    wait_until("publishes flow", DEADLINE, async || Ok(c.history(&channel, None, Some(1)).await?.offset >= 10)).await?;

    n2.kill9();
    let after = wait_converged(&etcd, "c", &[&n1, &n3], &["n1", "n3"]).await?;
    let new_owner = owner_of(&after, &channel);
    // The new owner started the partition afresh: a new epoch, and publishes work again.
    wait_until("publishes work under a new epoch", DEADLINE, async || {
        let h = c.history(&channel, None, Some(1)).await?;
        Ok(h.epoch != old_epoch && h.offset >= 5)
    })
    .await?;
    let _ = stop.send(true);
    let (acked, errors) = publisher.await??;
    let h = c.history_all(&channel).await?;
    let _ = until.send(Some((h.offset, h.epoch.clone())));
    for f in followers {
        let f = f.await??;
        // Each follower was told: it resubscribed and learned it could not recover.
        ensure!(f.recoveries.contains(&false), "follower recoveries {:?}", f.recoveries);
        // It reached the new epoch's top (that is when it returns); what it got of the new
        // epoch has no gap.
        let fresh: Vec<u64> = f.messages.iter().filter(|m| m.1 == h.epoch).map(|m| m.0).collect();
        if let Some(&first) = fresh.first() {
            assert_contiguous(&fresh, first)?;
        }
    }
    let new_acks: Vec<&Acked> = acked.iter().filter(|a| a.epoch == h.epoch).collect();
    ensure!(!new_acks.is_empty(), "publishes succeed on the new owner {new_owner}");
    for a in new_acks {
        ensure!(h.messages.iter().any(|m| m["offset"] == json!(a.offset)), "acked {a:?} in history");
    }
    eprintln!("crash: {errors} publish attempts failed (definite errors) before {new_owner} took over");
    Ok(())
}

/// Replication (issue #13): `kill -9` of a partition's leader under load loses no
/// acknowledged message. Publishers retry with idempotency keys through the other nodes,
/// followers sit on both survivors; afterwards every acknowledged message is in history
/// exactly once, in order, under the same channel epoch, and every follower recovered
/// with `recovered: true`.
#[tokio::test]
async fn a_killed_leader_loses_no_acknowledged_message_and_keeps_the_epoch() -> Result<()> {
    let etcd = Etcd::start().await;
    let (n1, mut n2, n3) = (start(&etcd, "r", "n1"), start(&etcd, "r", "n2"), start(&etcd, "r", "n3"));
    let map = wait_converged(&etcd, "r", &[&n1, &n2, &n3], &["n1", "n2", "n3"]).await?;
    let channel = channel_per_partition().into_iter().find(|c| owner_of(&map, c) == "n2").expect("n2 owns one");
    let p = partition_of(&channel, P) as usize;
    let map = wait_in_sync(&etcd, "r", p, 2).await?;
    let follower_node = map["isr"][p][1].as_str().unwrap_or_default().to_string();
    let addrs = addrs(&[&n1, &n3]);
    let load = Load::start(&addrs, vec![channel.clone()], 2).await?;
    load.progress(&n1, 30).await?;
    let mut c = n1.client().await;
    let epoch = c.history(&channel, None, Some(1)).await?.epoch;

    let killed = tokio::time::Instant::now();
    n2.kill9();
    // The first acknowledged write after the kill (one probe, retried with its key).
    let probe = json!({"channel": channel, "data": {"n": "probe"}, "idempotency_key": "probe"});
    loop {
        if let Ok(r) = c.cmd("publish", probe.clone()).await {
            if r.get("ok").is_some() {
                break;
            }
        }
        ensure!(killed.elapsed() < DEADLINE, "no write acknowledged within {DEADLINE:?} of the kill");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let first_ack = killed.elapsed();
    eprintln!("killed at {:?}", std::time::SystemTime::now() - first_ack);
    // The follower leads and acknowledges writes under the same epoch.
    wait_until("the in-sync follower leads", DEADLINE, async || {
        let Some(m) = etcd.map("r")? else { return Ok(false) };
        Ok(m["owners"][p] == json!(follower_node))
    })
    .await?;
    load.progress(&n1, 30).await?;
    eprintln!("failover: first acknowledged write {first_ack:?} after kill -9");
    let h = c.history(&channel, None, Some(1)).await?;
    ensure!(h.epoch == epoch, "the channel epoch changed on a clean failover: {epoch} -> {}", h.epoch);
    // One epoch, contiguous, no duplicate, every ack present, every follower recovered.
    load.finish(&n1).await?;
    Ok(())
}

/// Replication (issue #13): `kill -9` of a follower. Writes go on once the leader drops it
/// from the ISR, the remaining node becomes the new follower, catches up and joins the ISR;
/// then the leader is killed too, and the new follower takes over with nothing lost.
#[tokio::test]
async fn a_killed_follower_is_replaced_and_a_later_leader_kill_loses_nothing() -> Result<()> {
    let etcd = Etcd::start().await;
    let mut nodes = [start(&etcd, "f", "n1"), start(&etcd, "f", "n2"), start(&etcd, "f", "n3")];
    let map = wait_converged(&etcd, "f", &[&nodes[0], &nodes[1], &nodes[2]], &["n1", "n2", "n3"]).await?;
    let channel = channel_per_partition().into_iter().find(|c| owner_of(&map, c) == "n2").expect("n2 owns one");
    let p = partition_of(&channel, P) as usize;
    let map = wait_in_sync(&etcd, "f", p, 2).await?;
    let follower_id = map["isr"][p][1].as_str().unwrap_or_default().to_string();
    let idx = |id: &str| id.trim_start_matches('n').parse::<usize>().unwrap_or(1) - 1;
    let other = ["n1", "n3"].into_iter().find(|n| *n != follower_id).expect("a third node").to_string();
    let survivor = &nodes[idx(&other)];
    let addrs = addrs(&[survivor]);
    let load = Load::start(&addrs, vec![channel.clone()], 2).await?;
    load.progress(survivor, 20).await?;
    let epoch = survivor.client().await.history(&channel, None, Some(1)).await?.epoch;

    nodes[idx(&follower_id)].kill9();
    // Writes go on; the third node replaces the follower and joins the ISR.
    load.progress(&nodes[idx(&other)], 20).await?;
    wait_until("the replacement follower joins the ISR", DEADLINE, async || {
        let Some(m) = etcd.map("f")? else { return Ok(false) };
        Ok(m["isr"][p] == json!(["n2", other.clone()]))
    })
    .await?;
    load.progress(&nodes[idx(&other)], 20).await?;

    nodes[1].kill9();
    wait_until("the replacement leads", DEADLINE, async || {
        let Some(m) = etcd.map("f")? else { return Ok(false) };
        Ok(m["owners"][p] == json!(other.clone()))
    })
    .await?;
    let survivor = &nodes[idx(&other)];
    load.progress(survivor, 20).await?;
    let h = survivor.client().await.history(&channel, None, Some(1)).await?;
    ensure!(h.epoch == epoch, "the channel epoch changed: {epoch} -> {}", h.epoch);
    load.finish(survivor).await?;
    Ok(())
}

/// A TCP proxy in front of a node's peer port that can cut every connection.
struct Proxy {
    addr: SocketAddr,
    target: Arc<Mutex<Option<SocketAddr>>>,
    open: watch::Sender<bool>,
}

impl Proxy {
    async fn start() -> Result<Proxy> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let target: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let (open, is_open) = watch::channel(true);
        let t = target.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let to = *t.lock().unwrap();
                let mut is_open = is_open.clone();
                if !*is_open.borrow_and_update() {
                    continue; // refused: dropped at once
                }
                let Some(to) = to else { continue };
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = is_open.wait_for(|o| !*o) => {}
                    }
                });
            }
        });
        Ok(Proxy { addr, target, open })
    }
}

#[tokio::test]
async fn a_cut_peer_link_heals_and_loses_nothing_acknowledged() -> Result<()> {
    let etcd = Etcd::start().await;
    let proxy = Proxy::start().await?;
    let n1 = start(&etcd, "l", "n1");
    let n2 = Node::start(&config(&etcd, "l", "n2", &format!("advertise = \"http://{}\"\n", proxy.addr)));
    *proxy.target.lock().unwrap() = Some(n2.addr());
    let map = wait_converged(&etcd, "l", &[&n1, &n2], &["n1", "n2"]).await?;
    let channel = channel_per_partition().into_iter().find(|c| owner_of(&map, c) == "n2").expect("n2 owns one");

    // Everything goes through n1, so through the proxied link to n2.
    let load = Load::start(&addrs(&[&n1]), vec![channel.clone()], 2).await?;
    load.progress(&n2, 20).await?;
    wait_until("the link is up", DEADLINE, async || {
        Ok(metrics(&n1).await?.value("switchyard_peer_link_up", &[("peer", "n2")]) == Some(1.0))
    })
    .await?;
    let _ = proxy.open.send(false);
    wait_until("n1 sees the link down", DEADLINE, async || {
        Ok(metrics(&n1).await?.value("switchyard_peer_link_up", &[("peer", "n2")]) == Some(0.0))
    })
    .await?;
    let _ = proxy.open.send(true);
    wait_until("the link comes back", DEADLINE, async || {
        Ok(metrics(&n1).await?.value("switchyard_peer_link_up", &[("peer", "n2")]) == Some(1.0))
    })
    .await?;
    load.progress(&n2, 20).await?;
    load.finish(&n2).await?;
    ensure!(metrics(&n1).await?.value("switchyard_peer_connects_total", &[("peer", "n2")]).unwrap_or(0.0) >= 2.0);
    Ok(())
}

/// Replication (issue #13): SIGSTOP of a partition's leader past its lease. Its in-sync
/// follower takes over; the stopped node, once continued, cannot acknowledge anything
/// (its follower no longer fetches from it and its ISR writes are fenced), drops what it
/// wrote that nobody acknowledged, and follows again (`replicas = 3`, so it is a replica
/// of every partition). Then the new leader is killed, and whichever in-sync replica takes
/// over has exactly the acknowledged history.
#[tokio::test]
async fn a_stopped_leader_is_fenced_truncates_and_follows() -> Result<()> {
    let etcd = Etcd::start().await;
    let three = |id: &str| Node::start(&config(&etcd, "s", id, "replicas = 3\n"));
    let mut nodes = [three("n1"), three("n2"), three("n3")];
    let map = wait_converged(&etcd, "s", &[&nodes[0], &nodes[1], &nodes[2]], &["n1", "n2", "n3"]).await?;
    let channel = channel_per_partition().into_iter().find(|c| owner_of(&map, c) == "n2").expect("n2 owns one");
    let p = partition_of(&channel, P) as usize;
    wait_in_sync(&etcd, "s", p, 3).await?;
    let addrs = addrs(&[&nodes[0], &nodes[2]]);
    let load = Load::start(&addrs, vec![channel.clone()], 2).await?;
    load.progress(&nodes[0], 20).await?;
    let epoch = nodes[0].client().await.history(&channel, None, Some(1)).await?.epoch;

    nodes[1].signal(libc::SIGSTOP);
    let mut leader = String::new();
    wait_until("an in-sync follower leads", DEADLINE, async || {
        let Some(m) = etcd.map("s")? else { return Ok(false) };
        leader = m["owners"][p].as_str().unwrap_or_default().to_string();
        Ok(leader == "n1" || leader == "n3")
    })
    .await?;
    load.progress(&nodes[0], 20).await?;
    nodes[1].signal(libc::SIGCONT);
    // It comes back, resyncs from the new leader and rejoins the ISR.
    wait_until("the stopped node rejoins the ISR", DEADLINE * 2, async || {
        let Some(m) = etcd.map("s")? else { return Ok(false) };
        let isr = m["isr"][p].as_array().cloned().unwrap_or_default();
        Ok(isr.contains(&json!("n2")) && isr.len() == 3)
    })
    .await?;
    load.progress(&nodes[0], 20).await?;
    let idx = |id: &str| id.trim_start_matches('n').parse::<usize>().unwrap_or(1) - 1;
    nodes[idx(&leader)].kill9();
    let survivor = if leader == "n1" { &nodes[2] } else { &nodes[0] };
    wait_until("an in-sync replica leads again", DEADLINE, async || {
        let Some(m) = etcd.map("s")? else { return Ok(false) };
        Ok(m["owners"][p] != json!(leader))
    })
    .await?;
    load.progress(survivor, 20).await?;
    let h = survivor.client().await.history(&channel, None, Some(1)).await?;
    ensure!(h.epoch == epoch, "the channel epoch changed: {epoch} -> {}", h.epoch);
    load.finish(survivor).await?;
    Ok(())
}

/// Replication (issue #13, KIP-101): a leader writes batches its follower never gets (the
/// replication link is cut), then is deposed (SIGSTOP past its lease). When it returns it
/// reconciles with the new leader by leader epoch and truncates exactly that tail,
/// re-copying only the channel the tail touched, with no full snapshot of any partition.
/// Then the new leader dies and the old one leads again: every acknowledged message is
/// there once, none of the unacknowledged ones is, and the channel keeps its epoch.
#[tokio::test]
async fn a_deposed_leader_truncates_its_unacknowledged_tail_without_a_snapshot() -> Result<()> {
    let etcd = Etcd::start().await;
    let proxy = Proxy::start().await?;
    // A long lag timeout: the leader must not drop its cut-off follower from the ISR (and
    // acknowledge alone) before it is stopped.
    let lag = "replica_lag_timeout = \"20s\"\n";
    let mut n1 = Node::start(&config(&etcd, "t", "n1", lag));
    let n2 = Node::start(&config(&etcd, "t", "n2", &format!("{lag}advertise = \"http://{}\"\n", proxy.addr)));
    *proxy.target.lock().unwrap() = Some(n2.addr());
    let map = wait_converged(&etcd, "t", &[&n1, &n2], &["n1", "n2"]).await?;
    let channel = channel_per_partition().into_iter().find(|c| owner_of(&map, c) == "n2").expect("n2 owns one");
    let p = partition_of(&channel, P) as usize;
    wait_in_sync(&etcd, "t", p, 2).await?;
    // No balancing moves from now on: the returning node must come back as a follower,
    // not take partitions back by handover.
    etcd.put("/switchyard/t/config", r#"{"max_moves": 0}"#)?;
    for n in [&n1, &n2] {
        wait_until("max_moves applied", DEADLINE, async || Ok(cluster_view(n).await?["config"]["max_moves"] == 0))
            .await?;
    }
    let mut c = n2.client().await;
    let mut acked = Vec::new();
    for i in 0..10 {
        acked.push(c.publish(&channel, json!({"n": i})).await?.0);
    }
    let epoch = c.history(&channel, None, Some(1)).await?.epoch;
    // n2 joined p as a new follower (a snapshot) before the balancer made it the leader.
    let snapshots_of_p = |log: &str| log.matches(&format!("replica snapshot taken partition={p} ")).count();
    let snapshots_before = snapshots_of_p(&n2.stderr());

    // Cut n1 off from n2: three publishes are stored on n2 and wait for n1 forever.
    let _ = proxy.open.send(false);
    for i in 100..103 {
        c.send_cmd("publish", json!({"channel": channel, "data": {"n": i}})).await?;
    }
    wait_until("n2 holds batches n1 has not fetched", DEADLINE, async || {
        Ok(metrics(&n2).await?.value("switchyard_replica_lag_messages", &[]).unwrap_or(0.0) >= 1.0)
    })
    .await?;
    n2.signal(libc::SIGSTOP);
    wait_until("n1 leads the partition", DEADLINE, async || {
        Ok(etcd.map("t")?.is_some_and(|m| m["owners"][p] == json!("n1")))
    })
    .await?;
    let h = n1.client().await.history_all(&channel).await?;
    ensure!(h.offsets() == acked, "n1 has exactly the acknowledged messages: {:?}", h.offsets());
    n2.signal(libc::SIGCONT);
    let _ = proxy.open.send(true);
    wait_in_sync(&etcd, "t", p, 2).await?;
    let m = metrics(&n2).await?;
    ensure!(m.value("switchyard_replica_truncations_total", &[]).unwrap_or(0.0) >= 1.0, "n2 truncated its tail");
    // (Partitions n2 only followed were reassigned while it was gone, so it snapshots
    // those: the map dropped it from their replicas.)
    let log = n2.stderr();
    ensure!(log.contains(&format!("truncated the tail the leader never had partition={p} ")), "p truncated");
    ensure!(snapshots_of_p(&log) == snapshots_before, "p reconciled without a snapshot");

    // n2 leads again: it has exactly what was acknowledged, under the same channel epoch.
    n1.kill9();
    wait_until("n2 leads the partition again", DEADLINE, async || {
        Ok(etcd.map("t")?.is_some_and(|m| m["owners"][p] == json!("n2")))
    })
    .await?;
    let mut c = n2.client().await;
    let (offset, _) =
        poll_for("a write on n2", DEADLINE, async || Ok(c.publish(&channel, json!({"n": 10})).await.ok())).await?;
    acked.push(offset);
    let h = c.history_all(&channel).await?;
    ensure!(h.epoch == epoch, "the channel epoch changed: {epoch} -> {}", h.epoch);
    ensure!(h.offsets() == acked, "acknowledged {acked:?}, history {:?}", h.offsets());
    let data: Vec<i64> = h.messages.iter().map(|m| m["data"]["n"].as_i64().unwrap_or(-1)).collect();
    ensure!(data == (0..=10).collect::<Vec<_>>(), "history holds {data:?}");
    Ok(())
}

/// Replication (issue #13): the link between a leader and its follower is cut. Writes to
/// the leader go on once the follower is dropped from the ISR (after
/// `replica_lag_timeout`); when the link heals the follower catches up from where it was
/// and is added back; nothing acknowledged is lost.
#[tokio::test]
async fn a_cut_replication_link_shrinks_the_isr_and_heals() -> Result<()> {
    let etcd = Etcd::start().await;
    let proxy = Proxy::start().await?;
    let n1 = start(&etcd, "i", "n1");
    let n2 = Node::start(&config(&etcd, "i", "n2", &format!("advertise = \"http://{}\"\n", proxy.addr)));
    *proxy.target.lock().unwrap() = Some(n2.addr());
    let map = wait_converged(&etcd, "i", &[&n1, &n2], &["n1", "n2"]).await?;
    let channel = channel_per_partition().into_iter().find(|c| owner_of(&map, c) == "n2").expect("n2 owns one");
    let p = partition_of(&channel, P) as usize;
    wait_in_sync(&etcd, "i", p, 2).await?;
    // Clients use the leader directly: only replication crosses the proxy.
    let load = Load::start(&addrs(&[&n2]), vec![channel.clone()], 2).await?;
    load.progress(&n2, 20).await?;

    let _ = proxy.open.send(false);
    wait_until("the leader drops the cut-off follower from the ISR", DEADLINE, async || {
        let Some(m) = etcd.map("i")? else { return Ok(false) };
        Ok(m["isr"][p] == json!(["n2"]))
    })
    .await?;
    load.progress(&n2, 20).await?;
    let _ = proxy.open.send(true);
    wait_in_sync(&etcd, "i", p, 2).await?;
    load.progress(&n2, 20).await?;
    load.finish(&n2).await?;
    let m = metrics(&n2).await?;
    ensure!(m.value("switchyard_isr_shrinks_total", &[]).unwrap_or(0.0) >= 1.0, "shrink counted");
    ensure!(m.value("switchyard_isr_expands_total", &[]).unwrap_or(0.0) >= 1.0, "expand counted");
    Ok(())
}

/// Replication (issue #13): randomized faults with a fixed seed among three nodes under
/// load: `kill -9` then restart, SIGSTOP past the lease then SIGCONT, of random nodes.
/// Before each fault the cluster is back to full strength (three members, every watched
/// partition with two in-sync replicas), so no fault may lose anything. The invariants are
/// checked at the end: every acknowledged message in history exactly once, contiguous
/// offsets under one channel epoch, and every subscriber served to the top with
/// `recovered: true`. `SWITCHYARD_FAULTS` (default 4) and `SWITCHYARD_FAULT_SEED`
/// (default 7) run it longer: BENCHMARKS.md has the long run's result.
#[tokio::test]
async fn randomized_faults_lose_nothing_acknowledged() -> Result<()> {
    let faults: usize = std::env::var("SWITCHYARD_FAULTS").ok().and_then(|v| v.parse().ok()).unwrap_or(4);
    let mut seed: u64 = std::env::var("SWITCHYARD_FAULT_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(7);
    let mut next = move |n: usize| {
        // xorshift64*: deterministic for a seed, no dependency.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
    };
    let etcd = Etcd::start().await;
    // Every node's peers reach it through a proxy that a link-cut fault closes.
    let proxies = [Proxy::start().await?, Proxy::start().await?, Proxy::start().await?];
    let proxied = |id: &str, i: usize| {
        Node::start(&config(&etcd, "x", id, &format!("advertise = \"http://{}\"\n", proxies[i].addr)))
    };
    let mut nodes = [proxied("n1", 0), proxied("n2", 1), proxied("n3", 2)];
    for (proxy, node) in proxies.iter().zip(&nodes) {
        *proxy.target.lock().unwrap() = Some(node.addr());
    }
    wait_converged(&etcd, "x", &[&nodes[0], &nodes[1], &nodes[2]], &["n1", "n2", "n3"]).await?;
    let channels: Vec<String> = channel_per_partition().into_iter().take(3).collect();
    let parts: Vec<usize> = channels.iter().map(|c| partition_of(c, P) as usize).collect();
    let addrs = addrs(&[&nodes[0], &nodes[1], &nodes[2]]);
    let load = Load::start_with(&addrs, channels.clone(), 2, Some(Duration::from_secs(3))).await?;
    for round in 0..faults {
        // Full strength first: every member back, every watched partition in sync.
        // (The cut's 3 s is a fault's duration, not a wait for a condition.)
        wait_until("all three members", DEADLINE * 2, async || {
            Ok(cluster_view(&nodes[0]).await.is_ok_and(|v| v["nodes"].as_array().is_some_and(|n| n.len() == 3)))
        })
        .await?;
        for p in &parts {
            wait_in_sync(&etcd, "x", *p, 2).await?;
        }
        let reader = next(3);
        load.progress(&nodes[reader], 10).await?;
        let victim = next(3);
        match next(3) {
            0 => {
                eprintln!("fault {round}: kill -9 n{} and restart it", victim + 1);
                nodes[victim].kill9();
                let others: Vec<&Node> = (0..3).filter(|i| *i != victim).map(|i| &nodes[i]).collect();
                wait_until("the victim leaves", DEADLINE, async || {
                    let v = cluster_view(others[0]).await?;
                    Ok(v["nodes"].as_array().is_some_and(|n| n.len() == 2))
                })
                .await?;
                load.progress(others[0], 10).await?;
                nodes[victim].restart();
                *proxies[victim].target.lock().unwrap() = Some(nodes[victim].addr());
            }
            1 => {
                eprintln!("fault {round}: cut every peer link to n{} for 3 s", victim + 1);
                let _ = proxies[victim].open.send(false);
                tokio::time::sleep(Duration::from_secs(3)).await;
                let _ = proxies[victim].open.send(true);
            }
            _ => {
                eprintln!("fault {round}: SIGSTOP n{} past its lease, then SIGCONT", victim + 1);
                nodes[victim].signal(libc::SIGSTOP);
                let other = &nodes[(victim + 1) % 3];
                wait_until("the stopped node leaves", DEADLINE, async || {
                    let v = cluster_view(other).await?;
                    Ok(v["nodes"].as_array().is_some_and(|n| n.len() == 2))
                })
                .await?;
                load.progress(other, 10).await?;
                nodes[victim].signal(libc::SIGCONT);
            }
        }
        *addrs.lock().unwrap() = nodes.iter().map(|n| n.addr()).collect();
    }
    wait_until("all three members", DEADLINE * 2, async || {
        Ok(cluster_view(&nodes[0]).await.is_ok_and(|v| v["nodes"].as_array().is_some_and(|n| n.len() == 3)))
    })
    .await?;
    load.progress(&nodes[0], 10).await?;
    load.finish(&nodes[0]).await?;
    Ok(())
}

/// Replication (issue #13), a double failover in the style of KIP-279, on two nodes. The
/// leader dies and its follower takes over; it returns, drops what it had, follows and
/// gets back in sync; then the new leader dies and the old one takes over again, with
/// nothing lost. Then a partition whose only in-sync replica is dead waits (writes get
/// `unavailable` on the other node, nothing moves) until that replica returns.
#[tokio::test]
async fn a_double_failover_loses_nothing_and_a_partition_without_an_in_sync_replica_waits() -> Result<()> {
    let etcd = Etcd::start().await;
    let mut nodes = [start(&etcd, "d", "n1"), start(&etcd, "d", "n2")];
    let map = wait_converged(&etcd, "d", &[&nodes[0], &nodes[1]], &["n1", "n2"]).await?;
    let channel = channel_per_partition().into_iter().find(|c| owner_of(&map, c) == "n1").expect("n1 owns one");
    let p = partition_of(&channel, P) as usize;
    wait_in_sync(&etcd, "d", p, 2).await?;
    let addrs = addrs(&[&nodes[0], &nodes[1]]);
    let load = Load::start_with(&addrs, vec![channel.clone()], 2, Some(Duration::from_secs(3))).await?;
    load.progress(&nodes[1], 20).await?;
    let epoch = nodes[1].client().await.history(&channel, None, Some(1)).await?.epoch;
    let owner_is = async |who: &str| -> Result<()> {
        wait_until("the partition's leader changes", DEADLINE, async || {
            Ok(etcd.map("d")?.is_some_and(|m| m["owners"][p] == json!(who)))
        })
        .await
    };
    let restart = |nodes: &mut [Node; 2], i: usize| {
        nodes[i].restart();
        *addrs.lock().unwrap() = nodes.iter().map(|n| n.addr()).collect();
    };

    // A dies, B leads; A returns, resyncs and is back in sync; B dies, A leads.
    nodes[0].kill9();
    owner_is("n2").await?;
    load.progress(&nodes[1], 20).await?;
    restart(&mut nodes, 0);
    wait_until("the old leader is back in sync", DEADLINE, async || {
        Ok(etcd.map("d")?.is_some_and(|m| m["isr"][p] == json!(["n2", "n1"])))
    })
    .await?;
    load.progress(&nodes[1], 20).await?;
    nodes[1].kill9();
    owner_is("n1").await?;
    load.progress(&nodes[0], 20).await?;

    // B returns and syncs; then B dies (A alone in sync), then A dies, and B comes back
    // alone: the partition waits for A rather than restart empty on B.
    restart(&mut nodes, 1);
    wait_in_sync(&etcd, "d", p, 2).await?;
    nodes[1].kill9();
    wait_until("the dead follower leaves the ISR", DEADLINE, async || {
        Ok(etcd.map("d")?.is_some_and(|m| m["isr"][p] == json!(["n1"])))
    })
    .await?;
    load.progress(&nodes[0], 20).await?;
    nodes[0].kill9();
    restart(&mut nodes, 1);
    let mut c = nodes[1].client().await;
    wait_until("the partition waits on its dead in-sync replica", DEADLINE, async || {
        let Some(m) = etcd.map("d")? else { return Ok(false) };
        let members = cluster_view(&nodes[1]).await?["nodes"].as_array().map_or(0, Vec::len);
        let refused = c.cmd("publish", json!({"channel": channel, "data": 1})).await?.get("error").is_some();
        Ok(members == 1 && m["owners"][p] == json!("n1") && refused)
    })
    .await?;
    restart(&mut nodes, 0);
    owner_is("n1").await?;
    load.progress(&nodes[0], 20).await?;
    let h = nodes[0].client().await.history(&channel, None, Some(1)).await?;
    ensure!(h.epoch == epoch, "the channel epoch changed: {epoch} -> {}", h.epoch);
    load.finish(&nodes[0]).await?;
    Ok(())
}

/// Replication (issue #13): what a promoted follower inherits besides messages. A consumer
/// resumes exactly after its committed offset, a retried idempotency key gets the original
/// offset (not a second copy), and the channel keeps its epoch.
#[tokio::test]
async fn a_promoted_follower_resumes_consumers_and_deduplicates_retries() -> Result<()> {
    let etcd = Etcd::start().await;
    let (n1, mut n2, n3) = (start(&etcd, "c2", "n1"), start(&etcd, "c2", "n2"), start(&etcd, "c2", "n3"));
    let map = wait_converged(&etcd, "c2", &[&n1, &n2, &n3], &["n1", "n2", "n3"]).await?;
    let channel = channel_per_partition().into_iter().find(|c| owner_of(&map, c) == "n2").expect("n2 owns one");
    let p = partition_of(&channel, P) as usize;
    wait_in_sync(&etcd, "c2", p, 2).await?;
    let mut c = n1.client().await;
    let mut keyed = Vec::new();
    for i in 1..=10 {
        let ok =
            c.ok("publish", json!({"channel": channel, "data": {"n": i}, "idempotency_key": format!("k{i}")})).await?;
        keyed.push((u64_field(&ok, "offset")?, str_field(&ok, "epoch")?));
    }
    c.ok("commit", json!({"channel": channel, "consumer": "workers", "offset": 6})).await?;

    n2.kill9();
    wait_until("the follower leads", DEADLINE, async || {
        Ok(etcd.map("c2")?.is_some_and(|m| m["owners"][p] != json!("n2") && m["owners"][p] != json!("")))
    })
    .await?;
    // A retry of k7 is answered with its first offset and epoch (the window replicated).
    let retry = loop {
        let r = c.cmd("publish", json!({"channel": channel, "data": {"n": 7}, "idempotency_key": "k7"})).await?;
        if r.get("ok").is_some() {
            break r["ok"].clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    ensure!(
        (u64_field(&retry, "offset")?, str_field(&retry, "epoch")?) == keyed[6],
        "retry {retry} vs first {:?}",
        keyed[6]
    );
    // The consumer resumes after its committed offset (the commit replicated).
    let mut consumer = n3.client().await;
    consumer.subscribe(&channel, json!({"consumer": "workers"})).await?;
    let resumed = consumer.next_messages(&channel, 4).await?;
    ensure!(offsets(&resumed) == vec![7, 8, 9, 10], "resumed at {:?}", offsets(&resumed));
    let h = c.history_all(&channel).await?;
    ensure!(h.offsets() == (1..=10).collect::<Vec<_>>(), "one copy of each: {:?}", h.offsets());
    ensure!(h.epoch == keyed[0].1, "the epoch changed");
    Ok(())
}
