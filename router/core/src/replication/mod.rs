//! Replication state of every partition on this node: the leader's log of committed store
//! batches and its high watermark, and the follower's position.
//!
//! It owns the rules of primary-backup replication (Kafka's ISR model): a leader numbers
//! each store batch of a partition with a sequence number and keeps the encoded batch in
//! memory until every follower has fetched it; a follower's fetch from sequence `s` says it
//! holds everything below `s` durably; the high watermark is the lowest such position over
//! the in-sync followers, and a batch is acknowledged (and fanned out) by its owner only
//! once the high watermark passes it. It decides when a follower leaves or rejoins the ISR
//! but never writes that itself: it asks, through [`IsrChange`], and only a map from etcd
//! that carries the change alters the set the high watermark counts. It must never do I/O
//! or wait: owners and fetch handlers call it under a per-partition lock held for
//! microseconds.
//!
//! Seqs are a partition's durable log positions, the same on every replica (Kafka's
//! offsets): each replica stores, with every batch it writes, its next seq and its
//! leader-epoch history ([`ReplLogMeta`]). A replica that follows a new leader first asks
//! it where its own last leader epoch ended ([`Replication::epoch_end`]) and truncates
//! what the leader never had ([`truncation_point`]): the KIP-101/KIP-279 rule.
//!
//! It is split by role: `log` holds what the replicated log carries ([`ReplOp`]) and the
//! leader-epoch rules, `state` the per-partition bookkeeping behind the lock, `leader` and
//! `follower` what each side does with it. This file holds the shared handle
//! ([`Replication`]), the types other layers exchange with it, and the role changes a new
//! map installs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

use bytes::Bytes;
use switchyard_proto::partition::PartitionId;
use switchyard_store::ReplLogMeta;
use tokio::sync::{mpsc, watch, Notify};

mod follower;
mod leader;
mod log;
mod state;
#[cfg(test)]
mod tests;

pub use log::{apply_ops, epoch_end_in, touched, truncation_point, with_epoch, ReplOp};
use state::{FollowerPos, Leading, LogState, Pos};

/// A request to etcd's configuration manager: make `isr` the in-sync set of `partition`,
/// if this node still leads it under `leader_epoch`.
#[derive(Debug, Clone, PartialEq)]
pub struct IsrChange {
    /// The partition.
    pub partition: PartitionId,
    /// The leader epoch the leader holds (the write is fenced by it).
    pub leader_epoch: u64,
    /// The new in-sync set, leader first.
    pub isr: Vec<String>,
    /// True when the set grows (metrics).
    pub expand: bool,
}

/// What this node is for a partition, by the installed map.
#[derive(Debug, Clone, PartialEq)]
pub enum Role {
    /// Neither leader nor follower, in a map without replication (single-copy mode): the
    /// partition's owner writes it unreplicated.
    None,
    /// The map replicates the partition and this node is no replica of it: it must not
    /// write it. (A deposed leader's owner may still hold queued writes until its seal;
    /// written unreplicated, acknowledged and then lost, they would break the promise.)
    Outside,
    /// The leader, with its followers (not itself) and the in-sync followers among them.
    Leader {
        /// This node's id.
        me: String,
        /// Leader epoch.
        leader_epoch: u64,
        /// Assigned followers.
        followers: Vec<String>,
        /// Followers in the ISR.
        isr: Vec<String>,
    },
    /// A follower of the leader under `leader_epoch`.
    Follower {
        /// Leader epoch.
        leader_epoch: u64,
    },
}

/// Why a fetch was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// This node does not lead the partition under the epoch the follower named.
    #[error("not the leader of partition {0} under leader epoch {1} (here: {2:?})")]
    NotLeader(PartitionId, u64, Option<u64>),
    /// The follower is not an assigned replica.
    #[error("{0} is not a follower of partition {1}")]
    NotReplica(String, PartitionId),
    /// The follower's position is not in the log: it must take a snapshot.
    #[error("position {0} is outside the log; resync")]
    Resync(u64),
    /// The follower asked for a snapshot while counted in the ISR: it must leave it first.
    #[error("in the ISR: leave it before a resync")]
    InIsr,
    /// The follower lost batches it had acknowledged (fetched from below its own earlier
    /// position): it leaves the ISR before it fetches them again.
    #[error("position {0} is below what this follower acknowledged ({1}); leave the ISR first")]
    Regressed(u64, u64),
    /// An in-sync follower holds batches this leader lost (its log ends at {1}, the
    /// follower asked from {0}): the follower keeps its copy and waits for a new leader.
    #[error("the leader's log ends at {1}, below the in-sync follower's position {0}: the leader lost batches")]
    LeaderBehind(u64, u64),
}

