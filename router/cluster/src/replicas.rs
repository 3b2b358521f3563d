//! The leader's replica decisions: failover promotions before balancing, and the replica
//! lists, in-sync sets and leader epochs of the map it publishes.
//!
//! It owns the rules of the configuration manager of a primary-backup log: a partition
//! whose leader left goes to a live member of its ISR (one write that bumps the leader
//! epoch and keeps the channel epochs, since that member has every acknowledged batch);
//! with no such member it waits (or, with `unclean_failover`, goes wherever the balancer
//! puts it and restarts its channels); followers are spread evenly over distinct nodes (by
//! `switchyard_sdk::balance::place_followers`, the same placement an ABI v2 balancer plugin
//! can call, or as the plugin placed them); only the partition's leader may add a follower
//! to the ISR. It must never touch etcd.

use std::collections::{BTreeMap, BTreeSet};

use crate::keys::MapRecord;

/// The failovers of one round.
#[derive(Debug, Default, PartialEq)]
pub struct Failovers {
    /// Partitions whose leader left, promoted to this in-sync follower.
    pub promoted: BTreeMap<u32, String>,
    /// Partitions whose leader left with no live in-sync follower, kept on it
    /// (unavailable) until one returns.
    pub waiting: BTreeMap<u32, String>,
    /// Partitions whose leader left with no live in-sync follower, given to the balancer
    /// (`unclean_failover`).
    pub unclean: BTreeSet<u32>,
}

/// The failovers `current` needs now that only `alive` nodes are members.
pub fn failovers(current: &MapRecord, alive: &BTreeSet<&str>, unclean_failover: bool) -> Failovers {
    let mut out = Failovers::default();
    if current.isr.is_empty() {
        return out;
    }
    for (p, owner) in current.owners.iter().enumerate() {
        let p = p as u32;
        if owner.is_empty() || alive.contains(owner.as_str()) {
            continue;
        }
        let isr = current.isr.get(p as usize).map_or(&[][..], Vec::as_slice);
        match isr.iter().find(|n| *n != owner && alive.contains(n.as_str())) {
            Some(n) => {
                out.promoted.insert(p, n.clone());
            }
            None if unclean_failover => {
                out.unclean.insert(p);
            }
            None => {
                out.waiting.insert(p, owner.clone());
            }
        }
    }
    out
}

/// Replica lists, ISRs and leader epochs for the map with `owners`, after `prev`.
///
/// `nodes` are the members that may hold replicas (live, not draining), `alive` every
/// live member. A partition keeps its followers while they stay eligible; when its leader
/// changed by a planned move the old leader is its first candidate follower; the rest are
/// filled from the nodes with the fewest replicas. `given` followers (a balancer plugin's,
/// already validated) are used instead for every partition that is not waiting. The ISR
/// of a partition whose leader stayed is the previous one without departed nodes; a new
/// leader starts alone in it (its followers catch up from it and are added by it).
/// Partitions `waiting` for a leader keep their entry.
pub fn place(
    prev: Option<&MapRecord>,
    owners: &[String],
    nodes: &[String],
    alive: &BTreeSet<&str>,
    replicas: usize,
    waiting: &BTreeMap<u32, String>,
    given: Option<&[Vec<String>]>,
) -> (Vec<Vec<String>>, Vec<Vec<String>>, Vec<u64>) {
    let want = replicas.min(nodes.len().max(1)).max(1);
    if want < replicas {
        tracing::warn!(replicas, nodes = nodes.len(), "fewer nodes than replicas: partitions run under-replicated");
    }
    let n = owners.len();
    let prev_of = |p: usize| -> (&str, &[String], &[String], u64) {
        match prev {
            Some(m) => (
                m.owners.get(p).map_or("", String::as_str),
                m.replicas.get(p).map_or(&[][..], Vec::as_slice),
                m.isr.get(p).map_or(&[][..], Vec::as_slice),
                m.leader_epochs.get(p).copied().unwrap_or(0),
            ),
            None => ("", &[][..], &[][..], 0),
        }
    };
    let followers: Vec<Vec<String>> = match given {
        Some(given) if given.len() == n => given.to_vec(),
        _ => spread_followers(owners, nodes, want, waiting, |p| {
            let (prev_owner, prev_replicas, _, _) = prev_of(p);
            let moved = (prev_owner != owners[p].as_str()).then_some(prev_owner);
            moved.into_iter().chain(prev_replicas.iter().map(String::as_str)).collect()
        }),
    };
    let mut all = Vec::with_capacity(n);
    let mut isrs = Vec::with_capacity(n);
    let mut epochs = Vec::with_capacity(n);
    for (p, owner) in owners.iter().enumerate() {
        let (prev_owner, prev_replicas, prev_isr, prev_epoch) = prev_of(p);
        if waiting.contains_key(&(p as u32)) {
            all.push(prev_replicas.to_vec());
            isrs.push(prev_isr.to_vec());
            epochs.push(prev_epoch);
            continue;
        }
        let mut replicas = vec![owner.clone()];
        replicas.extend(followers[p].iter().cloned());
        let same_leader = prev_owner == owner.as_str() && !prev_isr.is_empty();
        let isr: Vec<String> = if same_leader {
            let mut isr = vec![owner.clone()];
            isr.extend(
                prev_isr.iter().filter(|m| *m != owner && replicas.contains(m) && alive.contains(m.as_str())).cloned(),
            );
            isr
        } else {
            vec![owner.clone()]
        };
        let epoch = if prev_owner == owner.as_str() && prev_epoch > 0 { prev_epoch } else { prev_epoch + 1 };
        all.push(replicas);
        isrs.push(isr);
        epochs.push(epoch);
    }
    (all, isrs, epochs)
}

