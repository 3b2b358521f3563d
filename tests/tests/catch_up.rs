//! Catch-up edges: what a subscription promises when it starts while other work is in
//! flight.
//!
//! It owns three promises. First, a subscriber whose catch-up loses a race with retention
//! never sees a gap: it gets an `unsubscribed` push instead. Second, `latest` includes a
//! publish sent right after the subscribe on the same connection. Third, `from: N` above
//! the top skips live messages up to N.

use serde_json::{json, Value};
use switchyard_tests::*;
use tokio::time::Instant;

/// Retention trims the channel while a slow subscriber is still catching up. Whatever
/// it receives is contiguous from offset 1. If messages it was promised got trimmed, the
/// stream ends with `{"push":"unsubscribed","code":4008}` before any gap.
#[tokio::test(flavor = "multi_thread")]
async fn catch_up_raced_by_retention_never_skips() -> anyhow::Result<()> {
    const CH: &str = "g:room";
    let node = Node::start(
        "[limits]\noutbound_queue_bytes = 67108864\noutbound_queue_messages = 8192\n\
         [maintenance]\ninterval = \"20ms\"\n[namespaces.g]\nhistory_size = 300\nhistory_ttl = \"0s\"\n",
    );
    let pad = "x".repeat(16_000);
    let mut publisher = node.client().await;
    let (_, epoch) = publisher.publish_many(CH, (1..=300).map(|i| json!({ "i": i, "p": pad }))).await?;

    // A subscriber that recovers from 0 (everything retained) but reads nothing yet.
    let mut slow = Client::connect_with_recv_buffer(&node, 4096).await?;
    let id = slow.send_cmd("subscribe", json!({ "channel": CH, "from": { "offset": 0, "epoch": epoch } })).await?;
    // Push the retained window far past what the subscriber has read.
    publisher.publish_many(CH, (301..=900).map(|i| json!({ "i": i, "p": pad }))).await?;
    wait_until("retention to trim below offset 400", DEADLINE, async || {
        Ok(publisher.history(CH, None, Some(1)).await?.offsets().first().is_some_and(|&o| o > 400))
    })
    .await?;

    let reply = slow.wait_reply(id).await?;
    assert_eq!(reply_ok(reply.clone())?["recovered"], true, "{reply}");
    let mut offsets = Vec::new();
    let mut ended: Option<Value> = None;
    let deadline = Instant::now() + DEADLINE;
    while offsets.last() != Some(&900) && ended.is_none() {
        match slow.next_event(deadline).await {
            Some(Event::Push(p)) if p["push"] == "message" => offsets.push(u64_field(&p, "offset")?),
            Some(Event::Push(p)) if p["push"] == "unsubscribed" => ended = Some(p),
            other => anyhow::bail!("unexpected {other:?} after {} messages", offsets.len()),
        }
    }
    assert_contiguous(&offsets, 1).map_err(|e| e.context(format!("ended with {ended:?}")))?;
    if let Some(push) = &ended {
        assert_eq!((&push["channel"], &push["code"]), (&json!(CH), &json!(4008)), "{push}");
    }
    eprintln!("received {} contiguous messages; ended: {ended:?}", offsets.len());
    // The connection is still usable.
    slow.ping().await?;
    Ok(())
}

/// `latest` covers every publish that comes after the subscribe, even one pipelined right
/// behind it on the same connection (and so possibly in the same owner batch).
#[tokio::test(flavor = "multi_thread")]
async fn latest_includes_a_publish_pipelined_right_after_it() -> anyhow::Result<()> {
    let node = Node::start("");
    let mut c = node.client().await;
    for round in 0..20 {
        let ch = format!("pipe:{round}");
        c.publish(&ch, json!("before")).await?;
        let sub = c.send_cmd("subscribe", json!({ "channel": ch })).await?;
        let publ = c.send_cmd("publish", json!({ "channel": ch, "data": "after" })).await?;
        let sub_ok = reply_ok(c.wait_reply(sub).await?)?;
        let pub_ok = reply_ok(c.wait_reply(publ).await?)?;
        assert_eq!(u64_field(&sub_ok, "offset")?, 1, "round {round}: {sub_ok}");
        let got = c.next_messages(&ch, 1).await?;
        assert_eq!((offsets(&got), &got[0]["data"]), (vec![u64_field(&pub_ok, "offset")?], &json!("after")));
    }
    Ok(())
}

/// `from: N` with N above the top delivers only messages with offset > N.
#[tokio::test(flavor = "multi_thread")]
async fn from_above_the_top_skips_up_to_n() -> anyhow::Result<()> {
    const CH: &str = "skip:1";
    let node = Node::start("");
    let mut c = node.client().await;
    c.publish_many(CH, (1..=2).map(|i| json!(i))).await?;
    let mut sub = node.client().await;
    sub.subscribe(CH, json!({ "from": 4 })).await?;
    c.publish_many(CH, (3..=6).map(|i| json!(i))).await?;
    assert_eq!(offsets(&sub.next_messages(CH, 2).await?), vec![5, 6]);
    Ok(())
}
