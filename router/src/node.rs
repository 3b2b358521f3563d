//! One router node: the store, the partition owners, the partition map and the operations
//! that sessions and the HTTP API share.
//!
//! It owns startup (open the store, recover every channel, start one owner per partition
//! and the maintenance tasks) and the routing of each operation to its partition's owner
//! through the in-memory [`PartitionMap`]. It must never parse wire frames or hold a lock
//! across an await; the request path reads only memory.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::owner::{Command, Grant, Owner, PublishRequest, Start, View};
use crate::partition::{partition_of, PartitionId, PartitionMap};
use crate::policy::Policies;
use crate::protocol::{ErrorCode, MessageView, OpError, PublishOk};
use crate::store::{Store, StoreError};

/// Capacity of each owner's mailbox; a full mailbox makes senders wait (backpressure).
const OWNER_MAILBOX: usize = 8192;

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
    /// Messages, oldest first.
    pub messages: Vec<OwnedMessage>,
}

/// A stored message read back, in the protocol's message shape.
#[derive(Debug)]
pub struct OwnedMessage {
    /// Channel.
    pub channel: Arc<str>,
    /// Channel epoch.
    pub epoch: Arc<str>,
    /// Offset.
    pub offset: u64,
    /// The stored message (its `data` moved into [`OwnedMessage::data`]).
    pub msg: crate::store::StoredMessage,
    /// The payload, checked as JSON.
    pub data: Box<RawValue>,
}