/// A fetch answer: encoded batches from `from` on, in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fetched {
    /// `(seq, encoded ops)` with consecutive seqs.
    pub batches: Vec<(u64, Bytes)>,
}

/// One partition's replication state.
pub struct PartitionLog {
    state: Mutex<LogState>,
    appended: Notify,
    hw: watch::Sender<u64>,
    /// Held by whoever writes the partition's store outside its owner (a follower's apply,
    /// a snapshot, a handover pull), so those never interleave.
    pub apply_lock: tokio::sync::Mutex<()>,
    /// True while a follower loop runs for the partition (at most one does).
    pub follower_running: std::sync::atomic::AtomicBool,
}

/// Replication state of every partition, and the queue of ISR changes for etcd.
pub struct Replication {
    parts: Vec<PartitionLog>,
    isr_tx: mpsc::UnboundedSender<IsrChange>,
    isr_rx: Mutex<Option<mpsc::UnboundedReceiver<IsrChange>>>,
    /// How long an in-sync follower may stay behind before it is dropped from the ISR.
    pub lag_timeout: Duration,
    max_log_bytes: usize,
    /// Copies each partition should have (`cluster.replicas`).
    wanted: std::sync::atomic::AtomicUsize,
}

impl Replication {
    /// State for `partitions` partitions.
    pub fn new(partitions: u32, lag_timeout: Duration, max_log_bytes: usize) -> Arc<Self> {
        let (isr_tx, isr_rx) = mpsc::unbounded_channel();
        let parts = (0..partitions)
            .map(|_| PartitionLog {
                state: Mutex::new(LogState::default()),
                appended: Notify::new(),
                hw: watch::channel(0).0,
                apply_lock: tokio::sync::Mutex::new(()),
                follower_running: std::sync::atomic::AtomicBool::new(false),
            })
            .collect();
        let wanted = std::sync::atomic::AtomicUsize::new(1);
        Arc::new(Self { parts, isr_tx, isr_rx: Mutex::new(Some(isr_rx)), lag_timeout, max_log_bytes, wanted })
    }

