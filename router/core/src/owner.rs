//! The owner of one partition: a single task that assigns offsets, appends to the store,
//! fans messages out and answers every question about its channels.
//!
//! It owns the in-memory state of its channels (epoch, offsets, subscribers, the idempotency
//! window, committed consumer offsets) and is its only writer, so no lock guards it. Commands
//! that arrive together form one batch: one store commit and one (group) fsync, after which
//! publishes are acknowledged and fanned out, and only then are reads answered, so a client
//! always reads its own acknowledged writes. It must never wait on anything but the store
//! (and, once per partition move, on the handover that fills the store before it serves),
//! and never on a subscriber: fan-out uses the non-blocking [`Outbox`], and the sockets
//! idle sessions lend it are written with non-blocking `send`s only (the direct path).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::value::RawValue;
use switchyard_proto::Text;
use switchyard_sdk::ChannelStats;
use tokio::sync::{mpsc, oneshot, watch};

use crate::idempotency::{Budget, Window};
use crate::outbox::{Delivery, Outbox, Pushed};
use crate::replication::{ReplOp, Replication};
use switchyard_metrics::Metrics;
use switchyard_proto::partition::PartitionId;
use switchyard_proto::protocol::{self, MessageView, OpError, PublishOk, StartFrom};
use switchyard_store::{ChannelMeta, Store, StoredMessage};

/// Most commands folded into one batch.
const MAX_BATCH: usize = 1024;
/// Most stored messages scanned to rebuild a channel's idempotency window after a restart.
const IDEMPOTENCY_SCAN_MAX: usize = 100_000;

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

/// A message to store, from a client or the HTTP API.
#[derive(Debug)]
pub struct PublishRequest {
    /// Channel.
    pub channel: String,
    /// Raw JSON payload.
    pub data: Box<RawValue>,
    /// Compaction key.
    pub key: Option<String>,
    /// Deduplication key.
    pub idempotency_key: Option<String>,
    /// Publisher's user id, when authenticated.
    pub from: Option<String>,
}

/// Where a new subscription starts.
#[derive(Debug, Clone)]
pub enum Start {
    /// A `from` form.
    From(StartFrom),
    /// After a durable consumer's committed offset.
    Consumer(String),
    /// `latest` as the owner saw it on arrival: the top then (set by the owner itself, so
    /// publishes that follow the subscribe in the same batch are delivered).
    LatestAt(u64),
}

/// The owner's answer to a subscribe.
#[derive(Debug, Clone)]
pub struct Grant {
    /// Channel epoch.
    pub epoch: Arc<str>,
    /// The reply's `offset`: the channel top, or for `latest` the top when it arrived
    /// (the subscriber's stream starts right after it).
    pub offset: u64,
    /// Channel top at the moment the subscriber was registered: catch-up ends here.
    pub top: u64,
    /// For recovery requests: whether the stream continues exactly.
    pub recovered: Option<bool>,
    /// Retained messages with `after < offset <= top` to push before live ones, if any.
    pub catch_up_after: Option<u64>,
    /// Live messages are pushed only above this offset (`top`, or a `from` above it).
    pub live_after: u64,
}

/// What a gateway on another node needs to grant a local subscription to a channel.
#[derive(Debug, Clone)]
pub struct Facts {
    /// Channel epoch.
    pub epoch: Arc<str>,
    /// Acknowledged top.
    pub top: u64,
    /// First retained offset.
    pub first: u64,
    /// The consumer's committed offset (0 if none), when asked for.
    pub committed: Option<u64>,
}

/// A write that reached a sealed partition, handed on with its reply to be forwarded to
/// the partition's new owner.
pub enum Forward {
    /// A publish.
    Publish(PublishRequest, oneshot::Sender<Result<PublishOk, OpError>>),
    /// A commit.
    Commit {
        /// Channel.
        channel: String,
        /// Consumer name.
        consumer: String,
        /// Offset.
        offset: u64,
        /// Answer.
        reply: oneshot::Sender<Result<(), OpError>>,
    },
}

/// The message of errors for writes that reach a sealed partition: it moved, nothing was
/// stored, and a retry (routed by the new map) is safe.
pub const SEALED: &str = "partition sealed: it moved to another node; retry";

