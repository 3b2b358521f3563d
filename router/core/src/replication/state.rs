//! The per-partition replication bookkeeping behind [`super::PartitionLog`]'s lock: the
//! leader's log of batches and its followers' positions ([`Leading`]), and the
//! follower's position under the leader it follows ([`Pos`]).
//!
//! It owns the data and the two rules that need only it (the high watermark, and which
//! batches the leader may drop); it must never take the lock, wait or do I/O, which is
//! the job of the [`super::Replication`] methods that use it.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;
use tokio::time::Instant;

use bytes::Bytes;

/// How long a leader keeps batches for a follower that stopped fetching (a dead node kept
/// in the replica list): it catches up from them if it returns within this time; after
/// it, its batches go and it will take a snapshot. Bounds the memory a dead node pins.
pub(super) const SILENT_PIN: Duration = Duration::from_secs(60);

/// A follower's position under the leader it follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pos {
    /// Not yet reconciled with this leader: ask where its last epoch ended, truncate.
    Reconcile,
    /// Nothing it holds can be vouched for: take a snapshot.
    Snapshot,
    /// Every batch below this seq is applied here.
    At(u64),
}

pub(super) struct FollowerPos {
    /// Every batch below this seq is durable on the follower.
    pub(super) acked: u64,
    /// The leader's next seq when the follower last fetched.
    pub(super) leo_at_fetch: u64,
    /// Last time the follower had fetched everything the leader had at its previous fetch.
    pub(super) caught_up_at: Instant,
    /// Last time the follower fetched at all: one that stopped fetching is not in sync,
    /// even when no write since has left it behind.
    pub(super) fetched_at: Instant,
    /// A snapshot is under way (or needed): never expand it before it fetches normally.
    pub(super) resyncing: bool,
}

pub(super) struct Leading {
    pub(super) me: String,
    pub(super) leader_epoch: u64,
    /// The seq this leadership started at.
    pub(super) start: u64,
    /// This replica's leader-epoch history, this leadership included (loaded from the store
    /// when the first batch is stamped).
    pub(super) epochs: Option<Vec<(u64, u64)>>,
    pub(super) isr: Vec<String>,
    pub(super) followers: HashMap<String, FollowerPos>,
    pub(super) base_seq: u64,
    pub(super) next_seq: u64,
    pub(super) records: VecDeque<(u64, Bytes)>,
    pub(super) bytes: usize,
    /// When an ISR change was last asked for (since the last map install): asked again
    /// after `ASK_AGAIN` if no map brought it (the write failed or was refused).
    pub(super) asked: Option<Instant>,
    /// Followers an asked ISR expansion added that the installed ISR does not list yet.
    /// The high watermark counts them too: etcd may list them (and fail a partition over
    /// to one of them) before this node installs that map, so nothing may be acknowledged
    /// that they do not hold (Kafka's KIP-497 "maximal ISR"). Dropped once the installed
    /// ISR lists them, or once etcd is known to hold an ISR without them.
    pub(super) widened: Vec<String>,
    /// The ISR last asked for: a report that etcd holds an older one (still in the
    /// queue when this one was asked) must not release what this one adds.
    pub(super) last_asked: Vec<String>,
    /// An in-sync follower fetched from beyond this leader's log end under this leader
    /// epoch: this replica lost batches it had written (a journal repair at start-up
    /// dropped them). It stops writing the partition; the follower keeps its copy.
    pub(super) lost_tail: bool,
    /// Led from a log start-up repair may have shortened, with in-sync followers: nothing
    /// is written until one of them fetches from within this log (it is then not behind)
    /// or the ISR holds no follower (this log is the only copy).
    pub(super) unconfirmed: bool,
}

impl Leading {
    pub(super) fn hw(&self) -> u64 {
        self.isr
            .iter()
            .chain(self.widened.iter())
            .map(|f| self.followers.get(f).map_or(self.base_seq, |p| p.acked))
            .fold(self.next_seq, u64::min)
    }

    /// Drops batches every follower has, and the oldest ones beyond the byte cap (followers
    /// that still need those will resync), and those only followers silent for longer than
    /// [`SILENT_PIN`] still need.
    pub(super) fn trim(&mut self, max_bytes: usize, now: Instant) {
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
pub(super) struct LogState {
    pub(super) leading: Option<Leading>,
    /// As a follower: the leader epoch followed and the position under it.
    pub(super) following: Option<(u64, Pos)>,
    /// [`super::Role::Outside`]: replicated elsewhere; nothing may be written here.
    pub(super) outside: bool,
    /// The next seq: this replica holds every batch below it (its log end). Loaded from the
    /// store at startup, advanced by the leader's appends and the follower's applies.
    pub(super) seq_counter: u64,
    /// As a follower: the batches it applied most recently (consecutive, ending at
    /// `seq_counter`), so that, promoted, it can serve in-sync followers a little behind it.
    pub(super) tail: VecDeque<(u64, Bytes)>,
    pub(super) tail_bytes: usize,
    /// Start-up repair dropped journal batches: this replica's log may be shorter than
    /// what it acknowledged. Leading, it writes nothing until an in-sync follower's fetch
    /// shows its log is not behind ([`Leading::unconfirmed`]).
    pub(super) suspect: bool,
}
