//! Presence (issue #29): who is subscribed to a channel, over real routers. Two native
//! clients see each other in `presence` and get `join`/`leave` pushes; `presence_stats`;
//! the list bound; no join/leave pushes above the subscriber threshold; and on a 3-node
//! cluster on real etcd, a client on a gateway node counts once and a killed node's
//! clients leave presence within its lease.

use anyhow::Result;
use switchyard_proto::partition::partition_of;
use switchyard_tests::etcd::{node_config, wait_converged, Etcd};
use switchyard_tests::serde_json::json;
use switchyard_tests::*;

const NAMESPACES: &str = "[namespaces.room]\npresence = true\njoin_leave = true\n\
    [namespaces.small]\npresence = true\npresence_max_list = 2\n\
    [namespaces.crowd]\npresence = true\njoin_leave = true\njoin_leave_max_subscribers = 2\n";

/// Connects and returns the client with its id.
async fn connected(node: &Node) -> Result<(Client, String)> {
    let mut c = node.client().await;
    let ok = c.ok("connect", json!({})).await?;
    Ok((c, str_field(&ok, "client")?))
}

/// The clients in `channel`'s presence, sorted.
async fn present(c: &mut Client, channel: &str) -> Result<Vec<String>> {
    let ok = c.ok("presence", json!({ "channel": channel })).await?;
    let mut ids: Vec<String> = ok["clients"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("no clients in {ok}"))?
        .iter()
        .map(|e| e["client"].as_str().unwrap_or_default().to_string())
        .collect();
    ids.sort();
    Ok(ids)
}

async fn stats(c: &mut Client, channel: &str) -> Result<(u64, u64)> {
    let ok = c.ok("presence_stats", json!({ "channel": channel })).await?;
    Ok((u64_field(&ok, "num_clients")?, u64_field(&ok, "num_users")?))
}

/// Waits until `channel`'s presence, read through `c`, has exactly `want` clients.
async fn wait_clients(c: &mut Client, channel: &str, want: u64) -> Result<()> {
    let mut last = (0, 0);
    wait_until(&format!("{want} clients in {channel}'s presence"), DEADLINE, async || {
        last = stats(c, channel).await?;
        Ok(last.0 == want)
    })
    .await
    .map_err(|e| e.context(format!("last stats {last:?}")))
}

/// The next push of `c`, which must be a `join` or `leave` (`kind`) in `channel`; its client.
async fn next_change(c: &mut Client, kind: &str, channel: &str) -> Result<String> {
    let push = c.next_push(DEADLINE).await?;
    anyhow::ensure!(push["push"] == kind && push["channel"] == channel, "expected {kind} in {channel}, got {push}");
    str_field(&push["info"], "client")
}

