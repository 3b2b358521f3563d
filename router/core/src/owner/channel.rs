//! One partition owner's in-memory state of its channels: [`ChannelState`] (epoch,
//! offsets, counters, subscribers, the idempotency window, cached consumer offsets), how
//! a channel's state is created on first use, and how idle channels shed it again.
//!
//! It owns the lifecycle of that state in memory only: it must never write the store
//! (a new channel reaches the store with its first write, in `batch`), and it reads the
//! store only to fill caches (consumer offsets, an idempotency window after a restart).

use std::collections::HashMap;
use std::sync::Arc;

use switchyard_proto::partition::PartitionId;
use switchyard_proto::protocol::OpError;
use switchyard_store::{ChannelMeta, Store};

use super::batch::Work;
use super::{new_epoch, Owner};
use crate::idempotency::{Budget, Window};
use crate::outbox::Outbox;

/// Most stored messages scanned to rebuild a channel's idempotency window after a restart.
const IDEMPOTENCY_SCAN_MAX: usize = 100_000;

pub(super) struct Subscriber {
    pub(super) sub: u64,
    pub(super) outbox: Arc<Outbox>,
}

pub(super) struct ChannelState {
    pub(super) name: Arc<str>,
    pub(super) epoch: Arc<str>,
    /// Highest offset assigned (acknowledged or in the current batch).
    pub(super) top: u64,
    /// Highest acknowledged offset.
    pub(super) durable: u64,
    pub(super) first: u64,
    pub(super) count: u64,
    pub(super) bytes: u64,
    pub(super) keyed_generation: u64,
    pub(super) subscribers: Vec<Subscriber>,
    pub(super) idempotency: Option<Window>,
    pub(super) consumers: HashMap<String, u64>,
    /// Who is subscribed, cluster-wide (None while nobody is): memory only.
    pub(super) presence: Option<Box<super::presence::Presence>>,
    /// Metadata must be written with the current batch.
    pub(super) dirty: bool,
    /// Used since the last maintenance snapshot; an idle channel sheds its caches.
    pub(super) touched: bool,
}

impl ChannelState {
    pub(super) fn recovered(name: Arc<str>, m: ChannelMeta) -> Self {
        Self {
            name,
            epoch: m.epoch.into(),
            top: m.top,
            durable: m.top,
            first: m.first,
            count: m.count,
            bytes: m.bytes,
            keyed_generation: 1,
            subscribers: Vec::new(),
            idempotency: None,
            consumers: HashMap::new(),
            presence: None,
            dirty: false,
            touched: false,
        }
    }

    pub(super) fn meta(&self) -> ChannelMeta {
        ChannelMeta {
            epoch: self.epoch.to_string(),
            top: self.top,
            first: self.first,
            count: self.count,
            bytes: self.bytes,
        }
    }
}

impl Owner {
    pub(super) fn channel(&mut self, name: &str, work: &mut Work) -> &mut ChannelState {
        self.channel_in(name, None, work)
    }

    /// The state of `name`, created in memory (with `epoch`, or a new one) if it has none.
    /// Creating it persists nothing: a channel reaches the store with its first write, so
    /// reads and subscriptions of channels that never see a message cost no disk.
    pub(super) fn channel_in(&mut self, name: &str, epoch: Option<Arc<str>>, work: &mut Work) -> &mut ChannelState {
        if !self.channels.contains_key(name) {
            let name: Arc<str> = name.into();
            let state = ChannelState {
                name: name.clone(),
                epoch: epoch.unwrap_or_else(|| new_epoch().into()),
                top: 0,
                durable: 0,
                first: 1,
                count: 0,
                bytes: 0,
                keyed_generation: 0,
                subscribers: Vec::new(),
                idempotency: Some(Window::new(self.idempotency_budget.clone())),
                consumers: HashMap::new(),
                presence: None,
                dirty: false,
                touched: true,
            };
            self.channels.insert(name.clone(), state);
            self.metrics.partition_channels.with_label_values(&[&self.partition.to_string()]).inc();
            // Created in this batch: a failed write removes it again. Its metadata is written
            // with the first message, unsynced until that batch syncs: if it is lost in a
            // crash, the channel comes back under a new epoch, which is exactly what an
            // epoch means.
            work.undo.push((name.clone(), None));
            return self.channels.get_mut(&name).expect("just inserted");
        }
        let ch = self.channels.get_mut(name).expect("checked above");
        ch.touched = true;
        if !ch.dirty {
            work.undo.push((ch.name.clone(), Some(ch.meta())));
        }
        ch
    }

    pub(super) fn consumer_offset(&mut self, channel: &str, consumer: &str, work: &mut Work) -> Result<u64, OpError> {
        let partition = self.partition;
        let store = self.store.clone();
        let ch = self.channel(channel, work);
        if let Some(&o) = ch.consumers.get(consumer) {
            return Ok(o);
        }
        let o = store
            .consumer_offset(partition, channel, consumer)
            .map_err(|e| OpError::internal(e.to_string()))?
            .unwrap_or(0);
        ch.consumers.insert(consumer.to_string(), o);
        Ok(o)
    }

    /// Forgets a channel that holds nothing worth keeping in memory: never written (no
    /// message, no committed consumer), nobody subscribed and nobody present.
    pub(super) fn evict_if_idle(&mut self, channel: &str) {
        let idle = self.channels.get(channel).is_some_and(|ch| {
            ch.top == 0
                && !ch.dirty
                && ch.subscribers.is_empty()
                && ch.presence.is_none()
                && ch.consumers.values().all(|o| *o == 0)
        });
        if idle {
            self.channels.remove(channel);
            self.metrics.partition_channels.with_label_values(&[&self.partition.to_string()]).dec();
        }
    }

    /// Once per maintenance snapshot: a channel nobody used since the previous one, with no
    /// subscriber and nothing in flight, sheds what it caches. Never written, it goes
    /// altogether (a consumer lookup or a read left it); written, it keeps only its
    /// counters (which retention needs) and drops its consumer cache and an idempotency
    /// window that expiry emptied, both of which are read back from the store on demand.
    pub(super) fn shed_idle(&mut self) {
        let before = self.channels.len();
        self.channels.retain(|_, ch| {
            if std::mem::take(&mut ch.touched)
                || !ch.subscribers.is_empty()
                || ch.presence.is_some()
                || ch.dirty
                || ch.durable != ch.top
            {
                return true;
            }
            if ch.top == 0 && ch.consumers.values().all(|o| *o == 0) {
                return false;
            }
            ch.consumers = HashMap::new();
            if ch.idempotency.as_ref().is_some_and(Window::is_empty) {
                ch.idempotency = None;
            }
            ch.subscribers = Vec::new();
            true
        });
        if self.channels.len() != before {
            self.metrics
                .partition_channels
                .with_label_values(&[&self.partition.to_string()])
                .set(self.channels.len() as i64);
        }
    }
}

pub(super) fn load_idempotency(
    store: &Store,
    budget: Arc<Budget>,
    partition: PartitionId,
    channel: &str,
    top: u64,
    cutoff_ms: u64,
) -> Window {
    let mut window = Window::new(budget);
    match store.recent_idempotency_keys(partition, channel, top, cutoff_ms, IDEMPOTENCY_SCAN_MAX) {
        Ok(keys) => {
            for (offset, ts, key) in keys.into_iter().rev() {
                window.insert(&key, offset, ts);
            }
        }
        Err(e) => tracing::warn!(channel, error = %e, "could not rebuild idempotency window"),
    }
    window
}
