//! The [`Router`]: the one entry point of every client operation, local or remote.
//!
//! It owns the routing decision: from the map (a `watch::Receiver` the cluster writes), a
//! channel's partition is either owned here ([`Route::Local`], run on the core layer's
//! [`Partitions`]) or elsewhere ([`Route::Remote`], forwarded over a peer link, or refused
//! naming the owner when peer links are off). That decision is made in [`Router::route`]
//! and nowhere else, and hashes the channel once. It must never wait on etcd, never parse
//! client frames and never hold a lock across an await: it only borrows the map.

use std::sync::Arc;
use std::time::Duration;

use switchyard_core::outbox::Outbox;
use switchyard_core::owner::{Forward, Grant, PublishRequest, Start};
use switchyard_core::{HistoryPage, OwnedMessage, Partitions};
use switchyard_metrics::Metrics;
use switchyard_proto::partition::{Members, PartitionId, PartitionMap};
use switchyard_proto::protocol::{ErrorCode, OpError, PublishOk};
use tokio::sync::{mpsc, oneshot, watch};

use crate::link::Links;
use crate::upstream::Upstreams;
use crate::wire::Op;

/// How long a redirected request waits for this node's map to reach the owner's epoch.
const EPOCH_WAIT: Duration = Duration::from_secs(1);

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

/// What the router needs besides the partitions.
pub struct Settings {
    /// This node's id.
    pub node_id: String,
    /// The peer links' shared secret; None turns peer links off.
    pub secret: Option<String>,
    /// How `https://` peers are verified (None: no CA configured, so such peers are
    /// refused).
    pub peer_tls: Option<Arc<rustls::ClientConfig>>,
    /// Whether the secret may cross a plaintext (`http://`) link.
    pub allow_plaintext_peers: bool,
}

/// Routes every operation to its partition's owner, here or on a peer.
///
/// Its fields are private: the other modules of this crate, and other crates, reach what
/// they need through the accessors below, which hand out shared references only.
pub struct Router {
    /// This node's id.
    node_id: String,
    /// The partitions of this node.
    partitions: Arc<Partitions>,
    /// Metrics.
    metrics: Arc<Metrics>,
    /// Who owns which partition (written by the cluster; static in standalone mode).
    map: watch::Receiver<Arc<PartitionMap>>,
    /// Live members (empty in standalone mode): where peers and owners are reached.
    members: watch::Receiver<Arc<Members>>,
    /// Outgoing peer links (cluster mode with `cluster.secret` set).
    peers: Option<Arc<Links>>,
    /// Upstream subscriptions to remote channels (with `peers`).
    upstreams: Option<Arc<Upstreams>>,
    /// Flips to true when the node starts shutting down.
    shutdown: watch::Receiver<bool>,
    /// The cluster-wide session cap's state on this node.
    seats: crate::seats::Seats,
}

impl Router {
    /// A router over `partitions`, reading the map and members the cluster publishes.
    pub fn new(
        settings: Settings,
        partitions: Arc<Partitions>,
        map: watch::Receiver<Arc<PartitionMap>>,
        members: watch::Receiver<Arc<Members>>,
        shutdown: watch::Receiver<bool>,
    ) -> Arc<Self> {
        let metrics = partitions.metrics.clone();
        // Links and upstreams call back into the router (incoming pushes, resubscribes):
        // they hold it weakly, so dropping the router stops them.
        Arc::new_cyclic(|weak: &std::sync::Weak<Self>| {
            if settings.secret.is_some() {
                tokio::spawn(crate::replica::isr_checks(weak.clone()));
                tokio::spawn(crate::seats::sweep_on_leave(weak.clone(), members.clone()));
            }
            Self {
                upstreams: settings.secret.as_ref().map(|_| Arc::new(Upstreams::new(weak.clone()))),
                peers: settings.secret.map(|secret| {
                    let dial = crate::link::Dial {
                        secret,
                        tls: settings.peer_tls.clone(),
                        allow_plaintext: settings.allow_plaintext_peers,
                    };
                    Links::new(weak.clone(), dial)
                }),
                node_id: settings.node_id,
                partitions,
                metrics,
                map,
                members,
                shutdown,
                seats: Default::default(),
            }
        })
    }

    /// This node's id.
    pub fn id(&self) -> &str {
        &self.node_id
    }

    /// The partitions of this node (the core layer).
    pub fn partitions(&self) -> &Arc<Partitions> {
        &self.partitions
    }

    /// The node's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The outgoing peer links, when peer links are on.
    pub(crate) fn links(&self) -> Option<&Arc<Links>> {
        self.peers.as_ref()
    }

