//! Cross-node routing: forwarding operations to a partition's owner over peer links.
//!
//! It owns [`call`], which runs an operation where the map says it belongs (here, or on
//! the owner over its link, following redirects while the map changes), and the `/peer`
//! endpoint's side of a link ([`serve`]): running requests as the owner, registering
//! gateways' upstream subscriptions and pushing their messages back on the same link. It
//! must never wait on etcd: routing reads the in-memory map only, and every remote call
//! has a deadline.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::sync::{mpsc, Semaphore};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::router::{Route, Router};
use std::collections::HashMap;

use crate::link;
use crate::wire::{self, Answer, Frame, Op, WireError};
use switchyard_core::owner::{PublishRequest, Start};
use switchyard_proto::partition::PartitionId;
use switchyard_proto::protocol::StartFrom;
use switchyard_proto::protocol::{ErrorCode, OpError};

/// How many times a forwarded operation follows a redirect before giving up.
const ATTEMPTS: usize = 50;
/// How long a forwarded operation keeps following redirects and retrying.
const RETRY_BUDGET: Duration = Duration::from_secs(10);
/// Bytes (payload, keys, ids) one history reply carries over a link at most (fewer messages then).
const HISTORY_REPLY_BYTES: usize = 8 << 20;
/// Deadline of one forwarded request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests one incoming link runs at once; beyond that it stops reading (backpressure).
const IN_FLIGHT: usize = 1024;

/// The owner stopped before it answered.
fn stopped() -> OpError {
    OpError::new(ErrorCode::Unavailable, "owner stopped")
}

/// Runs `op` on this node, which must own its channel.
pub(crate) async fn execute(node: &Arc<Router>, op: Op) -> Result<Answer, OpError> {
    match op {
        Op::Publish { channel, data, key, idempotency_key, from } => {
            let data = serde_json::value::RawValue::from_string(data)
                .map_err(|e| OpError::bad_request(format!("data is not JSON: {e}")))?;
            let req = PublishRequest { channel, data, key, idempotency_key, from };
            let p = node.local(&req.channel)?;
            let ok = node.partitions.publish(p, req).await?.await.map_err(|_| stopped())??;
            Ok(Answer::Published { offset: ok.offset, epoch: ok.epoch.to_string() })
        }
        Op::History { channel, since, limit } => {
            node.partitions.history(node.local(&channel)?, &channel, since, limit).await.map(Answer::history)
        }
        Op::Commit { channel, consumer, offset } => {
            let p = node.local(&channel)?;
            let rx = node.partitions.commit(p, &channel, consumer, offset).await?;
            rx.await.map_err(|_| stopped())?.map(|()| Answer::Committed)
        }
        Op::Info { channel, consumer } => {
            node.partitions.info(node.local(&channel)?, &channel, consumer).await.map(|f| {
                Answer::Info(wire::ChannelInfo {
                    epoch: f.epoch.to_string(),
                    top: f.top,
                    first: f.first,
                    committed: f.committed,
                })
            })
        }
        op @ (Op::Seat { .. } | Op::Unseat { .. }) => Ok(node.serve_seat(op)),
        Op::Subscribe { .. }
        | Op::Unsubscribe { .. }
        | Op::Pull { .. }
        | Op::Pulled { .. }
        | Op::Fetch { .. }
        | Op::Snapshot { .. }
        | Op::EpochEnd { .. } => Err(OpError::internal(format!("{} is not run locally", op.name()))),
    }
}

/// Runs `op` where the current map puts its channel, following redirects.
pub(crate) async fn call(node: &Arc<Router>, op: Op) -> Result<Answer, OpError> {
    start(node, op)?.finish().await
}

/// An operation under way: run here, or sent to its owner and waiting for the reply.
pub(crate) enum Started {
    /// This node owns the channel.
    Local(Arc<Router>, Op),
    /// Queued on the owner's link.
    Remote(Arc<Router>, Op, String, u64, link::Pending),
}

