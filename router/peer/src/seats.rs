//! The cluster-wide per-user session cap (`sessions.max_per_user` over every node).
//!
//! It owns both sides of a seat. As the **holder**, a node keeps the seats of the users
//! whose key `seats:<user>` falls in a partition it owns: which node and connection holds
//! each one. Seats of a node that left the membership are dropped, so a killed node frees
//! its users' seats within a lease. As a **connection's node**, it asks the holder over the
//! peer links (or itself) for a seat on `connect`, gives it back when the connection ends,
//! and registers its seats again with a new holder when the map moves the key. It must
//! never be asked while routing a message: only `connect` and disconnect come here, and
//! the ask has a deadline after which the caller applies the per-node cap instead.

use std::sync::Arc;
use std::time::Duration;

use switchyard_proto::partition::{Members, PartitionMap};

use crate::node::Node;
use crate::wire::{Answer, Op};

/// How long `connect` waits for the seat holder before it applies the per-node cap.
const SEAT_DEADLINE: Duration = Duration::from_secs(1);
/// How often a seat granted without its holder is offered to the holder again, or a seat
/// given back is retried (once per [`SEAT_DEADLINE`]); a holder that moves gets a node's
/// seats anyway.
const REGISTER_ATTEMPTS: usize = 30;

/// The routing key of a user's seats.
fn key(user: &str) -> String {
    format!("seats:{user}")
}

/// The answer to a seat request.
pub enum Seating {
    /// Granted; dropping the guard gives it back.
    Granted(ClusterSeat),
    /// The user holds the cap's worth of connections across the cluster.
    Full,
    /// No peer links: the per-node cap is the cluster-wide one.
    NotClustered,
    /// The holder did not answer in time (or failed): the per-node cap applies, and the
    /// seat is registered with the holder (over the cap if need be) once it answers.
    Unreachable {
        /// Why.
        why: String,
        /// The seat, to hold like a granted one.
        seat: ClusterSeat,
    },
}

/// A seat held at the user's seat holder; dropping it gives the seat back.
pub struct ClusterSeat {
    node: Arc<Node>,
    user: String,
    conn: u64,
}

impl Drop for ClusterSeat {
    fn drop(&mut self) {
        self.node.seats().mine.lock().expect("own seats").remove(&self.conn);
        let op = Op::Unseat {
            key: key(&self.user),
            user: self.user.clone(),
            node: self.node.id().to_string(),
            conn: self.conn,
        };
        let node = self.node.clone();
        // Retried like a registration; a seat never given back goes with its node's membership.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                for _ in 0..REGISTER_ATTEMPTS {
                    if let Ok(Ok(_)) = tokio::time::timeout(SEAT_DEADLINE, crate::call::call(&node, op.clone())).await {
                        return;
                    }
                    tokio::time::sleep(SEAT_DEADLINE).await;
                }
            });
        }
    }
}

/// Asks the user's seat holder for a seat for connection `conn` under `max`.
pub(crate) async fn take(node: &Arc<Node>, user: &str, conn: u64, max: usize) -> Seating {
    if node.links().is_none() {
        return Seating::NotClustered;
    }
    let op = Op::Seat {
        key: key(user),
        user: user.to_string(),
        node: node.id().to_string(),
        conn,
        max: u32::try_from(max).unwrap_or(u32::MAX),
        force: false,
    };
    let why = match tokio::time::timeout(SEAT_DEADLINE, crate::call::call(node, op)).await {
        Ok(Ok(Answer::Seated(true))) => return Seating::Granted(hold(node, user, conn)),
        Ok(Ok(Answer::Seated(false))) => return Seating::Full,
        Ok(Ok(other)) => format!("unexpected answer {other:?}"),
        Ok(Err(e)) => e.message,
        Err(_) => format!("no answer within {SEAT_DEADLINE:?}"),
    };
    let seat = hold(node, user, conn);
    let (node, user) = (node.clone(), user.to_string());
    tokio::spawn(async move {
        // Until the holder has it, the user's count there is one short.
        for _ in 0..REGISTER_ATTEMPTS {
            tokio::time::sleep(SEAT_DEADLINE).await;
            if !node.seats().mine.lock().expect("own seats").contains_key(&conn) {
                return;
            }
            let op = Op::Seat {
                key: key(&user),
                user: user.clone(),
                node: node.id().to_string(),
                conn,
                max: u32::MAX,
                force: true,
            };
            if let Ok(Ok(_)) = tokio::time::timeout(SEAT_DEADLINE, crate::call::call(&node, op)).await {
                return;
            }
        }
    });
    Seating::Unreachable { why, seat }
}

/// A seat this node's connection `conn` holds: given back when dropped.
fn hold(node: &Arc<Node>, user: &str, conn: u64) -> ClusterSeat {
    node.seats().mine.lock().expect("own seats").insert(conn, user.to_string());
    ClusterSeat { node: node.clone(), user: user.to_string(), conn }
}

/// After a map install: this node's seats whose key moved to another holder are
/// registered with it (over the cap if need be: they were granted), and seats of nodes
/// that left are dropped here.
pub(crate) fn after_install(node: &Arc<Node>, before: &PartitionMap) {
    let live = node.liveness();
    let now = node.map();
    let me = node.id();
    let holder = |user: &str| now.owner(switchyard_proto::partition::partition_of(&key(user), now.partitions()));
    node.seats().table.keep_only(&|user| holder(user) == Some(me));
    node.metrics().seats_held.set(node.seats().table.sweep(&live) as i64);
    let moved: Vec<(u64, String)> = node
        .seats()
        .mine
        .lock()
        .expect("own seats")
        .iter()
        .filter(|(_, user)| {
            let p = switchyard_proto::partition::partition_of(&key(user), now.partitions());
            before.owner(p) != now.owner(p)
        })
        .map(|(c, u)| (*c, u.clone()))
        .collect();
    if moved.is_empty() {
        return;
    }
    let node = node.clone();
    tokio::spawn(async move {
        for (conn, user) in moved {
            // A connection that ended meanwhile has given its seat back already.
            if !node.seats().mine.lock().expect("own seats").contains_key(&conn) {
                continue;
            }
            let op = Op::Seat { key: key(&user), user, node: node.id().to_string(), conn, max: u32::MAX, force: true };
            let _ = tokio::time::timeout(SEAT_DEADLINE, crate::call::call(&node, op)).await;
        }
    });
}

/// Drops the seats of nodes that leave, at each membership change, until the node goes.
pub(crate) async fn sweep_on_leave(
    node: std::sync::Weak<Node>,
    mut members: tokio::sync::watch::Receiver<Arc<Members>>,
) {
    while members.changed().await.is_ok() {
        let Some(node) = node.upgrade() else { return };
        let live = node.liveness();
        node.metrics().seats_held.set(node.seats().table.sweep(&live) as i64);
    }
}
