//! Retention by count, age and bytes, and keyed compaction, as seen through `history`.
//!
//! It owns the observable effect of the background maintenance configured per namespace
//! (docs/configuration.md): what is left is always a set of messages with their original offsets,
//! the channel's top offset and epoch never move back, and publishing goes on from the top.
//! Every check polls `history` with a deadline; maintenance runs every 100 ms here.

use serde_json::{json, Value};
use switchyard_tests::*;

/// A node with the retention namespaces used below.
fn retention_node() -> Node {
    Node::start(&format!(
        r#"{FAST_MAINTENANCE}
[namespaces.count]
history_size = 5

[namespaces.age]
history_ttl = "1s"

[namespaces.bytes]
history_bytes = 2000

[namespaces.kv]
compaction = {{ tombstone_delay = "1s" }}
"#
    ))
}

/// Polls history of `channel` until its offsets equal `expected`; returns the history.
async fn wait_for_offsets(c: &mut Client, channel: &str, expected: &[u64]) -> anyhow::Result<History> {
    poll_for(&format!("history of {channel} to be offsets {expected:?}"), DEADLINE, async || {
        let h = c.history(channel, None, Some(1000)).await?;
        Ok((h.offsets() == expected).then_some(h))
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_by_count_keeps_the_newest() -> anyhow::Result<()> {
    let node = retention_node();
    let mut c = node.client().await;
    let (_, epoch) = c.publish_many("count:a", (1..=20).map(|i| json!(i))).await?;
    let h = wait_for_offsets(&mut c, "count:a", &[16, 17, 18, 19, 20]).await?;
    assert_eq!((h.epoch.as_str(), h.offset), (epoch.as_str(), 20));
    assert_eq!(datas(&h.messages), (16..=20).map(|i| json!(i)).collect::<Vec<_>>());
    assert_eq!(c.publish("count:a", json!(21)).await?, (21, epoch));
    wait_for_offsets(&mut c, "count:a", &[17, 18, 19, 20, 21]).await?;
    // Other namespaces keep everything.
    c.publish_many("other:a", (1..=20).map(|i| json!(i))).await?;
    assert_eq!(c.history("other:a", None, None).await?.offsets().len(), 20);
    wait_metric_at_least(&node, "switchyard_retention_removed_total", &[], 16.0).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_by_age_empties_the_channel_but_keeps_its_offsets() -> anyhow::Result<()> {
    let node = retention_node();
    let mut c = node.client().await;
    let (_, epoch) = c.publish_many("age:a", (1..=5).map(|i| json!(i))).await?;
    let h = wait_for_offsets(&mut c, "age:a", &[]).await?;
    assert_eq!((h.epoch.as_str(), h.offset), (epoch.as_str(), 5), "an emptied channel keeps its top and epoch");
    assert_eq!(c.publish("age:a", json!(6)).await?, (6, epoch), "offsets go on after retention emptied a channel");
    assert_eq!(c.history("age:a", None, None).await?.offsets(), vec![6]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_by_bytes_keeps_a_newest_suffix_within_the_budget() -> anyhow::Result<()> {
    const BUDGET: usize = 2000;
    let node = retention_node();
    let mut c = node.client().await;
    let payload = "x".repeat(300);
    let (_, epoch) = c.publish_many("bytes:a", (1..=20).map(|i| json!({ "i": i, "pad": payload }))).await?;
    // How the router counts stored bytes is its own business; the message data alone is a
    // lower bound, so what is kept must fit the budget by that measure, and at least the
    // newest message (about 320 bytes) must be kept.
    let data_bytes = |h: &History| h.messages.iter().map(|m| m["data"].to_string().len()).sum::<usize>();
    let h = poll_for(&format!("bytes:a to keep at most {BUDGET} bytes of data"), DEADLINE, async || {
        let h = c.history("bytes:a", None, None).await?;
        Ok((data_bytes(&h) <= BUDGET).then_some(h))
    })
    .await?;
    let kept = h.offsets();
    assert!(!kept.is_empty() && kept.last() == Some(&20), "the newest message must be kept: {kept:?}");
    assert_contiguous(&kept, kept[0])?;
    assert_eq!((h.epoch.as_str(), h.offset), (epoch.as_str(), 20));
    Ok(())
}

/// Publishes `(key, data)` pairs in order; a None key publishes without key.
async fn publish_keyed(c: &mut Client, channel: &str, items: &[(Option<&str>, Value)]) -> anyhow::Result<()> {
    let mut ids = Vec::new();
    for (key, data) in items {
        let mut fields = json!({ "channel": channel, "data": data });
        if let Some(key) = key {
            fields["key"] = json!(key);
        }
        ids.push(c.send_cmd("publish", fields).await?);
    }
    for id in ids {
        reply_ok(c.wait_reply(id).await?)?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn compaction_keeps_the_latest_message_per_key() -> anyhow::Result<()> {
    let node = retention_node();
    let mut c = node.client().await;
    publish_keyed(
        &mut c,
        "kv:a",
        &[
            (Some("a"), json!("a1")), // 1
            (Some("b"), json!("b1")), // 2
            (Some("a"), json!("a2")), // 3
            (Some("c"), json!("c1")), // 4
            (Some("b"), json!("b2")), // 5
            (Some("a"), json!("a3")), // 6
            (None, json!("plain")),   // 7
            (None, json!("plain")),   // 8: unkeyed messages are never compacted
        ],
    )
    .await?;
    let h = wait_for_offsets(&mut c, "kv:a", &[4, 5, 6, 7, 8]).await?;
    assert_eq!(datas(&h.messages), vec![json!("c1"), json!("b2"), json!("a3"), json!("plain"), json!("plain")]);
    assert_eq!(h.offset, 8, "compaction never moves the top back");
    assert_eq!(h.messages[2]["key"], "a");
    assert_eq!(c.publish("kv:a", json!("next")).await?.0, 9, "offsets go on after compaction");
    wait_metric_at_least(&node, "switchyard_compaction_removed_total", &[], 3.0).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn compaction_removes_a_tombstone_after_tombstone_delay() -> anyhow::Result<()> {
    let node = retention_node();
    let mut c = node.client().await;
    publish_keyed(
        &mut c,
        "kv:t",
        &[
            (Some("c"), json!("c1")), // 1
            (Some("d"), json!("d1")), // 2
            (Some("c"), Value::Null), // 3: tombstone for c
        ],
    )
    .await?;
    // c1 goes at once (a newer value for c exists); the tombstone goes once it is 1 s old.
    let h = wait_for_offsets(&mut c, "kv:t", &[2]).await?;
    assert_eq!((h.offset, &h.messages[0]["data"]), (3, &json!("d1")));
    assert_eq!(c.publish("kv:t", json!("next")).await?.0, 4);
    Ok(())
}
