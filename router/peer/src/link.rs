//! Outgoing peer links: one multiplexed WebSocket per remote node, reconnecting with backoff.
//!
//! It owns the connection to each peer's `/peer` endpoint (authenticated by the cluster
//! secret), the bounded queue of requests waiting for the link, the table of requests
//! waiting for their reply, and the routing of pushes that arrive on it to their upstream
//! subscriptions (noticing each drop, so those resubscribe). It answers a request that the
//! acceptor's wire version cannot read (`Op::min_wire`) itself, without sending it. A
//! connected link pings its peer every [`PING_EVERY`], and its socket gives up on data the
//! peer's kernel has not acknowledged for [`SILENCE`] (`TCP_USER_TIMEOUT`): a peer cut off
//! by the network (which never closes the socket) takes its link down within about that
//! long, while a peer that is only busy (its kernel still acknowledges) keeps it. The set
//! of peers whose link is up is published for the cluster's reachability reports.
//! It must never block a caller on a full queue or a dead peer:
//! a full queue is `unavailable` at once, and every request has a deadline.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

use crate::wire::{self, Answer, Frame, Op, WireError};
use switchyard_core::outbox::Outbox;
use switchyard_metrics::Metrics;
use switchyard_proto::partition::Members;
use switchyard_proto::protocol::OpError;
use switchyard_proto::refusal::Refusal;

/// Requests that may wait for one link before callers get `unavailable`.
const QUEUE: usize = 4096;
/// How often a connected link pings its peer.
pub(crate) const PING_EVERY: Duration = Duration::from_millis(250);
/// How long data sent on a link may stay unacknowledged by the peer's kernel before the
/// link counts as down and reconnects (the socket's `TCP_USER_TIMEOUT`).
pub(crate) const SILENCE: Duration = Duration::from_secs(1);
/// Deadline of one connect (TCP, TLS, upgrade).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The peers whose link is up, as [`Links::reachable`] publishes it.
pub type Reachable = Arc<BTreeSet<String>>;

type Waiter = oneshot::Sender<Result<Answer, WireError>>;

/// A request waiting for the link: its id, its encoded frame, and the lowest wire version
/// of an acceptor that reads it ([`Op::min_wire`]).
type Queued = (u64, Vec<u8>, u32);

/// How the message of an error for a request whose reply never came ends: the owner may
/// or may not have run it (for people: the caller acts on [`Refusal::Lost`]).
const OUTCOME_UNKNOWN: &str = "outcome unknown";

/// An error made here because the link failed before the reply came (the owner may or
/// may not have run the request), as opposed to an answer from the owner.
pub(crate) fn lost(message: String) -> WireError {
    WireError::op(&OpError::refused(Refusal::Lost, message))
}

/// The answer to a request the acceptor's wire `version` would misread: it was not sent.
fn too_old(peer: &str, version: u32) -> WireError {
    let message = format!(
        "node {peer} runs an older version (peer wire {version}) without this operation (presence, or \
         history read backwards); try again after the upgrade"
    );
    WireError::op(&OpError::new(switchyard_proto::protocol::ErrorCode::Unavailable, message))
}

/// One peer link.
pub(crate) struct Link {
    peer: String,
    /// Requests for the connection: id, encoded frame, and the wire version the acceptor
    /// must read for it ([`Op::min_wire`]).
    tx: mpsc::Sender<Queued>,
    /// The wire version the acceptor named when the link last came up (`u32::MAX` before
    /// it ever did): an op it does not know is refused here, never sent.
    acceptor_wire: AtomicU32,
    pending: Mutex<HashMap<u64, Waiter>>,
    next_id: AtomicU64,
    /// Upstream subscriptions whose pushes arrive on this link, by their id. Read for
    /// every push (lock-free), replaced when one is added or removed.
    subs: ArcSwap<HashMap<u64, Arc<dyn PushTarget>>>,
    /// Bumped every time the connection drops: upstreams on it must resubscribe.
    down: watch::Sender<u64>,
}

/// How this node dials its peers.
pub(crate) struct Dial {
    /// The cluster secret, sent on every connect.
    pub(crate) secret: String,
    /// Verifies `https://` peers; None refuses them.
    pub(crate) tls: Option<Arc<rustls::ClientConfig>>,
    /// Whether the secret may cross a plaintext link.
    pub(crate) allow_plaintext: bool,
    /// The local address links are dialed from (this node's listening address, when it is
    /// a specific one): peer traffic leaves from the address peers know the node by.
    pub(crate) bind: Option<IpAddr>,
}

