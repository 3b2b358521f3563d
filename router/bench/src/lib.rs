//! `switchyard bench`: a load generator for Switchyard and, with the same load, for
//! nats-server over its WebSocket listener. This module owns the command line
//! ([`BenchArgs`]), the per-scenario defaults and the dispatch; the scenarios live in
//! `run`, the wire in `client` and `nats`, figures and tables in `report`, and process
//! readings in `sys`. It must never start servers (scripts/compare.sh and scripts/storm.sh
//! do) and never stops one, except the `--kill-pid` that `storm` is given; it never
//! connects anywhere but the URLs it is given.
//!
//! Scenarios: `fanout` (R channels × M subscribers, P publishers, fixed rate or as fast as
//! acknowledged), `latency` (fanout at a fixed low rate), `cluster` (publishers on one
//! node, subscribers spread over others), `connections` (N idle subscribed connections:
//! server memory per connection and connect rate), `storm` (one node killed under N
//! subscribed clients: reconnect and recovery times, gaps, CPU per recovery; in `storm`),
//! and `table` (prints the comparison table from JSON-lines files of earlier runs).

mod client;
mod nats;
mod readers;
mod report;
mod run;
mod storm;
mod sys;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};

pub use client::{Flow, Target};
use report::{comparison_table, parse_reports, Report};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
/// What `switchyard bench` runs.
pub enum Scenario {
    /// R channels × M subscribers each, P publishers: delivered msgs/s, publishes/s, latency.
    Fanout,
    /// A fixed low rate (default 1 channel × 100 subscribers, 1,000 publishes/s): latency without queueing.
    Latency,
    /// N idle connections, each subscribed to one channel: server RSS per connection, connect rate.
    Connections,
    /// Publishers on --pub-url, subscribers spread over --sub-urls.
    Cluster,
    /// Live latency (10 channels, 1,000 publishes/s) while --readers clients page history of other channels.
    Readers,
    /// Print the comparison table from JSON-lines files (--column NAME=FILE, repeated).
    Table,
    /// --count clients (--subscribers per channel) over --sub-urls, one node killed (--kill-pid): recovery.
    Storm,
}

/// The client protocol spoken to a Switchyard node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Protocol {
    /// Switchyard's own protocol.
    Native,
    /// Centrifugo's client protocol v2 (JSON).
    Centrifugo,
}

