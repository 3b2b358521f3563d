//! The `storm` scenario: a reconnect storm. N subscribed clients (`--count`, default
//! 10,000) are spread over `--sub-urls`, `--subscribers` of them (default 10) on each
//! channel, while one publisher on `--pub-url` (default the first sub URL) keeps a steady
//! `--rate` (default 1,000/s). Every client tracks the `{offset, epoch}` of the last message
//! it got and checks each push against it (a jump is a gap, a repeat a duplicate). After the
//! warm-up the scenario kills one server with SIGKILL (`--kill-pid`; its URL is
//! `--kill-url`, default the last sub URL), and that node's clients reconnect at once to the
//! next URL and recover with `from: {offset, epoch}`. It reports, per client of the killed
//! node, the time from the kill until it was subscribed again and had every message up to
//! its subscribe reply's offset (p50/p99/max); gaps, duplicates and unrecovered positions
//! over all clients; `unsubscribed` pushes (clients told to resubscribe) and refusals
//! (`unavailable`, retried after `retry_after_ms`); and the servers' CPU (from
//! `/proc/<pid>/stat` of `--server-pids`) per recovered client next to the CPU per fresh
//! connect+subscribe measured while setting up the same run. At the end every client must
//! hold every message the publisher had acknowledged on its channel.
//!
//! It owns only this scenario's clients and figures; it never starts a server, and the one
//! process it signals is the `--kill-pid` it is given.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{connect, Ws};
use crate::sys;
use crate::BenchArgs;

/// The storm's own flags (the others are shared with every scenario).
#[derive(Args, Debug, Clone, Default)]
pub struct StormArgs {
    /// storm: the server process to kill (SIGKILL) after the warm-up.
    #[arg(long)]
    pub kill_pid: Option<u32>,
    /// storm: the URL of the node `--kill-pid` serves (default the last of --sub-urls).
    #[arg(long)]
    pub kill_url: Option<String>,
    /// storm: every server process, for CPU figures (comma-separated; the killed one may be
    /// among them).
    #[arg(long, value_delimiter = ',')]
    pub server_pids: Vec<u32>,
}

/// How long one connect, subscribe or catch-up may take before the client starts over.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the end waits for every client to hold every acknowledged message.
const DRAIN: Duration = Duration::from_secs(10);

/// The run's figures, printed as one JSON object with `--json`.
#[derive(Debug, Serialize)]
pub(crate) struct StormReport {
    pub scenario: &'static str,
    pub clients: usize,
    pub channels: usize,
    pub nodes: usize,
    pub rate: f64,
    /// Clients connected to the killed node when it was killed.
    pub killed_node_clients: usize,
    /// Of those, how many reconnected and recovered before the deadline.
    pub recovered: usize,
    /// Time from the kill until a client of the killed node had recovered, in ms.
    pub recover_ms_p50: f64,
    pub recover_ms_p99: f64,
    pub recover_ms_max: f64,
    /// Time from the kill until the last of them had recovered, in ms.
    pub all_recovered_ms: f64,
    pub gaps: u64,
    pub duplicates: u64,
    /// Subscribes answered `recovered: false` (their position was lost).
    pub unrecovered: u64,
    /// `unsubscribed` pushes received (clients told to resubscribe).
    pub told_to_resubscribe: u64,
    /// Subscribes refused with `unavailable` (and retried).
    pub refused: u64,
    /// Refusals that carried a `retry_after_ms` hint.
    pub refused_with_hint: u64,
    /// Connections that ended and were opened again.
    pub reconnects: u64,
    /// Clients that at the end lacked messages the publisher had acknowledged.
    pub behind_at_end: usize,
    pub published_ok: u64,
    pub publish_errors: u64,
    /// Server CPU seconds per fresh connect+subscribe (setup of this run), in ms.
    pub cpu_ms_per_connect: Option<f64>,
    /// Server CPU from the kill until all recovered, less the steady rate of the warm-up,
    /// per recovered client, in ms.
    pub cpu_ms_per_recovery: Option<f64>,
    /// The same without subtracting the steady rate.
    pub cpu_ms_per_recovery_gross: Option<f64>,
    /// Every killed-node client recovered, no gap, duplicate or lost position, nobody
    /// behind at the end.
    pub ok: bool,
}

