//! Durability: durable consumers across reconnects and restarts, and acknowledged
//! publishes across `kill -9`.
//!
//! It owns the promises that a committed consumer offset is where delivery resumes, and
//! that an acknowledged message survives a crash with its epoch and offset unchanged.

use std::collections::HashMap;

use serde_json::json;
use switchyard_tests::*;

const CHANNEL: &str = "jobs:q";

/// Subscribes as `consumer` on a fresh connection and returns the client with the
/// offsets of the next `n` pushed messages.
async fn resume(node: &Node, consumer: &str, n: usize) -> anyhow::Result<(Client, Vec<u64>)> {
    let mut c = node.client().await;
    c.subscribe(CHANNEL, json!({ "consumer": consumer })).await?;
    let got = offsets(&c.next_messages(CHANNEL, n).await?);
    Ok((c, got))
}

async fn commit(c: &mut Client, consumer: &str, offset: u64) -> anyhow::Result<()> {
    let ok = c.ok("commit", json!({ "channel": CHANNEL, "consumer": consumer, "offset": offset })).await?;
    anyhow::ensure!(ok.is_object(), "commit ok is not an object: {ok}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn durable_consumer_resumes_after_commit_across_reconnect_and_restart() -> anyhow::Result<()> {
    let mut node = Node::start("");
    let mut publisher = node.client().await;
    let (_, epoch) = publisher.publish_many(CHANNEL, (1..=5).map(|i| json!(i))).await?;

    commit(&mut publisher, "worker", 2).await?;
    let (mut c, got) = resume(&node, "worker", 3).await?;
    assert_eq!(got, vec![3, 4, 5], "delivery starts after the committed offset");
    // `consumer` takes precedence over `from`.
    let mut precedence = node.client().await;
    precedence.subscribe(CHANNEL, json!({ "consumer": "worker", "from": "latest" })).await?;
    assert_eq!(offsets(&precedence.next_messages(CHANNEL, 3).await?), vec![3, 4, 5]);
    drop(precedence);

    publisher.publish(CHANNEL, json!(6)).await?;
    assert_eq!(offsets(&c.next_messages(CHANNEL, 1).await?), vec![6]);
    commit(&mut c, "worker", 4).await?;
    drop(c);

    let (mut c, got) = resume(&node, "worker", 2).await?;
    assert_eq!(got, vec![5, 6], "resumes after offset 4 after a reconnect");
    // A lower commit is a no-op that still replies ok.
    commit(&mut c, "worker", 1).await?;
    drop(c);
    assert_eq!(resume(&node, "worker", 2).await?.1, vec![5, 6], "a lower commit must not move the consumer back");

    node.restart();
    let (mut c, got) = resume(&node, "worker", 2).await?;
    assert_eq!(got, vec![5, 6], "resumes after offset 4 after a restart");
    commit(&mut c, "worker", 6).await?;
    drop(c);

    node.restart();
    let mut publisher = node.client().await;
    let (offset, new_epoch) = publisher.publish(CHANNEL, json!(7)).await?;
    assert_eq!((offset, new_epoch.as_str()), (7, epoch.as_str()), "offsets and epoch survive a restart");
    assert_eq!(resume(&node, "worker", 1).await?.1, vec![7]);
    // Another consumer name is independent.
    commit(&mut publisher, "auditor", 0).await?;
    assert_eq!(resume(&node, "auditor", 7).await?.1, (1..=7).collect::<Vec<_>>());

    // An acknowledged commit survives kill -9.
    commit(&mut publisher, "auditor", 5).await?;
    drop(publisher);
    node.kill9();
    node.restart();
    assert_eq!(resume(&node, "auditor", 2).await?.1, vec![6, 7], "commit lost by kill -9");
    Ok(())
}

/// Every fsync policy promises that an acknowledged publish survives a process crash
/// (`never` only gives up on power loss).
#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_publishes_survive_kill_9() -> anyhow::Result<()> {
    for fsync in ["batch", "always", "never"] {
        eprintln!("fsync = {fsync}");
        kill_9_after_pipelined_publishes(&format!("fsync = \"{fsync}\"\n"))
            .await
            .map_err(|e| e.context(format!("fsync = {fsync}")))?;
    }
    Ok(())
}