/// Routes `op` and, for a remote owner, queues it on the link at once: operations started
/// in order by one caller reach the owner in that order.
pub(crate) fn start(node: &Arc<Router>, op: Op) -> Result<Started, OpError> {
    let (owner, epoch) = match node.locate(op.channel())? {
        Route::Local(_) => return Ok(Started::Local(node.clone(), op)),
        Route::Remote { owner, epoch } => (owner, epoch),
    };
    let Some(links) = &node.peers else {
        return Err(node.route(op.channel()).expect_err("remote channel"));
    };
    let pending = links.send(&owner, epoch, &op).map_err(|e| e.to_op())?;
    Ok(Started::Remote(node.clone(), op, owner, epoch, pending))
}

impl Started {
    /// Waits for the outcome, following redirects while the partition moves.
    pub(crate) async fn finish(self) -> Result<Answer, OpError> {
        let (node, op, mut owner, mut epoch, mut pending) = match self {
            Started::Local(node, op) => return execute(&node, op).await,
            Started::Remote(node, op, owner, epoch, pending) => (node, op, owner, epoch, pending),
        };
        let name = op.name();
        let began = std::time::Instant::now();
        for _ in 0..ATTEMPTS {
            match pending.wait(REQUEST_TIMEOUT).await {
                Ok(answer) => {
                    node.metrics.peer_forwarded.with_label_values(&[name, "ok"]).inc();
                    return Ok(answer);
                }
                Err(WireError { redirect: Some((to, their_epoch)), .. }) if began.elapsed() < RETRY_BUDGET => {
                    node.metrics.peer_redirects.inc();
                    tracing::debug!(channel = op.channel(), from = %owner, to = %to, their_epoch, "redirected");
                    if to == owner {
                        // The owner is still taking the partition over: ask again shortly.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    } else {
                        // Wait (bounded) for our map to catch up with the owner's, then retry.
                        node.wait_for_epoch(their_epoch.max(epoch + 1)).await;
                    }
                }
                // The link dropped with the request in flight. A keyed publish is
                // deduplicated by the owner and a commit only ever raises an offset, so
                // those are safe to send again; anything else reports the unknown outcome.
                Err(e) if link::is_lost(&e) && op.retry_safe() && began.elapsed() < REQUEST_TIMEOUT => {
                    tracing::debug!(channel = op.channel(), peer = %owner, error = %e.message, "retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    node.metrics.peer_forwarded.with_label_values(&[name, "error"]).inc();
                    return Err(e.to_op());
                }
            }
            match start(&node, op.clone())? {
                Started::Local(node, op) => return execute(&node, op).await,
                Started::Remote(_, _, o, e, p) => (owner, epoch, pending) = (o, e, p),
            }
        }
        node.metrics.peer_forwarded.with_label_values(&[name, "error"]).inc();
        Err(OpError::new(ErrorCode::Unavailable, format!("partition still moving after {ATTEMPTS} attempts")))
    }
}

/// Pushes queued for one incoming link's upstream subscriptions before it counts as too
/// slow and is closed (the gateway reconnects and catches up).
const PUSH_QUEUE: usize = 65_536;
/// The same bound in bytes.
const PUSH_BYTES: usize = 256 << 20;

/// The upstream subscriptions registered on one incoming link: the owner's id for each
/// (what its outbox deliveries carry) → the gateway's id and the channel.
type LinkSubs = Arc<std::sync::Mutex<HashMap<u64, (u64, String)>>>;

/// Serves one incoming link: runs each request (if this node owns the channel; otherwise
/// answers with a redirect) and writes the replies back, in completion order, together
/// with the pushes of the upstream subscriptions registered on it.
#[tracing::instrument(name = "peer_link", skip_all, fields(peer = %peer, side = "accepted"))]
pub async fn serve<S>(node: Arc<Router>, ws: WebSocketStream<S>, peer: String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut stream) = ws.split();
    let (tx, mut replies) = mpsc::channel::<Vec<u8>>(IN_FLIGHT);
    let writer = tokio::spawn(async move {
        while let Some(bytes) = replies.recv().await {
            if sink.send(Message::Binary(bytes.into())).await.is_err() {
                break;
            }
        }
    });
    let (outbox, inbox) = switchyard_core::outbox::outbox(PUSH_QUEUE, PUSH_BYTES);
    let subs: LinkSubs = Arc::default();
    let pusher = tokio::spawn(push_loop(node.clone(), inbox, subs.clone(), tx.clone()));
    let link = Incoming { outbox: outbox.clone(), subs: subs.clone() };
    let permits = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut shutdown = node.shutdown.clone();
    let slow = outbox.slow_signal.notified();
    tokio::pin!(slow);
    slow.as_mut().enable();
    tracing::info!("peer link accepted");
    loop {
        // At most IN_FLIGHT requests run; beyond that the peer's frames wait in TCP.
        let permit = permits.clone().acquire_owned().await.expect("semaphore open");
        if outbox.is_slow() {
            tracing::warn!("peer link too slow for its pushes; closing it");
            break;
        }
        let msg = tokio::select! {
            m = stream.next() => m,
            _ = shutdown.changed() => break,
            _ = &mut slow => continue,
        };
        let (id, epoch, op) = match msg {
            Some(Ok(Message::Binary(b))) => match wire::decode(&b) {
                Ok(Frame::Request { id, epoch, op }) => (id, epoch, op),
                Ok(Frame::Reply { .. } | Frame::Pushes(_)) | Err(_) => {
                    tracing::warn!("bad frame on a peer link; closing it");
                    break;
                }
            },
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
            Some(Ok(_)) => continue,
        };
        // Writes enter the owner's mailbox here, in the order the link carried them;
        // only the wait for durability runs concurrently.
        let begun = begin(&node, &link, epoch, op).await;
        let (node, tx) = (node.clone(), tx.clone());
        tokio::spawn(async move {
            let result = begun.finish(&node).await;
            let _ = tx.send(wire::encode(&Frame::Reply { id, result })).await;
            drop(permit);
        });
    }
    // The link's upstream subscriptions end with it: the gateway resubscribes.
    pusher.abort();
    let left: Vec<(u64, (u64, String))> = subs.lock().expect("link subs").drain().collect();
    node.metrics.peer_subscriptions.sub(left.len() as i64);
    for (local, (_, channel)) in left {
        node.unsubscribe(&channel, local).await;
    }
    drop(tx);
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, writer).await;
    tracing::info!("peer link closed");
}

