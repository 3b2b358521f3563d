//! Store reads a partition owner waits for without blocking: the idempotency window of a
//! recovered channel (read back at its first keyed publish) and committed consumer offsets
//! (read at a channel's first commit, consumer subscribe or consumer facts). Each runs on
//! the store's read pool; meanwhile the channel's commands are parked here, in arrival
//! order, and every other channel of the partition is served as usual.
//!
//! It owns the parked commands and the bookkeeping of loads in flight: one load at a time
//! per channel, each with an id, so a result that arrives after the partition was sealed,
//! adopted again or stopped is recognised as stale and dropped. It must never change a
//! channel's offsets or answer a command itself: the owner applies a result and runs the
//! parked commands again, as if they had just arrived.
//!
//! Every command naming the channel parks behind a load, unkeyed publishes too: offsets
//! are assigned in arrival order per channel, and a publish that overtook a parked keyed
//! one would take an offset before it. Presence commands (memory only, no offsets) do not
//! park.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use switchyard_proto::partition::PartitionId;
use switchyard_proto::protocol::OpError;
use switchyard_store::Store;
use tokio::sync::mpsc;

use super::command::OwnerCommand;
use crate::idempotency::{Budget, Window};

/// Most stored messages scanned to rebuild a channel's idempotency window after a restart.
const IDEMPOTENCY_SCAN_MAX: usize = 100_000;

/// What a channel must have in memory before one of its commands can run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Need {
    /// Its idempotency window (a keyed publish to a recovered channel).
    Idempotency {
        /// The channel's top when the load starts: keys are read up to it.
        top: u64,
        /// Keys older than this (ms since the epoch) are not read back.
        cutoff_ms: u64,
    },
    /// A consumer's committed offset.
    Consumer(String),
}

/// What a load read.
pub(super) enum Loaded {
    /// The rebuilt window, or what to answer the parked publishes when the read failed
    /// (damaged data: without the window a repeat could be stored twice).
    Idempotency(Result<Window, OpError>),
    /// The consumer's committed offset (0 when none), or what to answer when the read
    /// failed.
    Consumer(String, Result<u64, OpError>),
}

/// A finished load, on its way back to the owner.
pub(super) struct Done {
    id: u64,
    channel: Arc<str>,
    loaded: Loaded,
}

/// A load in flight and the commands parked behind it.
struct Loading {
    id: u64,
    parked: VecDeque<OwnerCommand>,
}

/// The loads in flight of one partition.
pub(super) struct Loads {
    next_id: u64,
    loading: HashMap<Arc<str>, Loading>,
    tx: mpsc::UnboundedSender<Done>,
    /// Finished loads; the owner selects on it.
    pub(super) done: mpsc::UnboundedReceiver<Done>,
}

impl Loads {
    pub(super) fn new() -> Self {
        let (tx, done) = mpsc::unbounded_channel();
        Self { next_id: 1, loading: HashMap::new(), tx, done }
    }

    /// True while `channel` waits for a load.
    pub(super) fn is_loading(&self, channel: &str) -> bool {
        self.loading.contains_key(channel)
    }

    /// True when no load is in flight.
    pub(super) fn is_idle(&self) -> bool {
        self.loading.is_empty()
    }

    /// Parks `cmd` behind the load of `channel` (which must be loading).
    pub(super) fn park(&mut self, channel: &str, cmd: OwnerCommand) {
        self.loading.get_mut(channel).expect("parked behind a load in flight").parked.push_back(cmd);
    }

    /// Starts reading what `channel` needs on the store's read pool, with `cmd` as the
    /// first command parked behind it.
    pub(super) fn start(
        &mut self,
        store: &Arc<Store>,
        (partition, channel): (PartitionId, Arc<str>),
        need: Need,
        budget: Arc<Budget>,
        cmd: OwnerCommand,
    ) {
        let id = self.next_id;
        self.next_id += 1;
        self.loading.insert(channel.clone(), Loading { id, parked: VecDeque::from([cmd]) });
        let (store, tx) = (store.clone(), self.tx.clone());
        tokio::spawn(async move {
            let name = channel.clone();
            let loaded = match need {
                Need::Idempotency { top, cutoff_ms } => {
                    let read = store.read(move |r| {
                        // A failed read is logged (rate-limited) and flagged by the store.
                        let keys = r.recent_idempotency_keys(partition, &name, top, cutoff_ms, IDEMPOTENCY_SCAN_MAX);
                        let mut window = Window::new(budget);
                        let keys = keys.map_err(|e| e.to_op_error())?;
                        for (offset, ts, key) in keys.into_iter().rev() {
                            window.insert(&key, offset, ts);
                        }
                        Ok(window)
                    });
                    match read.await {
                        Ok(window) => Loaded::Idempotency(window),
                        Err(e) => {
                            // The pool is gone (stopping): nothing to deduplicate against.
                            tracing::warn!(channel = %channel, error = %e, "could not rebuild idempotency window");
                            return;
                        }
                    }
                }
                Need::Consumer(consumer) => {
                    let c = consumer.clone();
                    let read = store.read(move |r| r.consumer_offset(partition, &name, &c)).await;
                    let offset = match read {
                        Ok(Ok(o)) => Ok(o.unwrap_or(0)),
                        Ok(Err(e)) | Err(e) => Err(e.to_op_error()),
                    };
                    Loaded::Consumer(consumer, offset)
                }
            };
            // The owner may be gone (stopped): nobody is waiting then.
            let _ = tx.send(Done { id, channel, loaded });
        });
    }

    /// The result of `done` with the commands parked behind it, or None when it is stale
    /// (its channel's parked commands were already taken by a seal or an adoption).
    pub(super) fn finish(&mut self, done: Done) -> Option<(Arc<str>, Loaded, VecDeque<OwnerCommand>)> {
        match self.loading.get(&done.channel) {
            Some(l) if l.id == done.id => {
                let l = self.loading.remove(&done.channel).expect("just found");
                Some((done.channel, done.loaded, l.parked))
            }
            _ => None,
        }
    }

    /// Every parked command, oldest load first within each channel; the loads in flight
    /// become stale.
    pub(super) fn take_all(&mut self) -> Vec<OwnerCommand> {
        let mut loads: Vec<Loading> = self.loading.drain().map(|(_, l)| l).collect();
        loads.sort_by_key(|l| l.id);
        loads.into_iter().flat_map(|l| l.parked).collect()
    }
}