/// Any byte stream a link runs over (plain TCP or TLS).
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// What the links read of their node: where peers are, whether it is shutting down, and
/// the metrics they count in.
pub(crate) struct LinkEnv {
    /// The member list (each member's peer URL).
    pub(crate) members: watch::Receiver<Arc<Members>>,
    /// Flips to true when the node starts shutting down.
    pub(crate) shutdown: watch::Receiver<bool>,
    /// The node's metrics.
    pub(crate) metrics: Arc<Metrics>,
}

/// Where a link hands the pushes that arrive for one upstream subscription.
pub(crate) trait PushTarget: Send + Sync {
    /// A push for subscription `sub`; outboxes lent to this burst go in `lent`, flushed
    /// once per frame.
    fn on_push(&self, sub: u64, offset: u64, frame: String, end: bool, lent: &mut Vec<Arc<Outbox>>);

    /// Presence news (a native `join` or `leave` push) for subscription `sub`: it has no
    /// offset.
    fn on_event(&self, sub: u64, frame: String, lent: &mut Vec<Arc<Outbox>>);
}

/// Every outgoing link of a node, created on first use.
pub(crate) struct Links {
    /// Itself, for the connection tasks: they stop once the links are dropped.
    me: Weak<Links>,
    env: LinkEnv,
    dial: Arc<Dial>,
    links: ArcSwap<HashMap<String, Arc<Link>>>,
    /// The peers whose link is up now.
    reachable: watch::Sender<Reachable>,
}

impl Links {
    /// The links of a node, dialed as `dial` says.
    pub(crate) fn new(env: LinkEnv, dial: Dial) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            me: me.clone(),
            env,
            dial: Arc::new(dial),
            links: ArcSwap::from_pointee(HashMap::new()),
            reachable: watch::Sender::new(Arc::default()),
        })
    }

    /// The peers whose link is up, changing whenever a link comes up or goes down.
    pub(crate) fn reachable(&self) -> watch::Receiver<Reachable> {
        self.reachable.subscribe()
    }

    /// Records that the link to `peer` is `up` (or not).
    fn set_reachable(&self, peer: &str, up: bool) {
        self.reachable.send_if_modified(|set| {
            if set.contains(peer) == up {
                return false;
            }
            let mut next = BTreeSet::clone(set);
            if up {
                next.insert(peer.to_string());
            } else {
                next.remove(peer);
            }
            *set = Arc::new(next);
            true
        });
    }

    /// The link to `peer`, created (and its connection task started) on first use.
    pub(crate) fn link(&self, peer: &str) -> Arc<Link> {
        if let Some(l) = self.links.load().get(peer) {
            return l.clone();
        }
        let mut created = None;
        self.links.rcu(|map| {
            // rcu may run this more than once: only the last run's link is kept.
            created = None;
            let mut map = HashMap::clone(map);
            if !map.contains_key(peer) {
                let (tx, rx) = mpsc::channel(QUEUE);
                let link = Arc::new(Link {
                    peer: peer.to_string(),
                    tx,
                    acceptor_wire: AtomicU32::new(u32::MAX),
                    pending: Mutex::new(HashMap::new()),
                    next_id: AtomicU64::new(1),
                    subs: ArcSwap::from_pointee(HashMap::new()),
                    down: watch::channel(0).0,
                });
                created = Some((link.clone(), rx));
                map.insert(peer.to_string(), link);
            }
            map
        });
        if let Some((link, rx)) = created {
            tokio::spawn(run(self.me.clone(), self.dial.clone(), link, rx));
        }
        self.links.load().get(peer).cloned().expect("link just inserted")
    }

    /// Queues `op` for `peer` tagged with map `epoch` now (so requests from one caller keep
    /// their order on the link); the returned [`Pending`] waits for the reply.
    pub(crate) fn send(&self, peer: &str, epoch: u64, op: &Op) -> Result<Pending, WireError> {
        self.link(peer).send(epoch, op)
    }
}

