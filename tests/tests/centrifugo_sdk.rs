//! The unmodified Centrifugo SDKs against `/connection/websocket` (Centrifugo client
//! protocol v2, JSON) of real routers. Each test starts routers and runs one scenario from
//! `tests/centrifugo/`: a Node script driving the npm package `centrifuge` (5.8.0, over
//! `ws`), `scenarios.py` driving `centrifuge-python` (in `tests/centrifugo/.venv`), or
//! `browser.mjs` driving centrifuge's browser bundle in headless Chromium.
//!
//! A single-router test also runs a TCP proxy of its own in front of the router, through
//! which the scenarios that need it connect: the test cuts the network there (every
//! connection dropped, new ones refused until restored) and counts connection attempts.
//! It kills -9 and restarts the router on the same data dir and port, or replaces it with
//! a router on a fresh data dir (a new epoch) on the same port. A script asks for those
//! with a stdout line `@@VERB ARGS...` and reads `@@ok JSON` or `@@err MESSAGE` on stdin
//! (see [`Single::act`] and [`Cluster::act`]); it ends with
//! `centrifugo: N passed, 0 failed`.
//!
//! Needs `node` and `tests/centrifugo/node_modules` (`npm ci --prefix tests/centrifugo`),
//! the venv `tests/centrifugo/.venv` for the Python tests (`scripts/setup.sh
//! --centrifugo`), and for the browser test Debian's `chromium` (or `CHROMIUM=/path`) and
//! `tests/browser/node_modules`; `make test` installs all of them. When one is missing the
//! tests fail if `CI` or `SWITCHYARD_REQUIRE_BROWSER` is set (as under `make test`), and
//! are skipped with a message otherwise (the rule of `browser.rs`). The cluster test also
//! needs etcd.
//!
//! What the tests assume of the server (edit here if the endpoint names them otherwise):
//! the path [`ENDPOINT`], the presence keys [`PRESENCE_KEYS`] of a namespace, and the
//! connection token claims `sub` (the user) and `exp` (HS256 with `auth.hs256_secret`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use switchyard_proto::partition::partition_of;
use switchyard_tests::auth::{connect_as, jwt_config, SECRET};
use switchyard_tests::etcd::{node_config, wait_converged, Etcd};
use switchyard_tests::serde_json::{json, Value};
use switchyard_tests::*;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::sync::watch;
use tokio::time::Instant;

/// The Centrifugo-compatible endpoint on the router's one listener.
const ENDPOINT: &str = "/connection/websocket";
/// `room:*` is public (any connected user may subscribe, publish and read history).
const ROOM: &str = "[namespaces.room]\nrule = \"public\"\n";
/// The keys that turn on presence and join/leave pushes in a namespace section. Only the
/// presence tests use them, so a renamed key breaks only those (the router refuses
/// unknown keys).
const PRESENCE_KEYS: &str = "presence = true\njoin_leave = true\n";
/// A whole scenario (a browser start-up included) must end within this.
const SCRIPT_DEADLINE: Duration = Duration::from_secs(150);

// === What a scenario needs ===

fn centrifugo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("centrifugo")
}

fn venv_python() -> PathBuf {
    centrifugo_dir().join(".venv/bin/python")
}

#[derive(Clone, Copy, PartialEq)]
enum Needs {
    Node,
    Python,
    Browser,
    /// Node and the built `@switchyard/client` (`sdk/client/dist`, `sdk/client/node_modules`).
    Sdk,
}

