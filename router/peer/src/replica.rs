//! Replication over the peer links: followers fetch their leaders' batches, leaders serve
//! fetches and snapshots, and every node applies its roles when a map is installed.
//!
//! It owns the follower loop of each partition this node follows (fetch, apply to the
//! store under the fsync policy with this replica's log position and leader-epoch history,
//! fetch again from the next seq, which tells the leader what is durable here), the
//! reconciliation with a new leader (ask where the replica's last leader epoch ended,
//! truncate the tail the leader never had by re-copying just the channels that tail
//! touched: KIP-101), the snapshot that starts a follower with no usable position (its
//! stale copy is cleared first), the leader's side of all three,
//! the periodic ISR check and the role changes on a map install (promotion reloads the
//! owner from what was replicated, without a handover and without new channel epochs). It
//! must never run on the message path: an owner only appends to the in-memory log.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use switchyard_core::replication::{apply_ops, touched, truncation_point, with_epoch, FetchError, ReplOp, Role};
use switchyard_proto::partition::{PartitionId, PartitionMap};
use switchyard_proto::protocol::{ErrorCode, OpError};
use switchyard_proto::refusal::Refusal;
use switchyard_store::ReplLogMeta;
use tokio::sync::oneshot;

use crate::node::Node;
use crate::wire::{Answer, Op};

/// How long a leader holds a fetch that found nothing new.
const LONG_POLL: Duration = Duration::from_millis(500);
/// Deadline of one fetch or snapshot request.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Most batch bytes one fetch answer carries.
const FETCH_BYTES: usize = 4 << 20;
/// How often a leader checks its followers against the lag timeout.
const ISR_CHECK: Duration = Duration::from_millis(200);

/// The role the map `m` gives this node for `p`.
fn role(node: &Node, m: &PartitionMap, p: PartitionId) -> Role {
    let me = node.id();
    if m.replicas.is_empty() {
        return Role::None;
    }
    if m.owner(p) == Some(me) {
        let isr = m.isr(p).iter().filter(|n| *n != me).cloned().collect();
        return Role::Leader { me: me.to_string(), leader_epoch: m.leader_epoch(p), followers: m.followers(p), isr };
    }
    if m.followers(p).iter().any(|f| f == me) {
        return Role::Follower { leader_epoch: m.leader_epoch(p) };
    }
    Role::Outside
}

/// Before `new` is installed: partitions that become led here take their new role now (a
/// follower loop stops applying), and a promoted follower's owner reloads the store once
/// the last apply is done. Handovers (a move from a live leader) are started by the
/// handover module.
pub(crate) fn before_install(node: &Arc<Node>, new: &PartitionMap) {
    let me = node.id();
    let old = node.map();
    for p in 0..new.partitions() {
        if new.owner(p) != Some(me) || old.owner(p) == Some(me) {
            continue;
        }
        if new.moved_from(p).is_some_and(|m| m.from != me) {
            // A handover: the role is set after the install, once the adoption is marked
            // (no follower may snapshot the partition before it has arrived here).
            continue;
        }
        let was_following = node.partitions().replication.is_following(p);
        node.partitions().replication.set_role(p, role(node, new, p));
        if was_following {
            // Promoted: serve exactly what was replicated (same channel epochs).
            let (done, rx) = oneshot::channel();
            node.partitions().adopt(p, rx);
            let node = node.clone();
            tokio::spawn(async move {
                let _applied = node.partitions().replication.part(p).apply_lock.lock().await;
                tracing::info!(partition = p, "promoted to leader; serving the replicated copy");
                let _ = done.send(());
            });
        }
    }
}

/// After a map install: every partition's role, and a follower loop for each partition
/// followed here.
pub(crate) fn after_install(node: &Arc<Node>) {
    let map = node.map();
    let repl = &node.partitions().replication;
    let mut started = Vec::new();
    for p in 0..map.partitions() {
        let role = role(node, &map, p);
        let follow = matches!(role, Role::Follower { .. });
        repl.set_role(p, role);
        if follow && !repl.part(p).follower_running.swap(true, Ordering::AcqRel) {
            tokio::spawn(follow_loop(node.clone(), p));
        }
        if repl.leadership_unrecorded(p) {
            started.push(p);
        }
    }
    if !started.is_empty() {
        tokio::spawn(record_leadership_starts(node.clone(), started));
    }
    node.metrics().under_replicated_partitions.set(repl.under_replicated() as i64);
}

