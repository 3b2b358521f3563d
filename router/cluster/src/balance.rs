//! The leader's balancing step: build the input, call the bound policy, validate, fall back.
//!
//! It owns turning live nodes, load reports and the current map into a
//! [`BalanceInput`], running either the built-in even spread or the bound WASM plugin
//! (through [`BalancePlugins`], which the plugin host implements with its quarantine rules), and checking the
//! answer with [`validate_balance`]. Any plugin failure or invalid answer falls back to the
//! built-in for that round. It must never touch etcd: the leader does the I/O around it.

use std::collections::BTreeMap;

use switchyard_sdk::{BalanceDecision, BalanceInput, NodeInfo, PartitionInfo};

use super::keys::{LoadRecord, NodeRecord};
use switchyard_core::policy::{validate_balance, BalancePlugins, PluginBinding};

/// Name of the built-in policy in logs.
pub const BUILTIN: &str = "builtin:even-spread";

/// The shown input: every partition with its current owner (None when the map has none)
/// and load, every live node with its totals.
///
/// Draining members are left out of the nodes, and the partitions they own are shown
/// without an owner (their load figures kept): every policy must place them elsewhere, as
/// orphans that do not count against `max_moves`.
pub fn input(
    nodes: &BTreeMap<String, NodeRecord>,
    loads: &BTreeMap<String, LoadRecord>,
    owners: Option<&[String]>,
    partitions: u32,
    max_moves: u32,
    now_ms: u64,
) -> BalanceInput {
    let nodes_info = nodes
        .iter()
        .filter(|(_, n)| !n.draining)
        .map(|(id, _)| {
            let load = loads.get(id);
            NodeInfo {
                id: id.clone(),
                zone: String::new(),
                weight: 1.0,
                msg_rate: load.map_or(0.0, |l| l.msg_rate),
                bytes: load.map_or(0, |l| l.bytes),
                connections: load.map_or(0, |l| l.connections),
            }
        })
        .collect();
    let partitions = (0..partitions)
        .map(|p| {
            let owner = owners.and_then(|o| o.get(p as usize)).cloned();
            let load = owner.as_ref().and_then(|o| loads.get(o)).and_then(|l| l.partitions.get(&p));
            let draining = owner.as_ref().and_then(|o| nodes.get(o)).is_some_and(|n| n.draining);
            PartitionInfo {
                id: p,
                owner: if draining { None } else { owner },
                msg_rate: load.map_or(0.0, |l| l.msg_rate),
                bytes: load.map_or(0, |l| l.bytes),
                connections: load.map_or(0, |l| l.subscribers),
            }
        })
        .collect();
    BalanceInput { nodes: nodes_info, partitions, max_moves, now_ms }
}

/// The built-in: even spread within the move budget.
pub fn builtin(input: &BalanceInput) -> Result<BalanceDecision, String> {
    switchyard_sdk::balance::even_spread(input, input.max_moves)
}

/// Runs the bound plugin (or the built-in) and returns a valid decision and the name of
/// the policy that made it. Errors only when even the built-in has no answer (no nodes).
pub fn decide(
    plugins: &dyn BalancePlugins,
    binding: Option<&PluginBinding>,
    input: &BalanceInput,
) -> Result<(BalanceDecision, String), String> {
    if let Some(b) = binding {
        match plugins.balance(&b.plugin, &b.params.to_string(), input) {
            Ok(d) => return Ok((d, b.plugin.clone())),
            Err(why) => tracing::warn!(plugin = %b.plugin, %why, "balancer plugin gave no decision; built-in used"),
        }
    }
    let d = builtin(input)?;
    validate_balance(BUILTIN, input, &d).map_err(|e| e.to_string())?;
    Ok((d, BUILTIN.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str) -> (String, NodeRecord) {
        let rec = NodeRecord {
            id: id.into(),
            url: String::new(),
            peer_url: String::new(),
            version: String::new(),
            started_at: String::new(),
            partitions: 8,
            draining: false,
        };
        (id.to_string(), rec)
    }

    fn draining(id: &str) -> (String, NodeRecord) {
        let (id, rec) = node(id);
        (id, NodeRecord { draining: true, ..rec })
    }

    #[test]
    fn input_carries_owners_and_load() {
        let nodes: BTreeMap<_, _> = [node("a"), node("b")].into_iter().collect();
        let mut load = LoadRecord { node: "a".into(), msg_rate: 5.0, connections: 3, ..Default::default() };
        load.partitions.insert(1, super::super::keys::PartitionLoad { msg_rate: 5.0, bytes: 10, subscribers: 2 });
        let loads: BTreeMap<_, _> = [("a".to_string(), load)].into_iter().collect();
        let owners: Vec<String> = ["a", "a", "gone", "b"].iter().map(|s| s.to_string()).collect();
        let inp = input(&nodes, &loads, Some(&owners), 4, 10, 1);
        assert_eq!(inp.nodes.len(), 2);
        assert_eq!(inp.nodes[0].connections, 3);
        assert_eq!(inp.partitions[1].bytes, 10);
        assert_eq!(inp.partitions[2].owner.as_deref(), Some("gone"));
        let d = builtin(&inp).unwrap();
        validate_balance(BUILTIN, &inp, &d).unwrap();
        assert_eq!(d.owners[2], "b", "the orphan goes to the node below its share");
    }

    #[test]
    fn draining_nodes_get_nothing_and_lose_what_they_have() {
        let nodes: BTreeMap<_, _> = [node("a"), draining("b"), node("c")].into_iter().collect();
        let mut load = LoadRecord { node: "b".into(), ..Default::default() };
        load.partitions.insert(1, super::super::keys::PartitionLoad { msg_rate: 2.0, bytes: 7, subscribers: 1 });
        let loads: BTreeMap<_, _> = [("b".to_string(), load)].into_iter().collect();
        let owners: Vec<String> = ["a", "b", "c", "b", "a", "c"].iter().map(|s| s.to_string()).collect();
        // No moves allowed: the draining node's partitions still move (they are orphans).
        let inp = input(&nodes, &loads, Some(&owners), 6, 0, 1);
        assert_eq!(inp.nodes.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(), ["a", "c"]);
        assert_eq!(inp.partitions[1].owner, None);
        assert_eq!(inp.partitions[3].owner, None);
        assert_eq!(inp.partitions[1].bytes, 7, "the load of a draining owner's partition is kept");
        assert_eq!(inp.partitions[0].owner.as_deref(), Some("a"));
        let d = builtin(&inp).unwrap();
        validate_balance(BUILTIN, &inp, &d).unwrap();
        assert!(d.owners.iter().all(|o| o != "b"), "{:?}", d.owners);
        for p in [0, 2, 4, 5] {
            assert_eq!(d.owners[p], owners[p], "partition {p} of a serving node stays");
        }
        // A plugin's answer that keeps a partition on the draining node is invalid.
        let mut keep = d.clone();
        keep.owners[1] = "b".into();
        assert!(validate_balance("plugin", &inp, &keep).is_err());

        // Every member draining: nobody to place on, and the built-in says so.
        let all: BTreeMap<_, _> = [draining("a"), draining("b")].into_iter().collect();
        let inp = input(&all, &loads, Some(&owners), 6, 8, 1);
        assert!(inp.nodes.is_empty());
        assert!(builtin(&inp).is_err());
    }
}
