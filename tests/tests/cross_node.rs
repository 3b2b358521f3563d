//! Cross-node routing (issue #5): publish, history and commit for a channel owned by
//! another node are forwarded over the peer link, with the owner's offsets; subscribers on
//! any node share one upstream subscription per gateway.

use anyhow::Result;
use switchyard_proto::partition::partition_of;
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

    // A subscriber on every node: the owner's own, and two through upstreams.
    let mut subs = Vec::new();
    for node in [&n1, &n2, &n3] {
        let mut c = node.client().await;
        c.subscribe(&channel, json!({})).await?;
        subs.push(c);
    }
    let mut c1 = n1.client().await;
    // Pipelined: every publish is in flight before the first ack.
    let (acked, _epoch) = c1.publish_many(&channel, (0..50).map(|i| json!(i))).await?;
    assert_contiguous(&acked, 1)?;
    for (i, sub) in subs.iter_mut().enumerate() {
        let got = sub.next_messages(&channel, 50).await?;
        assert_eq!(datas(&got), (0..50).map(|i| json!(i)).collect::<Vec<_>>(), "subscriber on n{}", i + 1);
        assert_contiguous(&offsets(&got), 1)?;
    }

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

#[tokio::test]
async fn every_start_position_works_through_a_gateway() -> Result<()> {
    let etcd = Etcd::start().await;
    let (n1, n2) = (start(&etcd, "f", "n1"), start(&etcd, "f", "n2"));
    let map = wait_converged(&etcd, "f", &[&n1, &n2], &["n1", "n2"]).await?;
    let channel = channel_owned_by(&map, "n2");
    let mut publisher = n2.client().await;
    let (acked, epoch) = publisher.publish_many(&channel, (1..=10).map(|i| json!(i))).await?;
    assert_contiguous(&acked, 1)?;
    publisher.ok("commit", json!({"channel": channel, "consumer": "w", "offset": 7})).await?;

    let cases = [
        (json!({"from": "earliest"}), (1..=10).collect::<Vec<u64>>(), None),
        (json!({"from": 4}), (5..=10).collect(), None),
        (json!({"from": {"offset": 8, "epoch": epoch}}), vec![9, 10], Some(true)),
        (json!({"from": {"offset": 8, "epoch": "gone"}}), vec![], Some(false)),
        (json!({"consumer": "w"}), vec![8, 9, 10], None),
        (json!({}), vec![], None),
    ];
    let mut clients = Vec::new();
    for (extra, want, recovered) in cases {
        let mut c = n1.client().await;
        let ok = c.subscribe(&channel, extra.clone()).await?;
        assert_eq!(ok["epoch"], json!(epoch), "{extra}");
        assert_eq!(ok.get("recovered").and_then(Value::as_bool), recovered, "{extra}: {ok}");
        if !want.is_empty() {
            let got = c.next_messages(&channel, want.len()).await?;
            assert_eq!(offsets(&got), want, "{extra}");
        }
        clients.push(c);
    }
    // Then every one of them gets the next live message, once.
    publisher.publish(&channel, json!("live")).await?;
    for c in &mut clients {
        let got = c.next_messages(&channel, 1).await?;
        assert_eq!(offsets(&got), vec![11]);
    }
    Ok(())
}

#[tokio::test]
async fn a_thousand_local_subscribers_cost_one_upstream() -> Result<()> {
    let etcd = Etcd::start().await;
    let (n1, n2) = (start(&etcd, "k", "n1"), start(&etcd, "k", "n2"));
    let map = wait_converged(&etcd, "k", &[&n1, &n2], &["n1", "n2"]).await?;
    let channel = channel_owned_by(&map, "n2");
    let mut clients = Vec::with_capacity(1000);
    for _ in 0..1000 {
        let mut c = n1.client().await;
        c.subscribe(&channel, json!({})).await?;
        clients.push(c);
    }
    let owner = metrics(&n2).await?;
    assert_eq!(owner.value("switchyard_peer_subscriptions", &[]), Some(1.0), "one upstream at the owner");
    assert_eq!(owner.value("switchyard_subscriptions", &[]), Some(0.0), "no client subscribes on the owner");
    assert_eq!(metrics(&n1).await?.value("switchyard_peer_upstreams", &[]), Some(1.0));
    assert_eq!(metrics(&n1).await?.value("switchyard_subscriptions", &[]), Some(1000.0));

    let mut publisher = n2.client().await;
    publisher.publish(&channel, json!("hello")).await?;
    for c in &mut clients {
        let got = c.next_messages(&channel, 1).await?;
        assert_eq!(datas(&got), vec![json!("hello")]);
    }
    // The last local subscriber to leave drops the upstream.
    drop(clients);
    wait_until("the upstream is dropped", DEADLINE, async || {
        let (gw, owner) = (metrics(&n1).await?, metrics(&n2).await?);
        Ok(gw.value("switchyard_peer_upstreams", &[]) == Some(0.0)
            && owner.value("switchyard_peer_subscriptions", &[]) == Some(0.0))
    })
    .await?;
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
async fn a_garbage_peer_frame_closes_that_link_only() -> Result<()> {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest as _, Message};
    let etcd = Etcd::start().await;
    let (n1, n2) = (start(&etcd, "g", "n1"), start(&etcd, "g", "n2"));
    let map = wait_converged(&etcd, "g", &[&n1, &n2], &["n1", "n2"]).await?;
    let channel = channel_owned_by(&map, "n2");
    let mut req = format!("ws://{}/peer", n2.addr()).into_client_request()?;
    req.headers_mut().insert("x-switchyard-cluster-secret", SECRET.parse()?);
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await?;
    // The acceptor says which peer wire it speaks (2: errors carry typed refusals; 3:
    // backward history reads and presence), so a dialer knows whether to read an older
    // node's errors by their messages, and which requests it may send.
    let wire = resp.headers().get("x-switchyard-peer-wire").and_then(|v| v.to_str().ok());
    assert_eq!(wire, Some("3"), "{:?}", resp.headers());
    ws.send(Message::Binary(vec![0xff, 0x13, 0x37, 0x00, 0xff].into())).await?;
    let ended = tokio::time::timeout(DEADLINE, async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    anyhow::ensure!(ended.is_ok(), "the bad link was not closed");
    // Everyone else is still served, through the real link too.
    let mut c = n1.client().await;
    c.publish(&channel, json!("still here")).await?;
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
    // n2 drained before it stopped (the partition moved to n1 by handover) and got it back
    // the same way: nothing was lost on the round trip.
    assert_eq!(data.first(), Some(&json!("before")), "{data:?}");
    Ok(())
}
