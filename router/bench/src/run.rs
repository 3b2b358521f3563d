//! The scenarios: opening subscribers (spread over tasks and URLs), driving publishers
//! at a fixed rate or as fast as acknowledged, the warm-up and measurement window, the
//! once-a-second progress lines on stderr, the drain, and assembling the [`Report`]. It
//! must never print anything but progress and warnings (the caller prints the result),
//! and every wait in it is bounded.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

use anyhow::{bail, Result};
use hdrhistogram::Histogram;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use super::client::{self, extract_timestamp, AckStats, Conn, Flow, Publisher, Target, Template};
use super::report::{new_hist, ConnReport, LatencySummary, Params, Report, Totals};
use super::sys::{self, now_micros};
use super::{BenchArgs, Load};

/// Histogram shards the subscriber tasks record into.
const SHARDS: usize = 16;
/// Latencies a subscriber collects before taking a shard's lock.
const BATCH: usize = 256;
/// How long the drain waits for outstanding deliveries and acknowledgements.
const DRAIN: Duration = Duration::from_secs(5);

/// State shared by every subscriber task of a run.
struct SubShared {
    delivered: AtomicU64,
    closed: AtomicU64,
    /// Publish timestamps (µs) in [start, end) are recorded in the latency histogram.
    window_start: AtomicU64,
    window_end: AtomicU64,
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl SubShared {
    fn new() -> Arc<SubShared> {
        Arc::new(SubShared {
            delivered: AtomicU64::new(0),
            closed: AtomicU64::new(0),
            window_start: AtomicU64::new(u64::MAX),
            window_end: AtomicU64::new(u64::MAX),
            shards: (0..SHARDS).map(|_| Mutex::new(new_hist())).collect(),
        })
    }

    fn flush(&self, shard: usize, batch: &mut Vec<u64>) {
        if batch.is_empty() {
            return;
        }
        let mut h = self.shards[shard % SHARDS].lock().unwrap();
        for v in batch.drain(..) {
            h.saturating_record(v);
        }
    }

    fn merged(&self) -> Histogram<u64> {
        let mut all = new_hist();
        for s in &self.shards {
            let _ = all.add(&*s.lock().unwrap());
        }
        all
    }
}

/// A subscriber's body: count deliveries, record latencies of in-window publishes.
async fn hold(target: Target, conn: Conn, stop: watch::Receiver<bool>, shared: Arc<SubShared>, shard: usize) {
    let mut batch = Vec::with_capacity(BATCH);
    let res = client::read_deliveries(target, conn, stop, |bytes| {
        let now = now_micros();
        shared.delivered.fetch_add(1, Relaxed);
        if let Some(t) = extract_timestamp(bytes) {
            if t >= shared.window_start.load(Relaxed) && t < shared.window_end.load(Relaxed) {
                batch.push(now.saturating_sub(t).max(1));
                if batch.len() >= BATCH {
                    shared.flush(shard, &mut batch);
                }
            }
        }
    })
    .await;
    shared.flush(shard, &mut batch);
    if let Err(e) = res {
        if shared.closed.fetch_add(1, Relaxed) < 5 {
            eprintln!("[bench] subscriber ended: {e}");
        }
    }
}

/// Subscribers that came up, and their tasks.
struct Subscribers {
    opened: usize,
    failed: usize,
    secs: f64,
    /// Subscribers per channel index.
    per_channel: Arc<Vec<AtomicU64>>,
    tasks: Vec<JoinHandle<()>>,
}

/// Opens `n` subscribers, `concurrency` at a time; subscriber `i` goes to
/// `urls[i % urls.len()]` on channel `i % channels`. Each runs [`hold`] in its own task.
#[allow(clippy::too_many_arguments)]
async fn open_subscribers(
    label: &str,
    target: Target,
    urls: &[String],
    prefix: &str,
    channels: usize,
    n: usize,
    concurrency: usize,
    read_buffer: Option<usize>,
    shared: &Arc<SubShared>,
    stop: &watch::Receiver<bool>,
) -> Result<Subscribers> {
    let next = Arc::new(AtomicUsize::new(0));
    let opened = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let per_channel: Arc<Vec<AtomicU64>> = Arc::new((0..channels).map(|_| AtomicU64::new(0)).collect());
    let tasks = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let urls = Arc::new(urls.to_vec());
    let mut connectors = Vec::new();
    for _ in 0..concurrency.max(1).min(n.max(1)) {
        let (next, opened, failed, per_channel, tasks, urls) =
            (next.clone(), opened.clone(), failed.clone(), per_channel.clone(), tasks.clone(), urls.clone());
        let (shared, stop, prefix) = (shared.clone(), stop.clone(), prefix.to_string());
        connectors.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Relaxed);
                if i >= n {
                    break;
                }
                let ch = i % channels;
                let url = &urls[i % urls.len()];
                match client::subscribe(target, url, &target.channel(&prefix, ch), read_buffer).await {
                    Ok(conn) => {
                        per_channel[ch].fetch_add(1, Relaxed);
                        opened.fetch_add(1, Relaxed);
                        let task = tokio::spawn(hold(target, conn, stop.clone(), shared.clone(), i));
                        tasks.lock().unwrap().push(task);
                    }
                    Err(e) => {
                        if failed.fetch_add(1, Relaxed) < 5 {
                            eprintln!("[bench] subscriber {i} failed: {e:#}");
                        }
                    }
                }
            }
        }));
    }
    let start = Instant::now();
    let all_done = futures_util::future::join_all(connectors);
    tokio::pin!(all_done);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = &mut all_done => break,
            _ = tick.tick() => {
                let o = opened.load(Relaxed);
                eprintln!("[{label}] {:>5.1}s connecting: {o}/{n} open, {} failed ({:.0}/s)",
                    start.elapsed().as_secs_f64(), failed.load(Relaxed), o as f64 / start.elapsed().as_secs_f64());
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let (o, f) = (opened.load(Relaxed), failed.load(Relaxed));
    eprintln!("[{label}] {o}/{n} subscribers open in {secs:.2}s ({f} failed)");
    if o == 0 && n > 0 {
        bail!("no subscriber could be opened ({})", urls.join(", "));
    }
    let tasks = std::mem::take(&mut *tasks.lock().unwrap());
    Ok(Subscribers { opened: o, failed: f, secs, per_channel, tasks })
}