/// What is missing to run a scenario, if anything.
fn missing(needs: Needs) -> Vec<String> {
    let mut missing = Vec::new();
    let works = |cmd: &mut std::process::Command| {
        cmd.stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
    };
    if needs != Needs::Python {
        if !works(std::process::Command::new("node").arg("--version")) {
            missing.push("node (apt-get install nodejs)".into());
        }
        if !centrifugo_dir().join("node_modules/centrifuge/package.json").exists() {
            missing.push("tests/centrifugo/node_modules (npm ci --prefix tests/centrifugo)".into());
        }
    }
    if needs == Needs::Python && !works(std::process::Command::new(venv_python()).args(["-c", "import centrifuge"])) {
        missing.push("tests/centrifugo/.venv with centrifuge-python (scripts/setup.sh --centrifugo)".into());
    }
    if needs == Needs::Sdk && !centrifugo_dir().join("../../sdk/client/dist/index.js").exists() {
        missing.push("sdk/client/dist (npm ci --prefix sdk/client && npm run build --prefix sdk/client)".into());
    }
    if needs == Needs::Browser {
        let chromium = std::env::var_os("CHROMIUM").map(PathBuf::from).unwrap_or_else(|| "/usr/bin/chromium".into());
        if !chromium.exists() {
            missing.push(format!("{} (apt-get install chromium, or set CHROMIUM)", chromium.display()));
        }
        if !centrifugo_dir().join("../browser/node_modules/playwright-core").exists() {
            missing.push("tests/browser/node_modules (npm ci --prefix tests/browser)".into());
        }
    }
    missing
}

/// False (after saying why) when a scenario cannot run here and need not.
fn can_run(test: &str, needs: Needs) -> bool {
    can_run_with(test, "the Centrifugo SDK test", &missing(needs))
}

// === impl Proxy ===

/// A TCP proxy on 127.0.0.1 in front of one router. The client's URL is the proxy's, so it
/// stays the same while the router behind it is restarted or replaced.
struct Proxy {
    addr: SocketAddr,
    /// Where new connections go.
    target: Arc<Mutex<SocketAddr>>,
    /// False: every connection is dropped and new ones are refused (a network cut).
    open: watch::Sender<bool>,
    /// TCP connections accepted so far (refused ones included).
    accepted: Arc<AtomicUsize>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Result<Proxy> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let target = Arc::new(Mutex::new(target));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (open, is_open) = watch::channel(true);
        let (t, n) = (target.clone(), accepted.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                n.fetch_add(1, Ordering::SeqCst);
                let mut is_open = is_open.clone();
                if !*is_open.borrow_and_update() {
                    continue; // refused: dropped at once
                }
                let to = *t.lock().expect("proxy target lock");
                tokio::spawn(async move {
                    let _ = inbound.set_nodelay(true);
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await else { return };
                    let _ = outbound.set_nodelay(true);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = is_open.wait_for(|o| !*o) => {}
                    }
                });
            }
        });
        Ok(Proxy { addr, target, open, accepted })
    }

    /// `ws://PROXY/connection/websocket`.
    fn url(&self) -> String {
        format!("ws://{}{ENDPOINT}", self.addr)
    }

    fn cut(&self) {
        let _ = self.open.send(false);
    }

    fn restore(&self) {
        let _ = self.open.send(true);
    }

    fn retarget(&self, to: SocketAddr) {
        *self.target.lock().expect("proxy target lock") = to;
    }
}

// === Running a scenario ===

/// What a script printed and how it ended.
struct Run {
    status: ExitStatus,
    out: String,
    err: String,
}

