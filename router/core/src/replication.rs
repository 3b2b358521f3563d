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

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use switchyard_proto::partition::PartitionId;
use switchyard_store::{ChannelMeta, ReplLogMeta, StoredMessage};
use tokio::sync::{mpsc, watch, Notify};

/// How long a leader waits for a map with the ISR change it asked for before asking again.
const ASK_AGAIN: Duration = Duration::from_secs(1);

/// One write of a replicated store batch, applied by followers exactly as the leader did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ReplOp {
    /// A message stored at an offset.
    Message(String, u64, StoredMessage),
    /// A message removed (retention, compaction).
    Remove(String, u64),
    /// A channel's metadata (epoch, top, first, counters).
    Meta(String, ChannelMeta),
    /// A consumer's committed offset.
    Consumer(String, String, u64),
}

/// How long a leader keeps batches for a follower that stopped fetching (a dead node kept
/// in the replica list): it catches up from them if it returns within this time; after
/// it, its batches go and it will take a snapshot. Bounds the memory a dead node pins.
const SILENT_PIN: Duration = Duration::from_secs(60);

/// Most leader-epoch history entries a replica keeps (older epochs: a snapshot instead).
const MAX_EPOCHS: usize = 64;

impl ReplOp {
    fn channel(&self) -> &str {
        match self {
            ReplOp::Message(ch, ..) | ReplOp::Remove(ch, _) | ReplOp::Meta(ch, _) | ReplOp::Consumer(ch, ..) => ch,
        }
    }
}

/// The channels `ops` touch, each once.
pub fn touched(ops: &[ReplOp]) -> Vec<&str> {
    let mut out: Vec<&str> = ops.iter().map(ReplOp::channel).collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// `history` with `(epoch, start)` appended unless its last entry is already `epoch`
/// (bounded to the newest [`MAX_EPOCHS`]).
pub fn with_epoch(mut history: Vec<(u64, u64)>, epoch: u64, start: u64) -> Vec<(u64, u64)> {
    if history.last().is_none_or(|(e, _)| *e != epoch) {
        history.push((epoch, start));
    }
    if history.len() > MAX_EPOCHS {
        history.drain(..history.len() - MAX_EPOCHS);
    }
    history
}

/// Where leader epoch `last` ended in `history` of a log whose next seq is `leo`: the
/// largest epoch at or below `last` the history knows, and the first seq after it (KIP-279's
/// answer to OffsetsForLeaderEpoch). None when the history has no such epoch.
pub fn epoch_end_in(history: &[(u64, u64)], leo: u64, last: u64) -> Option<(u64, u64)> {
    let i = history.iter().rposition(|(e, _)| *e <= last)?;
    let end = history.get(i + 1).map_or(leo, |(_, start)| *start);
    Some((history[i].0, end))
}

/// Where a replica with `own` position must truncate its log before it follows a leader
/// that answered `answer` ([`epoch_end_in`] for the replica's last epoch): everything from
/// the returned seq on may differ from the leader's log. None means a snapshot: the
/// replica holds no position, the leader does not know its epochs, or the replica's own
/// history lacks the epoch the leader matched (its prefix cannot be vouched for).
pub fn truncation_point(own: &ReplLogMeta, answer: Option<(u64, u64)>) -> Option<u64> {
    let (epoch, end) = answer?;
    let i = own.epochs.iter().position(|(e, _)| *e == epoch)?;
    let own_end = own.epochs.get(i + 1).map_or(own.leo, |(_, start)| *start);
    Some(end.min(own_end).min(own.leo))
}

/// Applies `ops` to a store batch of partition `p`.
pub fn apply_ops(batch: &mut switchyard_store::Batch<'_>, p: PartitionId, ops: &[ReplOp]) {
    for op in ops {
        match op {
            ReplOp::Message(ch, offset, msg) => {
                batch.put_message(p, ch, *offset, msg);
            }
            ReplOp::Remove(ch, offset) => batch.remove_message(p, ch, *offset),
            ReplOp::Meta(ch, meta) => batch.put_meta(p, ch, meta),
            ReplOp::Consumer(ch, consumer, offset) => batch.put_consumer(p, ch, consumer, *offset),
        }
    }
}

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
}

