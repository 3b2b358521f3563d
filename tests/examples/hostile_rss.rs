//! Memory under hostile clients (#14): a node's RSS before, during and after each hostile
//! scenario, which must come back to (near) its baseline.
//!
//! `cargo build --release -p switchyard && SWITCHYARD_BIN=target/release/switchyard \
//!  cargo run --release -p switchyard-tests --example hostile_rss`
//!
//! One standalone node (a real process, loopback, a temporary data dir) with
//! `publish.idempotency_max_keys = 50000`. Scenarios, in order:
//! 1. 10,000 `history` probes of channels that do not exist;
//! 2. 200,000 publishes, each with its own 200-byte idempotency key, over 1,000 channels
//!    (four times the node's key budget);
//! 3. a client that pipelines 200 `history` reads of 1 MiB pages and reads nothing, then
//!    disconnects;
//! 4. 1,000 TCP connections that send half a request line, then close.
//!
//! Prints VmRSS (MiB) after each step. RSS is what the kernel reports: freed heap is not
//! always returned to it, so "after" is compared with the peak, not only the baseline.

use std::time::Duration;

use anyhow::Result;
use serde_json::json;
use switchyard_tests::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

#[tokio::main]
async fn main() -> Result<()> {
    let node = Node::start(
        "[publish]\nidempotency_max_keys = 50000\n[limits]\nmax_reply_bytes = 1048576\nwrite_timeout = \"5s\"\n",
    );
    let pid = node.pid().expect("running");
    let report = |step: &str| println!("{step:<64} {:>8.1} MiB", rss_mib(pid));
    let settle = || tokio::time::sleep(Duration::from_secs(2));
    let mut c = node.client().await;
    c.publish("room:base", json!("x")).await?;
    settle().await;
    report("baseline (started, one publish)");

    eprintln!("[hostile_rss] 1. 10,000 history probes");
    for i in 0..10_000 {
        c.history(&format!("probe:{i}"), None, None).await?;
    }
    report("1. after 10,000 history probes of unknown channels");

    eprintln!("[hostile_rss] 2. 200,000 keyed publishes");
    let idem_tail = "i".repeat(190);
    for i in 0..200_000u64 {
        let id = c.send_cmd("publish", json!({"channel": format!("keys:{}", i % 1000), "data": i, "idempotency_key": format!("{i:08}{idem_tail}")})).await?;
        if i % 256 == 255 {
            c.wait_reply(id).await?;
        }
        if i % 50_000 == 49_999 {
            eprintln!("[hostile_rss]    {} published", i + 1);
        }
    }
    c.ping().await?;
    report("2. after 200,000 unique 200-byte idempotency keys (budget 50,000)");
    let m = metrics(&node).await?;
    println!(
        "   keys not remembered (budget spent): {}",
        m.value("switchyard_idempotency_unremembered_total", &[]).unwrap_or(0.0)
    );

    eprintln!("[hostile_rss] 3. a non-reading client pipelining 200 reads of 1 MiB pages");
    let blob = "x".repeat(60_000);
    for i in 0..40 {
        c.publish("big:1", json!({"i": i, "blob": blob})).await?;
    }
    let mut hog = Client::connect_with_recv_buffer(&node, 4096).await?;
    for _ in 0..200 {
        hog.send_cmd("history", json!({"channel": "big:1", "limit": 1000})).await?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    report("3. while a client holds 200 unread 1 MiB history replies");
    drop(hog);
    settle().await;
    settle().await;
    settle().await;
    report("3. after it is gone (write_timeout 5 s)");

    eprintln!("[hostile_rss] 4. 1,000 half-sent requests");
    let mut half = Vec::new();
    for _ in 0..1000 {
        let mut s = TcpStream::connect(node.addr()).await?;
        s.write_all(b"GET /healthz HTT").await?;
        half.push(s);
    }
    settle().await;
    report("4. while 1,000 half-sent requests are open");
    drop(half);
    settle().await;
    report("4. after they close");
    c.ping().await?;
    Ok(())
}
