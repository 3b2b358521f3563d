//! The chat page in a real browser. Each test starts routers and runs a script from
//! `tests/browser/` that drives headless Chromium through `playwright-core`:
//!
//! - `two_users_chat_in_headless_chromium`: one router (auth on, dev tokens on, `room`
//!   public) and `chat.mjs`: the SDK-based page as three users, a network drop, a router
//!   restart on the same data dir (this test restarts it when the script asks), token
//!   refreshes mid-conversation, a dialog, the standalone cluster picture, and a recovery
//!   that fails (`tiny:*` keeps 3 messages; history trimmed meanwhile) and is announced.
//! - `cluster_picture_of_three_node_clusters`: real etcd and two 3-node clusters (64 and
//!   4,096 partitions, with a cluster secret, so two replicas each) and `cluster.mjs`:
//!   screenshots of the cluster picture (kept under a temp dir, paths printed) and a check
//!   of its canvas pixels: every partition cell in its owner's colour.
//!
//! Needs `node`, Debian's `chromium` (or `CHROMIUM=/path`) and `tests/browser/node_modules`
//! (`npm ci --prefix tests/browser`); `make test` installs all three. When one is missing the
//! tests fail if `CI` or `SWITCHYARD_REQUIRE_BROWSER` is set (as under `make test`), and are
//! skipped with a message otherwise. The cluster test also needs etcd (`scripts/setup.sh`).

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;
use tokio::time::Instant;

use switchyard_tests::etcd::{wait_converged, Etcd};
use switchyard_tests::*;

const CONFIG: &str = "[auth]\nmode = \"jwt\"\nhs256_secret = \"browser-test-secret-0123456789\"\ndev_tokens = true\n\
                      [namespaces.room]\nrule = \"public\"\n[namespaces.tiny]\nrule = \"public\"\nhistory_size = 3\n";
/// The whole browser run (Chromium start-up included) must finish within this.
const BROWSER_DEADLINE: Duration = Duration::from_secs(180);
/// The cluster secret of the cluster test (peer links on: two replicas per partition).
const SECRET: &str = "browser-cluster-secret-0123456789";

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("browser")
}

/// What is missing to run the browser tests, if anything.
fn missing() -> Vec<String> {
    let mut missing = Vec::new();
    if Command::new("node").arg("--version").stdout(Stdio::null()).status().map_or(true, |s| !s.success()) {
        missing.push("node (apt-get install nodejs)".into());
    }
    let chromium = std::env::var_os("CHROMIUM").map(PathBuf::from).unwrap_or_else(|| "/usr/bin/chromium".into());
    if !chromium.exists() {
        missing.push(format!("{} (apt-get install chromium, or set CHROMIUM)", chromium.display()));
    }
    if !browser_dir().join("node_modules/playwright-core").exists() {
        missing.push("tests/browser/node_modules (npm ci --prefix tests/browser)".into());
    }
    missing
}

/// False (after saying why) when the browser tests cannot run here and need not.
fn can_run(test: &str) -> bool {
    can_run_with(test, "the browser test", &missing())
}

/// What a script printed and how it ended.
struct Run {
    status: ExitStatus,
    out: String,
    err: String,
}

