//! One connected WebSocket client.
//!
//! It owns a connection's socket, its subscriptions and the order of what it writes: replies
//! in command order (a `FuturesOrdered`), each subscription's reply before its messages, then
//! catch-up from the store, then live pushes with no gap and no duplicate (tracked by
//! offset). It turns an overflowing outbound queue into `disconnect` 4008, an oversized
//! frame into `too_large` and close 1009, and shutdown into close 4100. It asks its
//! [`Gate`] before each command (token, per-user cap, channel rules, rate limit) and pings
//! the peer on the [`Heartbeat`] schedule, closing one that stops answering. What it writes
//! during one pass of the runtime goes out in one flush at the end of the pass (the cork).
//! It must never block an owner: owners only push into its [`Outbox`], and all waiting
//! happens here. While it has nothing of its own to write and every subscription is live,
//! it lends its socket's write side to the owners (the outbox's direct path), so a burst of
//! pushes costs it no wake-up; anything that wakes it takes the socket back first.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, SinkExt, StreamExt};
use switchyard_peer::ws::text;
use switchyard_proto::Text;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;
use tracing::Instrument as _;

use xxhash_rust::xxh3::Xxh3DefaultBuilder as Xxh3Builder;

use crate::node::Node;
use crate::socket::Socket;
use switchyard_access::gate::{Gate, Refusal};
use switchyard_access::user_sessions::{Beat, Heartbeat};
use switchyard_core::outbox::{outbox, Delivery, DirectSink, Inbox, Outbox};
use switchyard_core::owner::{Grant, PublishRequest, Start};
use switchyard_peer::seats::{ClusterSeat, Seating};
use switchyard_proto::protocol::{self, close, Command, Empty, ErrorCode, OpError, SubscribeOk};

/// Catch-up is read from the store in pages of this many messages.
const CATCH_UP_PAGE: usize = 256;
/// How long a closing connection may take to write its last frames.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a closing connection waits for replies still in flight.
const SHUTDOWN_REPLY_WAIT: Duration = Duration::from_secs(2);
/// What a reply that carries no messages (an ack, an error, a subscribe grant) is counted
/// as against the connection's reply budget.
const SMALL_REPLY: usize = 1024;
/// Bytes a session queues on its socket before writing them out ahead of its flush.
const WRITE_BUFFER: usize = 32 * 1024;

/// Why a session ends.
#[derive(Debug)]
enum Stop {
    /// The peer closed or the socket failed.
    Gone,
    /// The peer sent a close frame: the answering close goes out before the socket drops.
    ClosedByPeer,
    /// The outbound queue overflowed.
    Slow,
    /// The node is shutting down.
    Shutdown,
    /// A frame over the size limit.
    TooLarge,
    /// Refused by the gate (4001 unauthorized, 4009 too many sessions, 4029 rate limited);
    /// the error reply is already queued.
    Refused {
        /// Close code.
        code: u16,
        /// Close reason.
        reason: &'static str,
    },
    /// The peer did not answer a ping in time.
    Unresponsive,
    /// The socket accepted no bytes for `limits.write_timeout`.
    WriteTimeout,
}

impl From<Refusal> for Stop {
    fn from(r: Refusal) -> Self {
        Stop::Refused { code: r.code, reason: r.reason }
    }
}

/// A finished command, ready to write in order.
enum Output {
    Frame(Text),
    Subscribed { id: u64, sub: u64, channel: String, result: Result<Grant, OpError> },
}

enum Phase {
    /// Waiting for the owner's grant; live messages are held.
    Pending(Vec<Delivery>),
    /// Delivering; `delivered` is the last offset written.
    Live { delivered: u64 },
}

struct Sub {
    channel: String,
    phase: Phase,
}

/// Serves one upgraded WebSocket until it closes.
pub(crate) async fn run<S>(node: Arc<Node>, ws: WebSocketStream<Socket<S>>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let id = node.router.next_id();
    // Every log line of this connection carries `client{id}`.
    serve(node, ws, id).instrument(tracing::info_span!("client", id)).await;
}

async fn serve<S>(node: Arc<Node>, ws: WebSocketStream<Socket<S>>, id: u64)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut session = Session::new(node.clone(), ws, id);
    node.metrics.connections.inc();
    node.metrics.connections_total.inc();
    let stop = session.serve().await;
    tracing::debug!(?stop, "session ended");
    // Closing is rare and its future large: boxed, it does not weigh on every idle session.
    Box::pin(session.finish(stop)).await;
    node.metrics.connections.dec();
}

struct Session<S> {
    node: Arc<Node>,
    id: u64,
    ws: WebSocketStream<Socket<S>>,
    outbox: Arc<Outbox>,
    inbox: Inbox,
    shutdown: watch::Receiver<bool>,
    subs: HashMap<u64, Sub, Xxh3Builder>,
    by_channel: HashMap<String, u64>,
    pending: FuturesOrdered<BoxFuture<'static, Output>>,
    /// What each reply in `pending` counts against the reply budget, in the same order.
    reserved: std::collections::VecDeque<usize>,
    /// The sum of `reserved`: while it is at `limits.outbound_queue_bytes` or more, no
    /// further command is read (the client's own backpressure, not a disconnect).
    reply_bytes: usize,
    /// Bytes of live messages held while subscriptions catch up, bounded like the outbox.
    held_bytes: usize,
    /// The client asked for packed pushes (`connect` with `batch: true`).
    pack: bool,
    /// Pushes waiting to go out as one frame of JSON lines, and their length so joined.
    packed: Vec<Text>,
    packed_bytes: usize,
    unflushed: bool,
    /// Set while written frames wait for their flush: resolves once every other task that
    /// was ready has run (`yield_now` defers its task until then), like a cork that
    /// uWebSockets lifts once per loop iteration.
    cork: Option<BoxFuture<'static, ()>>,
    delivered: u64,
    delivered_bytes: u64,
    /// The socket's write side, when it can be lent to the owners (plain TCP).
    sink: Option<Arc<dyn DirectSink>>,
    /// The write side is lent: owners write pushes themselves until it is taken back.
    lent: bool,
    /// Who the client is, its seat and its publish bucket.
    gate: Gate,
    /// The seat under the cluster-wide per-user cap, held at the user's seat holder.
    cluster_seat: Option<ClusterSeat>,
    /// When to ping, and whether the last ping was answered.
    heartbeat: Heartbeat,
    /// Fires at the heartbeat's deadline.
    beat: Pin<Box<Sleep>>,
    /// Fires at the gate's deadline (connect timeout, then token expiry), if any.
    auth_timer: Pin<Box<Sleep>>,
    auth_deadline: Option<Instant>,
}

