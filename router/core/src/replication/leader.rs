//! The leader's side of a replicated partition: stamping and appending each store batch,
//! answering followers' fetches and their epoch questions, and deciding which ISR changes
//! to ask etcd for.
//!
//! It must never do I/O or wait while holding a partition's state lock (the stored
//! history is read through the `load` closures callers pass), and never change the ISR
//! itself: it asks, and only an installed map changes the set.

use std::time::Duration;
use tokio::time::Instant;

use bytes::Bytes;
use switchyard_proto::partition::PartitionId;
use switchyard_store::ReplLogMeta;

use super::log::{epoch_end_in, with_epoch};
use super::state::{FollowerPos, Leading, LogState};
use super::{FetchError, Fetched, IsrChange, Replication};

/// How long a leader waits for a map with the ISR change it asked for before asking again.
const ASK_AGAIN: Duration = Duration::from_secs(1);

impl Replication {
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
        let l = leading_under(&mut st, p, leader_epoch)?;
        let history = match &l.epochs {
            Some(h) => h.clone(),
            None => with_epoch(load().map(|m| m.epochs).unwrap_or_default(), l.leader_epoch, l.start),
        };
        Ok(epoch_end_in(&history, leo, last))
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
        let l = leading_under(&mut st, p, leader_epoch)?;
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
        if from > next && in_isr && !pos.resyncing {
            // Under one leader epoch an in-sync follower only holds what this leader wrote:
            // this replica lost part of its log (a journal repair at start-up dropped
            // batches). A resync would wipe the only complete copy; the follower keeps it
            // and this replica stops writing the partition.
            if !l.lost_tail {
                l.lost_tail = true;
                tracing::error!(
                    partition = p,
                    follower,
                    follower_from = from,
                    leader_next = next,
                    "this replica lost batches an in-sync follower holds: it stops writing the partition; the follower keeps its copy (move the leadership to it)"
                );
            }
            return Err(FetchError::LeaderBehind(from, next));
        }
        let confirmed = in_isr && l.unconfirmed && !l.lost_tail;
        if confirmed {
            // An in-sync follower is not ahead of this log: it holds what was acknowledged.
            l.unconfirmed = false;
            tracing::info!(
                partition = p,
                follower,
                "log confirmed by an in-sync follower after a journal repair; writing again"
            );
        }
        if from < pos.acked && in_isr {
            // Below what it acknowledged: the follower lost batches (a journal repair on
            // its start dropped them). Out of the ISR before it fetches them again (or
            // takes a snapshot, when the log no longer reaches back), so the high
            // watermark never counts a copy that no longer holds it.
            pos.resyncing = true;
            return Err(FetchError::Regressed(from, pos.acked));
        }
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
        if confirmed {
            st.suspect = false;
        }
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
        // The set the high watermark counts: the installed ISR and the followers an
        // expansion asked for that may already be in etcd's.
        let mut isr = l.isr.clone();
        isr.extend(l.widened.iter().filter(|f| !l.isr.contains(f)).cloned());
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
                l.widened.push(f.clone());
                expand = true;
            }
        }
        if !shrink && !expand {
            return None;
        }
        l.asked = Some(now);
        let mut full = vec![l.me.clone()];
        full.extend(isr);
        l.last_asked = full.clone();
        Some(IsrChange { partition: p, leader_epoch: l.leader_epoch, isr: full, expand })
    }

    /// The cluster layer's report that etcd's map now holds `isr` (leader first) as the
    /// ISR of `p` under `leader_epoch`: followers an expansion added that it does not list
    /// no longer hold back the high watermark (etcd cannot fail over to them).
    pub fn isr_written(&self, p: PartitionId, leader_epoch: u64, isr: &[String]) {
        let mut st = self.state(p);
        let Some(l) = st.leading.as_mut().filter(|l| l.leader_epoch == leader_epoch) else { return };
        let last = &l.last_asked;
        l.widened.retain(|f| isr.contains(f) || last.contains(f));
        self.publish_hw(p, &st);
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

/// The leadership of `p` under `leader_epoch`, or the refusal a follower that named
/// another epoch (or a node that does not lead `p`) gets.
fn leading_under(st: &mut LogState, p: PartitionId, leader_epoch: u64) -> Result<&mut Leading, FetchError> {
    let Some(l) = st.leading.as_mut() else {
        return Err(FetchError::NotLeader(p, leader_epoch, None));
    };
    if l.leader_epoch != leader_epoch {
        return Err(FetchError::NotLeader(p, leader_epoch, Some(l.leader_epoch)));
    }
    Ok(l)
}