/// What every client shares: counters, positions and the recovery times.
struct Shared {
    kill: OnceLock<Instant>,
    gaps: AtomicU64,
    dups: AtomicU64,
    unrecovered: AtomicU64,
    told: AtomicU64,
    refused: AtomicU64,
    hinted: AtomicU64,
    reconnects: AtomicU64,
    /// Clients subscribed for the first time (setup).
    ready: AtomicUsize,
    /// Each client's last offset.
    last: Vec<AtomicU64>,
    /// Each client's current URL (index into the URLs).
    at: Vec<AtomicUsize>,
    /// Each client: it lost its connection after the kill and has not recovered yet.
    down: Vec<AtomicBool>,
    /// Each client's recovery time after the kill (the last one, if it had to twice).
    recovered: Mutex<Vec<Option<Duration>>>,
    stop: watch::Receiver<bool>,
}

/// Runs the storm and prints its report; true if it holds together.
pub(crate) fn main(args: &BenchArgs) -> Result<bool> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let report = runtime.block_on(run(args))?;
    runtime.shutdown_timeout(Duration::from_secs(1));
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(report.ok)
}

async fn run(args: &BenchArgs) -> Result<StormReport> {
    let s = &args.storm;
    let urls: Vec<String> = if args.sub_urls.is_empty() { vec![args.url.clone()] } else { args.sub_urls.clone() };
    let kill_url = s.kill_url.clone().unwrap_or_else(|| urls.last().expect("urls").clone());
    let Some(kill_at) = urls.iter().position(|u| *u == kill_url) else {
        bail!("--kill-url {kill_url} is not one of --sub-urls");
    };
    let pub_url = args.pub_url.clone().unwrap_or_else(|| urls[0].clone());
    if pub_url == kill_url && s.kill_pid.is_some() {
        bail!("the publisher's node ({pub_url}) is the one to be killed: give another --pub-url");
    }
    let n = args.count;
    let per = args.subscribers.unwrap_or(10).max(1);
    let channels = n.div_ceil(per).max(1);
    let rate = args.rate.unwrap_or(1000.0);
    if n == 0 || !(rate > 0.0 && rate.is_finite()) {
        bail!("--count and --rate must be > 0");
    }
    let (stop_tx, stop) = watch::channel(false);
    let shared = Arc::new(Shared {
        kill: OnceLock::new(),
        gaps: AtomicU64::new(0),
        dups: AtomicU64::new(0),
        unrecovered: AtomicU64::new(0),
        told: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        hinted: AtomicU64::new(0),
        reconnects: AtomicU64::new(0),
        ready: AtomicUsize::new(0),
        last: (0..n).map(|_| AtomicU64::new(0)).collect(),
        at: (0..n).map(|_| AtomicUsize::new(0)).collect(),
        down: (0..n).map(|_| AtomicBool::new(false)).collect(),
        recovered: Mutex::new(vec![None; n]),
        stop,
    });
    let channel = |c: usize| format!("{}:storm:{c}", args.prefix);
    let cpu = || -> Option<f64> { s.server_pids.iter().map(|p| sys::proc_cpu_secs(*p)).sum() };
    let live_cpu = |pids: &[u32]| -> Option<f64> { pids.iter().map(|p| sys::proc_cpu_secs(*p)).sum() };

    // Setup: every client connects and subscribes (a bounded number at a time).
    eprintln!("[storm] {n} clients on {channels} channels over {} nodes; connecting", urls.len());
    let cpu_before_setup = cpu();
    let setup_started = Instant::now();
    let gate = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let urls = Arc::new(urls);
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let (shared, urls, gate, ch) = (shared.clone(), urls.clone(), gate.clone(), channel(i % channels));
        shared.at[i].store(i % urls.len(), Relaxed);
        tasks.push(tokio::spawn(async move { client(i, ch, urls, shared, gate).await }));
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let ready = shared.ready.load(Relaxed);
        eprintln!("[storm] subscribed {ready}/{n}");
        if ready == n {
            break;
        }
        if setup_started.elapsed() > Duration::from_secs(120) {
            bail!("only {ready} of {n} clients subscribed within 120 s");
        }
    }
    let cpu_after_setup = cpu();
    let cpu_ms_per_connect = cpu_before_setup.zip(cpu_after_setup).map(|(a, b)| (b - a) * 1000.0 / n as f64);
    eprintln!(
        "[storm] all subscribed in {:.1} s; publishing {rate}/s from {pub_url}",
        setup_started.elapsed().as_secs_f64()
    );

    // The publisher, and the acknowledged top of every channel.
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..channels).map(|_| AtomicU64::new(0)).collect());
    let (pub_ok, pub_err) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (pub_stop_tx, pub_stop) = watch::channel(false);
    let publisher = tokio::spawn(publish(
        pub_url.clone(),
        channels,
        rate,
        args.prefix.clone(),
        acked.clone(),
        pub_ok.clone(),
        pub_err.clone(),
        pub_stop,
    ));

    // Warm-up: the steady CPU rate of the servers that will survive.
    let survivors: Vec<u32> = s.server_pids.iter().copied().filter(|p| Some(*p) != s.kill_pid).collect();
    let warm_cpu0 = live_cpu(&survivors);
    let warm0 = Instant::now();
    tokio::time::sleep(args.warmup).await;
    let steady = live_cpu(&survivors).zip(warm_cpu0).map(|(b, a)| (b - a) / warm0.elapsed().as_secs_f64());

    // The kill.
    let expected: Vec<usize> = (0..n).filter(|i| shared.at[*i].load(Relaxed) == kill_at).collect();
    let cpu_kill = live_cpu(&survivors);
    let killed = Instant::now();
    let _ = shared.kill.set(killed);
    match s.kill_pid {
        Some(pid) => {
            eprintln!("[storm] killing pid {pid} ({kill_url}): {} clients on it", expected.len());
            #[allow(unsafe_code)]
            // SAFETY: kill(2) with a pid and a signal number has no memory preconditions.
            let rc = unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            if rc != 0 {
                bail!("kill {pid}: {}", std::io::Error::last_os_error());
            }
        }
        None => eprintln!("[storm] no --kill-pid: measuring a quiet run"),
    }

    // Until every client of the killed node has recovered, or the deadline.
    let deadline = killed + args.duration;
    let mut all_recovered = None;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut last_print = Instant::now();
    loop {
        tick.tick().await;
        let times = shared.recovered.lock().expect("times").clone();
        let done = expected.iter().filter(|i| times[**i].is_some() && !shared.down[**i].load(Relaxed)).count();
        if last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            eprintln!(
                "[storm] +{:.1} s: recovered {done}/{}; gaps {} dups {} told {} refused {}",
                killed.elapsed().as_secs_f64(),
                expected.len(),
                shared.gaps.load(Relaxed),
                shared.dups.load(Relaxed),
                shared.told.load(Relaxed),
                shared.refused.load(Relaxed)
            );
        }
        if s.kill_pid.is_none() || done == expected.len() {
            let last = expected.iter().filter_map(|i| times[*i]).max().unwrap_or_default();
            all_recovered = Some(last);
            break;
        }
        if Instant::now() >= deadline {
            break;
        }
    }
    let cpu_done = live_cpu(&survivors);
    let storm_secs = killed.elapsed().as_secs_f64();

    // A little more steady traffic, then the end: every client must catch up.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _ = pub_stop_tx.send(true);
    let _ = publisher.await;
    let drain = Instant::now() + DRAIN;
    let behind = loop {
        let behind = (0..n).filter(|i| shared.last[*i].load(Relaxed) < acked[i % channels].load(Relaxed)).count();
        if behind == 0 || Instant::now() >= drain {
            break behind;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let _ = stop_tx.send(true);
    for t in tasks {
        t.abort();
    }

    let times = shared.recovered.lock().expect("times").clone();
    let mut ms: Vec<f64> = expected.iter().filter_map(|i| times[*i]).map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    let pct = |q: f64| if ms.is_empty() { 0.0 } else { ms[((ms.len() - 1) as f64 * q).round() as usize] };
    let recovered = ms.len();
    let gross = cpu_kill.zip(cpu_done).map(|(a, b)| b - a);
    let per = |cpu: f64| (recovered > 0).then(|| cpu * 1000.0 / recovered as f64);
    let report = StormReport {
        scenario: "storm",
        clients: n,
        channels,
        nodes: urls.len(),
        rate,
        killed_node_clients: expected.len(),
        recovered,
        recover_ms_p50: pct(0.5),
        recover_ms_p99: pct(0.99),
        recover_ms_max: ms.last().copied().unwrap_or(0.0),
        all_recovered_ms: all_recovered.map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0),
        gaps: shared.gaps.load(Relaxed),
        duplicates: shared.dups.load(Relaxed),
        unrecovered: shared.unrecovered.load(Relaxed),
        told_to_resubscribe: shared.told.load(Relaxed),
        refused: shared.refused.load(Relaxed),
        refused_with_hint: shared.hinted.load(Relaxed),
        reconnects: shared.reconnects.load(Relaxed),
        behind_at_end: behind,
        published_ok: pub_ok.load(Relaxed),
        publish_errors: pub_err.load(Relaxed),
        cpu_ms_per_connect,
        cpu_ms_per_recovery: gross.zip(steady).and_then(|(g, r)| per((g - r * storm_secs).max(0.0))),
        cpu_ms_per_recovery_gross: gross.and_then(per),
        ok: false,
    };
    let ok = recovered == expected.len()
        && report.gaps == 0
        && report.duplicates == 0
        && report.unrecovered == 0
        && behind == 0;
    Ok(StormReport { ok, ..report })
}

