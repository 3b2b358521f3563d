//! Planned changes of replicated partitions as replica moves (Kafka's reassignment): a
//! partition whose replica set changes while its leader is alive (the balancer moved its
//! leader, a member drains, a new member takes followers) first gains every replica of its
//! target placement as a follower, keeps its leader and its in-sync replicas until all of
//! the target's replicas are in its ISR, and only then takes the target placement in one
//! map write, which passes leadership (if it moves) and drops the old replicas. No
//! partition data is handed over and no partition runs with fewer in-sync copies than its
//! target placement has while another node could hold one.
//!
//! It owns the choice, per partition and round, between switching now and waiting, and the
//! replica list, ISR and leader epoch of a waiting partition; and it keeps a departed
//! replica in a partition's list while no live node can take its place (Kafka keeps
//! replica assignments through a broker's absence), so the node, when it returns, catches
//! up from its stored position instead of taking a snapshot. It must never touch etcd and
//! never decide where a partition goes (the balancer and the placement did that).

use std::collections::{BTreeMap, BTreeSet};

use crate::keys::MapRecord;

/// The map fields of one round after [`reassign`].
#[derive(Debug, Default, PartialEq)]
pub struct Reassigned {
    /// Owners: the target's, except for partitions still waiting on their followers.
    pub owners: Vec<String>,
    /// Replica lists, leader first.
    pub replicas: Vec<Vec<String>>,
    /// In-sync replicas, leader first.
    pub isr: Vec<Vec<String>>,
    /// Leader epochs.
    pub leader_epochs: Vec<u64>,
    /// Partitions whose leadership passes to an in-sync follower in this map.
    pub switched: BTreeSet<u32>,
    /// Partitions kept on their current placement until the target's replicas are in
    /// sync, with the leader the balancer chose.
    pub pending: BTreeMap<u32, String>,
}

/// Turns the `target` placement (owners, replicas, ISR and leader epochs computed for the
/// balancer's owners) into the next map's, given the `current` map and the `alive`
/// members. A partition whose current owner is alive and ISR known takes its target
/// placement only when every target replica is in its current ISR (a new leader then has
/// the target replicas as its ISR); until then it keeps its owner and leader epoch, and
/// its replicas are the owner, the target replicas and the in-sync replicas it has (so
/// catching up never costs an in-sync copy). Failovers (a dead owner) and unreplicated
/// maps pass through unchanged.
pub fn reassign(
    current: Option<&MapRecord>,
    alive: &BTreeSet<&str>,
    owners: Vec<String>,
    replicas: Vec<Vec<String>>,
    isr: Vec<Vec<String>>,
    leader_epochs: Vec<u64>,
) -> Reassigned {
    let mut out = Reassigned { owners, replicas, isr, leader_epochs, ..Default::default() };
    let Some(current) = current else { return out };
    for p in 0..out.owners.len() {
        let prev = current.owners.get(p).map_or("", String::as_str);
        let prev_isr = current.isr.get(p).map_or(&[][..], Vec::as_slice);
        let target_owner = out.owners[p].clone();
        let live = !prev.is_empty() && alive.contains(prev) && !prev_isr.is_empty();
        let Some(target) = out.replicas.get(p).filter(|r| live && !r.is_empty()) else { continue };
        if target.iter().all(|r| prev_isr.contains(r)) {
            if prev != target_owner {
                out.isr[p] = target.clone();
                out.switched.insert(p as u32);
            }
            continue;
        }
        // Wait: the current leader leads on, followed by the target's replicas and by the
        // in-sync replicas it has now.
        let mut list = vec![prev.to_string()];
        let prev_replicas = current.replicas.get(p).map_or(&[][..], Vec::as_slice);
        let keep = prev_replicas.iter().filter(|r| prev_isr.contains(r) && alive.contains(r.as_str()));
        for r in target.iter().chain(keep) {
            if !list.contains(r) {
                list.push(r.clone());
            }
        }
        let mut in_sync = vec![prev.to_string()];
        in_sync
            .extend(prev_isr.iter().filter(|r| *r != prev && list.contains(r) && alive.contains(r.as_str())).cloned());
        out.owners[p] = prev.to_string();
        out.replicas[p] = list;
        out.isr[p] = in_sync;
        out.leader_epochs[p] = current.leader_epochs.get(p).copied().unwrap_or(0);
        out.pending.insert(p as u32, target_owner);
    }
    out
}

