//! The [`Router`]: the one entry point of every client operation, local or remote.
//!
//! It is the crate's facade, and its top: the server and the cluster hold a [`Router`],
//! and nothing in this crate depends on this module. It wires the parts together (the
//! node's routing state, the links, the upstream subscriptions, the replication and seat
//! tasks), offers the client operations (publish, subscribe, commit, history, catch-up,
//! a seat, presence), each routed once by [`Node::locate`](crate::node::Node) to the owner here
//! (the core layer's [`Partitions`]) or elsewhere (forwarded over a peer link, or refused
//! naming the owner when peer links are off), and hands map installs to handover,
//! replication and seats. It must never wait on etcd, never parse client frames and never
//! hold a lock across an await.

use std::sync::{Arc, Weak};

use switchyard_core::outbox::Outbox;
use switchyard_core::owner::{Forward, Grant, PublishRequest, Start};
use switchyard_core::{HistoryPage, HistoryQuery, OwnedMessage, Partitions};
use switchyard_metrics::Metrics;
use switchyard_proto::partition::{Members, PartitionId, PartitionMap};
use switchyard_proto::protocol::{ErrorCode, OpError, PublishOk};
use switchyard_proto::refusal::Refusal;
use tokio::sync::{mpsc, oneshot, watch};

use crate::link::{Dial, LinkEnv, Links};
use crate::node::{Node, Route};
use crate::presence::Announced;
use crate::seats::Seating;
use crate::upstream::Upstreams;
use crate::wire::Op;
use switchyard_proto::presence::{PresenceEntry, PresenceStats};

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
    /// The local address peer links are dialed from (None: the system's choice).
    pub bind: Option<std::net::IpAddr>,
}