fn ready(frame: Text) -> BoxFuture<'static, Output> {
    futures_util::future::ready(Output::Frame(frame)).boxed()
}

/// Drives a socket write. The common case (room in the buffer) completes on the first poll
/// without registering any waiter; a blocked write is raced against the slow-consumer and
/// shutdown signals so a stuck peer cannot hold the session.
async fn until_stopped<F, E>(
    fut: F,
    outbox: &Outbox,
    shutdown: &mut watch::Receiver<bool>,
    write_timeout: std::time::Duration,
) -> Result<(), Stop>
where
    F: std::future::Future<Output = Result<(), E>>,
{
    let mut fut = std::pin::pin!(fut);
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(fut.as_mut().poll(cx))).await;
    if let std::task::Poll::Ready(r) = first {
        return r.map_err(|_| Stop::Gone);
    }
    let mut slow = std::pin::pin!(outbox.slow_signal.notified());
    slow.as_mut().enable();
    if outbox.is_slow() {
        return Err(Stop::Slow);
    }
    tokio::select! {
        biased;
        r = fut => r.map_err(|_| Stop::Gone),
        _ = slow => Err(Stop::Slow),
        _ = stopping(shutdown) => Err(Stop::Shutdown),
        // The socket took no bytes for this long: the client stopped reading.
        _ = tokio::time::sleep(write_timeout) => Err(Stop::WriteTimeout),
    }
}

/// The next frame from the client. The read side is polled only when the socket may have
/// bytes: a wake-up for pushes alone does not go through tungstenite's read path.
async fn next_frame<S>(ws: &mut WebSocketStream<Socket<S>>) -> Option<Result<Message, WsError>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    std::future::poll_fn(|cx| {
        if !ws.get_ref().may_read() {
            return std::task::Poll::Pending;
        }
        ws.poll_next_unpin(cx)
    })
    .await
}

/// Writes out everything queued on the socket. tungstenite stops short of its flush once a
/// close handshake is over: its last frame is queued, but only this writes it.
async fn drain<S>(ws: &mut WebSocketStream<Socket<S>>) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    std::future::poll_fn(|cx| Pin::new(ws.get_mut()).poll_flush(cx)).await
}

/// Resolves when the cork, if any, lifts; never without one.
async fn corked(cork: &mut Option<BoxFuture<'static, ()>>) {
    match cork {
        Some(lifted) => lifted.await,
        None => std::future::pending().await,
    }
}

/// Resolves once the node is shutting down (at once if it already is).
async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stopping| *stopping).await;
}

fn owner_gone() -> OpError {
    OpError::new(ErrorCode::Unavailable, "partition owner stopped")
}