/// One client: connects to its node, subscribes (recovering from its last position once it
/// has one), checks every push, and on a lost connection moves on to the next node.
async fn client(i: usize, channel: String, urls: Arc<Vec<String>>, shared: Arc<Shared>, gate: Arc<Semaphore>) {
    let mut pos: Option<(u64, String)> = None;
    let mut setup = Some(gate.acquire_owned().await);
    let mut failures = 0u32;
    let mut stop = shared.stop.clone();
    loop {
        let at = shared.at[i].load(Relaxed);
        let began = Instant::now();
        let result = tokio::select! {
            r = session(i, &channel, &urls[at], &mut pos, &shared, &mut setup) => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        if let Err(e) = result {
            note_error(i, &e);
        }
        // The connection is gone: down if the kill caused it, then the next node.
        if shared.kill.get().is_some() {
            shared.down[i].store(true, Relaxed);
        }
        shared.reconnects.fetch_add(1, Relaxed);
        shared.at[i].store((at + 1) % urls.len(), Relaxed);
        // At once the first time; then a backoff with jitter.
        if began.elapsed() > Duration::from_secs(2) {
            failures = 0;
        }
        if failures > 0 {
            let base = 50u64 << failures.min(4);
            tokio::time::sleep(Duration::from_millis(base + jitter(i, failures) % base)).await;
        }
        failures += 1;
    }
}

/// Errors of a client's connection are expected in a storm: only the first few are shown.
fn note_error(i: usize, e: &anyhow::Error) {
    static SHOWN: AtomicUsize = AtomicUsize::new(0);
    if SHOWN.fetch_add(1, Relaxed) < 5 {
        eprintln!("[storm] client {i}: {e:#}");
    }
}

/// A cheap deterministic spread for backoffs.
fn jitter(i: usize, k: u32) -> u64 {
    let mut x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(k).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 31;
    x
}

/// One connection's life: subscribe, then read until it ends.
async fn session(
    i: usize,
    channel: &str,
    url: &str,
    pos: &mut Option<(u64, String)>,
    shared: &Shared,
    setup: &mut Option<Result<tokio::sync::OwnedSemaphorePermit, tokio::sync::AcquireError>>,
) -> Result<()> {
    let mut ws = tokio::time::timeout(STEP_TIMEOUT, connect(url, None)).await??;
    let mut id = 0u64;
    subscribe(&mut ws, &mut id, channel, pos).await?;
    // Where the stream must reach before this (re)subscription counts as recovered.
    let mut target: Option<u64> = None;
    loop {
        let frame = match tokio::time::timeout(STEP_TIMEOUT, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => t,
            Ok(Some(Ok(Message::Close(f)))) => bail!("closed by {url}: {f:?}"),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => return Err(e.into()),
            Ok(None) => bail!("{url} ended the connection"),
            // Quiet is fine while the publisher runs slowly; the server pings.
            Err(_) => continue,
        };
        for line in frame.as_str().split('\n').filter(|l| !l.is_empty()) {
            let v: Value = serde_json::from_str(line)?;
            match v.get("push").and_then(Value::as_str) {
                Some("message") => {
                    let offset = v["offset"].as_u64().unwrap_or(0);
                    let epoch = v["epoch"].as_str().unwrap_or("");
                    match pos {
                        Some((last, e)) if e == epoch => {
                            if offset <= *last {
                                shared.dups.fetch_add(1, Relaxed);
                                continue;
                            }
                            if offset != *last + 1 {
                                shared.gaps.fetch_add(1, Relaxed);
                            }
                        }
                        Some(_) => {
                            // A message of another epoch without a `recovered: false`.
                            shared.gaps.fetch_add(1, Relaxed);
                        }
                        None => {}
                    }
                    *pos = Some((offset, epoch.to_string()));
                    shared.last[i].store(offset, Relaxed);
                }
                Some("unsubscribed") => {
                    shared.told.fetch_add(1, Relaxed);
                    target = None;
                    subscribe(&mut ws, &mut id, channel, pos).await?;
                }
                Some("disconnect") => bail!("disconnected by {url}: {line}"),
                Some(_) => {}
                None if v.get("id").and_then(Value::as_u64) == Some(id) => {
                    if let Some(e) = v.get("error") {
                        // Refused (a recovery over the node's bound, or the owner moving):
                        // again after the hint.
                        shared.refused.fetch_add(1, Relaxed);
                        let hint = e.get("retry_after_ms").and_then(Value::as_u64);
                        if hint.is_some() {
                            shared.hinted.fetch_add(1, Relaxed);
                        }
                        let wait = hint.unwrap_or(100) + jitter(i, id as u32) % 100;
                        tokio::time::sleep(Duration::from_millis(wait)).await;
                        subscribe(&mut ws, &mut id, channel, pos).await?;
                        continue;
                    }
                    let ok = &v["ok"];
                    let epoch = ok["epoch"].as_str().unwrap_or("").to_string();
                    let top = ok["offset"].as_u64().unwrap_or(0);
                    if ok["recovered"] == json!(false) {
                        shared.unrecovered.fetch_add(1, Relaxed);
                        *pos = Some((top, epoch));
                        shared.last[i].store(top, Relaxed);
                    } else if pos.is_none() {
                        *pos = Some((top, epoch));
                        shared.last[i].store(top, Relaxed);
                    }
                    target = Some(top);
                    if setup.take().is_some() {
                        shared.ready.fetch_add(1, Relaxed);
                    }
                }
                None => {}
            }
        }
        if let Some(t) = target {
            if pos.as_ref().is_some_and(|(last, _)| *last >= t) {
                target = None;
                if let Some(kill) = shared.kill.get() {
                    if shared.down[i].swap(false, Relaxed) {
                        shared.recovered.lock().expect("times")[i] = Some(kill.elapsed());
                    }
                }
            }
        }
    }
}

/// Sends a subscribe with the next id, recovering from `pos` if there is one.
async fn subscribe(ws: &mut Ws, id: &mut u64, channel: &str, pos: &Option<(u64, String)>) -> Result<()> {
    *id += 1;
    let mut cmd = json!({"id": *id, "op": "subscribe", "channel": channel});
    if let Some((offset, epoch)) = pos {
        cmd["from"] = json!({"offset": offset, "epoch": epoch});
    }
    ws.send(Message::text(cmd.to_string())).await?;
    Ok(())
}

/// Publishes round-robin over the channels at `rate`, without waiting for replies; records
/// each channel's highest acknowledged offset. Reconnects if its connection drops.
#[allow(clippy::too_many_arguments)]
async fn publish(
    url: String,
    channels: usize,
    rate: f64,
    prefix: String,
    acked: Arc<Vec<AtomicU64>>,
    ok: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) {
    let mut next = 0u64;
    let tick = Duration::from_millis(10);
    let per_tick = rate * tick.as_secs_f64();
    while !*stop.borrow() {
        let Ok(Ok(ws)) = tokio::time::timeout(STEP_TIMEOUT, connect(&url, None)).await else {
            errors.fetch_add(1, Relaxed);
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (mut tx, mut rx) = ws.split();
        let (acked, ok, errors) = (acked.clone(), ok.clone(), errors.clone());
        let reader = tokio::spawn(async move {
            while let Some(Ok(m)) = rx.next().await {
                let Message::Text(t) = m else { continue };
                for line in t.as_str().split('\n').filter(|l| !l.is_empty()) {
                    let Ok(v) = serde_json::from_str::<Value>(line) else { continue };
                    let Some(id) = v.get("id").and_then(Value::as_u64) else { continue };
                    match v["ok"]["offset"].as_u64() {
                        Some(offset) => {
                            ok.fetch_add(1, Relaxed);
                            acked[(id as usize) % channels].fetch_max(offset, Relaxed);
                        }
                        None => {
                            errors.fetch_add(1, Relaxed);
                        }
                    }
                }
            }
        });
        let mut timer = tokio::time::interval(tick);
        let mut owed = 0.0;
        loop {
            tokio::select! {
                _ = timer.tick() => {}
                _ = stop.wait_for(|s| *s) => break,
            }
            owed += per_tick;
            let mut failed = false;
            while owed >= 1.0 {
                owed -= 1.0;
                let c = (next as usize) % channels;
                let cmd =
                    json!({"id": next, "op": "publish", "channel": format!("{prefix}:storm:{c}"), "data": {"n": next}});
                next += 1;
                if tx.feed(Message::text(cmd.to_string())).await.is_err() {
                    failed = true;
                    break;
                }
            }
            if failed || tx.flush().await.is_err() {
                break;
            }
        }
        // Let the last replies in (a missing one only lowers the acknowledged tops).
        tokio::time::sleep(Duration::from_secs(1)).await;
        reader.abort();
        drop(tx);
    }
}
