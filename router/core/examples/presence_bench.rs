//! Presence at the owner, measured: one channel's presence filled with N members (default
//! 100,000, `PRESENCE_MEMBERS`), then `presence_stats`, a join and a leave, each timed as
//! a caller sees it (through the owner's mailbox, on a real store in a temporary
//! directory). Prints percentiles of each.
//!
//! `cargo run --release -p switchyard-core --example presence_bench`

use std::sync::Arc;
use std::time::Duration;

use switchyard_core::owner::PresenceLimits;
use switchyard_core::partitions::Settings;
use switchyard_core::Partitions;
use switchyard_metrics::Metrics;
use switchyard_proto::presence::PresenceEntry;
use switchyard_store::{FsyncPolicy, Store};
use tokio::time::Instant;

const SAMPLES: usize = 2000;

fn percentiles(name: &str, mut us: Vec<f64>) {
    us.sort_by(f64::total_cmp);
    let at = |q: f64| us[((us.len() - 1) as f64 * q) as usize];
    println!("{name:<16} p50 {:>8.1} µs   p99 {:>8.1} µs   max {:>8.1} µs", at(0.5), at(0.99), at(1.0));
}

#[tokio::main]
async fn main() {
    let members: usize = std::env::var("PRESENCE_MEMBERS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let dir = tempfile::tempdir().expect("a temporary directory");
    let metrics = Arc::new(Metrics::new());
    let store = Store::open(dir.path(), FsyncPolicy::Batch, metrics.clone()).expect("the store opens");
    let settings = Settings {
        partitions: 4,
        idempotency_window: Duration::from_secs(60),
        forward_sealed: false,
        max_reply_bytes: 8 << 20,
        idempotency_max_keys: 100_000,
        idempotency_max_bytes: 16 << 20,
        replica_lag_timeout: Duration::from_secs(2),
        presence: Arc::new(PresenceLimits { join_leave: false, max_list: 1000, join_leave_max_subscribers: 1000 }),
    };
    let parts = Partitions::start(store, metrics, settings).expect("owners start").0;
    let channel = "room:big";
    let p = parts.partition(channel);
    let node: Arc<str> = "n1".into();
    eprintln!("[presence] joining {members} members to {channel}");
    let started = Instant::now();
    for i in 0..members {
        let entry = PresenceEntry::new(format!("c{i}"), format!("u{}", i % (members / 20).max(1)));
        parts.join(p, channel, node.clone(), entry, false).await.expect("join");
        if (i + 1) % 25_000 == 0 {
            eprintln!("[presence] {} joined in {:.1?}", i + 1, started.elapsed());
        }
    }
    println!(
        "{members} members joined in {:.2?} ({:.1} µs each, sequential)",
        started.elapsed(),
        started.elapsed().as_secs_f64() * 1e6 / members as f64
    );
    let stats = parts.presence_stats(p, channel).await.expect("stats");
    println!("stats: {} clients, {} users", stats.num_clients, stats.num_users);

    let mut timed = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let t = Instant::now();
        std::hint::black_box(parts.presence_stats(p, channel).await.expect("stats"));
        timed.push(t.elapsed().as_secs_f64() * 1e6);
    }
    percentiles("presence_stats", timed);
    let (mut joins, mut leaves) = (Vec::with_capacity(SAMPLES), Vec::with_capacity(SAMPLES));
    for i in 0..SAMPLES {
        let client = format!("extra{i}");
        let t = Instant::now();
        parts.join(p, channel, node.clone(), PresenceEntry::new(client.clone(), "x"), true).await.expect("join");
        joins.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        parts.leave(p, channel, node.clone(), &client).await.expect("leave");
        leaves.push(t.elapsed().as_secs_f64() * 1e6);
    }
    percentiles("join", joins);
    percentiles("leave", leaves);
    let t = Instant::now();
    let listed = parts.presence(p, channel).await;
    println!(
        "presence (list) on {members}: {:?} in {:.1?}",
        listed.map(|l| l.len()).map_err(|e| e.message),
        t.elapsed()
    );
}
