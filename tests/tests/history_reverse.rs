//! Backward history (issue #29): `reverse` pages newest first, `before` pages back to the
//! start, `limit: 0` reads the position only, on one router and through a gateway.
//!
//! It owns the contract of docs/protocol.md section 8 for those fields: order, exclusive
//! bounds, the byte budget in either direction, paging with no gap and no repeat, and the
//! `bad_request` for `before` without `reverse`, over the WebSocket and the HTTP API.
//! Forward paging is `commands.rs`'s.

use anyhow::Result;
use switchyard_proto::partition::partition_of;
use switchyard_tests::etcd::{node_config, wait_converged, Etcd};
use switchyard_tests::serde_json::{json, Value};
use switchyard_tests::*;

/// One `history` page with any fields.
async fn page(c: &mut Client, channel: &str, extra: Value) -> Result<History> {
    let mut fields = json!({ "channel": channel });
    for (k, v) in extra.as_object().expect("an object") {
        fields[k] = v.clone();
    }
    let ok = c.ok("history", fields).await?;
    Ok(History {
        epoch: str_field(&ok, "epoch")?,
        offset: u64_field(&ok, "offset")?,
        messages: ok["messages"].as_array().cloned().unwrap_or_default(),
    })
}

/// Pages backwards from the top with `limit` per page until an empty page; returns the
/// offsets in the order received and the number of pages that had messages.
async fn page_back(c: &mut Client, channel: &str, limit: u64) -> Result<(Vec<u64>, usize)> {
    let first = page(c, channel, json!({ "reverse": true, "limit": limit })).await?;
    let (mut seen, mut pages) = (first.offsets(), 1);
    while let Some(&last) = seen.last() {
        let p = page(c, channel, json!({ "reverse": true, "before": last, "limit": limit })).await?;
        assert_eq!(p.epoch, first.epoch, "one epoch while paging");
        assert_eq!(p.offset, first.offset, "every page names the same top");
        if p.messages.is_empty() {
            break;
        }
        pages += 1;
        seen.extend(p.offsets());
    }
    Ok((seen, pages))
}

