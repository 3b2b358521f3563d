//! `switchyard bench readers`: live publish→deliver latency while history readers page
//! through other channels (issue #33). The live part is the `fanout` scenario at a fixed
//! rate (default 10 channels × 10 subscribers, 1,000 publishes/s); alongside it, `--readers`
//! connections (default 500) each ask, one page at a time and without pause, for a page of
//! 1,000 messages of one of `--history-channels` channels (default 10) that were filled
//! beforehand with 1,000 messages of `--history-payload` bytes (default 1,024). It reports
//! the live figures (p50/p99/max, publish→ack, server CPU) and the readers' pages/s and
//! bytes/s over the measured window.
//!
//! The readers run on a runtime of their own, on one thread at a lower priority, so the
//! generator's work on their pages never shows in the live figures (see `start_readers`).
//! It owns the readers and the pre-fill only: the live load and its figures are `run`'s,
//! and it must never start or stop a server. Switchyard's own protocol only: nats-server
//! has no history to read.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::client::{self, Target, Ws};
use super::report::Report;
use super::{run, BenchArgs, Load};

/// Messages in each history channel, and in each page a reader asks for.
const PAGE: usize = 1000;

/// What the readers did.
#[derive(Default)]
struct Counts {
    pages: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
}

/// Runs the scenario: pre-fill, readers, then the live load with the readers running.
pub(crate) async fn run(a: &BenchArgs) -> Result<Report> {
    if a.target != Target::Switchyard {
        bail!("readers speaks Switchyard's own protocol only (nats-server has no history)");
    }
    let history: Vec<String> = (0..a.history_channels).map(|i| format!("{}-history:{i}", a.prefix)).collect();
    prefill(&a.url, &history, a.history_payload).await?;
    let counts = Arc::new(Counts::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let readers = start_readers(a, &history, &counts, stop_rx).await?;
    eprintln!("[readers] {} readers paging {} history channels", a.readers, history.len());
    let load = Load {
        label: a.label.clone().unwrap_or_else(|| format!("readers-{}", a.readers)),
        channels: a.channels.unwrap_or(10),
        subscribers: a.subscribers.unwrap_or(10),
        publishers: a.publishers.unwrap_or(1),
        rate: Some(a.rate.unwrap_or(1000.0)),
        pub_url: a.url.clone(),
        sub_urls: vec![a.url.clone()],
    };
    // The readers' figures cover the live run's measured window: it starts once the
    // subscribers are connected and the warm-up is over, which the live run does not
    // tell; the window is taken as the last `duration` of the live run.
    let live = run::fanout(a, load);
    tokio::pin!(live);
    let measure = async {
        // Wait out the set-up and the warm-up, then count over the window.
        let mut before = None;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = (Instant::now(), counts.pages.load(Relaxed), counts.bytes.load(Relaxed));
            before.get_or_insert(now);
            if now.0.duration_since(before.expect("set").0) >= a.warmup {
                return now;
            }
        }
    };
    // The live run connects its subscribers first; the window is counted from the end of
    // its warm-up as seen here (set-up of 100 connections takes well under a second).
    let start = tokio::select! {
        report = &mut live => return finish(report, a, &counts, None, stop_tx, readers).await,
        start = measure => start,
    };
    let report = live.await;
    finish(report, a, &counts, Some(start), stop_tx, readers).await
}

/// Stops the readers and prints their figures.
async fn finish(
    report: Result<Report>,
    a: &BenchArgs,
    counts: &Counts,
    start: Option<(Instant, u64, u64)>,
    stop_tx: watch::Sender<bool>,
    readers: std::thread::JoinHandle<()>,
) -> Result<Report> {
    let end = (Instant::now(), counts.pages.load(Relaxed), counts.bytes.load(Relaxed));
    let _ = stop_tx.send(true);
    let _ = tokio::task::spawn_blocking(move || readers.join()).await;
    let mut report = report?;
    let (secs, pages, bytes) = match start {
        Some((t, p, b)) => (end.0.duration_since(t).as_secs_f64(), end.1 - p, end.2 - b),
        None => (0.0, 0, 0),
    };
    let line = format!(
        "history readers: {} readers, {:.1} pages/s, {:.1} MB/s over {:.1} s, {} errors",
        a.readers,
        pages as f64 / secs.max(1e-9),
        bytes as f64 / secs.max(1e-9) / 1e6,
        secs,
        counts.errors.load(Relaxed)
    );
    if a.json {
        eprintln!("{line}");
    } else {
        println!("{line}");
    }
    report.warnings.push(line);
    Ok(report)
}

