//! `load-aware-v1`: the ABI v1 build of `plugins/load-aware` as it was before its v2 port, kept as a test
//! fixture (v1 balancers must keep loading and deciding as before) and as the v1 side of
//! `switchyard plugin bench`.
//!
//! `load-aware`: a balancing plugin that evens out load (message rate and connections)
//! across the live nodes, with hysteresis.
//!
//! Params, all optional:
//!
//! | param | default | meaning |
//! |---|---|---|
//! | `max_moves` | none | most moves per round, on top of the router's own `max_moves` |
//! | `hysteresis` | `0.1` | a move must shrink the load gap between two nodes by more than this fraction of the mean node load |
//! | `connection_weight` | `1.0` | load of one connection, in messages per second |
//! | `partition_cost` | `1.0` | load of a partition just for existing, in messages per second (so idle partitions spread by count) |
//!
//! A partition's load is `partition_cost + msg_rate + connection_weight * connections`; a
//! node's load is the sum over its partitions, divided by its weight (weights that are not
//! positive and finite count as 1).
//!
//! - Partitions without a live owner are always placed, heaviest first, each on the node
//!   whose weighted load after taking it is least. They do not count as moves.
//! - Then, up to `min(input.max_moves, params.max_moves)` times: take the most and the least
//!   loaded node, and move the partition from the former to the latter that best narrows
//!   the gap between them, if it narrows it by more than `hysteresis` × the mean load.
//!   Otherwise stop. Each partition moves at most once per round.
//! - Deterministic: nodes are sorted by id; ties go to the lowest node id and the lowest
//!   partition id.
//! - With no live nodes and at least one partition there is no valid answer: the plugin
//!   returns an error (the host falls back to its built-in balancer for that round).

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde::Deserialize;
use switchyard_sdk::{BalanceDecision, BalanceInput, PartitionInfo};

/// Params of a `load-aware` binding.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// Most moves per round, on top of the router's own `max_moves`.
    pub max_moves: Option<u32>,
    /// Least gap narrowing worth a move, as a fraction of the mean node load.
    pub hysteresis: f64,
    /// Load of one connection, in messages per second.
    pub connection_weight: f64,
    /// Load of a partition for existing, in messages per second.
    pub partition_cost: f64,
}

impl Default for Params {
    fn default() -> Self {
        Self { max_moves: None, hysteresis: 0.1, connection_weight: 1.0, partition_cost: 1.0 }
    }
}

impl Params {
    fn check(&self) -> Result<(), String> {
        for (name, v) in [
            ("hysteresis", self.hysteresis),
            ("connection_weight", self.connection_weight),
            ("partition_cost", self.partition_cost),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(format!("param {name} must be a finite number >= 0, not {v}"));
            }
        }
        Ok(())
    }

    /// The load of one partition.
    pub fn score(&self, p: &PartitionInfo) -> f64 {
        self.partition_cost + finite(p.msg_rate) + self.connection_weight * p.connections as f64
    }
}

fn finite(x: f64) -> f64 {
    if x.is_finite() && x > 0.0 {
        x
    } else {
        0.0
    }
}

