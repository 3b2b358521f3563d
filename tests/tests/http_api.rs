//! The HTTP API on the WebSocket port: health, metrics, cluster, publish and history.
//!
//! It owns docs/operating.md's HTTP API section: status codes and body shapes, that HTTP publishes
//! join the same stream WebSocket clients see, and that every documented metric name is
//! exported.

use serde_json::json;
use switchyard_tests::*;

#[tokio::test(flavor = "multi_thread")]
async fn healthz_answers_ok() -> anyhow::Result<()> {
    let node = Node::start("");
    let (status, body) = get_json(&node, "/healthz").await?;
    assert_eq!((status, &body["status"]), (200, &json!("ok")), "{body}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn http_publish_then_history_and_websocket_agree() -> anyhow::Result<()> {
    let node = Node::start("");
    let mut sub = node.client().await;
    sub.subscribe("room:http", json!({})).await?;

    let (status, first) =
        post_json(&node, "/api/v1/publish", &json!({ "channel": "room:http", "data": { "x": 1 } })).await?;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["offset"], 1, "{first}");
    let epoch = str_field(&first, "epoch")?;
    let keyed = json!({ "channel": "room:http", "data": "v", "key": "k", "idempotency_key": "once" });
    let (status, second) = post_json(&node, "/api/v1/publish", &keyed).await?;
    assert_eq!((status, &second["offset"], &second["epoch"]), (200, &json!(2), &json!(epoch)), "{second}");
    let (status, again) = post_json(&node, "/api/v1/publish", &keyed).await?;
    assert_eq!(
        (status, position(&again)),
        (200, position(&second)),
        "a repeated idempotency key returns the original offset"
    );

    let (status, body) = get_json(&node, "/api/v1/channels/room:http/history").await?;
    assert_eq!(status, 200, "{body}");
    let h = parse_history(&body)?;
    assert_eq!((h.epoch.as_str(), h.offset, h.offsets()), (epoch.as_str(), 2, vec![1, 2]));
    assert_eq!(h.messages[0]["data"], json!({ "x": 1 }));
    assert_eq!((&h.messages[1]["key"], &h.messages[1]["data"]), (&json!("k"), &json!("v")));
    let (_, page) = get_json(&node, "/api/v1/channels/room:http/history?since=1&limit=1").await?;
    assert_eq!(parse_history(&page)?.offsets(), vec![2], "{page}");

    let pushed = sub.next_messages("room:http", 2).await?;
    assert_eq!(offsets(&pushed), vec![1, 2]);
    assert_eq!(sub.history("room:http", None, None).await?.messages, h.messages, "WebSocket and HTTP history agree");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn http_publish_rejects_bad_requests() -> anyhow::Result<()> {
    let node = Node::start("");
    for body in [
        json!({ "channel": "bad channel", "data": 1 }),
        json!({ "data": 1 }),
        json!({ "channel": "room:1" }),
        json!([1]),
    ] {
        let (status, answer) = post_json(&node, "/api/v1/publish", &body).await?;
        assert!((400..500).contains(&status), "{body} answered {status}: {answer}");
        assert_eq!(answer["error"]["code"], "bad_request", "{body}: {answer}");
    }
    let r = http(node.addr(), "POST", "/api/v1/publish", None).await?;
    assert!((400..500).contains(&r.status), "an empty body answered {}: {}", r.status, r.body);
    let (status, answer) = get_json(&node, "/api/v1/channels/bad%20name/history").await?;
    assert_eq!((status, &answer["error"]["code"]), (400, &json!("bad_request")), "{answer}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn http_publish_over_the_frame_limit_is_too_large() -> anyhow::Result<()> {
    let node = Node::start("[limits]\nmax_frame_bytes = 1024\n");
    let (status, answer) =
        post_json(&node, "/api/v1/publish", &json!({ "channel": "room:big", "data": "z".repeat(4000) })).await?;
    assert!((400..500).contains(&status), "answered {status}: {answer}");
    assert_eq!(answer["error"]["code"], "too_large", "{answer}");
    let (_, history) = get_json(&node, "/api/v1/channels/room:big/history").await?;
    assert_eq!(history["offset"], 0, "nothing stored: {history}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_shows_standalone_with_64_partitions() -> anyhow::Result<()> {
    let node = Node::start("");
    let (status, body) = get_json(&node, "/api/v1/cluster").await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["partitions"], 64, "{body}");
    assert_eq!(body["mode"], "standalone", "{body}");
    let owners = body["owners"].as_array().ok_or_else(|| anyhow::anyhow!("no owners array: {body}"))?;
    assert_eq!(owners.len(), 64, "{body}");
    assert!(body["nodes"].as_array().is_some_and(|n| !n.is_empty()), "{body}");
    Ok(())
}

/// Every metric family docs/operating.md names.
const METRICS: &[&str] = &[
    "switchyard_connections",
    "switchyard_connections_total",
    "switchyard_subscriptions",
    "switchyard_messages_published_total",
    "switchyard_messages_delivered_total",
    "switchyard_bytes_published_total",
    "switchyard_bytes_delivered_total",
    "switchyard_publish_duplicates_total",
    "switchyard_slow_consumer_disconnects_total",
    "switchyard_store_sync_seconds",
    "switchyard_catch_up_shared_pages_total",
    "switchyard_partition_channels",
    "switchyard_retention_removed_total",
    "switchyard_compaction_removed_total",
    "switchyard_protocol_errors_total",
];

#[tokio::test(flavor = "multi_thread")]
async fn metrics_export_the_documented_names() -> anyhow::Result<()> {
    let node = Node::start("");
    // Some activity, so labelled families have at least one series.
    let mut sub = node.client().await;
    sub.subscribe("room:m", json!({})).await?;
    let mut c = node.client().await;
    c.publish_many("room:m", (0..3).map(|i| json!(i))).await?;
    c.send_text("not json").await?;
    c.next_anonymous_reply().await?;
    sub.next_messages("room:m", 3).await?;

    let m = metrics(&node).await?;
    let missing: Vec<_> = METRICS.iter().filter(|name| !m.has(name)).collect();
    assert!(missing.is_empty(), "metrics missing from /metrics: {missing:?}\n{}", m.text);
    assert!(m.value("switchyard_connections", &[]).is_some_and(|v| v >= 2.0), "connections gauge");
    assert!(m.value("switchyard_subscriptions", &[]).is_some_and(|v| v >= 1.0), "subscriptions gauge");
    assert!(m.value("switchyard_messages_published_total", &[]).is_some_and(|v| v >= 3.0), "published counter");
    assert!(m.sum("switchyard_partition_channels").is_some_and(|v| v >= 1.0), "partition_channels");
    wait_metric_at_least(&node, "switchyard_messages_delivered_total", &[], 3.0).await?;
    wait_metric_at_least(&node, "switchyard_protocol_errors_total", &[("code", "bad_request")], 1.0).await?;

    // The gauges go back down when the clients leave.
    let connections = m.value("switchyard_connections", &[]).unwrap_or(0.0);
    drop((sub, c));
    wait_until("subscriptions gauge back to 0 and connections down by 2", DEADLINE, async || {
        let m = metrics(&node).await?;
        Ok(m.value("switchyard_subscriptions", &[]) == Some(0.0)
            && m.value("switchyard_connections", &[]).is_some_and(|v| v <= connections - 2.0))
    })
    .await?;
    assert!(m.value("switchyard_connections_total", &[]).is_some_and(|v| v >= 2.0), "connections_total");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn http_publish_accepts_null_data() -> anyhow::Result<()> {
    // `data` is any JSON; a keyed null is a compaction tombstone (docs/configuration.md).
    let node = Node::start("");
    let (status, answer) =
        post_json(&node, "/api/v1/publish", &json!({ "channel": "room:tomb", "data": null, "key": "k" })).await?;
    assert_eq!((status, &answer["offset"]), (200, &json!(1)), "{answer}");
    Ok(())
}

/// A path that only looks like the history route is refused, not a crash.
#[tokio::test(flavor = "multi_thread")]
async fn lookalike_history_path_is_404() -> anyhow::Result<()> {
    let node = Node::start("");
    for path in ["/api/v1/channels/history", "/api/v1/channels//history", "/api/v1/nothing"] {
        let (status, body) = get_json(&node, path).await?;
        assert_eq!(status, 404, "{path}: {body}");
    }
    let (status, _) = get_json(&node, "/healthz").await?;
    assert_eq!(status, 200, "the node still serves");
    Ok(())
}
