//! Hostile and careless clients (#14): each test plays the client an outside attacker or a
//! buggy app would be, against a real router process, and checks the answer it gets and
//! that everyone else is still served.

use std::time::Duration;

use anyhow::{ensure, Result};
use serde_json::{json, Value};
use switchyard_proto::partition::partition_of;
use switchyard_tests::auth::*;
use switchyard_tests::etcd::*;
use switchyard_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn an_oversized_key_or_idempotency_key_is_refused_and_the_connection_stays() -> Result<()> {
    let node = Node::start("[limits]\nmax_key_bytes = 32\n");
    let mut c = node.client().await;
    let long = "k".repeat(33);
    for field in ["key", "idempotency_key"] {
        let reply = c.cmd("publish", json!({"channel": "room:1", "data": 1, field: long})).await?;
        ensure!(error_code(&reply)? == "too_large", "{field}: {reply}");
        let message = reply["error"]["message"].as_str().unwrap_or_default();
        ensure!(message.contains("limits.max_key_bytes"), "the message names the limit: {message}");
    }
    // At the limit it is accepted, and the connection was never dropped.
    let (offset, _) = c.publish("room:1", json!("ok")).await?;
    ensure!(offset == 1, "nothing refused was stored: offset {offset}");
    let at_limit = c.cmd("publish", json!({"channel": "room:1", "data": 2, "key": "k".repeat(32)})).await?;
    reply_ok(at_limit)?;
    // The HTTP API applies the same limit.
    let (status, body) =
        post_json(&node, "/api/v1/publish", &json!({"channel": "room:1", "data": 3, "idempotency_key": long})).await?;
    ensure!(status == 413 && body["error"]["code"] == "too_large", "HTTP: {status} {body}");
    Ok(())
}

#[tokio::test]
async fn a_history_reply_is_capped_in_bytes_and_pages_to_the_end() -> Result<()> {
    // 1 MiB pages; 60 messages of about 60 KB each make 3.6 MB of history.
    let node = Node::start("[limits]\nmax_reply_bytes = 1048576\n");
    let mut c = node.client().await;
    let blob = "x".repeat(60_000);
    for i in 0..60 {
        c.publish("big:1", json!({"i": i, "blob": blob})).await?;
    }
    let first = c.history("big:1", None, Some(1000)).await?;
    let bytes: usize = first.messages.iter().map(|m| m.to_string().len()).sum();
    ensure!(
        first.messages.len() < 60 && bytes <= 1_100_000,
        "one page: {} messages, {bytes} bytes",
        first.messages.len()
    );
    ensure!(first.offset == 60, "a short page names the channel top: {}", first.offset);
    let all = c.history_all("big:1").await?;
    ensure!(all.offsets() == (1..=60).collect::<Vec<_>>(), "paged to the end: {:?}", all.offsets());
    // HTTP history pages the same way.
    let r = http(node.addr(), "GET", "/api/v1/channels/big:1/history?limit=1000", None).await?;
    let page = r.json()?;
    let n = page["messages"].as_array().map_or(0, Vec::len);
    ensure!(r.status == 200 && n > 0 && n < 60, "HTTP page: {} with {n} messages", r.status);
    Ok(())
}

