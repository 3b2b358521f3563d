//! Failover benchmark: `kill -9` the leader of a three-node cluster on a real etcd and time
//! until every surviving node routes by a new map without it. Ten runs; the killed node is
//! restarted between runs. Also reports partitions moved on each leave and join against
//! the optimum.
//!
//! `cargo run --release -p switchyard-tests --example failover [-- RUNS]`
//! (uses `target/debug/switchyard` unless SWITCHYARD_BIN is set; lease TTL 2 s, round 1 s,
//! P = 64).

use std::time::Duration;
use tokio::time::Instant;

use switchyard_tests::etcd::{cluster_view, node_config, wait_converged, Etcd};
use switchyard_tests::serde_json::Value;
use switchyard_tests::Node;

const P: u32 = 64;

fn moved(a: &Value, b: &Value) -> usize {
    (0..P as usize).filter(|&p| a["owners"][p] != b["owners"][p]).count()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let runs: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(10);
    let etcd = Etcd::start().await;
    let ids = ["n1", "n2", "n3"];
    let mut nodes: Vec<Node> = ids.iter().map(|id| Node::start(&node_config(&etcd, "bench", id, P, ""))).collect();
    let mut map = wait_converged(&etcd, "bench", &nodes.iter().collect::<Vec<_>>(), &ids).await?;
    eprintln!("[failover] 3 nodes up, lease TTL 2s, round 1s, P = {P}; {runs} runs");
    let mut times = Vec::new();
    for run in 1..=runs {
        let leader = map["leader"].as_str().unwrap_or_default().to_string();
        let k = ids.iter().position(|id| *id == leader).expect("leader is a node");
        let before_epoch = map["epoch"].as_u64().unwrap_or(0);
        let killed_at = Instant::now();
        nodes[k].kill9();
        // Poll every survivor until each routes by a map newer than before without the leader.
        loop {
            let mut done = true;
            for (i, n) in nodes.iter().enumerate() {
                if i == k {
                    continue;
                }
                let v = cluster_view(n).await.unwrap_or(Value::Null);
                let fresh = v["epoch"].as_u64().unwrap_or(0) > before_epoch;
                let without = v["owners"].as_array().is_some_and(|o| o.iter().all(|x| x != leader.as_str()));
                done &= fresh && without;
            }
            if done {
                break;
            }
            anyhow::ensure!(killed_at.elapsed() < Duration::from_secs(60), "no failover within 60s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let took = killed_at.elapsed();
        times.push(took);
        let survivors: Vec<&str> = ids.iter().copied().filter(|id| *id != leader).collect();
        let live: Vec<&Node> = nodes.iter().enumerate().filter(|(i, _)| *i != k).map(|(_, n)| n).collect();
        let after = wait_converged(&etcd, "bench", &live, &survivors).await?;
        let leave_moved = moved(&map, &after);
        let leave_opt = map["counts"][&leader].as_u64().unwrap_or(0) as usize;
        nodes[k].restart();
        map = wait_converged(&etcd, "bench", &nodes.iter().collect::<Vec<_>>(), &ids).await?;
        let join_moved = moved(&after, &map);
        println!(
            "run {run:2}: failover {:>6.0} ms  leave: moved {leave_moved} (optimum {leave_opt})  join: moved {join_moved} (optimum {})",
            took.as_secs_f64() * 1e3,
            P / 3
        );
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "failover over {runs} runs (TTL 2s, round 1s): median {:.0} ms, worst {:.0} ms, best {:.0} ms",
        ms(times[times.len() / 2]),
        ms(*times.last().unwrap()),
        ms(times[0])
    );
    Ok(())
}
