//! The generator's side of the wire for both targets: opening WebSocket connections
//! (TCP_NODELAY on), subscribing (a Switchyard `subscribe` command, or NATS
//! `CONNECT`/`SUB`/`PING` after the server's `INFO`), reading deliveries, and publisher
//! connections with their acknowledgement readers and flow control. It also owns the
//! pre-built publish frames ([`Template`]): serialized once per channel, with only the
//! sequence number and timestamp patched per publish. It must never decide what load to
//! offer or compute figures: that is the scenario code's job.
//!
//! Flow control: Switchyard acknowledges each publish with a reply (after the durable
//! write). NATS core has no publish acknowledgement, so a NATS publisher sends a `PING`
//! after each batch of publishes and counts the batch as acknowledged when the `PONG`
//! comes back: the server has then read and routed every publish before it. With
//! [`Flow::Batch`] (the default) a Switchyard publisher follows the same rule: a batch's
//! permits come back when its last reply has, so both targets see the same load shape.
//! [`Flow::Each`] returns a permit per reply (Switchyard only).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::nats::{self, NatsOp};
use super::report::new_hist;

/// Any byte stream a connection runs over (plain TCP or TLS).
pub(crate) trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

pub(crate) type Ws = WebSocketStream<Box<dyn Io>>;

/// How `wss://` servers are verified (set once from `--tls-ca`).
static TLS: std::sync::OnceLock<std::sync::Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();

/// Loopback source addresses connections are spread over (set once from
/// `--source-addrs`): one source address has about 28,000 ephemeral ports toward one
/// server port, so 100,000 connections need several.
static SOURCES: std::sync::OnceLock<Vec<std::net::IpAddr>> = std::sync::OnceLock::new();
/// The next source address, round robin.
static NEXT_SOURCE: AtomicU64 = AtomicU64::new(0);

/// Spreads later connections over `n` loopback source addresses, 127.0.0.1 up.
pub(crate) fn spread_sources(n: u8) {
    let all = (0..n.max(1)).map(|i| std::net::IpAddr::from([127, 0, 0, 1 + i])).collect();
    let _ = SOURCES.set(all);
}

/// A TCP connection to `addr`, from the next source address if several are set.
async fn tcp_connect(host: &str, port: u16) -> std::io::Result<TcpStream> {
    let Some(sources) = SOURCES.get().filter(|s| s.len() > 1) else {
        return TcpStream::connect((host, port)).await;
    };
    let addr = tokio::net::lookup_host((host, port))
        .await?
        .find(|a| a.is_ipv4())
        .ok_or_else(|| std::io::Error::other("no IPv4 address to connect from a loopback source to"))?;
    let source = sources[NEXT_SOURCE.fetch_add(1, Relaxed) as usize % sources.len()];
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind((source, 0).into())?;
    socket.connect(addr).await
}

/// Switchyard subscribers ask for packed pushes (set once from `--batch`).
pub(crate) static PACKED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Trusts the PEM certificates in `ca` for `wss://` URLs.
pub(crate) fn trust(ca: &std::path::Path) -> Result<()> {
    let file = std::fs::File::open(ca).with_context(|| format!("--tls-ca {}", ca.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut std::io::BufReader::new(file)) {
        roots.add(cert?)?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let _ = TLS.set(std::sync::Arc::new(config));
    Ok(())
}

/// Which server protocol to speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// A Switchyard node (its JSON protocol).
    Switchyard,
    /// nats-server over its WebSocket listener (NATS core protocol).
    Nats,
    /// A Switchyard node through Centrifugo's client protocol at `/connection/websocket`
    /// (`--protocol centrifugo`).
    Centrifugo,
}

impl Target {
    /// The name reports use.
    pub fn name(self) -> &'static str {
        match self {
            Target::Switchyard => "switchyard",
            Target::Nats => "nats",
            Target::Centrifugo => "switchyard-centrifugo",
        }
    }

    /// The channel (Switchyard) or subject (NATS) for channel number `i`.
    pub fn channel(self, prefix: &str, i: usize) -> String {
        match self {
            Target::Switchyard | Target::Centrifugo => format!("{prefix}:{i}"),
            Target::Nats => nats::subject(&format!("{prefix}:{i}")),
        }
    }
}