    /// Sets how many copies each partition should have (for the under-replicated count).
    pub fn set_wanted(&self, replicas: usize) {
        self.wanted.store(replicas.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    /// The ISR changes this node asks for (taken once, by the cluster layer).
    pub fn take_isr_changes(&self) -> Option<mpsc::UnboundedReceiver<IsrChange>> {
        self.isr_rx.lock().expect("isr queue").take()
    }

    /// One partition's state.
    pub fn part(&self, p: PartitionId) -> &PartitionLog {
        &self.parts[p as usize]
    }

    fn state(&self, p: PartitionId) -> std::sync::MutexGuard<'_, LogState> {
        self.parts[p as usize].state.lock().expect("replication state")
    }

    /// The high watermark of `p`: its owner releases every batch below it.
    pub fn hw_changes(&self, p: PartitionId) -> watch::Receiver<u64> {
        self.parts[p as usize].hw.subscribe()
    }

    fn publish_hw(&self, p: PartitionId, st: &LogState) {
        if let Some(l) = &st.leading {
            let hw = l.hw();
            self.parts[p as usize].hw.send_if_modified(|v| {
                let up = hw > *v;
                if up {
                    *v = hw;
                }
                up
            });
        }
    }

    /// True when `p`'s store batches must be replicated before they are acknowledged.
    pub fn is_leading(&self, p: PartitionId) -> bool {
        self.state(p).leading.as_ref().is_some_and(|l| !l.followers.is_empty())
    }

    /// True when this node leads `p` under a replicated map (with or without followers):
    /// its store batches are stamped with seqs.
    pub fn is_leader(&self, p: PartitionId) -> bool {
        self.state(p).leading.is_some()
    }

    /// Sets `p`'s log end from its durable position (startup).
    pub fn load(&self, p: PartitionId, meta: Option<&ReplLogMeta>) {
        self.state(p).seq_counter = meta.map_or(0, |m| m.leo);
    }

    /// True when this node follows `p`: its owner must not write.
    pub fn is_following(&self, p: PartitionId) -> bool {
        self.state(p).following.is_some()
    }

    /// True when `p` must not be written here: this node follows it, or the map
    /// replicates it on other nodes only ([`Role::Outside`]).
    pub fn written_elsewhere(&self, p: PartitionId) -> bool {
        let st = self.state(p);
        st.following.is_some() || st.outside || st.leading.as_ref().is_some_and(|l| l.lost_tail || l.unconfirmed)
    }

    /// Start-up repair dropped journal batches, so the stored log of any partition may be
    /// shorter than what this replica acknowledged: each partition it leads writes nothing
    /// until an in-sync follower's fetch shows its log is not behind (see
    /// [`FetchError::LeaderBehind`]).
    pub fn suspect_logs(&self) {
        for p in 0..self.parts.len() {
            self.state(p as PartitionId).suspect = true;
        }
    }

    /// True when this node leads `p` but an in-sync follower showed that this replica lost
    /// batches it had written (see [`FetchError::LeaderBehind`]): it must not lead `p`
    /// (writes are refused here) until a new map gives the partition to that follower.
    pub fn lost_tail(&self, p: PartitionId) -> bool {
        self.state(p).leading.as_ref().is_some_and(|l| l.lost_tail)
    }

    /// True when this node leads any partition whose log it lost part of ([`Self::lost_tail`]):
    /// the node reports it (`reach/<id>`), and the cluster leader moves its leadership to
    /// the in-sync followers that hold the whole log.
    pub fn any_lost_tail(&self) -> bool {
        (0..self.parts.len()).any(|p| self.lost_tail(p as PartitionId))
    }

    /// The leader epoch this node leads `p` under.
    pub fn leader_epoch(&self, p: PartitionId) -> Option<u64> {
        self.state(p).leading.as_ref().map(|l| l.leader_epoch)
    }

    /// Sets this node's role for `p` from a newly installed map.
    pub fn set_role(&self, p: PartitionId, role: Role) {
        let mut st = self.state(p);
        let before = st.leading.as_ref().map(|l| l.leader_epoch);
        st.outside = role == Role::Outside;
        match role {
            Role::None | Role::Outside => {
                st.leading = None;
                st.following = None;
                st.tail.clear();
                st.tail_bytes = 0;
            }
            Role::Follower { leader_epoch } => {
                if st.leading.take().is_some() {
                    st.tail.clear();
                    st.tail_bytes = 0;
                }
                if st.following.is_none_or(|(e, _)| e != leader_epoch) {
                    // A new leader: reconcile with it (truncate what it never had) first.
                    st.following = Some((leader_epoch, Pos::Reconcile));
                }
            }
            Role::Leader { me, leader_epoch, followers, isr } => {
                let promoted = st.following.take().is_some();
                let start = st.seq_counter;
                let same = st.leading.as_ref().is_some_and(|l| l.leader_epoch == leader_epoch);
                if !same {
                    // A promoted follower serves the batches it applied last, so in-sync
                    // followers a little behind it need no snapshot.
                    let mut records = std::mem::take(&mut st.tail);
                    let mut bytes = std::mem::replace(&mut st.tail_bytes, 0);
                    if !promoted {
                        records.clear();
                        bytes = 0;
                    }
                    let base_seq = records.front().map_or(start, |r| r.0);
                    st.leading = Some(Leading {
                        me,
                        leader_epoch,
                        start,
                        epochs: None,
                        isr: Vec::new(),
                        followers: HashMap::new(),
                        base_seq,
                        next_seq: start,
                        records,
                        bytes,
                        asked: None,
                        widened: Vec::new(),
                        last_asked: Vec::new(),
                        lost_tail: false,
                        unconfirmed: st.suspect,
                    });
                }
                let l = st.leading.as_mut().expect("set above");
                let base = l.base_seq;
                l.followers.retain(|f, _| followers.contains(f));
                for f in &followers {
                    l.followers.entry(f.clone()).or_insert(FollowerPos {
                        acked: base,
                        leo_at_fetch: base,
                        caught_up_at: Instant::now(),
                        fetched_at: Instant::now(),
                        // One the map counts in sync keeps its place until it lags.
                        resyncing: !isr.contains(f),
                    });
                }
                l.isr = isr.into_iter().filter(|f| l.followers.contains_key(f)).collect();
                if l.isr.is_empty() {
                    // No in-sync follower to be behind: this log is the only copy.
                    l.unconfirmed = false;
                }
                let (isr_now, followers_now) = (&l.isr, &l.followers);
                l.widened.retain(|f| !isr_now.contains(f) && followers_now.contains_key(f));
                l.asked = None;
                if l.followers.is_empty() {
                    l.records.clear();
                    l.bytes = 0;
                    l.base_seq = l.next_seq;
                }
            }
        }
        let after = st.leading.as_ref().map(|l| l.leader_epoch);
        match &st.leading {
            // A new leadership starts its watermark afresh: seqs may have gone back (a
            // truncation), and a stale watermark must never release its batches.
            Some(l) if before != after => {
                self.parts[p as usize].hw.send_replace(l.hw());
            }
            _ => self.publish_hw(p, &st),
        }
        if before.is_some() && before != after {
            // The owner's parked batches belong to a leadership that ended: wake it.
            self.parts[p as usize].hw.send_modify(|_| ());
        }
    }
}