/// Stores, in one write, the leader-epoch history of each partition in `parts` whose
/// leadership here started and wrote nothing yet (see `Replication::leadership_start`).
/// A partition whose apply lock is busy (a follower step still ending, the owner writing)
/// is skipped: its first batch records the history, or the next map install retries.
async fn record_leadership_starts(node: Arc<Node>, parts: Vec<PartitionId>) {
    let (repl, store) = (&node.partitions().replication, &node.partitions().store);
    let mut held = Vec::new();
    let mut batch = store.batch();
    for p in parts {
        let Ok(applying) = repl.part(p).apply_lock.try_lock() else { continue };
        if let Some(meta) = repl.leadership_start(p, || store.repl_meta(p).ok().flatten()) {
            batch.put_repl_meta(p, &meta);
            held.push(applying);
        }
    }
    if !batch.is_empty() {
        if let Err(e) = batch.write(true).await {
            tracing::warn!(error = %e, "recording leadership starts failed");
        }
    }
}

/// Runs the leader's ISR checks (and the replication gauges) until shutdown.
pub(crate) async fn isr_checks(node: std::sync::Weak<Node>) {
    loop {
        tokio::time::sleep(ISR_CHECK).await;
        let Some(node) = node.upgrade() else { return };
        if node.shutting_down() {
            return;
        }
        let repl = &node.partitions().replication;
        let now = Instant::now();
        let mut lag = 0;
        for p in 0..node.partitions().count() {
            if let Some(change) = repl.isr_check(p, now) {
                repl.ask(change);
            }
            lag = lag.max(repl.lag(p).unwrap_or(0));
        }
        node.metrics().replica_lag_batches.set(lag as i64);
        node.metrics().under_replicated_partitions.set(repl.under_replicated() as i64);
    }
}

/// A refused fetch as the follower acts on it.
fn fetch_error(e: FetchError) -> OpError {
    match e {
        FetchError::NotReplica(..) => OpError::new(ErrorCode::Forbidden, e.to_string()),
        FetchError::Resync(from) => OpError::refused(Refusal::Resync { from }, e.to_string()),
        FetchError::NotLeader(..) => OpError::refused(Refusal::NotLeader, e.to_string()),
        FetchError::InIsr | FetchError::Regressed(..) | FetchError::LeaderBehind(..) => {
            OpError::refused(Refusal::Unavailable, e.to_string())
        }
    }
}

/// The leader's side of [`Op::Fetch`], [`Op::Snapshot`] and [`Op::EpochEnd`].
pub(crate) async fn serve(node: &Arc<Node>, op: Op) -> Result<Answer, OpError> {
    let repl = &node.partitions().replication;
    match op {
        Op::Fetch { partition: p, leader_epoch, follower, from } => {
            if p >= node.partitions().count() {
                return Err(OpError::bad_request(format!("no partition {p}")));
            }
            if node.partitions().handovers.is_adopting(p) {
                return Err(OpError::refused(Refusal::NotAdopted, "partition still being adopted here"));
            }
            let mut first = true;
            loop {
                match repl.fetch(p, &follower, leader_epoch, from, FETCH_BYTES).map_err(fetch_error)? {
                    Err(start) => {
                        let store = &node.partitions().store;
                        let history = repl.leader_history(p, || store.repl_meta(p).ok().flatten()).unwrap_or_default();
                        return Ok(Answer::SnapshotAt(start, history));
                    }
                    Ok(f) if !f.batches.is_empty() || !first => return Ok(Answer::Batches(f.batches)),
                    Ok(_) => {
                        first = false;
                        repl.wait_for_append(p, from.unwrap_or(0), LONG_POLL).await;
                    }
                }
            }
        }
        Op::EpochEnd { partition: p, leader_epoch, last_epoch } => {
            if p >= node.partitions().count() {
                return Err(OpError::bad_request(format!("no partition {p}")));
            }
            if node.partitions().handovers.is_adopting(p) {
                return Err(OpError::refused(Refusal::NotAdopted, "partition still being adopted here"));
            }
            let store = &node.partitions().store;
            repl.epoch_end(p, leader_epoch, last_epoch, || store.repl_meta(p).ok().flatten())
                .map(Answer::EpochEnd)
                .map_err(fetch_error)
        }
        Op::Snapshot { partition: p, leader_epoch, cursor, channels } => {
            if p >= node.partitions().count() {
                return Err(OpError::bad_request(format!("no partition {p}")));
            }
            if repl.leader_epoch(p) != Some(leader_epoch) || node.partitions().handovers.is_adopting(p) {
                return Err(OpError::refused(Refusal::NotLeader, "not the leader under that leader epoch"));
            }
            crate::chunks::read_blocking(&node.partitions().store, p, cursor, channels).await.map(Answer::Chunk)
        }
        _ => Err(OpError::internal("not a replication op")),
    }
}