/// When a publisher's permits come back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Flow {
    /// When the whole batch is acknowledged: the last reply (Switchyard) or the `PONG`
    /// (NATS). The same rule for both targets.
    Batch,
    /// One permit per acknowledged publish (Switchyard only; NATS is always `batch`).
    Each,
}

/// How long a handshake or subscribe may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// The generator's read buffer per connection unless a scenario sets its own. tungstenite
/// zero-fills the whole free part of its read buffer before every read, including reads
/// that find nothing: with its 128 KiB default, `memset` took 39% of the generator's CPU in
/// the fanout scenario, and the generator, not the server under test, set the pace.
const READ_BUFFER: usize = 8 * 1024;

/// Opens a WebSocket with TCP_NODELAY and a `read_buffer` (default [`READ_BUFFER`]).
pub(crate) async fn connect(url: &str, read_buffer: Option<usize>) -> Result<Ws> {
    let config = Some(WebSocketConfig::default().read_buffer_size(read_buffer.unwrap_or(READ_BUFFER)));
    let req = url.into_client_request()?;
    let tls = url.starts_with("wss://");
    let host = req.uri().host().context("URL without a host")?.trim_matches(['[', ']']).to_string();
    let port = req.uri().port_u16().unwrap_or(if tls { 443 } else { 80 });
    let tcp = tcp_connect(&host, port).await.with_context(|| format!("connect {url}"))?;
    tcp.set_nodelay(true)?;
    let io: Box<dyn Io> = if tls {
        let tls_config = TLS.get().context("a wss:// URL needs --tls-ca")?.clone();
        let name = rustls::pki_types::ServerName::try_from(host)?;
        Box::new(tokio_rustls::TlsConnector::from(tls_config).connect(name, tcp).await?)
    } else {
        Box::new(tcp)
    };
    let (ws, _resp) =
        tokio_tungstenite::client_async_with_config(req, io, config).await.with_context(|| format!("connect {url}"))?;
    Ok(ws)
}

/// A connection after its handshake; NATS bytes that followed the handshake stay in `parser`.
pub(crate) struct Conn {
    pub ws: Ws,
    pub parser: nats::Parser,
}

/// Connects and, for NATS, does the handshake with `extra` lines sent after `CONNECT`.
async fn open(target: Target, url: &str, read_buffer: Option<usize>, extra: &str) -> Result<Conn> {
    let mut ws = connect(url, read_buffer).await?;
    let mut parser = nats::Parser::new();
    if target == Target::Nats {
        tokio::time::timeout(SETUP_TIMEOUT, nats_handshake(&mut ws, &mut parser, extra))
            .await
            .map_err(|_| anyhow!("NATS handshake with {url} took over {SETUP_TIMEOUT:?}"))??;
    }
    if target == Target::Centrifugo {
        // As centrifuge-js does: `connect` and the subscribe (`extra`) in one frame.
        let mut frame = r#"{"id":1,"connect":{}}"#.to_string();
        if !extra.is_empty() {
            frame.push('\n');
            frame.push_str(extra);
        }
        ws.send(Message::text(frame)).await?;
        let last = if extra.is_empty() { 1 } else { 2 };
        tokio::time::timeout(SETUP_TIMEOUT, wait_reply(&mut ws, last))
            .await
            .map_err(|_| anyhow!("no Centrifugo reply from {url} within {SETUP_TIMEOUT:?}"))??;
    }
    Ok(Conn { ws, parser })
}

/// Reads Centrifugo replies until the one with `id`; fails on an error reply or a close.
async fn wait_reply(ws: &mut Ws, id: u64) -> Result<()> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                for line in t.as_str().split('\n') {
                    let v: serde_json::Value = serde_json::from_str(line)?;
                    if let Some(e) = v.get("error") {
                        bail!("Centrifugo command {} failed: {e}", v["id"]);
                    }
                    if v.get("id").and_then(serde_json::Value::as_u64) == Some(id) {
                        return Ok(());
                    }
                }
            }
            Some(Ok(Message::Close(f))) => bail!("closed by server: {f:?}"),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => bail!("connection ended"),
        }
    }
}