/// A follower's position under the leader it follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pos {
    /// Not yet reconciled with this leader: ask where its last epoch ended, truncate.
    Reconcile,
    /// Nothing it holds can be vouched for: take a snapshot.
    Snapshot,
    /// Every batch below this seq is applied here.
    At(u64),
}

/// A fetch answer: encoded batches from `from` on, in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fetched {
    /// `(seq, encoded ops)` with consecutive seqs.
    pub batches: Vec<(u64, Bytes)>,
}

struct FollowerPos {
    /// Every batch below this seq is durable on the follower.
    acked: u64,
    /// The leader's next seq when the follower last fetched.
    leo_at_fetch: u64,
    /// Last time the follower had fetched everything the leader had at its previous fetch.
    caught_up_at: Instant,
    /// Last time the follower fetched at all: one that stopped fetching is not in sync,
    /// even when no write since has left it behind.
    fetched_at: Instant,
    /// A snapshot is under way (or needed): never expand it before it fetches normally.
    resyncing: bool,
}

struct Leading {
    me: String,
    leader_epoch: u64,
    /// The seq this leadership started at.
    start: u64,
    /// This replica's leader-epoch history, this leadership included (loaded from the store
    /// when the first batch is stamped).
    epochs: Option<Vec<(u64, u64)>>,
    isr: Vec<String>,
    followers: HashMap<String, FollowerPos>,
    base_seq: u64,
    next_seq: u64,
    records: VecDeque<(u64, Bytes)>,
    bytes: usize,
    /// When an ISR change was last asked for (since the last map install): asked again
    /// after [`ASK_AGAIN`] if no map brought it (the write failed or was refused).
    asked: Option<Instant>,
}

impl Leading {
    fn hw(&self) -> u64 {
        self.isr.iter().map(|f| self.followers.get(f).map_or(self.base_seq, |p| p.acked)).fold(self.next_seq, u64::min)
    }

    /// Drops batches every follower has, and the oldest ones beyond the byte cap (followers
    /// that still need those will resync), and those only followers silent for longer than
    /// [`SILENT_PIN`] still need.
    fn trim(&mut self, max_bytes: usize, now: Instant) {
        // Everything a follower may still fetch: from its position, or from where its
        // snapshot started.
        let low = self
            .followers
            .values()
            .filter(|f| now.saturating_duration_since(f.fetched_at) <= SILENT_PIN)
            .map(|f| f.acked)
            .fold(self.next_seq, u64::min);
        while let Some((seq, b)) = self.records.front() {
            if *seq >= low && self.bytes <= max_bytes {
                break;
            }
            self.bytes -= b.len();
            self.base_seq = seq + 1;
            self.records.pop_front();
        }
        if self.records.is_empty() {
            self.base_seq = self.next_seq;
        }
    }
}

#[derive(Default)]
struct LogState {
    leading: Option<Leading>,
    /// As a follower: the leader epoch followed and the position under it.
    following: Option<(u64, Pos)>,
    /// [`Role::Outside`]: replicated elsewhere; nothing may be written here.
    outside: bool,
    /// The next seq: this replica holds every batch below it (its log end). Loaded from the
    /// store at startup, advanced by the leader's appends and the follower's applies.
    seq_counter: u64,
    /// As a follower: the batches it applied most recently (consecutive, ending at
    /// `seq_counter`), so that, promoted, it can serve in-sync followers a little behind it.
    tail: VecDeque<(u64, Bytes)>,
    tail_bytes: usize,
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

    /// The seq the next batch of `p` gets, its leader epoch, and the position to store with
    /// it; None when this node does not lead `p`. `load` reads the stored position (once
    /// per leadership). The caller writes the batch and then [`Self::append`]s it, with
    /// `p`'s apply lock held throughout.
    pub fn stamp(&self, p: PartitionId, load: impl FnOnce() -> Option<ReplLogMeta>) -> Option<(u64, u64, ReplLogMeta)> {
        let mut st = self.state(p);
        let seq = st.seq_counter;
        let l = st.leading.as_mut()?;
        if l.epochs.is_none() {
            let stored = load().map(|m| m.epochs).unwrap_or_default();
            l.epochs = Some(with_epoch(stored, l.leader_epoch, l.start));
        }
        let epochs = l.epochs.clone().unwrap_or_default();
        Some((seq, l.leader_epoch, ReplLogMeta { leo: seq + 1, epochs }))
    }

