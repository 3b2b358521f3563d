//! The leader's balancing step: build the input, call the bound policy, validate, fall back.
//!
//! It owns turning live nodes, load reports and the current map into a
//! [`BalanceInput`] (and, for ABI v2 plugins, a [`ReplicaInput`]: the wanted copies and
//! each partition's current followers), running either the built-in even spread or the
//! bound WASM plugin (through [`BalancePlugins`], which the plugin host implements with its
//! quarantine rules), and checking the answer with [`validate_balance`] (the plugin host
//! also checks a plugin's followers). Any plugin failure or invalid answer falls back to
//! the built-in for that round: even-spread owners, and followers placed by
//! [`crate::replicas::place`]. It must never touch etcd: the leader does the I/O around it.

use std::collections::BTreeMap;

use switchyard_sdk::{BalanceDecision, BalanceInput, NodeInfo, PartitionInfo, ReplicaInput};

use super::keys::{LoadRecord, MapRecord, NodeRecord};
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

/// What an ABI v2 balancer is shown of the replicas: `replicas` copies per partition
/// (capped at the live nodes of `input`), and each partition's current followers: its
/// replicas in `current` other than its shown owner.
pub(crate) fn replica_input(current: Option<&MapRecord>, input: &BalanceInput, replicas: usize) -> ReplicaInput {
    let want = replicas.clamp(1, input.nodes.len().max(1)) as u32;
    if want == 1 {
        return ReplicaInput { replicas: 1, followers: Vec::new() };
    }
    let followers = input
        .partitions
        .iter()
        .enumerate()
        .map(|(p, info)| {
            let listed = current.and_then(|m| m.replicas.get(p)).map_or(&[][..], Vec::as_slice);
            listed.iter().filter(|r| Some(r.as_str()) != info.owner.as_deref()).cloned().collect()
        })
        .collect();
    ReplicaInput { replicas: want, followers }
}

/// The built-in: even spread within the move budget.
pub fn builtin(input: &BalanceInput) -> Result<BalanceDecision, String> {
    switchyard_sdk::balance::even_spread(input, input.max_moves)
}

/// Why a round has no decision at all (not even the built-in's).
#[derive(Debug, thiserror::Error)]
pub enum BalanceError {
    /// The built-in even spread has no answer (no live nodes).
    #[error("built-in balancer: {0}")]
    Builtin(String),
    /// The built-in's answer failed validation.
    #[error(transparent)]
    Invalid(#[from] switchyard_core::policy::PolicyError),
}

/// One round's decision: the owners, the followers when the plugin placed them (None: the
/// built-in [`crate::replicas::place`] places them), and the policy that decided.
#[derive(Debug)]
pub struct Decided {
    /// The owner of every partition (validated).
    pub decision: BalanceDecision,
    /// The plugin's followers per partition (validated), if it placed them.
    pub followers: Option<Vec<Vec<String>>>,
    /// The policy's name, for logs.
    pub policy: String,
}

/// Runs the bound plugin (or the built-in) and returns a valid decision. Errors only when
/// even the built-in has no answer (no nodes).
pub fn decide(
    plugins: &dyn BalancePlugins,
    binding: Option<&PluginBinding>,
    input: &BalanceInput,
    replicas: &ReplicaInput,
) -> Result<Decided, BalanceError> {
    if let Some(b) = binding {
        match plugins.balance(&b.plugin, &b.params.to_string(), input, replicas) {
            Ok(plan) => {
                return Ok(Decided { decision: plan.decision, followers: plan.followers, policy: b.plugin.clone() })
            }
            Err(why) => tracing::warn!(plugin = %b.plugin, %why, "balancer plugin gave no decision; built-in used"),
        }
    }
    let d = builtin(input).map_err(BalanceError::Builtin)?;
    validate_balance(BUILTIN, input, &d)?;
    Ok(Decided { decision: d, followers: None, policy: BUILTIN.to_string() })
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

    /// A balancer plugin that answers a fixed plan, or fails.
    struct Fixed(Result<switchyard_sdk::BalancePlan, String>);

    impl BalancePlugins for Fixed {
        fn balance(
            &self,
            plugin: &str,
            _: &str,
            _: &BalanceInput,
            _: &ReplicaInput,
        ) -> Result<switchyard_sdk::BalancePlan, switchyard_core::policy::PolicyError> {
            self.0
                .clone()
                .map_err(|reason| switchyard_core::policy::PolicyError::NoDecision { policy: plugin.into(), reason })
        }
    }

    #[test]
    fn replicas_shown_and_a_plugins_followers_passed_on() {
        let nodes: BTreeMap<_, _> = [node("a"), node("b")].into_iter().collect();
        let owners: Vec<String> = ["a", "b", "gone"].iter().map(|s| s.to_string()).collect();
        let inp = input(&nodes, &BTreeMap::new(), Some(&owners), 3, 8, 1);
        let map = MapRecord {
            epoch: 1,
            partitions: 3,
            leader: "a".into(),
            term: 1,
            updated_at: String::new(),
            counts: BTreeMap::new(),
            owners: owners.clone(),
            moved: BTreeMap::new(),
            replicas: vec![vec!["a".into(), "b".into()], vec!["b".into()], vec!["gone".into(), "a".into()]],
            isr: Vec::new(),
            leader_epochs: vec![1, 1, 1],
        };
        // Three copies wanted of two nodes: two; each partition's followers are its replicas
        // other than its shown owner (the host drops those that are not live).
        let shown = replica_input(Some(&map), &inp, 3);
        assert_eq!(shown.replicas, 2);
        assert_eq!(shown.followers, vec![vec!["b".to_string()], vec![], vec!["a".to_string()]]);
        assert_eq!(replica_input(Some(&map), &inp, 1), ReplicaInput { replicas: 1, followers: vec![] });

        let binding = PluginBinding { plugin: "p".into(), params: switchyard_core::policy::empty_params() };
        let plan = switchyard_sdk::BalancePlan {
            decision: BalanceDecision { owners: vec!["a".into(), "b".into(), "a".into()] },
            followers: Some(vec![vec!["b".into()], vec!["a".into()], vec!["b".into()]]),
        };
        let d = decide(&Fixed(Ok(plan.clone())), Some(&binding), &inp, &shown).unwrap();
        assert_eq!((d.decision, d.followers, d.policy.as_str()), (plan.decision, plan.followers, "p"));
        // A plugin without an answer: the built-in owners, and followers left to `replicas::place`.
        let d = decide(&Fixed(Err("trap".into())), Some(&binding), &inp, &shown).unwrap();
        assert_eq!((d.followers, d.policy.as_str()), (None, BUILTIN));
    }
}
