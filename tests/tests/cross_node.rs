//! Cross-node routing (issue #5), first slice: publish, history and commit for a channel
//! owned by another node are forwarded over the peer link, with the owner's offsets.

use anyhow::Result;
use switchyard_router::partition::partition_of;
use switchyard_tests::etcd::{node_config, wait_converged, Etcd};
use switchyard_tests::serde_json::{json, Value};
use switchyard_tests::*;

const P: u32 = 16;
const SECRET: &str = "correct-horse-battery-staple";

fn start(etcd: &Etcd, cluster: &str, id: &str) -> Node {
    Node::start(&format!("{}secret = \"{SECRET}\"\n", node_config(etcd, cluster, id, P, "")))
}

fn channel_owned_by(map: &Value, node: &str) -> String {
    (0..)
        .map(|i| format!("room:{i}"))
        .find(|c| map["owners"][partition_of(c, P) as usize] == node)
        .expect("some channel")
}

#[tokio::test]
async fn publish_history_and_commit_reach_the_owner_from_any_node() -> Result<()> {
    let etcd = Etcd::start().await;
    let (n1, n2, n3) = (start(&etcd, "x", "n1"), start(&etcd, "x", "n2"), start(&etcd, "x", "n3"));
    let map = wait_converged(&etcd, "x", &[&n1, &n2, &n3], &["n1", "n2", "n3"]).await?;
    let channel = channel_owned_by(&map, "n2");

    let mut owner_sub = n2.client().await;
    owner_sub.subscribe(&channel, json!({})).await?;
    let mut c1 = n1.client().await;
    // Pipelined: every publish is in flight before the first ack.
    let (acked, _epoch) = c1.publish_many(&channel, (0..50).map(|i| json!(i))).await?;
    assert_contiguous(&acked, 1)?;
    let got = owner_sub.next_messages(&channel, 50).await?;
    assert_eq!(datas(&got), (0..50).map(|i| json!(i)).collect::<Vec<_>>(), "forwarded in order");

    // History from a third node, and over HTTP from the first.
    let mut c3 = n3.client().await;
    let h = c3.history_all(&channel).await?;
    assert_contiguous(&h.offsets(), 1)?;
    assert_eq!(h.offsets().len(), 50);
    let (status, page) = get_json(&n1, &format!("/api/v1/channels/{channel}/history?since=45")).await?;
    assert_eq!(status, 200, "{page}");
    assert_eq!(offsets_of(&page), vec![46, 47, 48, 49, 50]);

    // A commit through n3 is what a consumer on the owner resumes from.
    c3.ok("commit", json!({"channel": channel, "consumer": "workers", "offset": 40})).await?;
    let mut consumer = n2.client().await;
    consumer.subscribe(&channel, json!({"consumer": "workers"})).await?;
    let resumed = consumer.next_messages(&channel, 10).await?;
    assert_eq!(offsets(&resumed), (41..=50).collect::<Vec<_>>());

    let m = metrics(&n1).await?;
    assert!(m.value("switchyard_peer_forwarded_total", &[("op", "publish"), ("result", "ok")]).unwrap_or(0.0) >= 50.0);
    assert_eq!(m.value("switchyard_peer_link_up", &[("peer", "n2")]), Some(1.0));
    Ok(())
}

fn offsets_of(page: &Value) -> Vec<u64> {
    offsets(page["messages"].as_array().map(Vec::as_slice).unwrap_or_default())
}

#[tokio::test]
async fn a_peer_without_the_secret_is_refused() -> Result<()> {
    let etcd = Etcd::start().await;
    let n1 = start(&etcd, "s", "n1");
    let resp = http(n1.addr(), "GET", "/peer", None).await?;
    assert_eq!(resp.status, 401, "{:?}", resp.body);
    Ok(())
}

#[tokio::test]
async fn forwarding_resumes_after_the_owner_restarts() -> Result<()> {
    let etcd = Etcd::start().await;
    let (n1, mut n2) = (start(&etcd, "r", "n1"), start(&etcd, "r", "n2"));
    let map = wait_converged(&etcd, "r", &[&n1, &n2], &["n1", "n2"]).await?;
    let channel = channel_owned_by(&map, "n2");
    let mut c = n1.client().await;
    c.publish(&channel, json!("before")).await?;
    // The owner goes away gracefully and comes back on a new port: the link reconnects.
    n2.restart();
    wait_until("forwarding works again", DEADLINE, async || {
        let reply = c.cmd("publish", json!({"channel": channel, "data": "after", "idempotency_key": "k1"})).await?;
        Ok(reply.get("ok").is_some())
    })
    .await?;
    let h = c.history_all(&channel).await?;
    let data = datas(&h.messages);
    assert_eq!(data.iter().filter(|d| **d == json!("after")).count(), 1, "idempotent retries stored once: {data:?}");
    // Not asserted: "before" is on n2's disk, and while n2 was away the partition moved to
    // n1 and back; without handover (issue #5, not built) the new owner starts afresh.
    Ok(())
}