impl Link {
    /// Queues `op` on this link; see [`Links::send`].
    pub(crate) fn send(self: &Arc<Self>, epoch: u64, op: &Op) -> Result<Pending, WireError> {
        let (link, peer) = (self.clone(), &self.peer);
        let need = op.min_wire();
        let known = self.acceptor_wire.load(Ordering::Relaxed);
        if need > known {
            return Err(too_old(peer, known));
        }
        let id = link.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        link.pending.lock().expect("pending").insert(id, tx);
        let bytes = wire::encode_request(id, epoch, op);
        if link.tx.try_send((id, bytes, need)).is_err() {
            link.pending.lock().expect("pending").remove(&id);
            return Err(WireError::op(&OpError::refused(Refusal::Unavailable, format!("peer link to {peer} is full"))));
        }
        Ok(Pending { link, id, rx })
    }
}

/// A request on a link, waiting for its reply. Dropped unanswered (its caller gave up or
/// went away), it leaves the link's table: no reply slot outlives its waiter.
pub(crate) struct Pending {
    link: Arc<Link>,
    id: u64,
    rx: oneshot::Receiver<Result<Answer, WireError>>,
}

impl Pending {
    /// Waits up to `limit` for the reply.
    pub(crate) async fn wait(mut self, limit: Duration) -> Result<Answer, WireError> {
        let peer = self.link.peer.clone();
        match tokio::time::timeout(limit, &mut self.rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(lost(format!("peer link to {peer} lost; {OUTCOME_UNKNOWN}"))),
            Err(_) => Err(lost(format!("no reply from {peer} within {limit:?}; {OUTCOME_UNKNOWN}"))),
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.link.pending.lock().expect("pending").remove(&self.id);
    }
}

impl Link {
    /// Routes pushes tagged `sub` to `upstream`.
    pub(crate) fn register(&self, sub: u64, upstream: Arc<dyn PushTarget>) {
        self.subs.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.insert(sub, upstream.clone());
            m
        });
    }

    /// Stops routing pushes tagged `sub`.
    pub(crate) fn unregister(&self, sub: u64) {
        self.subs.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.remove(&sub);
            m
        });
    }

    /// Changes every time the connection drops.
    pub(crate) fn downs(&self) -> watch::Receiver<u64> {
        self.down.subscribe()
    }

    fn fail_pending(&self, why: &str) {
        let waiters: Vec<Waiter> = self.pending.lock().expect("pending").drain().map(|(_, w)| w).collect();
        for w in waiters {
            let _ = w.send(Err(lost(format!("peer link to {} {why}", self.peer))));
        }
    }
}