/// Routes every operation to its partition's owner, here or on a peer.
pub struct Router {
    /// The routing state every part reads.
    node: Arc<Node>,
    /// Upstream subscriptions to remote channels (with peer links).
    upstreams: Option<Arc<Upstreams>>,
    /// The presence this node's sessions announced (re-announced when a channel moves).
    announced: Arc<Announced>,
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
        let links = settings.secret.map(|secret| {
            let env =
                LinkEnv { members: members.clone(), shutdown: shutdown.clone(), metrics: partitions.metrics.clone() };
            let dial = Dial {
                secret,
                tls: settings.peer_tls.clone(),
                allow_plaintext: settings.allow_plaintext_peers,
                bind: settings.bind,
            };
            Links::new(env, dial)
        });
        let peers = links.is_some();
        let node = Arc::new(Node::new(settings.node_id, partitions, map, members.clone(), shutdown, links));
        // The tasks hold the node weakly: dropping the router stops them.
        if peers {
            tokio::spawn(crate::replica::isr_checks(Arc::downgrade(&node)));
            tokio::spawn(crate::presence::drop_on_leave(Arc::downgrade(&node), members.clone()));
            tokio::spawn(crate::reach::dial_members(Arc::downgrade(&node), members.clone()));
            tokio::spawn(crate::seats::sweep_on_leave(Arc::downgrade(&node), members));
        }
        let upstreams = peers.then(|| Upstreams::new(Arc::downgrade(&node)));
        Arc::new(Self { node, upstreams, announced: Arc::default() })
    }

    /// The routing state, for the `/peer` endpoint.
    pub(crate) fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// This node's id.
    pub fn id(&self) -> &str {
        self.node.id()
    }

    /// The partitions of this node (the core layer).
    pub fn partitions(&self) -> &Arc<Partitions> {
        self.node.partitions()
    }

    /// The node's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        self.node.metrics()
    }

    /// True when peer links are on (cluster mode with a secret).
    pub fn peers_enabled(&self) -> bool {
        self.node.peers_enabled()
    }

    /// The peers whose link is up, changing as links come up and go down (None without
    /// peer links).
    pub fn reachable(&self) -> Option<watch::Receiver<crate::Reachable>> {
        self.node.links().map(|l| l.reachable())
    }

    /// The current partition map.
    pub fn map(&self) -> Arc<PartitionMap> {
        self.node.map()
    }

    /// A receiver of every new map (for waiting on changes).
    pub fn map_changes(&self) -> watch::Receiver<Arc<PartitionMap>> {
        self.node.map_changes()
    }

    /// A receiver of every new member list (for waiting on changes).
    pub fn member_changes(&self) -> watch::Receiver<Arc<Members>> {
        self.node.member_changes()
    }

    /// The current members.
    pub fn members(&self) -> Arc<Members> {
        self.node.members()
    }

    /// A process-unique id for a client or subscription.
    pub fn next_id(&self) -> u64 {
        self.node.next_id()
    }

    /// Waits (at most a second) until the installed map has reached `epoch`.
    pub async fn wait_for_epoch(&self, epoch: u64) {
        self.node.wait_for_epoch(epoch).await
    }

    /// Where `channel` is served: here, or on an owner this node forwards to. Without peer
    /// links a remote channel is an `unavailable` error naming the owner.
    pub fn route(&self, channel: &str) -> Result<Route, OpError> {
        self.node.route(channel)
    }

    /// The partition of `channel` if this node owns it in the current map; otherwise
    /// `unavailable` naming the owner.
    pub fn local(&self, channel: &str) -> Result<PartitionId, OpError> {
        self.node.local(channel)
    }

    /// Called by the cluster with a new map before it is installed: partitions moving here
    /// get their mailbox held and start being pulled from their old owner.
    pub fn before_install(&self, new: &PartitionMap) {
        crate::replica::before_install(&self.node, new);
        crate::handover::before_install(&self.node, new);
    }

    /// Called by the cluster after a map install: partitions that left this node are sealed.
    pub fn after_install(&self, before: &PartitionMap) {
        let epoch = self.node.map().epoch;
        crate::handover::after_install(&self.node, before);
        crate::replica::after_install(&self.node);
        crate::seats::after_install(&self.node, before);
        crate::presence::after_install(&self.node, &self.announced, before);
        self.node.partitions().handovers.installed(epoch);
    }

    /// Records `entry` in `channel`'s presence at its owner (a `join` push to the
    /// channel's subscribers if the client is new and the namespace sends them), and in
    /// this node's registry, from which it is announced again if the channel moves.
    pub async fn join(&self, channel: &str, entry: PresenceEntry) -> Result<(), OpError> {
        crate::presence::join(&self.node, &self.announced, channel, entry).await
    }

    /// Forgets `client` in `channel`'s presence (a `leave` push) and in this node's
    /// registry. Best effort: an owner that cannot be reached forgets it when it restarts
    /// or this node leaves.
    pub async fn leave(&self, channel: &str, client: &str) {
        crate::presence::leave(&self.node, &self.announced, channel, client).await
    }

    /// Every client in `channel`'s presence, from its owner (`limit_exceeded` past the
    /// namespace's `presence_max_list`; `unavailable` from an owner that predates presence).
    pub async fn presence(&self, channel: &str) -> Result<Vec<PresenceEntry>, OpError> {
        crate::presence::list(&self.node, channel).await
    }

    /// The counts of `channel`'s presence, from its owner.
    pub async fn presence_stats(&self, channel: &str) -> Result<PresenceStats, OpError> {
        crate::presence::stats(&self.node, channel).await
    }

    /// Forwards the writes that reach a sealed partition to its new owner, until the
    /// router is dropped.
    pub fn forward_sealed(self: &Arc<Self>, writes: mpsc::UnboundedReceiver<Forward>) {
        tokio::spawn(forward_sealed(Arc::downgrade(self), writes));
    }

    /// Asks the user's seat holder for a seat for connection `conn` under `max`.
    pub async fn take_seat(&self, user: &str, conn: u64, max: usize) -> Seating {
        crate::seats::take(&self.node, user, conn, max).await
    }

    /// Publishes wherever the channel's owner is: once this returns, the write is in the
    /// owner's mailbox here or queued on the owner's link, so publishes started in order
    /// keep their order. [`Publishing::acked`] then waits for durability.
    pub async fn publish(self: &Arc<Self>, req: PublishRequest) -> Result<Publishing, OpError> {
        match self.node.route(&req.channel)? {
            Route::Local(p) => Ok(Publishing(Pending::Local(self.node.partitions().publish(p, req).await?))),
            Route::Remote { .. } => Ok(Publishing(Pending::Remote(crate::call::start(&self.node, Op::publish(&req))?))),
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
        match (self.node.route(channel)?, &self.upstreams) {
            (Route::Remote { .. }, Some(ups)) => {
                let (reply, rx) = oneshot::channel();
                let (node, ups, channel) = (self.node.clone(), ups.clone(), channel.to_string());
                tokio::spawn(async move {
                    let _ = reply.send(ups.subscribe(&node, &channel, sub, outbox, start).await);
                });
                Ok(rx)
            }
            (route, _) => {
                let p = match route {
                    Route::Local(p) => p,
                    Route::Remote { .. } => unreachable!("remote routes exist only with peer links"),
                };
                self.node.partitions().subscribe(p, channel, sub, outbox, start).await
            }
        }
    }

    /// Forgets a subscription: on the channel's upstream if it is one, else at the
    /// partition's owner here (which still holds it even if the map moved the channel).
    pub async fn unsubscribe(&self, channel: &str, sub: u64) {
        if self.upstreams.as_ref().is_some_and(|u| u.unsubscribe(channel, sub)) {
            return;
        }
        self.node.partitions().unsubscribe(channel, sub).await;
    }

    /// Commits wherever the channel's owner is; the receiver yields once it is durable.
    pub async fn commit(
        self: &Arc<Self>,
        channel: &str,
        consumer: String,
        offset: u64,
    ) -> Result<oneshot::Receiver<Result<(), OpError>>, OpError> {
        match self.node.route(channel)? {
            Route::Local(p) => self.node.partitions().commit(p, channel, consumer, offset).await,
            Route::Remote { .. } => {
                let op = Op::Commit { channel: channel.into(), consumer, offset };
                let started = crate::call::start(&self.node, op)?;
                let (tx, rx) = oneshot::channel();
                tokio::spawn(async move {
                    let _ = tx.send(started.finish().await.map(drop));
                });
                Ok(rx)
            }
        }
    }

    /// A history page (see [`HistoryQuery`]: a range, a limit, an order) from wherever
    /// the channel's owner is. A backward read whose owner runs a version too old for it
    /// (a rolling upgrade) gets `unavailable`.
    pub async fn history(self: &Arc<Self>, channel: &str, q: HistoryQuery) -> Result<HistoryPage, OpError> {
        match self.node.route(channel)? {
            Route::Local(p) => self.node.partitions().history(p, channel, q).await,
            Route::Remote { .. } => crate::call::call(&self.node, Op::history(channel, q)).await?.into_history(channel),
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
        match self.node.route(channel)? {
            Route::Local(_) => self.node.partitions().catch_up(channel, epoch, after, upto, limit).await,
            Route::Remote { .. } => {
                let mut page = self.history(channel, HistoryQuery::forward(after, limit as u32)).await?;
                if *page.epoch != **epoch {
                    return Err(OpError::new(ErrorCode::Unavailable, "the channel restarted under a new epoch"));
                }
                page.messages.retain(|m| m.offset <= upto);
                Ok((page.messages, page.first))
            }
        }
    }
}

/// Forwards writes that reached a sealed partition (they raced the seal) to wherever the
/// map now puts their channel, and answers them from there.
async fn forward_sealed(router: Weak<Router>, mut writes: tokio::sync::mpsc::UnboundedReceiver<Forward>) {
    while let Some(write) = writes.recv().await {
        let Some(router) = router.upgrade() else { return };
        tokio::spawn(async move {
            let sealed = || OpError::refused(Refusal::Sealed, switchyard_core::owner::SEALED);
            match write {
                Forward::Publish(req, reply) => {
                    // Only ever onwards: a partition still local here would come back sealed.
                    let result = match router.node.locate(&req.channel) {
                        Ok(Route::Remote { .. }) => match router.publish(req).await {
                            Ok(publishing) => publishing.acked().await,
                            Err(e) => Err(e),
                        },
                        _ => Err(sealed()),
                    };
                    let _ = reply.send(result);
                }
                Forward::Commit { channel, consumer, offset, reply } => {
                    let result = match router.node.locate(&channel) {
                        Ok(Route::Remote { .. }) => match router.commit(&channel, consumer, offset).await {
                            Ok(rx) => rx.await.unwrap_or_else(|_| Err(sealed())),
                            Err(e) => Err(e),
                        },
                        _ => Err(sealed()),
                    };
                    let _ = reply.send(result);
                }
            }
        });
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
