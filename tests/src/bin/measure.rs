//! `measure`: a small load measurer for the Switchyard WebSocket protocol.
//!
//! Three modes (see `measure --help`):
//!
//! * `latency`: one publisher at a fixed rate, N subscribers on one channel;
//!   publish -> deliver latency percentiles over every delivery. The payload
//!   carries the send time (microseconds since the Unix epoch), so the figure
//!   is only meaningful with publisher and subscribers on the same host.
//! * `throughput`: S subscribers spread evenly over C channels, P publishers
//!   publishing pipelined (bounded in-flight, waiting on acks), optionally at
//!   a fixed total rate; delivered msgs/s, publishes/s, and with
//!   `--server-pid` the server's CPU seconds per million deliveries.
//! * `connections`: N idle connections, each subscribed to one channel; the
//!   server's RSS before/after (with `--server-pid`) and the connect rate.
//!
//! Every figure is measured; a warm-up period (default 2 s) is excluded from
//! the latency and throughput figures. Progress is printed once per second.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

#[derive(Parser)]
#[command(name = "measure", about = "Load measurer for the Switchyard WebSocket protocol")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Args, Clone, Debug)]
struct Common {
    /// WebSocket URL of the router
    #[arg(long, default_value = "ws://127.0.0.1:8000/ws")]
    url: String,
    /// Server process id: enables server CPU / RSS figures from /proc
    #[arg(long)]
    server_pid: Option<u32>,
    /// Warm-up time excluded from the figures
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Number of connections opened concurrently while setting up
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
}

#[derive(Subcommand)]
enum Mode {
    /// 1 publisher at a fixed rate, N subscribers on one channel: publish->deliver latency
    Latency {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 100)]
        subscribers: usize,
        /// publishes per second
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        /// measured time (after warm-up)
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        #[arg(long, default_value = "bench:0")]
        channel: String,
        /// approximate size of the JSON `data` in bytes
        #[arg(long, default_value_t = 100)]
        payload: usize,
    },
    /// S subscribers over C channels, P pipelined publishers: msgs/s and server CPU
    Throughput {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        #[arg(long, default_value_t = 100)]
        channels: usize,
        #[arg(long, default_value_t = 4)]
        publishers: usize,
        /// measured time (after warm-up)
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// total publishes per second over all publishers (default: as fast as acks allow)
        #[arg(long)]
        rate: Option<f64>,
        /// publishes in flight (unacknowledged) per publisher
        #[arg(long, default_value_t = 64)]
        inflight: usize,
        /// approximate size of the JSON `data` in bytes
        #[arg(long, default_value_t = 100)]
        payload: usize,
        /// channel name prefix
        #[arg(long, default_value = "bench")]
        prefix: String,
    },
    /// N idle subscribed connections: server RSS per connection and connect rate
    Connections {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 10000)]
        count: usize,
        /// connections are spread over this many channels
        #[arg(long, default_value_t = 1000)]
        channels: usize,
        /// wait this long after the last connect before reading the server's RSS
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        settle: Duration,
        /// after measuring, publish one message per channel and check every connection gets it
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        verify: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    raise_nofile_limit();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        match cli.mode {
            Mode::Latency { common, subscribers, rate, duration, channel, payload } => {
                latency(common, subscribers, rate, duration, channel, payload).await
            }
            Mode::Throughput {
                common,
                subscribers,
                channels,
                publishers,
                duration,
                rate,
                inflight,
                payload,
                prefix,
            } => throughput(common, subscribers, channels, publishers, duration, rate, inflight, payload, prefix).await,
            Mode::Connections { common, count, channels, settle, verify } => {
                connections(common, count, channels, settle, verify).await
            }
        }
    })
}

// === helpers ===

fn now_micros() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

fn raise_nofile_limit() {
    // SAFETY: plain libc calls on a stack value.
    unsafe {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let old = lim.rlim_cur;
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                eprintln!("[measure] RLIMIT_NOFILE raised {old} -> {}", lim.rlim_max);
            }
        }
    }
}

/// utime+stime of a process in seconds (/proc/PID/stat fields 14 and 15).
fn proc_cpu_secs(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime) / if hz > 0.0 { hz } else { 100.0 })
}

/// VmRSS of a process in KiB.
fn proc_rss_kib(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
}

fn server_cpu(c: &Common) -> Option<f64> {
    c.server_pid.and_then(|p| proc_cpu_secs(&p.to_string()))
}