#[tokio::test]
async fn a_form_post_to_the_publish_api_gets_415() -> Result<()> {
    let node = Node::start("");
    let body = "channel=room%3A1&data=1";
    let request = format!(
        "POST /api/v1/publish HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let response = raw_exchange(&node, request.as_bytes()).await?;
    ensure!(response.starts_with("HTTP/1.1 415"), "{response}");
    // JSON still works, and nothing was stored by the form post.
    let (status, ok) = post_json(&node, "/api/v1/publish", &json!({"channel": "room:1", "data": 1})).await?;
    ensure!(status == 200 && ok["offset"] == 1, "{status} {ok}");
    Ok(())
}

#[tokio::test]
async fn past_max_connections_an_upgrade_gets_503_with_retry_after() -> Result<()> {
    let node = Node::start("[limits]\nmax_connections = 2\n");
    let mut a = node.client().await;
    let mut b = node.client().await;
    a.ping().await?;
    b.ping().await?;
    let request = "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                   Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let response = raw_exchange(&node, request.as_bytes()).await?;
    ensure!(response.starts_with("HTTP/1.1 503"), "{response}");
    ensure!(response.to_ascii_lowercase().contains("retry-after: 1"), "{response}");
    // The two inside are still served; when one leaves, a new client gets in.
    a.publish("room:1", json!(1)).await?;
    drop(b);
    wait_until("a seat to free up", DEADLINE, async || {
        // Refused (503) until the server has seen b leave.
        let Ok(mut c) = Client::connect_to(node.addr()).await else { return Ok(false) };
        Ok(c.ping().await.is_ok())
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_half_sent_request_is_dropped_after_the_header_timeout() -> Result<()> {
    let node = Node::start("");
    let mut half = TcpStream::connect(node.addr()).await?;
    half.write_all(b"GET /healthz HTT").await?;
    // The server closes it (header-read timeout, 10 s); the read then ends.
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(Duration::from_secs(20), half.read(&mut buf)).await;
    ensure!(closed.is_ok(), "the half-sent request was still open after 20 s");
    // Meanwhile and after, everyone else is served.
    let mut c = node.client().await;
    c.ping().await?;
    Ok(())
}

/// A partition whose messages carry 60 KB keys and idempotency keys (allowed here by
/// raising the limits) moves to a new owner under a drain, and every message arrives.
/// Before keys counted against the handover budget, such a chunk outgrew the peer frame
/// and the partition came back empty under a new epoch.
#[tokio::test]
async fn a_drained_partition_full_of_large_keys_loses_nothing() -> Result<()> {
    const P: u32 = 4;
    let limits = "[limits]\nmax_frame_bytes = 262144\nmax_key_bytes = 65536\n";
    let config = |etcd: &Etcd, id: &str| {
        format!("{}secret = \"correct-horse-battery-staple\"\n", node_config(etcd, "big", id, P, limits))
    };
    let etcd = Etcd::start().await;
    let (mut n1, n2) = (Node::start(&config(&etcd, "n1")), Node::start(&config(&etcd, "n2")));
    let map = wait_converged(&etcd, "big", &[&n1, &n2], &["n1", "n2"]).await?;
    let channel = (0..)
        .map(|i| format!("keys:{i}"))
        .find(|c| map["owners"][partition_of(c, P) as usize] == "n1")
        .expect("a channel owned by n1");
    let mut c = n1.client().await;
    let total = 700u64;
    for i in 0..total {
        let key = format!("{i}:{}", "k".repeat(60_000));
        let idem = format!("{i}:{}", "i".repeat(60_000));
        let reply =
            c.cmd("publish", json!({"channel": channel, "data": i, "key": key, "idempotency_key": idem})).await?;
        reply_ok(reply)?;
    }
    drop(c);
    n1.sigterm();
    let status = n1.wait_exit(DEADLINE * 3);
    ensure!(status.success(), "n1 exited with {status}");
    let mut c = n2.client().await;
    let h = c.history_all(&channel).await?;
    ensure!(h.offsets() == (1..=total).collect::<Vec<_>>(), "{} of {total} messages after the move", h.messages.len());
    let data: Vec<Value> = datas(&h.messages);
    ensure!(data.first() == Some(&json!(0)), "{:?}", data.first());
    Ok(())
}

/// With tokens, durable consumers and idempotency keys belong to the user: bob cannot move
/// alice's consumer by committing the same name, nor swallow her publish with her key.
#[tokio::test]
async fn two_users_consumers_and_idempotency_keys_are_independent() -> Result<()> {
    let node = Node::start(&jwt_config("", "[namespaces.room]\nrule = \"public\"\n"));
    let mut alice = connect_as(&node, "alice").await?;
    let mut bob = connect_as(&node, "bob").await?;
    for i in 0..5 {
        alice.publish("room:own", json!(i)).await?;
    }
    alice.ok("commit", json!({"channel": "room:own", "consumer": "phone", "offset": 2})).await?;
    bob.ok("commit", json!({"channel": "room:own", "consumer": "phone", "offset": 5})).await?;
    // Alice resumes after her own commit: 3, 4, 5.
    let mut again = connect_as(&node, "alice").await?;
    again.subscribe("room:own", json!({"consumer": "phone"})).await?;
    let got = again.next_messages("room:own", 3).await?;
    ensure!(offsets(&got) == vec![3, 4, 5], "alice's consumer resumed at {:?}", offsets(&got));

    // The same idempotency key from two users is two messages; a repeat by one is one.
    let a = alice.ok("publish", json!({"channel": "room:idem", "data": "a", "idempotency_key": "k1"})).await?;
    let b = bob.ok("publish", json!({"channel": "room:idem", "data": "b", "idempotency_key": "k1"})).await?;
    ensure!(a["offset"] == 1 && b["offset"] == 2, "a {a}, b {b}");
    let a2 = alice.ok("publish", json!({"channel": "room:idem", "data": "a", "idempotency_key": "k1"})).await?;
    ensure!(a2["offset"] == 1, "alice's retry is deduplicated: {a2}");
    let h = alice.history_all("room:idem").await?;
    ensure!(datas(&h.messages) == vec![json!("a"), json!("b")], "{:?}", datas(&h.messages));
    Ok(())
}

/// A client that asks for big replies and never reads them is cut once its socket takes
/// no bytes for `write_timeout`, and its memory is freed; everyone else carries on.
#[tokio::test]
async fn a_client_that_stops_reading_its_replies_is_cut_after_the_write_timeout() -> Result<()> {
    let node = Node::start("[limits]\nwrite_timeout = \"1s\"\n");
    let mut publisher = node.client().await;
    let blob = "x".repeat(60_000);
    for i in 0..40 {
        publisher.publish("big:2", json!({"i": i, "blob": blob})).await?;
    }
    let mut hog = Client::connect_with_recv_buffer(&node, 4096).await?;
    for _ in 0..20 {
        hog.send_cmd("history", json!({"channel": "big:2", "limit": 1000})).await?;
    }
    wait_until("the non-reading client to be closed", DEADLINE, async || {
        let m = metrics(&node).await?;
        Ok(m.value("switchyard_connections", &[]) == Some(1.0))
    })
    .await?;
    publisher.publish("big:2", json!("still served")).await?;
    drop(hog);
    Ok(())
}

/// Reads are free: 1,000 history probes of channels that do not exist (and subscriptions
/// that come and go) leave the channel count and the data directory as they were, and a
/// restart recovers only the channel that was written.
#[tokio::test]
async fn a_thousand_history_probes_leave_no_channels_and_no_disk_behind() -> Result<()> {
    let mut node = Node::start("");
    let mut c = node.client().await;
    c.publish("room:real", json!("kept")).await?;
    let channels = |m: &Metrics| m.sum("switchyard_partition_channels").unwrap_or(0.0);
    let before = channels(&metrics(&node).await?);
    let disk_before = dir_size(&node.data_dir());
    for i in 0..1000 {
        let h = c.history(&format!("probe:{i}"), None, None).await?;
        ensure!(h.messages.is_empty() && h.offset == 0, "probe {i}: {h:?}");
    }
    for i in 0..100 {
        let ch = format!("peek:{i}");
        c.subscribe(&ch, json!({})).await?;
        c.ok("unsubscribe", json!({"channel": ch})).await?;
        let r = http(node.addr(), "GET", &format!("/api/v1/channels/http:{i}/history"), None).await?;
        ensure!(r.status == 200, "HTTP probe {i}: {}", r.status);
    }
    let after = channels(&metrics(&node).await?);
    ensure!(after == before, "channels in memory: {before} before the probes, {after} after");
    let disk_after = dir_size(&node.data_dir());
    ensure!(disk_after <= disk_before + 64 * 1024, "data dir grew from {disk_before} to {disk_after} bytes");
    drop(c);
    node.restart();
    let mut c = node.client().await;
    ensure!(channels(&metrics(&node).await?) == 1.0, "only room:real was recovered");
    ensure!(c.history_all("room:real").await?.messages.len() == 1);
    Ok(())
}

fn dir_size(path: &std::path::Path) -> u64 {
    std::fs::read_dir(path)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_size(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// Idempotency keys spread over many channels cannot grow a node's memory without bound:
/// past `publish.idempotency_max_keys` new keys are not remembered (and counted), while
/// keys already held keep deduplicating.
#[tokio::test]
async fn idempotency_keys_over_many_channels_stay_within_the_node_budget() -> Result<()> {
    let node = Node::start("[publish]\nidempotency_max_keys = 10\n");
    let mut c = node.client().await;
    for i in 0..20 {
        c.ok("publish", json!({"channel": format!("spread:{i}"), "data": i, "idempotency_key": "k"})).await?;
    }
    let m = metrics(&node).await?;
    let unremembered = m.value("switchyard_idempotency_unremembered_total", &[]).unwrap_or(0.0);
    ensure!(unremembered == 10.0, "10 keys over the budget, {unremembered} counted");
    // Held keys still deduplicate; the ones past the budget do not.
    let held = c.ok("publish", json!({"channel": "spread:3", "data": 3, "idempotency_key": "k"})).await?;
    ensure!(held["offset"] == 1, "a held key deduplicates: {held}");
    let past = c.ok("publish", json!({"channel": "spread:15", "data": 15, "idempotency_key": "k"})).await?;
    ensure!(past["offset"] == 2, "a key past the budget was not remembered: {past}");
    Ok(())
}

/// With its file descriptors exhausted (`prlimit` on the running node), the accept loop
/// backs off instead of spinning, and once connections go away it serves new clients.
#[tokio::test]
async fn out_of_file_descriptors_the_node_backs_off_and_serves_again() -> Result<()> {
    let node = Node::start("");
    let pid = node.pid().expect("running");
    let limited = std::process::Command::new("prlimit").arg(format!("--pid={pid}")).arg("--nofile=128:128").status()?;
    ensure!(limited.success(), "prlimit failed");
    let mut client = node.client().await;
    client.ping().await?;
    // Idle TCP connections until the node runs out of descriptors (the rest wait in the
    // listen backlog).
    let mut held = Vec::new();
    for _ in 0..250 {
        if let Ok(s) = TcpStream::connect(node.addr()).await {
            held.push(s);
        }
    }
    let backoffs = |n: &Node| n.stderr().matches("out of file descriptors").count();
    wait_until("the accept loop to hit EMFILE and back off", DEADLINE, async || Ok(backoffs(&node) >= 3)).await?;
    // A spinning loop logs an error per attempt: thousands in the time a back-off logs a few.
    let logged = backoffs(&node);
    let spins = node.stderr().matches("accept failed").count();
    ensure!(logged < 200 && spins == 0, "{logged} back-off lines and {spins} accept failures");
    // The connection that was already in keeps working meanwhile.
    client.publish("room:fd", json!(1)).await?;
    drop(held);
    wait_until("a new client to be served again", DEADLINE, async || {
        let Ok(mut c) = Client::connect_to(node.addr()).await else { return Ok(false) };
        Ok(c.ping().await.is_ok())
    })
    .await?;
    Ok(())
}

/// Sends raw bytes on a new connection and reads the whole answer as text.
async fn raw_exchange(node: &Node, request: &[u8]) -> Result<String> {
    let mut s = TcpStream::connect(node.addr()).await?;
    s.write_all(request).await?;
    let mut out = Vec::new();
    let read = tokio::time::timeout(DEADLINE, async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
            // An upgrade refusal with keep-alive may leave the socket open: stop at the body.
            if out.windows(4).any(|w| w == b"\r\n\r\n") && out.ends_with(b"}") {
                break;
            }
        }
    })
    .await;
    ensure!(read.is_ok() || !out.is_empty(), "no answer within the deadline");
    Ok(String::from_utf8_lossy(&out).into_owned())
}