impl<S> Session<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    fn new(node: Arc<Node>, ws: WebSocketStream<Socket<S>>, id: u64) -> Self {
        let limits = &node.config.limits;
        let (outbox, inbox) = outbox(limits.outbound_queue_messages, limits.outbound_queue_bytes);
        let now = Instant::now();
        let gate = Gate::new(now);
        let heartbeat = Heartbeat::new(now);
        let auth_deadline = gate.deadline(&node.access);
        let sink = ws.get_ref().sink();
        Session {
            beat: Box::pin(tokio::time::sleep_until(heartbeat.deadline(&node.access.live().sessions))),
            auth_timer: Box::pin(tokio::time::sleep_until(auth_deadline.unwrap_or(now))),
            auth_deadline,
            gate,
            cluster_seat: None,
            heartbeat,
            id,
            shutdown: node.shutdown.clone(),
            node: node.clone(),
            ws,
            outbox,
            inbox,
            subs: HashMap::default(),
            by_channel: HashMap::new(),
            pending: FuturesOrdered::new(),
            reserved: std::collections::VecDeque::new(),
            reply_bytes: 0,
            held_bytes: 0,
            pack: false,
            packed: Vec::new(),
            packed_bytes: 0,
            unflushed: false,
            cork: None,
            delivered: 0,
            delivered_bytes: 0,
            sink,
            lent: false,
        }
    }

    async fn serve(&mut self) -> Stop {
        // The shutdown signal is registered once, not on every wake-up of the loop. A slow
        // connection ends `recv_all`'s wait.
        let mut shutdown = self.shutdown.clone();
        let mut shutdown = std::pin::pin!(stopping(&mut shutdown));
        loop {
            // Checked on every turn, so the shutdown branch can come last: a wake-up for
            // work does not poll it (`biased` stops at the first ready branch), and before
            // the loop sleeps every branch has been polled and registered.
            if self.outbox.is_slow() {
                return Stop::Slow;
            }
            if *self.shutdown.borrow() {
                return Stop::Shutdown;
            }
            let step = tokio::select! {
                biased;
                Some(out) = self.pending.next(), if !self.pending.is_empty() => {
                    self.take_socket_back();
                    let reserved = self.reserved.pop_front().unwrap_or_default();
                    let written = self.on_output(out).await;
                    self.reply_bytes -= reserved;
                    written
                }
                // Pushes are corked in place (no second pass through this loop); while a
                // reply's cork is on, they are written and the uncork flushes them. An
                // empty batch: the connection turned slow (the loop's top ends it).
                // The socket handed back by the direct path also ends the wait.
                batch = self.inbox.recv_all() => {
                    self.take_socket_back();
                    match (batch.is_empty(), &self.cork) {
                        (true, _) => Ok(()),
                        (false, None) => self.on_pushes(batch).await,
                        (false, Some(_)) => self.on_deliveries(batch).await,
                    }
                }
                // Replies waiting to be written pause reading at the byte budget: a client
                // that pipelines reads and stops reading the answers holds at most about
                // one budget of them (the socket's write deadline then ends it).
                frame = next_frame(&mut self.ws), if !self.reading_paused() => {
                    self.take_socket_back();
                    self.on_frame(frame).await
                }
                _ = &mut self.beat => {
                    self.take_socket_back();
                    self.on_beat().await
                }
                // After the branches that carry work: written frames wait for the end of the
                // pass, so commands still to be read and pushes still to come share the flush.
                () = corked(&mut self.cork) => self.uncork().await,
                _ = &mut self.auth_timer, if self.auth_deadline.is_some() => {
                    self.take_socket_back();
                    let refusal = self.gate.deadline_refusal();
                    let frame = self.reply_error(None, &refusal.error);
                    self.queue(ready(frame));
                    Err(refusal.into())
                }
                _ = &mut shutdown => Err(Stop::Shutdown),
            };
            if let Err(stop) = step {
                return stop;
            }
            if self.cork.is_none() && (self.unflushed || !self.packed.is_empty()) {
                self.cork = Some(Box::pin(tokio::task::yield_now()));
            } else if self.cork.is_none() {
                self.lend_socket();
            }
        }
    }

    // === the direct path ===

    /// Lends the socket's write side to the owners when the session has nothing of its
    /// own in flight: no reply, nothing queued or held, and every subscription live (so
    /// an owner's push needs nothing but its offset checked).
    fn lend_socket(&mut self) {
        let Some(sink) = &self.sink else { return };
        if self.lent
            || self.pack
            || self.subs.is_empty()
            || !self.pending.is_empty()
            || self.held_bytes > 0
            || self.ws.get_ref().queued() > 0
            || *self.shutdown.borrow()
        {
            return;
        }
        let mut live = Vec::with_capacity(self.subs.len());
        for (&sub, s) in &self.subs {
            match s.phase {
                Phase::Live { delivered } => live.push((sub, delivered)),
                Phase::Pending(_) => return,
            }
        }
        if self.inbox.enter_direct(sink.clone(), live) {
            self.lent = true;
            self.ws.get_mut().set_lent(true);
        }
    }

    /// Takes the socket back from the owners: the offsets they wrote, and the bytes they
    /// framed that the socket did not take yet, which go out before anything else.
    fn take_socket_back(&mut self) {
        if !std::mem::take(&mut self.lent) {
            return;
        }
        let socket = self.ws.get_mut();
        socket.set_lent(false);
        if let Some(back) = self.inbox.leave_direct() {
            for (sub, written) in back.subs {
                if let Some(Sub { phase: Phase::Live { delivered }, .. }) = self.subs.get_mut(&sub) {
                    *delivered = (*delivered).max(written);
                }
            }
            socket.unshift_raw(back.unwritten);
        }
        // Those bytes, and whatever tungstenite queued meanwhile (a pong), go out with
        // the next flush.
        if socket.queued() > 0 {
            self.unflushed = true;
        }
    }

    // === writing ===

    /// Writes one text frame after any packed pushes before it.
    async fn write(&mut self, frame: Text) -> Result<(), Stop> {
        self.write_packed().await?;
        self.write_frame(frame).await
    }

    /// Writes the packed pushes as one frame of JSON lines.
    async fn write_packed(&mut self) -> Result<(), Stop> {
        match self.packed.len() {
            0 => Ok(()),
            1 => {
                let frame = self.packed.pop().expect("one");
                self.packed_bytes = 0;
                self.write_frame(frame).await
            }
            _ => {
                let frame = Text::join_lines(&self.packed);
                self.packed.clear();
                self.packed_bytes = 0;
                self.write_frame(frame).await
            }
        }
    }

    /// Queues one text frame on the socket, its payload shared, not copied. Past
    /// [`WRITE_BUFFER`] queued bytes it writes them out, and only when the socket is full
    /// does it wait, giving up if the connection turns slow or the node shuts down.
    async fn write_frame(&mut self, frame: Text) -> Result<(), Stop> {
        if self.outbox.is_slow() {
            return Err(Stop::Slow);
        }
        self.unflushed = true;
        let socket = self.ws.get_mut();
        socket.push_text(frame.into_bytes());
        if socket.queued() <= WRITE_BUFFER {
            return Ok(());
        }
        let fut = std::future::poll_fn(|cx| socket.poll_drain(cx, 0));
        until_stopped(fut, &self.outbox, &mut self.shutdown, self.node.config.limits.write_timeout).await
    }

    /// The end of the runtime pass in which frames were written: writes what the owners
    /// queued meanwhile, then flushes everything in one go.
    async fn uncork(&mut self) -> Result<(), Stop> {
        self.cork = None;
        let more = self.inbox.try_recv_all();
        self.on_deliveries(more).await?;
        self.flush().await
    }

    async fn flush(&mut self) -> Result<(), Stop> {
        self.write_packed().await?;
        if !self.unflushed {
            return Ok(());
        }
        self.unflushed = false;
        let metrics = &self.node.metrics;
        metrics.messages_delivered.inc_by(std::mem::take(&mut self.delivered));
        metrics.bytes_delivered.inc_by(std::mem::take(&mut self.delivered_bytes));
        let fut = self.ws.flush();
        until_stopped(fut, &self.outbox, &mut self.shutdown, self.node.config.limits.write_timeout).await
    }

    /// Writes a push; with packing, adds it to the frame being packed instead, which goes
    /// out before the next reply, at the end of the wake-up, or when one more push would
    /// take it past `max_frame_bytes`.
    async fn push_message(&mut self, frame: Text) -> Result<(), Stop> {
        self.delivered += 1;
        self.delivered_bytes += frame.len() as u64;
        if !self.pack {
            return self.write_frame(frame).await;
        }
        if self.packed_bytes + 1 + frame.len() > self.node.config.limits.max_frame_bytes {
            self.write_packed().await?;
        }
        self.packed_bytes += frame.len() + usize::from(!self.packed.is_empty());
        self.packed.push(frame);
        Ok(())
    }

    fn reply_error(&self, id: Option<u64>, error: &OpError) -> Text {
        self.node.metrics.protocol_errors.with_label_values(&[error.code.as_str()]).inc();
        protocol::error_reply(id, error)
    }

    /// True while replies waiting to be written hold the connection's byte budget: no
    /// further command is read until they are.
    fn reading_paused(&self) -> bool {
        self.reply_bytes >= self.node.config.limits.outbound_queue_bytes
    }

    /// Queues a reply behind the ones still in flight.
    fn queue(&mut self, fut: BoxFuture<'static, Output>) {
        self.queue_sized(fut, SMALL_REPLY);
    }

    /// Queues a reply that may hold up to `bytes` until it is written.
    fn queue_sized(&mut self, fut: BoxFuture<'static, Output>, bytes: usize) {
        self.pending.push_back(fut);
        self.reserved.push_back(bytes);
        self.reply_bytes += bytes;
    }

    /// A durable consumer name or idempotency key in this client's own namespace: with a
    /// token, `u/<sub>/<name>` (alice's `phone` is not bob's); anonymous clients share the
    /// channel-wide namespace, so a retry after a reconnect is still recognised. `/` is in
    /// neither user ids nor consumer names, so scoped and unscoped names never meet.
    fn scoped(&self, name: String) -> String {
        match self.gate.user() {
            Some(user) => format!("u/{user}/{name}"),
            None => name,
        }
    }

    fn queue_result<T: serde::Serialize>(&mut self, id: u64, result: Result<T, OpError>) {
        let frame = match &result {
            Ok(ok) => protocol::ok_reply(id, ok),
            Err(e) => self.reply_error(Some(id), e),
        };
        self.queue(ready(frame));
    }

    // === reading ===

    async fn on_frame(&mut self, frame: Option<Result<Message, WsError>>) -> Result<(), Stop> {
        let max = self.node.config.limits.max_frame_bytes;
        match frame {
            None | Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed | WsError::Io(_))) => Err(Stop::Gone),
            Some(Err(WsError::Capacity(_))) => Err(Stop::TooLarge),
            Some(Err(e)) => {
                tracing::debug!(error = %e, "websocket protocol error");
                Err(Stop::Gone)
            }
            Some(Ok(Message::Text(text))) if text.len() > max => Err(Stop::TooLarge),
            Some(Ok(Message::Text(text))) => match protocol::parse_command(&text) {
                // Boxed: a command's await states (a forwarded publish, a seat asked of
                // another node, a subscription) live only while it runs, not in every idle
                // session's future.
                Ok((id, cmd)) => Box::pin(self.dispatch(id, cmd)).await,
                Err(rejected) => {
                    let frame = self.reply_error(rejected.id, &rejected.error);
                    self.queue(ready(frame));
                    Ok(())
                }
            },
            Some(Ok(Message::Binary(data))) if data.len() > max => Err(Stop::TooLarge),
            Some(Ok(Message::Binary(_))) => {
                let frame =
                    self.reply_error(None, &OpError::bad_request("binary frames are not supported; send JSON text"));
                self.queue(ready(frame));
                Ok(())
            }
            Some(Ok(Message::Close(_))) => Err(Stop::ClosedByPeer),
            Some(Ok(Message::Ping(_))) => {
                self.unflushed = true; // let the automatic pong out
                Ok(())
            }
            Some(Ok(Message::Pong(_))) => {
                self.heartbeat.on_pong();
                let next = self.heartbeat.deadline(&self.node.access.live().sessions);
                self.beat.as_mut().reset(next);
                Ok(())
            }
            Some(Ok(Message::Frame(_))) => Ok(()),
        }
    }

    /// The heartbeat's deadline passed: ping, or give up on a peer that did not answer.
    async fn on_beat(&mut self) -> Result<(), Stop> {
        let live = self.node.access.live();
        let beat = self.heartbeat.on_deadline(&live.sessions, Instant::now());
        self.beat.as_mut().reset(self.heartbeat.deadline(&live.sessions));
        match beat {
            Beat::Wait => Ok(()),
            // Reading is paused at the reply budget, so its pong may be waiting unread: the
            // writes' deadline (`write_timeout`) judges this client instead.
            Beat::Dead if self.reading_paused() => {
                self.heartbeat.on_pong();
                Ok(())
            }
            Beat::Dead => Err(Stop::Unresponsive),
            Beat::Ping => {
                self.unflushed = true;
                let fut = self.ws.feed(Message::Ping(Bytes::new()));
                until_stopped(fut, &self.outbox, &mut self.shutdown, self.node.config.limits.write_timeout).await
            }
        }
    }

    /// Under the cluster-wide cap: asks the user's seat holder for a seat (the gate already
    /// took one under the same cap on this node). A full cap ends the connection with 4009;
    /// a holder that does not answer in time leaves the per-node cap in force.
    async fn take_cluster_seat(&mut self, id: u64, user: &str) -> Result<(), Stop> {
        let max = self.node.access.live().sessions.max_per_user;
        match self.node.router.take_seat(user, self.id, max).await {
            Seating::Granted(seat) => self.cluster_seat = Some(seat),
            Seating::NotClustered => {}
            Seating::Full => {
                let error = OpError::new(
                    ErrorCode::LimitExceeded,
                    format!("user {user} already holds {max} connections in the cluster"),
                );
                return self.refuse(
                    id,
                    Err(Refusal { error, code: close::TOO_MANY_SESSIONS, reason: "too many sessions for this user" }),
                );
            }
            Seating::Unreachable { why, seat } => {
                self.node.metrics.seat_fallbacks.inc();
                tracing::warn!(user, why, "seat holder unreachable: the per-node session cap applies");
                self.cluster_seat = Some(seat);
            }
        }
        Ok(())
    }

    /// Queues an error reply; when the gate also ends the connection, says so.
    fn refuse(&mut self, id: u64, refused: Result<OpError, Refusal>) -> Result<(), Stop> {
        match refused {
            Ok(error) => {
                self.queue_result::<Empty>(id, Err(error));
                Ok(())
            }
            Err(refusal) => {
                self.queue_result::<Empty>(id, Err(refusal.error.clone()));
                Err(refusal.into())
            }
        }
    }

    async fn dispatch(&mut self, id: u64, cmd: Command) -> Result<(), Stop> {
        let node = self.node.clone();
        if let Err(e) = self.gate.admit(&node.access, &cmd) {
            self.queue_result::<Empty>(id, Err(e));
            return Ok(());
        }
        match cmd {
            Command::Connect { name, token, batch } => {
                if let Some(name) = name {
                    tracing::debug!(name, "client named itself");
                }
                if let Err(refused) = self.gate.connect(&node.access, token.as_deref()) {
                    return self.refuse(id, refused);
                }
                if let Some(user) = self.gate.user().cloned() {
                    self.take_cluster_seat(id, &user).await?;
                }
                self.auth_deadline = self.gate.deadline(&node.access);
                if let Some(at) = self.auth_deadline {
                    self.auth_timer.as_mut().reset(at);
                }
                self.pack = batch;
                let mut ok = serde_json::json!({"client": self.id.to_string(), "node": node.config.node_id, "version": protocol::VERSION});
                if batch {
                    ok["batch"] = serde_json::json!(true);
                }
                if let Some(user) = self.gate.user() {
                    ok["user"] = serde_json::json!(user);
                }
                self.queue_result(id, Ok(ok));
            }
            Command::Refresh { token } => match self.gate.refresh(&node.access, &token) {
                Ok(()) => {
                    // The expiry close now waits for the new token's expiry.
                    self.auth_deadline = self.gate.deadline(&node.access);
                    if let Some(at) = self.auth_deadline {
                        self.auth_timer.as_mut().reset(at);
                    }
                    self.queue_result(id, Ok(Empty {}));
                }
                Err(e) => self.queue_result::<Empty>(id, Err(e)),
            },
            Command::Ping => self.queue_result(id, Ok(Empty {})),
            Command::Subscribe { channel, from, consumer } => self.subscribe(id, channel, from, consumer).await,
            Command::Unsubscribe { channel } => {
                if let Some(sub) = self.by_channel.remove(&channel) {
                    self.remove_sub(sub);
                    node.metrics.subscriptions.dec();
                    node.router.unsubscribe(&channel, sub).await;
                }
                self.queue_result(id, Ok(Empty {}));
            }
            Command::Publish(p) => {
                if let Err(refused) = self.gate.take_publish(&node.access, Instant::now()) {
                    return self.refuse(id, refused);
                }
                if let Err(e) = node.config.check_keys(p.key.as_deref(), p.idempotency_key.as_deref()) {
                    return self.refuse(id, Ok(e));
                }
                let req = PublishRequest {
                    channel: p.channel,
                    data: p.data,
                    key: p.key,
                    idempotency_key: p.idempotency_key.map(|k| self.scoped(k)),
                    from: self.gate.user().map(|u| u.to_string()),
                };
                match node.router.publish(req).await {
                    Ok(publishing) => {
                        let metrics = node.metrics.clone();
                        self.queue(
                            async move {
                                let result = publishing.acked().await;
                                if let Err(e) = &result {
                                    metrics.protocol_errors.with_label_values(&[e.code.as_str()]).inc();
                                }
                                Output::Frame(protocol::reply(id, &result))
                            }
                            .boxed(),
                        );
                    }
                    Err(e) => self.queue_result::<Empty>(id, Err(e)),
                }
            }
            Command::History { channel, since, limit } => {
                // Wherever the owner is; the read starts when the future is first polled,
                // after every command this connection sent before it. It may hold a full
                // page until written.
                let page = node.config.limits.max_reply_bytes;
                self.queue_sized(
                    async move { Output::Frame(protocol::reply(id, &node.router.history(&channel, since, limit).await)) }
                        .boxed(),
                    page,
                )
            }
            Command::Commit { channel, consumer, offset } => {
                match node.router.commit(&channel, self.scoped(consumer), offset).await {
                    Ok(rx) => self.queue(
                        async move {
                            let result = rx.await.unwrap_or_else(|_| Err(owner_gone())).map(|()| Empty {});
                            Output::Frame(protocol::reply(id, &result))
                        }
                        .boxed(),
                    ),
                    Err(e) => self.queue_result::<Empty>(id, Err(e)),
                }
            }
        }
        Ok(())
    }

    async fn subscribe(&mut self, id: u64, channel: String, from: protocol::StartFrom, consumer: Option<String>) {
        if self.by_channel.contains_key(&channel) {
            return self.queue_result::<Empty>(id, Err(OpError::bad_request("already subscribed to this channel")));
        }
        if self.subs.len() >= self.node.config.limits.max_subscriptions {
            return self.queue_result::<Empty>(
                id,
                Err(OpError::new(ErrorCode::LimitExceeded, "too many subscriptions on this connection")),
            );
        }
        let sub = self.node.router.next_id();
        let start = match consumer {
            Some(c) => Start::Consumer(self.scoped(c)),
            None => Start::From(from),
        };
        match self.node.router.subscribe(&channel, sub, self.outbox.clone(), start).await {
            Ok(rx) => {
                self.subs.insert(sub, Sub { channel: channel.clone(), phase: Phase::Pending(Vec::new()) });
                self.by_channel.insert(channel.clone(), sub);
                self.node.metrics.subscriptions.inc();
                self.queue(
                    async move {
                        let result = rx.await.unwrap_or_else(|_| Err(owner_gone()));
                        Output::Subscribed { id, sub, channel, result }
                    }
                    .boxed(),
                );
            }
            Err(e) => self.queue_result::<Empty>(id, Err(e)),
        }
    }

    // === delivering ===

    async fn on_output(&mut self, out: Output) -> Result<(), Stop> {
        match out {
            Output::Frame(frame) => self.write(frame).await,
            Output::Subscribed { id, sub, channel, result } => match result {
                Err(e) => {
                    if self.remove_sub(sub).is_some() {
                        self.by_channel.remove(&channel);
                        self.node.metrics.subscriptions.dec();
                    }
                    let frame = self.reply_error(Some(id), &e);
                    self.write(frame).await
                }
                Ok(grant) => {
                    let ok = SubscribeOk {
                        channel: channel.clone(),
                        epoch: grant.epoch.to_string(),
                        offset: grant.offset,
                        recovered: grant.recovered,
                    };
                    self.write(protocol::ok_reply(id, &ok)).await?;
                    if self.subs.contains_key(&sub) {
                        // Catch-up's future is the largest of the loop's: boxed, idle
                        // sessions do not carry its size.
                        Box::pin(self.go_live(sub, &channel, &grant)).await?;
                    }
                    Ok(())
                }
            },
        }
    }

    /// Pushes the catch-up range from the store, then the live messages held meanwhile.
    /// If retention trims part of the range before it is read (or a read fails), the
    /// subscription ends with an `unsubscribed` push instead of going live over a hole:
    /// the client subscribes again and recovery tells it what was lost.
    async fn go_live(&mut self, sub: u64, channel: &str, grant: &Grant) -> Result<(), Stop> {
        if let Some(mut after) = grant.catch_up_after {
            while after < grant.top {
                let (page, first) =
                    match self.node.router.catch_up(channel, &grant.epoch, after, grant.top, CATCH_UP_PAGE).await {
                        Ok(page) => page,
                        Err(e) => {
                            tracing::warn!(channel, error = %e, "catch-up read failed");
                            return self.end_subscription(sub, channel, "catch-up read failed; subscribe again").await;
                        }
                    };
                let next = page.first().map_or(grant.top + 1, |m| m.offset);
                // Retention (not compaction) removed messages just above `after`.
                if next > after + 1 && first > after + 1 {
                    let reason = "history trimmed during catch-up; subscribe again to recover";
                    return self.end_subscription(sub, channel, reason).await;
                }
                let Some(last) = page.last() else { break };
                after = last.offset;
                for m in &page {
                    let frame = protocol::to_frame(&m.view(Some("message")));
                    self.push_message(frame).await?;
                }
            }
        }
        let held = match self.subs.get_mut(&sub) {
            Some(s) => std::mem::replace(&mut s.phase, Phase::Live { delivered: grant.live_after }),
            None => return Ok(()),
        };
        if let Phase::Pending(held) = held {
            for d in held {
                self.held_bytes -= d.frame.len();
                self.deliver(d).await?;
            }
        }
        Ok(())
    }

    /// Forgets a subscription, and the live messages it held while catching up.
    fn remove_sub(&mut self, sub: u64) -> Option<Sub> {
        let s = self.subs.remove(&sub)?;
        if let Phase::Pending(held) = &s.phase {
            self.held_bytes -= held.iter().map(|d| d.frame.len()).sum::<usize>();
        }
        Some(s)
    }

    /// Ends one subscription from the server side with an `unsubscribed` push.
    async fn end_subscription(&mut self, sub: u64, channel: &str, reason: &str) -> Result<(), Stop> {
        if self.remove_sub(sub).is_some() {
            self.by_channel.remove(channel);
            self.node.metrics.subscriptions.dec();
            self.node.router.unsubscribe(channel, sub).await;
        }
        self.write(protocol::unsubscribed_push(channel, close::SLOW_CONSUMER, reason)).await
    }

    /// Writes a wake-up's pushes, then, at the end of the runtime pass, what the owners
    /// queued meanwhile, and flushes once.
    async fn on_pushes(&mut self, batch: std::collections::VecDeque<Delivery>) -> Result<(), Stop> {
        self.on_deliveries(batch).await?;
        tokio::task::yield_now().await;
        self.uncork().await
    }

    /// Writes everything the owners queued since the last wake-up; the loop flushes once
    /// after it.
    async fn on_deliveries(&mut self, mut batch: std::collections::VecDeque<Delivery>) -> Result<(), Stop> {
        while let Some(d) = batch.pop_front() {
            self.deliver(d).await?;
        }
        self.inbox.recycle(batch);
        Ok(())
    }

    async fn deliver(&mut self, d: Delivery) -> Result<(), Stop> {
        if d.end {
            // The owner ended it (its partition moved): it has forgotten the subscription.
            // Before the subscribe reply is written, the end waits behind it with the held
            // messages: the client never sees a subscription end before it began.
            if let Some(Sub { phase: Phase::Pending(held), .. }) = self.subs.get_mut(&d.sub) {
                self.held_bytes += d.frame.len();
                held.push(d);
                return Ok(());
            }
            let Some(sub) = self.remove_sub(d.sub) else { return Ok(()) };
            self.by_channel.remove(&sub.channel);
            self.node.metrics.subscriptions.dec();
            return self.write(d.frame).await;
        }
        let Some(sub) = self.subs.get_mut(&d.sub) else { return Ok(()) };
        match &mut sub.phase {
            Phase::Pending(held) => {
                // Held messages left the outbox's accounting: bound them by the same limits.
                let limits = &self.node.config.limits;
                if held.len() >= limits.outbound_queue_messages
                    || self.held_bytes + d.frame.len() > limits.outbound_queue_bytes
                {
                    return Err(Stop::Slow);
                }
                self.held_bytes += d.frame.len();
                held.push(d)
            }
            Phase::Live { delivered } => {
                if d.offset > *delivered {
                    *delivered = d.offset;
                    self.push_message(d.frame).await?;
                }
            }
        }
        Ok(())
    }

    // === closing ===

    async fn finish(&mut self, stop: Stop) {
        self.take_socket_back();
        // The connection is over: its seat is free now, not after the (up to
        // CLOSE_WRITE_TIMEOUT) close below, so a client reconnecting at once after 4029,
        // 4001 or 4100 is not refused with 4009.
        self.gate.release_seat();
        self.cluster_seat = None;
        for (sub, s) in self.subs.drain() {
            self.node.router.unsubscribe(&s.channel, sub).await;
            self.node.metrics.subscriptions.dec();
        }
        let (code, reason) = match stop {
            Stop::Gone => return,
            Stop::ClosedByPeer => {
                // tungstenite queued the answering close frame; a clean close needs it sent.
                let ws = &mut self.ws;
                let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, async {
                    let _ = ws.flush().await;
                    drain(ws).await
                })
                .await;
                return;
            }
            Stop::Unresponsive => {
                // Nobody reads this socket: no last words, just drop it (and its resources).
                tracing::info!("closing a connection that stopped answering pings");
                return;
            }
            Stop::WriteTimeout => {
                // Its socket is full and stays full: last words could not be written either.
                tracing::info!(limit = ?self.node.config.limits.write_timeout, "closing a connection that stopped reading");
                return;
            }
            Stop::Refused { code, reason } => (code, reason),
            Stop::Slow => {
                self.node.metrics.slow_consumer_disconnects.inc();
                tracing::info!("slow consumer disconnected");
                (close::SLOW_CONSUMER, "slow consumer")
            }
            Stop::Shutdown => (close::SHUTTING_DOWN, "node shutting down"),
            Stop::TooLarge => (close::TOO_BIG, "frame too large"),
        };
        let too_large =
            OpError::new(ErrorCode::TooLarge, format!("frame over {} bytes", self.node.config.limits.max_frame_bytes));
        let too_large = (code == close::TOO_BIG).then(|| self.reply_error(None, &too_large));
        let packed = std::mem::take(&mut self.packed);
        let (ws, pending) = (&mut self.ws, &mut self.pending);
        // Every last write shares one deadline, so a peer that stopped reading cannot hold us.
        let last_words = async {
            if !packed.is_empty() {
                ws.feed(Message::Text(text(Text::join_lines(&packed)))).await?;
            }
            // Replies already in flight (acknowledged publishes among them) go out first,
            // in order; a subscription granted meanwhile gets its reply but no messages.
            let wait = tokio::time::Instant::now() + SHUTDOWN_REPLY_WAIT;
            while let Ok(Some(out)) = tokio::time::timeout_at(wait, pending.next()).await {
                let frame = match out {
                    Output::Frame(frame) => frame,
                    Output::Subscribed { id, channel, result, .. } => protocol::reply(
                        id,
                        &result.map(|g| SubscribeOk {
                            channel,
                            epoch: g.epoch.to_string(),
                            offset: g.offset,
                            recovered: g.recovered,
                        }),
                    ),
                };
                ws.feed(Message::Text(text(frame))).await?;
            }
            let last = too_large.unwrap_or_else(|| protocol::disconnect_push(code, reason));
            ws.feed(Message::Text(text(last))).await?;
            let frame = CloseFrame { code: CloseCode::from(code), reason: reason.into() };
            let _ = ws.send(Message::Close(Some(frame))).await;
            drain(ws).await.map_err(WsError::Io)
        };
        let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, last_words).await;
    }
}

