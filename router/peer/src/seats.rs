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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchyard_proto::partition::{Members, PartitionMap};

use crate::router::Router;
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

/// This node's side of the cluster-wide session cap.
#[derive(Default)]
pub(crate) struct Seats {
    /// Seats held here as the holder of users' `seats:<user>` keys.
    pub(crate) table: SeatTable,
    /// This node's connections that hold a seat elsewhere (or here): connection → user.
    pub(crate) mine: Mutex<HashMap<u64, String>>,
}

/// The seats held here, by user: `(node, connection)`.
#[derive(Default)]
pub(crate) struct SeatTable {
    users: Mutex<HashMap<String, Vec<(String, u64)>>>,
}

impl SeatTable {
    /// Takes a seat for `(node, conn)` unless `user` already holds `max` on live nodes
    /// (`force` takes it regardless). Asking again for a seat already held grants it.
    pub(crate) fn take(
        &self,
        live: &dyn Fn(&str) -> bool,
        user: &str,
        node: &str,
        conn: u64,
        max: usize,
        force: bool,
    ) -> bool {
        let mut users = self.users.lock().expect("seat table");
        let held = users.entry(user.to_string()).or_default();
        held.retain(|(n, _)| live(n));
        if held.iter().any(|(n, c)| n == node && *c == conn) {
            return true;
        }
        if !force && held.len() >= max {
            return false;
        }
        held.push((node.to_string(), conn));
        true
    }

    /// Gives the seat of `(node, conn)` back, if held here.
    pub(crate) fn give(&self, user: &str, node: &str, conn: u64) {
        let mut users = self.users.lock().expect("seat table");
        if let Some(held) = users.get_mut(user) {
            held.retain(|(n, c)| !(n == node && *c == conn));
            if held.is_empty() {
                users.remove(user);
            }
        }
    }

    /// Forgets the users whose seats this node no longer holds (their key moved away): the
    /// new holder has them, and they must not come back stale if the key returns.
    pub(crate) fn keep_only(&self, holds: &dyn Fn(&str) -> bool) {
        self.users.lock().expect("seat table").retain(|user, _| holds(user));
    }

    /// Drops the seats of nodes that are no longer live; returns how many seats remain.
    pub(crate) fn sweep(&self, live: &dyn Fn(&str) -> bool) -> usize {
        let mut users = self.users.lock().expect("seat table");
        users.retain(|_, held| {
            held.retain(|(n, _)| live(n));
            !held.is_empty()
        });
        users.values().map(Vec::len).sum()
    }
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
    router: Arc<Router>,
    user: String,
    conn: u64,
}

impl Drop for ClusterSeat {
    fn drop(&mut self) {
        self.router.seats().mine.lock().expect("own seats").remove(&self.conn);
        let op = Op::Unseat {
            key: key(&self.user),
            user: self.user.clone(),
            node: self.router.id().to_string(),
            conn: self.conn,
        };
        let router = self.router.clone();
        // Retried like a registration; a seat never given back goes with its node's membership.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                for _ in 0..REGISTER_ATTEMPTS {
                    if let Ok(Ok(_)) = tokio::time::timeout(SEAT_DEADLINE, crate::call::call(&router, op.clone())).await
                    {
                        return;
                    }
                    tokio::time::sleep(SEAT_DEADLINE).await;
                }
            });
        }
    }
}

/// Whether `node` is this node or a live member.
fn liveness(router: &Router) -> impl Fn(&str) -> bool {
    let (me, members) = (router.id().to_string(), router.members());
    move |n: &str| n == me || members.contains_key(n)
}

impl Router {
    /// Asks the user's seat holder for a seat for connection `conn` under `max`.
    pub async fn take_seat(self: &Arc<Self>, user: &str, conn: u64, max: usize) -> Seating {
        if self.links().is_none() {
            return Seating::NotClustered;
        }
        let op = Op::Seat {
            key: key(user),
            user: user.to_string(),
            node: self.id().to_string(),
            conn,
            max: u32::try_from(max).unwrap_or(u32::MAX),
            force: false,
        };
        let why = match tokio::time::timeout(SEAT_DEADLINE, crate::call::call(self, op)).await {
            Ok(Ok(Answer::Seated(true))) => return Seating::Granted(self.hold_seat(user, conn)),
            Ok(Ok(Answer::Seated(false))) => return Seating::Full,
            Ok(Ok(other)) => format!("unexpected answer {other:?}"),
            Ok(Err(e)) => e.message,
            Err(_) => format!("no answer within {SEAT_DEADLINE:?}"),
        };
        let seat = self.hold_seat(user, conn);
        let (router, user) = (self.clone(), user.to_string());
        tokio::spawn(async move {
            // Until the holder has it, the user's count there is one short.
            for _ in 0..REGISTER_ATTEMPTS {
                tokio::time::sleep(SEAT_DEADLINE).await;
                if !router.seats().mine.lock().expect("own seats").contains_key(&conn) {
                    return;
                }
                let op = Op::Seat {
                    key: key(&user),
                    user: user.clone(),
                    node: router.id().to_string(),
                    conn,
                    max: u32::MAX,
                    force: true,
                };
                if let Ok(Ok(_)) = tokio::time::timeout(SEAT_DEADLINE, crate::call::call(&router, op)).await {
                    return;
                }
            }
        });
        Seating::Unreachable { why, seat }
    }