#[tokio::test(flavor = "multi_thread")]
async fn two_clients_see_each_other_and_their_joins_and_leaves() -> Result<()> {
    let node = Node::start(NAMESPACES);
    let (mut a, a_id) = connected(&node).await?;
    a.subscribe("room:1", json!({})).await?;
    assert_eq!(next_change(&mut a, "join", "room:1").await?, a_id, "a subscriber sees its own join");
    let (mut b, b_id) = connected(&node).await?;
    b.subscribe("room:1", json!({})).await?;
    assert_eq!(next_change(&mut a, "join", "room:1").await?, b_id);
    assert_eq!(next_change(&mut b, "join", "room:1").await?, b_id);
    let mut both = vec![a_id.clone(), b_id.clone()];
    both.sort();
    assert_eq!(present(&mut a, "room:1").await?, both);
    assert_eq!(present(&mut b, "room:1").await?, both);
    assert_eq!(stats(&mut a, "room:1").await?, (2, 1), "two anonymous clients are one user (\"\")");
    let entry = a.ok("presence", json!({ "channel": "room:1" })).await?["clients"][0].clone();
    assert_eq!(entry["user"], "", "{entry}");

    // An unsubscribe leaves; so does a closed connection.
    b.ok("unsubscribe", json!({ "channel": "room:1" })).await?;
    assert_eq!(next_change(&mut a, "leave", "room:1").await?, b_id);
    assert_eq!(present(&mut a, "room:1").await?, vec![a_id.clone()]);
    let (mut c, c_id) = connected(&node).await?;
    c.subscribe("room:1", json!({})).await?;
    assert_eq!(next_change(&mut a, "join", "room:1").await?, c_id);
    drop(c);
    assert_eq!(next_change(&mut a, "leave", "room:1").await?, c_id);
    assert_eq!(stats(&mut a, "room:1").await?, (1, 1));

    // A namespace without presence refuses both requests.
    let code = a.err("presence", json!({ "channel": "other:1" })).await?;
    assert_eq!(code, "bad_request");
    assert_eq!(a.err("presence_stats", json!({ "channel": "other:1" })).await?, "bad_request");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_list_is_bounded_and_stats_still_answer() -> Result<()> {
    let node = Node::start(NAMESPACES);
    let mut clients = Vec::new();
    for _ in 0..3 {
        let (mut c, _) = connected(&node).await?;
        c.subscribe("small:1", json!({})).await?;
        clients.push(c);
    }
    let mut reader = node.client().await;
    wait_clients(&mut reader, "small:1", 3).await?;
    let reply = reader.cmd("presence", json!({ "channel": "small:1" })).await?;
    assert_eq!(error_code(&reply)?, "limit_exceeded");
    assert!(reply["error"]["message"].as_str().unwrap_or_default().contains("over 2 clients"), "{reply}");
    assert_eq!(stats(&mut reader, "small:1").await?, (3, 1));
    // join_leave is off in this namespace: no pushes at all.
    clients[0].publish("small:1", json!("after")).await?;
    let first = clients[0].next_push(DEADLINE).await?;
    assert_eq!(first["push"], "message", "no join push without join_leave: {first}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn no_join_or_leave_pushes_above_the_subscriber_threshold() -> Result<()> {
    let node = Node::start(NAMESPACES);
    let (mut a, a_id) = connected(&node).await?;
    a.subscribe("crowd:1", json!({})).await?;
    assert_eq!(next_change(&mut a, "join", "crowd:1").await?, a_id);
    let (mut b, b_id) = connected(&node).await?;
    b.subscribe("crowd:1", json!({})).await?;
    assert_eq!(next_change(&mut a, "join", "crowd:1").await?, b_id, "two subscribers: pushes");
    // A third subscriber: above join_leave_max_subscribers = 2, its join is not pushed;
    // nor are a fourth's join and leave.
    let (mut c, _) = connected(&node).await?;
    c.subscribe("crowd:1", json!({})).await?;
    wait_clients(&mut a, "crowd:1", 3).await?;
    let (mut d, _) = connected(&node).await?;
    d.subscribe("crowd:1", json!({})).await?;
    wait_clients(&mut a, "crowd:1", 4).await?;
    drop(d);
    wait_clients(&mut a, "crowd:1", 3).await?;
    b.publish("crowd:1", json!("marker")).await?;
    let next = a.next_push(DEADLINE).await?;
    assert_eq!(next["push"], "message", "no join or leave above the threshold: {next}");
    Ok(())
}

const P: u32 = 16;
const SECRET: &str = "correct-horse-battery-staple";

fn start(etcd: &Etcd, cluster: &str, id: &str) -> Node {
    Node::start(&format!("{}secret = \"{SECRET}\"\n", node_config(etcd, cluster, id, P, NAMESPACES)))
}

#[tokio::test]
async fn a_gateway_client_counts_once_and_a_killed_nodes_clients_leave() -> Result<()> {
    let etcd = Etcd::start().await;
    let (n1, n2, mut n3) = (start(&etcd, "p", "n1"), start(&etcd, "p", "n2"), start(&etcd, "p", "n3"));
    let map = wait_converged(&etcd, "p", &[&n1, &n2, &n3], &["n1", "n2", "n3"]).await?;
    let channel: String = (0..)
        .map(|i| format!("room:{i}"))
        .find(|c| map["owners"][partition_of(c, P) as usize] == "n2")
        .expect("some channel");

    // A subscriber through the gateway n1 sees joins from every node (events over the peer
    // wire, in its own dialect).
    let (mut on1, id1) = connected(&n1).await?;
    on1.subscribe(&channel, json!({})).await?;
    assert_eq!(next_change(&mut on1, "join", &channel).await?, id1);
    let (mut on2, id2) = connected(&n2).await?;
    on2.subscribe(&channel, json!({})).await?;
    assert_eq!(next_change(&mut on1, "join", &channel).await?, id2);
    let (mut on3, id3) = connected(&n3).await?;
    on3.subscribe(&channel, json!({})).await?;
    assert_eq!(next_change(&mut on1, "join", &channel).await?, id3);
    // Connection ids are per node: the entries stay apart by client and node.
    wait_clients(&mut on2, &channel, 3).await?;
    let mut reader = n3.client().await;
    assert_eq!(stats(&mut reader, &channel).await?.0, 3, "the gateway's client counts once");
    let listed = present(&mut reader, &channel).await?;
    assert_eq!(listed.len(), 3, "{listed:?}");

    // n3 dies: its client leaves presence within the lease (2 s), with a leave push.
    drop(reader);
    n3.kill9();
    wait_clients(&mut on1, &channel, 2).await?;
    let mut saw_leave = false;
    for push in on1.take_pushes() {
        saw_leave |= push["push"] == "leave" && push["info"]["client"].as_str() == Some(id3.as_str());
    }
    if !saw_leave {
        assert_eq!(next_change(&mut on1, "leave", &channel).await?, id3);
    }
    let mut left = present(&mut on2, &channel).await?;
    left.sort();
    let mut want = vec![id1, id2];
    want.sort();
    assert_eq!(left, want);
    Ok(())
}