/// Why a link's connection failed or ended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LinkError {
    /// The peer's URL is `http://` and plaintext links are off.
    #[error("refusing a plaintext link to {0} (cluster.allow_plaintext_peers = false)")]
    Plaintext(String),
    /// The peer's URL is `https://` and no CA verifies it.
    #[error("peer URL is https:// but cluster.peer_ca_file is not set")]
    NoCa,
    /// The member list has no address for the peer.
    #[error("no address for node {0}")]
    NoAddress(String),
    /// The peer's URL or the secret cannot go into an upgrade request.
    #[error("bad peer request: {0}")]
    Request(String),
    /// Connecting (TCP, TLS) failed.
    #[error("connecting failed: {0}")]
    Io(#[from] std::io::Error),
    /// The TLS handshake with the peer failed.
    #[error("TLS with the peer failed: {0}")]
    Tls(std::io::Error),
    /// The WebSocket upgrade or the connection failed.
    #[error("peer WebSocket failed: {0}")]
    Ws(#[from] tokio_tungstenite::tungstenite::Error),
    /// The connect took longer than its deadline.
    #[error("connect timed out")]
    Timeout,
    /// The peer sent what this side never accepts.
    #[error("peer sent a request on an outgoing link")]
    Unexpected,
    /// The peer sent bytes that are no frame.
    #[error("undecodable frame: {0}")]
    Decode(#[from] wire::DecodeError),
    /// The peer closed the link.
    #[error("closed")]
    Closed,
}

/// Keeps one link connected while the node lives: connect, pump, reconnect with backoff.
#[tracing::instrument(name = "peer_link", skip_all, fields(peer = %link.peer, side = "dialed"))]
async fn run(links: Weak<Links>, dial: Arc<Dial>, link: Arc<Link>, mut rx: mpsc::Receiver<Queued>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let Some(n) = links.upgrade() else { return };
        if *n.env.shutdown.borrow() {
            return;
        }
        let url = n.env.members.borrow().get(&link.peer).map(|m| m.peer_url.clone());
        let metrics = n.env.metrics.clone();
        drop(n);
        let mut up_since = None;
        let result = match url {
            Some(url) => pump(&url, &dial, &links, &link, &mut rx, &metrics, &mut up_since).await,
            None => Err(LinkError::NoAddress(link.peer.clone())),
        };
        metrics.peer_link_up.with_label_values(&[&link.peer]).set(0);
        if let Some(n) = links.upgrade() {
            n.set_reachable(&link.peer, false);
        }
        if let Err(e) = result {
            tracing::debug!(error = %e, "peer link down");
        }
        link.fail_pending(&format!("lost; {OUTCOME_UNKNOWN}"));
        link.down.send_modify(|n| *n += 1);
        // While waiting to reconnect, requests queued for a peer that left the cluster fail
        // at once: their callers re-route by the map that replaces it (a failover).
        let Some(mut members) = links.upgrade().map(|n| n.env.members.clone()) else { return };
        // A link that stayed up a while starts its reconnects afresh: a peer back from a
        // cut or a restart is linked again within tens of milliseconds.
        if up_since.is_some_and(|t: tokio::time::Instant| t.elapsed() >= SILENCE) {
            backoff = Duration::from_millis(50);
        }
        let wake = tokio::time::Instant::now() + backoff;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => break,
                changed = members.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    if !members.borrow_and_update().contains_key(&link.peer) {
                        link.fail_pending(&format!("lost: {} left the cluster; {OUTCOME_UNKNOWN}", link.peer));
                    }
                }
            }
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// A connected link, and the wire version the acceptor named in its answer to the upgrade
/// ([`wire::WIRE_HEADER`]; 0 without: its errors go through [`wire::from_legacy`]).
type Connected = (tokio_tungstenite::WebSocketStream<Box<dyn Io>>, u32);

/// Connects to `url` (`http://` or `https://`) and upgrades to the `/peer` WebSocket,
/// sending the secret only over TLS unless plaintext peers are allowed.
async fn connect(url: &str, dial: &Dial) -> Result<Connected, LinkError> {
    let tls = url.starts_with("https://");
    if !tls && !dial.allow_plaintext {
        return Err(LinkError::Plaintext(url.to_string()));
    }
    let ws_url = format!("{}/peer", url.replacen("http", "ws", 1));
    let mut req = ws_url.as_str().into_client_request()?;
    let h = req.headers_mut();
    let secret = HeaderValue::from_str(&dial.secret).map_err(|e| LinkError::Request(e.to_string()))?;
    h.insert(wire::SECRET_HEADER, secret);
    h.insert(wire::WIRE_HEADER, HeaderValue::from(wire::WIRE_VERSION));
    let host = req.uri().host().ok_or_else(|| LinkError::Request("peer URL has no host".into()))?;
    let host = host.trim_matches(['[', ']']).to_string();
    let port = req.uri().port_u16().unwrap_or(if tls { 443 } else { 80 });
    let tcp = dial_tcp(&host, port, dial.bind).await?;
    tcp.set_nodelay(true)?;
    socket2::SockRef::from(&tcp).set_tcp_user_timeout(Some(SILENCE))?;
    let io: Box<dyn Io> = if tls {
        let config = dial.tls.clone().ok_or(LinkError::NoCa)?;
        let name = rustls::pki_types::ServerName::try_from(host).map_err(|e| LinkError::Request(e.to_string()))?;
        Box::new(tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.map_err(LinkError::Tls)?)
    } else {
        Box::new(tcp)
    };
    let (ws, response) = tokio_tungstenite::client_async_with_config(req, io, Some(wire::ws_config())).await?;
    let version = wire::wire_version(response.headers().get(wire::WIRE_HEADER).map(|v| v.as_bytes()));
    Ok((ws, version))
}

/// A TCP connection to `host:port`, from `bind` when set (and of the peer address's
/// family, and loopback exactly when the peer's address is).
async fn dial_tcp(host: &str, port: u16, bind: Option<IpAddr>) -> Result<tokio::net::TcpStream, std::io::Error> {
    let Some(local) = bind else { return tokio::net::TcpStream::connect((host, port)).await };
    let mut last = None;
    for addr in tokio::net::lookup_host((host, port)).await? {
        // A loopback address cannot reach another host, nor the other way round.
        let fits = local.is_loopback() == addr.ip().is_loopback();
        let socket = match addr {
            std::net::SocketAddr::V4(_) if fits && local.is_ipv4() => tokio::net::TcpSocket::new_v4()?,
            std::net::SocketAddr::V6(_) if fits && local.is_ipv6() => tokio::net::TcpSocket::new_v6()?,
            _ => {
                match tokio::net::TcpStream::connect(addr).await {
                    Ok(s) => return Ok(s),
                    Err(e) => last = Some(e),
                }
                continue;
            }
        };
        socket.bind(std::net::SocketAddr::new(local, 0))?;
        match socket.connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "peer host has no address")))
}