/// Runs `program script ARGS...` in `tests/centrifugo` within [`SCRIPT_DEADLINE`] (killed
/// after it), echoing every stdout line. A line starting with `@@` goes to `act`, whose
/// answer is written to the script's stdin: `@@ok JSON`, or `@@err MESSAGE` when it fails.
async fn run_script(
    program: &Path,
    script: &str,
    args: &[String],
    mut act: impl AsyncFnMut(&str) -> Result<Value>,
) -> Run {
    let started = Instant::now();
    let mut child = tokio::process::Command::new(program)
        .arg(script)
        .args(args)
        .current_dir(centrifugo_dir())
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {} {script}: {e}", program.display()));
    let mut stdin = child.stdin.take().expect("piped stdin");
    let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
    let mut stderr = child.stderr.take().expect("piped stderr");
    let err_task = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text).await;
        text
    });
    let deadline = started + SCRIPT_DEADLINE;
    let mut out = String::new();
    let ended = loop {
        let line = match tokio::time::timeout_at(deadline, lines.next_line()).await {
            Err(_) => break false,
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) | Ok(Err(_)) => break true,
        };
        println!("{line}");
        out.push_str(&line);
        out.push('\n');
        if let Some(request) = line.trim().strip_prefix("@@") {
            let answer = match act(request).await {
                Ok(v) => format!("@@ok {v}\n"),
                Err(e) => {
                    println!("     the test could not {request}: {e:#}");
                    format!("@@err {}\n", format!("{e:#}").replace('\n', " "))
                }
            };
            let _ = stdin.write_all(answer.as_bytes()).await;
            let _ = stdin.flush().await;
        }
    };
    let status =
        if ended { tokio::time::timeout_at(deadline, child.wait()).await.ok().and_then(Result::ok) } else { None };
    let status = match status {
        Some(status) => status,
        None => {
            let _ = child.kill().await;
            let err = tokio::time::timeout(Duration::from_secs(5), err_task).await.ok().and_then(Result::ok);
            panic!("{script} did not finish within {SCRIPT_DEADLINE:?}:\n{out}\n{}", err.unwrap_or_default());
        }
    };
    let err =
        tokio::time::timeout(Duration::from_secs(10), err_task).await.ok().and_then(Result::ok).unwrap_or_default();
    println!("{script}: {:.1} s", started.elapsed().as_secs_f64());
    Run { status, out, err }
}

/// The script succeeded and passed `steps` steps.
fn check(run: &Run, script: &str, steps: usize) {
    let Run { status, out, err } = run;
    assert!(status.success(), "{script} failed ({status}):\n{out}\n{err}");
    assert!(
        out.contains(&format!("centrifugo: {steps} passed, 0 failed")),
        "unexpected {script} output:\n{out}\n{err}"
    );
}

async fn node_script(script: &str, args: &[String], act: impl AsyncFnMut(&str) -> Result<Value>) -> Run {
    run_script(Path::new("node"), script, args, act).await
}

/// Publishes `{"i": from}`, `{"i": from + 1}`, ... (`count` of them) to `channel` through
/// the native protocol, pipelined, as user `native`; returns the first and last offsets and
/// the epoch.
async fn publish_native(node: &Node, channel: &str, from: u64, count: u64) -> Result<Value> {
    let mut c = connect_as(node, "native").await?;
    let (offsets, epoch) = c.publish_many(channel, (from..from + count).map(|i| json!({ "i": i }))).await?;
    Ok(json!({ "first": offsets.first(), "last": offsets.last(), "epoch": epoch }))
}

/// `VERB ARGS...` split on spaces.
fn words(request: &str) -> (&str, Vec<&str>) {
    let mut it = request.split_whitespace();
    (it.next().unwrap_or_default(), it.collect())
}

fn arg<T: std::str::FromStr>(args: &[&str], i: usize, request: &str) -> Result<T> {
    args.get(i).and_then(|a| a.parse().ok()).with_context(|| format!("argument {i} missing or bad in `{request}`"))
}

// === One router behind a proxy ===

/// One router with its config, behind a [`Proxy`].
struct Single {
    config: String,
    node: Node,
    proxy: Proxy,
}

impl Single {
    async fn start(config: &str) -> Single {
        let node = Node::start(config);
        let proxy = Proxy::start(node.addr()).await.expect("starting the proxy");
        Single { config: config.to_string(), node, proxy }
    }