/// One reading of the counters and clocks.
struct Snap {
    at: Instant,
    acked: u64,
    delivered: u64,
    server_cpu: Option<f64>,
    self_cpu: f64,
}

/// fanout, latency and cluster: the same run with different defaults and URLs.
pub(crate) async fn fanout(a: &BenchArgs, load: Load) -> Result<Report> {
    let target = a.target;
    let label = load.label.clone();
    let (channels, m, publishers) = (load.channels, load.subscribers, load.publishers);
    eprintln!(
        "[{label}] target {} | {channels} channels x {m} subscribers, {publishers} publishers x {} in flight, \
         payload {} B, rate {} | warm-up {:?}, measure {:?} | publish {} subscribe {}",
        target.name(),
        a.inflight,
        a.payload,
        load.rate.map(|r| format!("{r}/s")).unwrap_or_else(|| "as fast as acknowledged".into()),
        a.warmup,
        a.duration,
        load.pub_url,
        load.sub_urls.join(",")
    );
    let shared = SubShared::new();
    let (stop_tx, stop_rx) = watch::channel(false);
    let subs = open_subscribers(
        &label,
        target,
        &load.sub_urls,
        &a.prefix,
        channels,
        channels * m,
        a.connect_concurrency,
        None,
        &shared,
        &stop_rx,
    )
    .await?;
    let per_channel = subs.per_channel.clone();

    let running = Arc::new(AtomicBool::new(true));
    let sent = Arc::new(AtomicU64::new(0));
    let expected = Arc::new(AtomicU64::new(0));
    let stats = AckStats::new();
    let mut pubs = Vec::new();
    for p in 0..publishers {
        let permits = Arc::new(Semaphore::new(a.inflight));
        let mut publisher = Publisher::open(target, a.flow, &load.pub_url, stats.clone(), permits.clone()).await?;
        let templates: Vec<Template> =
            (0..channels).map(|ch| Template::new(target, &target.channel(&a.prefix, ch), a.payload)).collect();
        let (running, sent, expected, per_channel) =
            (running.clone(), sent.clone(), expected.clone(), per_channel.clone());
        let per_pub_rate = load.rate.map(|r| r / publishers as f64);
        let inflight = a.inflight;
        pubs.push(tokio::spawn(async move {
            let mut k: u64 = 0;
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let start = Instant::now();
            let result: Result<()> = async {
                while running.load(Relaxed) {
                    let budget = match per_pub_rate {
                        Some(r) => {
                            tick.tick().await;
                            ((start.elapsed().as_secs_f64() * r) as u64).saturating_sub(k)
                        }
                        None => u64::MAX,
                    };
                    if budget == 0 {
                        continue;
                    }
                    let first = tokio::select! {
                        p = permits.acquire() => p?,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {
                            publisher.end_batch().await?; // answers a server PING even when stalled
                            continue;
                        }
                    };
                    first.forget();
                    let mut batch = 1u64;
                    while batch < budget {
                        match permits.try_acquire() {
                            Ok(p) => {
                                p.forget();
                                batch += 1;
                            }
                            Err(_) => break,
                        }
                    }
                    publisher.begin_batch(batch);
                    for _ in 0..batch {
                        k += 1;
                        let ch = (p as u64 + k * publishers as u64) as usize % channels;
                        publisher.feed(templates[ch].build(k, now_micros())).await?;
                        expected.fetch_add(per_channel[ch].load(Relaxed), Relaxed);
                    }
                    sent.fetch_add(batch, Relaxed);
                    publisher.end_batch().await?;
                }
                Ok(())
            }
            .await;
            // wait (bounded) for outstanding acknowledgements
            let t0 = Instant::now();
            while permits.available_permits() < inflight && t0.elapsed() < DRAIN {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            publisher.close().await;
            result
        }));
    }

    let snap = || Snap {
        at: Instant::now(),
        acked: stats.acked.load(Relaxed),
        delivered: shared.delivered.load(Relaxed),
        server_cpu: a.server_pid.and_then(sys::proc_cpu_secs),
        self_cpu: sys::self_cpu_secs(),
    };
    let start = Instant::now();
    let mut begin: Option<Snap> = None;
    let mut last = snap();
    let total = a.warmup + a.duration;
    let mut warnings = Vec::new();
    let mut next_progress = Duration::from_secs(1);
    loop {
        // wake at each whole second (progress), at the end of the warm-up, and at the end
        let mut wake = next_progress.min(total);
        if begin.is_none() {
            wake = wake.min(a.warmup);
        }
        tokio::time::sleep_until(start + wake).await;
        if pubs.iter().all(|p| p.is_finished()) {
            warnings.push("every publisher stopped early".to_string());
            break;
        }
        let el = start.elapsed();
        if begin.is_none() && el >= a.warmup {
            begin = Some(snap());
            shared.window_start.store(now_micros(), Relaxed);
            stats.measuring.store(true, Relaxed);
            if !a.warmup.is_zero() {
                eprintln!("[{label}] warm-up over: measuring");
            }
        }
        if el >= total {
            break;
        }
        if el < next_progress {
            continue;
        }
        next_progress += Duration::from_secs(1);
        let now = snap();
        let secs = now.at.duration_since(last.at).as_secs_f64().max(1e-9);
        let cpu = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => format!("{:.0}%", 100.0 * (a - b) / secs),
            _ => "n/a".into(),
        };
        eprintln!(
            "[{label}] {:>5.1}s{} acked {} (+{:.0}/s) delivered {} (+{:.0}/s) server cpu {} generator cpu {}",
            el.as_secs_f64(),
            if begin.is_none() { " warm-up" } else { "" },
            now.acked,
            (now.acked - last.acked) as f64 / secs,
            now.delivered,
            (now.delivered - last.delivered) as f64 / secs,
            cpu(now.server_cpu, last.server_cpu),
            cpu(Some(now.self_cpu), Some(last.self_cpu)),
        );
        last = now;
    }
    let end = snap();
    shared.window_end.store(now_micros(), Relaxed);
    stats.measuring.store(false, Relaxed);
    running.store(false, Relaxed);
    let mut errors = 0u64;
    for p in pubs {
        match p.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                errors += 1;
                eprintln!("[bench] publisher failed: {e:#}");
            }
            Err(e) => {
                errors += 1;
                eprintln!("[bench] publisher task failed: {e}");
            }
        }
    }
    // let deliveries drain (bounded), then stop the subscribers
    let t0 = Instant::now();
    while shared.delivered.load(Relaxed) < expected.load(Relaxed)
        && t0.elapsed() < DRAIN
        && shared.closed.load(Relaxed) == 0
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(true);
    for t in subs.tasks {
        let _ = t.await;
    }

    let Some(begin) = begin else { bail!("the run ended before the warm-up was over") };
    let window = end.at.duration_since(begin.at).as_secs_f64().max(1e-9);
    let published = end.acked - begin.acked;
    let delivered = end.delivered - begin.delivered;
    let server_cpu = match (begin.server_cpu, end.server_cpu) {
        (Some(b), Some(e)) => Some(e - b),
        _ => None,
    };
    let generator_cpu_pct = 100.0 * (end.self_cpu - begin.self_cpu) / window;
    if generator_cpu_pct > 90.0 {
        warnings.push(format!(
            "the generator used {generator_cpu_pct:.0}% of a core: throughput may be the generator's limit, not the server's"
        ));
    }
    if let Some(r) = load.rate.filter(|_| window >= 2.0) {
        let got = published as f64 / window;
        if got < 0.95 * r {
            warnings.push(format!("offered {r}/s but only {got:.0}/s were acknowledged: saturated"));
        }
    }
    let (exp, got) = (expected.load(Relaxed), shared.delivered.load(Relaxed));
    let rtt = stats.rtt.lock().unwrap().clone();
    let report = Report {
        scenario: label,
        target: target.name().into(),
        pub_url: load.pub_url,
        sub_urls: load.sub_urls,
        params: Params {
            channels,
            subscribers_per_channel: m,
            publishers,
            inflight: a.inflight,
            flow: match (target, a.flow) {
                (Target::Switchyard | Target::Centrifugo, Flow::Each) => "each".into(),
                _ => "batch".into(),
            },
            rate: load.rate,
            payload_bytes: a.payload,
            connections: 0,
        },
        warmup_s: a.warmup.as_secs_f64(),
        window_s: window,
        published,
        publishes_per_s: published as f64 / window,
        delivered,
        delivered_per_s: delivered as f64 / window,
        latency: LatencySummary::from_hist(&shared.merged()),
        ack_rtt: LatencySummary::from_hist(&rtt),
        server_cpu_s: server_cpu,
        server_cpu_pct: server_cpu.map(|c| 100.0 * c / window),
        server_cpu_s_per_million_delivered: server_cpu.filter(|_| delivered > 0).map(|c| c / (delivered as f64 / 1e6)),
        generator_cpu_pct: Some(generator_cpu_pct),
        totals: Totals {
            sent: sent.load(Relaxed),
            acked: stats.acked.load(Relaxed),
            expected_deliveries: exp,
            delivered: got,
            missing: exp.saturating_sub(got),
            errors: errors + stats.errors.load(Relaxed),
            closed_subscribers: shared.closed.load(Relaxed),
            failed_connections: subs.failed as u64,
        },
        connections: None,
        warnings,
    };
    for w in &report.warnings {
        eprintln!("[bench] WARNING: {w}");
    }
    Ok(report)
}

