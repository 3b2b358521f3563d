//! ABI v2 balancing through the real wasmtime host and real `.wasm` builds.
//!
//! - The v1 and v2 builds of `even-spread` and `load-aware` (`tests/plugins/dist/*-v1.wasm`
//!   and `plugins/dist/*.wasm`, from `scripts/build-plugins.sh`) choose the same owners on
//!   generated inputs, and `even-spread` the same as the router's built-in.
//! - The v2 `even-spread` places followers exactly as the router's built-in placement
//!   does, and they pass the host's checks; a v1 balancer places none.
//! - The host's cached v2 input follows every change between rounds.
//! - Hostile v2 balancers (hand-written WAT) fail with the right reason, give no decision
//!   (the leader falls back to the built-in) and are quarantined, as v1 modules are.

mod common;

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use switchyard_core::policy::{validate_balance, validate_followers, BalancePlugins};
use switchyard_metrics::Metrics;
use switchyard_plugin_host::host::{CallError, CallLimits, Compiled, Host};
use switchyard_plugin_host::registry::Registry;
use switchyard_sdk::balance::{place_followers, NONE};
use switchyard_sdk::{BalanceInput, BalancePlan, NodeInfo, PartitionInfo, ReplicaInput};

use common::{built, registry_in, small_limits};

fn limits() -> CallLimits {
    CallLimits { timeout: Duration::from_millis(500), max_memory: 32 << 20 }
}

struct Builds {
    host: Arc<Host>,
    even_v1: Compiled,
    even_v2: Compiled,
    load_v1: Compiled,
    load_v2: Compiled,
}

fn builds() -> &'static Builds {
    static BUILDS: std::sync::OnceLock<Builds> = std::sync::OnceLock::new();
    BUILDS.get_or_init(|| {
        let host = Host::new(None).unwrap();
        let load = |p: &str| host.load(&built(p)).expect("loads");
        Builds {
            even_v1: load("tests/plugins/dist/even-spread-v1.wasm"),
            even_v2: load("plugins/dist/even-spread.wasm"),
            load_v1: load("tests/plugins/dist/load-aware-v1.wasm"),
            load_v2: load("plugins/dist/load-aware.wasm"),
            host,
        }
    })
}

fn call(c: &Compiled, input: &BalanceInput, replicas: &ReplicaInput) -> Result<BalancePlan, CallError> {
    builds().host.balance(&Arc::from("t"), c, "{}", input, replicas, limits())
}

fn one() -> ReplicaInput {
    ReplicaInput { replicas: 1, followers: Vec::new() }
}

/// `nodes` live nodes (ids out of order); owners by `seed`: 0 none, 1 a departed node,
/// else a live node; loads from the seed too.
fn input(nodes: usize, seed: &[(u8, u8)], max_moves: u32) -> BalanceInput {
    let ids: Vec<String> = (0..nodes).map(|i| format!("n{:02}", (i * 7) % 23)).collect();
    BalanceInput {
        nodes: ids.iter().map(|id| NodeInfo { id: id.clone(), weight: 1.0, ..Default::default() }).collect(),
        partitions: seed
            .iter()
            .enumerate()
            .map(|(p, &(o, load))| PartitionInfo {
                id: p as u32,
                owner: match o {
                    0 => None,
                    1 => Some("gone".into()),
                    o => Some(ids[o as usize % nodes].clone()),
                },
                msg_rate: (load % 13) as f64 * 2.5,
                connections: (load / 13) as u64,
                ..Default::default()
            })
            .collect(),
        max_moves,
        now_ms: 1,
    }
}

/// Each partition's current followers: the node after its owner, when it has one.
fn current_followers(input: &BalanceInput, replicas: u32) -> ReplicaInput {
    let followers = input
        .partitions
        .iter()
        .map(|p| {
            let at = input.nodes.iter().position(|n| Some(&n.id) == p.owner.as_ref());
            at.map(|i| vec![input.nodes[(i + 1) % input.nodes.len()].id.clone()]).unwrap_or_default()
        })
        .collect();
    ReplicaInput { replicas, followers }
}

