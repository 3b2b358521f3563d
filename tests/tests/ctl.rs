//! `switchyard ctl` against real router processes: every command on a 3-node cluster on
//! real etcd (status, map and its filters, channel, a move that loses nothing acknowledged,
//! drain --wait, config check, token), the admin token, and each bad input (a dead node, a
//! node of another cluster, a wrong or missing token, malformed answers, a partition or
//! node that does not exist, a move to a draining node): one line on stderr, a non-zero
//! exit, never a panic.

use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use switchyard_proto::partition::partition_of;
use switchyard_tests::etcd::{node_config, wait_converged, Etcd};
use switchyard_tests::serde_json::{json, Value};
use switchyard_tests::writers::{check_history, Writer};
use switchyard_tests::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const P: u32 = 8;
const SECRET: &str = "ctl-cluster-secret-0123456789";

/// What one `switchyard ctl` run did.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Result<Value> {
        serde_json::from_str(self.stdout.trim()).with_context(|| format!("stdout is not JSON: {self:?}"))
    }

    /// Exit 0, or the run as the error.
    fn ok(self) -> Result<Run> {
        ensure!(self.code == 0, "ctl failed: {self:?}");
        Ok(self)
    }

    /// A failure: non-zero exit, one line on stderr mentioning `needle`, no panic.
    fn failed_with(&self, needle: &str) -> Result<()> {
        ensure!(self.code != 0, "expected a failure: {self:?}");
        ensure!(!self.stderr.contains("panicked") && !self.stderr.contains("RUST_BACKTRACE"), "panic: {self:?}");
        ensure!(self.stderr.trim().lines().count() == 1, "expected one line on stderr: {self:?}");
        ensure!(self.stderr.contains(needle), "expected {needle:?} in stderr: {self:?}");
        Ok(())
    }
}