/// What every history query must answer on a channel holding offsets 1..=`n`, from
/// whichever node `c` is connected to.
async fn check_queries(c: &mut Client, channel: &str, n: u64) -> Result<()> {
    let newest = page(c, channel, json!({ "reverse": true, "limit": 5 })).await?;
    assert_eq!(newest.offsets(), (n - 4..=n).rev().collect::<Vec<_>>(), "the newest 5, newest first");
    assert_eq!(newest.offset, n);
    let below = page(c, channel, json!({ "reverse": true, "before": 10, "limit": 3 })).await?;
    assert_eq!(below.offsets(), vec![9, 8, 7], "`before` is exclusive");
    let between = page(c, channel, json!({ "reverse": true, "since": 3, "before": 7 })).await?;
    assert_eq!(between.offsets(), vec![6, 5, 4], "`since` still bounds a backward page");
    let bottom = page(c, channel, json!({ "reverse": true, "before": 1 })).await?;
    assert!(bottom.messages.is_empty() && bottom.offset == n, "nothing below offset 1");
    let over = page(c, channel, json!({ "reverse": true, "before": n + 100, "limit": 2 })).await?;
    assert_eq!(over.offsets(), vec![n, n - 1], "`before` above the top reads from the top");

    // Paging backwards visits every message once, newest first.
    let (seen, _) = page_back(c, channel, 7).await?;
    assert_eq!(seen, (1..=n).rev().collect::<Vec<_>>(), "no gap, no repeat");

    // Forward paging is unchanged.
    let forward = page(c, channel, json!({ "since": 2, "limit": 3 })).await?;
    assert_eq!(forward.offsets(), vec![3, 4, 5]);
    let forward = page(c, channel, json!({ "since": 2, "limit": 3, "reverse": false })).await?;
    assert_eq!(forward.offsets(), vec![3, 4, 5]);

    // limit 0: the position only, forward or backward.
    for extra in [json!({ "limit": 0 }), json!({ "limit": 0, "reverse": true })] {
        let p = page(c, channel, extra.clone()).await?;
        assert!(p.messages.is_empty(), "{extra}: {:?}", p.messages);
        assert_eq!((p.epoch.as_str(), p.offset), (newest.epoch.as_str(), n), "{extra}");
    }

    // `before` without `reverse` is refused, and the connection goes on.
    for extra in [json!({ "before": 5 }), json!({ "before": 5, "reverse": false })] {
        let mut fields = json!({ "channel": channel });
        fields.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        assert_eq!(c.err("history", fields).await?, "bad_request", "{extra}");
    }
    c.ping().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn reverse_before_and_limit_zero_on_one_router() -> Result<()> {
    let node = Node::start("");
    let mut c = node.client().await;
    let (acked, _) = c.publish_many("room:rev", (1..=30).map(|i| json!({ "n": i }))).await?;
    assert_contiguous(&acked, 1)?;
    check_queries(&mut c, "room:rev", 30).await?;

    // Messages keep their fields in a backward page.
    let p = page(&mut c, "room:rev", json!({ "reverse": true, "limit": 1 })).await?;
    assert_eq!(p.messages[0]["data"], json!({ "n": 30 }));
    assert_eq!(p.messages[0]["channel"], "room:rev");
    assert!(p.messages[0].get("push").is_none(), "{}", p.messages[0]);

    // A channel nobody wrote to: an empty page, backward as forward.
    let ghost = page(&mut c, "room:ghost", json!({ "reverse": true })).await?;
    assert!(ghost.messages.is_empty() && ghost.offset == 0);

    // The HTTP API takes the same fields.
    let (status, body) = get_json(&node, "/api/v1/channels/room:rev/history?reverse=true&before=4").await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(offsets(body["messages"].as_array().unwrap()), vec![3, 2, 1]);
    let (status, body) = get_json(&node, "/api/v1/channels/room:rev/history?limit=0").await?;
    assert_eq!((status, body["offset"].as_u64(), body["messages"].as_array().map(Vec::len)), (200, Some(30), Some(0)));
    let (status, body) = get_json(&node, "/api/v1/channels/room:rev/history?before=4").await?;
    assert_eq!(status, 400, "{body}");
    Ok(())
}

/// A backward page stops at `limits.max_reply_bytes` (never empty while messages remain)
/// and the next page starts right below it.
#[tokio::test(flavor = "multi_thread")]
async fn backward_pages_keep_to_the_byte_budget() -> Result<()> {
    let node = Node::start("[limits]\nmax_reply_bytes = 65536\n");
    let mut c = node.client().await;
    let big = "x".repeat(10_000);
    let (acked, _) = c.publish_many("room:big", (1..=40).map(|i| json!({ "n": i, "pad": big }))).await?;
    assert_contiguous(&acked, 1)?;
    let (seen, pages) = page_back(&mut c, "room:big", 1000).await?;
    assert_eq!(seen, (1..=40).rev().collect::<Vec<_>>());
    assert!(pages >= 6, "40 messages of 10 kB in pages of at most 64 KiB: {pages} pages");
    Ok(())
}

const P: u32 = 16;
const SECRET: &str = "correct-horse-battery-staple";

/// The same queries through a gateway: the client is on a node that does not own the
/// channel, so every page crosses the peer link (the `HistoryRange` after the request).
#[tokio::test]
async fn reverse_history_through_a_gateway() -> Result<()> {
    let etcd = Etcd::start().await;
    let start = |id: &str| Node::start(&format!("{}secret = \"{SECRET}\"\n", node_config(&etcd, "rev", id, P, "")));
    let (n1, n2) = (start("n1"), start("n2"));
    let map = wait_converged(&etcd, "rev", &[&n1, &n2], &["n1", "n2"]).await?;
    let channel = (0..)
        .map(|i| format!("room:{i}"))
        .find(|c| map["owners"][partition_of(c, P) as usize] == "n2")
        .expect("a channel n2 owns");

    let mut owner = n2.client().await;
    let (acked, _) = owner.publish_many(&channel, (1..=30).map(|i| json!(i))).await?;
    assert_contiguous(&acked, 1)?;
    let mut gateway = n1.client().await;
    check_queries(&mut gateway, &channel, 30).await?;

    // The gateway's answers are the owner's.
    let here = page(&mut owner, &channel, json!({ "reverse": true, "before": 20, "limit": 4 })).await?;
    let there = page(&mut gateway, &channel, json!({ "reverse": true, "before": 20, "limit": 4 })).await?;
    assert_eq!((&here.epoch, here.offsets()), (&there.epoch, there.offsets()));
    let (status, body) = get_json(&n1, &format!("/api/v1/channels/{channel}/history?reverse=true&limit=2")).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(offsets(body["messages"].as_array().unwrap()), vec![30, 29]);

    let m = metrics(&n1).await?;
    assert!(m.value("switchyard_peer_forwarded_total", &[("op", "history"), ("result", "ok")]).unwrap_or(0.0) >= 10.0);
    Ok(())
}
