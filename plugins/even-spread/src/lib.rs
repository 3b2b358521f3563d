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
//! - Followers (when the router wants more than one copy): placed as the router's
//!   built-in does (`switchyard_sdk::balance::place_followers`): current copies kept where
//!   they may stay, distinct nodes, evenly, leaders included.
//!
//! ABI v2: the policy reads node and partition records in place and answers node indices.

use serde::Deserialize;
use switchyard_sdk::{BalanceView, Placement};

/// Params of an `even-spread` binding.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// Most moves per round, on top of the router's own `max_moves`.
    pub max_moves: Option<u32>,
}

/// Assigns every partition to a live node, evening out partition counts, and places its
/// followers (the algorithms are [`switchyard_sdk::balance::spread`] and
/// [`switchyard_sdk::balance::place_followers`], which the router also runs as its
/// built-ins).
pub fn policy(input: &BalanceView<'_>, params: &Params) -> Result<Placement, String> {
    let budget = input.max_moves().min(params.max_moves.unwrap_or(u32::MAX));
    let owners = switchyard_sdk::balance::spread(input.nodes().len(), &input.owners(), budget)?;
    let followers = input.place_followers(&owners);
    Ok(Placement { owners, followers })
}

switchyard_sdk::export_balance!(policy);

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use switchyard_sdk::balance_v2::call_balance;
    use switchyard_sdk::{BalanceDecision, BalanceInput, NoParams, NodeInfo, PartitionInfo, ReplicaInput};

    /// The policy through the whole v2 byte path (one copy per partition).
    fn run(inp: &BalanceInput, params: &Params) -> Result<BalanceDecision, String> {
        let one = ReplicaInput { replicas: 1, followers: Vec::new() };
        call_balance("{}", inp, &one, |v: &BalanceView<'_>, _: &NoParams| policy(v, params)).map(|p| p.decision)
    }

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
        let d = run(&inp, &Params::default()).unwrap();
        check_valid(&inp, &d);
        // Budget 0 does not stop placing orphans; the lowest ids get the extra one.
        assert_eq!(counts(&d.owners).into_iter().collect::<Vec<_>>(), [("n1", 4), ("n2", 3), ("n3", 3)]);
        // Deterministic, whatever the node order.
        let inp2 = input(&["n3", "n1", "n2"], &[None; 10], 0);
        assert_eq!(run(&inp2, &Params::default()).unwrap(), d);
    }

    #[test]
    fn balanced_stays_put() {
        let owners = [Some("a"), Some("b"), Some("a"), Some("b"), Some("c")];
        let inp = input(&["a", "b", "c"], &owners, 10);
        let d = run(&inp, &Params::default()).unwrap();
        assert_eq!(moves(&inp, &d), 0);
        assert_eq!(d.owners, ["a", "b", "a", "b", "c"]);
    }

    #[test]
    fn new_node_gets_its_share_with_minimal_moves() {
        let owners: Vec<_> = (0..12).map(|i| Some(if i % 2 == 0 { "a" } else { "b" })).collect();
        let inp = input(&["a", "b", "c"], &owners, 100);
        let d = run(&inp, &Params::default()).unwrap();
        check_valid(&inp, &d);
        assert_eq!(counts(&d.owners).into_iter().collect::<Vec<_>>(), [("a", 4), ("b", 4), ("c", 4)]);
        assert_eq!(moves(&inp, &d), 4);
    }

    #[test]
    fn respects_the_move_budget_and_converges() {
        let owners: Vec<_> = (0..12).map(|_| Some("a")).collect();
        let mut inp = input(&["a", "b", "c", "d"], &owners, 2);
        for _ in 0..10 {
            let d = run(&inp, &Params::default()).unwrap();
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
        let d = run(&inp, &Params { max_moves: Some(1) }).unwrap();
        assert_eq!(moves(&inp, &d), 1);
    }

    #[test]
    fn dead_owner_partitions_are_replaced_without_counting() {
        // "x" is gone: its partitions are orphans and must be placed even with budget 0.
        let owners = [Some("x"), Some("x"), Some("x"), Some("a"), Some("a"), Some("b")];
        let inp = input(&["a", "b", "c"], &owners, 0);
        let d = run(&inp, &Params::default()).unwrap();
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
                let d = run(&inp, &Params::default()).unwrap();
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
        assert_eq!(run(&input(&[], &[], 5), &Params::default()), Ok(BalanceDecision::default()));
        assert!(run(&input(&[], &[Some("a")], 5), &Params::default()).unwrap_err().contains("no live nodes"));
    }

    #[test]
    fn params_through_the_abi() {
        let inp = input(&["a", "b"], &[Some("a"), Some("a"), Some("a"), None], 5);
        let one = ReplicaInput { replicas: 1, followers: Vec::new() };
        let call = |params: &str| call_balance(params, &inp, &one, policy).map(|p| p.decision);
        assert_eq!(call("{}").unwrap().owners, ["a", "a", "b", "b"]);
        assert_eq!(call(r#"{"max_moves":0}"#).unwrap().owners, ["a", "a", "a", "b"]);
        assert!(call(r#"{"moves":1}"#).is_err());
    }

    #[test]
    fn followers_on_distinct_nodes_evenly_keeping_current_copies() {
        let owners: Vec<Option<&str>> = (0..12).map(|i| Some(["a", "b", "c"][i % 3])).collect();
        let inp = input(&["a", "b", "c", "d"], &owners, 100);
        // Two copies each; partition 0's current follower c stays, partition 1's (gone) does not.
        let mut current = vec![Vec::new(); 12];
        current[0] = vec!["c".to_string()];
        current[1] = vec!["gone".to_string()];
        let two = ReplicaInput { replicas: 2, followers: current };
        let plan = call_balance("{}", &inp, &two, policy).unwrap();
        let followers = plan.followers.expect("followers placed");
        let mut copies: BTreeMap<&str, usize> = BTreeMap::new();
        for (p, (owner, row)) in plan.decision.owners.iter().zip(&followers).enumerate() {
            assert_eq!(row.len(), 1, "partition {p}");
            assert_ne!(&row[0], owner, "partition {p}");
            *copies.entry(owner).or_default() += 1;
            *copies.entry(&row[0]).or_default() += 1;
        }
        assert!(copies.values().all(|&c| c == 6), "even, leaders included: {copies:?}");
        assert_eq!(followers[0], ["c"], "a current copy stays");
        // One copy: no followers; the router places nothing.
        let one = ReplicaInput { replicas: 1, followers: Vec::new() };
        assert_eq!(call_balance("{}", &inp, &one, policy).unwrap().followers, None);
    }
}