/// Push text carried by one frame at most; a larger burst goes out in several frames.
const PUSH_FRAME_BYTES: usize = 1 << 20;

/// Turns the owners' deliveries for this link's upstream subscriptions into push frames:
/// everything queued at a wake-up goes out together, one frame per burst.
async fn push_loop(
    node: Arc<Router>,
    mut inbox: switchyard_core::outbox::Inbox,
    subs: LinkSubs,
    tx: mpsc::Sender<Vec<u8>>,
) {
    loop {
        let burst = inbox.recv_all().await;
        if burst.is_empty() {
            return; // the link is too slow for its pushes: it is closing
        }
        let (mut pushes, mut bytes) = (Vec::new(), 0);
        for d in burst {
            let remote = {
                let mut subs = subs.lock().expect("link subs");
                let remote = subs.get(&d.sub).map(|(r, _)| *r);
                if d.end && subs.remove(&d.sub).is_some() {
                    node.metrics.peer_subscriptions.dec();
                }
                remote
            };
            let Some(sub) = remote else { continue };
            bytes += d.frame.len();
            pushes.push(wire::Push { sub, offset: d.offset, frame: d.frame.as_str().to_owned(), end: d.end });
            // A large burst goes out frame by frame, never copied whole.
            if bytes >= PUSH_FRAME_BYTES {
                if tx.send(wire::encode(&Frame::Pushes(std::mem::take(&mut pushes)))).await.is_err() {
                    return;
                }
                bytes = 0;
            }
        }
        if !pushes.is_empty() && tx.send(wire::encode(&Frame::Pushes(pushes))).await.is_err() {
            return;
        }
    }
}