/// Flags of `switchyard bench`; a flag a scenario does not use is ignored.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// What to run.
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// Which server protocol to speak.
    #[arg(long, value_enum, default_value = "switchyard")]
    pub target: Target,
    /// Against Switchyard: its own protocol (`native`, at `/ws`) or Centrifugo's
    /// (`centrifugo`, at `/connection/websocket`; a `--url` ending in `/ws` is pointed there).
    #[arg(long, value_enum, default_value = "native")]
    pub protocol: Protocol,
    /// Server URL: Switchyard `ws://HOST:PORT/ws`, nats-server `ws://HOST:WSPORT`.
    #[arg(long, default_value = "ws://127.0.0.1:8000/ws")]
    pub url: String,
    /// cluster: the node the publishers use (default --url).
    #[arg(long)]
    pub pub_url: Option<String>,
    /// cluster: the nodes the subscribers are spread over, comma-separated (default --url).
    #[arg(long, value_delimiter = ',')]
    pub sub_urls: Vec<String>,
    /// Print one JSON result object on stdout at the end (progress stays on stderr).
    #[arg(long)]
    pub json: bool,
    /// Name the scenario in the report (e.g. `fanout-fixed`); default the scenario's name.
    #[arg(long)]
    pub label: Option<String>,
    /// Warm-up time excluded from the figures.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Measured time after the warm-up.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Server process id: server CPU and RSS figures from /proc.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Channels R (fanout/cluster default 100, latency 1; connections default 1000).
    #[arg(long)]
    pub channels: Option<usize>,
    /// Subscribers per channel M (fanout/cluster default 10, latency 100).
    #[arg(long)]
    pub subscribers: Option<usize>,
    /// Publisher connections P (fanout/cluster default 4, latency 1).
    #[arg(long)]
    pub publishers: Option<usize>,
    /// Total publishes/s over all publishers (latency default 1000; fanout default: as
    /// fast as acknowledged).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Unacknowledged publishes per publisher (NATS: PUBs per PING/PONG window).
    #[arg(long, default_value_t = 64)]
    pub inflight: usize,
    /// When a publisher's permits come back: `batch` when a whole batch is acknowledged
    /// (the rule NATS core imposes, so the default: both targets get the same load), or
    /// `each` per acknowledged publish (Switchyard only).
    #[arg(long, value_enum, default_value = "batch")]
    pub flow: Flow,
    /// Payload (the JSON `data`) size in bytes; at least 58.
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// Channel name prefix (`bench` → channels `bench:0`…, NATS subjects `bench.0`…).
    #[arg(long, default_value = "bench")]
    pub prefix: String,
    /// connections: how many idle connections.
    #[arg(long, default_value_t = 10_000)]
    pub count: usize,
    /// connections: wait this long after the last connect before reading the server's RSS.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub settle: Duration,
    /// connections: after the RSS reading, measure the server's CPU over this long with
    /// every connection idle (heartbeats only); 0 skips it. Longer than the server's ping
    /// interval (25 s by default) to count every connection's heartbeat.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub idle_window: Duration,
    /// Spread connections over this many loopback source addresses (127.0.0.1 up; the
    /// server must be on loopback): each has about 28,000 ephemeral ports toward one
    /// server port. 0 picks one per 20,000 connections.
    #[arg(long, default_value_t = 0)]
    pub source_addrs: u8,
    /// Connections opened concurrently while setting up.
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,
    /// table: a column as NAME=FILE (a JSON-lines file of reports; split at the last `=`);
    /// repeat it; the first two columns are compared.
    #[arg(long)]
    pub column: Vec<String>,
    /// PEM certificates that `wss://` servers are verified against (a CA, or the server's
    /// self-signed certificate).
    #[arg(long)]
    pub tls_ca: Option<std::path::PathBuf>,
    /// readers: history reader connections, each paging one history channel without pause.
    #[arg(long, default_value_t = 500)]
    pub readers: usize,
    /// readers: channels the readers page (filled with 1,000 messages each).
    #[arg(long, default_value_t = 10)]
    pub history_channels: usize,
    /// readers: payload bytes of each history message.
    #[arg(long, default_value_t = 1024)]
    pub history_payload: usize,
    /// Switchyard subscribers connect with `batch: true`, so the server may pack several
    /// pushes into one frame (JSON lines).
    #[arg(long)]
    pub batch: bool,
    /// The storm scenario's own flags.
    #[command(flatten)]
    pub storm: storm::StormArgs,
}

/// The resolved load of a fanout-like run.
#[derive(Debug, Clone)]
pub(crate) struct Load {
    pub label: String,
    pub channels: usize,
    pub subscribers: usize,
    pub publishers: usize,
    pub rate: Option<f64>,
    pub pub_url: String,
    pub sub_urls: Vec<String>,
}