/// Appends to each partition's replica list the replicas of the `current` map that are no
/// longer `alive` (and did not drain), while the list is shorter than `replicas`: no live
/// node took their place (a dead leader whose follower was promoted included). They stay
/// out of the ISR until they return and catch up.
pub fn keep_departed(current: Option<&MapRecord>, alive: &BTreeSet<&str>, replicas: usize, out: &mut Reassigned) {
    let Some(current) = current else { return };
    for (p, list) in out.replicas.iter_mut().enumerate() {
        if list.is_empty() {
            continue;
        }
        for r in current.replicas.get(p).into_iter().flatten() {
            if list.len() >= replicas {
                break;
            }
            if !alive.contains(r.as_str()) && !list.contains(r) {
                list.push(r.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::replicas::tests::{map, s};

    fn current(owners: &[&str], replicas: &[&[&str]], isr: &[&[&str]]) -> MapRecord {
        map(owners, replicas, isr, &vec![3; owners.len()])
    }

    /// A move to an in-sync follower switches at once and keeps every in-sync copy of the
    /// target; a move to a node that is not in sync (or a drain whose new placement is not
    /// in sync yet) waits on the old leader with the union of replicas; failovers pass.
    #[test]
    fn moves_switch_only_when_the_target_replicas_are_in_sync() {
        let cur = current(
            &["a", "a", "a", "d"],
            &[&["a", "b"], &["a", "b"], &["a", "b"], &["d", "a"]],
            &[&["a", "b"], &["a", "b"], &["a"], &["d", "a"]],
        );
        let alive: BTreeSet<&str> = ["a", "b", "c"].into_iter().collect();
        let out = reassign(
            Some(&cur),
            &alive,
            s(&["b", "c", "b", "a"]),
            vec![s(&["b", "a"]), s(&["c", "b"]), s(&["b", "a"]), s(&["a", "c"])],
            vec![s(&["b"]), s(&["c"]), s(&["b"]), s(&["a"])],
            vec![4, 4, 4, 4],
        );
        // p0: b is in sync and so is a: switch, both in the ISR.
        assert_eq!(out.owners[0], "b");
        assert_eq!(out.isr[0], s(&["b", "a"]));
        assert_eq!(out.leader_epochs[0], 4);
        // p1: c holds nothing yet: a leads on with b (in sync) and c (catching up).
        assert_eq!(out.owners[1], "a");
        assert_eq!(out.replicas[1], s(&["a", "c", "b"]));
        assert_eq!(out.isr[1], s(&["a", "b"]));
        assert_eq!(out.leader_epochs[1], 3, "no leadership change, no new leader epoch");
        // p2: b is a replica but out of sync: wait.
        assert_eq!(out.owners[2], "a");
        assert_eq!(out.replicas[2], s(&["a", "b"]));
        assert_eq!(out.isr[2], s(&["a"]));
        // p3: its leader d is dead: a failover, untouched.
        assert_eq!(out.owners[3], "a");
        assert_eq!(out.isr[3], s(&["a"]));
        assert_eq!(out.switched, [0].into_iter().collect());
        assert_eq!(out.pending, [(1, "c".to_string()), (2, "b".to_string())].into_iter().collect());
        // Once c is in sync, p1 switches and drops a.
        let cur = current(&["a"], &[&["a", "c", "b"]], &[&["a", "b", "c"]]);
        let out = reassign(Some(&cur), &alive, s(&["c"]), vec![s(&["c", "b"])], vec![s(&["c"])], vec![4]);
        assert_eq!((out.owners[0].as_str(), &out.replicas[0], &out.isr[0]), ("c", &s(&["c", "b"]), &s(&["c", "b"])));
        // A follower replaced while the leader stays (a draining follower, a new member):
        // the in-sync follower stays until its replacement is in sync.
        let cur = current(&["a"], &[&["a", "b"]], &[&["a", "b"]]);
        let out = reassign(Some(&cur), &alive, s(&["a"]), vec![s(&["a", "c"])], vec![s(&["a"])], vec![3]);
        assert_eq!((&out.replicas[0], &out.isr[0]), (&s(&["a", "c", "b"]), &s(&["a", "b"])));
        assert_eq!(out.pending, [(0, "a".to_string())].into_iter().collect());
        // Without a current map or ISR (replication just turned on) nothing waits.
        let out = reassign(None, &alive, s(&["b"]), vec![s(&["b", "a"])], vec![s(&["b"])], vec![1]);
        assert!(out.pending.is_empty() && out.owners[0] == "b");
    }

    /// A dead follower stays in the list (out of the ISR) while no live node replaces it.
    #[test]
    fn a_departed_replica_is_kept_until_a_live_node_takes_its_place() {
        let cur = current(&["a", "a"], &[&["a", "b"], &["a", "b"]], &[&["a", "b"], &["a", "b"]]);
        let alive: BTreeSet<&str> = ["a", "c"].into_iter().collect();
        let mut out = Reassigned {
            owners: s(&["a", "a"]),
            replicas: vec![s(&["a"]), s(&["a", "c"])],
            isr: vec![s(&["a"]), s(&["a"])],
            leader_epochs: vec![3, 3],
            ..Default::default()
        };
        keep_departed(Some(&cur), &alive, 2, &mut out);
        assert_eq!(out.replicas, vec![s(&["a", "b"]), s(&["a", "c"])]);
        assert_eq!(out.isr, vec![s(&["a"]), s(&["a"])]);
    }
}
