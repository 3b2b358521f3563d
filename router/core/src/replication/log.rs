//! What a partition's replicated log carries and the rules of its leader-epoch history:
//! [`ReplOp`], the writes of one store batch as followers apply them, and the pure
//! functions that extend a history, answer where an epoch ended and decide where a
//! replica truncates (KIP-101/KIP-279).
//!
//! It owns these encodings and rules only: it holds no state, must never lock or wait,
//! and touches the store only through a batch it is handed ([`apply_ops`]). The encoding
//! of [`ReplOp`] crosses the wire to followers: it must never change.

use serde::{Deserialize, Serialize};
use switchyard_proto::partition::PartitionId;
use switchyard_store::{ChannelMeta, ReplLogMeta, StoredMessage};

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

/// Most leader-epoch history entries a replica keeps (older epochs: a snapshot instead).
pub(super) const MAX_EPOCHS: usize = 64;

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
