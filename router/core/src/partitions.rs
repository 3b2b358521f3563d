//! The [`Partitions`] handle: one owner task per partition, and the local operations on them.
//!
//! It owns startup (recover every channel from the store and start one owner per partition),
//! the owners' mailboxes, the adoption queue that holds a partition's mailbox during a
//! handover, and the operations a node runs on a partition it owns: publish, commit, view,
//! history, catch-up reads, subscribe and unsubscribe, presence. It must never decide whether this node
//! owns a channel (the router does, from the map) and never hold a lock across an await.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::value::RawValue;
use switchyard_metrics::Metrics;
use switchyard_proto::partition::{partition_of, PartitionId};
use switchyard_proto::protocol::{ErrorCode, MessageView, OpError, PublishOk, HISTORY_DEFAULT_LIMIT};
use switchyard_store::{ChannelMeta, Reader, Store, StoreError, StoredMessage};
use tokio::sync::{mpsc, oneshot};

use crate::handovers::Handovers;
use crate::idempotency::Budget;
use crate::outbox::Outbox;
use crate::owner::{
    ChannelView, Facts, Forward, Grant, Mailbox, Owner, OwnerCommand, PresenceCommand, PresenceSettings,
    PublishRequest, Start,
};
use crate::replication::Replication;
use crate::shared_reads::SharedReads;
use switchyard_proto::presence::{PresenceEntry, PresenceStats};

/// Capacity of each owner's mailbox; a full mailbox makes senders wait (backpressure).
const OWNER_MAILBOX: usize = 8192;

/// Offsets in one shared catch-up block (a session's catch-up page).
const SHARED_BLOCK: u64 = 256;
/// How long a shared catch-up page is handed out after it was read.
const SHARED_TTL: Duration = Duration::from_secs(2);
/// Most shared catch-up reads kept (finished or in flight).
const SHARED_MAX_ENTRIES: usize = 4096;
/// Most bytes of finished shared catch-up pages kept.
const SHARED_MAX_BYTES: usize = 32 << 20;

/// A page of history, ready to serialize as a `history` reply.
#[derive(Debug, Serialize)]
pub struct HistoryPage {
    /// Channel epoch.
    pub epoch: String,
    /// Channel top.
    pub offset: u64,
    /// First retained offset (not part of the reply: catch-up uses it to tell retention
    /// from compaction).
    #[serde(skip)]
    pub first: u64,
    /// Messages, in the order the query asked for: oldest first, or newest first with
    /// [`HistoryQuery::reverse`]. Empty for `limit` 0 (a position-only read).
    pub messages: Vec<OwnedMessage>,
}

/// What a history read asks for: which offsets, how many, and in which order.
///
/// A page holds messages with `since < offset < before` (`before` None: up to the
/// channel's top), at most `limit` of them: the oldest of that range, oldest first, or
/// with `reverse` the newest of it, newest first. Forward readers page on with `since` =
/// the last offset received, backward readers with `before` = the last offset received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryQuery {
    /// Exclusive lower bound (0: from the first retained message).
    pub since: u64,
    /// Exclusive upper bound; None reads up to the channel's top.
    pub before: Option<u64>,
    /// Most messages in the page; 0 reads only the position (epoch and top).
    pub limit: u32,
    /// Newest first, from the top of the range down.
    pub reverse: bool,
}

impl HistoryQuery {
    /// Messages after `since`, oldest first: a forward page (what catch-up reads).
    pub fn forward(since: u64, limit: u32) -> Self {
        Self { since, before: None, limit, reverse: false }
    }

    /// The newest messages below `before` (None: the newest of the channel), newest first.
    pub fn backward(before: Option<u64>, limit: u32) -> Self {
        Self { since: 0, before, limit, reverse: true }
    }

    /// The inclusive upper offset this query reads up to on a channel whose top is `top`.
    fn upto(&self, top: u64) -> u64 {
        match self.before {
            Some(b) => top.min(b.saturating_sub(1)),
            None => top,
        }
    }
}

impl Default for HistoryQuery {
    /// The protocol's defaults: from the start, oldest first, 100 messages.
    fn default() -> Self {
        Self::forward(0, HISTORY_DEFAULT_LIMIT)
    }
}

/// A stored message read back, in the protocol's message shape.
#[derive(Debug, Clone)]
pub struct OwnedMessage {
    /// Channel.
    pub channel: Arc<str>,
    /// Channel epoch.
    pub epoch: Arc<str>,
    /// Offset.
    pub offset: u64,
    /// The stored message (its `data` moved into [`OwnedMessage::data`]).
    pub msg: StoredMessage,
    /// The payload, checked as JSON.
    pub data: Box<RawValue>,
}

impl OwnedMessage {
    /// Bytes this message takes in a reply or a peer frame: payload, keys, channel and
    /// epoch, and a fixed allowance for the rest. Reply budgets count this, not `data`.
    pub fn encoded_len(&self) -> usize {
        self.data.get().len() + self.msg.encoded_len() + self.channel.len() + self.epoch.len()
    }

    /// The protocol view; `push` is `Some("message")` for a push frame.
    pub fn view(&self, push: Option<&'static str>) -> MessageView<'_> {
        MessageView {
            push,
            channel: &self.channel,
            offset: self.offset,
            epoch: &self.epoch,
            ts: self.msg.ts,
            key: self.msg.key.as_deref(),
            from: self.msg.from.as_deref(),
            data: &self.data,
        }
    }
}

impl Serialize for OwnedMessage {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.view(None).serialize(s)
    }
}

/// What the owners need to start.
pub struct Settings {
    /// Number of partitions P.
    pub partitions: u32,
    /// How long an idempotency key is remembered.
    pub idempotency_window: Duration,
    /// True when writes that reach a sealed partition are forwarded to its new owner
    /// (cluster mode with peer links); the receiver half is returned by [`Partitions::start`].
    pub forward_sealed: bool,
    /// Most message bytes one read (a history or catch-up page) returns; never fewer than
    /// one message.
    pub max_reply_bytes: usize,
    /// Most idempotency keys this node remembers, over all channels.
    pub idempotency_max_keys: usize,
    /// Most bytes of idempotency keys this node remembers.
    pub idempotency_max_bytes: usize,
    /// How long an in-sync follower may lag before its leader asks it out of the ISR.
    pub replica_lag_timeout: Duration,
    /// The presence limits of each namespace.
    pub presence: Arc<dyn PresenceSettings>,
}

