//! The seat table: the seats a node holds as the holder of users' `seats:<user>` keys,
//! and the connections of this node that hold a seat somewhere.
//!
//! It owns the cap's arithmetic: taking a seat unless the user holds the cap's worth on
//! live nodes, giving it back, forgetting users whose key moved away and dropping the
//! seats of nodes that left, and answering a seat request as the holder ([`serve`]). It
//! must never do I/O: the asking side, over the peer links, is `seats`.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::wire::{Answer, Op};

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

/// Runs a seat operation here, as the holder of its key: `live` says which nodes count.
/// Returns the answer and how many seats are held here afterwards.
pub(crate) fn serve(seats: &Seats, live: &dyn Fn(&str) -> bool, op: Op) -> (Answer, usize) {
    let answer = match op {
        Op::Seat { user, node, conn, max, force, .. } => {
            Answer::Seated(seats.table.take(live, &user, &node, conn, max as usize, force))
        }
        Op::Unseat { user, node, conn, .. } => {
            seats.table.give(&user, &node, conn);
            Answer::Done
        }
        _ => unreachable!("only seat operations come here"),
    };
    (answer, seats.table.sweep(live))
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
