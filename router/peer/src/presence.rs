//! Presence across nodes: the calling side of join, leave, list and stats, the presence
//! this node's sessions announced, and keeping owners' presence true as nodes come and go.
//!
//! It owns the node-local registry of announced entries ([`Announced`]): every join a
//! session of this node made, whatever node owns the channel, so that when the map moves a
//! channel's partition this node announces its clients again to the new owner (without a
//! `join` push: they never left), since an owner holds presence in memory only and a seal
//! clears it. It also watches the member list and tells this node's owners to drop the
//! clients of every node that left, so a killed node's clients leave presence within its
//! lease. It must never hold a lock across an await, and never keep presence of its own
//! beyond what its sessions announced: the owner's copy is the one clients read.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};

use switchyard_proto::partition::{partition_of, Members, PartitionMap};
use switchyard_proto::presence::{PresenceEntry, PresenceStats};
use switchyard_proto::protocol::OpError;
use tokio::sync::watch;

use crate::node::Node;
use crate::wire::{Answer, Op, WireEntry};

/// The presence this node's sessions announced: channel → client → entry.
#[derive(Default)]
pub(crate) struct Announced {
    channels: Mutex<HashMap<String, HashMap<String, PresenceEntry>>>,
}

impl Announced {
    fn insert(&self, channel: &str, entry: PresenceEntry) {
        let mut g = self.channels.lock().expect("announced presence");
        g.entry(channel.to_string()).or_default().insert(entry.client.clone(), entry);
    }

    fn remove(&self, channel: &str, client: &str) {
        let mut g = self.channels.lock().expect("announced presence");
        if let Some(clients) = g.get_mut(channel) {
            clients.remove(client);
            if clients.is_empty() {
                g.remove(channel);
            }
        }
    }

    fn get(&self, channel: &str, client: &str) -> Option<PresenceEntry> {
        self.channels.lock().expect("announced presence").get(channel)?.get(client).cloned()
    }

    /// `(channel, client)` of every entry whose channel `moved` says moved.
    fn moved(&self, moved: impl Fn(&str) -> bool) -> Vec<(String, String)> {
        let g = self.channels.lock().expect("announced presence");
        g.iter()
            .filter(|(channel, _)| moved(channel))
            .flat_map(|(channel, clients)| clients.keys().map(move |c| (channel.clone(), c.clone())))
            .collect()
    }
}

/// Records `entry` at the channel's owner (a `join` push if new) and in the registry.
pub(crate) async fn join(
    node: &Arc<Node>,
    reg: &Announced,
    channel: &str,
    entry: PresenceEntry,
) -> Result<(), OpError> {
    let op = Op::Join {
        channel: channel.to_string(),
        node: node.id().to_string(),
        entry: Box::new(WireEntry::from(&entry)),
        announce: true,
    };
    // Registered first: if the owner cannot be reached now, the next move announces it.
    reg.insert(channel, entry);
    crate::call::call(node, op).await.map(drop)
}

/// Forgets `client` at the channel's owner (a `leave` push) and in the registry; best
/// effort (an owner that is gone has forgotten it, a node that left takes it along).
pub(crate) async fn leave(node: &Arc<Node>, reg: &Announced, channel: &str, client: &str) {
    reg.remove(channel, client);
    let op = Op::Leave { channel: channel.to_string(), node: node.id().to_string(), client: client.to_string() };
    if let Err(e) = crate::call::call(node, op).await {
        tracing::debug!(channel, client, error = %e, "presence leave failed");
    }
}

/// The channel's presence list from its owner.
pub(crate) async fn list(node: &Arc<Node>, channel: &str) -> Result<Vec<PresenceEntry>, OpError> {
    match crate::call::call(node, Op::Presence { channel: channel.to_string() }).await? {
        Answer::Presence(list) => Ok(list.into_iter().map(WireEntry::into_entry).collect()),
        _ => Err(OpError::internal("peer answered presence with another answer")),
    }
}

/// The channel's presence counts from its owner.
pub(crate) async fn stats(node: &Arc<Node>, channel: &str) -> Result<PresenceStats, OpError> {
    match crate::call::call(node, Op::PresenceStats { channel: channel.to_string() }).await? {
        Answer::PresenceStats(stats) => Ok(stats),
        _ => Err(OpError::internal("peer answered presence_stats with another answer")),
    }
}

/// After a map install: this node's announced entries in channels whose partition changed
/// owner go to the new owner, without `join` pushes. Each is read from the registry when
/// sent, so a client that left meanwhile is not announced again.
pub(crate) fn after_install(node: &Arc<Node>, reg: &Arc<Announced>, before: &PartitionMap) {
    let now = node.map();
    let moved = reg.moved(|channel| {
        let p = partition_of(channel, now.partitions());
        before.owner(p) != now.owner(p)
    });
    if moved.is_empty() {
        return;
    }
    let (node, reg) = (node.clone(), reg.clone());
    tokio::spawn(async move {
        for (channel, client) in moved {
            let Some(entry) = reg.get(&channel, &client) else { continue };
            let op = Op::Join {
                channel: channel.clone(),
                node: node.id().to_string(),
                entry: Box::new((&entry).into()),
                announce: false,
            };
            if let Err(e) = crate::call::call(&node, op).await {
                tracing::debug!(channel, client, error = %e, "presence re-announce failed");
            }
        }
    });
}

/// Tells this node's owners to drop the presence of every node that leaves the member
/// list, until the node goes.
pub(crate) async fn drop_on_leave(node: Weak<Node>, mut members: watch::Receiver<Arc<Members>>) {
    let mut known: HashSet<String> = members.borrow_and_update().keys().cloned().collect();
    while members.changed().await.is_ok() {
        let Some(node) = node.upgrade() else { return };
        let now: HashSet<String> = members.borrow_and_update().keys().cloned().collect();
        for gone in known.difference(&now).filter(|n| n.as_str() != node.id()) {
            tracing::info!(node = %gone, "node left: its clients leave presence");
            node.partitions().drop_presence_of(gone);
        }
        known = now;
    }
}