/// Every partition owner of this node, and the operations on a partition it owns.
pub struct Partitions {
    /// Number of partitions P.
    partitions: u32,
    /// Most message bytes one read returns.
    max_reply_bytes: usize,
    /// The durable store every owner writes through.
    pub store: Arc<Store>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Partition handovers under way (adoptions, sealed partitions).
    pub handovers: Handovers,
    /// Replication state of every partition.
    pub replication: Arc<Replication>,
    owners: Vec<mpsc::Sender<OwnerCommand>>,
    adoptions: Vec<mpsc::UnboundedSender<oneshot::Receiver<()>>>,
    next_id: AtomicU64,
    owner_tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Catch-up pages shared between clients recovering the same channel.
    shared: SharedReads,
    /// Store reads made through [`Partitions::read`] (tests count them).
    #[cfg(test)]
    reads: AtomicU64,
}

/// A page read in steps can straddle a retention pass: its first messages read before the
/// trim, the rest after. Cuts `page` (messages after `after`) before its first hole that
/// retention explains (the first retained offset, `first`, lies past the hole's start), so
/// the reader meets the hole at the start of its next page, where it is detected, and never
/// receives a message across it. A hole at the very start is left for the reader to see.
fn cut_at_trim(mut page: Vec<OwnedMessage>, after: u64, first: u64) -> Vec<OwnedMessage> {
    let mut prev = after;
    let hole = page.iter().position(|m| {
        let trimmed = m.offset > prev + 1 && first > prev + 1;
        prev = m.offset;
        trimmed
    });
    if let Some(i) = hole.filter(|&i| i > 0) {
        page.truncate(i);
    }
    page
}

/// The owner stopped before it answered.
fn stopped() -> OpError {
    OpError::new(ErrorCode::Unavailable, "owner stopped")
}

/// One page of [`Partitions::read`], on the read pool: stored messages `after < offset
/// <= upto` of `name` (under `epoch`), at most `limit` and at most `max_bytes` of them
/// (never fewer than one), each payload checked as JSON.
fn read_page(
    r: Reader<'_>,
    p: PartitionId,
    (name, epoch): (Arc<str>, Arc<str>),
    (after, upto): (u64, u64),
    (limit, max_bytes): (usize, usize),
    reverse: bool,
) -> Result<Vec<OwnedMessage>, OpError> {
    /// Messages read from the store at a time, so a page stops near its byte budget.
    const STEP: usize = 64;
    // The part of the range not read yet: it shrinks from the end the page starts at.
    let (mut out, mut bytes, mut after, mut upto) = (Vec::new(), 0usize, after, upto);
    while out.len() < limit && after < upto {
        let want = (limit - out.len()).min(STEP);
        let rows = if reverse {
            r.read_messages_rev(p, &name, after, upto, want)
        } else {
            r.read_messages(p, &name, after, upto, want)
        };
        let rows = rows.map_err(|e| e.to_op_error())?;
        let last_step = rows.len() < want;
        for (offset, mut msg) in rows {
            // The payload moves into the checked RawValue; `view` reads it from there.
            let data = RawValue::from_string(std::mem::take(&mut msg.data))
                .map_err(|e| OpError::internal(format!("stored payload: {e}")))?;
            let m = OwnedMessage { channel: name.clone(), epoch: epoch.clone(), offset, msg, data };
            bytes += m.encoded_len();
            if bytes > max_bytes && !out.is_empty() {
                return Ok(out);
            }
            if reverse {
                upto = offset.saturating_sub(1);
            } else {
                after = offset;
            }
            out.push(m);
        }
        if last_step {
            break;
        }
    }
    Ok(out)
}

impl Partitions {
    /// Recovers every channel from `store` and starts one owner per partition. With
    /// `forward_sealed`, the receiver yields the writes that reached a sealed partition.
    pub fn start(
        store: Arc<Store>,
        metrics: Arc<Metrics>,
        settings: Settings,
    ) -> Result<(Arc<Self>, Option<mpsc::UnboundedReceiver<Forward>>), StoreError> {
        let p = settings.partitions;
        let mut recovered: Vec<Vec<(String, ChannelMeta)>> = (0..p).map(|_| Vec::new()).collect();
        let mut total = 0usize;
        let stored = store.startup_reader().all_channels().inspect_err(|e| {
            tracing::error!(
                error = %e,
                "reading the channels' metadata at start-up failed: a table is damaged or unreadable (`switchyard store check DATA_DIR` shows where); see docs/operating.md, Damaged data"
            )
        })?;
        for (partition, name, meta) in stored {
            // The stored partition is recomputed: a different P would move channels.
            let now = partition_of(&name, p);
            if now != partition {
                tracing::warn!(channel = %name, stored = partition, now, "channel stored under another partition count");
                continue;
            }
            recovered[partition as usize].push((name, meta));
            total += 1;
        }
        tracing::info!(channels = total, partitions = p, "store recovered");
        let mut owners = Vec::with_capacity(p as usize);
        let mut adoptions = Vec::with_capacity(p as usize);
        let (forward_tx, forward_rx) = mpsc::unbounded_channel();
        let mut tasks = Vec::with_capacity(p as usize);
        let budget = Budget::new(settings.idempotency_max_keys, settings.idempotency_max_bytes);
        // The leader keeps at most this many bytes of batches for lagging followers.
        let replication = Replication::new(p, settings.replica_lag_timeout, 16 << 20);
        if store.journal_repair().is_some() {
            // Acknowledged batches may be gone from this replica's logs: lead nothing
            // before an in-sync follower shows a log is not behind.
            replication.suspect_logs();
        }
        for partition in 0..p {
            replication.load(partition, store.repl_meta(partition)?.as_ref());
        }
        for (partition, channels) in recovered.into_iter().enumerate() {
            let (tx, rx) = mpsc::channel(OWNER_MAILBOX);
            let (adopt_tx, adopt_rx) = mpsc::unbounded_channel();
            let owner = Owner::new(
                partition as PartitionId,
                store.clone(),
                metrics.clone(),
                settings.idempotency_window,
                budget.clone(),
                channels,
                Mailbox {
                    commands: rx,
                    adoptions: adopt_rx,
                    forward: settings.forward_sealed.then(|| forward_tx.clone()),
                    replication: replication.clone(),
                    presence: settings.presence.clone(),
                },
            );
            tasks.push(tokio::spawn(owner.run()));
            owners.push(tx);
            adoptions.push(adopt_tx);
        }
        let this = Arc::new(Self {
            partitions: p,
            max_reply_bytes: settings.max_reply_bytes,
            store,
            metrics,
            handovers: Handovers::default(),
            replication,
            owners,
            adoptions,
            next_id: AtomicU64::new(1),
            owner_tasks: std::sync::Mutex::new(tasks),
            shared: SharedReads::new(SHARED_TTL, SHARED_MAX_ENTRIES, SHARED_MAX_BYTES),
            #[cfg(test)]
            reads: AtomicU64::new(0),
        });
        Ok((this, settings.forward_sealed.then_some(forward_rx)))
    }

    /// Number of partitions P.
    pub fn count(&self) -> u32 {
        self.partitions
    }

    /// A process-unique id for a client or subscription.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The partition of `channel`.
    pub fn partition(&self, channel: &str) -> PartitionId {
        partition_of(channel, self.partitions)
    }

