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
//!
//! Its parts, each adding methods to the one `Session`: this file holds the session's state
//! and its loop; `direct` lends the socket's write side to the owners and takes it back,
//! `write` queues frames and replies and flushes them, `read` takes the client's frames and
//! commands, `centrifugo` takes a Centrifugo client's frames and turns its commands into the
//! same ones, `dialect` frames replies, pushes and closes for the client's protocol,
//! `deliver` writes subscribe replies, catch-up and pushes, `presence` joins and leaves
//! channels' presence, and `close` writes the last words. None of them holds state of its
//! own.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, StreamExt};
use switchyard_proto::{Dialect, Text};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;
use tracing::Instrument as _;

use xxhash_rust::xxh3::Xxh3DefaultBuilder as Xxh3Builder;

use crate::node::Node;
use crate::socket::Socket;
use dialect::To;
use switchyard_access::gate::{Gate, Refusal};
use switchyard_access::user_sessions::Heartbeat;
use switchyard_core::outbox::{outbox_in, Delivery, DirectSink, Inbox, Outbox};
use switchyard_core::owner::Grant;
use switchyard_peer::seats::ClusterSeat;
use switchyard_proto::protocol::OpError;

mod centrifugo;
mod close;
mod deliver;
mod dialect;
mod direct;
mod presence;
mod read;
#[cfg(test)]
mod tests;
mod write;

/// How long a connected Centrifugo client may run on an expired token while it refreshes
/// (Centrifugo's own default for the same grace).
const CF_EXPIRED_GRACE: std::time::Duration = std::time::Duration::from_secs(25);

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
        /// The token expired (the client may come back with a new one).
        expired: bool,
    },
    /// The peer did not answer a ping in time.
    Unresponsive,
    /// A Centrifugo frame that is not the protocol (3501), or `send`, which has no reply
    /// to carry an error (3508): the close says why.
    Protocol {
        /// Close code.
        code: u16,
        /// Close reason.
        reason: &'static str,
    },
    /// The socket accepted no bytes for `limits.write_timeout`.
    WriteTimeout,
}

impl From<Refusal> for Stop {
    fn from(r: Refusal) -> Self {
        Stop::Refused { code: r.code, reason: r.reason, expired: r.expired }
    }
}

/// A finished command, ready to write in order.
enum Output {
    Frame(Text),
    Subscribed {
        to: To,
        sub: u64,
        channel: String,
        result: Result<Grant, OpError>,
        /// Centrifugo: answer 112 instead of `recovered: false`.
        reject_unrecovered: bool,
        /// The catch-up, started as soon as the grant arrived.
        ahead: deliver::Ahead,
    },
    /// The grant of a subscription moved from a gateway's upstream to the owner on this
    /// node ([`Kind::Moved`](switchyard_core::outbox::Kind)): nothing is owed to the client
    /// but the messages it missed.
    Moved {
        sub: u64,
        channel: String,
        result: Result<Grant, OpError>,
    },
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

/// Serves one upgraded WebSocket that speaks `dialect` until it closes.
pub(crate) async fn run<S>(node: Arc<Node>, ws: WebSocketStream<Socket<S>>, dialect: Dialect)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let id = node.router.next_id();
    // Every log line of this connection carries `client{id}`.
    serve(node, ws, id, dialect).instrument(tracing::info_span!("client", id)).await;
}

async fn serve<S>(node: Arc<Node>, ws: WebSocketStream<Socket<S>>, id: u64, dialect: Dialect)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut session = Session::new(node.clone(), ws, id, dialect);
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
    /// The protocol the client speaks.
    dialect: Dialect,
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
    /// The channels whose presence this session joined, and the task that tells the owners.
    presence: presence::Presence,
}

fn ready(frame: Text) -> BoxFuture<'static, Output> {
    futures_util::future::ready(Output::Frame(frame)).boxed()
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

impl<S> Session<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    fn new(node: Arc<Node>, ws: WebSocketStream<Socket<S>>, id: u64, dialect: Dialect) -> Self {
        let limits = &node.config.limits;
        let (outbox, inbox) = outbox_in(dialect, limits.outbound_queue_messages, limits.outbound_queue_bytes);
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
            dialect,
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
            presence: presence::Presence::default(),
        }
    }

    /// When the connection is closed for want of a valid token: the gate's deadline, and
    /// for a connected Centrifugo client [`CF_EXPIRED_GRACE`] later. Its SDKs refresh when
    /// the `ttl` runs out, not before (as Centrifugo's own grace,
    /// `client_expired_close_delay`, allows), and `ttl` is whole seconds.
    fn token_deadline(&self) -> Option<Instant> {
        let at = self.gate.deadline(&self.node.access)?;
        match self.dialect {
            Dialect::Centrifugo if self.gate.is_connected() => Some(at + CF_EXPIRED_GRACE),
            _ => Some(at),
        }
    }

    /// This connection's id, unique in the cluster (the `client` of `connect` and of
    /// presence).
    fn client_id(&self) -> String {
        format!("{}-{}", self.node.client_prefix, self.id)
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
            // Each branch's handler is boxed while it runs: inline, the largest of them
            // (writing a batch of pushes) set the size of every idle connection's task
            // (3.7 KiB in all; boxed, 2.5 KiB and 1.5 KiB less RSS per idle connection),
            // for one allocation per wake-up that has work.
            let step = tokio::select! {
                biased;
                Some(out) = self.pending.next(), if !self.pending.is_empty() => {
                    self.take_socket_back();
                    let reserved = self.reserved.pop_front().unwrap_or_default();
                    let written = Box::pin(self.on_output(out)).await;
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
                        (false, None) => Box::pin(self.on_pushes(batch)).await,
                        (false, Some(_)) => Box::pin(self.on_deliveries(batch)).await,
                    }
                }
                // Replies waiting to be written pause reading at the byte budget: a client
                // that pipelines reads and stops reading the answers holds at most about
                // one budget of them (the socket's write deadline then ends it).
                frame = next_frame(&mut self.ws), if !self.reading_paused() => {
                    self.take_socket_back();
                    Box::pin(self.on_frame(frame)).await
                }
                _ = &mut self.beat => {
                    self.take_socket_back();
                    Box::pin(self.on_beat()).await
                }
                // After the branches that carry work: written frames wait for the end of the
                // pass, so commands still to be read and pushes still to come share the flush.
                () = corked(&mut self.cork) => Box::pin(self.uncork()).await,
                _ = &mut self.auth_timer, if self.auth_deadline.is_some() => {
                    self.take_socket_back();
                    let refusal = self.gate.deadline_refusal();
                    if self.dialect == Dialect::Native {
                        let frame = self.reply_error(None, &refusal.error);
                        self.queue(ready(frame));
                    }
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
}
