//! The owner of one partition: a single task that assigns offsets, appends to the store,
//! fans messages out and answers every question about its channels.
//!
//! It owns the in-memory state of its channels (epoch, offsets, subscribers, presence, the
//! idempotency window, committed consumer offsets) and is its only writer, so no lock guards it. Commands
//! that arrive together form one batch: one store commit and one (group) fsync, after which
//! publishes are acknowledged and fanned out, and only then are reads answered, so a client
//! always reads its own acknowledged writes. It must never wait on anything but the store
//! (and, once per partition move, on the handover that fills the store before it serves),
//! and never on a subscriber: fan-out uses the non-blocking [`Outbox`], and the sockets
//! idle sessions lend it are written with non-blocking `send`s only (the direct path).
//!
//! The owner is split by what each part owns: `command` holds what other tasks send it
//! and what it answers; `channel` its per-channel state; `batch` the way one batch of
//! commands is written to the store; `release` what happens once a batch is durable;
//! `presence` who is subscribed (memory only) and the join and leave pushes. This
//! file holds the task itself: its mailbox, adoptions and the batching loop.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot, watch};

use crate::idempotency::Budget;
use crate::outbox::Outbox;
use crate::replication::Replication;
use switchyard_metrics::Metrics;
use switchyard_proto::partition::PartitionId;
use switchyard_store::{ChannelMeta, Store};

mod batch;
mod channel;
mod command;
mod loads;
pub(crate) mod presence;
mod release;
#[cfg(test)]
mod tests;

use batch::Work;
use channel::ChannelState;
pub(crate) use command::OwnerCommand;
pub use command::{
    grant_from, ChannelView, Facts, Forward, Grant, PublishRequest, Snapshot, Start, TrimReason, SEALED,
};
pub(crate) use presence::PresenceCommand;
pub use presence::{PresenceLimits, PresenceSettings};

/// Most commands folded into one batch.
const MAX_BATCH: usize = 1024;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A new random epoch name.
pub fn new_epoch() -> String {
    use rand::distr::{Alphanumeric, SampleString};
    Alphanumeric.sample_string(&mut rand::rng(), 8)
}