/// One incoming link's state that requests touch.
struct Incoming {
    outbox: Arc<switchyard_core::outbox::Outbox>,
    subs: LinkSubs,
}

/// A request accepted by the owner: its write (if any) is already in the mailbox.
enum Begun {
    Published(String, tokio::sync::oneshot::Receiver<Result<switchyard_proto::protocol::PublishOk, OpError>>),
    Committed(String, tokio::sync::oneshot::Receiver<Result<(), OpError>>),
    Subscribed(LinkSubs, u64, tokio::sync::oneshot::Receiver<Result<switchyard_core::owner::Grant, OpError>>),
    History(PartitionId, String, u64, u32),
    Info(String, Option<String>),
    Pull(u32, u64, Option<(String, u64)>),
    Pulled(u32, u64),
    Replica(Op),
    Done(Result<Answer, WireError>),
}

async fn begin(node: &Arc<Router>, link: &Incoming, epoch: u64, op: Op) -> Begun {
    let err = |e: OpError| Begun::Done(Err(WireError::op(&e)));
    match op {
        Op::Pull { partition, moved_at, cursor } => return Begun::Pull(partition, moved_at, cursor),
        Op::Pulled { partition, moved_at } => return Begun::Pulled(partition, moved_at),
        op @ (Op::Fetch { .. } | Op::Snapshot { .. } | Op::EpochEnd { .. }) => return Begun::Replica(op),
        Op::Unsubscribe { channel, sub } => {
            // Wherever the map now puts the channel: the owner here still holds it.
            let local = {
                let mut subs = link.subs.lock().expect("link subs");
                let local = subs.iter().find(|(_, (r, _))| *r == sub).map(|(l, _)| *l);
                local.inspect(|l| {
                    subs.remove(l);
                })
            };
            if let Some(local) = local {
                node.metrics.peer_subscriptions.dec();
                node.unsubscribe(&channel, local).await;
            }
            return Begun::Done(Ok(Answer::Done));
        }
        _ => {}
    }
    let p = match node.locate(op.channel()) {
        Err(e) => return err(e),
        Ok(Route::Remote { owner, epoch: ours }) => return redirect(owner, ours, epoch),
        // Taking the partition over: answer at once (the gateway asks again shortly)
        // rather than park the request, which would hold up the whole link.
        Ok(Route::Local(p)) if node.partitions.handovers.is_adopting(p) => {
            return redirect(node.node_id.clone(), node.map().epoch, epoch);
        }
        Ok(Route::Local(p)) => p,
    };
    match op {
        Op::Publish { channel, data, key, idempotency_key, from } => {
            let data = match serde_json::value::RawValue::from_string(data) {
                Ok(d) => d,
                Err(e) => return err(OpError::bad_request(format!("data is not JSON: {e}"))),
            };
            let name = channel.clone();
            match node.partitions.publish(p, PublishRequest { channel, data, key, idempotency_key, from }).await {
                Ok(rx) => Begun::Published(name, rx),
                Err(e) => err(e),
            }
        }
        Op::Commit { channel, consumer, offset } => match node.partitions.commit(p, &channel, consumer, offset).await {
            Ok(rx) => Begun::Committed(channel, rx),
            Err(e) => err(e),
        },
        Op::History { channel, since, limit } => Begun::History(p, channel, since, limit),
        Op::Info { channel, consumer } => Begun::Info(channel, consumer),
        Op::Subscribe { channel, sub } => {
            let local = node.next_id();
            link.subs.lock().expect("link subs").insert(local, (sub, channel.clone()));
            let start = Start::From(StartFrom::Latest);
            match node.partitions.subscribe(p, &channel, local, link.outbox.clone(), start).await {
                Ok(rx) => Begun::Subscribed(link.subs.clone(), local, rx),
                Err(e) => {
                    link.subs.lock().expect("link subs").remove(&local);
                    err(e)
                }
            }
        }
        op @ (Op::Seat { .. } | Op::Unseat { .. }) => Begun::Done(Ok(node.serve_seat(op))),
        Op::Unsubscribe { .. }
        | Op::Pull { .. }
        | Op::Pulled { .. }
        | Op::Fetch { .. }
        | Op::Snapshot { .. }
        | Op::EpochEnd { .. } => {
            unreachable!("handled above")
        }
    }
}

