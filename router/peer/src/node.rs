//! The node's routing state: the context every subsystem of this crate reads.
//!
//! It owns [`Node`]: this node's id, its partitions, metrics, the map and the member list
//! (`watch::Receiver`s the cluster writes), the outgoing peer links and the seat table,
//! and the one routing decision: from the map, a channel's partition is either owned here
//! ([`Route::Local`]) or elsewhere ([`Route::Remote`]). That decision is made in
//! [`Node::locate`] and nowhere else, and hashes the channel once. Every module of the
//! crate but the [`Router`](crate::Router) facade depends on this one and never on the
//! facade, so the crate's modules import each other in one direction. It must never wait
//! on etcd, never parse client frames and never hold a lock across an await: it only
//! borrows the map.

use std::sync::Arc;
use std::time::Duration;

use switchyard_core::Partitions;
use switchyard_metrics::Metrics;
use switchyard_proto::partition::{Members, PartitionId, PartitionMap};
use switchyard_proto::protocol::{ErrorCode, OpError};
use tokio::sync::watch;

use crate::link::Links;
use crate::seat_table::Seats;

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

/// This node's routing state. Its fields are private: modules reach what they need
/// through the accessors, which hand out shared references only.
pub(crate) struct Node {
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
    /// Flips to true when the node starts shutting down.
    shutdown: watch::Receiver<bool>,
    /// The cluster-wide session cap's state on this node.
    seats: Seats,
}

impl Node {
    /// The state of a node with these parts.
    pub(crate) fn new(
        node_id: String,
        partitions: Arc<Partitions>,
        map: watch::Receiver<Arc<PartitionMap>>,
        members: watch::Receiver<Arc<Members>>,
        shutdown: watch::Receiver<bool>,
        peers: Option<Arc<Links>>,
    ) -> Self {
        let metrics = partitions.metrics.clone();
        Self { node_id, partitions, metrics, map, members, peers, shutdown, seats: Seats::default() }
    }

    /// This node's id.
    pub(crate) fn id(&self) -> &str {
        &self.node_id
    }

    /// The partitions of this node (the core layer).
    pub(crate) fn partitions(&self) -> &Arc<Partitions> {
        &self.partitions
    }

    /// The node's metrics.
    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The outgoing peer links, when peer links are on.
    pub(crate) fn links(&self) -> Option<&Arc<Links>> {
        self.peers.as_ref()
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
    pub(crate) fn seats(&self) -> &Seats {
        &self.seats
    }

    /// True when peer links are on (cluster mode with a secret).
    pub(crate) fn peers_enabled(&self) -> bool {
        self.links().is_some()
    }

    /// The current partition map.
    pub(crate) fn map(&self) -> Arc<PartitionMap> {
        self.map.borrow().clone()
    }

    /// A receiver of every new map (for waiting on changes).
    pub(crate) fn map_changes(&self) -> watch::Receiver<Arc<PartitionMap>> {
        self.map.clone()
    }

    /// A receiver of every new member list (for waiting on changes).
    pub(crate) fn member_changes(&self) -> watch::Receiver<Arc<Members>> {
        self.members.clone()
    }

    /// The current members.
    pub(crate) fn members(&self) -> Arc<Members> {
        self.members.borrow().clone()
    }

    /// A process-unique id for a client or subscription.
    pub(crate) fn next_id(&self) -> u64 {
        self.partitions().next_id()
    }

    /// Waits (at most a second) until the installed map has reached `epoch`.
    pub(crate) async fn wait_for_epoch(&self, epoch: u64) {
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
    pub(crate) fn route(&self, channel: &str) -> Result<Route, OpError> {
        match self.locate(channel)? {
            Route::Remote { owner, epoch } if self.links().is_none() => {
                Err(self.owned_elsewhere(channel, &owner, epoch))
            }
            route => Ok(route),
        }
    }

    /// The partition of `channel` if this node owns it in the current map; otherwise
    /// `unavailable` naming the owner.
    pub(crate) fn local(&self, channel: &str) -> Result<PartitionId, OpError> {
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

    /// Whether node `n` is this node or a live member.
    pub(crate) fn liveness(&self) -> impl Fn(&str) -> bool {
        let (me, members) = (self.node_id.clone(), self.members());
        move |n: &str| n == me || members.contains_key(n)
    }
}