/// True for an epoch string this server could have made (`new_epoch`): short and
/// alphanumeric. Only such an epoch is taken from a client.
fn is_epoch_like(epoch: &str) -> bool {
    (1..=32).contains(&epoch.len()) && epoch.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// The owner task of one partition.
pub(crate) struct Owner {
    partition: PartitionId,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    idempotency_window: Duration,
    channels: HashMap<Arc<str>, ChannelState>,
    rx: mpsc::Receiver<OwnerCommand>,
    /// Adoptions, ahead of the mailbox: each receiver fires when the store holds the
    /// partition's handed-over state; until then every command waits.
    adoptions: mpsc::UnboundedReceiver<oneshot::Receiver<()>>,
    /// Where writes that reach the sealed partition go (to be forwarded to the new owner).
    forward: Option<mpsc::UnboundedSender<Forward>>,
    /// The partition moved away: writes are refused until it is adopted again.
    sealed: bool,
    /// The node-wide allowance of remembered idempotency keys.
    idempotency_budget: Arc<Budget>,
    /// Replication state: a leader's batches wait for the high watermark.
    replication: Arc<Replication>,
    /// The partition's high watermark.
    hw: watch::Receiver<u64>,
    /// Durable batches waiting for the followers, with their seq and leader epoch.
    parked: VecDeque<(u64, u64, Work)>,
    /// Connections whose lent sockets this owner framed pushes into since its last flush.
    to_flush: Vec<Arc<Outbox>>,
    /// The presence limits of each channel's namespace.
    presence_settings: Arc<dyn PresenceSettings>,
    /// Store reads in flight (idempotency windows, consumer offsets) and the commands of
    /// their channels parked behind them.
    loads: loads::Loads,
    /// Commands to run before the mailbox's: those parked behind a load that finished.
    ready: VecDeque<OwnerCommand>,
    /// The mailbox closed while loads were in flight: the owner stops once they are done.
    closed: bool,
}

/// What flows into an owner, and out of it when it is sealed.
pub(crate) struct Mailbox {
    /// Commands, in arrival order.
    pub commands: mpsc::Receiver<OwnerCommand>,
    /// Adoptions: each holds the mailbox until its handed-over state is in the store.
    pub adoptions: mpsc::UnboundedReceiver<oneshot::Receiver<()>>,
    /// Where writes that reach the sealed partition go (cluster mode with peer links).
    pub forward: Option<mpsc::UnboundedSender<Forward>>,
    /// Replication state: the high watermark that releases a leader's batches.
    pub replication: Arc<Replication>,
    /// The presence limits of each channel's namespace (read for every presence change).
    pub presence: Arc<dyn PresenceSettings>,
}

impl Owner {
    /// An owner for `partition`, loaded with the channels the store holds for it.
    pub(crate) fn new(
        partition: PartitionId,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
        idempotency_window: Duration,
        idempotency_budget: Arc<Budget>,
        recovered: Vec<(String, ChannelMeta)>,
        mailbox: Mailbox,
    ) -> Self {
        let Mailbox { commands: rx, adoptions, forward, replication, presence } = mailbox;
        let channels: HashMap<Arc<str>, ChannelState> = recovered
            .into_iter()
            .map(|(name, m)| {
                let name: Arc<str> = name.into();
                (name.clone(), ChannelState::recovered(name, m))
            })
            .collect();
        metrics.partition_channels.with_label_values(&[&partition.to_string()]).set(channels.len() as i64);
        Self {
            partition,
            store,
            metrics,
            idempotency_window,
            channels,
            rx,
            adoptions,
            forward,
            sealed: false,
            idempotency_budget,
            hw: replication.hw_changes(partition),
            replication,
            parked: VecDeque::new(),
            to_flush: Vec::new(),
            presence_settings: presence,
            loads: loads::Loads::new(),
            ready: VecDeque::new(),
            closed: false,
        }
    }

    /// Waits for a handover to land in the store, then serves the partition from it.
    async fn adopt(&mut self, done: oneshot::Receiver<()>) {
        if done.await.is_err() {
            // The handover task died half-way: what the store holds is not a copy to serve
            // under the old epochs. Start over (new epochs).
            tracing::error!(partition = self.partition, "handover abandoned; starting the partition afresh");
            if let Err(e) = self.store.clone().clear_partition(self.partition).await {
                tracing::error!(partition = self.partition, error = %e, "clearing the partition failed");
            }
        }
        self.channels.clear();
        // What waited for a load of the old state runs again against the adopted one.
        let parked = self.loads.take_all();
        self.ready.extend(parked);
        let p = self.partition;
        let read = self.store.read(move |r| r.partition_channels(p, None, usize::MAX)).await;
        let readable = match read.and_then(|read| read) {
            Ok(list) => {
                for (name, m) in list {
                    let name: Arc<str> = name.into();
                    self.channels.insert(name.clone(), ChannelState::recovered(name, m));
                }
                true
            }
            Err(e) => {
                // Served with no channels, the partition would restart every channel at
                // offset 1 over what the store still holds: it stays sealed (writes are
                // handed on or refused) until another adoption reads it.
                tracing::error!(partition = self.partition, error = %e, "reading an adopted partition failed: it stays sealed and stores nothing");
                false
            }
        };
        self.sealed = !readable;
        self.metrics
            .partition_channels
            .with_label_values(&[&self.partition.to_string()])
            .set(self.channels.len() as i64);
        tracing::info!(partition = self.partition, channels = self.channels.len(), "partition adopted");
    }

    /// Runs until every sender is gone and every load is done, finishing the batch in hand.
    pub(crate) async fn run(mut self) {
        let one_publish_per_batch = self.store.policy() == switchyard_store::FsyncPolicy::Always;
        let store = self.store.clone();
        loop {
            // Pushes framed into lent sockets go out before the owner waits again. (Deferring
            // the `send`s to the end of the runtime pass, a cork, halved the fan-out rate:
            // the deferred owners ran only once the worker had nothing else to do.)
            crate::outbox::flush_lent(&mut self.to_flush, &self.metrics);
            if self.closed && self.ready.is_empty() && self.loads.is_idle() {
                break;
            }
            let cmd = match self.ready.pop_front() {
                Some(cmd) => cmd,
                None => tokio::select! {
                    biased;
                    Some(done) = self.adoptions.recv() => {
                        self.fail_parked();
                        self.adopt(done).await;
                        continue;
                    }
                    Ok(()) = self.hw.changed(), if !self.parked.is_empty() => {
                        self.release_parked();
                        continue;
                    }
                    Some(done) = self.loads.done.recv() => {
                        self.loaded(done);
                        continue;
                    }
                    cmd = self.rx.recv(), if !self.closed => match cmd {
                        Some(cmd) => cmd,
                        None => {
                            self.closed = true;
                            continue;
                        }
                    },
                },
            };
            let mut batch = store.batch();
            let mut work = Work::default();
            if self.replication.is_leader(self.partition) {
                work.ops = Some(Vec::new());
            }
            let mut adopt = None;
            self.handle(cmd, &mut batch, &mut work);
            while work.after.len() + work.publishes < MAX_BATCH && !(one_publish_per_batch && work.publishes > 0) {
                if let Ok(done) = self.adoptions.try_recv() {
                    adopt = Some(done);
                    break;
                }
                let next = match self.ready.pop_front() {
                    Some(cmd) => cmd,
                    None if self.closed => break,
                    None => match self.rx.try_recv() {
                        Ok(cmd) => cmd,
                        Err(_) => break,
                    },
                };
                self.handle(next, &mut batch, &mut work);
            }
            self.finish(batch, work).await;
            if let Some(done) = adopt {
                self.fail_parked();
                self.adopt(done).await;
            }
        }
    }
}
