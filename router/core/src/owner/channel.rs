//! One partition owner's in-memory state of its channels: [`ChannelState`] (epoch,
//! offsets, counters, subscribers, the idempotency window, cached consumer offsets), how
//! a channel's state is created on first use, and how idle channels shed it again.
//!
//! It owns the lifecycle of that state in memory only: it must never write the store
//! (a new channel reaches the store with its first write, in `batch`), and never read it
//! either: caches (consumer offsets, an idempotency window after a restart) are filled by
//! loads on the store's read pool (`loads`), which [`Owner::gate`] starts and
//! [`Owner::loaded`] applies.

use std::collections::HashMap;
use std::sync::Arc;

use switchyard_proto::protocol::OpError;
use switchyard_store::ChannelMeta;

use super::batch::Work;
use super::loads::{Loaded, Need};
use super::{new_epoch, now_ms, Owner, OwnerCommand, Start};
use crate::idempotency::Window;
use crate::outbox::Outbox;

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

    /// A consumer's committed offset from the cache, which [`Owner::gate`] filled before
    /// the command that asks could run.
    pub(super) fn consumer_offset(&mut self, channel: &str, consumer: &str, work: &mut Work) -> Result<u64, OpError> {
        let ch = self.channel(channel, work);
        ch.consumers.get(consumer).copied().ok_or_else(|| OpError::internal("consumer offset not loaded"))
    }

    /// What `cmd` needs read from the store before it can run, if anything: the window of
    /// a recovered channel for a keyed publish, or an uncached consumer offset.
    fn need(&self, cmd: &OwnerCommand) -> Option<Need> {
        let ch = self.channels.get(cmd.channel()?);
        let consumer = |name: &String| {
            (!ch.is_some_and(|ch| ch.consumers.contains_key(name))).then(|| Need::Consumer(name.clone()))
        };
        match cmd {
            OwnerCommand::Publish(req, _) if req.idempotency_key.is_some() => {
                let ch = ch.filter(|ch| ch.idempotency.is_none())?;
                let cutoff_ms = now_ms().saturating_sub(self.idempotency_window.as_millis() as u64);
                Some(Need::Idempotency { top: ch.top, cutoff_ms })
            }
            OwnerCommand::Commit { consumer: name, .. } => consumer(name),
            OwnerCommand::Info { consumer: Some(name), .. } => consumer(name),
            OwnerCommand::Subscribe { start: Start::Consumer(name), .. } => consumer(name),
            _ => None,
        }
    }

    /// Lets `cmd` through, or parks it: behind a load of its channel already in flight, or
    /// behind one it starts now because it needs the store. Never waits.
    pub(super) fn gate(&mut self, cmd: OwnerCommand) -> Option<OwnerCommand> {
        let Some(channel) = cmd.channel() else { return Some(cmd) };
        if self.loads.is_loading(channel) {
            let channel = channel.to_string();
            self.loads.park(&channel, cmd);
            return None;
        }
        let Some(need) = self.need(&cmd) else { return Some(cmd) };
        let channel: Arc<str> = channel.into();
        self.metrics.store_loads.inc();
        let budget = self.idempotency_budget.clone();
        self.loads.start(&self.store, (self.partition, channel), need, budget, cmd);
        None
    }

    /// Applies a finished load and queues the commands parked behind it to run next, in
    /// their order; a stale load (its channel was sealed or adopted since) is dropped.
    pub(super) fn loaded(&mut self, done: super::loads::Done) {
        let Some((channel, loaded, parked)) = self.loads.finish(done) else { return };
        // A channel with no state here (never written) gets it, as its command would have
        // created it.
        let ch = self.channel(&channel, &mut Work::default());
        match loaded {
            Loaded::Idempotency(Ok(window)) => {
                if ch.idempotency.is_none() {
                    ch.idempotency = Some(window);
                }
            }
            Loaded::Consumer(name, Ok(offset)) => {
                ch.consumers.entry(name).or_insert(offset);
            }
            // The store logged the failed read and flagged the damage; the parked commands
            // get `unavailable` (the next one tries the read again).
            Loaded::Idempotency(Err(err)) | Loaded::Consumer(_, Err(err)) => {
                let mut ready = std::collections::VecDeque::new();
                for cmd in parked {
                    if let Some(cmd) = refuse(cmd, &err) {
                        ready.push_back(cmd);
                    }
                }
                self.ready.extend(ready);
                return;
            }
        }
        self.ready.extend(parked);
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
        let loads = &self.loads;
        let loading = |name: &str| loads.is_loading(name);
        self.channels.retain(|_, ch| {
            if std::mem::take(&mut ch.touched)
                || loading(&ch.name)
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

/// Answers `cmd` with `err` when it waits for an answer; a command that must run anyway
/// (an unsubscribe: memory only) is handed back.
fn refuse(cmd: OwnerCommand, err: &OpError) -> Option<OwnerCommand> {
    match cmd {
        OwnerCommand::Publish(_, reply) => drop(reply.send(Err(err.clone()))),
        OwnerCommand::Commit { reply, .. } => drop(reply.send(Err(err.clone()))),
        OwnerCommand::Subscribe { reply, .. } => drop(reply.send(Err(err.clone()))),
        OwnerCommand::Info { reply, .. } => drop(reply.send(Err(err.clone()))),
        OwnerCommand::Trim { reply, .. } => drop(reply.send(())),
        // Dropping the reply tells the reader the owner could not answer.
        OwnerCommand::View(..) | OwnerCommand::Snapshot(_) => {}
        cmd @ (OwnerCommand::Unsubscribe { .. } | OwnerCommand::Seal(..) | OwnerCommand::Presence(_)) => {
            return Some(cmd)
        }
    }
    None
}