impl OwnedMessage {
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

/// Builds the wasm host and loads the plugin folder (before any policy round runs).
fn start_plugins(config: &Config, metrics: Arc<Metrics>) -> Result<Arc<crate::plugin::registry::Registry>, StoreError> {
    use crate::plugin::{host, registry};
    let pc = &config.plugins;
    std::fs::create_dir_all(&config.plugins_dir)
        .map_err(|source| StoreError::DataDir { path: config.plugins_dir.clone(), source })?;
    let host = host::Host::new(Some(config.data_dir.join("plugin-cache"))).map_err(|e| StoreError::DataDir {
        path: config.plugins_dir.clone(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let limits = host::CallLimits { timeout: pc.call_timeout, max_memory: pc.memory_limit_bytes };
    let rules = registry::QuarantineRules {
        after: pc.quarantine_after,
        min: pc.quarantine_min,
        max: pc.quarantine_max,
        healthy_reset: pc.healthy_reset,
    };
    let plugins = registry::Registry::new(host, config.plugins_dir.clone(), limits, rules, metrics);
    plugins.rescan();
    Ok(plugins)
}

/// Where a channel is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// This node owns its partition.
    Local(PartitionId),
    /// `owner` does, in map `epoch`.
    Remote {
        /// Owner node id.
        owner: String,
        /// The map epoch that says so.
        epoch: u64,
    },
}

/// A running node.
pub struct Node {
    /// Validated configuration.
    pub config: Arc<Config>,
    /// The durable store.
    pub store: Arc<Store>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The policy plugins of `plugins_dir`.
    pub plugins: Arc<crate::plugin::registry::Registry>,
    /// Who owns which partition: static in standalone mode, installed by the cluster's
    /// watch in cluster mode. The request path only loads it (lock-free).
    pub map: ArcSwap<PartitionMap>,
    /// Retention and compaction bindings; replaced when the cluster's dynamic config
    /// changes the default retention limits.
    pub policies: ArcSwap<Policies>,
    /// Outgoing peer links (cluster mode with `cluster.secret` set).
    pub peers: Option<Arc<crate::peer::link::Links>>,
    /// Partition handovers under way.
    pub handovers: crate::handover::Handovers,
    /// Upstream subscriptions to remote channels (with `peers`).
    pub upstreams: Option<Arc<crate::peer::upstream::Upstreams>>,
    /// Cluster mode state (None in standalone mode).
    pub cluster: Option<Arc<crate::cluster::State>>,
    /// When the node started.
    pub started_at: std::time::SystemTime,
    /// Tokens, per-user sessions, the API key and the live (reloadable) limits.
    pub access: Arc<crate::access::Access>,
    owners: Vec<mpsc::Sender<Command>>,
    adoptions: Vec<mpsc::UnboundedSender<oneshot::Receiver<()>>>,
    next_id: AtomicU64,
    /// Flips to true when the node starts shutting down.
    pub shutdown: watch::Receiver<bool>,
    shutdown_tx: watch::Sender<bool>,
    owner_tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Node {
    /// Opens the store, recovers every channel and starts the owners and maintenance.
    pub fn start(config: Config) -> Result<Arc<Self>, StoreError> {
        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::new());
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|source| StoreError::DataDir { path: config.data_dir.clone(), source })?;
        let store = Store::open(&config.data_dir, config.fsync, metrics.clone())?;
        let p = config.partitions;
        let mut recovered: Vec<Vec<(String, crate::store::ChannelMeta)>> = (0..p).map(|_| Vec::new()).collect();
        let mut total = 0usize;
        for (partition, name, meta) in store.all_channels()? {
            // The stored partition is recomputed: a different P would move channels.
            let now = partition_of(&name, p);
            if now != partition {
                tracing::warn!(channel = %name, stored = partition, now, "channel stored under another partition count");
                continue;
            }
            recovered[partition as usize].push((name, meta));
            total += 1;
        }
        tracing::info!(channels = total, partitions = p, data_dir = %config.data_dir.display(), "store recovered");
        let mut owners = Vec::with_capacity(p as usize);
        let mut adoptions = Vec::with_capacity(p as usize);
        // Writes that reach a sealed partition, forwarded to its new owner (cluster mode
        // with peer links only).
        let peered = config.cluster.enabled() && config.cluster.secret.is_some();
        let (forward_tx, forward_rx) = mpsc::unbounded_channel();
        let mut tasks = Vec::with_capacity(p as usize);
        for (partition, channels) in recovered.into_iter().enumerate() {
            let (tx, rx) = mpsc::channel(OWNER_MAILBOX);
            let (adopt_tx, adopt_rx) = mpsc::unbounded_channel();
            let owner = Owner::new(
                partition as PartitionId,
                store.clone(),
                metrics.clone(),
                config.publish.idempotency_window,
                channels,
                rx,
                adopt_rx,
                peered.then(|| forward_tx.clone()),
            );
            tasks.push(tokio::spawn(owner.run()));
            owners.push(tx);
            adoptions.push(adopt_tx);
        }
        let plugins = start_plugins(&config, metrics.clone())?;
        let (shutdown_tx, shutdown) = watch::channel(false);
        // In cluster mode nothing is owned until the first map arrives from etcd.
        let (map, cluster) = if config.cluster.enabled() {
            (PartitionMap::unassigned(p), Some(crate::cluster::State::new(&config)))
        } else {
            (PartitionMap::standalone(&config.node_id, p), None)
        };
        let policies = ArcSwap::from_pointee(Policies::from_config(&config, Some(&plugins)));
        let access = Arc::new(crate::access::Access::new(&config));
        let secret = config.cluster.secret.clone().filter(|_| config.cluster.enabled());
        let node = Arc::new_cyclic(|weak| Self {
            handovers: Default::default(),
            upstreams: secret.as_ref().map(|_| Arc::new(crate::peer::upstream::Upstreams::new(weak.clone()))),
            peers: secret.map(|s| crate::peer::link::Links::new(weak.clone(), s)),
            access,
            config,
            store,
            metrics,
            plugins,
            map: ArcSwap::from_pointee(map),
            policies,
            cluster,
            started_at: std::time::SystemTime::now(),
            owners,
            adoptions,
            next_id: AtomicU64::new(1),
            shutdown,
            shutdown_tx,
            owner_tasks: std::sync::Mutex::new(tasks),
        });
        node.plugins.watch(node.config.plugins.reload_debounce, node.shutdown.clone());
        crate::maintenance::spawn(&node);
        crate::cluster::spawn(&node);
        if peered {
            tokio::spawn(crate::handover::forward_sealed(Arc::downgrade(&node), forward_rx));
        }
        Ok(node)
    }

    /// A process-unique id for a client or subscription.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The partition of `channel`.
    pub fn partition(&self, channel: &str) -> PartitionId {
        partition_of(channel, self.config.partitions)
    }

    /// Sends a command to the owner of `partition`, waiting only for mailbox space.
    pub async fn send_to(&self, partition: PartitionId, cmd: Command) -> Result<(), OpError> {
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

    /// Puts `cmd` in `partition`'s mailbox without waiting (a full mailbox hands it to a
    /// task), for callers that must not await.
    pub fn hold(&self, partition: PartitionId, cmd: Command) {
        let tx = &self.owners[partition as usize];
        if let Err(mpsc::error::TrySendError::Full(cmd)) = tx.try_send(cmd) {
            let tx = tx.clone();
            tokio::spawn(async move { tx.send(cmd).await });
        }
    }

    /// Where `channel` is served by the current map: here, or on `owner`. Errors only
    /// when no map has assigned its partition yet.
    pub fn locate(&self, channel: &str) -> Result<Route, OpError> {
        let p = self.partition(channel);
        let map = self.map.load();
        match map.owner(p) {
            Some(owner) if owner == self.config.node_id => Ok(Route::Local(p)),
            Some(owner) => Ok(Route::Remote { owner: owner.to_string(), epoch: map.epoch }),
            None => Err(OpError::new(ErrorCode::Unavailable, "no partition map yet: the cluster is still forming")),
        }
    }

    /// The partition of `channel` if this node owns it in the current map; otherwise
    /// `unavailable` naming the owner (until cross-node routing forwards it there).
    pub fn route(&self, channel: &str) -> Result<PartitionId, OpError> {
        let p = self.partition(channel);
        let map = self.map.load();
        match map.owner(p) {
            Some(owner) if owner == self.config.node_id => Ok(p),
            Some(owner) => {
                let url = self
                    .cluster
                    .as_ref()
                    .and_then(|c| c.view().nodes.get(owner).map(|n| n.url.clone()))
                    .map(|u| format!(" at {u}"))
                    .unwrap_or_default();
                Err(OpError::new(
                    ErrorCode::Unavailable,
                    format!("partition {p} is owned by node {owner}{url} (map epoch {}); connect there", map.epoch),
                ))
            }
            None => Err(OpError::new(ErrorCode::Unavailable, "no partition map yet: the cluster is still forming")),
        }
    }

    async fn send(&self, channel: &str, cmd: Command) -> Result<(), OpError> {
        self.send_to(self.route(channel)?, cmd).await
    }

    /// Rebuilds the policy bindings with the default namespace's retention limits
    /// overridden (None: the file's values).
    pub fn set_default_retention(&self, limits: Option<&crate::cluster::keys::RetentionLimits>) {
        let mut config = Config::clone(&self.config);
        if let Some(l) = limits {
            if let Some(v) = l.history_size {
                config.defaults.history_size = v;
            }
            if let Some(v) = l.history_ttl {
                config.defaults.history_ttl = v;
            }
            if let Some(v) = l.history_bytes {
                config.defaults.history_bytes = v;
            }
        }
        self.policies.store(Arc::new(Policies::from_config(&config, Some(&self.plugins))));
    }

    /// Publishes wherever the channel's owner is; the receiver yields the ack once the
    /// message is durable (locally, or on the owner over its peer link).
    pub async fn publish(
        self: &Arc<Self>,
        req: PublishRequest,
    ) -> Result<oneshot::Receiver<Result<PublishOk, OpError>>, OpError> {
        if let Route::Remote { .. } = self.locate(&req.channel)? {
            if self.peers.is_some() {
                let (tx, rx) = oneshot::channel();
                let started = crate::peer::start(self, crate::peer::wire::Op::publish(&req))?;
                tokio::spawn(async move {
                    let _ = tx.send(started.finish().await.and_then(|a| a.into_published()));
                });
                return Ok(rx);
            }
        }
        self.publish_enqueue(req).await
    }

    /// Publishes here (the caller checked this node owns the channel) and waits for the ack.
    pub async fn publish_local(&self, req: PublishRequest) -> Result<PublishOk, OpError> {
        self.publish_enqueue(req).await?.await.map_err(|_| OpError::new(ErrorCode::Unavailable, "owner stopped"))?
    }

    pub(crate) async fn publish_enqueue(
        &self,
        req: PublishRequest,
    ) -> Result<oneshot::Receiver<Result<PublishOk, OpError>>, OpError> {
        let (tx, rx) = oneshot::channel();
        let channel = req.channel.clone();
        self.send(&channel, Command::Publish(req, tx)).await?;
        Ok(rx)
    }

    /// Enqueues a subscription (at the owner here, or on the channel's upstream from its
    /// owner elsewhere); the receiver yields the grant.
    pub async fn subscribe(
        self: &Arc<Self>,
        channel: &str,
        sub: u64,
        outbox: Arc<crate::outbox::Outbox>,
        start: Start,
    ) -> Result<oneshot::Receiver<Result<Grant, OpError>>, OpError> {
        let (reply, rx) = oneshot::channel();
        if let (Route::Remote { .. }, Some(ups)) = (self.locate(channel)?, &self.upstreams) {
            let (node, ups, channel) = (self.clone(), ups.clone(), channel.to_string());
            tokio::spawn(async move {
                let _ = reply.send(ups.subscribe(&node, &channel, sub, outbox, start).await);
            });
            return Ok(rx);
        }
        self.send(channel, Command::Subscribe { channel: channel.to_string(), sub, outbox, start, reply }).await?;
        Ok(rx)
    }

    /// Channel facts for a gateway's grant (this node owns the channel).
    pub async fn info_local(&self, channel: &str, consumer: Option<String>) -> Result<crate::owner::Facts, OpError> {
        let (reply, rx) = oneshot::channel();
        self.send(channel, Command::Info { channel: channel.to_string(), consumer, reply }).await?;
        rx.await.map_err(|_| OpError::new(ErrorCode::Unavailable, "owner stopped"))?
    }

    /// Forgets a subscription: on the channel's upstream if it is one, else at the
    /// partition's owner here (which still holds it even if the map moved the channel).
    pub async fn unsubscribe(&self, channel: &str, sub: u64) {
        if self.upstreams.as_ref().is_some_and(|u| u.unsubscribe(channel, sub)) {
            return;
        }
        let cmd = Command::Unsubscribe { channel: channel.to_string(), sub };
        let _ = self.send_to(self.partition(channel), cmd).await;
    }

    /// Commits wherever the channel's owner is; the receiver yields once it is durable.
    pub async fn commit(
        self: &Arc<Self>,
        channel: &str,
        consumer: String,
        offset: u64,
    ) -> Result<oneshot::Receiver<Result<(), OpError>>, OpError> {
        if let Route::Remote { .. } = self.locate(channel)? {
            if self.peers.is_some() {
                let (tx, rx) = oneshot::channel();
                let op = crate::peer::wire::Op::Commit { channel: channel.into(), consumer, offset };
                let started = crate::peer::start(self, op)?;
                tokio::spawn(async move {
                    let _ = tx.send(started.finish().await.map(drop));
                });
                return Ok(rx);
            }
        }
        self.commit_enqueue(channel, consumer, offset).await
    }

    /// Commits here and waits until it is durable.
    pub async fn commit_local(&self, channel: &str, consumer: String, offset: u64) -> Result<(), OpError> {
        let rx = self.commit_enqueue(channel, consumer, offset).await?;
        rx.await.map_err(|_| OpError::new(ErrorCode::Unavailable, "owner stopped"))?
    }

    pub(crate) async fn commit_enqueue(
        &self,
        channel: &str,
        consumer: String,
        offset: u64,
    ) -> Result<oneshot::Receiver<Result<(), OpError>>, OpError> {
        let (reply, rx) = oneshot::channel();
        self.send(channel, Command::Commit { channel: channel.to_string(), consumer, offset, reply }).await?;
        Ok(rx)
    }

    /// Enqueues a view request (epoch and acknowledged top) for history.
    pub async fn view(&self, channel: &str) -> Result<oneshot::Receiver<View>, OpError> {
        let (tx, rx) = oneshot::channel();
        self.send(channel, Command::View(channel.to_string(), tx)).await?;
        Ok(rx)
    }

    /// Reads stored messages `after < offset <= upto`, at most `limit`.
    pub fn read(
        &self,
        channel: &str,
        epoch: &Arc<str>,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<OwnedMessage>, OpError> {
        let name: Arc<str> = channel.into();
        let rows = self
            .store
            .read_messages(self.partition(channel), channel, after, upto, limit)
            .map_err(|e| OpError::internal(e.to_string()))?;
        rows.into_iter()
            .map(|(offset, mut msg)| {
                // The payload moves into the checked RawValue; `view` reads it from there.
                let data = RawValue::from_string(std::mem::take(&mut msg.data))
                    .map_err(|e| OpError::internal(format!("stored payload: {e}")))?;
                Ok(OwnedMessage { channel: name.clone(), epoch: epoch.clone(), offset, msg, data })
            })
            .collect()
    }

    /// Catch-up for a subscription: stored messages `after < offset <= upto` of `epoch`
    /// (at most `limit`), from the store here or from the owner elsewhere, and the
    /// channel's first retained offset.
    pub async fn catch_up(
        self: &Arc<Self>,
        channel: &str,
        epoch: &Arc<str>,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<(Vec<OwnedMessage>, u64), OpError> {
        if let Route::Remote { .. } = self.locate(channel)? {
            if self.peers.is_some() {
                let mut page = self.history(channel, after, limit as u32).await?;
                if *page.epoch != **epoch {
                    return Err(OpError::new(ErrorCode::Unavailable, "the channel restarted under a new epoch"));
                }
                page.messages.retain(|m| m.offset <= upto);
                return Ok((page.messages, page.first));
            }
        }
        let p = self.partition(channel);
        let moving = || OpError::new(ErrorCode::Unavailable, "the channel's partition is moving");
        if self.handovers.is_adopting(p) {
            return Err(moving());
        }
        let messages = self.read(channel, epoch, after, upto, limit)?;
        // Read the metadata after the messages: a partition adopted (or restarted) in
        // between shows here as a busy partition or another epoch.
        match self.store.channel_meta(p, channel) {
            _ if self.handovers.is_adopting(p) => Err(moving()),
            Ok(Some(meta)) if *meta.epoch == **epoch => Ok((messages, meta.first)),
            Ok(Some(_)) => Err(OpError::new(ErrorCode::Unavailable, "the channel restarted under a new epoch")),
            _ => Ok((messages, u64::MAX)),
        }
    }

    /// A history page from wherever the channel's owner is.
    pub async fn history(self: &Arc<Self>, channel: &str, since: u64, limit: u32) -> Result<HistoryPage, OpError> {
        if let Route::Remote { .. } = self.locate(channel)? {
            if self.peers.is_some() {
                let op = crate::peer::wire::Op::History { channel: channel.into(), since, limit };
                return crate::peer::call(self, op).await?.into_history(channel);
            }
        }
        self.history_local(channel, since, limit).await
    }

    /// A history page: messages with offset > `since`, oldest first, at most `limit`.
    pub async fn history_local(&self, channel: &str, since: u64, limit: u32) -> Result<HistoryPage, OpError> {
        let view =
            self.view(channel).await?.await.map_err(|_| OpError::new(ErrorCode::Unavailable, "owner stopped"))?;
        let messages = self.read(channel, &view.epoch, since, view.top, limit as usize)?;
        Ok(HistoryPage { epoch: view.epoch.to_string(), offset: view.top, first: view.first, messages })
    }

    /// Publishes and waits for the ack (HTTP API).
    pub async fn publish_and_wait(self: &Arc<Self>, req: PublishRequest) -> Result<PublishOk, OpError> {
        self.publish(req).await?.await.map_err(|_| OpError::new(ErrorCode::Unavailable, "owner stopped"))?
    }

    /// Tells the listener and every session to stop.
    pub fn shutdown(&self) {
        let _ = self.shutdown_tx.send(true);
    }

    /// Called after sessions are gone: stops owners (after their queued work) and syncs.
    pub async fn close(self: &Arc<Self>) {
        if let Some(cluster) = &self.cluster {
            cluster.stopped(self.config.cluster.etcd_timeout * 2).await;
        }
        // Owners stop when every sender is dropped; ours are dropped with the node, so
        // instead wait until each mailbox is drained.
        for tx in &self.owners {
            let (reply, rx) = oneshot::channel();
            if tx.send(Command::Snapshot(reply)).await.is_ok() {
                let _ = rx.await;
            }
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
