//! `switchyard bench` end to end: each scenario runs for a second against a local node as
//! a subprocess with `--json`, and the counts must add up (every publish sent reaches every
//! subscriber of its channel, no errors). No test here asserts a speed.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use switchyard_tests::serde_json::{self, Value};
use switchyard_tests::{router_bin, wait_child, Node};

/// Runs `switchyard bench ARGS`, killing it after a deadline; returns its stdout.
fn bench(args: &[&str]) -> Result<String> {
    let dir = tempfile::tempdir()?;
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = Command::new(router_bin())
        .arg("bench")
        .args(args)
        .stdout(std::fs::File::create(&out_path)?)
        .stderr(std::fs::File::create(&err_path)?)
        .stdin(Stdio::null())
        .spawn()
        .context("spawning switchyard bench")?;
    let Some(status) = wait_child(&mut child, Duration::from_secs(60))? else {
        let _ = child.kill();
        let _ = child.wait();
        bail!("bench {args:?} did not finish within 60s; stderr:\n{}", std::fs::read_to_string(&err_path)?);
    };
    let stdout = std::fs::read_to_string(&out_path)?;
    let stderr = std::fs::read_to_string(&err_path)?;
    ensure!(status.success(), "bench {args:?} exited {status}\nstdout:\n{stdout}\nstderr:\n{stderr}");
    Ok(stdout)
}

fn run_json(args: &[&str]) -> Result<Value> {
    let out = bench(args)?;
    let lines: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
    ensure!(lines.len() == 1, "expected one JSON line on stdout, got:\n{out}");
    serde_json::from_str(lines[0]).with_context(|| format!("parsing {}", lines[0]))
}

fn u(v: &Value, path: &str) -> u64 {
    v.pointer(path).and_then(Value::as_u64).unwrap_or_else(|| panic!("no {path} in {v}"))
}

/// sent × subscribers per channel = expected = delivered, and nothing failed.
fn check_fanout_counts(r: &Value, per_channel: u64) {
    let sent = u(r, "/totals/sent");
    assert!(sent > 0, "nothing was sent: {r}");
    assert_eq!(u(r, "/totals/acked"), sent, "{r}");
    assert_eq!(u(r, "/totals/expected_deliveries"), sent * per_channel, "{r}");
    assert_eq!(u(r, "/totals/delivered"), sent * per_channel, "{r}");
    for field in ["missing", "errors", "closed_subscribers", "failed_connections"] {
        assert_eq!(u(r, &format!("/totals/{field}")), 0, "{field}: {r}");
    }
    assert!(u(r, "/published") > 0 && u(r, "/delivered") > 0, "{r}");
    assert!(u(r, "/latency/count") > 0, "{r}");
    assert!(u(r, "/latency/p50_us") <= u(r, "/latency/p99_us"), "{r}");
    assert!(r["generator_cpu_pct"].as_f64().is_some(), "{r}");
    assert!(r["warnings"].is_array(), "{r}");
}

const SHORT: [&str; 5] = ["--warmup", "0s", "--duration", "1s", "--json"];

#[test]
fn fanout_counts_add_up_and_the_table_reads_the_json() {
    let node = Node::start("");
    let url = node.ws_url();
    let pid = node.pid().unwrap().to_string();
    let mut args = vec!["fanout", "--url", &url, "--server-pid", &pid];
    args.extend(["--channels", "5", "--subscribers", "4", "--publishers", "2", "--inflight", "16"]);
    args.extend(SHORT);
    let r = run_json(&args).unwrap();
    assert_eq!(r["scenario"], "fanout");
    assert_eq!(r["target"], "switchyard");
    check_fanout_counts(&r, 4);
    assert!(r["server_cpu_s"].as_f64().is_some(), "{r}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a.jsonl");
    std::fs::write(&file, format!("{r}\n")).unwrap();
    let col_a = format!("A={}", file.display());
    let col_b = format!("B={}", file.display());
    let table = bench(&["table", "--column", &col_a, "--column", &col_b]).unwrap();
    let row = table.lines().find(|l| l.contains("delivered msgs/s")).unwrap_or_else(|| panic!("{table}"));
    assert!(row.starts_with("| fanout") && row.trim_end().ends_with("1.00 |"), "{table}");
}

#[test]
fn latency_counts_add_up() {
    let node = Node::start("");
    let url = node.ws_url();
    let mut args = vec!["latency", "--url", &url, "--subscribers", "10", "--rate", "200"];
    args.extend(SHORT);
    let r = run_json(&args).unwrap();
    assert_eq!(r["scenario"], "latency");
    assert_eq!(u(&r, "/params/channels"), 1);
    check_fanout_counts(&r, 10);
}

#[test]
fn cluster_with_one_node_repeated_counts_add_up() {
    let node = Node::start("");
    let url = node.ws_url();
    let subs = format!("{url},{url}");
    let mut args = vec!["cluster", "--pub-url", &url, "--sub-urls", &subs];
    args.extend(["--channels", "3", "--subscribers", "4", "--publishers", "1", "--rate", "300"]);
    args.extend(SHORT);
    let r = run_json(&args).unwrap();
    assert_eq!(r["scenario"], "cluster");
    assert_eq!(r["sub_urls"].as_array().unwrap().len(), 2);
    check_fanout_counts(&r, 4);
}

#[test]
fn connections_report_memory_and_all_receive() {
    let node = Node::start("");
    let url = node.ws_url();
    let pid = node.pid().unwrap().to_string();
    let args = ["connections", "--url", &url, "--server-pid", &pid, "--count", "50", "--channels", "10"];
    let r = run_json(&[&args[..], &["--settle", "0s", "--json"]].concat()).unwrap();
    assert_eq!(u(&r, "/connections/opened"), 50, "{r}");
    assert_eq!(u(&r, "/totals/sent"), 10, "{r}");
    assert_eq!(u(&r, "/totals/expected_deliveries"), 50, "{r}");
    assert_eq!(u(&r, "/totals/delivered"), 50, "{r}");
    assert_eq!(u(&r, "/totals/errors"), 0, "{r}");
    assert!(r.pointer("/connections/server_rss_per_connection_kib").and_then(Value::as_f64).is_some(), "{r}");
    assert!(r.pointer("/connections/connects_per_s").and_then(Value::as_f64).unwrap() > 0.0, "{r}");
}

#[test]
fn human_output_and_bad_flags() {
    let node = Node::start("");
    let url = node.ws_url();
    let out =
        bench(&["latency", "--url", &url, "--subscribers", "2", "--rate", "50", "--warmup", "0s", "--duration", "1s"])
            .unwrap();
    assert!(out.contains("== latency summary (switchyard) ==") && out.contains("publish->deliver:"), "{out}");
    assert!(bench(&["fanout", "--url", &url, "--payload", "10"]).is_err());
}