/// Assigns every partition to a live node, evening out weighted load.
pub fn policy(input: &BalanceInput, params: &Params) -> Result<BalanceDecision, String> {
    params.check()?;
    let total = input.partitions.len();
    if total == 0 {
        return Ok(BalanceDecision::default());
    }
    // Sorted, deduplicated nodes with their weights (first report of an id wins).
    let mut nodes: BTreeMap<&str, f64> = BTreeMap::new();
    for n in &input.nodes {
        let w = if n.weight.is_finite() && n.weight > 0.0 { n.weight } else { 1.0 };
        nodes.entry(n.id.as_str()).or_insert(w);
    }
    if nodes.is_empty() {
        return Err(format!("no live nodes to place {total} partitions on"));
    }
    let ids: Vec<&str> = nodes.keys().copied().collect();
    let weight: Vec<f64> = nodes.values().copied().collect();
    let index: BTreeMap<&str, usize> = ids.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let score: Vec<f64> = input.partitions.iter().map(|p| params.score(p)).collect();

    let mut owner: Vec<Option<usize>> =
        input.partitions.iter().map(|p| p.owner.as_deref().and_then(|o| index.get(o).copied())).collect();
    // Partitions that may still move this round: those on a live owner, not moved yet.
    let mut movable: Vec<bool> = owner.iter().map(Option::is_some).collect();
    let mut load = vec![0.0f64; ids.len()];
    let mut count = vec![0usize; ids.len()];
    for (p, o) in owner.iter().enumerate() {
        if let Some(n) = *o {
            load[n] += score[p];
            count[n] += 1;
        }
    }

    // Orphans: heaviest first, each where the weighted load after taking it is least.
    let mut orphans: Vec<usize> = (0..total).filter(|&p| owner[p].is_none()).collect();
    orphans.sort_by(|&a, &b| score[b].total_cmp(&score[a]).then(a.cmp(&b)));
    for p in orphans {
        let n = (0..ids.len())
            .min_by(|&a, &b| {
                ((load[a] + score[p]) / weight[a])
                    .total_cmp(&((load[b] + score[p]) / weight[b]))
                    .then(count[a].cmp(&count[b]))
                    .then(a.cmp(&b))
            })
            .expect("at least one node");
        owner[p] = Some(n);
        load[n] += score[p];
        count[n] += 1;
    }

    // Moves from the most to the least loaded node while they are worth it.
    let mean = load.iter().sum::<f64>() / weight.iter().sum::<f64>();
    let threshold = params.hysteresis * mean;
    let mut budget = input.max_moves.min(params.max_moves.unwrap_or(u32::MAX));
    while budget > 0 {
        let norm = |n: usize| load[n] / weight[n];
        let by_norm = |a: &usize, b: &usize| norm(*a).total_cmp(&norm(*b)).then(b.cmp(a));
        let hot = (0..ids.len()).max_by(by_norm).expect("at least one node");
        let cold = (0..ids.len()).min_by(|a, b| norm(*a).total_cmp(&norm(*b)).then(a.cmp(b))).expect("node");
        let gap = norm(hot) - norm(cold);
        if hot == cold || gap <= threshold {
            break;
        }
        let mut best: Option<(f64, usize)> = None;
        for p in (0..total).filter(|&p| movable[p] && owner[p] == Some(hot)) {
            let new_gap = ((load[hot] - score[p]) / weight[hot] - (load[cold] + score[p]) / weight[cold]).abs();
            let gain = gap - new_gap;
            if best.is_none_or(|(g, _)| gain.total_cmp(&g) == Ordering::Greater) {
                best = Some((gain, p));
            }
        }
        let Some((gain, p)) = best else { break };
        if !(gain > threshold && gain > 0.0) {
            break;
        }
        owner[p] = Some(cold);
        movable[p] = false;
        load[hot] -= score[p];
        load[cold] += score[p];
        count[hot] -= 1;
        count[cold] += 1;
        budget -= 1;
    }

    let moved = input.max_moves.min(params.max_moves.unwrap_or(u32::MAX)) - budget;
    if moved > 0 {
        switchyard_sdk::log!(debug, "moved {moved} partitions; mean load {mean:.1}");
    }
    Ok(BalanceDecision {
        owners: owner.into_iter().map(|o| ids[o.expect("every partition placed")].to_string()).collect(),
    })
}

