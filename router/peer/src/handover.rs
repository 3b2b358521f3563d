//! Partition handover: moving a partition's state to its new owner when the map moves it.
//!
//! It owns both sides. The old owner seals a partition it lost (its owner task ends every
//! subscription with 4100, drops the in-memory state and refuses later writes, which
//! gateways then retry at the new owner) and serves the sealed state from its store in
//! chunks over the peer link. The new owner holds the partition's mailbox closed (every
//! command for it waits) while it pulls the chunks, writes them to its own store and
//! fsyncs, then opens the mailbox and tells the old owner, which drops its copy. If the
//! old owner is gone (crashed), or cannot be reached before a deadline, the new owner
//! starts the partition from what it has: nothing trustworthy, so its stale copy is
//! cleared and channels restart under new epochs. It must never run on the message path:
//! everything here happens once per partition move.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::chunks;
use crate::node::Node;
use crate::wire::{Answer, Op, WireError};
use switchyard_proto::partition::{PartitionId, PartitionMap};
use switchyard_proto::protocol::{ErrorCode, OpError};
use switchyard_proto::refusal::Refusal;

/// Deadline of one pull.
const PULL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the new owner keeps trying to reach a live old owner before it starts the
/// partition from what it has.
const HANDOVER_DEADLINE: Duration = Duration::from_secs(30);

/// The error a node answers a pull with when its copy of the partition is not
/// authoritative: it is still adopting it, or gave an adoption up half-way.
fn not_adopted() -> OpError {
    OpError::refused(Refusal::NotAdopted, crate::wire::LEGACY_NOT_ADOPTED)
}

/// Called with a new map before it is installed: for every partition it moves here that
/// was not adopted yet, closes the partition's mailbox (so nothing routed by the new map
/// runs on stale state) and starts pulling it from its old owner.
pub(crate) fn before_install(node: &Arc<Node>, new: &PartitionMap) {
    let me = node.id();
    for p in 0..new.partitions() {
        if new.owner(p) != Some(me) {
            continue;
        }
        // No move record: the first map gave it here; what the store holds is current.
        let Some(moved) = new.moved_from(p) else { continue };
        if moved.from == me || node.partitions().store.adopted(p).ok().flatten() == Some(moved.epoch) {
            continue;
        }
        {
            // One adoption of a partition at a time: a newer move while one runs is picked
            // up by the next map install after it ends (the map is re-read below).
            let mut adopting = node.partitions().handovers.adopting.lock().expect("handovers");
            if adopting.contains_key(&p) {
                continue;
            }
            adopting.insert(p, moved.epoch);
        }
        let (done, rx) = oneshot::channel();
        node.partitions().adopt(p, rx);
        tokio::spawn(adopt(node.clone(), p, moved.from.clone(), moved.epoch, new.epoch, done));
    }
}

/// Called after a new map is installed: seals every partition this node owned in `before`
/// and no longer owns, so its subscribers follow it and its writes go to the new owner.
pub(crate) fn after_install(node: &Arc<Node>, before: &PartitionMap) {
    let after = node.map();
    if after.epoch == before.epoch {
        return;
    }
    let me = node.id();
    for p in 0..before.partitions() {
        if before.owner(p) == Some(me) && after.owner(p) != Some(me) {
            let now = after.owner(p).unwrap_or_default();
            let reason = format!("partition moved to node {now} (map epoch {}); subscribe again", after.epoch);
            // This copy waits to be pulled only when the map moved the partition from here;
            // a follower promoted elsewhere (a failover) pulls nothing.
            let promoted = !after.replicas.is_empty() && after.moved_from(p).is_none_or(|m| m.from != me);
            if node.links().is_some() && !promoted {
                let moved_at = after.moved_from(p).map_or(after.epoch, |m| m.epoch);
                node.partitions().handovers.sealed.lock().expect("handovers").insert(p, moved_at);
            }
            // Never wait here (this runs in the etcd watch loop): a held mailbox takes it later.
            node.partitions().seal_later(p, reason);
        }
    }
}

