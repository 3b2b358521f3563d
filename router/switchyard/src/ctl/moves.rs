//! `ctl drain NODE` and `ctl move PARTITION --to NODE`: the two requests that change the
//! map, and waiting for them.
//!
//! It owns sending a drain to the node itself (`POST /api/v1/drain` at the URL the cluster
//! view lists for it: a node marks only itself draining) and a move to any node (`POST
//! /api/v1/move`, which writes the request the leader carries out), and `--wait`: polling
//! the cluster view, printing a progress line whenever the counts change, until done or
//! the deadline. It must never decide placement: the cluster leader does.

use std::time::Duration;

use tokio::time::Instant;

use super::client::{Client, CtlError};
use super::view::{self, ClusterView};

/// How often `--wait` reads the cluster view.
const POLL: Duration = Duration::from_millis(500);

/// `ctl drain NODE [--wait]`.
pub(crate) async fn drain(client: &mut Client, json: bool, node: &str, wait: Option<Duration>) -> Result<(), CtlError> {
    let (cluster, _) = view::fetch(client).await?;
    if cluster.mode == "standalone" {
        return Err(CtlError::Refused("a standalone node has nothing to drain".into()));
    }
    let url = cluster.node(node)?.url.clone();
    let body = serde_json::json!({ "node": node });
    client.call_node(&url, hyper::Method::POST, "/api/v1/drain", Some(&body)).await?;
    let (leads, holds) = cluster.load_of(node);
    if !json {
        println!("{node} is draining (leads {leads} partitions, holds {holds} replicas)");
    }
    let Some(limit) = wait else {
        if json {
            println!("{}", serde_json::json!({ "node": node, "draining": true, "leads": leads, "replicas": holds }));
        }
        return Ok(());
    };
    let deadline = Instant::now() + limit;
    let mut last = (leads, holds);
    loop {
        let (cluster, _) = view::fetch(client).await?;
        let now = cluster.load_of(node);
        if now == (0, 0) {
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "node": node, "draining": true, "leads": 0, "replicas": 0, "drained": true })
                );
            } else {
                println!("{node} drained: leads nothing, holds no replica (map epoch {})", cluster.epoch);
            }
            return Ok(());
        }
        if now != last && !json {
            println!("{node}: leads {} partitions, holds {} replicas (map epoch {})", now.0, now.1, cluster.epoch);
        }
        last = now;
        if Instant::now() >= deadline {
            return Err(CtlError::Timeout(format!(
                "{node} still leads {} partitions and holds {} replicas after {}",
                now.0,
                now.1,
                humantime::format_duration(limit)
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// `ctl move PARTITION --to NODE [--wait]`.
pub(crate) async fn move_partition(
    client: &mut Client,
    json: bool,
    partition: u32,
    to: &str,
    wait: Option<Duration>,
) -> Result<(), CtlError> {
    let body = serde_json::json!({ "partition": partition, "node": to });
    let answer = client.call(hyper::Method::POST, "/api/v1/move", Some(&body)).await?.body;
    let state = answer.get("state").and_then(|s| s.as_str()).unwrap_or("requested").to_string();
    if !json {
        match state.as_str() {
            "already" => println!("{to} already leads partition {partition}"),
            _ => println!("partition {partition}: move to {to} requested"),
        }
    }
    let Some(limit) = wait.filter(|_| state != "already") else {
        if json {
            println!("{answer}");
        }
        return Ok(());
    };
    let deadline = Instant::now() + limit;
    let mut last: Option<(String, Vec<String>)> = None;
    loop {
        let (cluster, _) = view::fetch(client).await?;
        let p = partition as usize;
        check_target(&cluster, to)?;
        let leader = cluster.owners.get(p).cloned().unwrap_or_default();
        if leader == to {
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "partition": partition, "node": to, "state": "done", "epoch": cluster.epoch })
                );
            } else {
                println!("partition {partition}: {to} leads it (map epoch {})", cluster.epoch);
            }
            return Ok(());
        }
        let now = (leader, cluster.isr_of(p));
        if last.as_ref() != Some(&now) && !json {
            println!(
                "partition {partition}: leader {}, in sync {} (map epoch {})",
                now.0,
                now.1.join(","),
                cluster.epoch
            );
        }
        last = Some(now);
        if Instant::now() >= deadline {
            return Err(CtlError::Timeout(format!(
                "partition {partition} is not led by {to} after {}",
                humantime::format_duration(limit)
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// While waiting, a target that left or drains ends the wait (the leader drops the request).
fn check_target(cluster: &ClusterView, to: &str) -> Result<(), CtlError> {
    match cluster.nodes.iter().find(|n| n.id == to) {
        None => Err(CtlError::Refused(format!("node {to} left the cluster; the move is dropped"))),
        Some(n) if n.draining => Err(CtlError::Refused(format!("node {to} is draining; the move is dropped"))),
        Some(_) => Ok(()),
    }
}
