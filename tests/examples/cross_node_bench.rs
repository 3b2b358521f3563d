//! Cross-node routing benchmark (issue #5): what forwarding over the peer links costs.
//!
//! `cargo run --release -p switchyard-tests --example cross_node_bench`
//!
//! Uses `target/release/switchyard` unless SWITCHYARD_BIN is set (build it first with
//! `cargo build --release -p switchyard`). One etcd and real router processes on
//! loopback, each with a temporary data dir; default durability (`fsync = "batch"`, group
//! commit: a publish is acknowledged and delivered after the fsync that covers it); lease
//! TTL 2 s, coordination round 1 s, P = 16. Progress goes to stderr, the figures to stdout.
//!
//! 1. Publish→deliver latency at a fixed rate (5,000 messages at 1,000/s, each carrying its
//!    send time) with publisher and subscriber on the channel's owner, against three hops:
//!    publisher on gateway n1 → owner n2 → subscriber on gateway n3. Two one-hop cases
//!    are measured too, to show where the time goes.
//! 2. Delivered messages per second, the same total load on a three-node cluster (clients
//!    connected round-robin to all three, so about two thirds of the traffic crosses nodes)
//!    and on a one-node cluster.
//! 3. Handover: 100,000 messages in one channel owned by node A of a two-node cluster, then
//!    SIGTERM to A (draining): time until `history` on B returns all 100,000 with the same
//!    epoch, and B's `switchyard_handover_seconds` / `switchyard_handover_messages_total`.
//!
//! Repetitions, for a sense of the noise: the latency cases run twice, the throughput runs
//! alternate 3-node / 1-node for three rounds, and the handover runs twice (A the leader,
//! A not the leader). About two minutes in all.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use switchyard_proto::partition::partition_of;
use switchyard_tests::etcd::{cluster_view, node_config, wait_converged, Etcd};
use switchyard_tests::serde_json::{json, Value};
use switchyard_tests::{metrics, reply_ok, wait_until, Client, Event, Metrics, Node, DEADLINE};
use tokio::task::JoinHandle;
use tokio::time::Instant;

const P: u32 = 16;
const SECRET: &str = "correct-horse-battery-staple";

/// Part 1: messages per latency case, and the rate they are sent at.
const LAT_MESSAGES: usize = 5_000;
const LAT_RATE: u64 = 1_000;
/// Warm-up messages before each latency case (not measured), and rounds over the cases.
const LAT_WARMUP: u64 = 50;
const LAT_ROUNDS: usize = 2;

/// Part 2: channels, subscribers per channel, publishers, publishes per publisher (a
/// multiple of CHANNELS, so every channel gets the same number), publishes in flight per
/// publisher, and rounds (3-node and 1-node alternate).
const TP_CHANNELS: usize = 64;
const TP_SUBS_PER_CHANNEL: usize = 4;
const TP_PUBLISHERS: usize = 8;
const TP_PER_PUBLISHER: usize = TP_CHANNELS * 160;
const TP_WINDOW: usize = 64;
const TP_ROUNDS: usize = 3;

/// Part 3: messages in the handed-over channel, and publishes in flight while filling.
const HO_MESSAGES: u64 = 100_000;
const HO_WINDOW: usize = 256;

macro_rules! progress {
    ($($arg:tt)*) => { eprintln!("[cross-node] {}", format!($($arg)*)) };
}

fn main() -> Result<()> {
    // Set before any thread starts (the runtime is built below).
    if std::env::var_os("SWITCHYARD_BIN").is_none() {
        let release = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/switchyard");
        std::env::set_var("SWITCHYARD_BIN", release);
    }
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run())
}

// === Helpers ===

/// Microseconds since the first call; every timestamp of this process uses the same base.
fn now_us() -> u64 {
    static BASE: OnceLock<tokio::time::Instant> = OnceLock::new();
    BASE.get_or_init(tokio::time::Instant::now).elapsed().as_micros() as u64
}

fn start(etcd: &Etcd, cluster: &str, id: &str) -> Node {
    Node::start(&format!("{}secret = \"{SECRET}\"\n", node_config(etcd, cluster, id, P, "")))
}