/// Waits for `INFO`, sends `CONNECT`, `extra` and `PING`, and waits for the `PONG`.
async fn nats_handshake(ws: &mut Ws, parser: &mut nats::Parser, extra: &str) -> Result<()> {
    let mut sent = false;
    loop {
        let mut reply_pong = false;
        loop {
            match parser.next()? {
                None => break,
                Some(NatsOp::Info(_)) if !sent => {
                    let lines = format!("{}{extra}PING\r\n", nats::connect_line());
                    ws.send(Message::binary(lines.into_bytes())).await?;
                    sent = true;
                }
                Some(NatsOp::Pong) if sent => return Ok(()),
                Some(NatsOp::Ping) => reply_pong = true,
                Some(NatsOp::Err(e)) => bail!("NATS -ERR {}", String::from_utf8_lossy(e)),
                Some(_) => {}
            }
        }
        if reply_pong {
            ws.send(Message::binary(nats::PONG)).await?;
        }
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => parser.push(&b),
            Some(Ok(Message::Text(t))) => parser.push(t.as_bytes()),
            Some(Ok(Message::Close(f))) => bail!("closed during handshake: {f:?}"),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => bail!("connection ended during handshake"),
        }
    }
}

/// Opens a connection subscribed to `channel` (already mapped by [`Target::channel`]).
pub(crate) async fn subscribe(target: Target, url: &str, channel: &str, read_buffer: Option<usize>) -> Result<Conn> {
    match target {
        Target::Nats => open(target, url, read_buffer, &nats::sub_line(channel, 1)).await,
        Target::Centrifugo => {
            let sub = json!({"id": 2, "subscribe": {"channel": channel}}).to_string();
            open(target, url, read_buffer, &sub).await
        }
        Target::Switchyard => {
            let mut conn = open(target, url, read_buffer, "").await?;
            if PACKED.load(std::sync::atomic::Ordering::Relaxed) {
                // Its reply comes before the subscribe's (id 1), which is all we wait for.
                let cmd = json!({"id": 0, "op": "connect", "batch": true}).to_string();
                conn.ws.feed(Message::text(cmd)).await?;
            }
            let cmd = json!({"id": 1, "op": "subscribe", "channel": channel}).to_string();
            conn.ws.send(Message::text(cmd)).await?;
            tokio::time::timeout(SETUP_TIMEOUT, async {
                loop {
                    match conn.ws.next().await {
                        Some(Ok(Message::Text(t))) => {
                            let v: serde_json::Value = serde_json::from_str(t.as_str())?;
                            if v.get("id").and_then(serde_json::Value::as_u64) == Some(1) {
                                if let Some(e) = v.get("error") {
                                    bail!("subscribe {channel} failed: {e}");
                                }
                                return Ok(());
                            }
                        }
                        Some(Ok(Message::Close(f))) => bail!("closed by server: {f:?}"),
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return Err(e.into()),
                        None => bail!("connection ended"),
                    }
                }
            })
            .await
            .map_err(|_| anyhow!("no reply to subscribe within {SETUP_TIMEOUT:?}"))??;
            Ok(conn)
        }
    }
}

/// Reads a subscriber until `stop` changes; `on_msg` sees each delivery's bytes (the whole
/// push for Switchyard, the payload for NATS). Returns why it ended early, if it did.
pub(crate) async fn read_deliveries(
    target: Target,
    conn: Conn,
    mut stop: watch::Receiver<bool>,
    mut on_msg: impl FnMut(&[u8]),
) -> std::result::Result<(), String> {
    let Conn { mut ws, mut parser } = conn;
    // bytes left over from the NATS handshake
    let mut pending = target == Target::Nats;
    loop {
        if pending {
            pending = false;
            let mut pong = false;
            loop {
                match parser.next() {
                    Ok(None) => break,
                    Ok(Some(NatsOp::Msg { payload, .. })) => on_msg(payload),
                    Ok(Some(NatsOp::Ping)) => pong = true,
                    Ok(Some(NatsOp::Err(e))) => return Err(format!("-ERR {}", String::from_utf8_lossy(e))),
                    Ok(Some(_)) => {}
                    Err(e) => return Err(format!("{e:#}")),
                }
            }
            if pong {
                ws.send(Message::binary(nats::PONG)).await.map_err(|e| e.to_string())?;
            }
        }
        let m = tokio::select! {
            _ = stop.changed() => return Ok(()),
            m = ws.next() => m,
        };
        match m {
            Some(Ok(Message::Text(t))) if target == Target::Switchyard => {
                // One push per frame, or several as JSON lines when packed.
                for b in t.as_bytes().split(|&c| c == b'\n') {
                    if contains(b, b"\"push\":\"message\"") {
                        on_msg(b);
                    } else if contains(b, b"\"push\":\"disconnect\"") {
                        return Err(format!("server pushed {}", String::from_utf8_lossy(b)));
                    }
                }
            }
            Some(Ok(Message::Text(t))) if target == Target::Centrifugo => {
                let mut pong = false;
                for b in t.as_bytes().split(|&c| c == b'\n') {
                    if b == b"{}" {
                        pong = true;
                    } else if contains(b, b"\"pub\":") {
                        on_msg(b);
                    } else if contains(b, b"\"unsubscribe\":") || contains(b, b"\"disconnect\":") {
                        return Err(format!("server pushed {}", String::from_utf8_lossy(b)));
                    }
                }
                if pong {
                    ws.send(Message::text("{}")).await.map_err(|e| e.to_string())?;
                }
            }
            Some(Ok(Message::Text(t))) => {
                parser.push(t.as_bytes());
                pending = true;
            }
            Some(Ok(Message::Binary(b))) if target == Target::Nats => {
                parser.push(&b);
                pending = true;
            }
            Some(Ok(Message::Close(f))) => return Err(format!("closed by server: {f:?}")),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("connection ended".into()),
        }
    }
}