/// Runs `node tests/browser/<script> ARGS...` within [`BROWSER_DEADLINE`] (killed after it),
/// handing each stdout line to `on_line` with the script's stdin, for the scripts that ask
/// the test to act (`@@...` lines). Every line is echoed as it comes.
fn run_script(script: &str, args: &[String], mut on_line: impl FnMut(&str, &mut ChildStdin)) -> Run {
    let started = Instant::now();
    let mut child = Command::new("node")
        .arg(browser_dir().join(script))
        .args(args)
        .current_dir(browser_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning node");
    let mut stdin = child.stdin.take().expect("piped stdin");
    // Both pipes are drained on threads, so a chatty child never blocks on a full pipe.
    let (line_tx, lines) = mpsc::channel();
    let stdout = child.stdout.take().expect("piped stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });
    let (err_tx, err_rx) = mpsc::channel();
    let mut stderr = child.stderr.take().expect("piped stderr");
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        let _ = err_tx.send(text);
    });
    let deadline = started + BROWSER_DEADLINE;
    let mut out = String::new();
    let status = loop {
        match lines.recv_timeout(Duration::from_millis(50)) {
            Ok(line) => {
                println!("{line}");
                out.push_str(&line);
                out.push('\n');
                on_line(&line, &mut stdin);
                continue;
            }
            Err(mpsc::RecvTimeoutError::Timeout) | Err(mpsc::RecvTimeoutError::Disconnected) => {}
        }
        if let Some(status) = child.try_wait().expect("waiting for node") {
            // The rest of stdout, which the reader thread may still hold.
            while let Ok(line) = lines.recv_timeout(Duration::from_millis(200)) {
                println!("{line}");
                out.push_str(&line);
                out.push('\n');
            }
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
    };
    // Bounded, in case a killed child left a grandchild (Chromium) holding the pipe.
    let err = err_rx.recv_timeout(Duration::from_secs(10)).unwrap_or_default();
    println!("{script}: {:.1} s", started.elapsed().as_secs_f64());
    let status = status.unwrap_or_else(|| panic!("{script} did not finish within {BROWSER_DEADLINE:?}:\n{out}\n{err}"));
    Run { status, out, err }
}

fn check(run: &Run, script: &str, steps: usize) {
    let Run { status, out, err } = run;
    assert!(status.success(), "{script} failed ({status}):\n{out}\n{err}");
    assert!(out.contains(&format!("browser: {steps} passed, 0 failed")), "unexpected {script} output:\n{out}\n{err}");
}

#[test]
fn two_users_chat_in_headless_chromium() {
    if !can_run("two_users_chat_in_headless_chromium") {
        return;
    }
    let mut node = Node::start(&format!("{FAST_MAINTENANCE}{CONFIG}"));
    let run = run_script("chat.mjs", &[node.addr().to_string()], |line, stdin| {
        if line.trim() == "@@restart-router" {
            // SIGTERM, wait for the exit, start again on the same config and data dir.
            let before = node.addr();
            node.restart();
            println!("     router restarted: {before} -> {}", node.addr());
            writeln!(stdin, "@@router {}", node.addr()).expect("writing to the script");
            stdin.flush().expect("flushing the script's stdin");
        }
    });
    check(&run, "chat.mjs", 9);
}

/// A cluster node with test timings (as `etcd::node_config`, but a 5 s lease: at 4,096
/// partitions every ISR change rewrites the whole map key, and a loaded etcd can delay a
/// 2 s lease's keepalive past its TTL), the peer secret with `replicas` copies, and
/// no cap on moves per round: the first node takes every partition and the others get
/// their share in one round. Followers may lag 10 s before they leave the ISR (2 s by
/// default): a debug build of three nodes with 4,096 partitions each on two cores runs
/// some 8,000 follower loops, which can fall 2 s behind, so ISRs shrank and grew again
/// for minutes (every change one more map write) instead of settling.
fn cluster_config(etcd: &Etcd, cluster: &str, id: &str, partitions: u32, replicas: u32) -> String {
    format!(
        "node_id = \"{id}\"\npartitions = {partitions}\n[cluster]\netcd = [\"{}\"]\nname = \"{cluster}\"\n\
         lease_ttl = \"5s\"\ncoordination_interval = \"1s\"\nload_interval = \"500ms\"\netcd_timeout = \"5s\"\n\
         max_moves = {partitions}\nreplica_lag_timeout = \"10s\"\nsecret = \"{SECRET}\"\nreplicas = {replicas}\n",
        etcd.endpoint()
    )
}

#[tokio::test]
async fn cluster_picture_of_three_node_clusters() {
    if !can_run("cluster_picture_of_three_node_clusters") {
        return;
    }
    let etcd = Etcd::start().await;
    let mut clusters = Vec::new();
    // The replica marks are checked on the small cluster; the large one checks the layout
    // of 4,096 cells, unreplicated, so it converges in one map write instead of thousands
    // of ISR changes (which took most of a minute on two cores).
    for (name, partitions, replicas) in [("p64", 64, 2), ("p4096", 4096, 1)] {
        let nodes: Vec<Node> = ["n1", "n2", "n3"]
            .iter()
            .map(|id| Node::start(&cluster_config(&etcd, name, id, partitions, replicas)))
            .collect();
        clusters.push((name, nodes));
    }
    for (name, nodes) in &clusters {
        let refs: Vec<&Node> = nodes.iter().collect();
        let started = Instant::now();
        // At 4,096 partitions with replicas a loaded machine may take longer than one
        // DEADLINE (every ISR change rewrites the map key): up to three of them. The error
        // names the last map seen; its first 2,000 characters are plenty.
        for attempt in 1.. {
            match wait_converged(&etcd, name, &refs, &["n1", "n2", "n3"]).await {
                Ok(_) => break,
                Err(_) if attempt < 3 => println!("{name}: not converged yet after {:.0?}", started.elapsed()),
                Err(e) => panic!("{name}: {}", format!("{e:#}").chars().take(2000).collect::<String>()),
            }
        }
        println!("{name}: converged in {:.1} s", started.elapsed().as_secs_f64());
    }
    // Kept after the test, so the printed screenshot paths can be opened.
    let shots = tempfile::Builder::new().prefix("switchyard-browser-").tempdir().expect("temp dir").keep();
    let mut args = vec![shots.display().to_string()];
    args.extend(clusters.iter().map(|(name, nodes)| format!("{name}={}", nodes[0].addr())));
    let run = run_script("cluster.mjs", &args, |_, _| {});
    check(&run, "cluster.mjs", 2 * clusters.len());
    println!("screenshots in {}", shots.display());
}