/// Grants a subscription to a channel with `epoch`, acknowledged `top` and `first`
/// retained offset. `committed` is the consumer's offset (for [`Start::Consumer`]).
/// `known_top` may exceed `top` on a gateway whose upstream lags the owner: a recovery
/// position up to it is still exact, and the stream resumes after it.
pub fn grant_from(epoch: Arc<str>, top: u64, first: u64, committed: u64, start: &Start, known_top: u64) -> Grant {
    let floor = first.saturating_sub(1);
    let mut grant = Grant { offset: top, top, recovered: None, catch_up_after: None, live_after: top, epoch };
    // `after`: retained messages above it are pushed before live ones.
    let after = match start {
        Start::Consumer(_) => {
            // A gateway's `top` may lag the owner's: never repeat what was committed.
            grant.live_after = top.max(committed);
            Some(committed.max(floor))
        }
        Start::From(StartFrom::Latest) => None,
        Start::LatestAt(at) => {
            grant.offset = *at;
            Some((*at).max(floor))
        }
        Start::From(StartFrom::Earliest) => Some(floor),
        Start::From(StartFrom::After(n)) => {
            grant.live_after = top.max(*n);
            Some((*n).max(floor))
        }
        Start::From(StartFrom::Recover { offset, epoch }) => {
            let exact = epoch.as_str() == &*grant.epoch && *offset >= floor && *offset <= top.max(known_top);
            grant.recovered = Some(exact);
            if exact {
                grant.live_after = top.max(*offset);
            }
            exact.then_some(*offset)
        }
    };
    grant.catch_up_after = after.filter(|a| *a < top);
    grant
}

/// A consistent view of a channel's acknowledged log.
#[derive(Debug, Clone)]
pub struct ChannelView {
    /// Channel epoch.
    pub epoch: Arc<str>,
    /// Highest acknowledged offset.
    pub top: u64,
    /// First retained offset.
    pub first: u64,
}

/// One channel's counters, for the maintenance task.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Channel name.
    pub channel: Arc<str>,
    /// Counters (last_offset = acknowledged top).
    pub stats: ChannelStats,
    /// Bumped by every keyed publish, so compaction runs only when something changed.
    pub keyed_generation: u64,
    /// Live subscriptions (load reports).
    pub subscribers: u64,
}

/// Which background policy removed messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrimReason {
    /// Retention.
    Retention,
    /// Compaction.
    Compaction,
}

/// A command for a partition owner.
pub enum OwnerCommand {
    /// Store and fan out a message.
    Publish(PublishRequest, oneshot::Sender<Result<PublishOk, OpError>>),
    /// Register a subscriber.
    Subscribe {
        /// Channel.
        channel: String,
        /// Globally unique subscription id.
        sub: u64,
        /// The connection's queue.
        outbox: Arc<Outbox>,
        /// Start position.
        start: Start,
        /// Answer.
        reply: oneshot::Sender<Result<Grant, OpError>>,
    },
    /// Forget a subscriber.
    Unsubscribe {
        /// Channel.
        channel: String,
        /// Subscription id.
        sub: u64,
    },
    /// Epoch and acknowledged top of a channel (for history).
    View(String, oneshot::Sender<ChannelView>),
    /// Store a consumer's offset.
    Commit {
        /// Channel.
        channel: String,
        /// Consumer name.
        consumer: String,
        /// Offset.
        offset: u64,
        /// Answer.
        reply: oneshot::Sender<Result<(), OpError>>,
    },
    /// Counters of every channel (maintenance).
    Snapshot(oneshot::Sender<Vec<Snapshot>>),
    /// The partition moved to another node: end every subscription with an `unsubscribed`
    /// push (code 4100, `reason`) so clients go to the new owner, forget the in-memory
    /// state and refuse every later write with [`SEALED`]. Answered once done (idempotent).
    Seal(String, Option<oneshot::Sender<()>>),
    /// Channel facts for a gateway's local grant.
    Info {
        /// Channel.
        channel: String,
        /// Durable consumer name.
        consumer: Option<String>,
        /// Answer.
        reply: oneshot::Sender<Result<Facts, OpError>>,
    },
    /// Remove messages (maintenance).
    Trim {
        /// Channel.
        channel: Arc<str>,
        /// New lowest offset, if retention moved it.
        first: Option<u64>,
        /// Messages to remove with their stored sizes.
        drops: Vec<(u64, u32)>,
        /// Why.
        reason: TrimReason,
        /// Answered once applied.
        reply: oneshot::Sender<()>,
    },
}

struct Subscriber {
    sub: u64,
    outbox: Arc<Outbox>,
}

struct ChannelState {
    name: Arc<str>,
    epoch: Arc<str>,
    /// Highest offset assigned (acknowledged or in the current batch).
    top: u64,
    /// Highest acknowledged offset.
    durable: u64,
    first: u64,
    count: u64,
    bytes: u64,
    keyed_generation: u64,
    subscribers: Vec<Subscriber>,
    idempotency: Option<Window>,
    consumers: HashMap<String, u64>,
    /// Metadata must be written with the current batch.
    dirty: bool,
    /// Used since the last maintenance snapshot; an idle channel sheds its caches.
    touched: bool,
}