/// The first channel `PREFIX:i` whose partition `map` gives to `node`.
fn channel_owned_by(map: &Value, node: &str, prefix: &str) -> String {
    (0..)
        .map(|i| format!("{prefix}:{i}"))
        .find(|c| map["owners"][partition_of(c, P) as usize] == node)
        .expect("some channel")
}

/// The value at quantile `q` of sorted samples (nearest rank).
fn pct(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((sorted.len() as f64) * q).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn load_avg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// Publishes every `(channel, data)` with at most `window` unacknowledged; returns
/// `(offset, epoch)` of each, in order. `progress` is called with the count acknowledged.
async fn publish_windowed(
    client: &mut Client,
    items: impl IntoIterator<Item = (String, Value)>,
    window: usize,
    mut progress: impl FnMut(usize),
) -> Result<Vec<(u64, String)>> {
    let mut in_flight = VecDeque::with_capacity(window);
    let mut acked = Vec::new();
    let mut take_one = async |client: &mut Client, in_flight: &mut VecDeque<u64>| -> Result<()> {
        let id = in_flight.pop_front().expect("something in flight");
        let ok = reply_ok(client.wait_reply(id).await?)?;
        let offset = ok["offset"].as_u64().with_context(|| format!("no offset in {ok}"))?;
        let epoch = ok["epoch"].as_str().with_context(|| format!("no epoch in {ok}"))?.to_string();
        acked.push((offset, epoch));
        progress(acked.len());
        Ok(())
    };
    for (channel, data) in items {
        if in_flight.len() >= window {
            take_one(client, &mut in_flight).await?;
        }
        in_flight.push_back(client.send_cmd("publish", json!({ "channel": channel, "data": data })).await?);
    }
    while !in_flight.is_empty() {
        take_one(client, &mut in_flight).await?;
    }
    Ok(acked)
}

// === Part 1: latency ===

struct Latency {
    case: String,
    deliver: Vec<u64>,
    ack: Vec<u64>,
    sent: usize,
    elapsed: Duration,
}

/// One latency case: a subscriber on `sub_node`, a publisher on `pub_node`, `channel`.
async fn latency_case(case: &str, pub_node: &Node, sub_node: &Node, channel: &str) -> Result<Latency> {
    let mut sub = Client::connect_to(sub_node.addr()).await?;
    sub.subscribe(channel, json!({})).await?;
    let warm = Arc::new(AtomicU64::new(0));
    let seen_warm = warm.clone();
    let reader: JoinHandle<Result<Vec<u64>>> = tokio::spawn(async move {
        let mut lat = Vec::with_capacity(LAT_MESSAGES);
        while lat.len() < LAT_MESSAGES {
            match sub.next_event(Instant::now() + DEADLINE).await {
                // Nothing for DEADLINE: give up, the caller reports what is missing.
                None => break,
                Some(Event::Push(p)) if p["push"] == "message" => {
                    let now = now_us();
                    if p["data"]["w"].as_bool() == Some(true) {
                        seen_warm.fetch_add(1, Ordering::SeqCst);
                    } else {
                        let t = p["data"]["t"].as_u64().with_context(|| format!("no send time in {p}"))?;
                        lat.push(now.saturating_sub(t));
                    }
                }
                Some(Event::Push(_) | Event::Reply(_)) => {}
                Some(other) => bail!("subscriber stopped receiving: {other:?}"),
            }
        }
        Ok(lat)
    });

    let mut publisher = Client::connect_to(pub_node.addr()).await?;
    for i in 0..LAT_WARMUP {
        publisher.publish(channel, json!({ "w": true, "i": i })).await?;
    }
    wait_until("warm-up messages delivered", DEADLINE, async || Ok(warm.load(Ordering::SeqCst) == LAT_WARMUP)).await?;

    // Open loop: message i is due at start + i/rate; acks are read while waiting for the
    // next one to be due.
    let period = Duration::from_micros(1_000_000 / LAT_RATE);
    let mut sent_at: HashMap<u64, u64> = HashMap::with_capacity(LAT_MESSAGES);
    let mut ack = Vec::with_capacity(LAT_MESSAGES);
    let on_reply = |reply: Value, sent_at: &mut HashMap<u64, u64>, ack: &mut Vec<u64>| -> Result<()> {
        let now = now_us();
        let id = reply["id"].as_u64().with_context(|| format!("reply without id: {reply}"))?;
        reply_ok(reply)?;
        if let Some(t) = sent_at.remove(&id) {
            ack.push(now - t);
        }
        Ok(())
    };
    let started = Instant::now();
    for i in 0..LAT_MESSAGES {
        let due = started + period * i as u32;
        loop {
            match publisher.next_event(due).await {
                None => break,
                Some(Event::Reply(r)) => on_reply(r, &mut sent_at, &mut ack)?,
                Some(other) => bail!("publisher got {other:?}"),
            }
        }
        let t = now_us();
        let id = publisher.send_cmd("publish", json!({ "channel": channel, "data": { "i": i, "t": t } })).await?;
        sent_at.insert(id, t);
        if (i + 1) % 1000 == 0 {
            progress!("  {case}: {} of {LAT_MESSAGES} sent", i + 1);
        }
    }
    let elapsed = started.elapsed();
    while !sent_at.is_empty() {
        match publisher.next_event(Instant::now() + DEADLINE).await {
            None => bail!("{} publishes not acknowledged within {DEADLINE:?}", sent_at.len()),
            Some(Event::Reply(r)) => on_reply(r, &mut sent_at, &mut ack)?,
            Some(other) => bail!("publisher got {other:?}"),
        }
    }
    let mut deliver = reader.await.context("subscriber task")??;
    deliver.sort_unstable();
    ack.sort_unstable();
    Ok(Latency { case: case.to_string(), deliver, ack, sent: LAT_MESSAGES, elapsed })
}

// === Part 2: throughput ===

struct Throughput {
    cluster: String,
    publishes: u64,
    deliveries: u64,
    expected: u64,
    publish_secs: f64,
    deliver_secs: f64,
    /// Share of publishes sent to a node that is not the channel's owner (forwarded).
    forwarded: f64,
    /// Share of subscribers on a node that is not the channel's owner (fed by an upstream).
    upstream_fed: f64,
    /// CPU seconds (user + system) of all router processes, and of this process.
    router_cpu: f64,
    client_cpu: f64,
}

/// utime + stime of a process in seconds (`/proc/<pid>/stat`).
fn cpu_secs(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: f64 = fields.get(11..13).map(|f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// N publishers and M subscribers over TP_CHANNELS channels, clients round-robin over
/// `nodes` (whose ids are `ids`; `map` names each partition's owner).
async fn throughput_run(
    label: &str,
    nodes: &[&Node],
    ids: &[&str],
    map: &Value,
    channels: &[String],
) -> Result<Throughput> {
    let per_channel = (TP_PUBLISHERS * TP_PER_PUBLISHER / channels.len()) as u64;
    let owner = |c: &str| map["owners"][partition_of(c, P) as usize].as_str().unwrap_or_default().to_string();
    let remote_subs = (0..channels.len() * TP_SUBS_PER_CHANNEL)
        .filter(|k| ids[k % ids.len()] != owner(&channels[k / TP_SUBS_PER_CHANNEL]))
        .count();
    let remote_pubs = (0..TP_PUBLISHERS)
        .flat_map(|j| (0..TP_PER_PUBLISHER).map(move |i| (j, i)))
        .filter(|(j, i)| ids[j % ids.len()] != owner(&channels[(j + i) % channels.len()]))
        .count();
    let forwarded = remote_pubs as f64 / (TP_PUBLISHERS * TP_PER_PUBLISHER) as f64;
    let upstream_fed = remote_subs as f64 / (channels.len() * TP_SUBS_PER_CHANNEL) as f64;
    let pids: Vec<String> = nodes.iter().filter_map(|n| n.pid()).map(|p| p.to_string()).collect();
    let delivered = Arc::new(AtomicU64::new(0));
    let last_us = Arc::new(AtomicU64::new(0));
    let mut readers: Vec<JoinHandle<Result<u64>>> = Vec::new();
    let mut k = 0usize;
    for channel in channels {
        for _ in 0..TP_SUBS_PER_CHANNEL {
            let mut c = Client::connect_to(nodes[k % nodes.len()].addr()).await?;
            k += 1;
            c.subscribe(channel, json!({})).await?;
            let (delivered, last_us, channel) = (delivered.clone(), last_us.clone(), channel.clone());
            readers.push(tokio::spawn(async move {
                let mut got = 0u64;
                while got < per_channel {
                    match c.next_event(Instant::now() + DEADLINE).await {
                        None => break,
                        Some(Event::Push(p)) if p["push"] == "message" => {
                            ensure!(p["channel"] == channel.as_str(), "push of another channel: {p}");
                            got += 1;
                            delivered.fetch_add(1, Ordering::Relaxed);
                            last_us.fetch_max(now_us(), Ordering::Relaxed);
                        }
                        Some(Event::Push(_) | Event::Reply(_)) => {}
                        Some(other) => bail!("subscriber of {channel} stopped receiving: {other:?}"),
                    }
                }
                Ok(got)
            }));
        }
    }
    progress!("  {label}: {} subscribers connected and subscribed", readers.len());

    let mut publishers = Vec::new();
    for j in 0..TP_PUBLISHERS {
        publishers.push(Client::connect_to(nodes[j % nodes.len()].addr()).await?);
    }
    let router_cpu0: f64 = pids.iter().map(|p| cpu_secs(p)).sum();
    let client_cpu0 = cpu_secs("self");
    let start_us = now_us();
    let started = Instant::now();
    let mut tasks: Vec<JoinHandle<Result<usize>>> = Vec::new();
    for (j, mut c) in publishers.into_iter().enumerate() {
        let channels = channels.to_vec();
        tasks.push(tokio::spawn(async move {
            let items = (0..TP_PER_PUBLISHER)
                .map(|i| (channels[(j + i) % channels.len()].clone(), json!({ "p": j, "i": i, "t": now_us() })));
            Ok(publish_windowed(&mut c, items, TP_WINDOW, |_| {}).await?.len())
        }));
    }
    let mut publishes = 0u64;
    for t in tasks {
        publishes += t.await.context("publisher task")?? as u64;
    }
    let publish_secs = started.elapsed().as_secs_f64();
    let expected = per_channel * (channels.len() * TP_SUBS_PER_CHANNEL) as u64;
    progress!("  {label}: {} publishes acknowledged in {publish_secs:.2} s", thousands(publishes));
    let mut deliveries = 0u64;
    let mut failures = Vec::new();
    for r in readers {
        match r.await.context("subscriber task")? {
            Ok(n) => deliveries += n,
            Err(e) => failures.push(format!("{e:#}")),
        }
    }
    if let Some(first) = failures.first() {
        bail!("{} of the subscribers failed; first: {first}", failures.len());
    }
    let deliver_secs = (last_us.load(Ordering::SeqCst).saturating_sub(start_us)) as f64 / 1e6;
    let router_cpu = pids.iter().map(|p| cpu_secs(p)).sum::<f64>() - router_cpu0;
    let client_cpu = cpu_secs("self") - client_cpu0;
    progress!("  {label}: {} of {} deliveries in {deliver_secs:.2} s", thousands(deliveries), thousands(expected));
    Ok(Throughput {
        cluster: label.to_string(),
        publishes,
        deliveries,
        expected,
        publish_secs,
        deliver_secs,
        forwarded,
        upstream_fed,
        router_cpu,
        client_cpu,
    })
}

// === Part 3: handover ===

#[derive(Default)]
struct Handover {
    case: String,
    fill_rate: f64,
    map_moved_ms: Option<f64>,
    history_ms: Option<f64>,
    a_exited_ms: Option<f64>,
    verify_ms: f64,
    messages_on_b: usize,
    log_line: Option<String>,
    seconds_sum: f64,
    seconds_count: f64,
    seconds_max_le: Option<String>,
    messages_total: f64,
    ok: f64,
    lost: f64,
    error: Option<String>,
}

fn handover_metrics(m: &Metrics) -> (f64, f64, f64, f64, f64) {
    (
        m.value("switchyard_handover_seconds_sum", &[]).unwrap_or(0.0),
        m.value("switchyard_handover_seconds_count", &[]).unwrap_or(0.0),
        m.value("switchyard_handover_messages_total", &[]).unwrap_or(0.0),
        m.value("switchyard_handovers_total", &[("result", "ok")]).unwrap_or(0.0),
        m.value("switchyard_handovers_total", &[("result", "lost")]).unwrap_or(0.0),
    )
}

/// Cumulative bucket counts `(le, count)` of histogram `name`, in bucket order.
fn buckets(m: &Metrics, name: &str) -> Vec<(String, f64)> {
    let prefix = format!("{name}_bucket{{");
    m.text
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?.to_string();
            let v: f64 = l.rsplit(' ').next()?.parse().ok()?;
            Some((le, v))
        })
        .collect()
}

/// True when the process is gone or a zombie (exited, not reaped yet).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().next()) == Some("Z"),
    }
}

