//! The balancing algorithms shared by the router's built-ins and the example plugins, so
//! that both give the same answer: [`even_spread`] (owners) and [`place_followers`]
//! (replica placement), each over node indices ([`spread`], [`place_followers`]) with a
//! node-id wrapper for ABI v1 inputs.
//!
//! It owns only pure functions; it must never do I/O or depend on anything but the ABI
//! types.
//!
//! Even spread:
//! - Every live node ends with `P / N` or `P / N + 1` partitions (P partitions, N live
//!   nodes), once the move budget allows. Node weights are ignored.
//! - Partitions whose owner is live stay put unless their owner has more than its share;
//!   those are the only moves, at most `budget` of them. A budget too small to even out in
//!   one round evens out over several rounds.
//! - Partitions without a live owner are always placed, on the nodes furthest below their
//!   share, and do not count as moves.
//! - Deterministic: node ids are sorted (index order is id order), ties go to the lowest
//!   node, an overloaded node gives up its highest-numbered partitions first.
//! - With no live nodes and at least one partition there is no valid answer: an error.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use crate::{BalanceDecision, BalanceInput};

/// No node: an empty follower slot, or a partition without a live owner.
pub const NONE: u32 = u32::MAX;

/// Assigns every partition to a live node, evening out partition counts, moving at most
/// `budget` partitions whose owner is live.
pub fn even_spread(input: &BalanceInput, budget: u32) -> Result<BalanceDecision, String> {
    let total = input.partitions.len();
    if total == 0 {
        return Ok(BalanceDecision::default());
    }
    let mut nodes: Vec<&str> = input.nodes.iter().map(|n| n.id.as_str()).collect();
    nodes.sort_unstable();
    nodes.dedup();
    if nodes.is_empty() {
        return Err(format!("no live nodes to place {total} partitions on"));
    }
    let index: BTreeMap<&str, u32> = nodes.iter().enumerate().map(|(i, &n)| (n, i as u32)).collect();
    let current: Vec<u32> = input
        .partitions
        .iter()
        .map(|p| p.owner.as_deref().and_then(|o| index.get(o).copied()).unwrap_or(NONE))
        .collect();
    let owners = spread(nodes.len(), &current, budget)?;
    Ok(BalanceDecision { owners: owners.into_iter().map(|o| nodes[o as usize].to_string()).collect() })
}

/// [`even_spread`] over node indices: `current[p]` is partition p's live owner (`< nodes`)
/// or [`NONE`]; the answer is an owner index per partition. Node `i` sorts before node
/// `i + 1` (ties go to the lower index).
pub fn spread(nodes: usize, current: &[u32], budget: u32) -> Result<Vec<u32>, String> {
    let total = current.len();
    if total == 0 {
        return Ok(Vec::new());
    }
    if nodes == 0 {
        return Err(format!("no live nodes to place {total} partitions on"));
    }
    let mut owner: Vec<Option<usize>> = current.iter().map(|&o| ((o as usize) < nodes).then_some(o as usize)).collect();
    let mut held: Vec<Vec<usize>> = vec![Vec::new(); nodes];
    for (p, o) in owner.iter().enumerate() {
        if let Some(n) = o {
            held[*n].push(p);
        }
    }

    // Shares: `base` each, one more for `extra` nodes, given to those holding the most
    // now (ties: lowest index), which minimises the partitions that must move.
    let (base, extra) = (total / nodes, total % nodes);
    let mut by_load: Vec<usize> = (0..nodes).collect();
    by_load.sort_by_key(|&n| (Reverse(held[n].len()), n));
    let mut share = vec![base; nodes];
    for &n in by_load.iter().take(extra) {
        share[n] += 1;
    }

    // Shed from overloaded nodes, the most overloaded first (ties: lowest index), within
    // the budget.
    let mut budget = budget as usize;
    let mut pool: Vec<usize> = (0..total).filter(|&p| owner[p].is_none()).collect();
    let mut over: BinaryHeap<(usize, Reverse<usize>)> =
        (0..nodes).filter(|&n| held[n].len() > share[n]).map(|n| (held[n].len() - share[n], Reverse(n))).collect();
    while budget > 0 {
        let Some((_, Reverse(n))) = over.pop() else { break };
        // Highest-numbered partition first (held[n] is ascending).
        let p = held[n].pop().expect("overloaded node holds partitions");
        owner[p] = None;
        pool.push(p);
        budget -= 1;
        if held[n].len() > share[n] {
            over.push((held[n].len() - share[n], Reverse(n)));
        }
    }

    // Place orphans and shed partitions on the nodes furthest below their share (ties:
    // lowest index). The deficits add up to at least the pool size, so a node below its
    // share always exists; going below zero only guards against a logic error.
    let mut below: BinaryHeap<(i64, Reverse<usize>)> =
        (0..nodes).map(|n| (share[n] as i64 - held[n].len() as i64, Reverse(n))).collect();
    for p in pool {
        let (deficit, Reverse(n)) = below.pop().expect("at least one node");
        held[n].push(p);
        owner[p] = Some(n);
        below.push((deficit - 1, Reverse(n)));
    }
    Ok(owner.into_iter().map(|o| o.expect("every partition placed") as u32).collect())
}

