//! Graceful shutdown under load: SIGTERM while publishers are busy.
//!
//! It owns docs/operating.md's shutdown promise: every client gets close code 4100, the process
//! exits 0, and every publish that was acknowledged before the shutdown is in history
//! after a restart. Publishes answered with an error during the shutdown must use
//! `unavailable` (retry); publishes never answered may or may not be stored.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde_json::json;
use switchyard_tests::*;
use tokio::time::Instant;

const PUBLISHERS: usize = 3;
/// Publishes each publisher keeps in flight.
const WINDOW: usize = 8;
/// Acknowledged publishes (all publishers) before SIGTERM is sent.
const ACKS_BEFORE_SIGTERM: usize = 300;

/// What one publisher saw before its connection ended.
struct PublisherRun {
    /// `(offset, seq)` of every acknowledged publish.
    acked: Vec<(u64, u64)>,
    /// Error codes of publishes that were refused.
    errors: Vec<String>,
    /// How the connection ended.
    end: Event,
}

fn channel(p: usize) -> String {
    format!("load:{p}")
}

/// Publishes `{"seq": n}` with `WINDOW` in flight until the connection ends.
async fn publish_until_closed(mut c: Client, channel: String, acks: Arc<AtomicUsize>) -> anyhow::Result<PublisherRun> {
    let mut in_flight = VecDeque::new();
    let mut run = PublisherRun { acked: Vec::new(), errors: Vec::new(), end: Event::Ended(String::new()) };
    let mut seq = 0u64;
    let mut sending = true;
    loop {
        while sending && in_flight.len() < WINDOW {
            match c.send_cmd("publish", json!({ "channel": channel, "data": { "seq": seq } })).await {
                Ok(id) => {
                    in_flight.push_back((id, seq));
                    seq += 1;
                }
                Err(_) => sending = false, // the server is closing; read what is left
            }
        }
        match c.next_event(Instant::now() + DEADLINE).await {
            None => anyhow::bail!("publisher on {channel}: no reply or close within {DEADLINE:?}"),
            Some(Event::Reply(reply)) => {
                let (id, seq) =
                    in_flight.pop_front().ok_or_else(|| anyhow::anyhow!("reply with nothing in flight: {reply}"))?;
                anyhow::ensure!(reply["id"] == id, "replies out of order: expected id {id}, got {reply}");
                match reply_ok(reply.clone()) {
                    Ok(ok) => {
                        run.acked.push((u64_field(&ok, "offset")?, seq));
                        acks.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => run.errors.push(error_code(&reply)?),
                }
            }
            Some(Event::Push(_)) => {}
            Some(Event::Other(text)) => anyhow::bail!("unexpected frame {text}"),
            Some(end) => {
                run.end = end;
                return Ok(run);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_under_load_closes_4100_exits_0_and_keeps_acked_publishes() -> anyhow::Result<()> {
    let mut node = Node::start("");
    let mut subscriber = node.client().await;
    for p in 0..PUBLISHERS {
        subscriber.subscribe(&channel(p), json!({})).await?;
    }
    let acks = Arc::new(AtomicUsize::new(0));
    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let c = node.client().await;
        publishers.push(tokio::spawn(publish_until_closed(c, channel(p), acks.clone())));
    }
    wait_until("publishers to get going", DEADLINE, async || Ok(acks.load(Ordering::Relaxed) >= ACKS_BEFORE_SIGTERM))
        .await?;

    node.sigterm();
    let mut runs = Vec::new();
    for p in publishers {
        runs.push(p.await??);
    }
    let subscriber_close = subscriber.expect_close(DEADLINE).await;
    let status = tokio::task::block_in_place(|| node.wait_exit(DEADLINE));

    for (p, run) in runs.iter().enumerate() {
        assert!(
            matches!(run.end, Event::Close(Some(4100))),
            "publisher {p} ended with {:?}, expected close 4100",
            run.end
        );
        assert!(
            run.errors.iter().all(|e| e == "unavailable"),
            "publisher {p} got errors other than unavailable: {:?}",
            run.errors
        );
    }
    assert_eq!(subscriber_close?, 4100, "subscriber close code");
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM");

    node.restart();
    let mut c = node.client().await;
    for (p, run) in runs.iter().enumerate() {
        let h = c.history_all(&channel(p)).await?;
        assert_contiguous(&h.offsets(), 1)?;
        for &(offset, seq) in &run.acked {
            let m = h.messages.get(offset as usize - 1);
            assert_eq!(
                m.map(|m| &m["data"]),
                Some(&json!({ "seq": seq })),
                "{}: acked offset {offset} lost or changed",
                channel(p)
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn sigint_also_closes_clients_with_4100_and_exits_0() -> anyhow::Result<()> {
    let mut node = Node::start("");
    let mut idle = node.client().await;
    idle.ping().await?;
    node.signal(libc::SIGINT);
    assert_eq!(idle.expect_close(DEADLINE).await?, 4100);
    assert_eq!(tokio::task::block_in_place(|| node.wait_exit(DEADLINE)).code(), Some(0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_with_a_stuck_client_still_exits_0_within_shutdown_timeout() -> anyhow::Result<()> {
    let mut node = Node::start("shutdown_timeout = \"2s\"\n");
    // A subscriber that never reads, with a tiny receive window: its socket fills and its
    // outbound queue holds the rest (2 MB, well under the default queue limits).
    let mut stuck = Client::connect_with_recv_buffer(&node, 4096).await?;
    stuck.subscribe("load:stuck", json!({})).await?;
    let mut publisher = node.client().await;
    let pad = "s".repeat(2000);
    let (acked, epoch) = publisher.publish_many("load:stuck", (0..1000).map(|i| json!({ "i": i, "pad": pad }))).await?;
    drop(publisher);

    let started = tokio::time::Instant::now();
    node.sigterm();
    let status = tokio::task::block_in_place(|| node.wait_exit(DEADLINE));
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM");
    let took = started.elapsed();
    assert!(took < std::time::Duration::from_secs(10), "shutdown took {took:?} with shutdown_timeout 2s");
    drop(stuck);

    node.restart();
    let mut c = node.client().await;
    let h = c.history_all("load:stuck").await?;
    assert_eq!((&h.epoch, h.offsets()), (&epoch, acked));
    Ok(())
}