    /// What a script may ask:
    /// - `cut`, `restore`: the proxy drops every connection and refuses new ones / accepts again;
    /// - `publish CHANNEL FROM COUNT`: native publishes of `{"i": FROM..}`, straight to the router;
    /// - `kill9-restart [CHANNEL FROM COUNT]`: kill -9, start again on the same config, data
    ///   dir and port, and publish as `publish` does at once;
    /// - `fresh-router`: kill -9, and a router on a fresh data dir (a new epoch) takes the
    ///   same port;
    /// - `connections`: `{"accepted": N}`, TCP connections the proxy accepted so far.
    async fn act(&mut self, request: &str) -> Result<Value> {
        let (verb, args) = words(request);
        match verb {
            "cut" => self.proxy.cut(),
            "restore" => self.proxy.restore(),
            "publish" => {
                let channel = args.first().context("publish needs a channel")?;
                return publish_native(&self.node, channel, arg(&args, 1, request)?, arg(&args, 2, request)?).await;
            }
            "kill9-restart" => {
                tokio::task::block_in_place(|| self.node.kill9_restart_same_port());
                self.proxy.retarget(self.node.addr());
                if let Some(channel) = args.first() {
                    // At once, before a reconnecting client (100 ms backoff at least) is back.
                    return publish_native(&self.node, channel, arg(&args, 1, request)?, arg(&args, 2, request)?).await;
                }
            }
            "fresh-router" => {
                let addr = self.node.addr();
                tokio::task::block_in_place(|| self.node.kill9());
                self.node = tokio::task::block_in_place(|| Node::try_start_on(&self.config, addr))?;
                self.proxy.retarget(self.node.addr());
            }
            "connections" => return Ok(json!({ "accepted": self.proxy.accepted.load(Ordering::SeqCst) })),
            other => bail!("unknown request {other:?}"),
        }
        Ok(json!({ "router": self.node.addr().to_string() }))
    }
}

fn config(extra: &str) -> String {
    jwt_config("", &format!("{ROOM}{extra}"))
}