    /// Sends a command to the owner of `partition`, waiting only for mailbox space.
    pub(crate) async fn send_to(&self, partition: PartitionId, cmd: OwnerCommand) -> Result<(), OpError> {
        self.owners[partition as usize]
            .send(cmd)
            .await
            .map_err(|_| OpError::new(ErrorCode::Unavailable, "partition owner stopped"))
    }

    /// Makes `partition`'s owner wait for `done` (the handed-over state is in the store)
    /// before it runs any command still queued or yet to come, then load the state.
    pub fn adopt(&self, partition: PartitionId, done: oneshot::Receiver<()>) {
        let _ = self.adoptions[partition as usize].send(done);
    }

    /// Seals `partition` (it moved away): its owner ends every subscription with 4100 and
    /// `reason`, drops its in-memory state and refuses later writes with
    /// [`Refusal::Sealed`](switchyard_proto::refusal::Refusal::Sealed). Returns once every
    /// write it accepted before is durable and the seal is done.
    pub async fn seal(&self, partition: PartitionId, reason: String) -> Result<(), OpError> {
        self.ask(partition, |done| OwnerCommand::Seal(reason, Some(done))).await
    }

    /// [`Partitions::seal`] without waiting, for callers that must not await (the map
    /// install runs in the etcd watch loop): the seal is queued behind what is in the
    /// mailbox.
    pub fn seal_later(&self, partition: PartitionId, reason: String) {
        self.hold(partition, OwnerCommand::Seal(reason, None));
    }

    /// Puts `cmd` in `partition`'s mailbox without waiting (a full mailbox hands it to a
    /// task), for callers that must not await.
    pub(crate) fn hold(&self, partition: PartitionId, cmd: OwnerCommand) {
        let tx = &self.owners[partition as usize];
        if let Err(mpsc::error::TrySendError::Full(cmd)) = tx.try_send(cmd) {
            let tx = tx.clone();
            tokio::spawn(async move { tx.send(cmd).await });
        }
    }

    /// Sends a command built around a reply channel and waits for the answer.
    async fn ask<T>(&self, p: PartitionId, cmd: impl FnOnce(oneshot::Sender<T>) -> OwnerCommand) -> Result<T, OpError> {
        let (tx, rx) = oneshot::channel();
        self.send_to(p, cmd(tx)).await?;
        rx.await.map_err(|_| stopped())
    }

    /// Enqueues a publish at `p`'s owner; the receiver yields the ack once it is durable.
    pub async fn publish(
        &self,
        p: PartitionId,
        req: PublishRequest,
    ) -> Result<oneshot::Receiver<Result<PublishOk, OpError>>, OpError> {
        let (tx, rx) = oneshot::channel();
        self.send_to(p, OwnerCommand::Publish(req, tx)).await?;
        Ok(rx)
    }

    /// Enqueues a commit at `p`'s owner; the receiver yields once it is durable.
    pub async fn commit(
        &self,
        p: PartitionId,
        channel: &str,
        consumer: String,
        offset: u64,
    ) -> Result<oneshot::Receiver<Result<(), OpError>>, OpError> {
        let (reply, rx) = oneshot::channel();
        self.send_to(p, OwnerCommand::Commit { channel: channel.to_string(), consumer, offset, reply }).await?;
        Ok(rx)
    }

    /// Enqueues a subscription at `p`'s owner; the receiver yields the grant.
    pub async fn subscribe(
        &self,
        p: PartitionId,
        channel: &str,
        sub: u64,
        outbox: Arc<Outbox>,
        start: Start,
    ) -> Result<oneshot::Receiver<Result<Grant, OpError>>, OpError> {
        let (reply, rx) = oneshot::channel();
        self.send_to(p, OwnerCommand::Subscribe { channel: channel.to_string(), sub, outbox, start, reply }).await?;
        Ok(rx)
    }

    /// Forgets a subscription at the owner of `channel`'s partition (which still holds it
    /// even if the map moved the channel).
    pub async fn unsubscribe(&self, channel: &str, sub: u64) {
        let cmd = OwnerCommand::Unsubscribe { channel: channel.to_string(), sub };
        let _ = self.send_to(self.partition(channel), cmd).await;
    }

    /// Channel facts for a gateway's grant.
    pub async fn info(&self, p: PartitionId, channel: &str, consumer: Option<String>) -> Result<Facts, OpError> {
        self.ask(p, |reply| OwnerCommand::Info { channel: channel.to_string(), consumer, reply }).await?
    }

    /// Epoch, acknowledged top and first retained offset of `channel`.
    pub async fn view(&self, p: PartitionId, channel: &str) -> Result<ChannelView, OpError> {
        self.ask(p, |tx| OwnerCommand::View(channel.to_string(), tx)).await
    }

    /// A history page (see [`HistoryQuery`]), with the channel's epoch and top as they were
    /// when it was read.
    pub async fn history(&self, p: PartitionId, channel: &str, q: HistoryQuery) -> Result<HistoryPage, OpError> {
        let view = self.view(p, channel).await?;
        let messages =
            self.read(channel, &view.epoch, (q.since, q.upto(view.top)), q.limit as usize, q.reverse).await?;
        Ok(HistoryPage { epoch: view.epoch.to_string(), offset: view.top, first: view.first, messages })
    }

    /// Reads stored messages `after < offset <= upto`, at most `limit`, and at most
    /// `max_reply_bytes` of them (counting keys and ids, never fewer than one message): a
    /// short page is legal, and the reader pages on from its last offset. Oldest first, or
    /// with `reverse` newest first (the newest of the range). The whole page is read and
    /// its payloads checked on the store's read pool, never on this task's worker.
    pub async fn read(
        &self,
        channel: &str,
        epoch: &Arc<str>,
        range: (u64, u64),
        limit: usize,
        reverse: bool,
    ) -> Result<Vec<OwnedMessage>, OpError> {
        let (name, epoch, p, max_bytes) =
            (Arc::<str>::from(channel), epoch.clone(), self.partition(channel), self.max_reply_bytes);
        #[cfg(test)]
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.store
            .read(move |r| read_page(r, p, (name, epoch), range, (limit, max_bytes), reverse))
            .await
            .map_err(|e| e.to_op_error())?
    }