    /// True when this node leads `p` and has not yet recorded this leadership's epoch in
    /// its history (no batch stamped, no [`Self::leadership_start`] taken).
    pub fn leadership_unrecorded(&self, p: PartitionId) -> bool {
        self.state(p).leading.as_ref().is_some_and(|l| l.epochs.is_none())
    }

    /// The position to store when leadership of `p` starts, before any batch: the log end
    /// and the history with this leadership's epoch (so that, deposed before writing
    /// anything, this replica still reconciles by epoch instead of taking a snapshot).
    /// None when not leading or already recorded. The caller holds `p`'s apply lock
    /// until it is written.
    pub fn leadership_start(&self, p: PartitionId, load: impl FnOnce() -> Option<ReplLogMeta>) -> Option<ReplLogMeta> {
        let mut st = self.state(p);
        let leo = st.seq_counter;
        let l = st.leading.as_mut().filter(|l| l.epochs.is_none())?;
        let epochs = with_epoch(load().map(|m| m.epochs).unwrap_or_default(), l.leader_epoch, l.start);
        l.epochs = Some(epochs.clone());
        Some(ReplLogMeta { leo, epochs })
    }

    /// The leader-epoch history of `p` as its leader sees it (this leadership included);
    /// None when this node does not lead `p`. `load` reads the stored history when no
    /// batch was stamped yet.
    pub fn leader_history(
        &self,
        p: PartitionId,
        load: impl FnOnce() -> Option<ReplLogMeta>,
    ) -> Option<Vec<(u64, u64)>> {
        let st = self.state(p);
        let l = st.leading.as_ref()?;
        Some(match &l.epochs {
            Some(h) => h.clone(),
            None => with_epoch(load().map(|m| m.epochs).unwrap_or_default(), l.leader_epoch, l.start),
        })
    }

    /// The leader's answer to a follower whose last leader epoch is `last`: see
    /// [`epoch_end_in`]. `load` reads the stored history when no batch was stamped yet.
    pub fn epoch_end(
        &self,
        p: PartitionId,
        leader_epoch: u64,
        last: u64,
        load: impl FnOnce() -> Option<ReplLogMeta>,
    ) -> Result<Option<(u64, u64)>, FetchError> {
        let mut st = self.state(p);
        let leo = st.seq_counter;
        let Some(l) = st.leading.as_mut() else {
            return Err(FetchError::NotLeader(p, leader_epoch, None));
        };
        if l.leader_epoch != leader_epoch {
            return Err(FetchError::NotLeader(p, leader_epoch, Some(l.leader_epoch)));
        }
        let history = match &l.epochs {
            Some(h) => h.clone(),
            None => with_epoch(load().map(|m| m.epochs).unwrap_or_default(), l.leader_epoch, l.start),
        };
        Ok(epoch_end_in(&history, leo, last))
    }

    /// True when this node follows `p`: its owner must not write.
    pub fn is_following(&self, p: PartitionId) -> bool {
        self.state(p).following.is_some()
    }

    /// True when `p` must not be written here: this node follows it, or the map
    /// replicates it on other nodes only ([`Role::Outside`]).
    pub fn written_elsewhere(&self, p: PartitionId) -> bool {
        let st = self.state(p);
        st.following.is_some() || st.outside
    }

    /// The leader epoch this node leads `p` under.
    pub fn leader_epoch(&self, p: PartitionId) -> Option<u64> {
        self.state(p).leading.as_ref().map(|l| l.leader_epoch)
    }