    /// The upstream subscriptions to remote channels, when peer links are on.
    pub(crate) fn upstreams(&self) -> Option<&Arc<Upstreams>> {
        self.upstreams.as_ref()
    }

    /// True once the node has started shutting down.
    pub(crate) fn shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// A receiver that changes when the node starts shutting down.
    pub(crate) fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.clone()
    }

    /// The cluster-wide session cap's state on this node.
    pub(crate) fn seats(&self) -> &crate::seats::Seats {
        &self.seats
    }

    /// Called by the cluster with a new map before it is installed: partitions moving here
    /// get their mailbox held and start being pulled from their old owner.
    pub fn before_install(self: &Arc<Self>, new: &PartitionMap) {
        crate::replica::before_install(self, new);
        crate::handover::before_install(self, new);
    }

    /// Called by the cluster after a map install: partitions that left this node are sealed.
    pub fn after_install(self: &Arc<Self>, before: &PartitionMap) {
        let epoch = self.map().epoch;
        crate::handover::after_install(self, before);
        crate::replica::after_install(self);
        self.after_install_seats(before);
        self.partitions().handovers.installed(epoch);
    }

    /// Forwards the writes that reach a sealed partition to its new owner, until the
    /// router is dropped.
    pub fn forward_sealed(self: &Arc<Self>, writes: mpsc::UnboundedReceiver<Forward>) {
        tokio::spawn(crate::handover::forward_sealed(Arc::downgrade(self), writes));
    }

    /// True when peer links are on (cluster mode with a secret).
    pub fn peers_enabled(&self) -> bool {
        self.links().is_some()
    }

    /// The current partition map.
    pub fn map(&self) -> Arc<PartitionMap> {
        self.map.borrow().clone()
    }

    /// A receiver of every new map (for waiting on changes).
    pub fn map_changes(&self) -> watch::Receiver<Arc<PartitionMap>> {
        self.map.clone()
    }

    /// A receiver of every new member list (for waiting on changes).
    pub fn member_changes(&self) -> watch::Receiver<Arc<Members>> {
        self.members.clone()
    }

    /// The current members.
    pub fn members(&self) -> Arc<Members> {
        self.members.borrow().clone()
    }

    /// A process-unique id for a client or subscription.
    pub fn next_id(&self) -> u64 {
        self.partitions().next_id()
    }

    /// Waits (at most a second) until the installed map has reached `epoch`.
    pub async fn wait_for_epoch(&self, epoch: u64) {
        let mut map = self.map.clone();
        let _ = tokio::time::timeout(EPOCH_WAIT, map.wait_for(|m| m.epoch >= epoch)).await;
    }

    /// What the map says about `channel`, whether or not peer links are on.
    pub(crate) fn locate(&self, channel: &str) -> Result<Route, OpError> {
        let p = self.partitions().partition(channel);
        let map = self.map.borrow();
        match map.owner(p) {
            Some(owner) if owner == self.id() => Ok(Route::Local(p)),
            Some(owner) => Ok(Route::Remote { owner: owner.to_string(), epoch: map.epoch }),
            None => Err(OpError::new(ErrorCode::Unavailable, "no partition map yet: the cluster is still forming")),
        }
    }

    /// Where `channel` is served: here, or on an owner this node forwards to. Without peer
    /// links a remote channel is an `unavailable` error naming the owner.
    pub fn route(&self, channel: &str) -> Result<Route, OpError> {
        match self.locate(channel)? {
            Route::Remote { owner, epoch } if self.links().is_none() => {
                Err(self.owned_elsewhere(channel, &owner, epoch))
            }
            route => Ok(route),
        }
    }

    /// The partition of `channel` if this node owns it in the current map; otherwise
    /// `unavailable` naming the owner.
    pub fn local(&self, channel: &str) -> Result<PartitionId, OpError> {
        match self.locate(channel)? {
            Route::Local(p) => Ok(p),
            Route::Remote { owner, epoch } => Err(self.owned_elsewhere(channel, &owner, epoch)),
        }
    }

    fn owned_elsewhere(&self, channel: &str, owner: &str, epoch: u64) -> OpError {
        let p = self.partitions().partition(channel);
        let url = self.members.borrow().get(owner).map(|m| format!(" at {}", m.url)).unwrap_or_default();
        OpError::new(
            ErrorCode::Unavailable,
            format!("partition {p} is owned by node {owner}{url} (map epoch {epoch}); connect there"),
        )
    }

    /// Publishes wherever the channel's owner is: once this returns, the write is in the
    /// owner's mailbox here or queued on the owner's link, so publishes started in order
    /// keep their order. [`Publishing::acked`] then waits for durability.
    pub async fn publish(self: &Arc<Self>, req: PublishRequest) -> Result<Publishing, OpError> {
        match self.route(&req.channel)? {
            Route::Local(p) => Ok(Publishing(Pending::Local(self.partitions().publish(p, req).await?))),
            Route::Remote { .. } => Ok(Publishing(Pending::Remote(crate::call::start(self, Op::publish(&req))?))),
        }
    }

    /// Publishes and waits for the ack.
    pub async fn publish_and_wait(self: &Arc<Self>, req: PublishRequest) -> Result<PublishOk, OpError> {
        self.publish(req).await?.acked().await
    }

    /// Enqueues a subscription (at the owner here, or on the channel's upstream from its
    /// owner elsewhere); the receiver yields the grant.
    pub async fn subscribe(
        self: &Arc<Self>,
        channel: &str,
        sub: u64,
        outbox: Arc<Outbox>,
        start: Start,
    ) -> Result<oneshot::Receiver<Result<Grant, OpError>>, OpError> {
        match (self.route(channel)?, self.upstreams()) {
            (Route::Remote { .. }, Some(ups)) => {
                let (reply, rx) = oneshot::channel();
                let (router, ups, channel) = (self.clone(), ups.clone(), channel.to_string());
                tokio::spawn(async move {
                    let _ = reply.send(ups.subscribe(&router, &channel, sub, outbox, start).await);
                });
                Ok(rx)
            }
            (route, _) => {
                let p = match route {
                    Route::Local(p) => p,
                    Route::Remote { .. } => unreachable!("remote routes exist only with peer links"),
                };
                self.partitions().subscribe(p, channel, sub, outbox, start).await
            }
        }
    }

    /// Forgets a subscription: on the channel's upstream if it is one, else at the
    /// partition's owner here (which still holds it even if the map moved the channel).
    pub async fn unsubscribe(&self, channel: &str, sub: u64) {
        if self.upstreams().is_some_and(|u| u.unsubscribe(channel, sub)) {
            return;
        }
        self.partitions().unsubscribe(channel, sub).await;
    }

    /// Commits wherever the channel's owner is; the receiver yields once it is durable.
    pub async fn commit(
        self: &Arc<Self>,
        channel: &str,
        consumer: String,
        offset: u64,
    ) -> Result<oneshot::Receiver<Result<(), OpError>>, OpError> {
        match self.route(channel)? {
            Route::Local(p) => self.partitions().commit(p, channel, consumer, offset).await,
            Route::Remote { .. } => {
                let op = Op::Commit { channel: channel.into(), consumer, offset };
                let started = crate::call::start(self, op)?;
                let (tx, rx) = oneshot::channel();
                tokio::spawn(async move {
                    let _ = tx.send(started.finish().await.map(drop));
                });
                Ok(rx)
            }
        }
    }

    /// A history page from wherever the channel's owner is.
    pub async fn history(self: &Arc<Self>, channel: &str, since: u64, limit: u32) -> Result<HistoryPage, OpError> {
        match self.route(channel)? {
            Route::Local(p) => self.partitions().history(p, channel, since, limit).await,
            Route::Remote { .. } => {
                let op = Op::History { channel: channel.into(), since, limit };
                crate::call::call(self, op).await?.into_history(channel)
            }
        }
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
        match self.route(channel)? {
            Route::Local(_) => self.partitions().catch_up(channel, epoch, after, upto, limit),
            Route::Remote { .. } => {
                let mut page = self.history(channel, after, limit as u32).await?;
                if *page.epoch != **epoch {
                    return Err(OpError::new(ErrorCode::Unavailable, "the channel restarted under a new epoch"));
                }
                page.messages.retain(|m| m.offset <= upto);
                Ok((page.messages, page.first))
            }
        }
    }
}

/// A publish under way. The caller awaits it in place: no task is spawned per publish,
/// local or forwarded.
pub struct Publishing(Pending);

enum Pending {
    /// The owner here answers once the message is durable.
    Local(oneshot::Receiver<Result<PublishOk, OpError>>),
    /// Sent to the owner over its link; follows redirects until answered.
    Remote(crate::call::Started),
}

impl Publishing {
    /// The acknowledgement: offset and epoch once the message is durable (on every in-sync
    /// replica), or why it failed.
    pub async fn acked(self) -> Result<PublishOk, OpError> {
        match self.0 {
            Pending::Local(rx) => {
                rx.await.unwrap_or_else(|_| Err(OpError::new(ErrorCode::Unavailable, "owner stopped")))
            }
            Pending::Remote(started) => started.finish().await.and_then(|a| a.into_published()),
        }
    }
}