impl ChannelState {
    fn recovered(name: Arc<str>, m: ChannelMeta) -> Self {
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
            dirty: false,
            touched: false,
        }
    }

    fn meta(&self) -> ChannelMeta {
        ChannelMeta {
            epoch: self.epoch.to_string(),
            top: self.top,
            first: self.first,
            count: self.count,
            bytes: self.bytes,
        }
    }
}

/// A reply channel and the answer it gets once the batch is durable.
type Ack<T> = (oneshot::Sender<Result<T, OpError>>, Result<T, OpError>);

/// What a batch must do once it is durable.
#[derive(Default)]
struct Work {
    acks: Vec<Ack<PublishOk>>,
    commit_acks: Vec<Ack<()>>,
    fanout: Vec<(Arc<str>, u64, Text)>,
    /// Reads answered after the batch, so they see its writes.
    after: Vec<OwnerCommand>,
    publishes: usize,
    needs_sync: bool,
    /// Pre-batch state of channels touched (None: created by this batch), for rollback if
    /// the store fails.
    undo: Vec<(Arc<str>, Option<ChannelMeta>)>,
    /// Channels whose metadata this batch rewrites.
    dirty: Vec<Arc<str>>,
    /// The batch's writes, for followers (when the partition is replicated).
    ops: Option<Vec<ReplOp>>,
    /// Each rewritten channel's top after this batch: acknowledged once it is released.
    tops: Vec<(Arc<str>, u64)>,
}

/// Records that `ch`'s metadata must be written with the current batch.
fn mark_dirty(ch: &mut ChannelState, work: &mut Work) {
    if !ch.dirty {
        ch.dirty = true;
        work.dirty.push(ch.name.clone());
    }
}

/// The owner task of one partition.
pub struct Owner {
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
}

/// What flows into an owner, and out of it when it is sealed.
pub struct Mailbox {
    /// Commands, in arrival order.
    pub commands: mpsc::Receiver<OwnerCommand>,
    /// Adoptions: each holds the mailbox until its handed-over state is in the store.
    pub adoptions: mpsc::UnboundedReceiver<oneshot::Receiver<()>>,
    /// Where writes that reach the sealed partition go (cluster mode with peer links).
    pub forward: Option<mpsc::UnboundedSender<Forward>>,
    /// Replication state: the high watermark that releases a leader's batches.
    pub replication: Arc<Replication>,
}

impl Owner {
    /// An owner for `partition`, loaded with the channels the store holds for it.
    pub fn new(
        partition: PartitionId,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
        idempotency_window: Duration,
        idempotency_budget: Arc<Budget>,
        recovered: Vec<(String, ChannelMeta)>,
        mailbox: Mailbox,
    ) -> Self {
        let Mailbox { commands: rx, adoptions, forward, replication } = mailbox;
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
        match self.store.partition_channels(self.partition, None, usize::MAX) {
            Ok(list) => {
                for (name, m) in list {
                    let name: Arc<str> = name.into();
                    self.channels.insert(name.clone(), ChannelState::recovered(name, m));
                }
            }
            Err(e) => tracing::error!(partition = self.partition, error = %e, "reading an adopted partition failed"),
        }
        self.sealed = false;
        self.metrics
            .partition_channels
            .with_label_values(&[&self.partition.to_string()])
            .set(self.channels.len() as i64);
        tracing::info!(partition = self.partition, channels = self.channels.len(), "partition adopted");
    }