#[test]
fn the_balancers_load_with_their_abi() {
    let b = builds();
    assert_eq!((b.even_v1.abi, b.even_v2.abi, b.load_v1.abi, b.load_v2.abi), (1, 2, 1, 2));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// v1 and v2 builds choose the same owners; even-spread's are the built-in's.
    #[test]
    fn v1_and_v2_balancers_decide_alike(
        nodes in 1usize..12,
        seed in proptest::collection::vec((any::<u8>(), any::<u8>()), 0..300),
        max_moves in 0u32..20,
    ) {
        let b = builds();
        let inp = input(nodes, &seed, max_moves);
        let builtin = switchyard_sdk::balance::even_spread(&inp, max_moves).unwrap();
        let v1 = call(&b.even_v1, &inp, &one()).unwrap();
        let v2 = call(&b.even_v2, &inp, &one()).unwrap();
        prop_assert_eq!(&v1.decision, &builtin);
        prop_assert_eq!(&v2.decision, &builtin);
        prop_assert_eq!(v2.followers, None);
        let v1 = call(&b.load_v1, &inp, &one()).unwrap();
        let v2 = call(&b.load_v2, &inp, &one()).unwrap();
        prop_assert_eq!(v1.decision, v2.decision);
    }

    /// The v2 even-spread places followers exactly as the router's built-in placement, and
    /// they pass the host's checks.
    #[test]
    fn v2_followers_are_the_built_ins(
        nodes in 1usize..9,
        seed in proptest::collection::vec((any::<u8>(), any::<u8>()), 1..200),
        replicas in 2u32..4,
    ) {
        let b = builds();
        let inp = input(nodes, &seed, 8);
        let shown = current_followers(&inp, replicas);
        let plan = call(&b.even_v2, &inp, &shown).unwrap();
        validate_balance("t", &inp, &plan.decision).unwrap();
        let want = (replicas as usize).min(nodes);
        if want == 1 {
            // One node: no followers to place.
            prop_assert_eq!(plan.followers, None);
            return Ok(());
        }
        let followers = plan.followers.clone().expect("followers placed");
        validate_followers("t", &inp, &shown, &plan.decision.owners, &followers).unwrap();
        // The built-in over the same input (node indices in id order).
        let mut ids: Vec<&str> = inp.nodes.iter().map(|n| n.id.as_str()).collect();
        ids.sort_unstable();
        let at = |id: &str| ids.iter().position(|n| *n == id).map_or(NONE, |i| i as u32);
        let owners: Vec<u32> = plan.decision.owners.iter().map(|o| at(o)).collect();
        let candidates = |p: usize| {
            let old = inp.partitions[p].owner.as_deref().map_or(NONE, at);
            let moved = (old != owners[p]).then_some(old);
            let current = shown.followers[p].iter().map(|f| at(f)).filter(|&f| f != old);
            moved.into_iter().chain(current).collect::<Vec<u32>>()
        };
        let expected = place_followers(ids.len(), &owners, want, candidates, |_| false);
        let slots = want - 1;
        let expected: Vec<Vec<String>> = (0..owners.len())
            .map(|p| expected[p * slots..(p + 1) * slots].iter().map(|&f| ids[f as usize].to_string()).collect())
            .collect();
        prop_assert_eq!(followers, expected);
    }
}

/// The cached input follows every change: after any sequence of rounds, the answer is
/// the one a host with no cache gives.
#[test]
fn the_cached_input_follows_changes() {
    let b = builds();
    let fresh = Host::new(None).unwrap();
    let mut inp = input(7, &(0..500).map(|i| ((i * 31 % 251) as u8, (i * 7) as u8)).collect::<Vec<_>>(), 4);
    for round in 0..6 {
        let shown = current_followers(&inp, 2);
        let warm = call(&b.even_v2, &inp, &shown).unwrap();
        let cold = fresh.load(&built("plugins/dist/even-spread.wasm")).unwrap();
        let cold = fresh.balance(&Arc::from("t"), &cold, "{}", &inp, &shown, limits()).unwrap();
        assert_eq!(warm, cold, "round {round}");
        // Apply the answer, change some load, and let a node leave or join.
        for (p, o) in inp.partitions.iter_mut().zip(&warm.decision.owners) {
            p.owner = Some(o.clone());
            p.msg_rate += 1.0;
        }
        match round {
            1 => {
                inp.nodes.remove(2);
            }
            3 => inp.nodes.push(NodeInfo { id: "n99".into(), weight: 1.0, ..Default::default() }),
            _ => inp.nodes[0].connections += 5,
        }
    }
}

// === hostile v2 balancers ===

/// Little-endian u32 words as a WAT data string.
fn words(w: &[u32]) -> String {
    w.iter().flat_map(|x| x.to_le_bytes()).map(|b| format!("\\{b:02x}")).collect()
}

/// A v2 balance module: `body` is the entry point (params `$p $l`, result i64). Data at
/// 64: a valid answer for [`hostile_input`] (owners 0, 1, 0); at 128: an owner out of
/// range; at 192: a follower that is its owner; at 256: four moves.
fn balance_module(body: &str) -> Vec<u8> {
    let data = format!(
        r#"(data (i32.const 64) "{}")
           (data (i32.const 128) "{}")
           (data (i32.const 192) "{}")
           (data (i32.const 256) "{}")"#,
        words(&[0, 3, 0, 0, 0, 1, 0]),
        words(&[0, 3, 0, 0, 0, 5, 0]),
        words(&[0, 3, 1, 0, 0, 1, 0, 0, 0, 1]),
        words(&[0, 3, 0, 0, 1, 0, 0]),
    );
    common::v2_module("", &data, "switchyard_balance", body)
}

