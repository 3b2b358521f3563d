//! Total order of one channel under concurrent publishers and subscribers.
//!
//! It owns the guarantee that every subscriber of a channel sees the same sequence:
//! offsets contiguous, nothing lost, nothing repeated, and each publisher's own messages
//! in the order it sent them.

use std::collections::HashSet;

use serde_json::{json, Value};
use switchyard_tests::*;

const PUBLISHERS: usize = 4;
const SUBSCRIBERS: usize = 3;
const PER_PUBLISHER: usize = 150;
const CHANNEL: &str = "room:order";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_publishers_one_order_for_all_subscribers() -> anyhow::Result<()> {
    let node = Node::start("");
    let mut subscribers = Vec::new();
    for _ in 0..SUBSCRIBERS {
        let mut sub = node.client().await;
        sub.subscribe(CHANNEL, json!({})).await?;
        subscribers.push(sub);
    }
    let total = PUBLISHERS * PER_PUBLISHER;
    let readers: Vec<_> = subscribers
        .into_iter()
        .map(|mut sub| tokio::spawn(async move { sub.next_messages(CHANNEL, total).await }))
        .collect();

    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let mut client = node.client().await;
        publishers.push(tokio::spawn(async move {
            // Pipelined in small batches so the publishers really interleave.
            let mut acked = Vec::new();
            for batch in 0..PER_PUBLISHER / 10 {
                let data = (0..10).map(|i| json!({ "p": p, "seq": batch * 10 + i }));
                acked.extend(client.publish_many(CHANNEL, data).await?.0);
            }
            anyhow::Ok(acked)
        }));
    }
    let mut acked_offsets = Vec::new();
    for p in publishers {
        acked_offsets.extend(p.await??);
    }
    acked_offsets.sort_unstable();
    assert_contiguous(&acked_offsets, 1)?;

    let mut sequences = Vec::new();
    for r in readers {
        sequences.push(r.await??);
    }
    for (i, seq) in sequences.iter().enumerate() {
        assert_contiguous(&offsets(seq), 1).map_err(|e| e.context(format!("subscriber {i}")))?;
        check_per_publisher_order(seq)?;
        assert_eq!(datas(seq), datas(&sequences[0]), "subscriber {i} saw another order than subscriber 0");
    }
    // History agrees with what was pushed.
    let mut c = node.client().await;
    let history = c.history_all(CHANNEL).await?;
    assert_eq!(datas(&history.messages), datas(&sequences[0]));
    Ok(())
}

/// Each publisher's `seq` values appear once each, in order.
fn check_per_publisher_order(seq: &[Value]) -> anyhow::Result<()> {
    let mut next = vec![0u64; PUBLISHERS];
    let mut seen = HashSet::new();
    for m in seq {
        let (p, s) = (m["data"]["p"].as_u64().unwrap() as usize, m["data"]["seq"].as_u64().unwrap());
        anyhow::ensure!(seen.insert((p, s)), "message {p}/{s} delivered twice");
        anyhow::ensure!(s == next[p], "publisher {p}: expected seq {} next, got {s}", next[p]);
        next[p] += 1;
    }
    anyhow::ensure!(next.iter().all(|&n| n as usize == PER_PUBLISHER), "missing messages: {next:?}");
    Ok(())
}

/// Messages already in the channel before the late subscribers start.
const PRELOADED: u64 = 200;
/// Messages in the channel at the end.
const TOTAL: u64 = 1500;

/// Subscribes to `channel` with `extra` fields and reads until offset [`TOTAL`]; returns the
/// reply and the pushed offsets. `first` is the first offset it must get; None means the
/// one after the reply's offset (live only).
async fn follow(
    addr: std::net::SocketAddr,
    channel: &'static str,
    extra: Value,
    first: Option<u64>,
) -> anyhow::Result<(Value, Vec<u64>)> {
    let mut c = Client::connect_to(addr).await?;
    let ok = c.subscribe(channel, extra).await?;
    let first = first.unwrap_or(u64_field(&ok, "offset")? + 1);
    let mut got: Vec<u64> = Vec::new();
    while first + (got.len() as u64) <= TOTAL {
        got.extend(offsets(&c.next_messages(channel, 1).await?));
    }
    Ok((ok, got))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subscribers_joining_under_load_switch_from_history_to_live_without_gaps() -> anyhow::Result<()> {
    const CH: &str = "room:join";
    let node = Node::start("");
    let mut publisher = node.client().await;
    let (_, epoch) = publisher.publish_many(CH, (1..=PRELOADED).map(|i| json!(i))).await?;
    let mut followers = Vec::new();
    let mut next = PRELOADED + 1;
    let mut k = 0u64;
    while next <= TOTAL {
        // A new subscriber joins while the publisher goes on, cycling through the forms.
        let start = k * 7 % PRELOADED;
        let (extra, first) = match k % 4 {
            0 => (json!({ "from": "earliest" }), Some(1)),
            1 => (json!({ "from": start }), Some(start + 1)),
            2 => (json!({ "from": { "offset": start, "epoch": epoch } }), Some(start + 1)),
            _ => (json!({ "from": "latest" }), None),
        };
        followers.push((extra.clone(), first, tokio::spawn(follow(node.addr(), CH, extra, first))));
        let batch_end = (next + 24).min(TOTAL);
        publisher.publish_many(CH, (next..=batch_end).map(|i| json!(i))).await?;
        next = batch_end + 1;
        k += 1;
    }
    for (extra, first, handle) in followers {
        let (ok, got) = handle.await??;
        let first = first.unwrap_or_else(|| ok["offset"].as_u64().unwrap_or(0) + 1);
        if extra["from"].is_object() {
            assert_eq!(ok["recovered"], true, "{extra}: {ok}");
        }
        assert_contiguous(&got, first).map_err(|e| e.context(format!("subscriber {extra}")))?;
    }
    Ok(())
}