impl BenchArgs {
    fn load(&self) -> Result<Load> {
        let latency = self.scenario == Scenario::Latency;
        let load = Load {
            label: self.label.clone().unwrap_or_else(|| scenario_name(self.scenario).to_string()),
            channels: self.channels.unwrap_or(if latency { 1 } else { 100 }),
            subscribers: self.subscribers.unwrap_or(if latency { 100 } else { 10 }),
            publishers: self.publishers.unwrap_or(if latency { 1 } else { 4 }),
            rate: self.rate.or(latency.then_some(1000.0)),
            pub_url: match self.scenario {
                Scenario::Cluster => self.pub_url.clone().unwrap_or_else(|| self.url.clone()),
                _ => self.url.clone(),
            },
            sub_urls: match self.scenario {
                Scenario::Cluster if !self.sub_urls.is_empty() => self.sub_urls.clone(),
                _ => vec![self.url.clone()],
            },
        };
        if load.channels == 0 || load.publishers == 0 || self.inflight == 0 {
            bail!("--channels, --publishers and --inflight must be > 0");
        }
        if matches!(load.rate, Some(r) if r <= 0.0 || !r.is_finite()) {
            bail!("--rate must be > 0");
        }
        if self.payload < 58 {
            bail!("--payload must be at least 58 bytes (the timestamp and sequence fields)");
        }
        Ok(load)
    }
}

pub(crate) fn scenario_name(s: Scenario) -> &'static str {
    match s {
        Scenario::Fanout => "fanout",
        Scenario::Latency => "latency",
        Scenario::Connections => "connections",
        Scenario::Cluster => "cluster",
        Scenario::Readers => "readers",
        Scenario::Table => "table",
        Scenario::Storm => "storm",
    }
}

/// Runs `switchyard bench`; exit status 1 when the run failed or its counts do not add up.
pub fn main(args: BenchArgs) -> ExitCode {
    match run_main(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("switchyard bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_main(mut args: BenchArgs) -> Result<bool> {
    if args.protocol == Protocol::Centrifugo {
        if args.target != Target::Switchyard {
            bail!("--protocol centrifugo needs --target switchyard");
        }
        args.target = Target::Centrifugo;
        let point = |url: &mut String| {
            if let Some(base) = url.strip_suffix("/ws") {
                *url = format!("{base}/connection/websocket");
            }
        };
        point(&mut args.url);
        args.pub_url.iter_mut().for_each(point);
        args.sub_urls.iter_mut().for_each(point);
    }
    if args.scenario == Scenario::Table {
        print!("{}", table(&args.column)?);
        return Ok(true);
    }
    if let Some(ca) = &args.tls_ca {
        client::trust(ca)?;
    }
    client::PACKED.store(args.batch, std::sync::atomic::Ordering::Relaxed);
    let files_before = rlimit::getrlimit(rlimit::Resource::NOFILE).map(|l| l.0).unwrap_or(0);
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(now) if now > files_before => eprintln!("[bench] RLIMIT_NOFILE raised {files_before} -> {now}"),
        Ok(_) => {}
        Err(e) => eprintln!("[bench] RLIMIT_NOFILE: {e}"),
    }
    let sources = match args.source_addrs {
        0 => u8::try_from(args.count.div_ceil(20_000)).unwrap_or(u8::MAX),
        n => n,
    };
    if sources > 1 {
        eprintln!("[bench] connecting from {sources} loopback source addresses");
        client::spread_sources(sources);
    }
    if args.scenario == Scenario::Storm {
        return storm::main(&args);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let report: Report = runtime.block_on(async {
        match args.scenario {
            Scenario::Connections => run::connections(&args).await,
            Scenario::Readers => readers::run(&args).await,
            _ => run::fanout(&args, args.load()?).await,
        }
    })?;
    runtime.shutdown_timeout(Duration::from_secs(1));
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.human());
    }
    Ok(report.adds_up())
}

/// The comparison table from `NAME=FILE` columns.
pub(crate) fn table(columns: &[String]) -> Result<String> {
    if columns.is_empty() {
        bail!("table needs at least one --column NAME=FILE");
    }
    let mut cols = Vec::new();
    for c in columns {
        let Some((name, file)) = c.rsplit_once('=') else { bail!("--column takes NAME=FILE, got {c:?}") };
        let path = PathBuf::from(file);
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let reports = parse_reports(&text).with_context(|| format!("parsing {}", path.display()))?;
        cols.push((name.to_string(), reports));
    }
    Ok(comparison_table(&cols))
}