/// Why a follower loop step stopped.
enum Step {
    /// Go on at once.
    Again,
    /// Wait a little, then go on.
    Later,
    /// This node no longer follows the partition.
    Done,
}

/// Follows `p` while the map says so: snapshot first, then fetch and apply.
#[tracing::instrument(name = "follow", skip(node))]
async fn follow_loop(node: Arc<Node>, p: PartitionId) {
    let running = &node.partitions().replication.part(p).follower_running;
    loop {
        if node.shutting_down() {
            running.store(false, Ordering::Release);
            return;
        }
        let step = follow_step(&node, p).await;
        match step {
            Step::Again => {}
            Step::Later => tokio::time::sleep(Duration::from_millis(100)).await,
            Step::Done => {
                // A map that made this node a follower again meanwhile found this loop
                // still running and started none: keep going.
                running.store(false, Ordering::Release);
                if node.partitions().replication.is_following(p) && !running.swap(true, Ordering::AcqRel) {
                    continue;
                }
                break;
            }
        }
    }
    // No longer a replica, nor the leader: the copy here is dropped (unless a handover
    // took it over in between).
    let repl = &node.partitions().replication;
    let _applying = repl.part(p).apply_lock.lock().await;
    let map = node.map();
    let me = node.id();
    if !repl.is_following(p) && map.owner(p) != Some(me) && !map.followers(p).iter().any(|f| f == me) {
        let sealed_here = node.partitions().handovers.sealed.lock().expect("handovers").contains_key(&p);
        if !sealed_here {
            if let Err(e) = node.partitions().store.clear_partition(p).await {
                tracing::warn!(partition = p, error = %e, "dropping a replica copy failed");
            }
        }
    }
}

async fn follow_step(node: &Arc<Node>, p: PartitionId) -> Step {
    let map = node.map();
    let repl = &node.partitions().replication;
    let Some(leader_epoch) = (match role(node, &map, p) {
        Role::Follower { leader_epoch } if repl.is_following(p) => Some(leader_epoch),
        _ => None,
    }) else {
        return Step::Done;
    };
    let Some(leader) = map.owner(p).map(str::to_string) else { return Step::Later };
    let Some(links) = node.links().cloned() else { return Step::Done };
    if repl.must_reconcile(p, leader_epoch) {
        return match reconcile(node, p, &leader, leader_epoch).await {
            Ok(()) => Step::Again,
            Err(e) => {
                tracing::warn!(partition = p, %leader, error = %e, "reconciling with the leader failed; retrying");
                Step::Later
            }
        };
    }
    let from = repl.position(p, leader_epoch);
    let op = Op::Fetch { partition: p, leader_epoch, follower: node.id().to_string(), from };
    let answer = match links.send(&leader, map.epoch, &op) {
        Ok(pending) => pending.wait(FETCH_TIMEOUT + LONG_POLL).await,
        Err(e) => Err(e),
    };
    match answer {
        Ok(Answer::Batches(batches)) => {
            let Some(from) = from else { return Step::Later };
            if batches.is_empty() {
                return Step::Again;
            }
            match apply(node, p, leader_epoch, from, &batches).await {
                Ok(()) => Step::Again,
                Err(e) => {
                    tracing::warn!(partition = p, error = %e, "applying replicated batches failed");
                    Step::Later
                }
            }
        }
        Ok(Answer::SnapshotAt(start, history)) => {
            match snapshot(node, p, &leader, leader_epoch, start, history).await {
                Ok(()) => Step::Again,
                Err(e) => {
                    tracing::warn!(partition = p, %leader, error = %e, "replica snapshot failed; retrying");
                    Step::Later
                }
            }
        }
        Ok(_) => Step::Later,
        Err(e) => {
            if matches!(e.refusal, Some(Refusal::Resync { .. })) {
                tracing::info!(partition = p, error = %e.message, "position outside the leader's log; taking a snapshot");
                repl.forget_position(p);
            } else {
                tracing::debug!(partition = p, %leader, error = %e.message, "fetch failed");
            }
            Step::Later
        }
    }
}

