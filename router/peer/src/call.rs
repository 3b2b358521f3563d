//! The calling side of cross-node routing: running an operation where the map puts its
//! channel, here or at its owner over the owner's link.
//!
//! It owns [`start`] (route, and for a remote owner queue the request on its link at once,
//! so one caller's operations reach the owner in order) and [`Started::finish`] (wait for
//! the reply, following redirects while the partition moves and re-sending a lost request
//! only when sending it twice has the effect of sending it once). A request still waiting
//! on a peer whose link is down when the map moves its channel to another owner stops
//! waiting at once (its outcome is unknown, as if the link had dropped): a caller never
//! waits out the request deadline on an owner the cluster already replaced. It decides on typed
//! [`Refusal`]s only, never on an error's text. It must never wait on etcd: routing reads
//! the in-memory map, and every remote call has a deadline.

use std::sync::Arc;
use std::time::Duration;

use switchyard_proto::protocol::{ErrorCode, OpError};
use switchyard_proto::refusal::Refusal;

use crate::link;
use crate::node::{Node, Route};
use crate::wire::{Answer, Op, WireError};

/// How many times a forwarded operation follows a redirect before giving up.
const ATTEMPTS: usize = 50;
/// How long a forwarded operation keeps following redirects and retrying.
const RETRY_BUDGET: Duration = Duration::from_secs(10);
/// Deadline of one forwarded request.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs `op` where the current map puts its channel, following redirects.
pub(crate) async fn call(node: &Arc<Node>, op: Op) -> Result<Answer, OpError> {
    start(node, op)?.finish().await
}

/// An operation under way: run here, or sent to its owner and waiting for the reply.
pub(crate) enum Started {
    /// This node owns the channel.
    Local(Arc<Node>, Op),
    /// Queued on the owner's link.
    Remote(Arc<Node>, Op, String, u64, link::Pending),
}

/// Routes `op` and, for a remote owner, queues it on the link at once: operations started
/// in order by one caller reach the owner in that order.
pub(crate) fn start(node: &Arc<Node>, op: Op) -> Result<Started, OpError> {
    let (owner, epoch) = match node.locate(op.channel())? {
        Route::Local(_) => return Ok(Started::Local(node.clone(), op)),
        Route::Remote { owner, epoch } => (owner, epoch),
    };
    let Some(links) = node.links() else {
        return Err(node.route(op.channel()).expect_err("remote channel"));
    };
    let pending = links.send(&owner, epoch, &op).map_err(|e| e.to_op())?;
    Ok(Started::Remote(node.clone(), op, owner, epoch, pending))
}

/// Resolves once the map names another owner than `owner` for `channel`'s partition while
/// the link to `owner` is down (never, if the map's or the links' sender is gone). With
/// the link up the old owner answers, or redirects, as in any planned move.
async fn moved_off(node: &Node, channel: &str, owner: &str) {
    let p = node.partitions().partition(channel);
    let mut map = node.map_changes();
    let Some(mut up) = node.links().map(|l| l.reachable()) else { return std::future::pending().await };
    loop {
        let moved = map.borrow_and_update().owner(p).is_some_and(|o| o != owner);
        if moved && !up.borrow_and_update().contains(owner) {
            return;
        }
        let changed = tokio::select! {
            r = map.changed() => r,
            r = up.changed() => r,
        };
        if changed.is_err() {
            return std::future::pending().await;
        }
    }
}

impl Started {
    /// Waits for the outcome, following redirects while the partition moves.
    pub(crate) async fn finish(self) -> Result<Answer, OpError> {
        let (node, op, mut owner, mut epoch, mut pending) = match self {
            Started::Local(node, op) => return crate::dispatch::run_here(&node, op).await,
            Started::Remote(node, op, owner, epoch, pending) => (node, op, owner, epoch, pending),
        };
        let name = op.name();
        let began = tokio::time::Instant::now();
        for _ in 0..ATTEMPTS {
            let outcome = tokio::select! {
                biased;
                r = pending.wait(REQUEST_TIMEOUT) => r,
                _ = moved_off(&node, op.channel(), &owner) => Err(link::lost(format!(
                    "the map moved {} away from {owner} while the request waited; outcome unknown",
                    op.channel()
                ))),
            };
            match outcome {
                Ok(answer) => {
                    node.metrics().peer_forwarded.with_label_values(&[name, "ok"]).inc();
                    return Ok(answer);
                }
                Err(WireError { refusal: Some(Refusal::Redirect { owner: to, epoch: their_epoch }), .. })
                    if began.elapsed() < RETRY_BUDGET =>
                {
                    node.metrics().peer_redirects.inc();
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
                Err(e) if e.refusal == Some(Refusal::Lost) && op.retry_safe() && began.elapsed() < REQUEST_TIMEOUT => {
                    tracing::debug!(channel = op.channel(), peer = %owner, error = %e.message, "retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    node.metrics().peer_forwarded.with_label_values(&[name, "error"]).inc();
                    return Err(e.to_op());
                }
            }
            match start(&node, op.clone())? {
                Started::Local(node, op) => return crate::dispatch::run_here(&node, op).await,
                Started::Remote(_, _, o, e, p) => (owner, epoch, pending) = (o, e, p),
            }
        }
        node.metrics().peer_forwarded.with_label_values(&[name, "error"]).inc();
        Err(OpError::new(ErrorCode::Unavailable, format!("partition still moving after {ATTEMPTS} attempts")))
    }
}
