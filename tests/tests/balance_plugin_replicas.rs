//! A balancer plugin places replicas end to end: real etcd, real router processes and the
//! real `even-spread.wasm` (ABI v2), bound as the balancer with two copies per partition.
//!
//! The map the leader publishes has, for every partition, two replicas on distinct live
//! nodes, leaders included evenly; the plugin made the decisions (its calls are counted
//! and none failed); and after a node joins the replicas are spread over it too.

use anyhow::Result;
use switchyard_tests::etcd::{node_config, wait_converged, Etcd};
use switchyard_tests::serde_json::Value;
use switchyard_tests::*;

const P: u32 = 16;

fn start(etcd: &Etcd, id: &str, extra: &str) -> Node {
    // Replication needs the peer links, which need a cluster secret.
    Node::start(&format!(
        "{}secret = \"balance-plugin-test-secret\"\nreplicas = 2\n",
        node_config(etcd, "bp", id, P, extra)
    ))
}

/// Waits until every partition of the map has two replicas on distinct nodes of `live`,
/// the first its owner, and every node holds an even share of the copies (±1).
async fn wait_replicas_even(etcd: &Etcd, live: &[&str]) -> Result<Value> {
    let mut last = Value::Null;
    wait_until("replicas on distinct nodes, evenly", DEADLINE, async || {
        let Some(map) = etcd.map("bp")? else { return Ok(false) };
        last = map.clone();
        let (Some(owners), Some(replicas)) = (map["owners"].as_array(), map["replicas"].as_array()) else {
            return Ok(false);
        };
        let mut copies = vec![0usize; live.len()];
        for (owner, r) in owners.iter().zip(replicas) {
            let r: Vec<&str> = r.as_array().into_iter().flatten().filter_map(Value::as_str).collect();
            if r.len() != 2 || r[0] == r[1] || Some(r[0]) != owner.as_str() {
                return Ok(false);
            }
            for n in r {
                match live.iter().position(|l| *l == n) {
                    Some(i) => copies[i] += 1,
                    None => return Ok(false),
                }
            }
        }
        let (lo, hi) = (copies.iter().min().copied().unwrap_or(0), copies.iter().max().copied().unwrap_or(0));
        Ok(owners.len() == P as usize && hi - lo <= 1)
    })
    .await
    .map_err(|e| e.context(format!("last map seen: {last}")))?;
    Ok(last)
}

#[tokio::test]
async fn a_v2_balancer_plugin_places_replicas_on_distinct_nodes_evenly() -> Result<()> {
    let etcd = Etcd::start().await;
    let plugins = PluginDir::new();
    plugins.install("even-spread", &example_plugin("even-spread"));
    let extra = format!("{}balancer = {{ plugin = \"even-spread\" }}\n", plugins.config_line());
    let (n1, n2, n3) = (start(&etcd, "n1", &extra), start(&etcd, "n2", &extra), start(&etcd, "n3", &extra));
    wait_converged(&etcd, "bp", &[&n1, &n2, &n3], &["n1", "n2", "n3"]).await?;
    wait_replicas_even(&etcd, &["n1", "n2", "n3"]).await?;

    // The plugin decided: the leader called it, and no call failed.
    let leader = poll_for("a leader", DEADLINE, async || {
        for n in [&n1, &n2, &n3] {
            if etcd::cluster_view(n).await?["is_leader"] == true {
                return Ok(Some(n));
            }
        }
        Ok(None)
    })
    .await?;
    let calls = [("plugin", "even-spread"), ("kind", "balance")];
    wait_metric_at_least(leader, "switchyard_plugin_calls_total", &calls, 1.0).await?;
    // The only plugin of this cluster: no failure of any plugin call.
    let failed = metrics(leader).await?.sum("switchyard_plugin_failures_total").unwrap_or(0.0);
    assert_eq!(failed, 0.0, "every balancer call gave a valid placement");

    // A fourth node joins: it takes its share of leaders and of followers.
    let n4 = start(&etcd, "n4", &extra);
    wait_converged(&etcd, "bp", &[&n1, &n2, &n3, &n4], &["n1", "n2", "n3", "n4"]).await?;
    wait_replicas_even(&etcd, &["n1", "n2", "n3", "n4"]).await?;
    Ok(())
}