    /// Appends one committed store batch of `p` (stamped by [`Self::stamp`]); returns its
    /// seq. The batch counts as replicated once the high watermark passes the seq.
    pub fn append(&self, p: PartitionId, data: Bytes) -> u64 {
        let mut st = self.state(p);
        let seq = st.seq_counter;
        st.seq_counter += 1;
        let max = self.max_log_bytes;
        if let Some(l) = st.leading.as_mut() {
            l.bytes += data.len();
            l.records.push_back((seq, data));
            l.next_seq = seq + 1;
            l.trim(max, Instant::now());
        }
        self.publish_hw(p, &st);
        drop(st);
        self.parts[p as usize].appended.notify_waiters();
        seq
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

    /// A follower's fetch of `p` from seq `from` (None: it needs a snapshot first).
    /// Records its position, and returns the batches from `from` on (at most `max_bytes`,
    /// at least one), or a snapshot start seq for `None`.
    pub fn fetch(
        &self,
        p: PartitionId,
        follower: &str,
        leader_epoch: u64,
        from: Option<u64>,
        max_bytes: usize,
    ) -> Result<Result<Fetched, u64>, FetchError> {
        let mut st = self.state(p);
        let max = self.max_log_bytes;
        let Some(l) = st.leading.as_mut() else {
            return Err(FetchError::NotLeader(p, leader_epoch, None));
        };
        if l.leader_epoch != leader_epoch {
            return Err(FetchError::NotLeader(p, leader_epoch, Some(l.leader_epoch)));
        }
        let next = l.next_seq;
        let in_isr = l.isr.iter().any(|f| f == follower);
        let Some(pos) = l.followers.get_mut(follower) else {
            return Err(FetchError::NotReplica(follower.to_string(), p));
        };
        pos.fetched_at = Instant::now();
        let Some(from) = from else {
            // It holds nothing it can vouch for: out of the ISR first (the next check asks).
            pos.resyncing = true;
            if in_isr {
                return Err(FetchError::InIsr);
            }
            // The log is kept from the snapshot's start for it (within the byte cap).
            pos.acked = next;
            return Ok(Err(next));
        };
        if from < l.base_seq || from > next {
            pos.resyncing = true;
            return Err(FetchError::Resync(from));
        }
        let now = Instant::now();
        if from >= pos.leo_at_fetch {
            pos.caught_up_at = now;
        }
        pos.leo_at_fetch = next;
        pos.acked = from;
        pos.resyncing = false;
        let mut out = Fetched::default();
        let mut bytes = 0;
        for (seq, b) in l.records.iter().filter(|(s, _)| *s >= from) {
            if !out.batches.is_empty() && bytes + b.len() > max_bytes {
                break;
            }
            bytes += b.len();
            out.batches.push((*seq, b.clone()));
        }
        l.trim(max, Instant::now());
        self.publish_hw(p, &st);
        Ok(Ok(out))
    }

    /// Waits until `p` has a batch at or beyond `seq`, or `limit` passes.
    pub async fn wait_for_append(&self, p: PartitionId, seq: u64, limit: Duration) {
        let part = &self.parts[p as usize];
        let notified = part.appended.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let ready = self.state(p).leading.as_ref().is_none_or(|l| l.next_seq > seq);
        if !ready {
            let _ = tokio::time::timeout(limit, notified).await;
        }
    }

    /// The follower's position of `p` under `leader_epoch`, if it has one.
    pub fn position(&self, p: PartitionId, leader_epoch: u64) -> Option<u64> {
        match self.state(p).following {
            Some((e, Pos::At(n))) if e == leader_epoch => Some(n),
            _ => None,
        }
    }

    /// True when the follower of `p` under `leader_epoch` has yet to reconcile its log
    /// with the leader's.
    pub fn must_reconcile(&self, p: PartitionId, leader_epoch: u64) -> bool {
        matches!(self.state(p).following, Some((e, Pos::Reconcile)) if e == leader_epoch)
    }

    /// Forgets the follower's position of `p`: the next fetch asks for a snapshot.
    pub fn forget_position(&self, p: PartitionId) {
        let mut st = self.state(p);
        if let Some((_, pos)) = st.following.as_mut() {
            *pos = Pos::Snapshot;
        }
        st.tail.clear();
        st.tail_bytes = 0;
    }

    /// Records that this follower holds every batch of `p` below `next` under
    /// `leader_epoch`, having just applied `applied` (consecutive, ending below `next`).
    pub fn set_position(&self, p: PartitionId, leader_epoch: u64, next: u64, applied: &[(u64, Bytes)]) -> bool {
        let mut st = self.state(p);
        match st.following.as_mut() {
            Some((e, pos)) if *e == leader_epoch => *pos = Pos::At(next),
            _ => return false,
        }
        st.seq_counter = next;
        let contiguous = match (st.tail.back(), applied.first()) {
            (Some(last), Some(first)) => last.0 + 1 == first.0,
            (None, _) => true,
            (Some(last), None) => last.0 + 1 == next,
        };
        if !contiguous {
            st.tail.clear();
            st.tail_bytes = 0;
        }
        for (seq, data) in applied {
            st.tail_bytes += data.len();
            st.tail.push_back((*seq, data.clone()));
        }
        while st.tail_bytes > self.max_log_bytes {
            let Some((_, b)) = st.tail.pop_front() else { break };
            st.tail_bytes -= b.len();
        }
        if st.tail.back().is_some_and(|last| last.0 + 1 != next) {
            st.tail.clear();
            st.tail_bytes = 0;
        }
        true
    }

    /// The ISR changes the leader of `p` should ask for now: followers behind for longer
    /// than the lag timeout leave, followers that caught up rejoin. At most one request per
    /// map install.
    pub fn isr_check(&self, p: PartitionId, now: Instant) -> Option<IsrChange> {
        let mut st = self.state(p);
        let l = st.leading.as_mut()?;
        if l.asked.is_some_and(|t| now.saturating_duration_since(t) < ASK_AGAIN) {
            return None;
        }
        let lag = self.lag_timeout;
        let mut isr = l.isr.clone();
        let before = isr.len();
        let fetching = |pos: &FollowerPos| now.saturating_duration_since(pos.fetched_at) <= lag;
        isr.retain(|f| {
            l.followers.get(f).is_some_and(|pos| {
                !pos.resyncing
                    && fetching(pos)
                    && (pos.acked >= l.next_seq || now.saturating_duration_since(pos.caught_up_at) <= lag)
            })
        });
        let shrink = isr.len() < before;
        let mut expand = false;
        for (f, pos) in &l.followers {
            if !isr.contains(f) && !shrink && !pos.resyncing && fetching(pos) && pos.acked >= l.next_seq {
                isr.push(f.clone());
                expand = true;
            }
        }
        if !shrink && !expand {
            return None;
        }
        l.asked = Some(now);
        let mut full = vec![l.me.clone()];
        full.extend(isr);
        Some(IsrChange { partition: p, leader_epoch: l.leader_epoch, isr: full, expand })
    }

    /// Queues an ISR change for the cluster layer.
    pub fn ask(&self, change: IsrChange) {
        let _ = self.isr_tx.send(change);
    }

    /// Replication lag of `p` in batches (the worst follower), for metrics.
    pub fn lag(&self, p: PartitionId) -> Option<u64> {
        let st = self.state(p);
        let l = st.leading.as_ref()?;
        l.followers.values().map(|f| l.next_seq.saturating_sub(f.acked)).max()
    }

    /// Partitions this node leads with fewer in-sync copies than wanted (followers out
    /// of sync, or fewer live nodes than `replicas`).
    pub fn under_replicated(&self) -> usize {
        let wanted = self.wanted.load(std::sync::atomic::Ordering::Relaxed);
        (0..self.parts.len() as u32)
            .filter(|p| self.state(*p).leading.as_ref().is_some_and(|l| 1 + l.isr.len() < wanted))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leader(r: &Replication, followers: &[&str], isr: &[&str], epoch: u64) {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect();
        r.set_role(0, Role::Leader { me: "a".into(), leader_epoch: epoch, followers: v(followers), isr: v(isr) });
    }

    /// The high watermark is the lowest position over the ISR; followers outside the ISR
    /// do not hold it back; a fetch from a position releases everything below it.
    #[test]
    fn the_high_watermark_is_the_lowest_isr_position() {
        let r = Replication::new(1, Duration::from_secs(2), 1 << 20);
        leader(&r, &["b", "c"], &["b"], 1);
        let hw = r.hw_changes(0);
        let s0 = r.append(0, Bytes::from_static(b"x"));
        let s1 = r.append(0, Bytes::from_static(b"y"));
        assert_eq!(*hw.borrow(), s0, "nothing replicated yet");
        let got = r.fetch(0, "b", 1, Some(s0), 1 << 20).unwrap().unwrap();
        assert_eq!(got.batches.iter().map(|b| b.0).collect::<Vec<_>>(), vec![s0, s1]);
        assert_eq!(*hw.borrow(), s0, "a fetch from s0 acknowledges only what is below s0");
        r.fetch(0, "b", 1, Some(s1 + 1), 1 << 20).unwrap().unwrap();
        assert_eq!(*hw.borrow(), s1 + 1, "c is not in the ISR and does not hold the watermark");
        // Fenced: a fetch under another leader epoch is refused.
        assert!(matches!(r.fetch(0, "b", 2, Some(s1 + 1), 10), Err(FetchError::NotLeader(..))));
        assert!(matches!(r.fetch(0, "z", 1, Some(0), 10), Err(FetchError::NotReplica(..))));
        // An ISR member cannot ask for a snapshot; one outside it gets the next seq.
        assert_eq!(r.fetch(0, "b", 1, None, 10), Err(FetchError::InIsr));
        assert_eq!(r.fetch(0, "c", 1, None, 10).unwrap().unwrap_err(), s1 + 1);
        // A position beyond the log is divergence: resync.
        assert!(matches!(r.fetch(0, "c", 1, Some(s1 + 5), 10), Err(FetchError::Resync(_))));
    }

    /// A lagging ISR follower is asked out after the lag timeout; a caught-up follower
    /// outside is asked in; nothing changes the ISR the watermark counts until a map does.
    #[test]
    fn isr_shrinks_on_lag_and_expands_on_catch_up() {
        let r = Replication::new(1, Duration::from_millis(100), 1 << 20);
        leader(&r, &["b", "c"], &["b"], 1);
        let now = Instant::now();
        let seq = r.append(0, Bytes::from_static(b"x"));
        assert_eq!(r.isr_check(0, now), None, "within the lag timeout");
        let later = now + Duration::from_millis(500);
        let change = r.isr_check(0, later).unwrap();
        assert_eq!(change.isr, vec!["a".to_string()]);
        assert!(!change.expand);
        assert_eq!(r.isr_check(0, later), None, "asked once per map");
        let change = r.isr_check(0, later + Duration::from_secs(2)).expect("asked again when no map came");
        assert_eq!(change.isr, vec!["a".to_string()]);
        assert_eq!(*r.hw_changes(0).borrow(), seq, "the watermark waits for the map");
        // The map drops b; c fetches everything and is asked in.
        leader(&r, &["b", "c"], &[], 1);
        assert_eq!(*r.hw_changes(0).borrow(), seq + 1);
        r.fetch(0, "c", 1, Some(seq + 1), 1 << 20).unwrap().unwrap();
        let change = r.isr_check(0, Instant::now()).unwrap();
        assert!(change.expand);
        assert_eq!(change.isr, vec!["a".to_string(), "c".to_string()]);
    }

    /// A follower that stopped fetching (a dead node) leaves the ISR even when no write
    /// left it behind, and is not asked back in until it fetches again.
    #[test]
    fn a_follower_that_stops_fetching_is_not_in_sync() {
        let r = Replication::new(1, Duration::from_millis(100), 1 << 20);
        leader(&r, &["b"], &["b"], 1);
        let later = Instant::now() + Duration::from_millis(500);
        assert_eq!(r.isr_check(0, later).map(|c| c.isr), Some(vec!["a".to_string()]));
        leader(&r, &["b"], &[], 1);
        assert_eq!(r.isr_check(0, later + Duration::from_secs(2)), None, "caught up, but silent");
        r.fetch(0, "b", 1, Some(0), 1 << 20).unwrap().unwrap();
        assert!(r.isr_check(0, Instant::now()).is_some_and(|c| c.expand));
    }

    proptest::proptest! {
        /// The high watermark under any interleaving of appends and fetches: it never goes
        /// down, never passes what was appended, equals the lowest position of the ISR
        /// followers (a follower outside the ISR never holds it back), and a fetch returns
        /// consecutive batches from exactly where it asked.
        #[test]
        fn the_high_watermark_follows_the_lowest_isr_position(
            ops in proptest::collection::vec((0u8..3, 0u64..4), 1..200)
        ) {
            let r = Replication::new(1, Duration::from_secs(2), 1 << 20);
            leader(&r, &["b", "c"], &["b"], 1);
            let hw = r.hw_changes(0);
            let (mut next, mut acked_b, mut acked_c, mut last_hw) = (0u64, 0u64, 0u64, 0u64);
            for (kind, step) in ops {
                match kind {
                    0 => {
                        let seq = r.append(0, Bytes::from_static(b"x"));
                        proptest::prop_assert_eq!(seq, next);
                        next += 1;
                    }
                    who => {
                        let acked = if who == 1 { &mut acked_b } else { &mut acked_c };
                        let from = (*acked + step).min(next);
                        let f = if who == 1 { "b" } else { "c" };
                        let got = r.fetch(0, f, 1, Some(from), 1 << 20).unwrap().unwrap();
                        for (i, (seq, _)) in got.batches.iter().enumerate() {
                            proptest::prop_assert_eq!(*seq, from + i as u64);
                        }
                        *acked = from;
                    }
                }
                let now = *hw.borrow();
                proptest::prop_assert!(now >= last_hw, "went down: {} -> {}", last_hw, now);
                proptest::prop_assert!(now <= next);
                proptest::prop_assert_eq!(now, acked_b.min(next));
                last_hw = now;
            }
        }
    }

    /// KIP-101/279: the leader answers where the follower's last epoch ended in its own
    /// history, and the follower truncates to the lower of that and its own end of the
    /// matched epoch; a follower that cannot vouch for its prefix takes a snapshot.
    #[test]
    fn truncation_follows_the_leader_epoch_histories() {
        let own = |leo, epochs: &[(u64, u64)]| ReplLogMeta { leo, epochs: epochs.to_vec() };
        // The leader of epoch 5 wrote 100..120; its follower had 115 when it took over
        // as the leader of epoch 6.
        let leader = [(3, 0), (5, 100), (6, 115)];
        assert_eq!(epoch_end_in(&leader, 130, 5), Some((5, 115)));
        assert_eq!(epoch_end_in(&leader, 130, 6), Some((6, 130)));
        assert_eq!(epoch_end_in(&leader, 130, 4), Some((3, 100)), "largest epoch at or below");
        assert_eq!(epoch_end_in(&leader, 130, 2), None);
        // The deposed leader returns with 120 under epoch 5: it truncates to 115.
        let deposed = own(120, &[(3, 0), (5, 100)]);
        assert_eq!(truncation_point(&deposed, epoch_end_in(&leader, 130, 5)), Some(115));
        // A follower that had only 110 keeps everything.
        let behind = own(110, &[(3, 0), (5, 100)]);
        assert_eq!(truncation_point(&behind, epoch_end_in(&leader, 130, 5)), Some(110));
        // A replica that led epoch 4, which nobody else saw, truncates to where epoch 3
        // ended in the leader's log or in its own, whichever is lower.
        let lone = own(140, &[(3, 0), (4, 90)]);
        assert_eq!(truncation_point(&lone, epoch_end_in(&leader, 130, 4)), Some(90));
        // A follower of the current epoch that restarted fetches on from its end.
        let same = own(125, &[(3, 0), (5, 100), (6, 115)]);
        assert_eq!(truncation_point(&same, epoch_end_in(&leader, 130, 6)), Some(125));
        // No common epoch, or no history at all: a snapshot.
        let snapshotted = own(200, &[(7, 150)]);
        assert_eq!(truncation_point(&snapshotted, epoch_end_in(&leader, 130, 7)), None);
        assert_eq!(truncation_point(&own(0, &[]), Some((6, 130))), None);
        // The history is bounded and never repeats its last epoch.
        let mut h = Vec::new();
        for e in 0..100 {
            h = with_epoch(h, e, e * 10);
            h = with_epoch(h, e, e * 10 + 5);
        }
        assert_eq!(h.len(), MAX_EPOCHS);
        assert_eq!(h.last(), Some(&(99, 990)));
    }

    /// A leader stamps each batch with the next seq and a history that includes its own
    /// epoch; a promoted follower continues the seq space from what it applied and serves
    /// the batches it applied last to followers a little behind it.
    #[test]
    fn a_promoted_follower_continues_the_log_it_applied() {
        let r = Replication::new(1, Duration::from_secs(2), 1 << 20);
        r.load(0, Some(&ReplLogMeta { leo: 40, epochs: vec![(2, 0)] }));
        r.set_role(0, Role::Follower { leader_epoch: 3 });
        assert!(r.must_reconcile(0, 3));
        assert_eq!(r.position(0, 3), None);
        assert!(r.set_position(0, 3, 40, &[]));
        let applied: Vec<(u64, Bytes)> = (40..45).map(|s| (s, Bytes::from_static(b"b"))).collect();
        assert!(r.set_position(0, 3, 45, &applied));
        leader(&r, &["b"], &["b"], 4);
        let (seq, epoch, meta) = r.stamp(0, || Some(ReplLogMeta { leo: 45, epochs: vec![(2, 0), (3, 40)] })).unwrap();
        assert_eq!((seq, epoch), (45, 4));
        assert_eq!(meta, ReplLogMeta { leo: 46, epochs: vec![(2, 0), (3, 40), (4, 45)] });
        assert_eq!(r.append(0, Bytes::from_static(b"x")), 45);
        // b, in sync but two batches behind when the leader changed, fetches from 43.
        let got = r.fetch(0, "b", 4, Some(43), 1 << 20).unwrap().unwrap();
        assert_eq!(got.batches.iter().map(|b| b.0).collect::<Vec<_>>(), vec![43, 44, 45]);
        assert_eq!(r.epoch_end(0, 4, 3, || None), Ok(Some((3, 45))));
        assert!(matches!(r.epoch_end(0, 5, 3, || None), Err(FetchError::NotLeader(..))));
        // A truncation moves the log end back; the next leadership's watermark starts
        // afresh, so a stale watermark never releases the new batches.
        r.set_role(0, Role::Follower { leader_epoch: 6 });
        assert!(r.set_position(0, 6, 44, &[]));
        leader(&r, &["b"], &["b"], 7);
        assert_eq!(*r.hw_changes(0).borrow(), 44);
        assert_eq!(r.stamp(0, || None).unwrap().0, 44);
    }

    /// A follower that stopped fetching pins the leader's batches for a while (it may come
    /// back and catch up from them), then no longer.
    #[test]
    fn a_silent_follower_pins_batches_only_for_a_while() {
        let r = Replication::new(1, Duration::from_secs(2), 1 << 20);
        leader(&r, &["b"], &[], 1);
        let first = r.append(0, Bytes::from_static(b"x"));
        r.append(0, Bytes::from_static(b"y"));
        let mut st = r.state(0);
        let l = st.leading.as_mut().unwrap();
        l.trim(1 << 20, Instant::now() + Duration::from_secs(10));
        assert_eq!(l.records.front().map(|r| r.0), Some(first), "kept for b");
        l.trim(1 << 20, Instant::now() + SILENT_PIN + Duration::from_secs(1));
        assert!(l.records.is_empty(), "b has been silent too long");
    }

    /// Seqs never repeat across leaderships, and a new leadership starts with nothing owed.
    #[test]
    fn a_new_leadership_continues_the_seq_space() {
        let r = Replication::new(1, Duration::from_secs(2), 1 << 20);
        leader(&r, &["b"], &["b"], 1);
        let s = r.append(0, Bytes::from_static(b"x"));
        r.set_role(0, Role::Follower { leader_epoch: 2 });
        assert!(r.is_following(0));
        assert_eq!(r.position(0, 2), None, "a new leader means a snapshot first");
        leader(&r, &["b"], &[], 3);
        let t = r.append(0, Bytes::from_static(b"y"));
        assert!(t > s);
        assert_eq!(*r.hw_changes(0).borrow(), t + 1, "no in-sync follower: acknowledged at once");
    }
}
