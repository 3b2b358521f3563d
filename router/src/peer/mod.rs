//! Cross-node routing: forwarding operations to a partition's owner over peer links.
//!
//! It owns [`call`], which runs an operation where the map says it belongs (here, or on
//! the owner over its link, following redirects while the map changes), and the `/peer`
//! endpoint's side of a link ([`serve`]). It must never wait on etcd: routing reads the
//! in-memory map only, and every remote call has a deadline.

pub mod link;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::sync::{mpsc, Semaphore};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::node::{Node, Route};
use crate::owner::PublishRequest;
use crate::protocol::{ErrorCode, OpError};
use wire::{Answer, Frame, Op, WireError};

/// How many times a forwarded operation follows a redirect before giving up.
const ATTEMPTS: usize = 5;
/// Deadline of one forwarded request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests one incoming link runs at once; beyond that it stops reading (backpressure).
const IN_FLIGHT: usize = 1024;

fn op_name(op: &Op) -> &'static str {
    match op {
        Op::Publish { .. } => "publish",
        Op::History { .. } => "history",
        Op::Commit { .. } => "commit",
    }
}

/// Runs `op` on this node, which must own its channel.
pub async fn execute(node: &Arc<Node>, op: Op) -> Result<Answer, OpError> {
    match op {
        Op::Publish { channel, data, key, idempotency_key, from } => {
            let data = serde_json::value::RawValue::from_string(data)
                .map_err(|e| OpError::bad_request(format!("data is not JSON: {e}")))?;
            let req = PublishRequest { channel, data, key, idempotency_key, from };
            let ok = node.publish_local(req).await?;
            Ok(Answer::Published { offset: ok.offset, epoch: ok.epoch.to_string() })
        }
        Op::History { channel, since, limit } => node.history_local(&channel, since, limit).await.map(Answer::history),
        Op::Commit { channel, consumer, offset } => {
            node.commit_local(&channel, consumer, offset).await.map(|()| Answer::Committed)
        }
    }
}

/// Runs `op` where the current map puts its channel, following redirects.
pub async fn call(node: &Arc<Node>, op: Op) -> Result<Answer, OpError> {
    start(node, op)?.finish().await
}

/// An operation under way: run here, or sent to its owner and waiting for the reply.
pub enum Started {
    /// This node owns the channel.
    Local(Arc<Node>, Op),
    /// Queued on the owner's link.
    Remote(Arc<Node>, Op, String, u64, link::Pending),
}

/// Routes `op` and, for a remote owner, queues it on the link at once: operations started
/// in order by one caller reach the owner in that order.
pub fn start(node: &Arc<Node>, op: Op) -> Result<Started, OpError> {
    let (owner, epoch) = match node.locate(op.channel())? {
        Route::Local(_) => return Ok(Started::Local(node.clone(), op)),
        Route::Remote { owner, epoch } => (owner, epoch),
    };
    let Some(links) = &node.peers else {
        return Err(node.route(op.channel()).expect_err("remote channel"));
    };
    let pending = links.send(&owner, epoch, op.clone()).map_err(|e| e.to_op())?;
    Ok(Started::Remote(node.clone(), op, owner, epoch, pending))
}