fn server_rss(c: &Common) -> Option<u64> {
    c.server_pid.and_then(|p| proc_rss_kib(&p.to_string()))
}

fn fmt_mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Client read buffer per connection; 0 = tungstenite's default (128 KiB).
/// The connections mode lowers it so 10k idle clients stay small.
static READ_BUFFER: AtomicUsize = AtomicUsize::new(0);

async fn connect(url: &str) -> Result<Ws> {
    let config = match READ_BUFFER.load(Relaxed) {
        0 => None,
        n => Some(WebSocketConfig::default().read_buffer_size(n)),
    };
    // `true`: TCP_NODELAY on the client socket.
    let (ws, _resp) = tokio_tungstenite::connect_async_with_config(url, config, true)
        .await
        .with_context(|| format!("connect {url}"))?;
    Ok(ws)
}

/// Send a command and wait for its reply; pushes arriving before it are ignored.
async fn command(ws: &mut Ws, id: u64, mut cmd: Value) -> Result<Value> {
    cmd["id"] = json!(id);
    ws.send(Message::text(cmd.to_string())).await?;
    let deadline = tokio::time::sleep(Duration::from_secs(10));
    tokio::pin!(deadline);
    loop {
        let msg = tokio::select! {
            m = ws.next() => m,
            _ = &mut deadline => bail!("no reply to {} within 10s", cmd["op"]),
        };
        match msg {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(t.as_str())?;
                if v.get("id").and_then(Value::as_u64) == Some(id) {
                    if let Some(e) = v.get("error") {
                        bail!("{} failed: {e}", cmd["op"]);
                    }
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

async fn connect_subscribed(url: &str, channel: &str) -> Result<Ws> {
    let mut ws = connect(url).await?;
    command(&mut ws, 1, json!({"op": "subscribe", "channel": channel})).await?;
    Ok(ws)
}

/// A JSON `data` object of roughly `size` bytes carrying the send time.
fn payload(size: usize, seq: u64, warm: bool) -> Value {
    let t = now_micros();
    let base = json!({"t": t, "w": warm, "s": seq, "p": ""}).to_string().len();
    json!({"t": t, "w": warm, "s": seq, "p": "x".repeat(size.saturating_sub(base))})
}

fn is_message_push(text: &str) -> bool {
    if text.contains("\"push\":\"message\"") {
        return true;
    }
    if text.contains("\"push\"") {
        // not the compact form: parse to be sure
        return serde_json::from_str::<Value>(text)
            .map(|v| v.get("push").and_then(Value::as_str) == Some("message"))
            .unwrap_or(false);
    }
    false
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("histogram bounds")
}

fn ms(us: u64) -> String {
    format!("{:.3} ms", us as f64 / 1000.0)
}

/// A subscriber body that only counts message pushes (into `delivered`) until `stop`.
fn counting_reader(
    stop: watch::Receiver<bool>,
    delivered: Arc<AtomicU64>,
    closed: Arc<AtomicU64>,
) -> impl Fn(usize, Ws) -> futures_util::future::BoxFuture<'static, Result<Histogram<u64>>> + Send + Sync + Clone + 'static
{
    move |_i: usize, ws: Ws| {
        let (delivered, closed, stop) = (delivered.clone(), closed.clone(), stop.clone());
        Box::pin(async move {
            read_until_stop(ws, stop, closed, |text| {
                if is_message_push(text) {
                    delivered.fetch_add(1, Relaxed);
                }
            })
            .await;
            Ok(new_hist())
        })
    }
}

/// Open `n` connections subscribed to `channel_of(i)`, `concurrency` at a
/// time, and hand each one to `hold` in its own task. Returns the number of
/// connections that came up.
async fn open_subscribers<F, Fut>(
    label: &str,
    url: &str,
    n: usize,
    concurrency: usize,
    channel_of: impl Fn(usize) -> String + Send + Sync + 'static,
    hold: F,
    tasks: &mut JoinSet<Result<Histogram<u64>>>,
) -> Result<usize>
where
    F: Fn(usize, Ws) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = Result<Histogram<u64>>> + Send + 'static,
{
    let next = Arc::new(AtomicUsize::new(0));
    let opened = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let channel_of = Arc::new(channel_of);
    let (conn_tx, mut conn_rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Ws)>();
    let mut connectors = JoinSet::new();
    for _ in 0..concurrency.max(1).min(n.max(1)) {
        let (next, opened, failed) = (next.clone(), opened.clone(), failed.clone());
        let (url, channel_of, conn_tx) = (url.to_string(), channel_of.clone(), conn_tx.clone());
        connectors.spawn(async move {
            loop {
                let i = next.fetch_add(1, Relaxed);
                if i >= n {
                    break;
                }
                match connect_subscribed(&url, &channel_of(i)).await {
                    Ok(ws) => {
                        opened.fetch_add(1, Relaxed);
                        let _ = conn_tx.send((i, ws));
                    }
                    Err(e) => {
                        if failed.fetch_add(1, Relaxed) < 5 {
                            eprintln!("[measure] connection {i} failed: {e:#}");
                        }
                    }
                }
            }
        });
    }
    drop(conn_tx);
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tokio::select! {
            c = conn_rx.recv() => match c {
                Some((i, ws)) => { tasks.spawn(hold.clone()(i, ws)); }
                None => break,
            },
            _ = tick.tick() => {
                let o = opened.load(Relaxed);
                println!("[{label}] {:>5.1}s connecting: {o}/{n} open, {} failed ({:.0}/s)",
                    start.elapsed().as_secs_f64(), failed.load(Relaxed),
                    o as f64 / start.elapsed().as_secs_f64());
            }
        }
    }
    while connectors.join_next().await.is_some() {}
    let (o, f) = (opened.load(Relaxed), failed.load(Relaxed));
    println!("[{label}] {o}/{n} connections open and subscribed in {:.2}s ({f} failed)", start.elapsed().as_secs_f64());
    if o == 0 {
        bail!("no connection could be opened to {url}");
    }
    Ok(o)
}

/// Read a subscriber connection until `stop`; `on_text` sees each text frame.
async fn read_until_stop(
    mut ws: Ws,
    mut stop: watch::Receiver<bool>,
    closed: Arc<AtomicU64>,
    mut on_text: impl FnMut(&str),
) {
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) => on_text(t.as_str()),
                Some(Ok(Message::Close(f))) => {
                    if closed.fetch_add(1, Relaxed) < 5 {
                        eprintln!("[measure] server closed a subscriber: {f:?}");
                    }
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    if closed.fetch_add(1, Relaxed) < 5 {
                        eprintln!("[measure] subscriber error: {e}");
                    }
                    break;
                }
                None => { closed.fetch_add(1, Relaxed); break; }
            }
        }
    }
}