    /// Runs until every sender is gone, finishing the batch in hand.
    pub async fn run(mut self) {
        let one_publish_per_batch = self.store.policy() == switchyard_store::FsyncPolicy::Always;
        let store = self.store.clone();
        loop {
            // Pushes framed into lent sockets go out before the owner waits again. (Deferring
            // the `send`s to the end of the runtime pass, a cork, halved the fan-out rate:
            // the deferred owners ran only once the worker had nothing else to do.)
            crate::outbox::flush_lent(&mut self.to_flush, &self.metrics);
            let cmd = tokio::select! {
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
                cmd = self.rx.recv() => match cmd {
                    Some(cmd) => cmd,
                    None => break,
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
                match self.rx.try_recv() {
                    Ok(cmd) => self.handle(cmd, &mut batch, &mut work),
                    Err(_) => break,
                }
            }
            self.finish(batch, work).await;
            if let Some(done) = adopt {
                self.fail_parked();
                self.adopt(done).await;
            }
        }
    }

    fn channel(&mut self, name: &str, work: &mut Work) -> &mut ChannelState {
        self.channel_in(name, None, work)
    }

    /// The state of `name`, created in memory (with `epoch`, or a new one) if it has none.
    /// Creating it persists nothing: a channel reaches the store with its first write, so
    /// reads and subscriptions of channels that never see a message cost no disk.
    fn channel_in(&mut self, name: &str, epoch: Option<Arc<str>>, work: &mut Work) -> &mut ChannelState {
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

    fn handle(&mut self, cmd: OwnerCommand, batch: &mut switchyard_store::Batch<'_>, work: &mut Work) {
        // A seal always ends the subscriptions, even once the partition is followed here.
        if !self.sealed && matches!(cmd, OwnerCommand::Seal(..)) {
            return work.after.push(cmd);
        }
        // A follower's copy is written by replication only, and a node that is no replica
        // of a replicated partition (a deposed leader before its seal) writes nothing.
        if self.sealed || self.replication.written_elsewhere(self.partition) {
            return self.refuse_sealed(cmd, work);
        }
        match cmd {
            OwnerCommand::Publish(req, reply) => {
                let result = self.publish(req, batch, work);
                work.acks.push((reply, result));
            }
            OwnerCommand::Commit { channel, consumer, offset, reply } => {
                let result = self.commit(&channel, consumer, offset, batch, work);
                work.commit_acks.push((reply, result));
            }
            OwnerCommand::Trim { channel, first, drops, reason, reply } => {
                self.trim(&channel, first, &drops, reason, batch, work);
                let _ = reply.send(());
            }
            OwnerCommand::Subscribe { channel, sub, outbox, start, reply } => {
                // A client that saw this channel empty (offset 0) under some epoch finds it
                // still empty under that epoch, even though nothing was stored for it.
                let seen = match &start {
                    Start::From(StartFrom::Recover { offset: 0, epoch }) if is_epoch_like(epoch) => {
                        Some(Arc::from(epoch.as_str()))
                    }
                    _ => None,
                };
                let ch = self.channel_in(&channel, seen, work);
                // Answered after the batch, but "latest" means latest when it arrived:
                // publishes later in this batch belong to the subscriber.
                let start = match start {
                    Start::From(StartFrom::Latest) => Start::LatestAt(ch.top),
                    other => other,
                };
                work.after.push(OwnerCommand::Subscribe { channel, sub, outbox, start, reply });
            }
            // A read of a channel with no state creates none (see `answer`).
            OwnerCommand::View(..) => work.after.push(cmd),
            OwnerCommand::Info { ref channel, .. } => {
                let channel = channel.clone();
                self.channel(&channel, work);
                work.after.push(cmd);
            }
            other => work.after.push(other),
        }
    }

    /// A sealed partition stores nothing: writes are handed on to be forwarded to the new
    /// owner (or get [`SEALED`]), registrations get [`SEALED`].
    fn refuse_sealed(&mut self, cmd: OwnerCommand, work: &mut Work) {
        let sealed = || OpError::refused(switchyard_proto::refusal::Refusal::Sealed, SEALED);
        match cmd {
            OwnerCommand::Publish(req, reply) => match &self.forward {
                Some(fwd) => {
                    if let Err(mpsc::error::SendError(Forward::Publish(_, reply))) =
                        fwd.send(Forward::Publish(req, reply))
                    {
                        let _ = reply.send(Err(sealed()));
                    }
                }
                None => work.acks.push((reply, Err(sealed()))),
            },
            OwnerCommand::Commit { channel, consumer, offset, reply } => match &self.forward {
                Some(fwd) => {
                    if let Err(mpsc::error::SendError(Forward::Commit { reply, .. })) =
                        fwd.send(Forward::Commit { channel, consumer, offset, reply })
                    {
                        let _ = reply.send(Err(sealed()));
                    }
                }
                None => work.commit_acks.push((reply, Err(sealed()))),
            },
            OwnerCommand::Subscribe { reply, .. } => {
                let _ = reply.send(Err(sealed()));
            }
            OwnerCommand::Info { reply, .. } => {
                let _ = reply.send(Err(sealed()));
            }
            OwnerCommand::Trim { reply, .. } => {
                let _ = reply.send(());
            }
            // Dropping the reply tells the reader the owner is gone.
            OwnerCommand::View(..) => {}
            OwnerCommand::Snapshot(reply) => {
                let _ = reply.send(Vec::new());
            }
            OwnerCommand::Seal(_, reply) => {
                if let Some(r) = reply {
                    let _ = r.send(());
                }
            }
            OwnerCommand::Unsubscribe { .. } => {}
        }
    }

    fn publish(
        &mut self,
        req: PublishRequest,
        batch: &mut switchyard_store::Batch<'_>,
        work: &mut Work,
    ) -> Result<PublishOk, OpError> {
        let now = now_ms();
        let window_ms = self.idempotency_window.as_millis() as u64;
        let partition = self.partition;
        let store = self.store.clone();
        let metrics = self.metrics.clone();
        let budget = self.idempotency_budget.clone();
        let ch = self.channel(&req.channel, work);
        if let Some(key) = &req.idempotency_key {
            let window = match &mut ch.idempotency {
                Some(w) => w,
                slot => slot.insert(load_idempotency(
                    &store,
                    budget,
                    partition,
                    &ch.name,
                    ch.top,
                    now.saturating_sub(window_ms),
                )),
            };
            window.expire(now.saturating_sub(window_ms));
            if let Some(offset) = window.get(key) {
                metrics.publish_duplicates.inc();
                return Ok(PublishOk { offset, epoch: ch.epoch.clone() });
            }
        }
        let msg = StoredMessage {
            ts: now,
            key: req.key,
            from: req.from,
            idem: req.idempotency_key,
            data: req.data.get().to_owned(),
        };
        let offset = ch.top + 1;
        let size = batch.put_message(partition, &ch.name, offset, &msg);
        if let Some(ops) = &mut work.ops {
            ops.push(ReplOp::Message(ch.name.to_string(), offset, msg.clone()));
        }
        ch.top = offset;
        ch.count += 1;
        ch.bytes += size as u64;
        mark_dirty(ch, work);
        if msg.key.is_some() {
            ch.keyed_generation += 1;
        }
        if let (Some(key), Some(window)) = (&msg.idem, &mut ch.idempotency) {
            if !window.insert(key, offset, now) {
                // The node's key budget is spent: this key will not deduplicate a retry.
                metrics.idempotency_unremembered.inc();
            }
        }
        let view = MessageView {
            push: Some("message"),
            channel: &ch.name,
            offset,
            epoch: &ch.epoch,
            ts: now,
            key: msg.key.as_deref(),
            from: msg.from.as_deref(),
            data: &req.data,
        };
        let frame = protocol::to_frame(&view);
        work.fanout.push((ch.name.clone(), offset, frame));
        work.publishes += 1;
        work.needs_sync = true;
        metrics.bytes_published.inc_by(msg.data.len() as u64);
        Ok(PublishOk { offset, epoch: ch.epoch.clone() })
    }

    fn commit(
        &mut self,
        channel: &str,
        consumer: String,
        offset: u64,
        batch: &mut switchyard_store::Batch<'_>,
        work: &mut Work,
    ) -> Result<(), OpError> {
        let partition = self.partition;
        let stored = self.consumer_offset(channel, &consumer, work)?;
        let ch = self.channel(channel, work);
        if offset > ch.top {
            return Err(OpError::bad_request(format!("offset {offset} is beyond the channel top {}", ch.top)));
        }
        if offset > stored {
            batch.put_consumer(partition, channel, &consumer, offset);
            if let Some(ops) = &mut work.ops {
                ops.push(ReplOp::Consumer(channel.to_string(), consumer.clone(), offset));
            }
            ch.consumers.insert(consumer, offset);
            work.needs_sync = true;
        }
        Ok(())
    }

    fn consumer_offset(&mut self, channel: &str, consumer: &str, work: &mut Work) -> Result<u64, OpError> {
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

    fn trim(
        &mut self,
        channel: &str,
        first: Option<u64>,
        drops: &[(u64, u32)],
        reason: TrimReason,
        batch: &mut switchyard_store::Batch<'_>,
        work: &mut Work,
    ) {
        let partition = self.partition;
        let Some(ch) = self.channels.get_mut(channel) else { return };
        if !ch.dirty {
            work.undo.push((ch.name.clone(), Some(ch.meta())));
        }
        let mut removed = 0;
        for &(offset, size) in drops {
            if offset >= ch.first && offset <= ch.durable {
                batch.remove_message(partition, channel, offset);
                if let Some(ops) = &mut work.ops {
                    ops.push(ReplOp::Remove(channel.to_string(), offset));
                }
                ch.count = ch.count.saturating_sub(1);
                ch.bytes = ch.bytes.saturating_sub(size as u64);
                removed += 1;
            }
        }
        if let Some(f) = first {
            ch.first = ch.first.max(f.min(ch.durable + 1));
        }
        mark_dirty(ch, work);
        match reason {
            TrimReason::Retention => self.metrics.retention_removed.inc_by(removed),
            TrimReason::Compaction => self.metrics.compaction_removed.inc_by(removed),
        }
    }

    async fn finish(&mut self, mut batch: switchyard_store::Batch<'_>, mut work: Work) {
        for name in &work.dirty {
            if let Some(ch) = self.channels.get(name) {
                let meta = ch.meta();
                batch.put_meta(self.partition, name, &meta);
                if let Some(ops) = &mut work.ops {
                    ops.push(ReplOp::Meta(name.to_string(), meta));
                }
            }
        }
        // A replicated batch is stamped with its seq and written with this replica's log
        // position, under the apply lock: no follower apply, truncation or snapshot of the
        // partition interleaves, and a node no longer leading never writes.
        let repl = self.replication.clone();
        let mut applying = None;
        let mut stamped = None;
        if let Some(ops) = work.ops.as_ref().filter(|ops| !ops.is_empty()) {
            applying = Some(repl.part(self.partition).apply_lock.lock().await);
            let (store, p) = (self.store.clone(), self.partition);
            if let Some((seq, epoch, meta)) = repl.stamp(p, || store.repl_meta(p).ok().flatten()) {
                batch.put_repl_batch(p, seq, &crate::replication::touched(ops), &meta);
                stamped = Some((seq, epoch));
            }
        }
        let stored = match (&work.ops, stamped) {
            (Some(ops), None) if !ops.is_empty() => Err(OpError::new(
                switchyard_proto::protocol::ErrorCode::Unavailable,
                "partition leadership changed before the write; retry",
            )),
            _ if batch.is_empty() => Ok(()),
            _ => batch.write(work.needs_sync).await.map_err(|e| {
                tracing::error!(partition = self.partition, error = %e, "store write failed; batch rejected");
                OpError::internal("store write failed")
            }),
        };
        if let Err(err) = stored {
            self.rollback(&work.undo);
            for (reply, _) in work.acks.drain(..) {
                let _ = reply.send(Err(err.clone()));
            }
            for (reply, _) in work.commit_acks.drain(..) {
                let _ = reply.send(Err(err.clone()));
            }
            work.fanout.clear();
            work.ops = None;
        }
        for name in &work.dirty {
            if let Some(ch) = self.channels.get_mut(name) {
                ch.dirty = false;
                work.tops.push((name.clone(), ch.top));
            }
        }
        match (work.ops.take(), stamped) {
            // Replicated: acknowledged, fanned out and read only once the ISR has it.
            (Some(ops), Some((stamped, epoch))) if !ops.is_empty() => {
                let data = bytes::Bytes::from(postcard::to_stdvec(&ops).expect("ops encode"));
                let seq = repl.append(self.partition, data);
                drop(applying);
                debug_assert_eq!(seq, stamped, "only the owner appends, under the apply lock");
                self.parked.push_back((seq, epoch, work));
                self.release_parked();
            }
            // Nothing written: answered in order behind any parked batch.
            _ if !self.parked.is_empty() => {
                let seq = self.parked.back().map_or(0, |p| p.0);
                let epoch = self.parked.back().map_or(0, |p| p.1);
                self.parked.push_back((seq, epoch, work));
                self.release_parked();
            }
            _ => self.release(work),
        }
    }

    /// Releases the parked batches the high watermark passed, in order; fails them all if
    /// the leadership they were written under ended.
    fn release_parked(&mut self) {
        let hw = *self.hw.borrow_and_update();
        let epoch = self.replication.leader_epoch(self.partition);
        while let Some((seq, e, _)) = self.parked.front() {
            if epoch != Some(*e) {
                return self.fail_parked();
            }
            if *seq >= hw {
                return;
            }
            let (_, _, work) = self.parked.pop_front().expect("front exists");
            self.release(work);
        }
    }

    /// The leadership ended before the ISR had these batches: their writers get
    /// `unavailable` (a retry with the same idempotency key is safe), and seals and
    /// unsubscribes among their reads still run.
    fn fail_parked(&mut self) {
        let err = OpError::new(
            switchyard_proto::protocol::ErrorCode::Unavailable,
            "partition leadership changed before the write was replicated; retry",
        );
        while let Some((_, _, work)) = self.parked.pop_front() {
            for (reply, _) in work.acks {
                let _ = reply.send(Err(err.clone()));
            }
            for (reply, _) in work.commit_acks {
                let _ = reply.send(Err(err.clone()));
            }
            for cmd in work.after {
                if matches!(cmd, OwnerCommand::Seal(..) | OwnerCommand::Unsubscribe { .. }) {
                    self.answer(cmd);
                }
            }
        }
    }

    /// Acknowledges, fans out and answers the reads of a batch that is durable (and, when
    /// replicated, in the ISR).
    fn release(&mut self, work: Work) {
        for (name, top) in &work.tops {
            if let Some(ch) = self.channels.get_mut(name) {
                ch.durable = ch.durable.max(*top).min(ch.top);
            }
        }
        self.fan_out(&work.fanout);
        self.metrics.messages_published.inc_by(work.fanout.len() as u64);
        for (reply, result) in work.acks {
            let _ = reply.send(result);
        }
        for (reply, result) in work.commit_acks {
            let _ = reply.send(result);
        }
        for cmd in work.after {
            self.answer(cmd);
        }
    }

    /// Restores the pre-batch state of every channel the failed batch touched. Windows and
    /// caches that may hold the batch's effects are dropped and rebuilt from the store.
    fn rollback(&mut self, undo: &[(Arc<str>, Option<ChannelMeta>)]) {
        for (name, before) in undo {
            match before {
                None => {
                    if self.channels.remove(name).is_some() {
                        self.metrics.partition_channels.with_label_values(&[&self.partition.to_string()]).dec();
                    }
                }
                Some(m) => {
                    if let Some(ch) = self.channels.get_mut(name) {
                        ch.top = m.top;
                        ch.first = m.first;
                        ch.count = m.count;
                        ch.bytes = m.bytes;
                        ch.idempotency = None;
                        ch.consumers.clear();
                        ch.dirty = false;
                    }
                }
            }
        }
    }

    fn fan_out(&mut self, fanout: &[(Arc<str>, u64, Text)]) {
        let to_flush = &mut self.to_flush;
        for (name, offset, frame) in fanout {
            let Some(ch) = self.channels.get_mut(name) else { continue };
            ch.subscribers.retain(|s| {
                let d = Delivery { sub: s.sub, offset: *offset, frame: frame.clone(), end: false };
                match s.outbox.push_direct(d) {
                    Pushed::Closed => false,
                    Pushed::Direct => {
                        to_flush.push(s.outbox.clone());
                        true
                    }
                    Pushed::Queued | Pushed::Slow => true,
                }
            });
        }
    }

    /// Forgets a channel that holds nothing worth keeping in memory: never written (no
    /// message, no committed consumer) and nobody subscribed.
    fn evict_if_idle(&mut self, channel: &str) {
        let idle = self.channels.get(channel).is_some_and(|ch| {
            ch.top == 0 && !ch.dirty && ch.subscribers.is_empty() && ch.consumers.values().all(|o| *o == 0)
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
    fn shed_idle(&mut self) {
        let before = self.channels.len();
        self.channels.retain(|_, ch| {
            if std::mem::take(&mut ch.touched) || !ch.subscribers.is_empty() || ch.dirty || ch.durable != ch.top {
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

    /// Answers reads and registrations after the batch they arrived in is durable.
    fn answer(&mut self, cmd: OwnerCommand) {
        match cmd {
            OwnerCommand::Subscribe { channel, sub, outbox, start, reply } => {
                let grant = self.grant(&channel, &start);
                if grant.is_ok() {
                    if let Some(ch) = self.channels.get_mut(channel.as_str()) {
                        ch.subscribers.push(Subscriber { sub, outbox });
                    }
                }
                let _ = reply.send(grant);
            }
            OwnerCommand::Unsubscribe { channel, sub } => {
                if let Some(ch) = self.channels.get_mut(channel.as_str()) {
                    ch.subscribers.retain(|s| s.sub != sub);
                }
                self.evict_if_idle(&channel);
            }
            OwnerCommand::Seal(reason, reply) => {
                for ch in self.channels.values_mut() {
                    if ch.subscribers.is_empty() {
                        continue;
                    }
                    let push = switchyard_proto::protocol::unsubscribed_push(
                        &ch.name,
                        switchyard_proto::protocol::close::SHUTTING_DOWN,
                        &reason,
                    );
                    let frame = push;
                    for s in ch.subscribers.drain(..) {
                        s.outbox.push(Delivery { sub: s.sub, offset: ch.durable, frame: frame.clone(), end: true });
                    }
                }
                // The store keeps the state for the handover; memory is freed now.
                self.channels.clear();
                self.sealed = true;
                self.metrics.partition_channels.with_label_values(&[&self.partition.to_string()]).set(0);
                tracing::info!(partition = self.partition, "partition sealed");
                if let Some(r) = reply {
                    let _ = r.send(());
                }
            }
            OwnerCommand::Info { channel, consumer, reply } => {
                let committed = match &consumer {
                    Some(name) => match self.consumer_offset(&channel, name, &mut Work::default()) {
                        Ok(o) => Some(o),
                        Err(e) => {
                            let _ = reply.send(Err(e));
                            return;
                        }
                    },
                    None => None,
                };
                let facts = self.channels.get(channel.as_str()).map(|ch| Facts {
                    epoch: ch.epoch.clone(),
                    top: ch.durable,
                    first: ch.first,
                    committed,
                });
                let _ = reply.send(facts.ok_or_else(|| OpError::internal("channel vanished")));
            }
            OwnerCommand::View(channel, reply) => {
                let view = match self.channels.get(channel.as_str()) {
                    Some(ch) => ChannelView { epoch: ch.epoch.clone(), top: ch.durable, first: ch.first },
                    // Never written: empty, under an epoch made up for this answer. A client
                    // that recovers from offset 0 under it is told `recovered: true`.
                    None => ChannelView { epoch: new_epoch().into(), top: 0, first: 1 },
                };
                let _ = reply.send(view);
            }
            OwnerCommand::Snapshot(reply) => {
                // Maintenance asks every interval: keys expire on time even in channels
                // that see no further keyed publish.
                let cutoff = now_ms().saturating_sub(self.idempotency_window.as_millis() as u64);
                for w in self.channels.values_mut().filter_map(|ch| ch.idempotency.as_mut()) {
                    w.expire(cutoff);
                }
                self.shed_idle();
                let snaps = self
                    .channels
                    .values()
                    .map(|ch| Snapshot {
                        channel: ch.name.clone(),
                        stats: ChannelStats {
                            first_offset: ch.first,
                            last_offset: ch.durable,
                            count: ch.count,
                            bytes: ch.bytes,
                        },
                        keyed_generation: ch.keyed_generation,
                        subscribers: ch.subscribers.len() as u64,
                    })
                    .collect();
                let _ = reply.send(snaps);
            }
            OwnerCommand::Publish(..) | OwnerCommand::Commit { .. } | OwnerCommand::Trim { .. } => {
                unreachable!("writes are handled in the batch")
            }
        }
    }

    fn grant(&mut self, channel: &str, start: &Start) -> Result<Grant, OpError> {
        let committed = match start {
            Start::Consumer(name) => self.consumer_offset(channel, name, &mut Work::default())?,
            _ => 0,
        };
        let ch = self.channels.get(channel).ok_or_else(|| OpError::internal("channel vanished"))?;
        Ok(grant_from(ch.epoch.clone(), ch.durable, ch.first, committed, start, ch.durable))
    }
}

fn load_idempotency(
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

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(channel: &str, data: &str) -> (OwnerCommand, oneshot::Receiver<Result<PublishOk, OpError>>) {
        let (tx, rx) = oneshot::channel();
        let req = PublishRequest {
            channel: channel.into(),
            data: RawValue::from_string(data.into()).unwrap(),
            key: None,
            idempotency_key: None,
            from: None,
        };
        (OwnerCommand::Publish(req, tx), rx)
    }

    /// Seal, adopt and the hand-off of writes that race a seal, on a real store.
    #[tokio::test]
    async fn a_sealed_owner_hands_writes_on_and_an_adoption_reloads_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let store = Store::open(dir.path(), switchyard_store::FsyncPolicy::Batch, metrics.clone()).unwrap();
        let (tx, rx) = mpsc::channel(16);
        let (adopt_tx, adopt_rx) = mpsc::unbounded_channel();
        let (fwd_tx, mut fwd_rx) = mpsc::unbounded_channel();
        let owner = Owner::new(
            3,
            store.clone(),
            metrics,
            Duration::from_secs(60),
            Budget::new(1000, 1 << 20),
            Vec::new(),
            Mailbox {
                commands: rx,
                adoptions: adopt_rx,
                forward: Some(fwd_tx),
                replication: crate::replication::Replication::new(8, Duration::from_secs(2), 1 << 20),
            },
        );
        tokio::spawn(owner.run());

        let (cmd, ack) = publish("room:1", "1");
        tx.send(cmd).await.unwrap();
        let first = ack.await.unwrap().unwrap();
        assert_eq!(first.offset, 1);

        let (done, sealed) = oneshot::channel();
        tx.send(OwnerCommand::Seal("moved".into(), Some(done))).await.unwrap();
        sealed.await.unwrap();
        // A write that arrives after the seal is not stored here: it is handed on.
        let (cmd, _ack) = publish("room:1", "2");
        tx.send(cmd).await.unwrap();
        match fwd_rx.recv().await.unwrap() {
            Forward::Publish(req, _) => assert_eq!(req.data.get(), "2"),
            Forward::Commit { .. } => panic!("expected the publish"),
        }
        assert_eq!(store.read_messages(3, "room:1", 0, 10, 10).unwrap().len(), 1);

        // An adoption waits for the store, then serves what it holds (same epoch, same top).
        let (fill, filled) = oneshot::channel();
        adopt_tx.send(filled).unwrap();
        let (cmd, ack) = publish("room:1", "3");
        tx.send(cmd).await.unwrap();
        let mut b = store.batch();
        b.put_message(3, "room:1", 2, &StoredMessage { ts: 1, key: None, from: None, idem: None, data: "9".into() });
        let meta = ChannelMeta { epoch: first.epoch.to_string(), top: 2, first: 1, count: 2, bytes: 2 };
        b.put_meta(3, "room:1", &meta);
        b.write(true).await.unwrap();
        fill.send(()).unwrap();
        let third = ack.await.unwrap().unwrap();
        assert_eq!((third.offset, third.epoch), (3, first.epoch), "the queued write runs on the adopted state");
    }
}
