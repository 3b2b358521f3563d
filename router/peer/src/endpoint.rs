//! The `/peer` endpoint: the owner's side of a link another node dialed.
//!
//! It owns one accepted link's loop: reading requests (at most [`IN_FLIGHT`] at once,
//! beyond which the peer's frames wait in TCP), handing each to the [`dispatch`](crate::dispatch)er
//! in the order the link carried it, writing the replies back in completion order, and
//! turning the owners' deliveries for the gateway's upstream subscriptions into push
//! frames, one per burst. When the link ends, its upstream subscriptions end with it. It
//! must never run an operation itself, and never let a slow gateway hold the owners up:
//! a link too slow for its pushes is closed (the gateway reconnects and catches up).

use std::sync::Arc;

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::sync::{mpsc, Semaphore};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::call::REQUEST_TIMEOUT;
use crate::dispatch::{self, Incoming, LinkSubs};
use crate::node::Node;
use crate::router::Router;
use crate::wire::{self, Frame, WireError};
use switchyard_core::outbox::Kind;

/// Requests one incoming link runs at once; beyond that it stops reading (backpressure).
const IN_FLIGHT: usize = 1024;

/// Pushes queued for one incoming link's upstream subscriptions before it counts as too
/// slow and is closed (the gateway reconnects and catches up).
const PUSH_QUEUE: usize = 65_536;
/// The same bound in bytes.
const PUSH_BYTES: usize = 256 << 20;

/// Serves one incoming link: runs each request (if this node owns the channel; otherwise
/// answers with a redirect) and writes the replies back, in completion order, together
/// with the pushes of the upstream subscriptions registered on it.
#[tracing::instrument(name = "peer_link", skip_all, fields(peer = %peer, side = "accepted"))]
///
/// `wire`: the wire version the dialer named ([`wire::wire_version`]): one that predates
/// typed refusals gets errors in the shape it knows, one that predates presence gets no
/// presence events.
pub async fn serve<S>(router: Arc<Router>, ws: WebSocketStream<S>, peer: String, wire: u32)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // The router stays alive while the link runs (writes that race a seal are forwarded
    // by its task); the link's work reads the node.
    let node = router.node().clone();
    let refusals = wire >= 2;
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
    let events = wire >= wire::PRESENCE_WIRE;
    let pusher = tokio::spawn(push_loop(node.clone(), inbox, subs.clone(), tx.clone(), events));
    let link = Incoming { outbox: outbox.clone(), subs: subs.clone() };
    let permits = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut shutdown = node.shutdown_signal();
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
                // A newer dialer's op this version does not know: an error, not a closed link.
                Err(_) if wire::decode_request_id(&b).is_some() => {
                    let id = wire::decode_request_id(&b).expect("checked");
                    let e = switchyard_proto::protocol::OpError::new(
                        switchyard_proto::protocol::ErrorCode::Unavailable,
                        "unknown peer operation: this node runs an older version",
                    );
                    let mut result = Err(WireError::op(&e));
                    if !refusals {
                        result = result.map_err(WireError::legacy);
                    }
                    let _ = tx.send(wire::encode(&Frame::Reply { id, result })).await;
                    continue;
                }
                Ok(Frame::Reply { .. } | Frame::Pushes(_) | Frame::Events(_)) | Err(_) => {
                    tracing::warn!("bad frame on a peer link; closing it");
                    break;
                }
            },
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
            Some(Ok(_)) => continue,
        };
        // Writes enter the owner's mailbox here, in the order the link carried them;
        // only the wait for durability runs concurrently.
        let begun = dispatch::begin(&node, &link, epoch, op).await;
        let (node, tx) = (node.clone(), tx.clone());
        tokio::spawn(async move {
            let mut result = begun.finish(&node).await;
            if !refusals {
                result = result.map_err(WireError::legacy);
            }
            let _ = tx.send(wire::encode(&Frame::Reply { id, result })).await;
            drop(permit);
        });
    }
    // The link's upstream subscriptions end with it: the gateway resubscribes.
    pusher.abort();
    let left: Vec<(u64, (u64, String))> = subs.lock().expect("link subs").drain().collect();
    node.metrics().peer_subscriptions.sub(left.len() as i64);
    for (local, (_, channel)) in left {
        node.partitions().unsubscribe(&channel, local).await;
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
    node: Arc<Node>,
    mut inbox: switchyard_core::outbox::Inbox,
    subs: LinkSubs,
    tx: mpsc::Sender<Vec<u8>>,
    events: bool,
) {
    loop {
        let burst = inbox.recv_all().await;
        if burst.is_empty() {
            return; // the link is too slow for its pushes: it is closing
        }
        let (mut pushes, mut bytes) = (Vec::new(), 0);
        let mut news: Vec<wire::Event> = Vec::new();
        for d in burst {
            if d.kind == Kind::Event {
                // Presence news, for a dialer that reads it, in order with the messages:
                // the pushes before it go out first.
                let Some(sub) = events.then(|| subs.lock().expect("link subs").get(&d.sub).map(|(r, _)| *r)).flatten()
                else {
                    continue;
                };
                if !pushes.is_empty() {
                    if tx.send(wire::encode(&Frame::Pushes(std::mem::take(&mut pushes)))).await.is_err() {
                        return;
                    }
                    bytes = 0;
                }
                news.push(wire::Event { sub, frame: d.frame.as_str().to_owned() });
                continue;
            }
            if !news.is_empty() && tx.send(wire::encode(&Frame::Events(std::mem::take(&mut news)))).await.is_err() {
                return;
            }
            let remote = {
                let mut subs = subs.lock().expect("link subs");
                let remote = subs.get(&d.sub).map(|(r, _)| *r);
                if d.kind == Kind::End && subs.remove(&d.sub).is_some() {
                    node.metrics().peer_subscriptions.dec();
                }
                remote
            };
            let Some(sub) = remote else { continue };
            bytes += d.frame.len();
            pushes.push(wire::Push {
                sub,
                offset: d.offset,
                frame: d.frame.as_str().to_owned(),
                end: d.kind == Kind::End,
            });
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
        if !news.is_empty() && tx.send(wire::encode(&Frame::Events(news))).await.is_err() {
            return;
        }
    }
}