/// Naive substring search (frames are a few hundred bytes).
pub(crate) fn contains(hay: &[u8], needle: &[u8]) -> bool {
    find(hay, needle).is_some()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The publish timestamp (µs) from a delivery: the number after `"t":` (spaces allowed).
pub(crate) fn extract_timestamp(bytes: &[u8]) -> Option<u64> {
    let at = find(bytes, b"\"t\":")? + 4;
    let digits = bytes[at..].iter().skip_while(|b| **b == b' ').take_while(|b| b.is_ascii_digit());
    let mut n: u64 = 0;
    let mut any = false;
    for d in digits {
        n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        any = true;
    }
    any.then_some(n)
}

/// Width of a patched number field: u64::MAX has 20 digits.
const FIELD: usize = 20;

/// A publish frame serialized once; [`Template::build`] patches the sequence number (the
/// command id and `"s"`) and the timestamp `"t"`. Numbers are right-aligned in fixed-width
/// fields padded with spaces, which JSON allows between tokens, so the length never changes.
#[derive(Clone, Debug)]
pub(crate) struct Template {
    bytes: Vec<u8>,
    seq_at: Vec<usize>,
    t_at: usize,
}

impl Template {
    /// `size`: approximate size of the payload (the JSON `data`) in bytes.
    pub(crate) fn new(target: Target, channel: &str, size: usize) -> Template {
        let blank = " ".repeat(FIELD);
        let head = format!("{{\"t\":{blank},\"s\":{blank},\"p\":\"");
        let filler = "x".repeat(size.saturating_sub(head.len() + 2));
        let data = format!("{head}{filler}\"}}");
        let (prefix, suffix) = match target {
            Target::Switchyard => (
                format!("{{\"id\":{blank},\"op\":\"publish\",\"channel\":{},\"data\":", json!(channel)),
                "}".to_string(),
            ),
            Target::Centrifugo => {
                (format!("{{\"id\":{blank},\"publish\":{{\"channel\":{},\"data\":", json!(channel)), "}}".to_string())
            }
            Target::Nats => (nats::pub_header(channel, data.len()), "\r\n".to_string()),
        };
        let bytes = format!("{prefix}{data}{suffix}").into_bytes();
        let t_at = prefix.len() + "{\"t\":".len();
        let s_at = t_at + FIELD + ",\"s\":".len();
        let mut seq_at = vec![s_at];
        if matches!(target, Target::Switchyard | Target::Centrifugo) {
            seq_at.push("{\"id\":".len());
        }
        let mut t = Template { bytes, seq_at, t_at };
        t.patch_in_place(0, 0);
        t
    }

    fn patch_in_place(&mut self, seq: u64, t: u64) {
        let bytes = &mut self.bytes;
        for at in &self.seq_at {
            write_num(&mut bytes[*at..*at + FIELD], seq);
        }
        write_num(&mut bytes[self.t_at..self.t_at + FIELD], t);
    }

    /// A copy of the frame with this sequence number and timestamp.
    pub(crate) fn build(&self, seq: u64, t: u64) -> Vec<u8> {
        let mut bytes = self.bytes.clone();
        for at in &self.seq_at {
            write_num(&mut bytes[*at..*at + FIELD], seq);
        }
        write_num(&mut bytes[self.t_at..self.t_at + FIELD], t);
        bytes
    }
}

/// Writes `n` right-aligned into `dst`, padding with spaces.
fn write_num(dst: &mut [u8], mut n: u64) {
    let mut i = dst.len();
    loop {
        i -= 1;
        dst[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || i == 0 {
            break;
        }
    }
    dst[..i].fill(b' ');
}

/// Acknowledgement counters shared by the publishers of one run.
#[derive(Clone)]
pub(crate) struct AckStats {
    pub acked: Arc<AtomicU64>,
    pub errors: Arc<AtomicU64>,
    /// publish → ack round trip in µs, recorded while `measuring`
    pub rtt: Arc<Mutex<Histogram<u64>>>,
    pub measuring: Arc<AtomicBool>,
}

impl AckStats {
    pub(crate) fn new() -> AckStats {
        AckStats {
            acked: Arc::new(AtomicU64::new(0)),
            errors: Arc::new(AtomicU64::new(0)),
            rtt: Arc::new(Mutex::new(new_hist())),
            measuring: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl Default for AckStats {
    fn default() -> Self {
        AckStats::new()
    }
}

/// A publisher connection: the write half, plus a task reading acknowledgements that
/// returns one permit per acknowledged publish.
pub(crate) struct Publisher {
    target: Target,
    flow: Flow,
    sink: SplitSink<Ws, Message>,
    /// (send instant, publishes covered) per expected acknowledgement, in order
    queue: mpsc::UnboundedSender<(Instant, u64)>,
    reader: tokio::task::JoinHandle<()>,
    /// NATS: the server pinged us; answer with the next batch
    pong_owed: Arc<AtomicBool>,
    /// publishes fed since the last `end_batch`
    unacked: u64,
}

impl Publisher {
    pub(crate) async fn open(
        target: Target,
        flow: Flow,
        url: &str,
        stats: AckStats,
        permits: Arc<Semaphore>,
    ) -> Result<Publisher> {
        let flow = if target == Target::Nats { Flow::Batch } else { flow };
        let Conn { ws, mut parser } = open(target, url, None, "").await?;
        let (sink, mut rx) = ws.split();
        let (queue, queue_rx) = mpsc::unbounded_channel::<(Instant, u64)>();
        let pong_owed = Arc::new(AtomicBool::new(false));
        let owed = pong_owed.clone();
        let reader = tokio::spawn(async move {
            let mut unacked = Unacked { queue: queue_rx, front: None, replies: 0, failed: 0 };
            while let Some(m) = rx.next().await {
                match m {
                    Ok(Message::Text(t)) if target == Target::Switchyard => {
                        let b = t.as_bytes();
                        let error = contains(b, b"\"error\"") && !contains(b, b"\"ok\"");
                        if error && stats.errors.load(Relaxed) < 5 {
                            eprintln!("[bench] publish error: {}", t.as_str());
                        }
                        unacked.reply(error, &stats, &permits);
                    }
                    Ok(Message::Text(t)) if target == Target::Centrifugo => {
                        for b in t.as_bytes().split(|&c| c == b'\n') {
                            if b == b"{}" {
                                // The server's ping: answered with the next batch.
                                owed.store(true, Relaxed);
                                continue;
                            }
                            let error = contains(b, b"\"error\"");
                            if error && stats.errors.load(Relaxed) < 5 {
                                eprintln!("[bench] publish error: {}", String::from_utf8_lossy(b));
                            }
                            unacked.reply(error, &stats, &permits);
                        }
                    }
                    Ok(Message::Binary(b)) if target == Target::Nats => {
                        parser.push(&b);
                        loop {
                            match parser.next() {
                                Ok(None) => break,
                                Ok(Some(NatsOp::Pong)) => unacked.pong(&stats, &permits),
                                Ok(Some(NatsOp::Ping)) => owed.store(true, Relaxed),
                                Ok(Some(NatsOp::Err(e))) => {
                                    if stats.errors.fetch_add(1, Relaxed) < 5 {
                                        eprintln!("[bench] NATS -ERR {}", String::from_utf8_lossy(e));
                                    }
                                }
                                Ok(Some(_)) => {}
                                Err(e) => {
                                    stats.errors.fetch_add(1, Relaxed);
                                    eprintln!("[bench] NATS protocol error: {e:#}");
                                    return;
                                }
                            }
                        }
                    }
                    Ok(Message::Close(f)) => {
                        eprintln!("[bench] server closed a publisher: {f:?}");
                        stats.errors.fetch_add(1, Relaxed);
                        break;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("[bench] publisher error: {e}");
                        stats.errors.fetch_add(1, Relaxed);
                        break;
                    }
                }
            }
        });
        Ok(Publisher { target, flow, sink, queue, reader, pong_owed, unacked: 0 })
    }

    /// Starts a batch of `n` publishes: with [`Flow::Batch`], a Switchyard publisher
    /// expects `n` replies for it (queued before any publish goes out, so no reply can
    /// come before its batch is known).
    pub(crate) fn begin_batch(&mut self, n: u64) {
        if self.target != Target::Nats && self.flow == Flow::Batch && n > 0 {
            let _ = self.queue.send((Instant::now(), n));
        }
    }

    /// Queues one publish frame (from [`Template::build`]) without flushing.
    pub(crate) async fn feed(&mut self, frame: Vec<u8>) -> Result<()> {
        match self.target {
            Target::Switchyard | Target::Centrifugo => {
                if self.flow == Flow::Each {
                    let _ = self.queue.send((Instant::now(), 1));
                }
                let text = String::from_utf8(frame).context("publish frame is not UTF-8")?;
                self.sink.feed(Message::text(text)).await?;
            }
            Target::Nats => {
                self.unacked += 1;
                self.sink.feed(Message::binary(frame)).await?;
            }
        }
        Ok(())
    }

    /// Ends a batch: NATS sends the `PING` that acknowledges it. Then flushes.
    pub(crate) async fn end_batch(&mut self) -> Result<()> {
        if self.target == Target::Centrifugo && self.pong_owed.swap(false, Relaxed) {
            self.sink.feed(Message::text("{}")).await?;
        }
        if self.target == Target::Nats {
            if self.pong_owed.swap(false, Relaxed) {
                self.sink.feed(Message::binary(nats::PONG)).await?;
            }
            if self.unacked > 0 {
                let _ = self.queue.send((Instant::now(), std::mem::take(&mut self.unacked)));
                self.sink.feed(Message::binary(nats::PING)).await?;
            }
        }
        self.sink.flush().await?;
        Ok(())
    }

    pub(crate) async fn close(mut self) {
        let _ = self.sink.close().await;
        self.reader.abort();
    }
}

/// A publisher's batches sent and not yet acknowledged (send instant, publishes), oldest
/// first, and the replies so far to the oldest.
struct Unacked {
    queue: mpsc::UnboundedReceiver<(Instant, u64)>,
    front: Option<(Instant, u64)>,
    replies: u64,
    failed: u64,
}

impl Unacked {
    /// A Switchyard reply: the oldest batch is acknowledged with its last reply.
    fn reply(&mut self, error: bool, stats: &AckStats, permits: &Semaphore) {
        self.replies += 1;
        self.failed += error as u64;
        if self.front.is_none() {
            self.front = self.queue.try_recv().ok();
        }
        if matches!(self.front, Some((_, n)) if self.replies >= n) {
            self.settle(stats, permits);
        }
    }

    /// A NATS `PONG`: the oldest batch is acknowledged.
    fn pong(&mut self, stats: &AckStats, permits: &Semaphore) {
        if self.front.is_none() {
            self.front = self.queue.try_recv().ok();
        }
        self.settle(stats, permits);
    }

    /// Counts the oldest batch and returns its permits.
    fn settle(&mut self, stats: &AckStats, permits: &Semaphore) {
        let Some((at, n)) = self.front.take() else { return };
        let failed = std::mem::take(&mut self.failed).min(n);
        self.replies = 0;
        stats.acked.fetch_add(n - failed, Relaxed);
        stats.errors.fetch_add(failed, Relaxed);
        if failed == 0 && stats.measuring.load(Relaxed) {
            let us = at.elapsed().as_micros() as u64;
            stats.rtt.lock().unwrap().saturating_record(us.max(1));
        }
        permits.add_permits(n as usize);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switchyard_template_is_valid_json_after_patching() {
        let t = Template::new(Target::Switchyard, "bench:3", 100);
        for (seq, ts) in [(0u64, 0u64), (1, 1_763_800_000_123_456), (u64::MAX, u64::MAX)] {
            let frame = t.build(seq, ts);
            assert_eq!(frame.len(), t.bytes.len());
            let v: serde_json::Value = serde_json::from_slice(&frame).unwrap();
            assert_eq!(v["id"].as_u64(), Some(seq));
            assert_eq!(v["op"], "publish");
            assert_eq!(v["channel"], "bench:3");
            assert_eq!(v["data"]["t"].as_u64(), Some(ts));
            assert_eq!(v["data"]["s"].as_u64(), Some(seq));
            assert_eq!(extract_timestamp(&frame), Some(ts));
        }
    }

    #[test]
    fn centrifugo_template_is_a_publish_command() {
        let t = Template::new(Target::Centrifugo, "bench:3", 100);
        let frame = t.build(7, 1_763_800_000_123_456);
        let v: serde_json::Value = serde_json::from_slice(&frame).unwrap();
        assert_eq!(v["id"].as_u64(), Some(7));
        assert_eq!(v["publish"]["channel"], "bench:3");
        assert_eq!(v["publish"]["data"]["s"].as_u64(), Some(7));
        assert_eq!(extract_timestamp(&frame), Some(1_763_800_000_123_456));
    }

    #[test]
    fn nats_template_is_a_pub_with_the_right_length() {
        let t = Template::new(Target::Nats, "bench.7", 100);
        let frame = t.build(42, 1_700_000_000_000_000);
        let mut p = nats::Parser::new();
        // a PUB has the same shape as a MSG without the sid: reuse the parser via a rewrite
        let as_msg = [b"MSG bench.7 1 ".as_slice(), &frame[b"PUB bench.7 ".len()..]].concat();
        p.push(&as_msg);
        match p.next().unwrap().unwrap() {
            NatsOp::Msg { subject, payload, .. } => {
                assert_eq!(subject, b"bench.7");
                let v: serde_json::Value = serde_json::from_slice(payload).unwrap();
                assert_eq!(v["s"].as_u64(), Some(42));
                assert_eq!(extract_timestamp(payload), Some(1_700_000_000_000_000));
                assert_eq!(payload.len(), 100);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn timestamp_extraction() {
        assert_eq!(extract_timestamp(br#"{"push":"message","ts":5,"data":{"t":   123,"s":1}}"#), Some(123));
        assert_eq!(extract_timestamp(br#"{"ts":5}"#), None);
        assert_eq!(extract_timestamp(br#"{"t":"x"}"#), None);
        assert_eq!(extract_timestamp(br#"{"t":99999999999999999999999}"#), None);
        let mut b = [0u8; 5];
        write_num(&mut b, 42);
        assert_eq!(&b, b"   42");
        write_num(&mut b, 0);
        assert_eq!(&b, b"    0");
    }

    #[test]
    fn channel_names_per_target() {
        assert_eq!(Target::Switchyard.channel("bench", 3), "bench:3");
        assert_eq!(Target::Nats.channel("bench", 3), "bench.3");
    }

    #[test]
    fn a_batch_returns_its_permits_with_its_last_reply() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut unacked = Unacked { queue: rx, front: None, replies: 0, failed: 0 };
        let (stats, permits) = (AckStats::new(), Semaphore::new(0));
        tx.send((Instant::now(), 3)).unwrap();
        tx.send((Instant::now(), 1)).unwrap();
        unacked.reply(false, &stats, &permits);
        unacked.reply(true, &stats, &permits);
        assert_eq!(permits.available_permits(), 0, "two replies of three return nothing");
        unacked.reply(false, &stats, &permits);
        assert_eq!(permits.available_permits(), 3);
        assert_eq!((stats.acked.load(Relaxed), stats.errors.load(Relaxed)), (2, 1));
        unacked.reply(false, &stats, &permits); // a batch of one (`--flow each`)
        assert_eq!(permits.available_permits(), 4);
        tx.send((Instant::now(), 64)).unwrap();
        unacked.pong(&stats, &permits); // NATS: the PONG covers the whole batch
        assert_eq!(permits.available_permits(), 68);
        assert_eq!(stats.acked.load(Relaxed), 67);
    }
}