/// A fresh two-node cluster `cluster`; node A is the leader when `a_leads`, else the other
/// one. Fills one channel owned by A, SIGTERMs A and times the handover to B.
async fn handover(etcd: &Etcd, cluster: &str, a_leads: bool, out: &mut Handover) -> Result<()> {
    let ids = [format!("{cluster}-1"), format!("{cluster}-2")];
    let mut nodes = [start(etcd, cluster, &ids[0]), start(etcd, cluster, &ids[1])];
    let map = wait_converged(etcd, cluster, &[&nodes[0], &nodes[1]], &[&ids[0], &ids[1]]).await?;
    let leader = ids.iter().position(|id| map["leader"] == id.as_str()).context("the leader is one of the two")?;
    let ai = if a_leads { leader } else { 1 - leader };
    let (a_id, b_id) = (ids[ai].clone(), ids[1 - ai].clone());
    let [n0, n1] = &mut nodes;
    let (a, b) = if ai == 0 { (n0, &*n1) } else { (n1, &*n0) };
    let channel = channel_owned_by(&map, &a_id, "big");
    let p = partition_of(&channel, P);
    progress!("{}: leader {}; filling {channel} (partition {p}) on its owner A = {a_id}", out.case, map["leader"]);

    let mut filler = Client::connect_to(a.addr()).await?;
    let started = Instant::now();
    let items = (0..HO_MESSAGES).map(|i| (channel.clone(), json!(i)));
    let acked = publish_windowed(&mut filler, items, HO_WINDOW, |n| {
        if n % 20_000 == 0 {
            progress!("  filled {} of {}", thousands(n as u64), thousands(HO_MESSAGES));
        }
    })
    .await?;
    out.fill_rate = HO_MESSAGES as f64 / started.elapsed().as_secs_f64();
    let epoch = acked[0].1.clone();
    ensure!(acked.iter().all(|(_, e)| *e == epoch), "the epoch changed while filling");
    ensure!(acked.iter().enumerate().all(|(i, (o, _))| *o == i as u64 + 1), "offsets are not 1..={HO_MESSAGES}");
    drop(filler);
    progress!("  {} messages acknowledged ({:.0} publishes/s), epoch {epoch}", thousands(HO_MESSAGES), out.fill_rate);

    let before = handover_metrics(&metrics(b).await?);
    let mut reader = Client::connect_to(b.addr()).await?;
    let a_pid = a.pid().context("A runs")?;
    progress!("  SIGTERM to A = {a_id} (draining); polling B = {b_id} every 25 ms");
    let t0 = Instant::now();
    a.sigterm();
    let ms = |t: Instant| t.duration_since(t0).as_secs_f64() * 1e3;
    let deadline = t0 + Duration::from_secs(120);
    loop {
        let now = Instant::now();
        ensure!(now < deadline, "no complete history on {b_id} within 120 s of SIGTERM");
        if out.a_exited_ms.is_none() && exited(a_pid) {
            out.a_exited_ms = Some(ms(now));
            progress!("  {a_id} exited after {:.0} ms", ms(now));
        }
        if out.map_moved_ms.is_none() {
            let view = cluster_view(b).await.unwrap_or(Value::Null);
            if view["owners"][p as usize] == b_id.as_str() {
                out.map_moved_ms = Some(ms(Instant::now()));
                progress!(
                    "  {b_id} routes partition {p} to itself after {:.0} ms (map epoch {})",
                    ms(Instant::now()),
                    view["epoch"]
                );
            }
        } else {
            // Routed here now: a history call waits while the partition is being pulled.
            let reply =
                reader.cmd("history", json!({ "channel": channel, "since": HO_MESSAGES - 1, "limit": 1 })).await;
            match reply {
                Ok(r) if r.get("ok").is_some() => {
                    let ok = &r["ok"];
                    let last = ok["messages"][0]["offset"].as_u64();
                    if ok["epoch"] != epoch.as_str() {
                        bail!(
                            "{b_id} answers history with epoch {} (was {epoch}), last offset {last:?}: the partition \
                             started afresh instead of being handed over",
                            ok["epoch"]
                        );
                    }
                    if last == Some(HO_MESSAGES) {
                        out.history_ms = Some(ms(Instant::now()));
                        break;
                    }
                    progress!("  {b_id} history: epoch matches, last offset {last:?}; polling");
                }
                Ok(r) => progress!("  {b_id} history: {}", r["error"]),
                Err(e) => progress!("  {b_id} history: {e:#}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    progress!("  {b_id} has offset {} under epoch {epoch} after {:.0} ms", HO_MESSAGES, out.history_ms.unwrap_or(0.0));

    let verify = Instant::now();
    let h = reader.history_all(&channel).await?;
    out.verify_ms = verify.elapsed().as_secs_f64() * 1e3;
    out.messages_on_b = h.messages.len();
    ensure!(h.epoch == epoch, "full history on {b_id} has epoch {} (was {epoch})", h.epoch);
    let offsets = h.offsets();
    ensure!(
        offsets.len() == HO_MESSAGES as usize && offsets.iter().enumerate().all(|(i, o)| *o == i as u64 + 1),
        "{b_id}'s history is not offsets 1..={HO_MESSAGES}: {} messages, first {:?}, last {:?}",
        offsets.len(),
        offsets.first(),
        offsets.last()
    );
    ensure!(
        h.messages.iter().enumerate().all(|(i, m)| m["data"] == json!(i)),
        "{b_id}'s history has other data than was published"
    );
    progress!(
        "  full history on {b_id} verified: {} messages, epoch {epoch} ({:.0} ms)",
        h.messages.len(),
        out.verify_ms
    );

    let status = a.wait_exit(Duration::from_secs(90));
    if out.a_exited_ms.is_none() {
        out.a_exited_ms = Some(ms(Instant::now()));
    }
    progress!("  {a_id} exited ({status}) after {:.0} ms", out.a_exited_ms.unwrap_or(0.0));

    let m = metrics(b).await?;
    let after = handover_metrics(&m);
    out.seconds_sum = after.0 - before.0;
    out.seconds_count = after.1 - before.1;
    out.messages_total = after.2 - before.2;
    out.ok = after.3 - before.3;
    out.lost = after.4 - before.4;
    let all = buckets(&m, "switchyard_handover_seconds");
    let total = all.last().map(|b| b.1).unwrap_or(0.0);
    out.seconds_max_le = all.iter().find(|(_, c)| *c >= total).map(|(le, _)| le.clone());
    let needle = format!("partition={p} ");
    out.log_line = b
        .stderr()
        .lines()
        .find(|l| l.contains("partition handed over") && l.contains(&needle))
        .map(|l| l.split("partition handed over").nth(1).unwrap_or(l).trim().to_string());
    Ok(())
}

// === Main ===

async fn run() -> Result<()> {
    now_us();
    let bin = switchyard_tests::router_bin();
    ensure!(bin.exists(), "router binary {} not found: cargo build --release -p switchyard", bin.display());
    progress!(
        "router {}; {} CPUs; load average {}; fsync = batch (default); P = {P}",
        bin.display(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        load_avg()
    );
    if load_avg().split(' ').next().and_then(|l| l.parse::<f64>().ok()).is_some_and(|l| l > 1.0) {
        progress!("warning: the machine is busy (load average {}); figures will be noisy", load_avg());
    }
    let mut loads = vec![("part 1", load_avg())];
    let etcd = Etcd::start().await;

    // --- Part 1 ---
    let (n1, n2, n3) = (start(&etcd, "x3", "n1"), start(&etcd, "x3", "n2"), start(&etcd, "x3", "n3"));
    let map = wait_converged(&etcd, "x3", &[&n1, &n2, &n3], &["n1", "n2", "n3"]).await?;
    progress!("part 1: 3-node cluster up (leader {}, map epoch {})", map["leader"], map["epoch"]);
    let cases: [(&str, &Node, &Node, &str); 4] = [
        ("owner-local: pub n2, sub n2 (owner n2)", &n2, &n2, "lat-a"),
        ("three hops: pub n1 -> owner n2 -> sub n3", &n1, &n3, "lat-b"),
        ("one hop in: pub n1 -> owner n2, sub n2", &n1, &n2, "lat-c"),
        ("one hop out: pub n2 (owner), sub n3", &n2, &n3, "lat-d"),
    ];
    let mut latencies = Vec::new();
    for round in 1..=LAT_ROUNDS {
        for (case, pub_node, sub_node, prefix) in cases {
            let channel = channel_owned_by(&map, "n2", &format!("{prefix}{round}"));
            let case = format!("{case} #{round}");
            progress!("{case}: channel {channel}, {LAT_WARMUP} warm-up, then {LAT_MESSAGES} at {LAT_RATE}/s");
            let l = latency_case(&case, pub_node, sub_node, &channel).await.with_context(|| case.clone())?;
            progress!(
                "  {case}: deliver p50 {} us, p99 {} us, max {} us ({} of {} received)",
                pct(&l.deliver, 0.5),
                pct(&l.deliver, 0.99),
                l.deliver.last().copied().unwrap_or(0),
                l.deliver.len(),
                l.sent
            );
            latencies.push(l);
        }
    }

    // --- Part 2 ---
    loads.push(("part 2", load_avg()));
    let s1 = start(&etcd, "x1", "s1");
    let map1 = wait_converged(&etcd, "x1", &[&s1], &["s1"]).await?;
    progress!(
        "part 2: {TP_PUBLISHERS} publishers x {TP_PER_PUBLISHER} publishes ({TP_WINDOW} in flight each), \
         {TP_CHANNELS} channels x {TP_SUBS_PER_CHANNEL} subscribers; 3-node and 1-node alternate, {TP_ROUNDS} rounds"
    );
    let mut throughputs = Vec::new();
    for round in 1..=TP_ROUNDS {
        for (label, nodes, ids, map) in
            [("3 nodes", vec![&n1, &n2, &n3], vec!["n1", "n2", "n3"], &map), ("1 node", vec![&s1], vec!["s1"], &map1)]
        {
            // Fresh channel names each run, so no run reads another's history.
            let channels: Vec<String> = (0..TP_CHANNELS).map(|i| format!("tp{round}n{}:{i}", nodes.len())).collect();
            let label = format!("{label} #{round}");
            let t = throughput_run(&label, &nodes, &ids, map, &channels).await.with_context(|| label.clone())?;
            throughputs.push(t);
        }
    }
    drop((n1, n2, n3, s1));

    // --- Part 3 ---
    loads.push(("part 3", load_avg()));
    let mut handovers = Vec::new();
    for (cluster, a_leads, case) in [("hl", true, "A is the leader"), ("hf", false, "A is not the leader")] {
        let mut ho = Handover { case: case.to_string(), ..Default::default() };
        progress!("part 3 ({case}): 2-node cluster {cluster}");
        if let Err(e) = handover(&etcd, cluster, a_leads, &mut ho).await {
            progress!("part 3 ({case}) FAILED: {e:#}");
            ho.error = Some(format!("{e:#}"));
        }
        handovers.push(ho);
    }

    // --- Figures ---
    loads.push(("end", load_avg()));
    println!();
    println!(
        "load average (1, 5, 15 min) at the start of each part: {}",
        loads.iter().map(|(part, l)| format!("{part}: {l}")).collect::<Vec<_>>().join("; ")
    );
    println!(
        "== 1. publish->deliver latency, {LAT_MESSAGES} messages at {LAT_RATE}/s per case, 3-node cluster, P = {P}, \
         fsync = batch =="
    );
    println!(
        "{:<45} {:>8} {:>8} {:>8} {:>9} {:>9} {:>10} {:>7}",
        "case (microseconds)", "p50", "p99", "max", "ack p50", "ack p99", "received", "send s"
    );
    for l in &latencies {
        println!(
            "{:<45} {:>8} {:>8} {:>8} {:>9} {:>9} {:>10} {:>7.2}",
            l.case,
            pct(&l.deliver, 0.5),
            pct(&l.deliver, 0.99),
            l.deliver.last().copied().unwrap_or(0),
            pct(&l.ack, 0.5),
            pct(&l.ack, 0.99),
            format!("{}/{}", l.deliver.len(), l.sent),
            l.elapsed.as_secs_f64()
        );
    }
    println!(
        "(send s: how long sending took, {:.2} s when the publisher kept the rate)",
        (LAT_MESSAGES - 1) as f64 / LAT_RATE as f64
    );
    println!();
    println!(
        "== 2. delivered messages/s: {TP_PUBLISHERS} publishers x {TP_PER_PUBLISHER} publishes ({TP_WINDOW} in flight), \
         {TP_CHANNELS} channels x {TP_SUBS_PER_CHANNEL} subscribers, clients round-robin over the nodes =="
    );
    println!(
        "{:<12} {:>10} {:>16} {:>8} {:>13} {:>12} {:>10} {:>10} {:>15} {:>15}",
        "cluster",
        "publishes",
        "deliveries",
        "seconds",
        "deliveries/s",
        "publishes/s",
        "forwarded",
        "upstream",
        "router CPU s/1M",
        "client CPU s/1M"
    );
    for t in &throughputs {
        let per_m = |cpu: f64| cpu / t.deliveries as f64 * 1e6;
        println!(
            "{:<12} {:>10} {:>16} {:>8.2} {:>13} {:>12} {:>9.0}% {:>9.0}% {:>15.1} {:>15.1}",
            t.cluster,
            thousands(t.publishes),
            format!("{}/{}", thousands(t.deliveries), thousands(t.expected)),
            t.deliver_secs,
            thousands((t.deliveries as f64 / t.deliver_secs) as u64),
            thousands((t.publishes as f64 / t.publish_secs) as u64),
            t.forwarded * 100.0,
            t.upstream_fed * 100.0,
            per_m(t.router_cpu),
            per_m(t.client_cpu)
        );
    }
    println!("(forwarded: publishes sent to a node that is not the owner; upstream: subscribers on a non-owner node;");
    println!(" router CPU: user+system seconds of all the cluster's router processes per million deliveries)");
    println!();
    println!(
        "== 3. handover of a partition holding {} messages (2 nodes, SIGTERM to its owner A = draining) ==",
        thousands(HO_MESSAGES)
    );
    let opt = |v: Option<f64>| v.map(|v| format!("{v:.0} ms")).unwrap_or_else(|| "-".into());
    for ho in &handovers {
        println!("-- {} --", ho.case);
        if let Some(e) = &ho.error {
            println!("FAILED: {e}");
        }
        println!("fill: {:.0} publishes/s (pipelined, {HO_WINDOW} in flight, to the owner)", ho.fill_rate);
        println!("SIGTERM -> B routes the partition to itself: {}", opt(ho.map_moved_ms));
        println!(
            "SIGTERM -> history on B has all {} under the same epoch: {}",
            thousands(HO_MESSAGES),
            opt(ho.history_ms)
        );
        println!("SIGTERM -> A exited: {}", opt(ho.a_exited_ms));
        println!("full history read back from B afterwards: {} messages in {:.0} ms", ho.messages_on_b, ho.verify_ms);
        println!(
            "B: switchyard_handover_seconds +count {} +sum {:.3} s (every observation <= {} s); \
             switchyard_handovers_total ok +{} lost +{}; switchyard_handover_messages_total +{}",
            ho.seconds_count,
            ho.seconds_sum,
            ho.seconds_max_le.as_deref().unwrap_or("-"),
            ho.ok,
            ho.lost,
            ho.messages_total
        );
        println!("B's log line for the partition: {}", ho.log_line.as_deref().unwrap_or("-"));
    }
    Ok(())
}
