//! Which peers this node can reach: a link kept to every member, not only to the owners
//! requests went to, so the set of peers whose link is up says what the network lets
//! through.
//!
//! It owns the task that opens a link to every live member (links are otherwise created on
//! first use) and hands out the set the links publish ([`crate::link::Links::reachable`]).
//! It must never decide anything from the set: the cluster reports it, and its leader
//! decides.

use std::sync::Weak;

use switchyard_proto::partition::Members;
use tokio::sync::watch;

use crate::node::Node;

/// Keeps a link to every member but this node, until the node is dropped or shuts down.
pub(crate) async fn dial_members(node: Weak<Node>, mut members: watch::Receiver<std::sync::Arc<Members>>) {
    loop {
        {
            let Some(n) = node.upgrade() else { return };
            if n.shutting_down() {
                return;
            }
            let Some(links) = n.links() else { return };
            for id in members.borrow_and_update().keys() {
                if id != n.id() {
                    links.link(id);
                }
            }
        }
        if members.changed().await.is_err() {
            return;
        }
    }
}