    /// Catch-up for a subscription on a channel owned here: stored messages
    /// `after < offset <= upto` of `epoch` (at most `limit`) and the first retained offset.
    pub async fn catch_up(
        &self,
        channel: &str,
        epoch: &Arc<str>,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<(Vec<OwnedMessage>, u64), OpError> {
        let p = self.partition(channel);
        let moving = || OpError::new(ErrorCode::Unavailable, "the channel's partition is moving");
        if self.handovers.is_adopting(p) {
            return Err(moving());
        }
        let messages = self.shared_page(channel, epoch, (after, upto), limit).await?;
        // Read the metadata after the messages: a partition adopted (or restarted) in
        // between shows here as a busy partition or another epoch.
        let name = channel.to_string();
        let meta = self.store.read(move |r| r.channel_meta(p, &name)).await;
        match meta {
            _ if self.handovers.is_adopting(p) => Err(moving()),
            Ok(Ok(Some(meta))) if *meta.epoch == **epoch => Ok((cut_at_trim(messages, after, meta.first), meta.first)),
            Ok(Ok(Some(_))) => Err(OpError::new(ErrorCode::Unavailable, "the channel restarted under a new epoch")),
            _ => Ok((messages, u64::MAX)),
        }
    }

    /// A catch-up page (`after < offset <= upto`, at most `limit`, oldest first) cut from a
    /// read shared with other clients: the block of [`SHARED_BLOCK`] offsets holding
    /// `after + 1` (capped at `upto`, which is part of the key) is read once and each
    /// client takes its messages past `after`. The page is a prefix of what an unshared
    /// read returns (it may be shorter). When the block holds nothing past `after` (its
    /// read was cut by the byte budget, or the range has holes), the rest of the block is
    /// read shared from `after`, and failing that, unshared up to `upto`: the page is
    /// never empty while messages remain.
    async fn shared_page(
        &self,
        channel: &str,
        epoch: &Arc<str>,
        (after, upto): (u64, u64),
        limit: usize,
    ) -> Result<Vec<OwnedMessage>, OpError> {
        if after >= upto || limit == 0 {
            return self.read(channel, epoch, (after, upto), limit, false).await;
        }
        let block = after / SHARED_BLOCK * SHARED_BLOCK;
        let end = (block + SHARED_BLOCK).min(upto);
        let name: Arc<str> = channel.into();
        let mut start = block;
        loop {
            let key = (name.clone(), epoch.clone(), start, end);
            let read = || async {
                let page = self.read(channel, epoch, (start, end), (end - start) as usize, false).await?;
                Ok(Arc::new(page))
            };
            let (page, shared) = self.shared.get(key, read).await?;
            let mine: Vec<OwnedMessage> = page.iter().filter(|m| m.offset > after).take(limit).cloned().collect();
            if !mine.is_empty() {
                if shared {
                    self.metrics.catch_up_shared_pages.inc();
                }
                return Ok(mine);
            }
            // Nothing past `after` in this read: a page cut short (by the byte budget) is
            // continued from `after` once, shared with the clients that followed it.
            let cut = page.last().is_some_and(|m| m.offset < end);
            if start == after || !cut {
                break;
            }
            start = after;
        }
        self.read(channel, epoch, (after, upto), limit, false).await
    }

    /// Records `entry` (a client connected to node `origin`) in `channel`'s presence at
    /// `p`'s owner; a new client is announced with a `join` push when `announce`.
    pub async fn join(
        &self,
        p: PartitionId,
        channel: &str,
        origin: Arc<str>,
        entry: PresenceEntry,
        announce: bool,
    ) -> Result<(), OpError> {
        self.ask(p, |reply| {
            OwnerCommand::Presence(PresenceCommand::Join {
                channel: channel.to_string(),
                origin,
                entry,
                announce,
                reply,
            })
        })
        .await?
    }

    /// Forgets `client` (connected to node `origin`) in `channel`'s presence at `p`'s owner
    /// (a `leave` push follows).
    pub async fn leave(&self, p: PartitionId, channel: &str, origin: Arc<str>, client: &str) -> Result<(), OpError> {
        self.ask(p, |reply| {
            OwnerCommand::Presence(PresenceCommand::Leave {
                channel: channel.to_string(),
                origin,
                client: client.to_string(),
                reply: Some(reply),
            })
        })
        .await?
    }

    /// Every client in `channel`'s presence (`limit_exceeded` past the namespace's
    /// `presence_max_list`).
    pub async fn presence(&self, p: PartitionId, channel: &str) -> Result<Vec<PresenceEntry>, OpError> {
        self.ask(p, |reply| OwnerCommand::Presence(PresenceCommand::List { channel: channel.to_string(), reply }))
            .await?
    }

    /// The counts of `channel`'s presence.
    pub async fn presence_stats(&self, p: PartitionId, channel: &str) -> Result<PresenceStats, OpError> {
        self.ask(p, |reply| OwnerCommand::Presence(PresenceCommand::Stats { channel: channel.to_string(), reply }))
            .await?
    }

    /// Every owner forgets the presence of clients connected to `node` (it left the
    /// cluster), without waiting.
    pub fn drop_presence_of(&self, node: &str) {
        let node: Arc<str> = node.into();
        for p in 0..self.partitions {
            self.hold(p, OwnerCommand::Presence(PresenceCommand::DropOrigin { node: node.clone() }));
        }
    }

    /// The counters of every channel of `p` (None when its owner stopped).
    pub async fn snapshot(&self, p: PartitionId) -> Option<Vec<crate::owner::Snapshot>> {
        self.ask(p, OwnerCommand::Snapshot).await.ok()
    }

    /// Called after sessions are gone: waits until each mailbox is drained, syncs the
    /// store, then stops the owners.
    pub async fn close(&self) {
        // Owners stop when every sender is dropped; ours live as long as this handle, so
        // instead wait until each mailbox is drained.
        for p in 0..self.partitions {
            let _ = self.snapshot(p).await;
        }
        if let Err(e) = self.store.close() {
            tracing::error!(error = %e, "final store sync failed");
        }
        let tasks = std::mem::take(&mut *self.owner_tasks.lock().expect("owner task list"));
        for t in tasks {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    //! The owner's contract through the [`Partitions`] handle, on a real fsync'd store.

    use super::*;

    /// A page with a hole that retention explains is cut before it; a compaction hole
    /// (below the first retained offset) is kept; a hole at the start is left for the reader.
    #[test]
    fn a_page_is_cut_before_a_hole_retention_made() {
        let page = |offsets: &[u64]| -> Vec<OwnedMessage> {
            offsets
                .iter()
                .map(|&offset| OwnedMessage {
                    channel: "c".into(),
                    epoch: "e".into(),
                    offset,
                    msg: switchyard_store::StoredMessage {
                        ts: 0,
                        key: None,
                        from: None,
                        idem: None,
                        data: String::new(),
                    },
                    data: RawValue::from_string("1".into()).unwrap(),
                })
                .collect()
        };
        let offsets = |p: Vec<OwnedMessage>| p.iter().map(|m| m.offset).collect::<Vec<_>>();
        assert_eq!(offsets(cut_at_trim(page(&[1, 2, 3, 7, 8]), 0, 7)), vec![1, 2, 3]);
        assert_eq!(offsets(cut_at_trim(page(&[1, 2, 3, 7, 8]), 0, 1)), vec![1, 2, 3, 7, 8], "compaction");
        assert_eq!(offsets(cut_at_trim(page(&[7, 8]), 3, 7)), vec![7, 8], "hole at the start");
    }
    use crate::outbox::{outbox, Inbox};
    use crate::test_support::{request as req, start};
    use switchyard_proto::protocol::StartFrom;

    async fn publish(parts: &Partitions, channel: &str, data: &str, idem: Option<&str>) -> PublishOk {
        let p = parts.partition(channel);
        parts.publish(p, req(channel, data, idem)).await.unwrap().await.unwrap().unwrap()
    }

    async fn subscribe(parts: &Partitions, channel: &str, start: Start) -> (Grant, Arc<Outbox>, Inbox) {
        let (out, inbox) = outbox(16, 1 << 20);
        let p = parts.partition(channel);
        let sub = parts.next_id();
        let grant = parts.subscribe(p, channel, sub, out.clone(), start).await.unwrap().await.unwrap().unwrap();
        (grant, out, inbox)
    }

    /// A history read stuck in the store (held by the fault hook) holds up neither the
    /// runtime nor the owner: on a single-threaded runtime, a publish to another channel
    /// of the same partition is acknowledged and delivered while it waits, and the read
    /// answers correctly once released.
    #[tokio::test]
    async fn a_held_store_read_holds_up_no_live_publish() {
        let dir = tempfile::tempdir().unwrap();
        let parts = start(dir.path());
        for data in ["1", "2", "3"] {
            publish(&parts, "hist:1", data, None).await;
        }
        let p = parts.partition("hist:1");
        let live = (0..).map(|i| format!("live:{i}")).find(|c| parts.partition(c) == p).unwrap();
        let (_grant, _out, mut inbox) = subscribe(&parts, &live, Start::From(StartFrom::Latest)).await;
        let hold = parts.store.hold_reads("hist:1");
        let reader = {
            let parts = parts.clone();
            tokio::spawn(async move { parts.history(p, "hist:1", HistoryQuery::forward(0, 10)).await })
        };
        crate::test_support::eventually("the history read waits in the store", async || hold.waiting() == 1).await;
        let deadline = Duration::from_secs(5);
        let ok = tokio::time::timeout(deadline, publish(&parts, &live, "7", None)).await.expect("acknowledged");
        let d = tokio::time::timeout(deadline, inbox.recv()).await.expect("delivered");
        assert_eq!((ok.offset, d.offset), (1, 1));
        assert!(!reader.is_finished(), "the read is still held");
        drop(hold);
        let page = tokio::time::timeout(deadline, reader).await.expect("answered once released").unwrap().unwrap();
        assert_eq!(page.messages.iter().map(|m| m.offset).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(page.messages.iter().map(|m| m.data.get()).collect::<Vec<_>>(), vec!["1", "2", "3"]);
        assert_eq!(page.offset, 3);
    }

    #[tokio::test]
    async fn offsets_rise_by_one_and_each_message_is_pushed_once() {
        let dir = tempfile::tempdir().unwrap();
        let parts = start(dir.path());
        let (grant, _out, mut inbox) = subscribe(&parts, "room:1", Start::From(StartFrom::Latest)).await;
        assert_eq!((grant.offset, grant.top), (0, 0));
        let mut epochs = Vec::new();
        for (i, data) in ["1", "2", "3"].iter().enumerate() {
            let ok = publish(&parts, "room:1", data, None).await;
            assert_eq!(ok.offset, i as u64 + 1);
            epochs.push(ok.epoch.to_string());
        }
        assert!(epochs.iter().all(|e| *e == epochs[0]), "one epoch: {epochs:?}");
        for offset in 1..=3 {
            let d = inbox.recv().await;
            assert_eq!(d.offset, offset);
            let v: serde_json::Value = serde_json::from_slice(&d.frame).unwrap();
            assert_eq!((v["push"].as_str(), v["offset"].as_u64()), (Some("message"), Some(offset)));
        }
        assert!(inbox.try_recv().is_none(), "nothing pushed twice");
        let page = parts.history(parts.partition("room:1"), "room:1", HistoryQuery::forward(1, 10)).await.unwrap();
        assert_eq!(page.messages.iter().map(|m| m.offset).collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(page.offset, 3);
    }

    /// Idle channels shed their state on the maintenance snapshots: a consumer lookup of a
    /// channel that was never written leaves nothing behind, and a written channel keeps
    /// only its counters; its committed consumer is read back from the store.
    #[tokio::test]
    async fn idle_channels_shed_their_state_and_read_it_back() {
        let dir = tempfile::tempdir().unwrap();
        let parts = start(dir.path());
        let channels = |parts: &Partitions, ch: &str| {
            parts.metrics.partition_channels.with_label_values(&[&parts.partition(ch).to_string()]).get()
        };
        publish(&parts, "room:kept", "1", None).await;
        publish(&parts, "room:kept", "2", None).await;
        let p = parts.partition("room:kept");
        parts.commit(p, "room:kept", "phone".into(), 1).await.unwrap().await.unwrap().unwrap();
        let probe = "room:probe";
        let q = parts.partition(probe);
        let facts = parts.info(q, probe, Some("nobody".into())).await.unwrap();
        assert_eq!((facts.top, facts.committed), (0, Some(0)));
        let probed = channels(&parts, probe);
        assert!(probed >= 1, "the lookup made a channel in memory");
        // The first snapshot sees them used; the second finds them idle.
        for _ in 0..2 {
            parts.snapshot(q).await.unwrap();
            parts.snapshot(p).await.unwrap();
        }
        assert_eq!(channels(&parts, probe), probed - 1 + i64::from(p == q), "the probed channel is gone");
        let snap = parts.snapshot(p).await.unwrap();
        assert!(snap.iter().any(|s| &*s.channel == "room:kept" && s.stats.last_offset == 2), "counters stay");
        let (grant, _out, _inbox) = subscribe(&parts, "room:kept", Start::Consumer("phone".into())).await;
        assert_eq!((grant.catch_up_after, grant.top), (Some(1), 2), "the consumer resumes from the store");
    }

    #[tokio::test]
    async fn an_idempotency_key_repeats_the_first_ack_and_stores_once() {
        let dir = tempfile::tempdir().unwrap();
        let parts = start(dir.path());
        let first = publish(&parts, "room:2", "{\"a\":1}", Some("k1")).await;
        let again = publish(&parts, "room:2", "{\"a\":2}", Some("k1")).await;
        assert_eq!((again.offset, &again.epoch), (first.offset, &first.epoch));
        let other = publish(&parts, "room:2", "{\"a\":3}", Some("k2")).await;
        assert_eq!(other.offset, 2);
        let page = parts.history(parts.partition("room:2"), "room:2", HistoryQuery::forward(0, 10)).await.unwrap();
        let data: Vec<_> = page.messages.iter().map(|m| m.data.get().to_string()).collect();
        assert_eq!(data, vec!["{\"a\":1}", "{\"a\":3}"]);
    }

    #[tokio::test]
    async fn recovery_is_exact_only_in_the_same_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let parts = start(dir.path());
        let mut epoch = String::new();
        for data in ["1", "2", "3"] {
            epoch = publish(&parts, "room:3", data, None).await.epoch.to_string();
        }
        let exact = Start::From(StartFrom::Recover { offset: 1, epoch: epoch.clone() });
        let (grant, _, _) = subscribe(&parts, "room:3", exact).await;
        assert_eq!((grant.recovered, grant.catch_up_after, grant.top), (Some(true), Some(1), 3));
        let (msgs, first) = parts.catch_up("room:3", &grant.epoch, 1, grant.top, 10).await.unwrap();
        assert_eq!(msgs.iter().map(|m| m.offset).collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(first, 1);
        let stale = Start::From(StartFrom::Recover { offset: 1, epoch: "not-it".into() });
        let (grant, _, _) = subscribe(&parts, "room:3", stale).await;
        assert_eq!((grant.recovered, grant.catch_up_after), (Some(false), None));
    }

    #[tokio::test]
    async fn a_durable_consumer_resumes_after_its_commit() {
        let dir = tempfile::tempdir().unwrap();
        let parts = start(dir.path());
        for data in ["1", "2", "3", "4"] {
            publish(&parts, "jobs:a", data, None).await;
        }
        let p = parts.partition("jobs:a");
        parts.commit(p, "jobs:a", "worker".into(), 2).await.unwrap().await.unwrap().unwrap();
        let (grant, _, _) = subscribe(&parts, "jobs:a", Start::Consumer("worker".into())).await;
        assert_eq!((grant.catch_up_after, grant.top), (Some(2), 4));
        let facts = parts.info(p, "jobs:a", Some("worker".into())).await.unwrap();
        assert_eq!((facts.committed, facts.top), (Some(2), 4));
    }

    /// A node that is no replica of a replicated partition (a deposed leader before its
    /// seal) acknowledges no write: written here, unreplicated, it would be lost.
    #[tokio::test]
    async fn a_node_outside_a_replicated_partition_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let parts = start(dir.path());
        let p = parts.partition("room:4");
        publish(&parts, "room:4", "1", None).await;
        parts.replication.set_role(p, crate::replication::Role::Outside);
        let refused = parts.publish(p, req("room:4", "2", None)).await.unwrap().await.unwrap();
        assert_eq!(refused.unwrap_err().code, switchyard_proto::protocol::ErrorCode::Unavailable);
        parts.replication.set_role(p, crate::replication::Role::None);
        assert_eq!(publish(&parts, "room:4", "3", None).await.offset, 2, "single-copy mode writes");
    }

    #[tokio::test]
    async fn a_full_outbox_marks_only_its_connection_slow() {
        let dir = tempfile::tempdir().unwrap();
        let parts = start(dir.path());
        let (slow_out, _slow_inbox) = outbox(2, 1 << 20);
        let p = parts.partition("room:4");
        let sub = parts.next_id();
        let start = Start::From(StartFrom::Latest);
        parts.subscribe(p, "room:4", sub, slow_out.clone(), start).await.unwrap().await.unwrap().unwrap();
        let (_, ok_out, mut ok_inbox) = subscribe(&parts, "room:4", Start::From(StartFrom::Latest)).await;
        for data in ["1", "2", "3"] {
            publish(&parts, "room:4", data, None).await;
        }
        assert!(slow_out.is_slow(), "the third push overflows a 2-message queue");
        assert!(!ok_out.is_slow());
        for offset in 1..=3 {
            assert_eq!(ok_inbox.recv().await.offset, offset);
        }
    }

    #[tokio::test]
    async fn a_history_page_stops_at_the_byte_budget_and_pages_to_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let parts = start(dir.path());
        let payload = format!("\"{}\"", "x".repeat(100_000));
        for _ in 0..30 {
            publish(&parts, "big:1", &payload, None).await;
        }
        let p = parts.partition("big:1");
        let (mut since, mut seen, mut pages) = (0, Vec::new(), 0);
        loop {
            let page = parts.history(p, "big:1", HistoryQuery::forward(since, 1000)).await.unwrap();
            assert_eq!(page.offset, 30, "a short page still names the channel top");
            let bytes: usize = page.messages.iter().map(OwnedMessage::encoded_len).sum();
            assert!(bytes <= 1 << 20, "a page of {bytes} bytes");
            let Some(last) = page.messages.last() else { break };
            since = last.offset;
            seen.extend(page.messages.iter().map(|m| m.offset));
            pages += 1;
        }
        assert_eq!(seen, (1..=30).collect::<Vec<_>>());
        assert!(pages >= 3, "{pages} pages");
    }

    /// Backward pages: the newest first, paged with `before` to the start with no gap and
    /// no repeat, each within the byte budget (never fewer than one message).
    #[tokio::test]
    async fn a_reverse_page_stops_at_the_byte_budget_and_pages_back_to_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let parts = start(dir.path());
        let payload = format!("\"{}\"", "x".repeat(100_000));
        for _ in 0..30 {
            publish(&parts, "big:2", &payload, None).await;
        }
        let p = parts.partition("big:2");
        let (mut before, mut seen, mut pages) = (None, Vec::new(), 0);
        loop {
            let page = parts.history(p, "big:2", HistoryQuery::backward(before, 1000)).await.unwrap();
            assert_eq!(page.offset, 30, "a short page still names the channel top");
            let bytes: usize = page.messages.iter().map(OwnedMessage::encoded_len).sum();
            assert!(bytes <= 1 << 20, "a page of {bytes} bytes");
            let Some(last) = page.messages.last() else { break };
            before = Some(last.offset);
            seen.extend(page.messages.iter().map(|m| m.offset));
            pages += 1;
        }
        assert_eq!(seen, (1..=30).rev().collect::<Vec<_>>());
        assert!(pages >= 3, "{pages} pages");

        // A single message over the budget still comes back, alone, in either direction.
        let huge = format!("\"{}\"", "y".repeat(1_200_000));
        publish(&parts, "big:2", &huge, None).await;
        let page = parts.history(p, "big:2", HistoryQuery::backward(None, 10)).await.unwrap();
        assert_eq!(page.messages.iter().map(|m| m.offset).collect::<Vec<_>>(), vec![31]);
        let page = parts.history(p, "big:2", HistoryQuery::forward(30, 10)).await.unwrap();
        assert_eq!(page.messages.iter().map(|m| m.offset).collect::<Vec<_>>(), vec![31]);
    }

    /// The range `since < offset < before` in both orders, and `limit` 0 for the position.
    #[tokio::test]
    async fn history_queries_read_their_range_in_either_order() {
        let dir = tempfile::tempdir().unwrap();
        let parts = start(dir.path());
        for i in 1..=10 {
            publish(&parts, "room:9", &i.to_string(), None).await;
        }
        let p = parts.partition("room:9");
        let offsets = |q: HistoryQuery| {
            let parts = &parts;
            async move {
                let page = parts.history(p, "room:9", q).await.unwrap();
                assert_eq!(page.offset, 10);
                page.messages.iter().map(|m| m.offset).collect::<Vec<_>>()
            }
        };
        assert_eq!(offsets(HistoryQuery::backward(None, 3)).await, vec![10, 9, 8]);
        assert_eq!(offsets(HistoryQuery::backward(Some(8), 3)).await, vec![7, 6, 5]);
        assert_eq!(offsets(HistoryQuery::backward(Some(3), 100)).await, vec![2, 1]);
        assert_eq!(offsets(HistoryQuery::backward(Some(1), 100)).await, Vec::<u64>::new());
        assert_eq!(offsets(HistoryQuery::backward(Some(0), 100)).await, Vec::<u64>::new());
        assert_eq!(offsets(HistoryQuery::backward(Some(500), 2)).await, vec![10, 9], "`before` above the top");
        let between = HistoryQuery { since: 4, before: Some(8), limit: 100, reverse: true };
        assert_eq!(offsets(between).await, vec![7, 6, 5]);
        assert_eq!(offsets(HistoryQuery { reverse: false, ..between }).await, vec![5, 6, 7]);
        assert_eq!(offsets(HistoryQuery { limit: 2, ..between }).await, vec![7, 6]);
        assert_eq!(offsets(HistoryQuery::forward(7, 100)).await, vec![8, 9, 10]);
        assert_eq!(offsets(HistoryQuery::forward(10, 100)).await, Vec::<u64>::new());
        let page = parts.history(p, "room:9", HistoryQuery { limit: 0, ..HistoryQuery::default() }).await.unwrap();
        assert!(page.messages.is_empty(), "limit 0 reads the position only");
        assert_eq!((page.offset, page.first), (10, 1));
        let grant = parts.view(p, "room:9").await.unwrap();
        assert_eq!(page.epoch, grant.epoch.to_string());
        let page = parts.history(p, "room:9", HistoryQuery::backward(None, 0)).await.unwrap();
        assert!(page.messages.is_empty() && page.offset == 10);
    }

    /// Presence at the owner (limits in `test_support`: join and leave on, a list of at most
    /// 3, pushes while at most 4 subscribers or clients): a repeated join replaces and pushes nothing,
    /// the list is bounded while the stats still answer, pushes stop above the threshold,
    /// a node's clients go with it, a channel with presence is not evicted, a seal clears it.
    #[tokio::test]
    async fn presence_joins_leaves_bounds_and_forgets() {
        use switchyard_proto::presence::{PresenceEntry, PresenceStats};
        let dir = tempfile::tempdir().unwrap();
        let parts = start(dir.path());
        let ch = "room:p";
        let p = parts.partition(ch);
        let (_, _out, mut inbox) = subscribe(&parts, ch, Start::From(StartFrom::Latest)).await;
        let n1: Arc<str> = "n1".into();
        let join = |client: &str, user: &str, node: &Arc<str>| {
            parts.join(p, ch, node.clone(), PresenceEntry::new(client, user), true)
        };
        join("1", "alice", &n1).await.unwrap();
        let d = inbox.recv().await;
        assert_eq!((d.kind, d.offset), (crate::outbox::Kind::Event, 0));
        let v: serde_json::Value = serde_json::from_slice(&d.frame).unwrap();
        assert_eq!((v["push"].as_str(), v["info"]["client"].as_str()), (Some("join"), Some("1")));
        join("1", "alice", &n1).await.unwrap();
        let n2: Arc<str> = "n2".into();
        join("2", "alice", &n2).await.unwrap();
        let d = inbox.recv().await;
        let v: serde_json::Value = serde_json::from_slice(&d.frame).unwrap();
        assert_eq!(v["info"]["client"].as_str(), Some("2"), "the repeated join pushed nothing");
        assert_eq!(parts.presence_stats(p, ch).await.unwrap(), PresenceStats { num_clients: 2, num_users: 1 });
        join("3", "bob", &n2).await.unwrap();
        inbox.recv().await;
        assert_eq!(parts.presence(p, ch).await.unwrap().len(), 3);
        join("4", "carol", &n1).await.unwrap();
        inbox.recv().await;
        let err = parts.presence(p, ch).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::LimitExceeded);
        assert!(err.message.contains("over 3 clients"), "{}", err.message);
        assert_eq!(parts.presence_stats(p, ch).await.unwrap(), PresenceStats { num_clients: 4, num_users: 3 });

        // Node n2 leaves: its two clients go, with leave pushes.
        parts.drop_presence_of("n2");
        let mut left = Vec::new();
        for _ in 0..2 {
            let v: serde_json::Value = serde_json::from_slice(&inbox.recv().await.frame).unwrap();
            assert_eq!(v["push"].as_str(), Some("leave"));
            left.push(v["info"]["client"].as_str().unwrap().to_string());
        }
        left.sort();
        assert_eq!(left, ["2", "3"]);
        assert_eq!(parts.presence_stats(p, ch).await.unwrap(), PresenceStats { num_clients: 2, num_users: 2 });

        // Above 4 subscribers: no join or leave pushes (the storm rule).
        let (_, _o2, mut second) = subscribe(&parts, ch, Start::From(StartFrom::Latest)).await;
        let mut more = Vec::new();
        for _ in 0..3 {
            more.push(subscribe(&parts, ch, Start::From(StartFrom::Latest)).await);
        }
        join("5", "dave", &n1).await.unwrap();
        parts.leave(p, ch, n1.clone(), "5").await.unwrap();
        assert!(inbox.try_recv().is_none() && second.try_recv().is_none(), "no pushes above the threshold");

        // A channel with presence and no subscriber is not idle: it is not evicted.
        let ghost = "ghost:p";
        let q = parts.partition(ghost);
        let (_, _og, _ig) = subscribe(&parts, ghost, Start::From(StartFrom::Latest)).await;
        let sub = parts.next_id() - 1;
        parts.join(q, ghost, n1.clone(), PresenceEntry::new("9", ""), true).await.unwrap();
        parts.unsubscribe(ghost, sub).await;
        for _ in 0..2 {
            parts.snapshot(q).await.unwrap();
        }
        assert_eq!(parts.presence_stats(q, ghost).await.unwrap().num_clients, 1, "kept while present");
        parts.leave(q, ghost, n1.clone(), "9").await.unwrap();
        assert!(parts.snapshot(q).await.unwrap().iter().all(|s| &*s.channel != ghost), "evicted once empty");

        // A seal clears presence (memory only); the sealed owner refuses presence.
        parts.seal(p, "moved".into()).await.unwrap();
        let refused = parts.presence_stats(p, ch).await.unwrap_err();
        assert_eq!(refused.refusal, Some(switchyard_proto::refusal::Refusal::Sealed));
        assert!(
            parts.store.startup_reader().channel_meta(p, ch).unwrap().is_none(),
            "presence never reaches the store"
        );
    }

    /// Reads are free: history, subscribe and unsubscribe of a channel that never sees a
    /// message write nothing to the store and leave no state behind; the first publish
    /// creates it.
    #[tokio::test]
    async fn reads_of_unknown_channels_store_nothing_and_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let parts = start(dir.path());
        let p = parts.partition("ghost:1");
        let page = parts.history(p, "ghost:1", HistoryQuery::default()).await.unwrap();
        assert!(page.messages.is_empty() && page.offset == 0);
        let (grant, _out, _inbox) = subscribe(&parts, "ghost:1", Start::From(StartFrom::Latest)).await;
        assert_eq!(grant.top, 0);
        let sub = parts.next_id() - 1;
        parts.unsubscribe("ghost:1", sub).await;
        assert!(parts.snapshot(p).await.unwrap().iter().all(|s| &*s.channel != "ghost:1"), "evicted");
        assert!(parts.store.startup_reader().channel_meta(p, "ghost:1").unwrap().is_none(), "nothing stored");
        assert!(parts.store.startup_reader().all_channels().unwrap().is_empty());

        // A client that saw the empty channel under an epoch recovers exactly from offset 0.
        let seen = page.epoch.clone();
        let recover = Start::From(StartFrom::Recover { offset: 0, epoch: seen.clone() });
        let (grant, _out, _inbox) = subscribe(&parts, "ghost:1", recover).await;
        assert_eq!((grant.recovered, &*grant.epoch), (Some(true), seen.as_str()));
        // The first publish stores the channel, under that same epoch.
        let ok = publish(&parts, "ghost:1", "1", None).await;
        assert_eq!((ok.offset, &*ok.epoch), (1, seen.as_str()));
        assert!(parts.store.startup_reader().channel_meta(p, "ghost:1").unwrap().is_some());
    }