switchyard_sdk::export_balance_v1!(policy);

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_sdk::{guest, NodeInfo};

    fn node(id: &str, weight: f64) -> NodeInfo {
        NodeInfo { id: id.into(), weight, ..Default::default() }
    }

    fn part(id: u32, owner: Option<&str>, msg_rate: f64, connections: u64) -> PartitionInfo {
        PartitionInfo { id, owner: owner.map(String::from), msg_rate, bytes: 0, connections }
    }

    fn input(nodes: Vec<NodeInfo>, partitions: Vec<PartitionInfo>, max_moves: u32) -> BalanceInput {
        BalanceInput { nodes, partitions, max_moves, now_ms: 0 }
    }

    fn moves(inp: &BalanceInput, d: &BalanceDecision) -> usize {
        let live: Vec<&str> = inp.nodes.iter().map(|n| n.id.as_str()).collect();
        inp.partitions
            .iter()
            .zip(&d.owners)
            .filter(|(p, new)| p.owner.as_deref().is_some_and(|o| live.contains(&o) && o != new.as_str()))
            .count()
    }

    fn loads(inp: &BalanceInput, d: &BalanceDecision, p: &Params) -> BTreeMap<String, f64> {
        let mut l: BTreeMap<String, f64> = inp.nodes.iter().map(|n| (n.id.clone(), 0.0)).collect();
        for (part, o) in inp.partitions.iter().zip(&d.owners) {
            *l.get_mut(o).expect("live owner") += p.score(part);
        }
        l
    }

    fn check_valid(inp: &BalanceInput, d: &BalanceDecision) {
        assert_eq!(d.owners.len(), inp.partitions.len());
        assert!(d.owners.iter().all(|o| inp.nodes.iter().any(|n| &n.id == o)));
        assert!(moves(inp, d) <= inp.max_moves as usize);
    }

    #[test]
    fn places_orphans_by_load() {
        // One hot partition and many idle ones: the hot one gets a node nearly to itself.
        let mut parts = vec![part(0, None, 100.0, 0)];
        parts.extend((1..9).map(|i| part(i, None, 0.0, 0)));
        let inp = input(vec![node("b", 1.0), node("a", 1.0)], parts, 0);
        let p = Params::default();
        let d = policy(&inp, &p).unwrap();
        check_valid(&inp, &d);
        assert_eq!(d.owners[0], "a");
        assert!(d.owners[1..].iter().all(|o| o == "b"));
        // Idle partitions spread by count.
        let inp = input(
            vec![node("a", 1.0), node("b", 1.0), node("c", 1.0)],
            (0..9).map(|i| part(i, None, 0.0, 0)).collect(),
            0,
        );
        let l = loads(&inp, &policy(&inp, &p).unwrap(), &p);
        assert!(l.values().all(|&x| x == 3.0), "{l:?}");
    }

    #[test]
    fn moves_load_to_a_new_node() {
        let parts: Vec<_> =
            (0..8).map(|i| part(i, Some(if i < 4 { "a" } else { "b" }), 10.0 * (i + 1) as f64, 2)).collect();
        let inp = input(vec![node("a", 1.0), node("b", 1.0), node("c", 1.0)], parts, 8);
        let p = Params::default();
        let d = policy(&inp, &p).unwrap();
        check_valid(&inp, &d);
        let before = loads(
            &inp,
            &BalanceDecision { owners: inp.partitions.iter().map(|x| x.owner.clone().unwrap()).collect() },
            &p,
        );
        let after = loads(&inp, &d, &p);
        let spread = |l: &BTreeMap<String, f64>| {
            l.values().cloned().fold(f64::MIN, f64::max) - l.values().cloned().fold(f64::MAX, f64::min)
        };
        assert!(spread(&after) < spread(&before) / 2.0, "{before:?} -> {after:?}");
        assert!(after["c"] > 0.0);
        // Deterministic.
        assert_eq!(policy(&inp, &p).unwrap(), d);
    }

    #[test]
    fn hysteresis_keeps_a_nearly_balanced_cluster() {
        // Loads 53 vs 49 (msg/s + 1 per partition): gap 4 < 10% of the mean 51.
        let parts = vec![
            part(0, Some("a"), 50.0, 0),
            part(1, Some("a"), 1.0, 0),
            part(2, Some("b"), 47.0, 0),
            part(3, Some("b"), 0.0, 0),
        ];
        let inp = input(vec![node("a", 1.0), node("b", 1.0)], parts, 10);
        let d = policy(&inp, &Params::default()).unwrap();
        assert_eq!(moves(&inp, &d), 0);
        // Without hysteresis the 1 msg/s partition moves (gap 4 -> 0).
        let d = policy(&inp, &Params { hysteresis: 0.0, ..Params::default() }).unwrap();
        assert_eq!(d.owners, ["a", "b", "b", "b"]);
    }

    #[test]
    fn respects_budgets_and_places_orphans_anyway() {
        let mut parts: Vec<_> = (0..10).map(|i| part(i, Some("a"), 5.0, 1)).collect();
        parts.push(part(10, Some("gone"), 5.0, 1));
        parts.push(part(11, None, 5.0, 1));
        let nodes = vec![node("a", 1.0), node("b", 1.0), node("c", 1.0)];
        let inp = input(nodes.clone(), parts.clone(), 0);
        let d = policy(&inp, &Params::default()).unwrap();
        check_valid(&inp, &d);
        assert_eq!(moves(&inp, &d), 0);
        assert!(d.owners[..10].iter().all(|o| o == "a"));
        assert!(d.owners[10] != "a" && d.owners[11] != "a");

        let inp = input(nodes.clone(), parts.clone(), 5);
        let d = policy(&inp, &Params { max_moves: Some(2), ..Params::default() }).unwrap();
        assert_eq!(moves(&inp, &d), 2);
        let d = policy(&inp, &Params::default()).unwrap();
        check_valid(&inp, &d);
        assert_eq!(moves(&inp, &d), 5);
    }

    #[test]
    fn weights_shift_load() {
        let parts: Vec<_> = (0..12).map(|i| part(i, None, 10.0, 0)).collect();
        let inp = input(vec![node("big", 2.0), node("small", 1.0)], parts, 0);
        let p = Params::default();
        let l = loads(&inp, &policy(&inp, &p).unwrap(), &p);
        assert_eq!(l["big"], 88.0);
        assert_eq!(l["small"], 44.0);
    }

    #[test]
    fn odd_inputs_do_not_panic() {
        let parts =
            vec![part(0, Some("a"), f64::NAN, 0), part(1, Some("a"), f64::INFINITY, u64::MAX), part(2, None, -5.0, 0)];
        let inp = input(vec![node("a", f64::NAN), node("a", 3.0), node("b", -1.0)], parts, u32::MAX);
        let d = policy(&inp, &Params::default()).unwrap();
        check_valid(&inp, &d);
        assert_eq!(policy(&input(vec![], vec![], 1), &Params::default()), Ok(BalanceDecision::default()));
        assert!(policy(&input(vec![], vec![part(0, None, 0.0, 0)], 1), &Params::default()).is_err());
        assert!(policy(&inp, &Params { hysteresis: -1.0, ..Params::default() }).is_err());
    }

    #[test]
    fn params_through_the_abi() {
        let parts: Vec<_> = (0..4).map(|i| part(i, Some("a"), 10.0, 0)).collect();
        let inp = input(vec![node("a", 1.0), node("b", 1.0)], parts, 4);
        let call = |params: &str| guest::call(&guest::encode_call(params, &inp).unwrap(), policy);
        // Ties go to the lowest partition id.
        assert_eq!(call("{}").unwrap().owners, ["b", "b", "a", "a"]);
        assert_eq!(call(r#"{"max_moves":1}"#).unwrap().owners, ["b", "a", "a", "a"]);
        assert_eq!(call(r#"{"hysteresis":5}"#).unwrap().owners, ["a", "a", "a", "a"]);
        assert!(call(r#"{"hysteresis":"high"}"#).is_err());
    }
}