async fn pump(
    url: &str,
    dial: &Dial,
    links: &Weak<Links>,
    link: &Link,
    rx: &mut mpsc::Receiver<Queued>,
    metrics: &switchyard_metrics::Metrics,
    up_since: &mut Option<tokio::time::Instant>,
) -> Result<(), LinkError> {
    let (ws, version) =
        tokio::time::timeout(CONNECT_TIMEOUT, connect(url, dial)).await.map_err(|_| LinkError::Timeout)??;
    *up_since = Some(tokio::time::Instant::now());
    link.acceptor_wire.store(version, Ordering::Relaxed);
    let refusals = version >= 2;
    let ws_url = format!("{}/peer", url.replacen("http", "ws", 1));
    metrics.peer_link_up.with_label_values(&[&link.peer]).set(1);
    metrics.peer_connects.with_label_values(&[&link.peer]).inc();
    tracing::info!(%ws_url, version, "peer link up");
    if let Some(n) = links.upgrade() {
        n.set_reachable(&link.peer, true);
    }
    let (mut sink, mut stream) = ws.split();
    // The pings keep data in flight, so a cut shows as unacknowledged data within SILENCE.
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ping.tick() => sink.send(Message::Ping(Default::default())).await?,
            out = rx.recv() => {
                let Some((id, bytes, need)) = out else { return Ok(()) };
                // A request whose caller gave up is not sent.
                if !link.pending.lock().expect("pending").contains_key(&id) {
                    continue;
                }
                // Nor one an older acceptor would misread or not know (a rolling upgrade,
                // queued before the link came up): its caller is told, and nothing ran.
                if need > version {
                    if let Some(w) = link.pending.lock().expect("pending").remove(&id) {
                        let _ = w.send(Err(too_old(&link.peer, version)));
                    }
                    continue;
                }
                sink.send(Message::Binary(bytes.into())).await?;
            }
            msg = stream.next() => match msg {
                Some(Ok(Message::Binary(b))) => match wire::decode(&b) {
                    Ok(Frame::Reply { id, mut result }) => {
                        if !refusals {
                            result = result.map_err(wire::from_legacy);
                        }
                        if let Some(w) = link.pending.lock().expect("pending").remove(&id) {
                            let _ = w.send(result);
                        }
                    }
                    Ok(Frame::Pushes(pushes)) => {
                        let subs = link.subs.load();
                        let mut lent = Vec::new();
                        for p in pushes {
                            if let Some(up) = subs.get(&p.sub) {
                                up.on_push(p.sub, p.offset, p.frame, p.end, &mut lent);
                            }
                        }
                        switchyard_core::outbox::flush_lent(&mut lent, metrics);
                    }
                    Ok(Frame::Events(events)) => {
                        let subs = link.subs.load();
                        let mut lent = Vec::new();
                        for e in events {
                            if let Some(up) = subs.get(&e.sub) {
                                up.on_event(e.sub, e.frame, &mut lent);
                            }
                        }
                        switchyard_core::outbox::flush_lent(&mut lent, metrics);
                    }
                    Ok(Frame::Request { .. }) => return Err(LinkError::Unexpected),
                    Err(e) => return Err(e.into()),
                },
                Some(Ok(Message::Close(_))) | None => return Err(LinkError::Closed),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! A link to a fake acceptor that speaks an older wire: what it may and may not be sent.

    use super::*;
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

    /// An acceptor on a loopback port that answers the upgrade with `x-switchyard-peer-wire:
    /// version` and every request it reads (as that version would) with an empty history
    /// page, counting the requests.
    async fn acceptor(version: u32) -> (String, Arc<AtomicU64>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(AtomicU64::new(0));
        let counted = seen.clone();
        tokio::spawn(async move {
            let Ok((tcp, _)) = listener.accept().await else { return };
            // The callback's shape (an error response as the Err) is tungstenite's.
            #[allow(clippy::result_large_err)]
            let answer = |_: &Request, mut resp: Response| {
                resp.headers_mut().insert(wire::WIRE_HEADER, HeaderValue::from(version));
                Ok(resp)
            };
            let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, answer).await else { return };
            while let Some(Ok(msg)) = ws.next().await {
                let Message::Binary(b) = msg else { continue };
                // An older acceptor reads no suffix after a request: it closes the link on
                // trailing bytes.
                let id = match (version, postcard::take_from_bytes::<Frame>(&b)) {
                    (3.., _) => match wire::decode(&b) {
                        Ok(Frame::Request { id, .. }) => id,
                        _ => return,
                    },
                    (_, Ok((Frame::Request { id, .. }, []))) => id,
                    _ => return,
                };
                counted.fetch_add(1, Ordering::Relaxed);
                let page = Answer::History { epoch: "E".into(), offset: 3, first: 1, messages: Vec::new() };
                let reply = wire::encode(&Frame::Reply { id, result: Ok(page) });
                if ws.send(Message::Binary(reply.into())).await.is_err() {
                    return;
                }
            }
        });
        (url, seen)
    }

    fn dial(peer_url: String) -> Arc<Links> {
        let member = switchyard_proto::partition::Member { url: peer_url.clone(), peer_url, draining: false };
        let members = Arc::new(Members::from([("old".to_string(), member)]));
        let env = LinkEnv {
            members: watch::channel(members).1,
            shutdown: watch::channel(false).1,
            metrics: Arc::new(Metrics::new()),
        };
        Links::new(env, Dial { secret: "s3cret-s3cret".into(), tls: None, allow_plaintext: true, bind: None })
    }

    /// A backward history read is never sent to an acceptor of wire 2 (it would find
    /// trailing bytes and drop the link): its caller gets `unavailable` at once, and the
    /// link goes on carrying forward reads. A wire 3 acceptor gets both.
    #[tokio::test]
    async fn backward_reads_go_only_to_a_wire_3_acceptor() {
        use switchyard_core::HistoryQuery;
        let forward = Op::history("room:1", HistoryQuery::forward(0, 10));
        let backward = Op::history("room:1", HistoryQuery::backward(Some(3), 10));

        let (url, seen) = acceptor(2).await;
        let links = dial(url);
        let e = links.send("old", 1, &backward).unwrap().wait(Duration::from_secs(10)).await.unwrap_err();
        assert_eq!(e.code, "unavailable", "{e:?}");
        assert!(e.message.contains("older version") && e.refusal.is_none(), "{e:?}");
        let page = links.send("old", 1, &forward).unwrap().wait(Duration::from_secs(10)).await.unwrap();
        assert!(matches!(page, Answer::History { offset: 3, .. }));
        assert_eq!(seen.load(Ordering::Relaxed), 1, "only the forward read went out");

        let (url, seen) = acceptor(3).await;
        let links = dial(url);
        for op in [&backward, &forward] {
            let page = links.send("old", 1, op).unwrap().wait(Duration::from_secs(10)).await.unwrap();
            assert!(matches!(page, Answer::History { offset: 3, .. }));
        }
        assert_eq!(seen.load(Ordering::Relaxed), 2);
    }

    /// A link to an acceptor of the previous wire version refuses presence ops with
    /// `unavailable` at once (never sends them: the old acceptor would close the link on a
    /// frame it cannot read); other ops are queued as before.
    #[tokio::test]
    async fn an_older_acceptor_is_never_sent_a_presence_op() {
        let (tx, mut rx) = mpsc::channel(4);
        let link = Arc::new(Link {
            peer: "old".into(),
            tx,
            acceptor_wire: AtomicU32::new(2),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            subs: ArcSwap::from_pointee(HashMap::new()),
            down: watch::channel(0).0,
        });
        let Err(e) = link.send(1, &Op::PresenceStats { channel: "room:1".into() }) else { panic!("sent") };
        assert_eq!(e.to_op().code, switchyard_proto::protocol::ErrorCode::Unavailable);
        assert!(link.pending.lock().unwrap().is_empty());
        let _pending = link.send(1, &Op::history("room:1", switchyard_core::HistoryQuery::forward(0, 1))).unwrap();
        assert_eq!(rx.try_recv().unwrap().2, 0);
        // Before the link ever came up the version is unknown: queued, checked at send.
        link.acceptor_wire.store(u32::MAX, Ordering::Relaxed);
        let _pending = link.send(1, &Op::Presence { channel: "room:1".into() }).unwrap();
        assert_eq!(rx.try_recv().unwrap().2, crate::wire::PRESENCE_WIRE);
    }
}