async fn kill_9_after_pipelined_publishes(config: &str) -> anyhow::Result<()> {
    const N: u64 = 500;
    const CHANNELS: [&str; 4] = ["dur:a", "dur:b", "dur:c", "dur:d"];
    let payload = |ch: &str, i: u64| json!({ "ch": ch, "i": i });
    let mut node = Node::start(config);
    let mut c = node.client().await;
    // All publishes pipelined, interleaved over channels, so store batches mix partitions.
    let mut ids = Vec::new();
    for i in 1..=N {
        for ch in CHANNELS {
            ids.push((ch, c.send_cmd("publish", json!({ "channel": ch, "data": payload(ch, i) })).await?));
        }
    }
    let mut acked: HashMap<&str, (Vec<u64>, String)> = HashMap::new();
    for (ch, id) in ids {
        let ok = reply_ok(c.wait_reply(id).await?)?;
        let entry = acked.entry(ch).or_insert_with(|| (Vec::new(), str_field(&ok, "epoch").unwrap_or_default()));
        assert_eq!(ok["epoch"], json!(entry.1), "{ch}: epoch changed while publishing");
        entry.0.push(u64_field(&ok, "offset")?);
    }
    drop(c);

    node.kill9();
    node.restart();

    let mut c = node.client().await;
    for ch in CHANNELS {
        let (acked_offsets, epoch) = &acked[ch];
        assert_eq!(acked_offsets, &(1..=N).collect::<Vec<_>>(), "{ch}: acknowledged offsets");
        let h = c.history_all(ch).await?;
        assert_eq!((&h.epoch, h.offset), (epoch, N), "{ch}: epoch and top after kill -9");
        assert_eq!(&h.offsets(), acked_offsets, "{ch}: offsets after kill -9");
        assert_eq!(datas(&h.messages), (1..=N).map(|i| payload(ch, i)).collect::<Vec<_>>(), "{ch}: data after kill -9");
        // Recovery across the crash works: same epoch, everything retained.
        let mut sub = node.client().await;
        let ok = sub.subscribe(ch, json!({ "from": { "offset": N - 3, "epoch": epoch } })).await?;
        assert_eq!(ok["recovered"], true, "{ch}: {ok}");
        // The stream continues where it was.
        assert_eq!(c.publish(ch, json!("next")).await?, (N + 1, epoch.clone()));
        assert_eq!(offsets(&sub.next_messages(ch, 4).await?), vec![N - 2, N - 1, N, N + 1]);
    }
    Ok(())
}

/// The idempotency window is rebuilt from the store after a crash: a client that retries
/// an acknowledged publish after `kill -9` gets the original offset, and nothing is stored twice.
#[tokio::test(flavor = "multi_thread")]
async fn idempotency_window_survives_kill_9() -> anyhow::Result<()> {
    const CH: &str = "orders:eu";
    let mut node = Node::start("");
    let mut c = node.client().await;
    let first = c.ok("publish", json!({ "channel": CH, "data": { "n": 1 }, "idempotency_key": "order-1" })).await?;
    c.ok("publish", json!({ "channel": CH, "data": { "n": 2 } })).await?;
    drop(c);
    node.kill9();
    node.restart();
    let mut c = node.client().await;
    let retry = c.ok("publish", json!({ "channel": CH, "data": { "n": 1 }, "idempotency_key": "order-1" })).await?;
    assert_eq!((&retry["offset"], &retry["epoch"]), (&first["offset"], &first["epoch"]), "retry after crash: {retry}");
    let fresh = c.ok("publish", json!({ "channel": CH, "data": { "n": 3 }, "idempotency_key": "order-2" })).await?;
    assert_eq!(fresh["offset"], 3);
    let h = c.history_all(CH).await?;
    assert_eq!(h.offsets(), vec![1, 2, 3], "nothing stored twice");
    Ok(())
}