/// Pulls partition `p` from `from` into the store, then opens its mailbox.
#[tracing::instrument(name = "handover", skip_all, fields(partition = p, %from, moved_at))]
async fn adopt(node: Arc<Node>, p: PartitionId, from: String, moved_at: u64, map: u64, done: oneshot::Sender<()>) {
    let started = Instant::now();
    // No follower apply or snapshot may write the partition meanwhile.
    let applying = node.partitions().replication.part(p).apply_lock.lock().await;
    let outcome = pull_all(&node, p, &from, moved_at, map).await;
    let result = match outcome {
        Ok(Pulled::Moved(messages)) => {
            node.metrics().handover_messages.inc_by(messages);
            node.partitions().handovers.incomplete.lock().expect("handovers").remove(&p);
            tracing::info!(messages, elapsed = ?started.elapsed(), "partition handed over");
            tokio::spawn(confirm(node.clone(), p, from, moved_at));
            "ok"
        }
        Ok(Pulled::KeptOwn) => {
            tracing::info!("partition came back before its new owner took it; kept this node's copy");
            "kept"
        }
        Ok(Pulled::Abandoned) => {
            node.partitions().handovers.incomplete.lock().expect("handovers").insert(p);
            tracing::info!("partition moved back to its source mid-handover; adoption abandoned");
            "abandoned"
        }
        Err(why) => {
            tracing::warn!(%why, "no handover; starting the partition from what this node has (new epochs)");
            if let Err(e) = start_fresh(&node, p, moved_at).await {
                tracing::error!(error = %e, "clearing a partition failed");
            }
            node.partitions().handovers.incomplete.lock().expect("handovers").remove(&p);
            node.partitions().handovers.release(p);
            "lost"
        }
    };
    node.metrics().handovers.with_label_values(&[result]).inc();
    node.metrics().handover_seconds.observe(started.elapsed().as_secs_f64());
    node.partitions().handovers.adopting.lock().expect("handovers").remove(&p);
    drop(applying);
    let _ = done.send(());
}