/// Reply counters shared by the publishers of one run.
#[derive(Clone)]
struct AckStats {
    acked: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    /// publish -> ack round trip in microseconds, recorded while `measuring`
    rtt: Arc<std::sync::Mutex<Histogram<u64>>>,
    measuring: Arc<AtomicBool>,
}

impl AckStats {
    fn new() -> Self {
        AckStats {
            acked: Arc::new(AtomicU64::new(0)),
            errors: Arc::new(AtomicU64::new(0)),
            rtt: Arc::new(std::sync::Mutex::new(new_hist())),
            measuring: Arc::new(AtomicBool::new(false)),
        }
    }

    fn rtt_line(&self) -> Option<String> {
        let h = self.rtt.lock().unwrap();
        (!h.is_empty()).then(|| {
            format!(
                "p50 {}  p99 {}  max {}  ({} acks)",
                ms(h.value_at_quantile(0.5)),
                ms(h.value_at_quantile(0.99)),
                ms(h.max()),
                h.len()
            )
        })
    }
}

/// A publisher connection: writer half plus a task counting replies.
struct Publisher {
    tx: futures_util::stream::SplitSink<Ws, Message>,
    /// send instants, in order; replies come in command order
    sent_at: tokio::sync::mpsc::UnboundedSender<Instant>,
    reader: tokio::task::JoinHandle<()>,
}

impl Publisher {
    async fn feed(&mut self, frame: Message) -> Result<()> {
        let _ = self.sent_at.send(Instant::now());
        self.tx.feed(frame).await?;
        Ok(())
    }
}