/// The built-in follower placement over node ids: [`switchyard_sdk::balance::place_followers`]
/// with `nodes` (sorted, as the map's members are) as the index space; `candidates(p)` are
/// the nodes that already hold a copy of p, most preferred first.
fn spread_followers<'a>(
    owners: &[String],
    nodes: &[String],
    want: usize,
    waiting: &BTreeMap<u32, String>,
    candidates: impl Fn(usize) -> Vec<&'a str>,
) -> Vec<Vec<String>> {
    use switchyard_sdk::balance::{place_followers, NONE};
    let mut sorted: Vec<&str> = nodes.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    sorted.dedup();
    let index: BTreeMap<&str, u32> = sorted.iter().enumerate().map(|(i, n)| (*n, i as u32)).collect();
    let at = |id: &str| index.get(id).copied().unwrap_or(NONE);
    let owner_idx: Vec<u32> = owners.iter().map(|o| at(o)).collect();
    let flat = place_followers(
        sorted.len(),
        &owner_idx,
        want,
        |p| candidates(p).into_iter().map(at).collect::<Vec<u32>>(),
        |p| waiting.contains_key(&(p as u32)),
    );
    let slots = want.saturating_sub(1);
    (0..owners.len())
        .map(|p| {
            let row = flat.get(p * slots..(p + 1) * slots).unwrap_or(&[]);
            row.iter().filter(|&&f| f != NONE).map(|&f| sorted[f as usize].to_string()).collect()
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Owned strings.
    pub(crate) fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    /// A map record (epoch 3) with these owners, replica lists, ISRs and leader epochs.
    pub(crate) fn map(owners: &[&str], replicas: &[&[&str]], isr: &[&[&str]], epochs: &[u64]) -> MapRecord {
        MapRecord {
            epoch: 3,
            partitions: owners.len() as u32,
            leader: "a".into(),
            term: 1,
            updated_at: String::new(),
            counts: BTreeMap::new(),
            owners: s(owners),
            moved: BTreeMap::new(),
            replicas: replicas.iter().map(|r| s(r)).collect(),
            isr: isr.iter().map(|r| s(r)).collect(),
            leader_epochs: epochs.to_vec(),
        }
    }

    #[test]
    fn a_dead_leader_goes_to_a_live_isr_member_or_waits() {
        let m = map(
            &["a", "a", "b"],
            &[&["a", "b"], &["a", "c"], &["b", "c"]],
            &[&["a", "b"], &["a"], &["b", "c"]],
            &[1, 1, 1],
        );
        let alive: BTreeSet<&str> = ["b", "c"].into_iter().collect();
        let f = failovers(&m, &alive, false);
        assert_eq!(f.promoted, [(0, "b".to_string())].into_iter().collect());
        assert_eq!(f.waiting, [(1, "a".to_string())].into_iter().collect(), "c was not in sync");
        let f = failovers(&m, &alive, true);
        assert_eq!(f.unclean, [1].into_iter().collect());
        // Not replicated before: nothing to decide here (today's behaviour).
        let plain = MapRecord { isr: Vec::new(), ..m };
        assert_eq!(failovers(&plain, &alive, false), Failovers::default());
    }

    #[test]
    fn replicas_sit_on_distinct_nodes_evenly_and_a_new_leader_starts_alone_in_sync() {
        let nodes = s(&["a", "b", "c"]);
        let alive: BTreeSet<&str> = ["a", "b", "c"].into_iter().collect();
        let owners = s(&["a", "b", "c", "a", "b", "c"]);
        let (replicas, isr, epochs) = place(None, &owners, &nodes, &alive, 2, &BTreeMap::new(), None);
        for (p, r) in replicas.iter().enumerate() {
            assert_eq!(r.len(), 2);
            assert_eq!(r[0], owners[p]);
            assert_ne!(r[0], r[1]);
        }
        let mut count: BTreeMap<&str, usize> = BTreeMap::new();
        for r in &replicas {
            for n in r {
                *count.entry(n).or_default() += 1;
            }
        }
        assert!(count.values().all(|c| *c == 4), "even: {count:?}");
        assert!(isr.iter().zip(&owners).all(|(i, o)| i == &vec![o.clone()]));
        assert_eq!(epochs, vec![1; 6]);

        // The leader keeps its ISR; a promoted follower starts alone with epoch + 1; the
        // old leader of a planned move becomes a follower.
        let prev = map(&["a", "b"], &[&["a", "b"], &["b", "c"]], &[&["a", "b"], &["b", "c"]], &[4, 2]);
        let owners = s(&["a", "c"]);
        let (replicas, isr, epochs) = place(Some(&prev), &owners, &nodes, &alive, 2, &BTreeMap::new(), None);
        assert_eq!(replicas, vec![s(&["a", "b"]), s(&["c", "b"])]);
        assert_eq!(isr, vec![s(&["a", "b"]), s(&["c"])]);
        assert_eq!(epochs, vec![4, 3]);
        // The first map put everything on one node and the next spreads the leaders: the
        // old leader does not keep a follower copy of every partition.
        let all_a: Vec<&str> = vec!["a"; 6];
        let ab: &[&str] = &["a", "b"];
        let prev = map(&all_a, &[ab; 6], &[ab; 6], &[1; 6]);
        let owners = s(&["a", "b", "c", "a", "b", "c"]);
        let (replicas, _, _) = place(Some(&prev), &owners, &nodes, &alive, 2, &BTreeMap::new(), None);
        let mut count: BTreeMap<&str, usize> = BTreeMap::new();
        for n in replicas.iter().flatten() {
            *count.entry(n).or_default() += 1;
        }
        assert!(count.values().all(|c| *c == 4), "even after a spread: {count:?}");
        // Fewer nodes than replicas: as many as there are.
        let one = s(&["a"]);
        let (replicas, _, _) = place(None, &s(&["a"]), &one, &alive, 3, &BTreeMap::new(), None);
        assert_eq!(replicas, vec![s(&["a"])]);
    }

    /// The placement as it was written before it moved to `switchyard_sdk::balance`
    /// (kept verbatim as the oracle of the test below).
    #[allow(clippy::type_complexity)]
    fn reference_place(
        prev: Option<&MapRecord>,
        owners: &[String],
        nodes: &[String],
        alive: &BTreeSet<&str>,
        replicas: usize,
        waiting: &BTreeMap<u32, String>,
    ) -> (Vec<Vec<String>>, Vec<Vec<String>>, Vec<u64>) {
        let want = replicas.min(nodes.len().max(1)).max(1);
        if want < replicas {
            tracing::warn!(replicas, nodes = nodes.len(), "fewer nodes than replicas: partitions run under-replicated");
        }
        let n = owners.len();
        let prev_of = |p: usize| -> (&str, &[String], &[String], u64) {
            match prev {
                Some(m) => (
                    m.owners.get(p).map_or("", String::as_str),
                    m.replicas.get(p).map_or(&[][..], Vec::as_slice),
                    m.isr.get(p).map_or(&[][..], Vec::as_slice),
                    m.leader_epochs.get(p).copied().unwrap_or(0),
                ),
                None => ("", &[][..], &[][..], 0),
            }
        };
        let mut load: BTreeMap<&str, usize> = nodes.iter().map(|n| (n.as_str(), 0)).collect();
        for o in owners {
            if let Some(c) = load.get_mut(o.as_str()) {
                *c += 1;
            }
        }
        let mut followers: Vec<Vec<String>> = vec![Vec::new(); n];
        // No node holds more than its even share of copies (leaders included), so keeping a
        // follower never beats spreading them.
        let cap = (n * want).div_ceil(nodes.len().max(1));
        // First pass: keep what may stay.
        for (p, owner) in owners.iter().enumerate() {
            if waiting.contains_key(&(p as u32)) {
                continue;
            }
            let (prev_owner, prev_replicas, _, _) = prev_of(p);
            let mut candidates: Vec<&str> = prev_replicas.iter().map(String::as_str).collect();
            if prev_owner != owner.as_str() {
                candidates.insert(0, prev_owner);
            }
            for c in candidates {
                if followers[p].len() + 1 >= want {
                    break;
                }
                if c != owner && load.get(c).is_some_and(|l| *l < cap) && !followers[p].iter().any(|f| f == c) {
                    followers[p].push(c.to_string());
                    *load.get_mut(c).expect("checked") += 1;
                }
            }
        }
        // Second pass: fill from the least loaded nodes.
        for (p, owner) in owners.iter().enumerate() {
            if waiting.contains_key(&(p as u32)) {
                continue;
            }
            while followers[p].len() + 1 < want {
                let pick = load
                    .iter()
                    .filter(|(id, _)| **id != owner.as_str() && !followers[p].iter().any(|f| f == *id))
                    .min_by_key(|(id, c)| (**c, **id))
                    .map(|(id, _)| id.to_string());
                let Some(id) = pick else { break };
                *load.get_mut(id.as_str()).expect("picked from it") += 1;
                followers[p].push(id);
            }
        }
        // Even out: move a follower from the fullest node to the emptiest while they differ
        // by more than one copy.
        for _ in 0..n * want {
            let (Some((&hi, &hi_c)), Some((&lo, &lo_c))) = (
                load.iter().max_by_key(|(id, c)| (**c, std::cmp::Reverse(**id))),
                load.iter().min_by_key(|(id, c)| (**c, **id)),
            ) else {
                break;
            };
            if hi_c <= lo_c + 1 {
                break;
            }
            let movable = (0..n).find(|p| {
                !waiting.contains_key(&(*p as u32))
                    && owners[*p] != lo
                    && followers[*p].iter().any(|f| f == hi)
                    && !followers[*p].iter().any(|f| f == lo)
            });
            let Some(p) = movable else { break };
            for f in followers[p].iter_mut().filter(|f| *f == hi) {
                *f = lo.to_string();
            }
            *load.get_mut(hi).expect("a node") -= 1;
            *load.get_mut(lo).expect("a node") += 1;
        }
        let mut all = Vec::with_capacity(n);
        let mut isrs = Vec::with_capacity(n);
        let mut epochs = Vec::with_capacity(n);
        for (p, owner) in owners.iter().enumerate() {
            let (prev_owner, prev_replicas, prev_isr, prev_epoch) = prev_of(p);
            if waiting.contains_key(&(p as u32)) {
                all.push(prev_replicas.to_vec());
                isrs.push(prev_isr.to_vec());
                epochs.push(prev_epoch);
                continue;
            }
            let mut replicas = vec![owner.clone()];
            replicas.extend(followers[p].iter().cloned());
            let same_leader = prev_owner == owner.as_str() && !prev_isr.is_empty();
            let isr: Vec<String> = if same_leader {
                let mut isr = vec![owner.clone()];
                isr.extend(
                    prev_isr
                        .iter()
                        .filter(|m| *m != owner && replicas.contains(m) && alive.contains(m.as_str()))
                        .cloned(),
                );
                isr
            } else {
                vec![owner.clone()]
            };
            let epoch = if prev_owner == owner.as_str() && prev_epoch > 0 { prev_epoch } else { prev_epoch + 1 };
            all.push(replicas);
            isrs.push(isr);
            epochs.push(epoch);
        }
        (all, isrs, epochs)
    }

    /// The shared index-space placement places exactly as the former one did, on many
    /// pseudo-random maps (dead, draining and missing members, planned moves, waiting
    /// partitions, 1-4 copies).
    #[test]
    fn the_shared_placement_equals_the_former_one() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |m: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % m as u64) as usize
        };
        let pool: Vec<String> = (0..8).map(|i| format!("n{i}")).collect();
        for _ in 0..400 {
            let nodes: Vec<String> = pool.iter().filter(|_| next(4) != 0).cloned().collect();
            if nodes.is_empty() {
                continue;
            }
            let alive: BTreeSet<&str> = pool.iter().map(String::as_str).filter(|_| next(5) != 0).collect();
            let p = 1 + next(40);
            let pick = |r: usize| pool[r % pool.len()].clone();
            let prev_owners: Vec<String> =
                (0..p).map(|_| if next(6) == 0 { String::new() } else { pick(next(8)) }).collect();
            let prev_replicas: Vec<Vec<String>> = prev_owners
                .iter()
                .map(|o| std::iter::once(o.clone()).chain((0..next(3)).map(|_| pick(next(8)))).collect())
                .collect();
            let prev = MapRecord {
                isr: prev_replicas.clone(),
                replicas: prev_replicas,
                leader_epochs: (0..p as u64).map(|e| e % 3).collect(),
                ..map(&[], &[], &[], &[])
            };
            let prev = MapRecord { owners: prev_owners, partitions: p as u32, ..prev };
            let owners: Vec<String> = (0..p).map(|_| nodes[next(nodes.len())].clone()).collect();
            let waiting: BTreeMap<u32, String> =
                (0..p as u32).filter(|_| next(10) == 0).map(|q| (q, "gone".to_string())).collect();
            let replicas = 1 + next(4);
            let prev = (next(5) != 0).then_some(&prev);
            let new = place(prev, &owners, &nodes, &alive, replicas, &waiting, None);
            let old = reference_place(prev, &owners, &nodes, &alive, replicas, &waiting);
            assert_eq!(new, old, "owners {owners:?} nodes {nodes:?} replicas {replicas} prev {prev:?}");
        }
    }

    #[test]
    fn a_plugins_followers_are_used_as_given() {
        let nodes = s(&["a", "b", "c"]);
        let alive: BTreeSet<&str> = ["a", "b", "c"].into_iter().collect();
        let owners = s(&["a", "b", "c"]);
        let given = vec![s(&["c"]), s(&["c"]), s(&["a"])];
        let waiting: BTreeMap<u32, String> = [(2, "gone".to_string())].into_iter().collect();
        let prev = map(
            &["a", "b", "gone"],
            &[&["a", "b"], &["b", "a"], &["gone", "b"]],
            &[&["a"], &["b"], &["gone", "b"]],
            &[1, 1, 1],
        );
        let (replicas, isr, _) = place(Some(&prev), &owners, &nodes, &alive, 2, &waiting, Some(&given));
        assert_eq!(
            replicas,
            vec![s(&["a", "c"]), s(&["b", "c"]), s(&["gone", "b"])],
            "a waiting partition keeps its entry"
        );
        assert_eq!(isr[0], s(&["a"]), "a follower that was not a replica is not in sync");
    }
}
