//! Every client command and every `subscribe` `from` form, over one real router.
//!
//! It owns the happy-path contract of docs/protocol.md: reply shapes, offsets that start at 1
//! and rise by exactly 1, idempotent publishes, history paging, and recovery success and
//! failure. Bad input lives in `bad_input.rs`, durability in `durable.rs`.

use serde_json::{json, Value};
use switchyard_tests::*;

/// A node whose `tiny` namespace keeps 3 messages, trimmed every 100 ms.
fn tiny_history_config() -> String {
    format!("{FAST_MAINTENANCE}\n[namespaces.tiny]\nhistory_size = 3\n")
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_and_ping() -> anyhow::Result<()> {
    let node = Node::start("");
    let mut c = node.client().await;
    let ok = c.ok("connect", json!({ "name": "e2e" })).await?;
    assert!(ok["client"].is_string(), "connect reply without client: {ok}");
    assert!(ok["node"].is_string(), "connect reply without node: {ok}");
    assert_eq!(ok["version"], "1", "{ok}");
    assert!(c.ok("ping", json!({})).await?.is_object());
    // connect is optional when auth is off.
    let mut anonymous = node.client().await;
    anonymous.ping().await?;
    anonymous.publish("room:anon", json!(1)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn offsets_start_at_one_and_are_contiguous_per_channel() -> anyhow::Result<()> {
    let node = Node::start("");
    let mut c = node.client().await;
    let mut epochs = Vec::new();
    for i in 1..=5u64 {
        let (offset, epoch) = c.publish("room:a", json!({ "n": i })).await?;
        assert_eq!(offset, i);
        epochs.push(epoch);
    }
    assert!(epochs.iter().all(|e| e == &epochs[0] && !e.is_empty()), "epoch changed: {epochs:?}");
    // Another channel has its own offsets.
    assert_eq!(c.publish("room:b", json!("x")).await?.0, 1);

    let h = c.history("room:a", None, None).await?;
    assert_eq!((h.epoch.as_str(), h.offset), (epochs[0].as_str(), 5));
    assert_eq!(h.offsets(), vec![1, 2, 3, 4, 5]);
    for (i, m) in h.messages.iter().enumerate() {
        assert_eq!(m["channel"], "room:a", "{m}");
        assert_eq!(m["epoch"], json!(epochs[0]), "{m}");
        assert_eq!(m["data"], json!({ "n": i + 1 }), "{m}");
        assert!(m["ts"].as_u64().is_some_and(|ts| ts > 1_600_000_000_000), "ts is not unix millis: {m}");
        assert!(m.get("push").is_none(), "history messages carry no `push`: {m}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn publish_with_key_is_pushed_and_stored_with_it() -> anyhow::Result<()> {
    let node = Node::start("");
    let mut sub = node.client().await;
    sub.subscribe("room:k", json!({})).await?;
    let mut publisher = node.client().await;
    publisher.ok("publish", json!({ "channel": "room:k", "data": {"v": 1}, "key": "user-7" })).await?;
    publisher.publish("room:k", json!({ "v": 2 })).await?;

    let pushes = sub.next_messages("room:k", 2).await?;
    assert_eq!(pushes[0]["key"], "user-7", "{}", pushes[0]);
    assert_eq!(pushes[0]["offset"], 1);
    assert!(pushes[1]["key"].is_null(), "unkeyed message has a key: {}", pushes[1]);
    let h = publisher.history("room:k", None, None).await?;
    assert_eq!(h.messages[0]["key"], "user-7");
    assert_eq!(h.messages[0]["data"], json!({ "v": 1 }));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn repeated_idempotency_key_returns_original_offset_and_stores_once() -> anyhow::Result<()> {
    let node = Node::start("");
    let mut sub = node.client().await;
    sub.subscribe("room:idem", json!({})).await?;
    let mut c = node.client().await;
    let publish = json!({ "channel": "room:idem", "data": "hello", "idempotency_key": "req-1" });
    let first = c.ok("publish", publish.clone()).await?;
    assert_eq!(first["offset"], 1);
    c.publish("room:idem", json!("other")).await?;
    let again = c.ok("publish", publish).await?;
    assert_eq!(
        position(&again),
        position(&first),
        "a repeated idempotency key must return the original offset and epoch"
    );
    // A different connection repeating the key is also deduplicated (the key is per channel).
    let mut other = node.client().await;
    let from_other =
        other.ok("publish", json!({ "channel": "room:idem", "data": "hello", "idempotency_key": "req-1" })).await?;
    assert_eq!(position(&from_other), position(&first));
    assert_eq!(c.publish("room:idem", json!("last")).await?.0, 3);

    let h = c.history("room:idem", None, None).await?;
    assert_eq!(datas(&h.messages), vec![json!("hello"), json!("other"), json!("last")]);
    // The subscriber saw each stored message exactly once.
    let pushed = sub.next_messages("room:idem", 3).await?;
    assert_eq!(offsets(&pushed), vec![1, 2, 3]);
    let dups = wait_metric_at_least(&node, "switchyard_publish_duplicates_total", &[], 2.0).await?;
    assert!(dups >= 2.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn history_since_and_limit() -> anyhow::Result<()> {
    let node = Node::start("");
    let mut c = node.client().await;
    c.publish_many("room:h", (1..=10).map(|i| json!(i))).await?;

    let cases: &[(Option<u64>, Option<u64>, &[u64])] = &[
        (None, None, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]),
        (Some(3), None, &[4, 5, 6, 7, 8, 9, 10]),
        (None, Some(4), &[1, 2, 3, 4]),
        (Some(3), Some(2), &[4, 5]),
        (Some(0), Some(1), &[1]),
        (Some(10), None, &[]),
        (Some(9), Some(100), &[10]),
        (Some(50), None, &[]),
    ];
    for &(since, limit, expected) in cases {
        let h = c.history("room:h", since, limit).await?;
        assert_eq!(h.offsets(), expected, "since={since:?} limit={limit:?}");
        assert_eq!(h.offset, 10, "reply offset is the channel's top (since={since:?} limit={limit:?})");
    }
    // The default limit is 100.
    c.publish_many("room:h100", (1..=150).map(|i| json!(i))).await?;
    let h = c.history("room:h100", None, None).await?;
    assert_eq!(h.offsets(), (1..=100).collect::<Vec<_>>());
    assert_eq!(h.offset, 150);
    // A channel nobody used is empty at offset 0.
    let h = c.history("room:never-used", None, None).await?;
    assert_eq!((h.offset, h.messages.len()), (0, 0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn unsubscribe_stops_delivery() -> anyhow::Result<()> {
    let node = Node::start("");
    let mut sub = node.client().await;
    sub.subscribe("room:u1", json!({})).await?;
    sub.subscribe("room:u2", json!({})).await?;
    assert!(sub.ok("unsubscribe", json!({ "channel": "room:u1" })).await?.is_object());
    let mut publisher = node.client().await;
    publisher.publish("room:u1", json!("dropped")).await?;
    publisher.publish("room:u2", json!("kept")).await?;
    // Pushes of one connection are ordered, so if u1's message were delivered it would
    // come before u2's.
    let push = sub.next_push(DEADLINE).await?;
    assert_eq!((&push["channel"], &push["data"]), (&json!("room:u2"), &json!("kept")), "{push}");
    Ok(())
}

/// One `from` form and what it must deliver from a channel holding offsets 1..=3.
struct FromCase {
    name: &'static str,
    /// Extra subscribe fields; `{epoch}` in a string is replaced by the channel's epoch.
    from: Option<Value>,
    /// Offsets pushed before the live message 4.
    replayed: &'static [u64],
    /// Expected `recovered` in the reply, when it must be present.
    recovered: Option<bool>,
}

#[tokio::test(flavor = "multi_thread")]
async fn subscribe_from_forms() -> anyhow::Result<()> {
    let node = Node::start("");
    let cases = [
        FromCase { name: "omitted", from: None, replayed: &[], recovered: None },
        FromCase { name: "latest", from: Some(json!("latest")), replayed: &[], recovered: None },
        FromCase { name: "earliest", from: Some(json!("earliest")), replayed: &[1, 2, 3], recovered: None },
        FromCase { name: "number 0", from: Some(json!(0)), replayed: &[1, 2, 3], recovered: None },
        FromCase { name: "number 1", from: Some(json!(1)), replayed: &[2, 3], recovered: None },
        FromCase { name: "number at top", from: Some(json!(3)), replayed: &[], recovered: None },
        FromCase {
            name: "recovery",
            from: Some(json!({ "offset": 1, "epoch": "{epoch}" })),
            replayed: &[2, 3],
            recovered: Some(true),
        },
        FromCase {
            name: "recovery at top",
            from: Some(json!({ "offset": 3, "epoch": "{epoch}" })),
            replayed: &[],
            recovered: Some(true),
        },
        FromCase {
            name: "unknown epoch",
            from: Some(json!({ "offset": 1, "epoch": "no-such-epoch" })),
            replayed: &[],
            recovered: Some(false),
        },
    ];
    for (i, case) in cases.iter().enumerate() {
        let channel = format!("room:from{i}");
        check_from_case(&node, &channel, case).await.map_err(|e| e.context(format!("case {:?}", case.name)))?;
    }
    Ok(())
}

async fn check_from_case(node: &Node, channel: &str, case: &FromCase) -> anyhow::Result<()> {
    let mut publisher = node.client().await;
    let (_, epoch) = publisher.publish_many(channel, (1..=3).map(|i| json!(i))).await?;
    let mut sub = node.client().await;
    let extra = match &case.from {
        None => json!({}),
        Some(from) => json!({ "from": serde_json::from_str::<Value>(&from.to_string().replace("{epoch}", &epoch))? }),
    };
    let ok = sub.subscribe(channel, extra).await?;
    anyhow::ensure!(sub.buffered_pushes() == 0, "a push arrived before the subscribe reply");
    assert_eq!(ok["channel"], channel, "{ok}");
    assert_eq!(ok["epoch"], json!(epoch), "{ok}");
    if case.replayed.is_empty() {
        assert_eq!(ok["offset"], 3, "a subscription that replays nothing reports the top: {ok}");
    }
    if let Some(recovered) = case.recovered {
        assert_eq!(ok["recovered"], recovered, "{ok}");
    }
    publisher.publish(channel, json!(4)).await?;
    let mut expected = case.replayed.to_vec();
    expected.push(4);
    let pushed = sub.next_messages(channel, expected.len()).await?;
    assert_eq!(offsets(&pushed), expected);
    assert_eq!(datas(&pushed), expected.iter().map(|&o| json!(o)).collect::<Vec<_>>(), "data follows offsets");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn recovery_fails_when_history_was_trimmed() -> anyhow::Result<()> {
    let node = Node::start(&tiny_history_config());
    let mut publisher = node.client().await;
    let (_, epoch) = publisher.publish_many("tiny:r", (1..=10).map(|i| json!(i))).await?;
    wait_until("tiny:r trimmed to its last 3 messages", DEADLINE, async || {
        Ok(publisher.history("tiny:r", None, None).await?.offsets() == [8, 9, 10])
    })
    .await?;

    // Offset 7 is still recoverable: 8, 9 and 10 are retained.
    let mut recovered = node.client().await;
    let ok = recovered.subscribe("tiny:r", json!({ "from": { "offset": 7, "epoch": epoch } })).await?;
    assert_eq!(ok["recovered"], true, "{ok}");

    // Offset 6 is not: 7 is gone. No old message may be pushed.
    let mut lost = node.client().await;
    let ok = lost.subscribe("tiny:r", json!({ "from": { "offset": 6, "epoch": epoch } })).await?;
    assert_eq!(ok["recovered"], false, "{ok}");
    assert_eq!((&ok["epoch"], &ok["offset"]), (&json!(epoch), &json!(10)), "reply tells where the stream is now: {ok}");

    publisher.publish("tiny:r", json!(11)).await?;
    assert_eq!(offsets(&recovered.next_messages("tiny:r", 4).await?), vec![8, 9, 10, 11]);
    assert_eq!(offsets(&lost.next_messages("tiny:r", 1).await?), vec![11], "no old messages after a failed recovery");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn history_limit_is_capped_at_1000() -> anyhow::Result<()> {
    let node = Node::start("");
    let mut c = node.client().await;
    c.publish_many("room:cap", (1..=1100).map(|i| json!(i))).await?;
    // docs/protocol.md: "limit? (default 100, max 1000)". Either a capped page or a refusal.
    let reply = c.cmd("history", json!({ "channel": "room:cap", "limit": 5000 })).await?;
    match reply_ok(reply.clone()) {
        Ok(ok) => assert_eq!(parse_history(&ok)?.offsets(), (1..=1000).collect::<Vec<_>>()),
        Err(_) => assert_eq!(error_code(&reply)?, "bad_request", "{reply}"),
    }
    c.ping().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn too_many_subscriptions_get_limit_exceeded() -> anyhow::Result<()> {
    let node = Node::start("[limits]\nmax_subscriptions = 2\n");
    let mut c = node.client().await;
    c.subscribe("room:s1", json!({})).await?;
    c.subscribe("room:s2", json!({})).await?;
    assert_eq!(c.err("subscribe", json!({ "channel": "room:s3" })).await?, "limit_exceeded");
    // Unsubscribing frees a slot; the connection keeps working.
    c.ok("unsubscribe", json!({ "channel": "room:s1" })).await?;
    c.subscribe("room:s3", json!({})).await?;
    c.ping().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn null_data_is_a_valid_payload() -> anyhow::Result<()> {
    // docs/protocol.md: `data` is any JSON, and docs/configuration.md's tombstones are keyed messages with
    // `data: null`; an explicit null must not be taken for a missing field.
    let node = Node::start("");
    let mut c = node.client().await;
    let ok = c.ok("publish", json!({ "channel": "room:null", "data": null, "key": "k" })).await?;
    assert_eq!(ok["offset"], 1, "{ok}");
    let h = c.history("room:null", None, None).await?;
    assert!(h.messages[0].get("data").is_some_and(Value::is_null), "{:?}", h.messages);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn idempotency_key_is_forgotten_after_the_window() -> anyhow::Result<()> {
    let node = Node::start("[publish]\nidempotency_window = \"1s\"\n");
    let mut c = node.client().await;
    let publish = json!({ "channel": "room:window", "data": "x", "idempotency_key": "k" });
    let first = c.ok("publish", publish.clone()).await?;
    let started = tokio::time::Instant::now();
    assert_eq!(position(&c.ok("publish", publish.clone()).await?), position(&first), "repeat inside the window");
    // Repeat until the key is forgotten: then the publish is stored again, at offset 2.
    let later = poll_for("the idempotency key to expire", DEADLINE, async || {
        let ok = c.ok("publish", publish.clone()).await?;
        Ok((ok["offset"] != first["offset"]).then_some(ok))
    })
    .await?;
    assert_eq!(later["offset"], 2, "{later}");
    let waited = started.elapsed();
    assert!(waited >= std::time::Duration::from_millis(900), "key forgotten after {waited:?}, window is 1s");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn many_channels_each_have_their_own_stream() -> anyhow::Result<()> {
    const CHANNELS: usize = 300;
    let node = Node::start("");
    let mut c = node.client().await;
    let mut ids = Vec::new();
    for round in 1..=3 {
        for ch in 0..CHANNELS {
            let channel = format!("many:{ch}");
            ids.push((round, c.send_cmd("publish", json!({ "channel": channel, "data": [ch, round] })).await?));
        }
    }
    for (round, id) in ids {
        let ok = reply_ok(c.wait_reply(id).await?)?;
        assert_eq!(ok["offset"], round, "every channel's offsets start at 1: {ok}");
    }
    for ch in (0..CHANNELS).step_by(7) {
        let h = c.history(&format!("many:{ch}"), None, None).await?;
        assert_eq!(datas(&h.messages), (1..=3).map(|round| json!([ch, round])).collect::<Vec<_>>());
    }
    let m = metrics(&node).await?;
    let channels = m.sum("switchyard_partition_channels").unwrap_or(0.0);
    assert!(channels >= CHANNELS as f64, "switchyard_partition_channels sums to {channels}");
    let partitions = m.text.lines().filter(|l| l.starts_with("switchyard_partition_channels{")).count();
    assert!(partitions > 1, "300 channels should spread over several partitions: {partitions}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn replies_come_in_command_order() -> anyhow::Result<()> {
    let node = Node::start("");
    let mut c = node.client().await;
    let commands = [
        ("publish", json!({ "channel": "room:seq", "data": 1 })),
        ("subscribe", json!({ "channel": "room:seq", "from": "earliest" })),
        ("history", json!({ "channel": "room:seq" })),
        ("frobnicate", json!({})),
        ("publish", json!({ "channel": "room:seq", "data": 2 })),
        ("ping", json!({})),
        ("publish", json!({ "channel": "room:other", "data": 3 })),
        ("history", json!({ "channel": "room:seq", "since": 1 })),
        ("unsubscribe", json!({ "channel": "room:seq" })),
        ("ping", json!({})),
    ];
    let mut sent = Vec::new();
    for (op, fields) in commands {
        sent.push(c.send_cmd(op, fields).await?);
    }
    let mut replied = Vec::new();
    while replied.len() < sent.len() {
        match c.next_event(tokio::time::Instant::now() + DEADLINE).await {
            Some(Event::Reply(reply)) => replied.push(u64_field(&reply, "id")?),
            Some(Event::Push(_)) => {}
            other => anyhow::bail!("after replies {replied:?}: {other:?}"),
        }
    }
    assert_eq!(replied, sent);
    Ok(())
}