    fn hold_seat(self: &Arc<Self>, user: &str, conn: u64) -> ClusterSeat {
        self.seats().mine.lock().expect("own seats").insert(conn, user.to_string());
        ClusterSeat { router: self.clone(), user: user.to_string(), conn }
    }

    /// Runs a seat operation here, as the holder of its key.
    pub(crate) fn serve_seat(&self, op: Op) -> Answer {
        let live = liveness(self);
        let answer = match op {
            Op::Seat { user, node, conn, max, force, .. } => {
                Answer::Seated(self.seats().table.take(&live, &user, &node, conn, max as usize, force))
            }
            Op::Unseat { user, node, conn, .. } => {
                self.seats().table.give(&user, &node, conn);
                Answer::Done
            }
            _ => unreachable!("only seat operations come here"),
        };
        self.metrics().seats_held.set(self.seats().table.sweep(&live) as i64);
        answer
    }

    /// After a map install: this node's seats whose key moved to another holder are
    /// registered with it (over the cap if need be: they were granted), and seats of nodes
    /// that left are dropped here.
    pub(crate) fn after_install_seats(self: &Arc<Self>, before: &PartitionMap) {
        let live = liveness(self);
        let now = self.map();
        let me = self.id();
        let holder = |user: &str| now.owner(switchyard_proto::partition::partition_of(&key(user), now.partitions()));
        self.seats().table.keep_only(&|user| holder(user) == Some(me));
        self.metrics().seats_held.set(self.seats().table.sweep(&live) as i64);
        let moved: Vec<(u64, String)> = self
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
        let router = self.clone();
        tokio::spawn(async move {
            for (conn, user) in moved {
                // A connection that ended meanwhile has given its seat back already.
                if !router.seats().mine.lock().expect("own seats").contains_key(&conn) {
                    continue;
                }
                let op =
                    Op::Seat { key: key(&user), user, node: router.id().to_string(), conn, max: u32::MAX, force: true };
                let _ = tokio::time::timeout(SEAT_DEADLINE, crate::call::call(&router, op)).await;
            }
        });
    }
}

/// Drops the seats of nodes that leave, at each membership change, until the router goes.
pub(crate) async fn sweep_on_leave(
    router: std::sync::Weak<Router>,
    mut members: tokio::sync::watch::Receiver<Arc<Members>>,
) {
    while members.changed().await.is_ok() {
        let Some(router) = router.upgrade() else { return };
        let live = liveness(&router);
        router.metrics().seats_held.set(router.seats().table.sweep(&live) as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_counts_live_nodes_and_a_seat_is_held_once() {
        let t = SeatTable::default();
        let all = |_: &str| true;
        assert!(t.take(&all, "alice", "n1", 1, 2, false));
        assert!(t.take(&all, "alice", "n1", 1, 2, false), "asking again keeps one seat");
        assert!(t.take(&all, "alice", "n2", 7, 2, false));
        assert!(!t.take(&all, "alice", "n3", 9, 2, false), "the third is refused on any node");
        assert!(t.take(&all, "bob", "n3", 9, 2, false), "another user is counted apart");
        t.give("alice", "n1", 1);
        assert!(t.take(&all, "alice", "n3", 9, 2, false), "a seat given back is free");
        let without_n2 = |n: &str| n != "n2";
        assert!(t.take(&without_n2, "alice", "n3", 10, 2, false), "a dead node's seat is free");
        assert!(t.take(&all, "alice", "n1", 11, 2, true), "a re-registered seat goes over the cap");
        assert_eq!(t.sweep(&|n: &str| n == "n3"), 3, "n3's seats remain: alice 9, 10 and bob 9");
        t.keep_only(&|user: &str| user == "bob");
        assert_eq!(t.sweep(&all), 1, "alice's key moved away: only bob's seat stays here");
    }
}
