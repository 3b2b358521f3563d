//! `even-spread`: a balancing plugin that spreads partitions evenly over the live nodes.
//!
//! Params: `{ max_moves = N }`, optional: a stricter move budget than the router's.
//!
//! - Every live node ends with `P / N` or `P / N + 1` partitions (P partitions, N live
//!   nodes), once the move budget allows. Node weights are ignored.
//! - Partitions whose owner is live stay put unless their owner has more than its share;
//!   those are the only moves, at most `min(input.max_moves, params.max_moves)` of them.
//!   A budget too small to even out in one round evens out over several rounds.
//! - Partitions without a live owner are always placed, on the nodes furthest below their
//!   share, and do not count as moves.
//! - Deterministic: node ids are sorted, ties go to the lowest node id, an overloaded node
//!   gives up its highest-numbered partitions first.
//! - With no live nodes and at least one partition there is no valid answer: the plugin
//!   returns an error (the host falls back to its built-in balancer for that round).

use std::collections::BTreeMap;

use serde::Deserialize;
use switchyard_sdk::{BalanceDecision, BalanceInput};

/// Params of an `even-spread` binding.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// Most moves per round, on top of the router's own `max_moves`.
    pub max_moves: Option<u32>,
}

/// Assigns every partition to a live node, evening out partition counts.
pub fn policy(input: &BalanceInput, params: &Params) -> Result<BalanceDecision, String> {
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
    let mut budget = input.max_moves.min(params.max_moves.unwrap_or(u32::MAX)) as usize;
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

switchyard_sdk::export_balance!(policy);

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_sdk::{guest, NodeInfo, PartitionInfo};

    fn node(id: &str) -> NodeInfo {
        NodeInfo { id: id.into(), weight: 1.0, ..Default::default() }
    }

    fn input(nodes: &[&str], owners: &[Option<&str>], max_moves: u32) -> BalanceInput {
        BalanceInput {
            nodes: nodes.iter().map(|n| node(n)).collect(),
            partitions: owners
                .iter()
                .enumerate()
                .map(|(i, o)| PartitionInfo { id: i as u32, owner: o.map(String::from), ..Default::default() })
                .collect(),
            max_moves,
            now_ms: 0,
        }
    }

    fn counts(owners: &[String]) -> BTreeMap<&str, usize> {
        let mut c = BTreeMap::new();
        for o in owners {
            *c.entry(o.as_str()).or_default() += 1;
        }
        c
    }

    /// Moves counted as the host counts them: partitions whose owner was live and changed.
    fn moves(inp: &BalanceInput, d: &BalanceDecision) -> usize {
        let live: Vec<&str> = inp.nodes.iter().map(|n| n.id.as_str()).collect();
        inp.partitions
            .iter()
            .zip(&d.owners)
            .filter(|(p, new)| p.owner.as_deref().is_some_and(|o| live.contains(&o) && o != new.as_str()))
            .count()
    }

    fn check_valid(inp: &BalanceInput, d: &BalanceDecision) {
        assert_eq!(d.owners.len(), inp.partitions.len());
        for o in &d.owners {
            assert!(inp.nodes.iter().any(|n| &n.id == o), "{o} is not live");
        }
        assert!(moves(inp, d) <= inp.max_moves as usize);
    }

    #[test]
    fn places_everything_from_scratch() {
        let inp = input(&["n2", "n1", "n3"], &[None; 10], 0);
        let d = policy(&inp, &Params::default()).unwrap();
        check_valid(&inp, &d);
        // Budget 0 does not stop placing orphans; the lowest ids get the extra one.
        assert_eq!(counts(&d.owners).into_iter().collect::<Vec<_>>(), [("n1", 4), ("n2", 3), ("n3", 3)]);
        // Deterministic, whatever the node order.
        let inp2 = input(&["n3", "n1", "n2"], &[None; 10], 0);
        assert_eq!(policy(&inp2, &Params::default()).unwrap(), d);
    }

    #[test]
    fn balanced_stays_put() {
        let owners = [Some("a"), Some("b"), Some("a"), Some("b"), Some("c")];
        let inp = input(&["a", "b", "c"], &owners, 10);
        let d = policy(&inp, &Params::default()).unwrap();
        assert_eq!(moves(&inp, &d), 0);
        assert_eq!(d.owners, ["a", "b", "a", "b", "c"]);
    }

    #[test]
    fn new_node_gets_its_share_with_minimal_moves() {
        let owners: Vec<_> = (0..12).map(|i| Some(if i % 2 == 0 { "a" } else { "b" })).collect();
        let inp = input(&["a", "b", "c"], &owners, 100);
        let d = policy(&inp, &Params::default()).unwrap();
        check_valid(&inp, &d);
        assert_eq!(counts(&d.owners).into_iter().collect::<Vec<_>>(), [("a", 4), ("b", 4), ("c", 4)]);
        assert_eq!(moves(&inp, &d), 4);
    }

    #[test]
    fn respects_the_move_budget_and_converges() {
        let owners: Vec<_> = (0..12).map(|_| Some("a")).collect();
        let mut inp = input(&["a", "b", "c", "d"], &owners, 2);
        for _ in 0..10 {
            let d = policy(&inp, &Params::default()).unwrap();
            check_valid(&inp, &d);
            assert!(moves(&inp, &d) <= 2);
            for (p, o) in inp.partitions.iter_mut().zip(d.owners) {
                p.owner = Some(o);
            }
        }
        let owners: Vec<String> = inp.partitions.iter().map(|p| p.owner.clone().unwrap()).collect();
        assert!(counts(&owners).values().all(|&c| c == 3));
        // The params budget applies too.
        let inp = input(&["a", "b"], &(0..12).map(|_| Some("a")).collect::<Vec<_>>(), 100);
        let d = policy(&inp, &Params { max_moves: Some(1) }).unwrap();
        assert_eq!(moves(&inp, &d), 1);
    }

    #[test]
    fn dead_owner_partitions_are_replaced_without_counting() {
        // "x" is gone: its partitions are orphans and must be placed even with budget 0.
        let owners = [Some("x"), Some("x"), Some("x"), Some("a"), Some("a"), Some("b")];
        let inp = input(&["a", "b", "c"], &owners, 0);
        let d = policy(&inp, &Params::default()).unwrap();
        check_valid(&inp, &d);
        assert_eq!(moves(&inp, &d), 0);
        assert_eq!(counts(&d.owners).into_iter().collect::<Vec<_>>(), [("a", 2), ("b", 2), ("c", 2)]);
    }

    #[test]
    fn within_one_for_many_shapes() {
        for nodes in 1..7usize {
            for parts in 0..40usize {
                let names: Vec<String> = (0..nodes).map(|i| format!("n{i}")).collect();
                let ids: Vec<&str> = names.iter().map(String::as_str).collect();
                // Skewed start: everything on n0, some orphans, some on a dead node.
                let owners: Vec<Option<&str>> = (0..parts)
                    .map(|p| match p % 5 {
                        0 => None,
                        1 => Some("dead"),
                        _ => Some("n0"),
                    })
                    .collect();
                let inp = input(&ids, &owners, u32::MAX);
                let d = policy(&inp, &Params::default()).unwrap();
                check_valid(&inp, &d);
                let c = counts(&d.owners);
                let (lo, hi) = (c.values().min().copied().unwrap_or(0), c.values().max().copied().unwrap_or(0));
                let lo = if c.len() < nodes { 0 } else { lo };
                assert!(hi - lo <= 1, "{nodes} nodes {parts} partitions: {c:?}");
            }
        }
    }

    #[test]
    fn no_nodes() {
        assert_eq!(policy(&input(&[], &[], 5), &Params::default()), Ok(BalanceDecision::default()));
        assert!(policy(&input(&[], &[Some("a")], 5), &Params::default()).unwrap_err().contains("no live nodes"));
    }

    #[test]
    fn params_through_the_abi() {
        let inp = input(&["a", "b"], &[Some("a"), Some("a"), Some("a"), None], 5);
        let call = |params: &str| guest::call(&guest::encode_call(params, &inp).unwrap(), policy);
        assert_eq!(call("{}").unwrap().owners, ["a", "a", "b", "b"]);
        assert_eq!(call(r#"{"max_moves":0}"#).unwrap().owners, ["a", "a", "a", "b"]);
        assert!(call(r#"{"moves":1}"#).is_err());
    }
}
