//! Balancer simulation: the built-in even spread at N nodes × P partitions (default
//! 100 × 4,096), as the leader runs it each round (build the input, balance, validate).
//!
//! `cargo run --release -p switchyard-tests --example balance_sim [-- NODES PARTITIONS]`
//!
//! Prints the time per round and the partitions moved against the optimum for: placing
//! everything from scratch, a steady round, a node joining, a node leaving, and a skewed
//! start under the default move budget.

use std::collections::BTreeMap;
use tokio::time::Instant;

use switchyard_cluster::balance::{builtin, input, BUILTIN};
use switchyard_cluster::keys::{LoadRecord, NodeRecord};
use switchyard_core::policy::validate_balance;

const ROUNDS: u32 = 50;

fn nodes(ids: &[String]) -> BTreeMap<String, NodeRecord> {
    ids.iter()
        .map(|id| {
            let rec = NodeRecord {
                id: id.clone(),
                url: String::new(),
                peer_url: String::new(),
                version: String::new(),
                started_at: String::new(),
                partitions: 0,
                draining: false,
            };
            (id.clone(), rec)
        })
        .collect()
}

/// One leader round; returns the new owners and the mean time per round in µs.
fn round(live: &[String], owners: Option<&[String]>, p: u32, max_moves: u32) -> (Vec<String>, f64) {
    let (members, loads) = (nodes(live), BTreeMap::<String, LoadRecord>::new());
    let start = Instant::now();
    let mut result = Vec::new();
    for _ in 0..ROUNDS {
        let inp = input(&members, &loads, owners, p, max_moves, 0);
        let d = builtin(&inp).expect("nodes are live");
        validate_balance(BUILTIN, &inp, &d).expect("valid decision");
        result = d.owners;
    }
    (result, start.elapsed().as_secs_f64() * 1e6 / ROUNDS as f64)
}

fn moved(before: &[String], after: &[String], live: &[String]) -> usize {
    before.iter().zip(after).filter(|(b, a)| b != a && live.contains(b)).count()
}

fn spread(owners: &[String], live: &[String]) -> (usize, usize) {
    let counts: Vec<usize> = live.iter().map(|n| owners.iter().filter(|o| *o == n).count()).collect();
    (*counts.iter().min().unwrap(), *counts.iter().max().unwrap())
}

fn main() {
    let args: Vec<u32> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (n, p) = (args.first().copied().unwrap_or(100), args.get(1).copied().unwrap_or(4096));
    let ids: Vec<String> = (0..n).map(|i| format!("node-{i:03}")).collect();
    println!("built-in even spread, {n} nodes x {p} partitions, mean of {ROUNDS} rounds (input + balance + validate)");
    println!("{:<34} {:>12} {:>8} {:>8} {:>10}", "case", "us/round", "moved", "optimum", "min..max");

    let (initial, t) = round(&ids, None, p, 64);
    let (lo, hi) = spread(&initial, &ids);
    println!("{:<34} {:>12.0} {:>8} {:>8} {:>10}", "place all from scratch", t, 0, 0, format!("{lo}..{hi}"));

    let (steady, t) = round(&ids, Some(&initial), p, 64);
    let (lo, hi) = spread(&steady, &ids);
    println!(
        "{:<34} {:>12.0} {:>8} {:>8} {:>10}",
        "steady (nothing changed)",
        t,
        moved(&initial, &steady, &ids),
        0,
        format!("{lo}..{hi}")
    );

    let mut joined_ids = ids.clone();
    joined_ids.push("node-new".into());
    let (joined, t) = round(&joined_ids, Some(&initial), p, u32::MAX);
    let (lo, hi) = spread(&joined, &joined_ids);
    let optimum = (p / (n + 1)) as usize;
    println!(
        "{:<34} {:>12.0} {:>8} {:>8} {:>10}",
        "one node joins",
        t,
        moved(&initial, &joined, &joined_ids),
        optimum,
        format!("{lo}..{hi}")
    );

    let left_ids: Vec<String> = ids[1..].to_vec();
    let (left, t) = round(&left_ids, Some(&initial), p, 64);
    let (lo, hi) = spread(&left, &left_ids);
    let orphans = initial.iter().filter(|o| **o == ids[0]).count();
    let replaced = initial.iter().zip(&left).filter(|(b, a)| b != a).count();
    println!(
        "{:<34} {:>12.0} {:>8} {:>8} {:>10}",
        "one node leaves (re-placed)",
        t,
        replaced,
        orphans,
        format!("{lo}..{hi}")
    );

    // Everything on one node, the default budget of 64 moves per round.
    let mut owners = vec![ids[0].clone(); p as usize];
    let mut rounds = 0;
    let mut total = 0;
    let start = Instant::now();
    loop {
        let (next, _) = round(&ids, Some(&owners), p, 64);
        let m = moved(&owners, &next, &ids);
        owners = next;
        if m == 0 {
            break;
        }
        rounds += 1;
        total += m;
    }
    let (lo, hi) = spread(&owners, &ids);
    let optimum = p as usize - p as usize / n as usize - usize::from(p % n != 0);
    println!(
        "{:<34} {:>12} {:>8} {:>8} {:>10}",
        format!("skewed start: {rounds} rounds of <=64"),
        format!("{:.0}ms all", start.elapsed().as_secs_f64() * 1e3 / ROUNDS as f64),
        total,
        optimum,
        format!("{lo}..{hi}")
    );
}