fn start_publisher(ws: Ws, stats: AckStats, permits: Option<Arc<Semaphore>>) -> Publisher {
    let (tx, mut rx) = ws.split();
    let (sent_at, mut sent_rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let reader = tokio::spawn(async move {
        while let Some(m) = rx.next().await {
            match m {
                Ok(Message::Text(t)) => {
                    let t = t.as_str();
                    let sent = sent_rx.try_recv().ok();
                    if t.contains("\"error\"") && !t.contains("\"ok\"") {
                        if stats.errors.fetch_add(1, Relaxed) < 5 {
                            eprintln!("[measure] publish error: {t}");
                        }
                    } else {
                        stats.acked.fetch_add(1, Relaxed);
                        if let Some(at) = sent {
                            if stats.measuring.load(Relaxed) {
                                let us = at.elapsed().as_micros() as u64;
                                stats.rtt.lock().unwrap().saturating_record(us.max(1));
                            }
                        }
                    }
                    if let Some(p) = &permits {
                        p.add_permits(1);
                    }
                }
                Ok(Message::Close(f)) => {
                    eprintln!("[measure] server closed a publisher: {f:?}");
                    break;
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("[measure] publisher error: {e}");
                    break;
                }
            }
        }
    });
    Publisher { tx, sent_at, reader }
}

fn publish_frame(id: u64, channel: &str, data: Value) -> Message {
    Message::text(json!({"id": id, "op": "publish", "channel": channel, "data": data}).to_string())
}

// === latency ===

async fn latency(
    c: Common,
    subscribers: usize,
    rate: f64,
    duration: Duration,
    channel: String,
    size: usize,
) -> Result<()> {
    if rate <= 0.0 {
        bail!("--rate must be > 0");
    }
    println!(
        "[latency] {} subscribers on {channel}, 1 publisher at {rate}/s, payload ~{size} B, \
         warm-up {:?}, measure {:?}, url {}",
        subscribers, c.warmup, duration, c.url
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let delivered = Arc::new(AtomicU64::new(0));
    let measured = Arc::new(AtomicU64::new(0));
    let closed = Arc::new(AtomicU64::new(0));
    let mut subs = JoinSet::new();
    let hold = {
        let (delivered, measured, closed) = (delivered.clone(), measured.clone(), closed.clone());
        move |_i: usize, ws: Ws| {
            let (delivered, measured, closed) = (delivered.clone(), measured.clone(), closed.clone());
            let stop = stop_rx.clone();
            async move {
                let mut h = new_hist();
                read_until_stop(ws, stop, closed, |text| {
                    let Ok(v) = serde_json::from_str::<Value>(text) else {
                        return;
                    };
                    if v.get("push").and_then(Value::as_str) != Some("message") {
                        return;
                    }
                    let now = now_micros();
                    delivered.fetch_add(1, Relaxed);
                    let d = &v["data"];
                    if d["w"].as_bool() == Some(false) {
                        if let Some(t) = d["t"].as_u64() {
                            h.saturating_record(now.saturating_sub(t).max(1));
                            measured.fetch_add(1, Relaxed);
                        }
                    }
                })
                .await;
                Ok(h)
            }
        }
    };
    let ch = channel.clone();
    let n =
        open_subscribers("latency", &c.url, subscribers, c.connect_concurrency, move |_| ch.clone(), hold, &mut subs)
            .await?;

    let stats = AckStats::new();
    let (acked, errors) = (stats.acked.clone(), stats.errors.clone());
    let mut publisher = start_publisher(connect(&c.url).await?, stats.clone(), None);

    let total = c.warmup + duration;
    let start = Instant::now();
    let mut sent: u64 = 0;
    let mut sent_measured: u64 = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut next_report = Duration::from_secs(1);
    let (mut last_sent, mut last_deliv) = (0u64, 0u64);
    loop {
        tick.tick().await;
        let el = start.elapsed();
        if el >= total {
            break;
        }
        let warm = el < c.warmup;
        if !warm {
            stats.measuring.store(true, Relaxed);
        }
        let due = (el.as_secs_f64() * rate) as u64;
        while sent < due {
            sent += 1;
            if !warm {
                sent_measured += 1;
            }
            publisher.feed(publish_frame(sent, &channel, payload(size, sent, warm))).await?;
        }
        publisher.tx.flush().await?;
        if el >= next_report {
            let d = delivered.load(Relaxed);
            println!(
                "[latency] {:>5.1}s{} published {sent} (+{}/s) acked {} delivered {d} (+{}/s)",
                el.as_secs_f64(),
                if warm { " warm-up" } else { "" },
                sent - last_sent,
                acked.load(Relaxed),
                d - last_deliv
            );
            (last_sent, last_deliv) = (sent, d);
            next_report += Duration::from_secs(1);
        }
    }
    // drain
    let expected = sent_measured * n as u64;
    let drain_start = Instant::now();
    while measured.load(Relaxed) < expected && drain_start.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(true);
    let mut hist = new_hist();
    while let Some(r) = subs.join_next().await {
        if let Ok(Ok(h)) = r {
            hist.add(&h).ok();
        }
    }
    let _ = publisher.tx.close().await;
    publisher.reader.abort();

    let got = hist.len();
    println!("== latency summary ==");
    println!("subscribers:        {n} (of {subscribers} requested), channel {channel}");
    println!("offered rate:       {rate}/s publishes, {:.0}/s deliveries", rate * n as f64);
    println!(
        "published:          {sent} total, {sent_measured} measured (after warm-up), acked {}, errors {}",
        acked.load(Relaxed),
        errors.load(Relaxed)
    );
    println!(
        "deliveries:         {got} measured of {expected} expected (missing {}), {} closed subscribers",
        expected.saturating_sub(got),
        closed.load(Relaxed)
    );
    if got > 0 {
        println!(
            "publish->deliver:   p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  mean {:.3} ms",
            ms(hist.value_at_quantile(0.50)),
            ms(hist.value_at_quantile(0.90)),
            ms(hist.value_at_quantile(0.99)),
            ms(hist.value_at_quantile(0.999)),
            ms(hist.max()),
            hist.mean() / 1000.0
        );
    }
    if let Some(l) = stats.rtt_line() {
        println!("publish->ack:       {l}");
    }
    if got == 0 {
        bail!("no deliveries were measured");
    }
    Ok(())
}

// === throughput ===

#[allow(clippy::too_many_arguments)]
async fn throughput(
    c: Common,
    subscribers: usize,
    channels: usize,
    publishers: usize,
    duration: Duration,
    rate: Option<f64>,
    inflight: usize,
    size: usize,
    prefix: String,
) -> Result<()> {
    if channels == 0 || publishers == 0 || inflight == 0 {
        bail!("--channels, --publishers and --inflight must be > 0");
    }
    println!(
        "[throughput] {subscribers} subscribers over {channels} channels, {publishers} publishers \
         ({} in flight each), rate {}, payload ~{size} B, warm-up {:?}, measure {:?}, url {}",
        inflight,
        rate.map(|r| format!("{r}/s")).unwrap_or_else(|| "unlimited".into()),
        c.warmup,
        duration,
        c.url
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let delivered = Arc::new(AtomicU64::new(0));
    let closed = Arc::new(AtomicU64::new(0));
    let mut subs = JoinSet::new();
    let hold = counting_reader(stop_rx, delivered.clone(), closed.clone());
    let pfx = prefix.clone();
    let n = open_subscribers(
        "throughput",
        &c.url,
        subscribers,
        c.connect_concurrency,
        move |i| format!("{pfx}:{}", i % channels),
        hold,
        &mut subs,
    )
    .await?;
    // subscribers per channel, for the expected delivery count
    let mut per_channel = vec![0u64; channels];
    for i in 0..subscribers {
        per_channel[i % channels] += 1;
    }
    let per_channel = Arc::new(per_channel);

    let running = Arc::new(AtomicBool::new(true));
    let sent = Arc::new(AtomicU64::new(0));
    let stats = AckStats::new();
    let (acked, errors) = (stats.acked.clone(), stats.errors.clone());
    let expected = Arc::new(AtomicU64::new(0));
    let mut pubs = JoinSet::new();
    let start = Instant::now();
    for p in 0..publishers {
        let ws = connect(&c.url).await?;
        let permits = Arc::new(Semaphore::new(inflight));
        let mut publisher = start_publisher(ws, stats.clone(), Some(permits.clone()));
        let (running, sent, expected, per_channel) =
            (running.clone(), sent.clone(), expected.clone(), per_channel.clone());
        let prefix = prefix.clone();
        let per_pub_rate = rate.map(|r| r / publishers as f64);
        pubs.spawn(async move {
            let mut k: u64 = 0;
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let pstart = Instant::now();
            while running.load(Relaxed) {
                // how many may we send now?
                let budget = match per_pub_rate {
                    Some(r) => {
                        tick.tick().await;
                        ((pstart.elapsed().as_secs_f64() * r) as u64).saturating_sub(k)
                    }
                    None => u64::MAX,
                };
                if budget == 0 {
                    continue;
                }
                // wait for at least one permit, then take what is free
                let first = tokio::select! {
                    p = permits.acquire() => p,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                };
                first?.forget();
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
                for _ in 0..batch {
                    k += 1;
                    let ch = (p as u64 + k * publishers as u64) as usize % channels;
                    let channel = format!("{prefix}:{ch}");
                    publisher.feed(publish_frame(k, &channel, payload(size, k, false))).await?;
                    expected.fetch_add(per_channel[ch], Relaxed);
                }
                sent.fetch_add(batch, Relaxed);
                publisher.tx.flush().await?;
            }
            // wait for outstanding acks
            let t0 = Instant::now();
            while permits.available_permits() < inflight && t0.elapsed() < Duration::from_secs(5) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let _ = publisher.tx.close().await;
            publisher.reader.abort();
            anyhow::Ok(())
        });
    }

    // progress + measurement window
    let snap = |label: &str| {
        let s = (Instant::now(), acked.load(Relaxed), delivered.load(Relaxed), server_cpu(&c), proc_cpu_secs("self"));
        if !label.is_empty() {
            println!("[throughput] {label}");
        }
        s
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut begin = None;
    let mut last = (0u64, 0u64);
    let total = c.warmup + duration;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            r = pubs.join_next() => {
                if let Some(Ok(Err(e))) = r { eprintln!("[measure] publisher failed: {e:#}"); }
                if pubs.is_empty() { println!("[throughput] all publishers stopped early"); break; }
                continue;
            }
        }
        let el = start.elapsed();
        if begin.is_none() && el >= c.warmup {
            begin = Some(snap("warm-up over: measuring"));
            stats.measuring.store(true, Relaxed);
        }
        let (a, d) = (acked.load(Relaxed), delivered.load(Relaxed));
        let cpu = match (&begin, server_cpu(&c)) {
            (Some(b), Some(now)) if b.0.elapsed() > Duration::from_millis(500) => {
                b.3.map(|b3| format!(" server cpu {:.0}%", 100.0 * (now - b3) / b.0.elapsed().as_secs_f64().max(1e-9)))
            }
            _ => None,
        };
        println!(
            "[throughput] {:>5.1}s{} publishes {a} (+{}/s) delivered {d} (+{}/s){}",
            el.as_secs_f64(),
            if begin.is_none() { " warm-up" } else { "" },
            a - last.0,
            d - last.1,
            cpu.unwrap_or_default()
        );
        last = (a, d);
        if el >= total {
            break;
        }
    }
    let end = snap("");
    stats.measuring.store(false, Relaxed);
    running.store(false, Relaxed);
    while let Some(r) = pubs.join_next().await {
        if let Ok(Err(e)) = r {
            eprintln!("[measure] publisher failed: {e:#}");
        }
    }
    // let deliveries drain, then check nothing was lost
    let exp = expected.load(Relaxed);
    let t0 = Instant::now();
    while delivered.load(Relaxed) < exp && t0.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let final_delivered = delivered.load(Relaxed);
    let _ = stop_tx.send(true);
    while subs.join_next().await.is_some() {}

    let Some(begin) = begin else { bail!("run ended before the warm-up was over") };
    let secs = end.0.duration_since(begin.0).as_secs_f64();
    let pubs_n = end.1 - begin.1;
    let deliv_n = end.2 - begin.2;
    println!("== throughput summary ==");
    println!("setup:              {n} subscribers / {channels} channels ({:.1} per channel), {publishers} publishers, {inflight} in flight each",
        n as f64 / channels as f64);
    println!(
        "offered:            {}",
        rate.map(|r| format!("{r} publishes/s")).unwrap_or_else(|| "unlimited (pipelined on acks)".into())
    );
    println!("window:             {secs:.2}s after {:?} warm-up", c.warmup);
    println!(
        "publishes:          {pubs_n} acked in window = {:.0}/s (errors {} total)",
        pubs_n as f64 / secs,
        errors.load(Relaxed)
    );
    println!("deliveries:         {deliv_n} in window = {:.0}/s", deliv_n as f64 / secs);
    if let Some(l) = stats.rtt_line() {
        println!("publish->ack:       {l}");
    }
    if let Some(r) = rate {
        let got = pubs_n as f64 / secs;
        if got < 0.95 * r {
            println!("WARNING:            offered {r}/s but only {got:.0}/s were acked: the server (or generator) is saturated, so this is not a fixed-rate figure");
        }
    }
    println!("all runs:           sent {} acked {} expected deliveries {exp} delivered {final_delivered} (missing {}), {} closed subscribers",
        sent.load(Relaxed), acked.load(Relaxed), exp.saturating_sub(final_delivered), closed.load(Relaxed));
    if let (Some(b), Some(e)) = (begin.3, end.3) {
        let cpu = e - b;
        println!("server cpu:         {cpu:.2}s in window = {:.0}% of one core", 100.0 * cpu / secs);
        if deliv_n > 0 {
            println!("server cpu/1M deliv: {:.3} s per million delivered", cpu / (deliv_n as f64 / 1e6));
        }
        if pubs_n > 0 {
            println!("server cpu/1M pub:  {:.3} s per million published", cpu / (pubs_n as f64 / 1e6));
        }
    }
    if let (Some(b), Some(e)) = (begin.4, end.4) {
        println!(
            "measurer cpu:       {:.0}% of one core (near 100% means the generator, not the server, is the limit)",
            100.0 * (e - b) / secs
        );
    }
    if deliv_n == 0 {
        bail!("nothing was delivered in the measurement window");
    }
    Ok(())
}

// === connections ===

async fn connections(c: Common, count: usize, channels: usize, settle: Duration, verify: bool) -> Result<()> {
    let channels = channels.max(1);
    READ_BUFFER.store(4096, Relaxed);
    println!(
        "[connections] {count} idle connections over {channels} channels, {} connecting at a time, url {}",
        c.connect_concurrency, c.url
    );
    let rss_before = server_rss(&c);
    if let Some(r) = rss_before {
        println!("[connections] server RSS before: {}", fmt_mib(r));
    } else if c.server_pid.is_some() {
        eprintln!("[measure] cannot read the server's /proc status");
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let delivered = Arc::new(AtomicU64::new(0));
    let closed = Arc::new(AtomicU64::new(0));
    let mut holders = JoinSet::new();
    let hold = counting_reader(stop_rx, delivered.clone(), closed.clone());
    let start = Instant::now();
    let opened = open_subscribers(
        "connections",
        &c.url,
        count,
        c.connect_concurrency,
        move |i| format!("idle:{}", i % channels),
        hold,
        &mut holders,
    )
    .await?;
    let connect_secs = start.elapsed().as_secs_f64();
    println!("[connections] settling {settle:?} before reading RSS");
    tokio::time::sleep(settle).await;
    let rss_after = server_rss(&c);
    let self_rss = proc_rss_kib("self");

    let mut verified = None;
    if verify {
        let stats = AckStats::new();
        let (acked, errors) = (stats.acked.clone(), stats.errors.clone());
        let mut p = start_publisher(connect(&c.url).await?, stats, None);
        let used = channels.min(count);
        for ch in 0..used {
            p.feed(publish_frame(ch as u64 + 1, &format!("idle:{ch}"), payload(32, 0, false))).await?;
        }
        p.tx.flush().await?;
        let t0 = Instant::now();
        while (delivered.load(Relaxed) as usize) < opened && t0.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        verified = Some((delivered.load(Relaxed), acked.load(Relaxed), errors.load(Relaxed)));
        let _ = p.tx.close().await;
        p.reader.abort();
    }
    let _ = stop_tx.send(true);
    while holders.join_next().await.is_some() {}

    println!("== connections summary ==");
    println!(
        "connections:        {opened} of {count} opened and subscribed ({} closed by server)",
        closed.load(Relaxed)
    );
    println!(
        "connect rate:       {:.0} connections/s ({connect_secs:.2}s incl. subscribe)",
        opened as f64 / connect_secs
    );
    match (rss_before, rss_after) {
        (Some(b), Some(a)) => {
            println!(
                "server RSS:         before {}  after {}  delta {}",
                fmt_mib(b),
                fmt_mib(a),
                fmt_mib(a.saturating_sub(b))
            );
            println!("per connection:     {:.2} KiB", (a as f64 - b as f64) / opened as f64);
        }
        _ => println!("server RSS:         n/a (pass --server-pid)"),
    }
    if let Some(s) = self_rss {
        println!("measurer RSS:       {}", fmt_mib(s));
    }
    if let Some((d, a, e)) = verified {
        println!("verify:             {a} publishes acked ({e} errors), {d} of {opened} connections got the message");
    }
    Ok(())
}