/// Tells the old owner its copy can go, until it answers (or leaves, or the deadline).
async fn confirm(node: Arc<Node>, p: PartitionId, from: String, moved_at: u64) {
    let Some(links) = node.links().cloned() else { return };
    let deadline = Instant::now() + HANDOVER_DEADLINE;
    while Instant::now() < deadline {
        let epoch = node.map().epoch;
        if let Ok(pending) = links.send(&from, epoch, &Op::Pulled { partition: p, moved_at }) {
            if pending.wait(PULL_TIMEOUT).await.is_ok() {
                return;
            }
        }
        if !node.members().contains_key(&from) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How a pull ended (other than with a failure).
enum Pulled {
    /// The partition's state is here: this many messages came.
    Moved(u64),
    /// This node was the source, never saw the pull confirmed, and the partition came
    /// back: its own copy is still the authoritative one and is kept.
    KeptOwn,
    /// The map moved the partition back to the source before the pull ended: nothing
    /// written here counts.
    Abandoned,
}

/// Without the old owner, this node's copy of `p` (if any) is stale: clear it, so every
/// channel restarts under a new epoch and recovering clients learn they missed messages.
async fn start_fresh(node: &Node, p: PartitionId, moved_at: u64) -> Result<(), switchyard_store::StoreError> {
    node.partitions().store.clear_partition(p).await?;
    let mut batch = node.partitions().store.batch();
    batch.put_adopted(p, moved_at);
    batch.write(true).await
}

/// Why a new owner gave up pulling a partition (it then starts it from what it has).
#[derive(Debug, thiserror::Error)]
enum PullError {
    /// Peer links are off (no `cluster.secret`).
    #[error("peer links are off (no cluster.secret)")]
    NoLinks,
    /// The old owner is not a member any more.
    #[error("old owner {0} is not a member any more")]
    Gone(String),
    /// The old owner left while it was adopting the partition itself.
    #[error("old owner {0} left while adopting the partition")]
    LeftAdopting(String),
    /// The old owner answered a pull with another answer.
    #[error("old owner answered a pull with another answer")]
    WrongAnswer,
    /// Pulls kept failing until the deadline, or the old owner left.
    #[error("pulling from {from} failed: {message}")]
    Failed {
        /// The old owner.
        from: String,
        /// The last failure.
        message: String,
    },
    /// Writing here failed.
    #[error(transparent)]
    Store(#[from] switchyard_store::StoreError),
}

/// Copies partition `p` from `from`; returns the number of messages moved.
/// `map` is the epoch of the map that gave `p` here (this runs before it is installed).
async fn pull_all(node: &Arc<Node>, p: PartitionId, from: &str, moved_at: u64, map: u64) -> Result<Pulled, PullError> {
    let links = node.links().ok_or(PullError::NoLinks)?;
    let mut deadline = Instant::now() + HANDOVER_DEADLINE;
    let alive = |n: &Node| n.members().contains_key(from);
    if !alive(node) {
        return Err(PullError::Gone(from.to_string()));
    }
    let mut cursor = None;
    let mut cleared = false;
    let mut moved = 0u64;
    loop {
        let now = node.map();
        if now.epoch > map && now.owner(p) == Some(from) {
            // Moved back to its source before the pull ended: leave the store alone (the
            // queued seal closes it again); the source still has everything.
            return Ok(Pulled::Abandoned);
        }
        let op = Op::Pull { partition: p, moved_at, cursor: cursor.clone() };
        let answer = match links.send(from, node.map().epoch, &op) {
            Ok(pending) => pending.wait(PULL_TIMEOUT).await,
            Err(e) => Err(e),
        };
        let chunk = match answer {
            Ok(Answer::Chunk(c)) => c,
            Ok(_) => return Err(PullError::WrongAnswer),
            Err(WireError { refusal: Some(Refusal::NotAdopted), .. }) if !cleared => {
                if node.partitions().handovers.release(p) {
                    // This node handed the partition out and it never arrived anywhere:
                    // its own copy is complete.
                    let mut batch = node.partitions().store.batch();
                    batch.put_adopted(p, moved_at);
                    batch.write(true).await?;
                    return Ok(Pulled::KeptOwn);
                }
                // The old owner is itself still adopting it (a chained move): wait for it,
                // without counting against the deadline while it is alive.
                if !alive(node) {
                    return Err(PullError::LeftAdopting(from.to_string()));
                }
                deadline = Instant::now() + HANDOVER_DEADLINE;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(e) => {
                if Instant::now() > deadline || !alive(node) {
                    return Err(PullError::Failed { from: from.to_string(), message: e.message });
                }
                tracing::debug!(partition = p, %from, error = %e.message, "pull failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if !cleared {
            // A stale copy from an earlier ownership goes before the first chunk lands.
            node.partitions().store.clear_partition(p).await?;
            cleared = true;
        }
        moved += chunk.messages.len() as u64;
        let next = chunk.next.clone();
        let mut batch = node.partitions().store.batch();
        chunks::stage(&mut batch, p, &chunk);
        if next.is_none() {
            batch.put_adopted(p, moved_at);
        }
        // Only the last batch needs the fsync: it covers every earlier one.
        batch.write(next.is_none()).await?;
        match next {
            Some(c) => cursor = Some(c),
            None => {
                node.partitions().handovers.release(p);
                return Ok(Pulled::Moved(moved));
            }
        }
    }
}

/// The old owner's side of a pull: seals `p` (once every write it accepted is durable)
/// and reads the next chunk from its store.
pub(crate) async fn serve_pull(
    node: &Arc<Node>,
    p: PartitionId,
    moved_at: u64,
    cursor: Option<(String, u64)>,
) -> Result<Answer, OpError> {
    if p >= node.partitions().count() {
        return Err(OpError::bad_request(format!("no partition {p}")));
    }
    if node.map().epoch < moved_at {
        node.wait_for_epoch(moved_at).await;
    }
    let map = node.map();
    if map.epoch < moved_at {
        return Err(OpError::new(ErrorCode::Unavailable, format!("map epoch {moved_at} not seen here yet")));
    }
    let h = &node.partitions().handovers;
    if h.is_adopting(p) || h.incomplete.lock().expect("handovers").contains(&p) {
        return Err(not_adopted());
    }
    if map.owner(p) == Some(node.id()) {
        return Err(OpError::new(ErrorCode::Unavailable, format!("partition {p} is owned here")));
    }
    if cursor.is_none() {
        node.partitions().handovers.sealed.lock().expect("handovers").insert(p, moved_at);
        let reason = format!("partition moved (map epoch {moved_at}); subscribe again");
        node.partitions().seal(p, reason).await?;
    }
    chunks::read_blocking(&node.partitions().store, p, cursor, None).await.map(Answer::Chunk)
}

/// The new owner has `p` durably: drop the copy here, unless the partition came back.
pub(crate) async fn serve_pulled(node: &Arc<Node>, p: PartitionId, moved_at: u64) -> Result<(), OpError> {
    let mine = node.map().owner(p) == Some(node.id());
    // Only the confirmation of the move that sealed the copy here may drop it (a late one
    // from an older move must not).
    let sealed = node.partitions().handovers.sealed.lock().expect("handovers").get(&p) == Some(&moved_at);
    if !sealed {
        return Ok(());
    }
    // A follower's copy belongs to replication now (it resyncs from the new leader).
    let _applying = node.partitions().replication.part(p).apply_lock.lock().await;
    let following = node.partitions().replication.is_following(p);
    if !mine && !following && !node.partitions().handovers.is_adopting(p) {
        node.partitions().store.clear_partition(p).await.map_err(|e| OpError::internal(e.to_string()))?;
    }
    node.partitions().handovers.release(p);
    tracing::info!(partition = p, moved_at, "partition taken by its new owner; local copy dropped");
    Ok(())
}