/// Followers for every partition, `want - 1` per partition (flattened: partition p's are
/// at `[p * (want - 1), (p + 1) * (want - 1))`), on distinct nodes other than its owner,
/// evenly: no node holds more than its even share of copies, leaders included.
///
/// - `owners[p]` is partition p's (new) owner, a node index `< nodes` ([`NONE`] or
///   `skip(p)`: the partition is left alone and its slots are [`NONE`]).
/// - `candidates(p)` are the nodes that already hold a copy of p, most preferred first
///   (the old owner after a planned move, then the current followers): each is kept while
///   it is not the owner and holds fewer than its share. Indices `>= nodes` are ignored.
/// - The rest are filled from the nodes with the fewest copies (ties: lowest index), then
///   followers move from the fullest node to the emptiest while they differ by more than
///   one copy.
/// - Slots stay [`NONE`] only when fewer than `want` nodes exist.
pub fn place_followers<C: IntoIterator<Item = u32>>(
    nodes: usize,
    owners: &[u32],
    want: usize,
    candidates: impl Fn(usize) -> C,
    skip: impl Fn(usize) -> bool,
) -> Vec<u32> {
    let n = owners.len();
    let slots = want.saturating_sub(1);
    let mut followers: Vec<u32> = vec![NONE; n * slots];
    if slots == 0 || nodes == 0 {
        return followers;
    }
    let skipped = |p: usize| skip(p) || owners[p] as usize >= nodes;
    let mut load = vec![0usize; nodes];
    for &o in owners {
        if (o as usize) < nodes {
            load[o as usize] += 1;
        }
    }
    let mut filled = vec![0usize; n];
    // No node holds more than its even share of copies (leaders included), so keeping a
    // follower never beats spreading them.
    let cap = (n * want).div_ceil(nodes);
    let has = |f: &[u32], c: u32| f.contains(&c);
    // First pass: keep what may stay.
    for p in 0..n {
        if skipped(p) {
            continue;
        }
        for c in candidates(p) {
            if filled[p] >= slots {
                break;
            }
            let mine = &followers[p * slots..p * slots + filled[p]];
            if (c as usize) < nodes && c != owners[p] && load[c as usize] < cap && !has(mine, c) {
                followers[p * slots + filled[p]] = c;
                filled[p] += 1;
                load[c as usize] += 1;
            }
        }
    }
    // Second pass: fill from the least loaded nodes (ties: lowest index). The heap holds
    // every node once, with its current load.
    let mut least: BinaryHeap<Reverse<(usize, usize)>> = (0..nodes).map(|c| Reverse((load[c], c))).collect();
    let mut passed = Vec::new();
    for p in 0..n {
        if skipped(p) {
            continue;
        }
        while filled[p] < slots {
            let mine = &followers[p * slots..p * slots + filled[p]];
            let mut pick = None;
            while let Some(Reverse((l, c))) = least.pop() {
                if c as u32 != owners[p] && !has(mine, c as u32) {
                    pick = Some((l, c));
                    break;
                }
                passed.push(Reverse((l, c)));
            }
            least.extend(passed.drain(..));
            let Some((l, c)) = pick else { break };
            followers[p * slots + filled[p]] = c as u32;
            filled[p] += 1;
            load[c] += 1;
            least.push(Reverse((l + 1, c)));
        }
    }
    // Even out: move a follower from the fullest node to the emptiest while they differ
    // by more than one copy, taking the lowest-numbered partition that can move.
    // `holds[c]`: the partitions node c is a follower of, ascending (built on the first
    // move: an even placement needs none).
    let mut holds: Option<Vec<Vec<usize>>> = None;
    for _ in 0..n * want {
        let hi = (0..nodes).max_by_key(|&c| (load[c], Reverse(c))).expect("nodes");
        let lo = (0..nodes).min_by_key(|&c| (load[c], c)).expect("nodes");
        if load[hi] <= load[lo] + 1 {
            break;
        }
        let holds = holds.get_or_insert_with(|| {
            let mut holds = vec![Vec::new(); nodes];
            for p in (0..n).filter(|&p| !skipped(p)) {
                for &f in followers[p * slots..(p + 1) * slots].iter().filter(|&&f| f != NONE) {
                    holds[f as usize].push(p);
                }
            }
            holds
        });
        let (hi32, lo32) = (hi as u32, lo as u32);
        let movable = holds[hi].iter().position(|&p| {
            let mine = &followers[p * slots..(p + 1) * slots];
            owners[p] != lo32 && !has(mine, lo32)
        });
        let Some(at) = movable else { break };
        let p = holds[hi].remove(at);
        let to = holds[lo].partition_point(|&q| q < p);
        holds[lo].insert(to, p);
        for f in followers[p * slots..(p + 1) * slots].iter_mut().filter(|f| **f == hi32) {
            *f = lo32;
        }
        load[hi] -= 1;
        load[lo] += 1;
    }
    followers
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{NodeInfo, PartitionInfo};
    use proptest::prelude::*;

    fn input(nodes: &[String], owners: &[Option<String>], max_moves: u32) -> BalanceInput {
        BalanceInput {
            nodes: nodes.iter().map(|n| NodeInfo { id: n.clone(), weight: 1.0, ..Default::default() }).collect(),
            partitions: owners
                .iter()
                .enumerate()
                .map(|(i, o)| PartitionInfo { id: i as u32, owner: o.clone(), ..Default::default() })
                .collect(),
            max_moves,
            now_ms: 0,
        }
    }

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("n{i:02}")).collect()
    }

    /// Partitions whose owner was live and changed (what the router counts as moves).
    fn moves(inp: &BalanceInput, d: &BalanceDecision) -> usize {
        inp.partitions
            .iter()
            .zip(&d.owners)
            .filter(|(p, new)| p.owner.as_deref().is_some_and(|o| inp.nodes.iter().any(|n| n.id == o) && o != *new))
            .count()
    }

    fn counts(nodes: &[String], owners: &[String]) -> Vec<usize> {
        nodes.iter().map(|n| owners.iter().filter(|o| *o == n).count()).collect()
    }

    fn balanced(nodes: &[String], partitions: usize) -> Vec<Option<String>> {
        let d = even_spread(&input(nodes, &vec![None; partitions], 0), 0).unwrap();
        d.owners.into_iter().map(Some).collect()
    }

    proptest! {
        /// Any start (orphans, dead owners, skew): one live owner each, counts within ±1.
        #[test]
        fn one_live_owner_and_within_one(
            n in 1usize..12,
            p in 0usize..300,
            seed in proptest::collection::vec(0usize..16, 300),
        ) {
            let nodes = names(n);
            let owners: Vec<Option<String>> = (0..p)
                .map(|i| match seed[i] {
                    0 => None,
                    1 => Some("dead".to_string()),
                    s => Some(nodes[s % n].clone()),
                })
                .collect();
            let inp = input(&nodes, &owners, u32::MAX);
            let d = even_spread(&inp, u32::MAX).unwrap();
            prop_assert_eq!(d.owners.len(), p);
            prop_assert!(d.owners.iter().all(|o| nodes.contains(o)));
            if p > 0 {
                let c = counts(&nodes, &d.owners);
                prop_assert!(c.iter().max().unwrap() - c.iter().min().unwrap() <= 1, "{:?}", c);
            }
        }

        /// A joining node takes its share and nothing else moves.
        #[test]
        fn join_moves_the_minimum(n in 1usize..20, p in 1usize..600) {
            let before = names(n);
            let owners = balanced(&before, p);
            let after = names(n + 1);
            let inp = input(&after, &owners, u32::MAX);
            let d = even_spread(&inp, u32::MAX).unwrap();
            let c = counts(&after, &d.owners);
            prop_assert!(c.iter().max().unwrap() - c.iter().min().unwrap() <= 1);
            // The optimum: the new node's share, p / (n + 1) rounded down (it holds nothing).
            prop_assert_eq!(moves(&inp, &d), c[n]);
            prop_assert!(c[n] <= p / (n + 1) + 1);
            prop_assert_eq!(c[n], p / (n + 1));
        }

        /// A leaving node's partitions are placed; no surviving owner loses one.
        #[test]
        fn leave_moves_only_the_orphans(n in 2usize..20, p in 1usize..600, gone in 0usize..20) {
            let before = names(n);
            let owners = balanced(&before, p);
            let gone = gone % n;
            let after: Vec<String> = before.iter().enumerate().filter(|(i, _)| *i != gone).map(|(_, s)| s.clone()).collect();
            let inp = input(&after, &owners, 0);
            let d = even_spread(&inp, 0).unwrap();
            prop_assert_eq!(moves(&inp, &d), 0);
            for (old, new) in owners.iter().zip(&d.owners) {
                if old.as_deref() != Some(before[gone].as_str()) {
                    prop_assert_eq!(old.as_deref(), Some(new.as_str()));
                }
            }
            let c = counts(&after, &d.owners);
            prop_assert!(c.iter().max().unwrap() - c.iter().min().unwrap() <= 1);
        }
    }
}
