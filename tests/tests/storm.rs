//! A reconnect storm (issue #33) at a size CI holds: 2,000 subscribed clients (10 per
//! channel) over 3 nodes on a real etcd, a steady publisher, and one node `kill -9`ed by
//! `switchyard bench storm`. Every client of the killed node must reconnect and recover
//! within the deadline, and no client may see a gap, a duplicate or a lost position, or
//! lack at the end a message the publisher was told is stored. The bench's JSON is what is
//! asserted on (the same code `scripts/storm.sh` runs at 10,000 clients).

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use switchyard_tests::etcd::{node_config, wait_converged, Etcd};
use switchyard_tests::serde_json::{self, Value};
use switchyard_tests::{router_bin, wait_child, Node};

const SECRET: &str = "correct-horse-battery-staple";
/// Nobody may wait longer than this after the kill (the lease is 2 s).
const DEADLINE_MS: f64 = 10_000.0;

fn start(etcd: &Etcd, id: &str) -> Node {
    Node::start(&format!("{}secret = \"{SECRET}\"\n", node_config(etcd, "storm", id, 32, "")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_clients_all_recover_without_gaps_or_duplicates() -> Result<()> {
    let etcd = Etcd::start().await;
    let nodes = [start(&etcd, "n1"), start(&etcd, "n2"), start(&etcd, "n3")];
    wait_converged(&etcd, "storm", &[&nodes[0], &nodes[1], &nodes[2]], &["n1", "n2", "n3"]).await?;
    let urls: Vec<String> = nodes.iter().map(Node::ws_url).collect();
    let pids: Vec<String> = nodes.iter().map(|n| n.pid().expect("running").to_string()).collect();

    let dir = tempfile::tempdir()?;
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = Command::new(router_bin())
        .args(["bench", "storm", "--count", "2000", "--subscribers", "10", "--rate", "300"])
        .args(["--warmup", "2s", "--duration", "15s", "--json"])
        .args(["--sub-urls", &urls.join(","), "--kill-url", &urls[2], "--kill-pid", &pids[2]])
        .args(["--server-pids", &pids.join(",")])
        .stdout(std::fs::File::create(&out_path)?)
        .stderr(std::fs::File::create(&err_path)?)
        .stdin(Stdio::null())
        .spawn()
        .context("spawning switchyard bench storm")?;
    let Some(status) = tokio::task::block_in_place(|| wait_child(&mut child, Duration::from_secs(120)))? else {
        let _ = child.kill();
        let _ = child.wait();
        bail!("bench storm did not finish within 120 s; stderr:\n{}", std::fs::read_to_string(&err_path)?);
    };
    let stdout = std::fs::read_to_string(&out_path)?;
    let stderr = std::fs::read_to_string(&err_path)?;
    let line =
        stdout.lines().find(|l| !l.trim().is_empty()).with_context(|| format!("no report; stderr:\n{stderr}"))?;
    let r: Value = serde_json::from_str(line).with_context(|| format!("parsing {line}"))?;
    let n = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("no {k} in {r}"));

    ensure!(n("killed_node_clients") > 0.0, "nobody was on the killed node: {r}\n{stderr}");
    ensure!(n("recovered") == n("killed_node_clients"), "not every client recovered: {r}\n{stderr}");
    for k in ["gaps", "duplicates", "unrecovered", "behind_at_end"] {
        ensure!(n(k) == 0.0, "{k}: {r}\n{stderr}");
    }
    ensure!(n("recover_ms_max") < DEADLINE_MS, "a client waited past {DEADLINE_MS} ms: {r}");
    ensure!(n("recover_ms_p50") <= n("recover_ms_p99") && n("recover_ms_p99") <= n("recover_ms_max"), "{r}");
    ensure!(n("published_ok") > 0.0, "{r}");
    ensure!(r["ok"] == true, "{r}");
    ensure!(status.success(), "bench storm exited {status}: {r}\n{stderr}");
    Ok(())
}