    /// Pages every catch-up of `channel` from `after` up to `upto`, as a session does
    /// (pages of 256, continuing from the last offset received), returning what it got.
    async fn catch_up_all(
        parts: &Partitions,
        channel: &str,
        epoch: &Arc<str>,
        mut after: u64,
        upto: u64,
    ) -> Vec<(u64, String)> {
        let mut got = Vec::new();
        while after < upto {
            let (page, _) = parts.catch_up(channel, epoch, after, upto, 256).await.unwrap();
            assert!(!page.is_empty(), "an empty page after {after} while messages remain up to {upto}");
            for m in &page {
                assert!(m.offset > after && m.offset <= upto, "offset {} outside ({after}, {upto}]", m.offset);
                got.push((m.offset, m.data.get().to_string()));
                after = m.offset;
            }
        }
        got
    }

    /// Many clients recovering one channel from nearby offsets get exactly what an unshared
    /// read gives them, no gap and no duplicate, and the store reads each block once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_catch_ups_share_one_read_per_block() {
        let dir = tempfile::tempdir().unwrap();
        let parts = start(dir.path());
        let ch = "cu:shared";
        let p = parts.partition(ch);
        let publishes: Vec<_> = (1..=600).map(|i| parts.publish(p, req(ch, &format!("{{\"n\":{i}}}"), None))).collect();
        let mut acks = Vec::new();
        for pending in futures_util::future::join_all(publishes).await {
            acks.push(pending.unwrap());
        }
        let mut epoch = String::new();
        for ack in futures_util::future::join_all(acks).await {
            epoch = ack.unwrap().unwrap().epoch.to_string();
        }
        let epoch: Arc<str> = epoch.into();
        let top = parts.view(p, ch).await.unwrap().top;
        assert_eq!(top, 600);
        let unshared = parts.read(ch, &epoch, (0, top), 1000, false).await.unwrap();
        let all: Vec<(u64, String)> = unshared.iter().map(|m| (m.offset, m.data.get().to_string())).collect();
        assert_eq!(all.len(), 600);
        let before = parts.reads.load(Ordering::Relaxed);
        let clients: Vec<_> = (0..40u64)
            .map(|i| {
                let (parts, epoch) = (parts.clone(), epoch.clone());
                tokio::spawn(async move { (i * 3, catch_up_all(&parts, ch, &epoch, i * 3, top).await) })
            })
            .collect();
        for client in futures_util::future::join_all(clients).await {
            let (after, got) = client.unwrap();
            assert_eq!(got, all[after as usize..], "client from {after}");
        }
        // Blocks (0, 256], (256, 512] and (512, 600], each read once for 40 clients (twice
        // at most, if a client on a starved machine came after a page's 2 s): unshared,
        // 120 reads.
        let reads = parts.reads.load(Ordering::Relaxed) - before;
        assert!((3..=6).contains(&reads), "{reads} store reads for 3 blocks and 40 clients");
        assert!(parts.metrics.catch_up_shared_pages.get() >= 40 * 3 - reads, "shared pages are counted");
    }

    /// A shared page cut short by the byte budget never leaves a client past its end with
    /// an empty page while messages remain: it reads on from its own offset.
    #[tokio::test]
    async fn a_page_cut_by_the_byte_budget_gives_no_client_an_empty_page() {
        let dir = tempfile::tempdir().unwrap();
        let parts = start(dir.path());
        let ch = "cu:big";
        // About 300 KB each: a 1 MiB reply holds three of them.
        let big = format!("\"{}\"", "x".repeat(300_000));
        let mut epoch = String::new();
        for _ in 0..10 {
            epoch = publish(&parts, ch, &big, None).await.epoch.to_string();
        }
        let epoch: Arc<str> = epoch.into();
        let (first, _) = parts.catch_up(ch, &epoch, 0, 10, 256).await.unwrap();
        assert_eq!(first.iter().map(|m| m.offset).collect::<Vec<_>>(), vec![1, 2, 3], "cut by the budget");
        for after in [3, 5, 9] {
            let (page, _) = parts.catch_up(ch, &epoch, after, 10, 256).await.unwrap();
            assert_eq!(page.first().map(|m| m.offset), Some(after + 1), "the page from {after} starts right after it");
        }
        for after in 0..10 {
            let got = catch_up_all(&parts, ch, &epoch, after, 10).await;
            assert_eq!(got.iter().map(|m| m.0).collect::<Vec<_>>(), (after + 1..=10).collect::<Vec<_>>());
        }
        // Nothing past the top: an empty page, as an unshared read gives.
        assert!(parts.catch_up(ch, &epoch, 10, 10, 256).await.unwrap().0.is_empty());
    }
}
