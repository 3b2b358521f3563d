//! The follower's side of a replicated partition: its position under the leader it
//! follows (to reconcile, to snapshot, or at a seq) and the tail of batches it applied
//! last, which it serves if it is promoted.
//!
//! It only records what the follower loop (in the peer layer) did: it must never fetch,
//! apply or write anything itself, and never wait.

use bytes::Bytes;
use switchyard_proto::partition::PartitionId;

use super::state::Pos;
use super::Replication;

impl Replication {
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
}