/// Runs `switchyard ctl ARGS` with the admin token `token` (None: none in the
/// environment), within a deadline.
async fn ctl(args: &[&str], token: Option<&str>) -> Result<Run> {
    let mut cmd = tokio::process::Command::new(router_bin());
    cmd.arg("ctl").args(args).env_remove("SWITCHYARD_ADMIN_TOKEN").env_remove("SWITCHYARD_CLUSTER");
    cmd.env_remove("SWITCHYARD_URL").env("RUST_BACKTRACE", "0").kill_on_drop(true);
    if let Some(t) = token {
        cmd.env("SWITCHYARD_ADMIN_TOKEN", t);
    }
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .with_context(|| format!("ctl {args:?} did not finish"))??;
    Ok(Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

fn url(node: &Node) -> String {
    format!("http://{}", node.addr())
}

/// A loopback port nobody listens on.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A channel in partition `p`.
fn channel_in(p: u32) -> String {
    (0..).map(|i| format!("room:{i}")).find(|c| partition_of(c, P) == p).expect("a channel")
}

/// Every command on a 3-node replicated cluster, with the admin token on.
#[tokio::test]
async fn every_command_against_a_three_node_cluster() -> Result<()> {
    let etcd = Etcd::start().await;
    let extra = format!("{}[namespaces.room]\npresence = true\n", admin_section());
    let ids = ["n1", "n2", "n3"];
    let nodes: Vec<Node> = ids
        .iter()
        .map(|id| Node::start(&format!("{}secret = \"{SECRET}\"\n", node_config(&etcd, "ops", id, P, &extra))))
        .collect();
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_converged(&etcd, "ops", &refs, &ids).await?;
    wait_until("every partition in sync on two nodes", DEADLINE * 2, async || {
        let m = etcd.map("ops")?.context("no map")?;
        Ok((0..P as usize).all(|p| m["isr"][p].as_array().is_some_and(|i| i.len() == 2)))
    })
    .await?;
    let t = Some(ADMIN_TOKEN);
    // A dead node first in the list: ctl moves on to the next.
    let urls = format!("http://127.0.0.1:{},{}", closed_port(), url(&nodes[0]));
    let u0 = url(&nodes[0]);

    // status
    let s = ctl(&["--url", &urls, "--cluster", "ops", "status", "--json"], t).await?.ok()?.json()?;
    ensure!(s["nodes"].as_array().map(Vec::len) == Some(3), "{s}");
    ensure!(s["leader"].as_str().is_some_and(|l| ids.contains(&l)), "{s}");
    ensure!(s["epoch"].as_u64().unwrap_or(0) > 0 && s["partitions"] == json!(P), "{s}");
    ensure!(s["under_replicated"] == json!([]) && s["quarantined_plugins"] == json!([]), "{s}");
    let leads: u64 = s["nodes"].as_array().unwrap().iter().map(|n| n["leads"].as_u64().unwrap()).sum();
    ensure!(leads == P as u64, "{s}");
    ensure!(s["nodes"].as_array().unwrap().iter().all(|n| n["version"] == json!(env!("CARGO_PKG_VERSION"))), "{s}");
    let plain = ctl(&["--url", &urls, "status"], t).await?.ok()?;
    for want in
        ["cluster ops", "NODE", "n1", "n2", "n3", "under-replicated partitions: 0", "plugins in quarantine: none"]
    {
        ensure!(plain.stdout.contains(want), "{want:?} not in {}", plain.stdout);
    }

    // map and its filters
    let m = ctl(&["--url", &u0, "map", "--json"], t).await?.ok()?.json()?;
    ensure!(m["partitions"].as_array().map(Vec::len) == Some(P as usize), "{m}");
    let only = ctl(&["--url", &u0, "map", "--node", "n2", "--json"], t).await?.ok()?.json()?;
    let rows = only["partitions"].as_array().context("rows")?;
    ensure!(
        !rows.is_empty() && rows.iter().all(|r| r["replicas"].as_array().unwrap().contains(&json!("n2"))),
        "{only}"
    );
    let under = ctl(&["--url", &u0, "map", "--under-replicated", "--json"], t).await?.ok()?.json()?;
    ensure!(under["partitions"] == json!([]), "{under}");
    let table = ctl(&["--url", &u0, "map"], t).await?.ok()?;
    ensure!(table.stdout.contains("PARTITION") && table.stdout.lines().count() == P as usize + 2, "{}", table.stdout);
    ctl(&["--url", &u0, "map", "--node", "ghost"], t).await?.failed_with("node ghost is not a live member")?;

    // channel: offsets, retained, presence and a durable consumer's lag, asked of a node
    // that does not lead the channel's partition.
    let map = etcd.map("ops")?.context("no map")?;
    let channel = "room:ctl";
    let p = partition_of(channel, P) as usize;
    let leader = map["owners"][p].as_str().unwrap().to_string();
    let other = nodes.iter().zip(ids).find(|(_, id)| *id != leader).unwrap().0;
    let mut c = Client::connect(other).await;
    for i in 0..3 {
        c.publish(channel, json!({ "n": i })).await?;
    }
    c.ok("commit", json!({ "channel": channel, "consumer": "phone", "offset": 1 })).await?;
    let mut watcher = Client::connect(other).await;
    watcher.subscribe(channel, json!({})).await?;
    let f = poll_for("the channel facts with the subscriber", DEADLINE, async || {
        let f = ctl(&["--url", &url(other), "channel", channel, "--json"], t).await?.ok()?.json()?;
        Ok((f["presence"]["clients"] == json!(1)).then_some(f))
    })
    .await?;
    ensure!(f["partition"] == json!(p) && f["leader"] == json!(leader) && f["local"] == json!(true), "{f}");
    ensure!(f["top"] == json!(3) && f["messages"] == json!(3) && f["bytes"].as_u64().unwrap_or(0) > 0, "{f}");
    ensure!(f["replicas"].as_array().map(Vec::len) == Some(2), "{f}");
    ensure!(f["consumers"] == json!([{ "name": "phone", "committed": 1, "lag": 2 }]), "{f}");
    ensure!(f["policies"]["namespace"] == json!("room"), "{f}");
    let plain = ctl(&["--url", &url(other), "channel", channel], t).await?.ok()?;
    ensure!(plain.stdout.contains("phone") && plain.stdout.contains("3 messages"), "{}", plain.stdout);
    ctl(&["--url", &u0, "channel", "bad name!"], t).await?.failed_with("invalid channel name")?;

    // move: a partition to a node that holds no replica of it, with a writer publishing
    // all along; it completes and every acknowledged message is in history once.
    let (mp, target) = (0..P)
        .find_map(|q| {
            let reps = map["replicas"][q as usize].as_array().unwrap();
            ids.iter().find(|id| !reps.contains(&json!(id))).map(|id| (q, id.to_string()))
        })
        .context("a partition with a node outside its replicas")?;
    let via = nodes.iter().zip(ids).find(|(_, id)| *id != target).unwrap().0;
    let writer = Writer::start(via.addr(), channel_in(mp), format!("move-{}", std::process::id()));
    writer.progress(5).await?;
    let mv = ctl(&["--url", &u0, "move", &mp.to_string(), "--to", &target, "--wait"], t).await?.ok()?;
    ensure!(mv.stdout.contains(&format!("partition {mp}: {target} leads it")), "{mv:?}");
    writer.progress(5).await?;
    let acked = writer.finish().await;
    check_history(via, &channel_in(mp), &acked).await?;
    // Done: the leader deleted the request.
    wait_until("the move request is deleted", DEADLINE, async || {
        Ok(etcd.get(&format!("/switchyard/ops/moves/{mp}"))?.is_none())
    })
    .await?;
    let again = ctl(&["--url", &u0, "move", &mp.to_string(), "--to", &target], t).await?.ok()?;
    ensure!(again.stdout.contains("already leads"), "{again:?}");
    ctl(&["--url", &u0, "move", "999", "--to", "n1"], t).await?.failed_with("partition 999 does not exist")?;
    ctl(&["--url", &u0, "move", "0", "--to", "ghost"], t).await?.failed_with("node ghost is not a live member")?;

    // drain --wait with progress, then a move to the drained node is refused.
    let d = ctl(&["--url", &u0, "drain", "n3", "--wait"], t).await?.ok()?;
    ensure!(d.stdout.contains("n3 is draining") && d.stdout.contains("n3 drained"), "{d:?}");
    let m = etcd.map("ops")?.context("no map")?;
    ensure!(!m["owners"].as_array().unwrap().contains(&json!("n3")), "{m}");
    ensure!(m["replicas"].as_array().unwrap().iter().all(|r| !r.as_array().unwrap().contains(&json!("n3"))), "{m}");
    let s = ctl(&["--url", &u0, "status", "--json"], t).await?.ok()?.json()?;
    let n3 = s["nodes"].as_array().unwrap().iter().find(|n| n["id"] == json!("n3")).cloned().unwrap_or_default();
    ensure!(n3["draining"] == json!(true) && n3["leads"] == json!(0), "{s}");
    ctl(&["--url", &u0, "move", "1", "--to", "n3"], t).await?.failed_with("n3 is draining")?;
    ctl(&["--url", &u0, "drain", "ghost"], t).await?.failed_with("node ghost is not a live member")?;

    // The admin token: wrong or missing gets 401 with no detail.
    ctl(&["--url", &u0, "status"], Some("wrong-token-0123456789")).await?.failed_with("401 unauthorized")?;
    ctl(&["--url", &u0, "status"], None).await?.failed_with("401 unauthorized")?;
    for (path, method) in [
        ("/api/v1/cluster", "GET"),
        ("/api/v1/plugins", "GET"),
        ("/api/v1/channels/room:1/info", "GET"),
        ("/api/v1/drain", "POST"),
        ("/api/v1/move", "POST"),
    ] {
        for auth in [None, Some("Bearer wrong-token-0123456789"), Some("Basic eA==")] {
            let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
            let r = http_request(nodes[0].addr(), method, path, &headers, None).await?;
            ensure!(r.status == 401, "{method} {path} with {auth:?}: {}", r.status);
            ensure!(r.json()? == json!({ "error": { "code": "unauthorized" } }), "{method} {path}: {}", r.body);
        }
    }
    // A node of another cluster.
    ctl(&["--url", &u0, "--cluster", "elsewhere", "status"], t)
        .await?
        .failed_with("a node of cluster ops, not elsewhere")?;
    Ok(())
}

/// A tiny HTTP server on loopback that answers every request with `answer`, until dropped.
async fn garbage_server(answer: &'static [u8]) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(answer).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (format!("http://{addr}"), task)
}

/// Dead nodes, garbage answers, config check, dev mode and `jwt` mode without a token.
#[tokio::test]
async fn bad_input_is_one_line_and_a_non_zero_exit() -> Result<()> {
    // A dead node.
    let dead = format!("http://127.0.0.1:{}", closed_port());
    ctl(&["--url", &dead, "status"], None).await?.failed_with("no node answered")?;
    ctl(&["--url", "https://127.0.0.1:1", "status"], None).await?.failed_with("https:// is not supported")?;
    ctl(&["--url", "not a url", "map"], None).await?.failed_with("not a URL")?;
    // Malformed answers: not HTTP, HTTP but not JSON, JSON but not a cluster view.
    let (junk, t1) = garbage_server(b"SSH-2.0-OpenSSH\r\n").await;
    ctl(&["--url", &junk, "status"], None).await?.failed_with("request failed")?;
    let (html, t2) = garbage_server(b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n<html></html>").await;
    ctl(&["--url", &html, "status"], None).await?.failed_with("malformed answer (HTTP 200, not JSON")?;
    let (odd, t3) = garbage_server(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{\"x\": 1}\n").await;
    ctl(&["--url", &odd, "map"], None).await?.failed_with("malformed cluster view")?;
    for t in [t1, t2, t3] {
        t.abort();
    }

    // config check: valid, invalid, missing.
    let dir = tempfile::tempdir()?;
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "node_id = \"a\"\n[admin]\ntoken = \"0123456789abcdef\"\n")?;
    let r = ctl(&["config", "check", good.to_str().unwrap()], None).await?.ok()?;
    ensure!(r.stdout.contains("valid"), "{r:?}");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "partitions = 0\n")?;
    let r = ctl(&["config", "check", bad.to_str().unwrap()], None).await?;
    r.failed_with("partitions")?;
    ensure!(r.code == 2, "{r:?}");
    let short = dir.path().join("short.toml");
    std::fs::write(&short, "[admin]\ntoken = \"short\"\n")?;
    let r = ctl(&["config", "check", short.to_str().unwrap()], None).await?;
    r.failed_with("admin.token")?;
    ensure!(r.code == 2, "{r:?}");
    let r = ctl(&["config", "check", "/nonexistent/switchyard.toml"], None).await?;
    r.failed_with("cannot read config file")?;
    ensure!(r.code == 2, "{r:?}");

    // token: as `switchyard token`.
    let secret = dir.path().join("secret.toml");
    std::fs::write(&secret, "[auth]\nhs256_secret = \"0123456789abcdef0123\"\n")?;
    let r = ctl(&["token", "--user", "alice", "--config", secret.to_str().unwrap()], None).await?.ok()?;
    ensure!(r.stdout.trim().split('.').count() == 3, "{r:?}");

    // A standalone node in dev mode (auth off, no admin token): the admin API is open;
    // drain and move are refused with the reason.
    let node = Node::start("");
    let u = url(&node);
    let s = ctl(&["--url", &u, "status", "--json"], None).await?.ok()?.json()?;
    ensure!(s["mode"] == json!("standalone") && s["nodes"][0]["leads"] == json!(64), "{s}");
    ctl(&["--url", &u, "drain", "standalone"], None).await?.failed_with("nothing to drain")?;
    ctl(&["--url", &u, "move", "1", "--to", "standalone"], None).await?.failed_with("nothing to move")?;
    let f = ctl(&["--url", &u, "channel", "news:1", "--json"], None).await?.ok()?.json()?;
    ensure!(f["exists"] == json!(false) && f["top"] == json!(0) && f["presence"].is_null(), "{f}");
    ctl(&["--url", &u, "--cluster", "ops", "status"], None)
        .await?
        .failed_with("a node of cluster (standalone), not ops")?;

    // `jwt` mode without an admin token: the admin API is closed to everyone.
    let jwt = Node::start(&auth::jwt_config("", ""));
    let r = http(jwt.addr(), "GET", "/api/v1/cluster", None).await?;
    ensure!(r.status == 401 && r.json()? == json!({ "error": { "code": "unauthorized" } }), "{}", r.body);
    ctl(&["--url", &url(&jwt), "status"], Some(ADMIN_TOKEN)).await?.failed_with("401 unauthorized")?;
    // ... and with dev tokens on (the chat page's setup) it stays open.
    let dev = Node::start(&auth::jwt_config("dev_tokens = true", ""));
    ensure!(http(dev.addr(), "GET", "/api/v1/cluster", None).await?.status == 200);
    Ok(())
}