/// Runs a Node scenario against one router: `node SCRIPT URL SECRET EXTRA...`, where URL
/// goes through the proxy (`via_proxy`, for scenarios that cut the network) or straight to
/// the router.
async fn single_node_scenario(script: &str, via_proxy: bool, config: &str, extra: &[&str], steps: usize) {
    let mut single = Single::start(config).await;
    let url = if via_proxy { single.proxy.url() } else { format!("ws://{}{ENDPOINT}", single.node.addr()) };
    let mut args = vec![url, SECRET.to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    let run = node_script(script, &args, async |request| single.act(request).await).await;
    check(&run, script, steps);
}

// === The JS client (centrifuge 5.8.0) ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_connect_subscribe_publish_history() {
    if !can_run("js_connect_subscribe_publish_history", Needs::Node) {
        return;
    }
    single_node_scenario("basic.mjs", false, &config(""), &[], 8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_recovers_after_a_network_cut_and_a_reconnect() {
    if !can_run("js_recovers_after_a_network_cut_and_a_reconnect", Needs::Node) {
        return;
    }
    single_node_scenario("recovery.mjs", true, &config(""), &[], 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_recovers_5000_missed_publications() {
    if !can_run("js_recovers_5000_missed_publications", Needs::Node) {
        return;
    }
    single_node_scenario("missed.mjs", true, &config(""), &["5000"], 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_recovers_across_kill9_and_not_across_a_new_epoch() {
    if !can_run("js_recovers_across_kill9_and_not_across_a_new_epoch", Needs::Node) {
        return;
    }
    single_node_scenario("restart.mjs", false, &config(""), &[], 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_refreshes_expiring_tokens_without_reconnecting() {
    if !can_run("js_refreshes_expiring_tokens_without_reconnecting", Needs::Node) {
        return;
    }
    single_node_scenario("token.mjs", true, &config(""), &["refresh"], 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_stops_for_good_on_a_forged_token() {
    if !can_run("js_stops_for_good_on_a_forged_token", Needs::Node) {
        return;
    }
    single_node_scenario("token.mjs", true, &config(""), &["forged"], 2).await;
}

/// `[sessions]` with a 2 s ping, for the scenarios that check the SDKs stay connected on
/// the server's `{}` pings alone.
const FAST_PINGS: &str = "[sessions]\nping_interval = \"2s\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_stays_connected_on_server_pings() {
    if !can_run("js_stays_connected_on_server_pings", Needs::Node) {
        return;
    }
    single_node_scenario("pings.mjs", false, &format!("{}{FAST_PINGS}", config("")), &[], 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_presence_and_join_leave() {
    if !can_run("js_presence_and_join_leave", Needs::Node) {
        return;
    }
    single_node_scenario("presence.mjs", false, &config(PRESENCE_KEYS), &[], 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_and_native_clients_share_a_room() {
    if !can_run("js_and_native_clients_share_a_room", Needs::Node) {
        return;
    }
    let mut single = Single::start(&config("")).await;
    let args = vec![single.proxy.url(), single.node.addr().to_string(), SECRET.to_string()];
    let run = node_script("mixed.mjs", &args, async |request| single.act(request).await).await;
    check(&run, "mixed.mjs", 3);
}

/// A centrifuge client and an `@switchyard/client` client in one room with presence: each
/// other's messages with the same offsets, both in presence, each other's join and leave.
#[tokio::test]
async fn js_and_switchyard_sdk_clients_share_messages_and_presence() {
    if !can_run("js_and_switchyard_sdk_clients_share_messages_and_presence", Needs::Sdk) {
        return;
    }
    let mut single = Single::start(&config(PRESENCE_KEYS)).await;
    let url = format!("ws://{}{ENDPOINT}", single.node.addr());
    let args = vec![url, single.node.addr().to_string(), SECRET.to_string()];
    let run = node_script("mixed_sdk.mjs", &args, async |request| single.act(request).await).await;
    check(&run, "mixed_sdk.mjs", 3);
}

// === A 3-node cluster ===

const P: u32 = 16;
const CLUSTER_SECRET: &str = "centrifugo-sdk-cluster-secret-0123";

/// Three nodes on one etcd with peer links (two replicas per partition), and the channel
/// the scenario uses: one led by `n2`, which the clients (on `n1` and `n3`) do not own.
struct Cluster {
    etcd: Etcd,
    nodes: Vec<Node>,
    channel: String,
}

impl Cluster {
    async fn start() -> Result<Cluster> {
        let etcd = Etcd::start().await;
        let nodes: Vec<Node> = ["n1", "n2", "n3"]
            .iter()
            .map(|id| {
                let base = node_config(&etcd, "cf", id, P, &jwt_config("", &format!("{ROOM}{}", admin_section())));
                Node::start(&format!("{base}secret = \"{CLUSTER_SECRET}\"\n"))
            })
            .collect();
        let map = wait_converged(&etcd, "cf", &[&nodes[0], &nodes[1], &nodes[2]], &["n1", "n2", "n3"]).await?;
        let channel = (0..)
            .map(|i| format!("room:cf{i}"))
            .find(|c| map["owners"][partition_of(c, P) as usize] == "n2")
            .expect("n2 owns some channel");
        let p = partition_of(&channel, P) as usize;
        let mut last = Value::Null;
        wait_until("the channel's partition has two in-sync replicas", DEADLINE, async || {
            let Some(map) = etcd.map("cf")? else { return Ok(false) };
            let n = map["isr"][p].as_array().map_or(0, Vec::len);
            last = map;
            Ok(n >= 2)
        })
        .await
        .with_context(|| format!("last map: {last}"))?;
        Ok(Cluster { etcd, nodes, channel })
    }

    /// `kill-leader`: kill -9 the channel's leader, wait until another node leads it;
    /// answers `{"killed", "leader"}`.
    async fn act(&mut self, request: &str) -> Result<Value> {
        ensure!(request.trim() == "kill-leader", "unknown request {request:?}");
        let p = partition_of(&self.channel, P) as usize;
        let map = self.etcd.map("cf")?.context("no partition map")?;
        let leader = map["owners"][p].as_str().context("no owner")?.to_string();
        let idx: usize = leader.trim_start_matches('n').parse::<usize>()? - 1;
        tokio::task::block_in_place(|| self.nodes[idx].kill9());
        let mut now = String::new();
        wait_until("another node leads the channel", DEADLINE, async || {
            let Some(m) = self.etcd.map("cf")? else { return Ok(false) };
            now = m["owners"][p].as_str().unwrap_or_default().to_string();
            Ok(!now.is_empty() && now != leader)
        })
        .await?;
        Ok(json!({ "killed": leader, "leader": now }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_on_a_cluster_survives_the_leader_kill9() {
    if !can_run("js_on_a_cluster_survives_the_leader_kill9", Needs::Node) {
        return;
    }
    let mut cluster = Cluster::start().await.expect("a converged 3-node cluster");
    let url = |n: &Node| format!("ws://{}{ENDPOINT}", n.addr());
    let args = vec![url(&cluster.nodes[0]), url(&cluster.nodes[2]), SECRET.to_string(), cluster.channel.clone()];
    let run = node_script("cluster.mjs", &args, async |request| cluster.act(request).await).await;
    check(&run, "cluster.mjs", 4);
}

// === The browser bundle ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_bundle_in_headless_chromium() {
    if !can_run("browser_bundle_in_headless_chromium", Needs::Browser) {
        return;
    }
    single_node_scenario("browser.mjs", false, &config(""), &[], 2).await;
}

// === The Python client (centrifuge-python) ===

async fn python_scenario(mode: &str, config: &str, steps: usize) {
    let mut single = Single::start(config).await;
    let args = vec![single.proxy.url(), SECRET.to_string(), mode.to_string()];
    let run = run_script(&venv_python(), "scenarios.py", &args, async |request| single.act(request).await).await;
    check(&run, &format!("scenarios.py {mode}"), steps);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_connect_subscribe_publish_history_recover() {
    if !can_run("python_connect_subscribe_publish_history_recover", Needs::Python) {
        return;
    }
    python_scenario("basic", &config(""), 7).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_refreshes_expiring_tokens() {
    if !can_run("python_refreshes_expiring_tokens", Needs::Python) {
        return;
    }
    python_scenario("refresh", &config(""), 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_stays_connected_on_server_pings_while_publications_flow() {
    if !can_run("python_stays_connected_on_server_pings_while_publications_flow", Needs::Python) {
        return;
    }
    python_scenario("pings", &format!("{}{FAST_PINGS}", config("")), 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_presence_and_join_leave() {
    if !can_run("python_presence_and_join_leave", Needs::Python) {
        return;
    }
    python_scenario("presence", &config(PRESENCE_KEYS), 3).await;
}

// === The harness itself (no SDK needed) ===

/// What the scenarios ask of [`Single`]: native publishes, a kill -9 and restart on the
/// same data dir and port (history kept, same epoch), a fresh router on the same port (a
/// new epoch), and a cut proxy that refuses connections until restored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_harness_restarts_routers_on_the_same_port_and_cuts_the_network() -> Result<()> {
    let mut single = Single::start(&config("")).await;
    let addr = single.node.addr();
    let published = single.act("publish room:h 1 3").await?;
    assert_eq!(published["last"], 3, "{published}");
    let epoch = published["epoch"].clone();

    single.act("kill9-restart").await?;
    assert_eq!(single.node.addr(), addr, "restarted on another port");
    let h = connect_as(&single.node, "checker").await?.history("room:h", None, Some(10)).await?;
    assert_eq!((h.offsets(), json!(h.epoch)), (vec![1, 2, 3], epoch.clone()), "history after kill -9");

    single.act("fresh-router").await?;
    assert_eq!(single.node.addr(), addr, "the fresh router is on another port");
    let h = connect_as(&single.node, "checker").await?.history("room:h", None, Some(10)).await?;
    assert!(h.messages.is_empty() && json!(h.epoch) != epoch, "a fresh data dir has no history and a new epoch: {h:?}");

    // Through the proxy: a connection works; cut, it is refused (closed at once); restored, it works.
    let through = async |proxy: &Proxy| -> Result<bool> {
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await?;
        s.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", proxy.addr).as_bytes())
            .await?;
        let mut reply = Vec::new();
        let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut reply)).await?;
        Ok(reply.starts_with(b"HTTP/1.1 200"))
    };
    assert!(through(&single.proxy).await?, "the proxy forwards");
    assert_eq!(single.act("cut").await?["router"], addr.to_string());
    assert!(!through(&single.proxy).await?, "a cut proxy refuses");
    single.act("restore").await?;
    assert!(through(&single.proxy).await?, "a restored proxy forwards");
    assert_eq!(single.act("connections").await?["accepted"], 3);
    Ok(())
}