/// "Not the owner": the owner by this node's map `ours`, for a sender that routed by `theirs`.
fn redirect(owner: String, ours: u64, theirs: u64) -> Begun {
    let e = OpError::new(ErrorCode::Unavailable, format!("not the owner (map epoch {ours}, sender's {theirs})"));
    Begun::Done(Err(WireError { redirect: Some((owner, ours)), ..WireError::op(&e) }))
}

impl Begun {
    async fn finish(self, node: &Arc<Router>) -> Result<Answer, WireError> {
        let gone = || WireError::op(&OpError::new(ErrorCode::Unavailable, "owner stopped"));
        let result = match self {
            Begun::Done(r) => return r,
            Begun::Published(channel, rx) => {
                let ok = rx.await.map_err(|_| gone())?.map_err(|e| sealed(node, &channel, &e))?;
                return Ok(Answer::Published { offset: ok.offset, epoch: ok.epoch.to_string() });
            }
            Begun::Committed(channel, rx) => {
                rx.await.map_err(|_| gone())?.map_err(|e| sealed(node, &channel, &e))?;
                return Ok(Answer::Committed);
            }
            Begun::Subscribed(subs, local, rx) => {
                let granted = rx.await.unwrap_or_else(|_| Err(OpError::new(ErrorCode::Unavailable, "owner stopped")));
                match granted {
                    Ok(g) => {
                        node.metrics.peer_subscriptions.inc();
                        Ok(Answer::Subscribed { epoch: g.epoch.to_string(), top: g.top })
                    }
                    Err(e) => {
                        subs.lock().expect("link subs").remove(&local);
                        Err(e)
                    }
                }
            }
            Begun::History(p, channel, since, limit) => {
                node.partitions.history(p, &channel, since, limit).await.map(|mut page| {
                    // Keep the reply well inside the link's frame limit; the reader pages on.
                    let mut bytes = 0;
                    let keep = page
                        .messages
                        .iter()
                        .take_while(|m| {
                            bytes += m.encoded_len();
                            bytes <= HISTORY_REPLY_BYTES
                        })
                        .count()
                        .max(1);
                    page.messages.truncate(keep);
                    Answer::history(page)
                })
            }
            Begun::Info(channel, consumer) => execute(node, Op::Info { channel, consumer }).await,
            Begun::Pull(p, moved_at, cursor) => crate::handover::serve_pull(node, p, moved_at, cursor).await,
            Begun::Pulled(p, moved_at) => crate::handover::serve_pulled(node, p, moved_at).await.map(|()| Answer::Done),
            Begun::Replica(op) => crate::replica::serve(node, op).await,
        };
        result.map_err(|e| WireError::op(&e))
    }
}

/// A write that met a sealed partition was not stored: the gateway is sent on to the
/// owner the map now names, and retries there.
fn sealed(node: &Router, channel: &str, e: &OpError) -> WireError {
    let map = node.map();
    match map.owner(node.partitions.partition(channel)) {
        Some(owner) if e.message == switchyard_core::owner::SEALED && owner != node.node_id => {
            WireError { redirect: Some((owner.to_string(), map.epoch)), ..WireError::op(e) }
        }
        _ => WireError::op(e),
    }
}
