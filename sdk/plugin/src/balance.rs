//! The even-spread balancing algorithm, shared by the router's built-in balancer and the
//! `even-spread` example plugin so that both give the same answer.
//!
//! It owns only the pure function [`even_spread`]; it must never do I/O or depend on anything
//! but the ABI types.
//!
//! - Every live node ends with `P / N` or `P / N + 1` partitions (P partitions, N live
//!   nodes), once the move budget allows. Node weights are ignored.
//! - Partitions whose owner is live stay put unless their owner has more than its share;
//!   those are the only moves, at most `budget` of them. A budget too small to even out in
//!   one round evens out over several rounds.
//! - Partitions without a live owner are always placed, on the nodes furthest below their
//!   share, and do not count as moves.
//! - Deterministic: node ids are sorted, ties go to the lowest node id, an overloaded node
//!   gives up its highest-numbered partitions first.
//! - With no live nodes and at least one partition there is no valid answer: an error.

use std::collections::BTreeMap;

use crate::{BalanceDecision, BalanceInput};

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
    let index: BTreeMap<&str, usize> = nodes.iter().enumerate().map(|(i, &n)| (n, i)).collect();

    // Current live owner of each partition (by position: partitions[i] is partition i).
    let mut owner: Vec<Option<usize>> =
        input.partitions.iter().map(|p| p.owner.as_deref().and_then(|o| index.get(o).copied())).collect();
    let mut held: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
    for (p, o) in owner.iter().enumerate() {
        if let Some(n) = o {
            held[*n].push(p);
        }
    }

    // Shares: `base` each, one more for `extra` nodes, given to those holding the most
    // now (ties: lowest id), which minimises the partitions that must move.
    let (base, extra) = (total / nodes.len(), total % nodes.len());
    let mut by_load: Vec<usize> = (0..nodes.len()).collect();
    by_load.sort_by_key(|&n| (std::cmp::Reverse(held[n].len()), n));
    let mut share = vec![base; nodes.len()];
    for &n in by_load.iter().take(extra) {
        share[n] += 1;
    }

    // Shed from overloaded nodes, the most overloaded first, within the budget.
    let mut budget = budget as usize;
    let mut pool: Vec<usize> = (0..total).filter(|&p| owner[p].is_none()).collect();
    while budget > 0 {
        let Some(n) = (0..nodes.len())
            .filter(|&n| held[n].len() > share[n])
            .max_by_key(|&n| (held[n].len() - share[n], std::cmp::Reverse(n)))
        else {
            break;
        };
        // Highest-numbered partition first (held[n] is ascending).
        let p = held[n].pop().expect("overloaded node holds partitions");
        owner[p] = None;
        pool.push(p);
        budget -= 1;
    }

    // Place orphans and shed partitions on the nodes furthest below their share. The
    // deficits add up to at least the pool size, so a node below its share always exists;
    // the fallback to the least loaded node only guards against a logic error.
    for p in pool {
        let n = (0..nodes.len())
            .max_by_key(|&n| (share[n] as i64 - held[n].len() as i64, std::cmp::Reverse(n)))
            .expect("at least one node");
        held[n].push(p);
        owner[p] = Some(n);
    }

    Ok(BalanceDecision {
        owners: owner.into_iter().map(|o| nodes[o.expect("every partition placed")].to_string()).collect(),
    })
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