/// Starts the readers on a runtime of their own: one OS thread at a lower CPU priority
/// (nice +10), so that reading 1 MB pages by the hundred per second never delays the
/// live subscribers' runtime, which takes the measurement. (On one runtime, the
/// generator's own queueing behind page frames added tens of milliseconds to the live
/// figures.) Returns once every reader is connected.
async fn start_readers(
    a: &BenchArgs,
    history: &[String],
    counts: &Arc<Counts>,
    stop: watch::Receiver<bool>,
) -> Result<std::thread::JoinHandle<()>> {
    let (url, n, history, counts) = (a.url.clone(), a.readers, history.to_vec(), counts.clone());
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<()>>();
    let thread = std::thread::Builder::new().name("bench-readers".into()).spawn(move || {
        // SAFETY: plain integer arguments; a failure leaves the priority as it was.
        #[allow(unsafe_code)]
        unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            let now = libc::getpriority(libc::PRIO_PROCESS, tid);
            libc::setpriority(libc::PRIO_PROCESS, tid, now + 10);
        }
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(r) => r,
            Err(e) => return drop(ready_tx.send(Err(e.into()))),
        };
        runtime.block_on(async move {
            let mut tasks = Vec::with_capacity(n);
            for i in 0..n {
                let ws = match client::connect(&url, Some(256 * 1024)).await.with_context(|| format!("reader {i}")) {
                    Ok(ws) => ws,
                    Err(e) => return drop(ready_tx.send(Err(e))),
                };
                let channel = history[i % history.len().max(1)].clone();
                tasks.push(tokio::spawn(read_loop(ws, channel, counts.clone(), stop.clone())));
            }
            let _ = ready_tx.send(Ok(()));
            for t in tasks {
                let _ = t.await;
            }
        });
    })?;
    ready_rx.await.context("the readers' thread ended")??;
    Ok(thread)
}

/// Fills each history channel up to [`PAGE`] messages of `payload` bytes (a channel that
/// holds them already is left alone, so runs can follow each other on one server).
async fn prefill(url: &str, channels: &[String], payload: usize) -> Result<()> {
    let mut ws = client::connect(url, Some(1 << 20)).await?;
    let data = json!({ "p": "x".repeat(payload.saturating_sub(8)) });
    let mut id = 0u64;
    for channel in channels {
        id += 1;
        let top = ask(&mut ws, json!({"id": id, "op": "history", "channel": channel, "limit": 0}), id).await?;
        let top = top["result"]["offset"].as_u64().unwrap_or(0) as usize;
        if top >= PAGE {
            continue;
        }
        eprintln!("[readers] filling {channel} with {} messages of {payload} B", PAGE - top);
        let first = id + 1;
        for _ in top..PAGE {
            id += 1;
            let cmd = json!({"id": id, "op": "publish", "channel": channel, "data": data});
            ws.feed(Message::text(cmd.to_string())).await?;
        }
        ws.flush().await?;
        // Every publish is acknowledged before the next channel.
        let mut left = id + 1 - first;
        while left > 0 {
            let v = next_reply(&mut ws).await?;
            if v.get("error").is_some() {
                bail!("pre-fill publish failed: {v}");
            }
            left -= 1;
        }
    }
    Ok(())
}

/// Sends `cmd` and returns the reply with `id`.
async fn ask(ws: &mut Ws, cmd: serde_json::Value, id: u64) -> Result<serde_json::Value> {
    ws.send(Message::text(cmd.to_string())).await?;
    loop {
        let v = next_reply(ws).await?;
        if v["id"].as_u64() == Some(id) {
            if let Some(e) = v.get("error") {
                bail!("{cmd}: {e}");
            }
            return Ok(v);
        }
    }
}

/// The next reply (a text frame with an `id`), within a generous deadline.
async fn next_reply(ws: &mut Ws) -> Result<serde_json::Value> {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), ws.next()).await.context("no reply within 30 s")?;
        match msg {
            Some(Ok(Message::Text(t))) => {
                let v: serde_json::Value = serde_json::from_str(t.as_str())?;
                if v.get("id").is_some() {
                    return Ok(v);
                }
            }
            Some(Ok(Message::Close(f))) => bail!("closed by server: {f:?}"),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => bail!("connection ended"),
        }
    }
}

/// One reader: asks for a page of `channel`, waits for it, asks again, until stopped.
async fn read_loop(mut ws: Ws, channel: String, counts: Arc<Counts>, mut stop: watch::Receiver<bool>) {
    let cmd = json!({"id": 1, "op": "history", "channel": channel, "limit": PAGE}).to_string();
    loop {
        let page = async {
            ws.send(Message::text(cmd.clone())).await?;
            loop {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) => return Ok::<_, anyhow::Error>(t),
                    Some(Ok(Message::Close(f))) => bail!("closed by server: {f:?}"),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e.into()),
                    None => bail!("connection ended"),
                }
            }
        };
        tokio::select! {
            _ = stop.changed() => return,
            page = page => match page {
                // `{"id":1,"error":…` or `{"id":1,"result":…`: only the head is looked at.
                Ok(t) if !t.as_bytes()[..t.len().min(24)].windows(7).any(|w| w == b"\"error\"") => {
                    counts.pages.fetch_add(1, Relaxed);
                    counts.bytes.fetch_add(t.len() as u64, Relaxed);
                }
                Ok(_) => {
                    counts.errors.fetch_add(1, Relaxed);
                }
                Err(_) => {
                    counts.errors.fetch_add(1, Relaxed);
                    return;
                }
            },
        }
    }
}