/// Why a follower step failed (it is retried shortly).
#[derive(Debug, thiserror::Error)]
enum FollowError {
    /// Peer links are off.
    #[error("no peer links")]
    NoLinks,
    /// The leader sent a batch out of order.
    #[error("batch {seq} where {due} was due")]
    OutOfOrder {
        /// The batch's seq.
        seq: u64,
        /// The seq expected.
        due: u64,
    },
    /// A batch's ops do not decode.
    #[error("undecodable batch: {0}")]
    Batch(#[from] postcard::Error),
    /// The leader refused or the link failed.
    #[error("{0}")]
    Peer(String),
    /// The leader answered with another answer.
    #[error("unexpected answer to {0}")]
    WrongAnswer(&'static str),
    /// This node's copy is the source of a handover still under way.
    #[error("this node's copy is still being handed over to the new leader")]
    HandingOver,
    /// The map changed this node's role during a copy.
    #[error("role changed during the copy")]
    RoleChanged,
    /// Writing here failed.
    #[error(transparent)]
    Store(#[from] switchyard_store::StoreError),
}

impl From<crate::wire::WireError> for FollowError {
    fn from(e: crate::wire::WireError) -> Self {
        Self::Peer(e.message)
    }
}

/// Applies consecutive batches from seq `from`, durably, then records the new position.
async fn apply(
    node: &Node,
    p: PartitionId,
    leader_epoch: u64,
    from: u64,
    batches: &[(u64, bytes::Bytes)],
) -> Result<(), FollowError> {
    let repl = &node.partitions().replication;
    let _applying = repl.part(p).apply_lock.lock().await;
    if repl.position(p, leader_epoch) != Some(from) {
        return Ok(());
    }
    let store = &node.partitions().store;
    let own = store.repl_meta(p)?.unwrap_or_default();
    // Every batch fetched from this leader was written under its leader epoch.
    let mut meta = ReplLogMeta { leo: from, epochs: with_epoch(own.epochs, leader_epoch, from) };
    let mut batch = store.batch();
    let mut next = from;
    for (seq, data) in batches {
        if *seq != next {
            return Err(FollowError::OutOfOrder { seq: *seq, due: next });
        }
        let ops: Vec<ReplOp> = postcard::from_bytes(data)?;
        apply_ops(&mut batch, p, &ops);
        next = seq + 1;
        meta.leo = next;
        batch.put_repl_batch(p, *seq, &touched(&ops), &meta);
    }
    batch.write(true).await?;
    repl.set_position(p, leader_epoch, next, batches);
    Ok(())
}

/// Replaces this node's copy of `p` with a snapshot of the leader's, taken after every
/// batch below `start`; batches from `start` on are fetched (and re-applied) after it. The
/// copy holds the leader's log below `start`, so it inherits the leader's leader-epoch
/// `history` up to there.
async fn snapshot(
    node: &Node,
    p: PartitionId,
    leader: &str,
    leader_epoch: u64,
    start: u64,
    history: Vec<(u64, u64)>,
) -> Result<(), FollowError> {
    let repl = &node.partitions().replication;
    let _applying = repl.part(p).apply_lock.lock().await;
    if !repl.is_following(p) || repl.position(p, leader_epoch).is_some() {
        return Ok(());
    }
    // The copy here is the source of a handover still under way (this node led the
    // partition until the last move): it must stay until the new leader has it.
    if node.partitions().handovers.sealed.lock().expect("handovers").contains_key(&p) {
        return Err(FollowError::HandingOver);
    }
    let started = Instant::now();
    node.partitions().store.clear_partition(p).await?;
    // From here on the batches from `start` are this leader's.
    let inherited = history.into_iter().filter(|(_, s)| *s <= start).collect();
    let meta = ReplLogMeta { leo: start, epochs: with_epoch(inherited, leader_epoch, start) };
    let messages = copy_channels(node, p, leader, leader_epoch, None, &meta).await?;
    repl.set_position(p, leader_epoch, start, &[]);
    node.metrics().replica_snapshots.inc();
    tracing::info!(partition = p, %leader, messages, elapsed = ?started.elapsed(), "replica snapshot taken");
    Ok(())
}

/// Copies the leader's state of `p` (of only the `only` channels, sorted, which are
/// cleared here first) into this node's store, chunk by chunk; the last chunk's write also
/// stores `meta` and is fsync'd. Returns the messages copied. The caller holds the apply
/// lock.
async fn copy_channels(
    node: &Node,
    p: PartitionId,
    leader: &str,
    leader_epoch: u64,
    only: Option<Vec<String>>,
    meta: &ReplLogMeta,
) -> Result<usize, FollowError> {
    let links = node.links().cloned().ok_or(FollowError::NoLinks)?;
    let repl = &node.partitions().replication;
    let store = &node.partitions().store;
    let (mut cursor, mut messages, mut first) = (None, 0usize, true);
    loop {
        if !repl.is_following(p) || repl.position(p, leader_epoch).is_some() {
            return Err(FollowError::RoleChanged);
        }
        let op = Op::Snapshot { partition: p, leader_epoch, cursor: cursor.clone(), channels: only.clone() };
        let chunk = match links.send(leader, node.map().epoch, &op)?.wait(FETCH_TIMEOUT).await {
            Ok(Answer::Chunk(c)) => c,
            Ok(_) => return Err(FollowError::WrongAnswer("a snapshot")),
            Err(e) => return Err(e.into()),
        };
        let mut batch = store.batch();
        if first {
            // The tail being truncated goes in the same write as the leader's copy.
            for name in only.iter().flatten() {
                batch.clear_channel(p, name)?;
            }
            first = false;
        }
        crate::chunks::stage(&mut batch, p, &chunk);
        messages += chunk.messages.len();
        let last = chunk.next.is_none();
        if last {
            batch.put_repl_meta(p, meta);
        }
        batch.write(last).await?;
        match chunk.next {
            Some(c) => cursor = Some(c),
            None => return Ok(messages),
        }
    }
}

/// Reconciles this replica's log of `p` with the new leader's (KIP-101, KIP-279): asks
/// where its last leader epoch ended in the leader's log, and truncates everything from
/// there, re-copying from the leader just the channels that the truncated batches touched
/// (a store cannot undo a batch, so each such channel is replaced by the leader's copy,
/// and the leader's batches from the truncation point are then re-applied over it, which
/// leaves the channel exactly as the leader has it). A replica with no usable position,
/// or a tail older than the touched-channel window, takes a full snapshot instead.
async fn reconcile(node: &Node, p: PartitionId, leader: &str, leader_epoch: u64) -> Result<(), FollowError> {
    let links = node.links().cloned().ok_or(FollowError::NoLinks)?;
    let repl = &node.partitions().replication;
    let store = &node.partitions().store;
    let _applying = repl.part(p).apply_lock.lock().await;
    if !repl.must_reconcile(p, leader_epoch) {
        return Ok(());
    }
    // The copy here is the source of a handover still under way: it stays as it is.
    if node.partitions().handovers.sealed.lock().expect("handovers").contains_key(&p) {
        return Err(FollowError::HandingOver);
    }
    let own = store.repl_meta(p)?;
    let Some(own) = own.filter(|m| !m.epochs.is_empty()) else {
        repl.forget_position(p);
        return Ok(());
    };
    let last_epoch = own.epochs.last().map_or(0, |e| e.0);
    let op = Op::EpochEnd { partition: p, leader_epoch, last_epoch };
    let answer = match links.send(leader, node.map().epoch, &op)?.wait(FETCH_TIMEOUT).await {
        Ok(Answer::EpochEnd(a)) => a,
        Ok(_) => return Err(FollowError::WrongAnswer("an epoch-end request")),
        Err(e) => return Err(e.into()),
    };
    let Some(to) = truncation_point(&own, answer) else {
        tracing::info!(partition = p, last_epoch, ?answer, "no common leader epoch with the leader; taking a snapshot");
        repl.forget_position(p);
        return Ok(());
    };
    if to < own.leo {
        let Some(touched) = store.repl_touched(p, to, own.leo)? else {
            tracing::info!(
                partition = p,
                to,
                leo = own.leo,
                "truncated tail is older than its records; taking a snapshot"
            );
            repl.forget_position(p);
            return Ok(());
        };
        let started = Instant::now();
        let kept = own.epochs.iter().copied().filter(|(_, start)| *start < to).collect();
        let meta = ReplLogMeta { leo: to, epochs: with_epoch(kept, leader_epoch, to) };
        let channels = touched.len();
        let messages = copy_channels(node, p, leader, leader_epoch, Some(touched.into_iter().collect()), &meta).await?;
        node.metrics().replica_truncations.inc();
        tracing::info!(
            partition = p,
            %leader,
            from = to,
            batches = own.leo - to,
            channels,
            messages,
            elapsed = ?started.elapsed(),
            "truncated the tail the leader never had"
        );
    }
    if to == own.leo && own.epochs.last().is_none_or(|(e, _)| *e != leader_epoch) {
        // What this replica applies from `to` on is this leader's: say so now, so that it
        // reconciles by this epoch even if nothing is written under it.
        let mut batch = store.batch();
        batch.put_repl_meta(p, &ReplLogMeta { leo: to, epochs: with_epoch(own.epochs, leader_epoch, to) });
        batch.write(true).await?;
    }
    repl.set_position(p, leader_epoch, to, &[]);
    Ok(())
}