/// N idle connections, each subscribed to one of `channels`; then one publish per channel
/// checks that every connection still receives.
pub(crate) async fn connections(a: &BenchArgs) -> Result<Report> {
    let target = a.target;
    let label = a.label.clone().unwrap_or_else(|| "connections".into());
    let channels = a.channels.unwrap_or(1000).clamp(1, a.count.max(1));
    eprintln!(
        "[{label}] target {} | {} idle connections over {channels} channels, {} connecting at a time | {}",
        target.name(),
        a.count,
        a.connect_concurrency,
        a.url
    );
    let rss_before = a.server_pid.and_then(sys::proc_rss_kib);
    let shared = SubShared::new();
    let (stop_tx, stop_rx) = watch::channel(false);
    let urls = [a.url.clone()];
    // 4 KiB client read buffers keep 10k idle clients small
    let subs = open_subscribers(
        &label,
        target,
        &urls,
        &a.prefix,
        channels,
        a.count,
        a.connect_concurrency,
        Some(4096),
        &shared,
        &stop_rx,
    )
    .await?;
    eprintln!("[{label}] settling {:?} before reading RSS", a.settle);
    tokio::time::sleep(a.settle).await;
    let rss_after = a.server_pid.and_then(sys::proc_rss_kib);
    let generator_rss = sys::self_rss_kib();
    let idle = match a.server_pid {
        Some(pid) if !a.idle_window.is_zero() => idle_cpu(&label, pid, a.idle_window).await,
        _ => None,
    };

    // verify: one publish per channel reaches every connection
    let stats = AckStats::new();
    let permits = Arc::new(Semaphore::new(channels));
    let mut publisher = Publisher::open(target, a.flow, &a.url, stats.clone(), permits.clone()).await?;
    let mut expected = 0;
    publisher.begin_batch(channels as u64);
    for ch in 0..channels {
        publisher
            .feed(Template::new(target, &target.channel(&a.prefix, ch), a.payload).build(ch as u64 + 1, 0))
            .await?;
        expected += subs.per_channel[ch].load(Relaxed);
    }
    publisher.end_batch().await?;
    let t0 = Instant::now();
    while (shared.delivered.load(Relaxed) < expected || permits.available_permits() < channels)
        && t0.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    publisher.close().await;
    let _ = stop_tx.send(true);
    for t in subs.tasks {
        let _ = t.await;
    }
    let delivered = shared.delivered.load(Relaxed);
    let per_conn = match (rss_before, rss_after) {
        (Some(b), Some(a)) if subs.opened > 0 => Some((a as f64 - b as f64) / subs.opened as f64),
        _ => None,
    };
    Ok(Report {
        scenario: label,
        target: target.name().into(),
        pub_url: a.url.clone(),
        sub_urls: urls.to_vec(),
        params: Params { channels, payload_bytes: a.payload, connections: a.count, ..Params::default() },
        totals: Totals {
            sent: channels as u64,
            acked: stats.acked.load(Relaxed),
            expected_deliveries: expected,
            delivered,
            missing: expected.saturating_sub(delivered),
            errors: stats.errors.load(Relaxed),
            closed_subscribers: shared.closed.load(Relaxed),
            failed_connections: subs.failed as u64,
        },
        connections: Some(ConnReport {
            requested: a.count,
            opened: subs.opened,
            connect_secs: subs.secs,
            connects_per_s: subs.opened as f64 / subs.secs.max(1e-9),
            server_rss_before_kib: rss_before,
            server_rss_after_kib: rss_after,
            server_rss_per_connection_kib: per_conn,
            generator_rss_kib: generator_rss,
            idle_window_s: idle.map(|_| a.idle_window.as_secs_f64()),
            server_idle_cpu_percent: idle.map(|i| i.0),
            server_rss_after_idle_kib: idle.and_then(|i| i.1),
        }),
        ..Report::default()
    })
}

/// The server's CPU over `window` while every connection idles, as a percentage of one
/// core, and its RSS at the end; progress every 10 s.
async fn idle_cpu(label: &str, pid: u32, window: Duration) -> Option<(f64, Option<u64>)> {
    let cpu0 = sys::proc_cpu_secs(pid)?;
    let t0 = Instant::now();
    eprintln!("[{label}] measuring server CPU over {window:?} of idle connections");
    while t0.elapsed() < window {
        tokio::time::sleep((window - t0.elapsed()).min(Duration::from_secs(10))).await;
        let so_far = sys::proc_cpu_secs(pid)? - cpu0;
        eprintln!(
            "[{label}]   {:>4.0}s: {:.2}% of a core",
            t0.elapsed().as_secs_f64(),
            100.0 * so_far / t0.elapsed().as_secs_f64()
        );
    }
    let cpu = sys::proc_cpu_secs(pid)? - cpu0;
    Some((100.0 * cpu / t0.elapsed().as_secs_f64(), sys::proc_rss_kib(pid)))
}
