//! Which partitions are being handed over, in either direction.
//!
//! It owns the bookkeeping that the peer layer's handover writes and the local read path
//! checks: partitions being adopted here (their mailbox is held), partitions sealed here
//! (their state waits to be pulled) and adoptions that did not finish. It must never do I/O
//! or hold one of its locks across an await.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use switchyard_proto::partition::PartitionId;

/// The handovers under way on this node.
#[derive(Default)]
pub struct Handovers {
    /// Partitions being adopted here, with the map epoch of the move.
    pub adopting: Mutex<HashMap<PartitionId, u64>>,
    /// Partitions sealed here whose new owner has not confirmed the pull yet, with the map
    /// epoch of the move that sealed them: this node's copy is the authoritative one until
    /// that move's new owner confirms.
    pub sealed: Mutex<HashMap<PartitionId, u64>>,
    /// Partitions whose adoption was abandoned half-way (the map moved them back to their
    /// source): what the store holds for them is not a copy to hand on.
    pub incomplete: Mutex<HashSet<PartitionId>>,
    /// The epoch of the last map whose seals are recorded in `sealed` (a map becomes
    /// visible a moment before its seals are; a drain must not read that moment as done).
    installed: std::sync::atomic::AtomicU64,
    /// Woken whenever a sealed partition is released or a map's seals are recorded (a
    /// drain waits on it).
    pub changed: tokio::sync::Notify,
}

impl Handovers {
    /// True while `p` is being adopted here.
    pub fn is_adopting(&self, p: PartitionId) -> bool {
        self.adopting.lock().expect("handovers").contains_key(&p)
    }

    /// Forgets sealed partition `p` (its new owner has it, or it came back) and wakes the
    /// waiters on [`Handovers::changed`]; false when it was not sealed.
    pub fn release(&self, p: PartitionId) -> bool {
        let was = self.sealed.lock().expect("handovers").remove(&p).is_some();
        self.changed.notify_waiters();
        was
    }

    /// Records that the seals of map `epoch` are in place.
    pub fn installed(&self, epoch: u64) {
        self.installed.fetch_max(epoch, std::sync::atomic::Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// True when map `epoch`'s seals are recorded and every sealed partition was taken.
    pub fn settled(&self, epoch: u64) -> bool {
        self.installed.load(std::sync::atomic::Ordering::SeqCst) >= epoch && self.outstanding() == 0
    }

    /// Partitions sealed here and not yet taken by their new owner.
    pub fn outstanding(&self) -> usize {
        self.sealed.lock().expect("handovers").len()
    }

    /// Partitions being adopted here.
    pub fn adopting(&self) -> usize {
        self.adopting.lock().expect("handovers").len()
    }
}