impl Started {
    /// Waits for the outcome, following redirects while the partition moves.
    pub async fn finish(self) -> Result<Answer, OpError> {
        let (node, op, mut owner, mut epoch, mut pending) = match self {
            Started::Local(node, op) => return execute(&node, op).await,
            Started::Remote(node, op, owner, epoch, pending) => (node, op, owner, epoch, pending),
        };
        let name = op_name(&op);
        for _ in 0..ATTEMPTS {
            match pending.wait(REQUEST_TIMEOUT).await {
                Ok(answer) => {
                    node.metrics.peer_forwarded.with_label_values(&[name, "ok"]).inc();
                    return Ok(answer);
                }
                Err(WireError { redirect: Some((to, their_epoch)), .. }) => {
                    node.metrics.peer_redirects.inc();
                    tracing::debug!(channel = op.channel(), from = %owner, to = %to, their_epoch, "redirected");
                    // Wait (bounded) for our map to catch up with the owner's, then retry.
                    wait_for_epoch(&node, their_epoch.max(epoch + 1)).await;
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
        Err(OpError::new(ErrorCode::Unavailable, format!("partition still moving after {ATTEMPTS} redirects")))
    }
}

async fn wait_for_epoch(node: &Node, epoch: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while node.map.load().epoch < epoch && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Serves one incoming link: runs each request (if this node owns the channel; otherwise
/// answers with a redirect) and writes the replies back, in completion order.
pub async fn serve<S>(node: Arc<Node>, ws: WebSocketStream<S>, peer: String)
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
    let permits = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut shutdown = node.shutdown.clone();
    tracing::info!(%peer, "peer link accepted");
    loop {
        // At most IN_FLIGHT requests run; beyond that the peer's frames wait in TCP.
        let permit = permits.clone().acquire_owned().await.expect("semaphore open");
        let msg = tokio::select! {
            m = stream.next() => m,
            _ = shutdown.changed() => break,
        };
        let (id, epoch, op) = match msg {
            Some(Ok(Message::Binary(b))) => match wire::decode(&b) {
                Ok(Frame::Request { id, epoch, op }) => (id, epoch, op),
                Ok(Frame::Reply { .. }) | Err(_) => {
                    tracing::warn!(%peer, "bad frame on a peer link; closing it");
                    break;
                }
            },
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
            Some(Ok(_)) => continue,
        };
        // Writes enter the owner's mailbox here, in the order the link carried them;
        // only the wait for durability runs concurrently.
        let begun = begin(&node, epoch, op).await;
        let (node, tx) = (node.clone(), tx.clone());
        tokio::spawn(async move {
            let result = begun.finish(&node).await;
            let _ = tx.send(wire::encode(&Frame::Reply { id, result })).await;
            drop(permit);
        });
    }
    drop(tx);
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, writer).await;
    tracing::info!(%peer, "peer link closed");
}

/// A request accepted by the owner: its write (if any) is already in the mailbox.
enum Begun {
    Published(tokio::sync::oneshot::Receiver<Result<crate::protocol::PublishOk, OpError>>),
    Committed(tokio::sync::oneshot::Receiver<Result<(), OpError>>),
    History(String, u64, u32),
    Done(Result<Answer, WireError>),
}

async fn begin(node: &Arc<Node>, epoch: u64, op: Op) -> Begun {
    let err = |e: OpError| Begun::Done(Err(WireError::op(&e)));
    match node.locate(op.channel()) {
        Err(e) => return err(e),
        Ok(Route::Remote { owner, epoch: ours }) => {
            let e = OpError::new(ErrorCode::Unavailable, format!("not the owner (map epoch {ours}, sender's {epoch})"));
            return Begun::Done(Err(WireError { redirect: Some((owner, ours)), ..WireError::op(&e) }));
        }
        Ok(Route::Local(_)) => {}
    }
    match op {
        Op::Publish { channel, data, key, idempotency_key, from } => {
            let data = match serde_json::value::RawValue::from_string(data) {
                Ok(d) => d,
                Err(e) => return err(OpError::bad_request(format!("data is not JSON: {e}"))),
            };
            match node.publish_enqueue(PublishRequest { channel, data, key, idempotency_key, from }).await {
                Ok(rx) => Begun::Published(rx),
                Err(e) => err(e),
            }
        }
        Op::Commit { channel, consumer, offset } => match node.commit_enqueue(&channel, consumer, offset).await {
            Ok(rx) => Begun::Committed(rx),
            Err(e) => err(e),
        },
        Op::History { channel, since, limit } => Begun::History(channel, since, limit),
    }
}

impl Begun {
    async fn finish(self, node: &Arc<Node>) -> Result<Answer, WireError> {
        let gone = || WireError::op(&OpError::new(ErrorCode::Unavailable, "owner stopped"));
        let result = match self {
            Begun::Done(r) => return r,
            Begun::Published(rx) => rx
                .await
                .map_err(|_| gone())?
                .map(|ok| Answer::Published { offset: ok.offset, epoch: ok.epoch.to_string() }),
            Begun::Committed(rx) => rx.await.map_err(|_| gone())?.map(|()| Answer::Committed),
            Begun::History(channel, since, limit) => {
                node.history_local(&channel, since, limit).await.map(Answer::history)
            }
        };
        result.map_err(|e| WireError::op(&e))
    }
}