#[cfg(test)]
mod tests {
    //! One session over an in-memory socket (`tokio::io::duplex`) against a real node: a
    //! real store and owners, no TCP.

    use std::time::Duration;

    use futures_util::{SinkExt as _, StreamExt as _};
    use serde_json::{json, Value};
    use tokio::io::DuplexStream;
    use tokio_tungstenite::tungstenite::protocol::Role;

    use super::*;
    use crate::config::Config;

    type Client = WebSocketStream<DuplexStream>;

    fn node(dir: &std::path::Path, edit: impl FnOnce(&mut Config)) -> Arc<Node> {
        let mut config = Config { data_dir: dir.join("data"), plugins_dir: dir.join("plugins"), ..Config::default() };
        edit(&mut config);
        config.validate().unwrap();
        Node::start(config, None).unwrap()
    }

    async fn connect(node: &Arc<Node>) -> Client {
        let (client, server) = tokio::io::duplex(1 << 16);
        let node = node.clone();
        tokio::spawn(async move {
            let ws = WebSocketStream::from_raw_socket(Socket::new(server), Role::Server, None).await;
            run(node, ws).await;
        });
        WebSocketStream::from_raw_socket(client, Role::Client, None).await
    }

    async fn send<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>, v: Value) {
        ws.send(Message::text(v.to_string())).await.unwrap();
    }

    /// The next JSON frame (pings are answered by tungstenite as they are read).
    async fn next<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>) -> Value {
        loop {
            match ws.next().await.expect("open").expect("frame") {
                Message::Text(t) => return serde_json::from_str(&t).unwrap(),
                Message::Close(c) => panic!("closed: {c:?}"),
                _ => continue,
            }
        }
    }

    /// An owner can end a subscription (its partition moved) before the session has
    /// written the subscribe reply: the `unsubscribed` push then waits behind the reply.
    #[tokio::test]
    async fn an_end_before_the_subscribe_reply_comes_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let node = node(dir.path(), |_| {});
        let (client, server) = tokio::io::duplex(1 << 16);
        let server = WebSocketStream::from_raw_socket(Socket::new(server), Role::Server, None).await;
        let mut client = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
        let mut session = Session::new(node.clone(), server, 1);
        session.subs.insert(7, Sub { channel: "room:1".into(), phase: Phase::Pending(Vec::new()) });
        session.by_channel.insert("room:1".into(), 7);
        let end = protocol::unsubscribed_push("room:1", protocol::close::SHUTTING_DOWN, "partition moved");
        session.deliver(Delivery { sub: 7, offset: 0, frame: end, end: true }).await.unwrap();
        assert!(session.subs.contains_key(&7), "the subscription lives until its reply is out");
        let grant =
            Grant { epoch: "E".into(), offset: 0, top: 0, recovered: None, catch_up_after: None, live_after: 0 };
        let reply = Output::Subscribed { id: 3, sub: 7, channel: "room:1".into(), result: Ok(grant) };
        session.on_output(reply).await.unwrap();
        session.flush().await.unwrap();
        assert!(session.subs.is_empty() && session.held_bytes == 0);
        let first = next(&mut client).await;
        assert_eq!((first["id"].as_u64(), first["ok"]["channel"].as_str()), (Some(3), Some("room:1")), "{first}");
        let second = next(&mut client).await;
        assert_eq!(second["push"], "unsubscribed", "{second}");
    }

    #[tokio::test]
    async fn connect_subscribe_publish_and_the_push_arrive_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let node = node(dir.path(), |_| {});
        let mut ws = connect(&node).await;
        send(&mut ws, json!({"id": 1, "op": "connect"})).await;
        assert_eq!(next(&mut ws).await["id"], 1);
        send(&mut ws, json!({"id": 2, "op": "subscribe", "channel": "room:1"})).await;
        let sub = next(&mut ws).await;
        assert_eq!((sub["id"].as_u64(), sub["ok"]["offset"].as_u64()), (Some(2), Some(0)), "{sub}");
        send(&mut ws, json!({"id": 3, "op": "publish", "channel": "room:1", "data": {"t": "hi"}})).await;
        // The ack and the push may come in either order; both must come.
        let (a, b) = (next(&mut ws).await, next(&mut ws).await);
        let (ack, push) = if a.get("push").is_some() { (b, a) } else { (a, b) };
        assert_eq!((ack["id"].as_u64(), ack["ok"]["offset"].as_u64()), (Some(3), Some(1)), "{ack}");
        assert_eq!((push["push"].as_str(), push["offset"].as_u64()), (Some("message"), Some(1)), "{push}");
        assert_eq!(push["data"], json!({"t": "hi"}));
        assert_eq!(push["epoch"], ack["ok"]["epoch"]);
    }

    /// Over real TCP an idle subscriber's session lends its socket's write side to the
    /// owner, which writes the pushes itself; commands from the subscriber take the socket
    /// back in between, and every message still arrives once and in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lent_tcp_socket_delivers_every_push_once_and_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let node = node(dir.path(), |_| {});
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server_node = node.clone();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (io, sink) = crate::socket::SharedTcp::new(stream, Bytes::new());
            let ws = WebSocketStream::from_raw_socket(Socket::with_sink(io, sink), Role::Server, None).await;
            run(server_node, ws).await;
        });
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut sub = WebSocketStream::from_raw_socket(stream, Role::Client, None).await;
        send(&mut sub, json!({"id": 1, "op": "subscribe", "channel": "room:1"})).await;
        assert_eq!(next(&mut sub).await["id"], 1);
        let mut publisher = connect(&node).await;
        const N: u64 = 300;
        let read_all = async {
            let (mut offsets, mut replies) = (Vec::new(), 0);
            for i in 1..=N {
                send(&mut publisher, json!({"id": i, "op": "publish", "channel": "room:1", "data": i})).await;
                assert_eq!(next(&mut publisher).await["id"], i, "acknowledged");
                if i % 25 == 0 {
                    // A command: the session takes its socket back to answer it.
                    send(&mut sub, json!({"id": 1000 + i, "op": "ping"})).await;
                }
            }
            while offsets.len() < N as usize {
                let v = next(&mut sub).await;
                match v["push"].as_str() {
                    Some("message") => offsets.push(v["offset"].as_u64().unwrap()),
                    _ => replies += 1,
                }
            }
            (offsets, replies)
        };
        let (offsets, replies) = tokio::time::timeout(Duration::from_secs(30), read_all).await.expect("in time");
        assert_eq!(offsets, (1..=N).collect::<Vec<_>>(), "every push once, in order");
        let direct = node.metrics.messages_delivered_direct.get();
        assert!(direct > 0 && direct <= N, "the owner wrote pushes itself: {direct}");
        assert!(replies <= N / 25, "{replies} replies");
    }

    #[tokio::test]
    async fn a_malformed_frame_gets_an_error_and_the_connection_stays_usable() {
        let dir = tempfile::tempdir().unwrap();
        let node = node(dir.path(), |_| {});
        let mut ws = connect(&node).await;
        ws.send(Message::text("{not json")).await.unwrap();
        let err = next(&mut ws).await;
        assert_eq!(err["error"]["code"], "bad_request", "{err}");
        send(&mut ws, json!({"id": 7, "op": "explode", "channel": "room:1"})).await;
        let err = next(&mut ws).await;
        assert_eq!((err["id"].as_u64(), err["error"]["code"].as_str()), (Some(7), Some("unknown_op")), "{err}");
        send(&mut ws, json!({"id": 8, "op": "ping"})).await;
        assert_eq!(next(&mut ws).await["id"], 8);
    }

    /// A client that stops answering pings is closed once `ping_timeout` passes; with time
    /// paused the test takes no wall-clock time.
    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_closed_after_the_ping_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let node = node(dir.path(), |c| {
            c.sessions.ping_interval = Duration::from_secs(1);
            c.sessions.ping_timeout = Duration::from_secs(3);
        });
        let mut ws = connect(&node).await;
        send(&mut ws, json!({"id": 1, "op": "connect"})).await;
        // Not reading means not answering pings (tungstenite answers them on read).
        tokio::time::sleep(Duration::from_secs(10)).await;
        // Reading now answers the ping too late: the server has closed (a close frame, or
        // the pong meets a socket the server already dropped).
        let mut pings = 0;
        let ended = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                match ws.next().await {
                    Some(Ok(Message::Ping(_))) => pings += 1,
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                    Some(Ok(_)) => {}
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "the connection was still open a minute later");
        assert!(pings >= 1, "the server pinged before giving up");
        assert_eq!(node.metrics.connections.get(), 0);
    }

    /// Pipelined history reads whose replies are not read stop the server from reading
    /// further commands once the replies waiting reach the byte budget: the publish sent
    /// after them is only read (and seen by a subscriber) once the client reads again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unread_replies_pause_reading_at_the_byte_budget() {
        let dir = tempfile::tempdir().unwrap();
        let node = node(dir.path(), |c| {
            c.limits.outbound_queue_bytes = 256 * 1024;
            c.limits.max_reply_bytes = 64 * 1024;
        });
        let mut a = connect(&node).await;
        send(&mut a, json!({"id": 1, "op": "connect"})).await;
        assert_eq!(next(&mut a).await["id"], 1);
        let blob = "x".repeat(4000);
        for i in 0..40 {
            send(&mut a, json!({"id": 100 + i, "op": "publish", "channel": "big", "data": blob})).await;
        }
        for _ in 0..40 {
            assert!(next(&mut a).await.get("ok").is_some());
        }
        let mut b = connect(&node).await;
        send(&mut b, json!({"id": 1, "op": "subscribe", "channel": "probe"})).await;
        assert!(next(&mut b).await.get("ok").is_some());

        const READS: u64 = 40;
        for i in 0..READS {
            send(&mut a, json!({"id": 1000 + i, "op": "history", "channel": "big", "since": 0, "limit": 1000})).await;
        }
        send(&mut a, json!({"id": 2000, "op": "publish", "channel": "probe", "data": 1})).await;
        // Nothing to wait for but time: the probe must not be read while `a` reads nothing.
        let early = tokio::time::timeout(Duration::from_millis(500), next(&mut b)).await;
        assert!(early.is_err(), "the server read past its reply budget: {early:?}");

        // Reading again: every reply arrives, in order and capped, then the probe goes out.
        for i in 0..READS {
            let r = next(&mut a).await;
            assert_eq!(r["id"].as_u64(), Some(1000 + i), "{r}");
            let n = r["ok"]["messages"].as_array().unwrap().len();
            assert!((1..40).contains(&n), "a page is capped at max_reply_bytes: {n}");
        }
        let push = tokio::time::timeout(Duration::from_secs(10), next(&mut b)).await.expect("the probe arrives");
        assert_eq!(push["data"], 1, "{push}");
    }

    /// The raw text of the next text frame.
    async fn next_text(ws: &mut Client) -> String {
        loop {
            match ws.next().await.expect("open").expect("frame") {
                Message::Text(t) => return t.to_string(),
                Message::Close(c) => panic!("closed: {c:?}"),
                _ => continue,
            }
        }
    }

    /// With `batch: true`, catch-up and live pushes come packed as JSON lines, every one of
    /// them in order, no frame over `max_frame_bytes`; without it, one push per frame.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_client_gets_pushes_packed_as_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let node = node(dir.path(), |c| c.limits.max_frame_bytes = 4096);
        let mut p = connect(&node).await;
        for i in 0..100u64 {
            send(
                &mut p,
                json!({"id": i, "op": "publish", "channel": "room:b", "data": {"n": i, "pad": "y".repeat(100)}}),
            )
            .await;
        }
        for _ in 0..100 {
            assert!(next(&mut p).await.get("ok").is_some());
        }
        for batch in [true, false] {
            let mut ws = connect(&node).await;
            send(&mut ws, json!({"id": 1, "op": "connect", "batch": batch})).await;
            let ok = next(&mut ws).await;
            assert_eq!(ok["ok"]["batch"].as_bool(), batch.then_some(true), "{ok}");
            send(&mut ws, json!({"id": 2, "op": "subscribe", "channel": "room:b", "from": "earliest"})).await;
            assert!(next(&mut ws).await.get("ok").is_some());
            let (mut offsets, mut frames) = (Vec::new(), 0);
            while offsets.len() < 100 {
                let frame = next_text(&mut ws).await;
                assert!(frame.len() <= 4096, "a frame over max_frame_bytes: {}", frame.len());
                frames += 1;
                for line in frame.split('\n') {
                    let v: Value = serde_json::from_str(line).unwrap();
                    assert_eq!(v["push"], "message", "{v}");
                    offsets.push(v["offset"].as_u64().unwrap());
                }
            }
            assert_eq!(offsets, (1..=100).collect::<Vec<_>>(), "every push once, in order");
            if batch {
                assert!(frames < 100 / 10, "packed: {frames} frames for 100 pushes");
            } else {
                assert_eq!(frames, 100, "one push per frame unless asked");
            }
        }
    }

    /// A client's close frame is answered with one: the close handshake completes.
    #[tokio::test]
    async fn a_client_close_is_answered_with_a_close_frame() {
        let dir = tempfile::tempdir().unwrap();
        let node = node(dir.path(), |_| {});
        let mut ws = connect(&node).await;
        send(&mut ws, json!({"id": 1, "op": "ping"})).await;
        assert_eq!(next(&mut ws).await["id"], 1);
        ws.close(None).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("an answer in time");
        assert!(matches!(answer, Some(Ok(Message::Close(_)))), "{answer:?}");
    }
}