/// `(ptr << 32) | len`.
fn out(ptr: u64, len: u64) -> String {
    format!("(i64.const {})", (ptr << 32) | len)
}

/// Two nodes, three partitions (on a, on b, on none), no moves allowed, two copies.
fn hostile_input() -> (BalanceInput, ReplicaInput) {
    let inp = BalanceInput {
        nodes: ["a", "b"].iter().map(|id| NodeInfo { id: id.to_string(), weight: 1.0, ..Default::default() }).collect(),
        partitions: vec![
            PartitionInfo { id: 0, owner: Some("a".into()), ..Default::default() },
            PartitionInfo { id: 1, owner: Some("b".into()), ..Default::default() },
            PartitionInfo { id: 2, owner: None, ..Default::default() },
        ],
        max_moves: 0,
        now_ms: 0,
    };
    (inp, ReplicaInput { replicas: 2, followers: Vec::new() })
}

fn hostile_cases() -> Vec<(&'static str, String, &'static str)> {
    vec![
        ("endless loop", "(loop $l (br $l)) (i64.const 0)".into(), "timeout"),
        ("memory bomb", "(drop (memory.grow (i32.const 1000))) (i64.const 0)".into(), "memory"),
        ("an owner that is no node", out(128, 28), "invalid_output"),
        ("a follower that is its owner", out(192, 40), "invalid_output"),
        ("moves over the budget", out(256, 28), "invalid_output"),
        ("an answer cut short", out(64, 24), "garbage"),
        ("output outside memory", out(0x7fff_0000, 28), "out_of_bounds"),
        ("trap", "unreachable".into(), "trap"),
    ]
}

#[test]
fn hostile_v2_balancers_fail_with_the_right_reason() {
    let host = Host::new(None).unwrap();
    let (inp, shown) = hostile_input();
    let small = small_limits();
    let good = host.load(&balance_module(&out(64, 28))).unwrap();
    let plan = host.balance(&Arc::from("h"), &good, "{}", &inp, &shown, small).unwrap();
    assert_eq!((plan.decision.owners, plan.followers), (vec!["a".into(), "b".into(), "a".into()], None));
    for (what, body, reason) in hostile_cases() {
        let started = tokio::time::Instant::now();
        let compiled = host.load(&balance_module(&body)).unwrap();
        let err = host.balance(&Arc::from("h"), &compiled, "{}", &inp, &shown, small).expect_err(what);
        assert_eq!(err.reason(), reason, "{what}: {err}");
        assert!(started.elapsed() < Duration::from_secs(5), "{what} took {:?}", started.elapsed());
    }
}

fn registry_with(name: &str, bytes: &[u8]) -> (tempfile::TempDir, Arc<Registry>, Arc<Metrics>) {
    registry_in(&[(name, bytes)], small_limits())
}

/// Through the registry (the leader's `BalancePlugins`), a hostile v2 balancer gives no
/// decision (the leader uses the built-in), is counted under its reason and is
/// quarantined after two consecutive failures.
#[test]
fn hostile_v2_balancers_give_no_decision_and_are_quarantined() {
    let (inp, shown) = hostile_input();
    for (what, body, reason) in hostile_cases() {
        let (_dir, registry, metrics) = registry_with("h", &balance_module(&body));
        for round in 0..3 {
            assert!(registry.balance("h", "{}", &inp, &shown).is_err(), "{what}: round {round}");
        }
        assert_eq!(metrics.plugin_failures.with_label_values(&["h", "balance", reason]).get(), 2, "{what}");
        let row = registry.list().into_iter().next().unwrap();
        assert_eq!((row.state, row.calls, row.failures), ("quarantined", 2, 2), "{what}");
    }
}

/// A v1 balancer keeps today's behaviour: owners only, followers left to the router; a v2
/// one answers followers, and a follower list the host's checks refuse fails the call.
#[test]
fn v1_balancers_place_no_followers() {
    let (inp, shown) = hostile_input();
    let (_d1, v1, _) = registry_with("even", &built("tests/plugins/dist/even-spread-v1.wasm"));
    let plan = v1.balance("even", "{}", &inp, &shown).unwrap();
    assert_eq!((plan.decision.owners.len(), plan.followers), (3, None));
    let (_d2, v2, _) = registry_with("even", &built("plugins/dist/even-spread.wasm"));
    let plan = v2.balance("even", "{}", &inp, &shown).unwrap();
    assert_eq!(plan.followers.map(|f| f.len()), Some(3));
}
